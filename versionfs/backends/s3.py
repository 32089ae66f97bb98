"""S3 backend: a prefix of a bucket with versioning enabled.

A *version of the prefix* is an instant at which any key under it changed (a PUT
or a delete marker); versions are named by that UTC time. The view at an instant
shows, for every key, its newest object version at or before it, and hides keys
whose newest entry there is a delete marker.

Order inside one key is the listing order (S3 lists each key's versions newest
first), not LastModified: many servers store whole seconds, so two writes in
one second tie on time. boto3 parses versions and delete markers into separate
lists and loses how they interleave, so the listing's XML is read for the order.
"""

from __future__ import annotations

import datetime as dt
import logging
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from ..errors import SourceError
from .base import NAME_MAX, Dir, File, VersionInfo, safe_name, to_ns

log = logging.getLogger(__name__)
UTC = dt.timezone.utc
RANGE_PART = 8 << 20  # bytes per ranged GET
PARALLEL_GETS = 8


@dataclass(frozen=True)
class ObjectVersion:
    key: str
    version_id: str
    modified: dt.datetime
    etag: str | None
    size: int
    deleted: bool  # a delete marker


@dataclass(frozen=True)
class S3Ref:
    """One object version, as a file."""

    key: str
    version_id: str
    etag: str | None
    size: int


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SourceError(f"{url}: not an S3 URL (s3://bucket[/prefix])")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parsed.netloc, prefix


def version_name(instant: dt.datetime) -> str:
    """``2024-01-15T10:30:00Z``; with the fraction only when the store has one."""
    text = instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def path_parts(relative_key: str) -> list[str] | None:
    """The path components of a key below the prefix, or None if it cannot be a
    path (README: keys that are not valid paths are skipped and logged once)."""
    if not relative_key or relative_key.endswith("/") or "\0" in relative_key:
        return None
    parts = relative_key.split("/")
    if any(p in ("", ".", "..") or len(p.encode()) > NAME_MAX for p in parts):
        return None
    return parts


class S3Backend:
    """Versions of one prefix (see the module docstring)."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.description = f"s3://{self.bucket}/{self.prefix}"
        config = Config(retries={"max_attempts": 10, "mode": "standard"}, max_pool_connections=PARALLEL_GETS * 2)
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._pool = ThreadPoolExecutor(PARALLEL_GETS, thread_name_prefix="versionfs-s3")
        self._logged: set[str] = set()
        self._listing_order: list[list[tuple[str, str]]] = []
        self.client.meta.events.register("after-call.s3.ListObjectVersions", self._remember_order)
        self._check_versioning()
        self._by_key: dict[str, list[ObjectVersion]] = {}
        self._instants: list[dt.datetime] = []

    # -- opening ----------------------------------------------------------------------
    def _check_versioning(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            status = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
        except NoCredentialsError:
            raise SourceError(f"{self.description}: no AWS credentials (environment, ~/.aws or instance role)") from None
        except ClientError as e:
            raise SourceError(f"{self.description}: {e.response['Error'].get('Code')}: {e.response['Error'].get('Message')}") from None
        except BotoCoreError as e:
            raise SourceError(f"{self.description}: {e}") from None
        if status != "Enabled":
            raise SourceError(
                f"{self.description}: bucket versioning is {status or 'not enabled'}; versionfs needs it Enabled "
                f"(run: versionfs init s3://{self.bucket})"
            )

    # -- listing ----------------------------------------------------------------------
    def _remember_order(self, http_response: Any = None, **_: Any) -> None:
        """(key, version id) in the order the listing's XML gives them."""
        root = ET.fromstring(http_response.content)
        order = []
        for element in root:
            tag = element.tag.rsplit("}", 1)[-1]
            if tag in ("Version", "DeleteMarker"):
                key = element.findtext("{*}Key")
                version_id = element.findtext("{*}VersionId")
                order.append((key, version_id))
        self._listing_order.append(order)

    def _list(self) -> list[ObjectVersion]:
        """Every object version and delete marker under the prefix, in listing order."""
        self._listing_order = []
        found: dict[tuple[str, str], ObjectVersion] = {}
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        while True:
            page = self.client.list_object_versions(**kwargs)
            for item in page.get("Versions", []):
                found[item["Key"], item["VersionId"]] = ObjectVersion(
                    item["Key"], item["VersionId"], item["LastModified"].astimezone(UTC),
                    item.get("ETag"), int(item.get("Size", 0)), False,
                )
            for item in page.get("DeleteMarkers", []):
                found[item["Key"], item["VersionId"]] = ObjectVersion(
                    item["Key"], item["VersionId"], item["LastModified"].astimezone(UTC), None, 0, True,
                )
            if not page.get("IsTruncated"):
                break
            # Both markers: one key's versions may span pages.
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["VersionIdMarker"] = page["NextVersionIdMarker"]
        ordered = [found.pop(kv) for page in self._listing_order for kv in page if kv in found]
        return ordered + list(found.values())  # anything the XML did not show, last

    def versions(self) -> list[VersionInfo]:
        by_key: dict[str, list[ObjectVersion]] = defaultdict(list)
        for version in self._list():
            by_key[version.key].append(version)
        for versions in by_key.values():
            # Newest first. Listing order decides only between equal times (some
            # servers list a key's delete markers after all of its versions).
            versions.sort(key=lambda v: v.modified, reverse=True)
        self._by_key = dict(by_key)
        self._instants = sorted({v.modified for versions in by_key.values() for v in versions})
        infos, previous = [], None
        for instant in self._instants:
            name = version_name(instant)
            infos.append(VersionInfo(name=name, timestamp=instant, previous=previous))
            previous = name
        return infos

    def current(self) -> str | None:
        return version_name(self._instants[-1]) if self._instants else None

    def _instant(self, name: str) -> dt.datetime:
        for instant in self._instants:
            if version_name(instant) == name:
                return instant
        raise KeyError(name)

    def view(self, instant: dt.datetime) -> dict[str, ObjectVersion]:
        """key -> the object version shown at ``instant`` (delete markers hidden)."""
        out = {}
        for key, versions in self._by_key.items():
            # Newest first: the first one at or before the instant is the one shown.
            shown = next((v for v in versions if v.modified <= instant), None)
            if shown is not None and not shown.deleted:
                out[key] = shown
        return out

    # -- trees --------------------------------------------------------------------------
    def tree(self, version: str) -> Dir:
        instant = self._instant(version)
        mtime = to_ns(instant)
        root = Dir(mtime_ns=mtime)
        dirs: dict[tuple[str, ...], Dir] = {(): root}
        files: list[tuple[list[str], ObjectVersion]] = []
        for key, shown in sorted(self.view(instant).items()):
            parts = path_parts(key[len(self.prefix):])
            if parts is None:
                self._log_once(key, "key %r is not a valid path: not shown", key)
                continue
            files.append((parts, shown))
            for i in range(1, len(parts)):
                dirs.setdefault(tuple(parts[:i]), Dir(mtime_ns=mtime))
        # Directories first, so a key "a" next to keys "a/…" is the one renamed.
        for path in sorted(p for p in dirs if p):
            parent = dirs[path[:-1]]
            parent.children[path[-1]] = dirs[path]
        for parts, shown in files:
            parent = dirs[tuple(parts[:-1])]
            name = safe_name(parts[-1], "", set(parent.children))
            if name != parts[-1]:
                self._log_once(shown.key, "key %r is shown as %r (the name is taken)", shown.key, name)
            parent.children[name] = File(
                size=shown.size,
                mtime_ns=to_ns(shown.modified),
                ref=S3Ref(shown.key, shown.version_id, shown.etag, shown.size),
                layout=(0, RANGE_PART),
            )
        return root

    # -- data ---------------------------------------------------------------------------
    def file_size(self, ref: S3Ref) -> int:
        return ref.size

    def read(self, ref: S3Ref, offset: int, length: int) -> bytes:
        end = min(offset + length, ref.size)
        if offset >= end:
            return b""
        ranges = [(start, min(start + RANGE_PART, end)) for start in range(offset, end, RANGE_PART)]
        parts = self._pool.map(lambda r: self._get(ref, *r), ranges)
        return b"".join(parts)

    def _get(self, ref: S3Ref, start: int, stop: int) -> bytes:
        response = self.client.get_object(
            Bucket=self.bucket, Key=ref.key, VersionId=ref.version_id, Range=f"bytes={start}-{stop - 1}"
        )
        data = response["Body"].read()
        if "ContentRange" not in response and len(data) == ref.size and stop - start != ref.size:
            # The server ignored the Range (some do with a VersionId): cut it here.
            return data[start:stop]
        if len(data) != stop - start:
            raise OSError(f"s3://{self.bucket}/{ref.key}: asked for {stop - start} bytes at {start}, got {len(data)}")
        return data

    def fingerprint(self, ref: S3Ref) -> Any:
        # A version id names one immutable content; so does an MD5 ETag with its size.
        if ref.etag and "-" not in ref.etag:
            return ("etag", ref.etag, ref.size)
        return ("version", ref.key, ref.version_id)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def enable_versioning(url: str, endpoint_url: str | None = None) -> str:
    """``versionfs init s3://bucket``: turn versioning on (creating nothing else)."""
    import boto3

    bucket, _ = parse_url(url)
    client = boto3.client("s3", endpoint_url=endpoint_url)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return f"versioning enabled on s3://{bucket}"

