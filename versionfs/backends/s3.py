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

import base64
import bisect
import datetime as dt
import hashlib
import logging
import os
import stat as stat_mod
import threading
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Counter, Iterator
from urllib.parse import quote, urlparse

from ..cache import DiskCache, Lru
from ..errors import ConflictError, SourceError
from ..logs import once
from . import s3_data
from .base import (NAME_MAX, Change, Dir, Duplicate, Execution, File, FileDelta, FileMeta, History, Layout, Progress, Revision,
                   VersionInfo, find, join, safe_name, to_ns)

log = logging.getLogger(__name__)
UTC = dt.timezone.utc
RANGE_PART = 8 << 20  # bytes per ranged GET (and per block of the disk cache)
PARALLEL_GETS = 8
MAX_ATTEMPTS = 10
READAHEAD = RANGE_PART * PARALLEL_GETS  # an open file's largest read-ahead window: 8 GETs at once
METADATA_READ_TIMEOUT = 20.0  # seconds without a byte, for listings, HEADs and commits (retried by botocore)
XATTR_CACHE_SIZE = 1 << 16  # object versions whose user metadata is kept (it never changes; a few hundred bytes each; stat needs it: mode, links)
MULTIPART_THRESHOLD = 64 << 20  # larger files are uploaded in parts
PART_SIZE = 16 << 20
SMALL_BODY = 1 << 20  # uploads up to this size are sent from memory
SHA_META = "versionfs-sha256"  # x-amz-meta-versionfs-sha256: the content's SHA-256
MESSAGE_META = "versionfs-message"  # the commit message (URL-quoted)
DIR_CACHE_VERSIONS = 200_000  # object versions kept in directory listings (about 400 bytes each)
# A file's metadata as s3fs-fuse keeps it (x-amz-meta-mode: st_mode in decimal,
# S_IFLNK for a symlink whose body is its target; -mtime: "sec[.nnnnnnnnn]";
# -uid, -gid): s3fs, and versionfs, read each other's files the same way.
MODE_META, MTIME_META, UID_META, GID_META = "mode", "mtime", "uid", "gid"


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


def _timestamp(value: str) -> dt.datetime:
    """botocore's timestamp parser, fast for the ISO times listings carry (dateutil
    takes a millisecond each: a second for every page of a listing)."""
    try:
        return dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        from botocore.utils import parse_timestamp

        return parse_timestamp(value)


def _session() -> Any:
    """A boto3 session of its own whose clients parse timestamps with ``_timestamp``."""
    import boto3
    import botocore.session

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
    return boto3.session.Session(botocore_session=session)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SourceError(f"{url}: not an S3 URL (s3://bucket[/prefix])")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parsed.netloc, prefix


def version_name(instant: dt.datetime, digits: int = 0) -> str:
    """``2024-01-15T10:30:00Z``, or with ``digits`` (3 or 6) of fraction on stores
    with sub-second times: fixed width, so names sort as times do."""
    text = instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return (text[: 20 + digits] if digits else text[:19]) + "Z"


def fraction_digits(instants: list[dt.datetime]) -> int:
    """The store's precision, from the times it gave: 0, 3 or 6 digits."""
    if all(i.microsecond == 0 for i in instants):
        return 0
    return 3 if all(i.microsecond % 1000 == 0 for i in instants) else 6


def path_parts(relative_key: str) -> list[str] | None:
    """The path components of a key below the prefix, or None if it cannot be a
    path (doc/SEMANTICS.md § Odd names: keys that are not valid paths are skipped and logged once)."""
    if not relative_key or relative_key.endswith("/") or "\0" in relative_key:
        return None
    parts = relative_key.split("/")
    if any(p in ("", ".", "..") or len(p.encode()) > NAME_MAX for p in parts):
        return None
    return parts


class S3Backend:
    """Versions of one prefix (see the module docstring). Every call may run
    beside any other (boto3 clients are thread-safe; a listing's state is
    replaced whole), so a store that does not answer holds up only the calls
    that wait on it."""

    # Reads: many at once, so that one waiting on the store (bounded by
    # store_timeout) never keeps a read of cached content waiting for a thread;
    # requests in flight are bounded in s3_data (MAX_GETS).
    execution = Execution(serial=False, reads=64)
    names_versions = False  # a version is the instant of its writes
    poll_interval = 5.0  # other writers' versions appear within seconds
    image_ext = None  # objects are files already: no single-file form of a version
    list_page = 1000  # entries per ListObjectVersions page (the store's maximum)
    generated_names: frozenset[str] = frozenset()  # every key is an ordinary file (.version.json too)
    edits_in_place = False  # an upload sends the whole file
    no_compaction = None  # a key's consecutive equal versions can go (versionfs compact)
    commit_parallel = 16  # writes of a commit in flight at once
    multipart_threshold = MULTIPART_THRESHOLD  # larger files are uploaded in parts
    part_size = PART_SIZE

    def __init__(self, url: str, endpoint_url: str | None = None, cache: DiskCache | None = None,
                 store_timeout: float = 30.0):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_url(url)
        self.description = f"s3://{self.bucket}/{self.prefix}"
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "aws"
        self.identity = f"s3:{endpoint}:{self.bucket}/{self.prefix}"
        self.spool_key = self.identity  # two endpoints may have buckets of the same name
        # The first request answers "can this be mounted at all?": a wrong endpoint,
        # one that drops packets or a missing bucket is said in seconds, not after
        # ten retries (two short attempts, before any other client is made).
        self._check_versioning(boto3.client("s3", endpoint_url=endpoint_url, config=Config(
            retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=s3_data.PROBE_TIMEOUT,
            read_timeout=s3_data.PROBE_TIMEOUT)))
        # Transient errors (5xx, throttling, resets) are retried with backoff;
        # AWS_MAX_ATTEMPTS, botocore's own setting, still overrides the count.
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", MAX_ATTEMPTS))
        config = Config(retries={"max_attempts": attempts, "mode": "standard"},
                        max_pool_connections=PARALLEL_GETS * 2 + self.commit_parallel,
                        connect_timeout=s3_data.CONNECT_TIMEOUT, read_timeout=METADATA_READ_TIMEOUT)
        self.client = _session().client("s3", endpoint_url=endpoint_url, config=config)
        # Content (GETs, HEADs of xattrs): bounded in time as a whole (--store-timeout).
        self.store_timeout = store_timeout
        self._data = s3_data.Requests(endpoint_url, store_timeout, self.description)
        self._pool = ThreadPoolExecutor(PARALLEL_GETS, thread_name_prefix="versionfs-s3")  # commits' parts
        self._commit_pool: ThreadPoolExecutor | None = None  # a commit's writes: made by the first commit
        # The next versions() answer, if a commit just listed (until the deadline).
        self._listed_by_commit: tuple[list[VersionInfo], float] | None = None
        self._kept: dict[str, list[ObjectVersion]] = {}  # a commit's keys as its last listing found them
        self._get_pool = ThreadPoolExecutor(s3_data.MAX_GETS, thread_name_prefix="versionfs-s3-get")
        self._xattrs: Lru[dict[str, str]] = Lru(XATTR_CACHE_SIZE)  # object version -> its user metadata
        self._xattrs_lock = threading.Lock()
        # Cache writes happen beside the reads, not in front of them.
        self._cache_writer = ThreadPoolExecutor(1, thread_name_prefix="versionfs-s3-cache")
        self.cache = cache
        self._listing = threading.local()  # per thread: the XML order of the listing under way
        self.client.meta.events.register("after-call.s3.ListObjectVersions", self._remember_order)
        self._instants: list[dt.datetime] = []  # every instant at which a key changed, oldest first
        self._by_name: dict[str, dt.datetime] = {}
        self._digits = 0
        # Which directories hold a shown key when: directory -> (start, end) ns intervals.
        self._alive: dict[str, tuple[tuple[int, int], ...]] = {}
        self._dir_digests: dict[str, bytes] = {}  # directory -> digest of its keys' versions (what a poll compares)
        # One listing per directory (Delimiter "/"), for views and history/, kept by size
        # until a poll sees that directory change.
        self._dirs: Lru[DirListing] = Lru(DIR_CACHE_VERSIONS, weight=lambda d: 1 + d.size)
        self._dirs_lock = threading.Lock()  # metadata calls run concurrently
        self.signature: bytes | None = None  # of the last listing: tells the namespace what changed
        self.counters: Counter[str] = Counter()  # requests and builds (the control socket's stats)

    # -- opening ----------------------------------------------------------------------
    def _check_versioning(self, probe: Any) -> None:
        try:
            status = probe.get_bucket_versioning(Bucket=self.bucket).get("Status")
        except Exception as e:  # noqa: BLE001 - said for people by bucket_failure
            raise bucket_failure(self.description, self.bucket, e) from None
        if status != "Enabled":
            raise SourceError(
                f"{self.description}: bucket versioning is {status or 'not enabled'}; versionfs needs it Enabled "
                f"(run: versionfs init s3://{self.bucket})"
            )

    # -- listing ----------------------------------------------------------------------
    def _remember_order(self, http_response: Any = None, **_: Any) -> None:
        """Keep the listing's XML: the order of versions and delete markers is read
        from it where a page has both (``_order``)."""
        self._listing.body = http_response.content

    @staticmethod
    def _order(body: bytes) -> list[tuple[str, str]]:
        """(key, version id) in the order the listing's XML gives them."""
        order = []
        for element in ET.fromstring(body):
            tag = element.tag.rsplit("}", 1)[-1]
            if tag in ("Version", "DeleteMarker"):
                order.append((element.findtext("{*}Key"), element.findtext("{*}VersionId")))
        return order

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[tuple[list[ObjectVersion], list[str]]]:
        """Each page of object versions and delete markers under ``prefix``, in
        listing order, with the "subdirectory" prefixes it found (with a delimiter)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.list_page}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            self._listing.body = b""
            page = self.client.list_object_versions(**kwargs)
            self._count("list requests")
            found: dict[tuple[str, str], ObjectVersion] = {}
            for item in page.get("Versions", []):
                found[item["Key"], item["VersionId"]] = ObjectVersion(
                    item["Key"], item["VersionId"], item["LastModified"].astimezone(UTC),
                    item.get("ETag"), int(item.get("Size", 0)), False,
                )
            for item in page.get("DeleteMarkers", []):
                found[item["Key"], item["VersionId"]] = ObjectVersion(
                    item["Key"], item["VersionId"], item["LastModified"].astimezone(UTC), None, 0, True,
                )
            if page.get("DeleteMarkers") and page.get("Versions"):
                # boto3 gives versions and delete markers apart: how they interleave is in the XML.
                ordered = [found.pop(kv) for kv in self._order(self._listing.body) if kv in found]
                listed = ordered + list(found.values())  # anything the XML did not show, last
            else:
                listed = list(found.values())  # one kind only: boto3 kept the listing's order
            yield listed, [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                break
            # Both markers: one key's versions may span pages. A page that ends on a
            # common prefix has a key marker only.
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs.pop("VersionIdMarker", None)
            if page.get("NextVersionIdMarker"):
                kwargs["VersionIdMarker"] = page["NextVersionIdMarker"]

    def _list(self, prefix: str, delimiter: str | None = None) -> tuple[list[ObjectVersion], list[str]]:
        """Every object version and delete marker under ``prefix`` in listing order
        and, with a delimiter, the "subdirectory" prefixes found."""
        versions: list[ObjectVersion] = []
        subdirs: list[str] = []
        for page, prefixes in self._pages(prefix, delimiter):
            versions += page
            subdirs += prefixes
        return versions, subdirs

    @staticmethod
    def _by_key_newest_first(listing: list[ObjectVersion]) -> dict[str, list[ObjectVersion]]:
        by_key: dict[str, list[ObjectVersion]] = defaultdict(list)
        for version in listing:
            by_key[version.key].append(version)
        for versions in by_key.values():
            # Newest first. Listing order decides only between equal times (some
            # servers list a key's delete markers after all of its versions).
            versions.sort(key=lambda v: v.modified, reverse=True)
        return dict(by_key)

    def versions(self) -> list[VersionInfo]:
        """Every instant at which a key under the prefix changed, from one pass
        over the whole listing that keeps no object version: the instants, a
        digest per directory and when each directory holds a shown key (views
        list their directories themselves)."""
        fresh, self._listed_by_commit = self._listed_by_commit, None
        if fresh is not None and time.monotonic() < fresh[1]:
            return fresh[0]  # the listing a commit just ended with
        return self._versions()

    def _versions(self, keep: set[str] | frozenset[str] = frozenset()) -> list[VersionInfo]:
        """versions(), listing again; the object versions of the keys in ``keep``
        go to ``self._kept`` (newest first), for a commit's checks."""
        scan = _Scan(self.prefix)
        kept: list[ObjectVersion] = []
        for page, _ in self._pages(self.prefix):
            scan.add(page)
            if keep:
                kept += [v for v in page if v.key in keep]
        scan.finish()
        self._kept = self._by_key_newest_first(kept)
        self._count("version lists")
        if scan.signature != self.signature:
            # Only what changed is listed again (history/ and views).
            for directory in set(scan.dir_digests) | set(self._dir_digests):
                if scan.dir_digests.get(directory) != self._dir_digests.get(directory):
                    with self._dirs_lock:
                        self._dirs.discard(directory)
        self.signature = scan.signature
        self._dir_digests = scan.dir_digests
        self._alive = scan.alive
        self._instants = sorted(scan.instants)
        self._digits = fraction_digits(self._instants)
        infos, previous = [], None
        self._by_name = {}
        for instant in self._instants:
            name = version_name(instant, self._digits)
            self._by_name[name] = instant
            infos.append(VersionInfo(name=name, timestamp=instant, previous=previous))
            previous = name
        return infos

    def current(self) -> str | None:
        return version_name(self._instants[-1], self._digits) if self._instants else None

    def _instant(self, name: str) -> dt.datetime:
        return self._by_name[name]

    def _dir_alive(self, directory: str, at_ns: int) -> bool:
        intervals = self._alive.get(directory, ())
        i = bisect.bisect_right(intervals, (at_ns, _FOREVER)) - 1
        return i >= 0 and intervals[i][0] <= at_ns < intervals[i][1]

    # -- trees --------------------------------------------------------------------------
    def listdir(self, version: str, path: str, ref: Any = None) -> dict[str, File | Dir]:
        """One directory of the view at ``version``, from that directory's own
        listing (shared by every version and by history/): each key's newest
        version at or before the instant, delete markers hidden, and the
        subdirectories that hold a shown key then."""
        instant = self._instant(version)
        at_ns, mtime = to_ns(instant), to_ns(instant)
        listing = self._dir_listing(path)
        self._count("listings")
        out: dict[str, File | Dir] = {}
        # Directories first, so a key "a" next to keys "a/…" is the one renamed.
        for name in sorted(listing.subdirs):
            if self._dir_alive(join(path, name), at_ns):
                out[name] = Dir(mtime_ns=mtime)
        for name in sorted(listing.keys):
            shown = next((v for v in listing.keys[name] if v.modified <= instant), None)
            if shown is None or shown.deleted or not self._valid(path, name):
                continue
            display = safe_name(name, "", set(out))
            if display != name:
                log.warning("key %r is shown as %r (the name is taken)", shown.key, display, extra=once(("s3-key", shown.key)))
            out[display] = _file(shown)
        return out

    def tree(self, version: str) -> Dir:
        """The whole view at ``version`` (one listing per directory)."""
        mtime = to_ns(self._instant(version))
        root = Dir(mtime_ns=mtime)
        pending = [("", root)]
        while pending:
            path, node = pending.pop()
            node.children = self.listdir(version, path)
            pending += [(join(path, n), e) for n, e in node.children.items() if isinstance(e, Dir)]
        self._count("trees")
        return root

    # -- history ------------------------------------------------------------------------
    def history(self, path: str) -> History:
        """From one listing per directory (Delimiter "/"), kept until a poll sees
        any change: the names ever below ``path`` and every version and delete
        marker of the key at ``path``, oldest first. A key's own history needs
        only its directory's listing."""
        children: set[str] = set()
        revisions: tuple[Revision, ...] = ()
        versions: list[ObjectVersion] = []
        is_dir = not path
        if path:
            parent, _, name = path.rpartition("/")
            siblings = self._dir_listing(parent)
            versions = siblings.keys.get(name, [])
            is_dir = name in siblings.subdirs  # a key only: no listing of "<key>/" needed
        if is_dir:
            listing = self._dir_listing(path)
            children.update(listing.subdirs)
            children.update(name for name in listing.keys if self._valid(path, name))
        if versions:
            digits = max(self._digits, fraction_digits([v.modified for v in versions]))
            revisions = tuple(
                Revision(v.version_id, v.modified, version_name(v.modified, digits), None if v.deleted else _file(v),
                         version_name(v.modified, self._digits))
                for v in reversed(versions)
            )
        return History(tuple(sorted(children)), revisions)

    def _valid(self, directory: str, name: str) -> bool:
        key = join(directory, name)
        if path_parts(key) is None:
            log.warning("key %r is not a valid path: not shown", self.prefix + key, extra=once(("s3-key", self.prefix + key)))
            return False
        return True

    def _dir_listing(self, directory: str) -> "DirListing":
        with self._dirs_lock:
            cached = self._dirs.get(directory)
        if cached is not None:
            return cached
        prefix = self.prefix + (directory + "/" if directory else "")
        listing, subdirs = self._list(prefix, "/")
        keys = {key[len(prefix):]: versions for key, versions in self._by_key_newest_first(listing).items()}
        names = [p[len(prefix):].rstrip("/") for p in subdirs]
        result = DirListing(keys, frozenset(n for n in names if path_parts(n) is not None and "/" not in n), len(listing))
        self._count("directory listings")
        with self._dirs_lock:
            return self._dirs.put(directory, result)

    def _count(self, what: str) -> None:
        with self._dirs_lock:
            self.counters[what] += 1

    # -- data ---------------------------------------------------------------------------
    def file_size(self, ref: S3Ref) -> int:
        return ref.size

    def read(self, ref: S3Ref, offset: int, length: int) -> memoryview:
        """Bytes of one object version: whole RANGE_PART blocks, from the disk cache
        or by ranged GETs (in parallel when there are several), each read straight
        into its place in one buffer; fetched blocks go to the cache beside the
        reads. Cached blocks never wait for the store; the others fail with
        StoreUnavailable once ``store_timeout`` has passed."""
        end = min(offset + length, ref.size)
        if offset >= end:
            return memoryview(b"")
        deadline = self._data.deadline()
        blocks = range(offset // RANGE_PART, (end - 1) // RANGE_PART + 1)
        start = blocks[0] * RANGE_PART
        buffer = memoryview(bytearray(min(ref.size, (blocks[-1] + 1) * RANGE_PART) - start))
        slots = [(i, buffer[i * RANGE_PART - start : min((i + 1) * RANGE_PART, ref.size) - start]) for i in blocks]
        missing = [(i, into) for i, into in slots if not self._from_cache(ref, i, into)]
        if len(missing) == 1:
            self._fetch(ref, *missing[0], deadline)
        elif missing:
            list(self._get_pool.map(lambda slot: self._fetch(ref, *slot, deadline), missing))
        return buffer[offset - start : end - start]

    def _identity(self, ref: S3Ref) -> str:
        # A VersionId names one content for ever; the "null" version can be
        # replaced, so its ETag is part of the identity (it revalidates).
        return f"{self.bucket}\0{ref.key}\0{ref.version_id}\0{ref.etag}"

    def _from_cache(self, ref: S3Ref, index: int, into: memoryview) -> bool:
        if self.cache is None:
            return False
        cached = self.cache.get(self._identity(ref), index)
        if cached is None or len(cached) != len(into):
            return False
        into[:] = cached
        return True

    def _fetch(self, ref: S3Ref, index: int, into: memoryview, deadline: float) -> None:
        self._data.get_into(self.bucket, ref.key, ref.version_id, ref.size, index * RANGE_PART, into, deadline)
        if self.cache is not None:
            self._cache_writer.submit(self.cache.put, self._identity(ref), index, bytes(into))

    def _metadata(self, ref: S3Ref) -> dict[str, str]:
        """An object version's user metadata (x-amz-meta-*): one HEAD per object
        version, kept (its metadata never changes)."""
        key = (ref.key, ref.version_id, ref.etag)
        with self._xattrs_lock:
            found = self._xattrs.get(key)
        if found is None:
            found = self._data.head(self.bucket, ref.key, ref.version_id).get("Metadata", {})
            with self._xattrs_lock:
                self._xattrs.put(key, found)
        return found

    def file_meta(self, ref: S3Ref) -> FileMeta:
        """Mode, link-ness and mtime, from the metadata s3fs's names give."""
        return parse_s3fs_meta(self._metadata(ref))

    def file_metas(self, refs: list[S3Ref]) -> list[FileMeta]:
        return list(self._get_pool.map(self.file_meta, refs))

    def xattrs(self, ref: S3Ref) -> dict[str, bytes]:
        """User metadata (x-amz-meta-*) of an object version, as ``user.*`` xattrs."""
        return {f"user.{k}": v.encode() for k, v in self._metadata(ref).items()}

    # -- equality ---------------------------------------------------------------------
    def same_content(self, entry: File, local: str, written: Any = None) -> bool:
        """Whether a local file provably holds an object version's bytes, from what
        the store keeps about it (never by downloading it): the SHA-256 versionfs
        stores, the store's SHA-256 checksum, an MD5 ETag, or a multipart ETag
        recomputed for the usual part sizes. Unproven means "upload"."""
        ref: S3Ref = entry.ref
        if os.path.getsize(local) != ref.size:
            return False
        head = self._head(ref.key, ref.version_id)
        sha256 = stored_sha256(head)
        if sha256:
            return sha256 == file_digests(local)["sha256"]
        etag = (head.get("ETag") or ref.etag or "").strip('"')
        if not etag:
            return False
        if "-" not in etag:
            return etag == file_digests(local)["md5"]
        parts = int(etag.rsplit("-", 1)[1])
        return any(multipart_etag(local, size) == etag for size in guess_part_sizes(ref.size, parts))

    def image(self, version: str) -> File:
        raise ValueError(f"{self.description}: no single-file form of a version (image_ext is None)")

    def fingerprint(self, ref: S3Ref) -> Any:
        # A version id names one immutable content; so does an MD5 ETag with its size.
        if ref.etag and "-" not in ref.etag:
            return ("etag", ref.etag, ref.size)
        return ("version", ref.key, ref.version_id)

    def file_delta(self, old: File, new: File) -> FileDelta:
        """Same content when the object version is the same, or the ETags (MD5s,
        or the same parts' MD5s) or the stored SHA-256s agree; else changed, by
        how much is not known without reading (one HEAD per object, only where
        the ETags cannot tell)."""
        a, b = old.ref, new.ref
        same = (a.key, a.version_id) == (b.key, b.version_id) or (a.size == b.size and a.etag and a.etag == b.etag)
        if not same and a.size == b.size:
            digests = [stored_sha256(self._head(r.key, r.version_id)) for r in (a, b)]
            same = digests[0] is not None and digests[0] == digests[1]
        return FileDelta(bool(same), a.size, b.size)

    # -- commits ------------------------------------------------------------------------
    def commit(self, parent: str | None, changes: list[Change], name: str | None, message: str | None,
               parent_tree: Dir, progress: Progress | None = None) -> str:
        """Write the changes as new object versions and delete markers, many at a
        time (``commit_parallel``), each retried by botocore on its own.

        Every write is conditional on what staging's base had (If-Match its ETag,
        or If-None-Match for a new key): another writer's change is a conflict.
        Stores that ignore a condition (moto on CompleteMultipartUpload, older
        MinIO and Ceph) are caught after the writes: the version just below each
        one written must be the base's; where it is not, ours is removed again
        (the other writer's is current once more) and the commit is a conflict.

        Order (a crash between two steps leaves a state some staging shows):
        deletes that make room for a file where a directory was (or the
        reverse), then uploads and copies, then the other deletes (so a rename's
        source goes only once its copy is there)."""
        writes = self._plan(changes, parent_tree)
        meter = _Meter(len(writes), sum(w.size for w in writes), progress)
        metadata = {MESSAGE_META: quote(message)} if message else {}
        blockers = [w for w in writes if w.kind == "delete" and any(_clash(w.key, o.key) for o in writes if o.kind != "delete")]
        puts = [w for w in writes if w.kind != "delete"]
        rest = [w for w in writes if w.kind == "delete" and w not in blockers]
        failed = None
        for phase in (blockers, puts, rest):
            failed = self._run(phase, lambda w: self._write(w, metadata, meter))
            if failed is not None:
                break
        infos = self._versions(keep={w.key for w in writes})  # a fresh listing: what the store holds now
        infos = self._settle(writes) or infos
        self._listed_by_commit = (infos, time.monotonic() + 2.0)  # the namespace asks next: no second listing
        written = [w.key for w in writes if w.version_id is not None]
        conflicts = [w.key for w in writes if w.conflict]
        if conflicts:
            raise ConflictError(f"changed by another writer since staging's base: {', '.join(conflicts)}"
                                f"{_written_note(written)}")
        if failed is not None and len(written) < len(writes):  # else every answer lost was a write that happened
            error = next((w.error for w in writes if w.error is not None), failed)
            raise SourceError(f"commit failed: {error}{_written_note(written)}")
        return self.current() or ""

    def _plan(self, changes: list[Change], tree: Dir) -> list["Write"]:
        writes: dict[str, Write] = {}
        deletes: dict[str, Write] = {}
        for change in changes:
            base = find(tree, change.path)
            if change.kind == "dir":
                continue  # S3 has no directories: an empty one is not stored
            if change.kind == "delete":
                targets = _files_below(base) if isinstance(base, Dir) else [base] if isinstance(base, File) else []
                for entry in targets:
                    deletes[entry.ref.key] = Write(entry.ref.key, "delete", entry.ref)
                continue
            key = base.ref.key if isinstance(base, File) else self.prefix + change.path
            base_ref = base.ref if isinstance(base, File) else None
            meta = s3fs_meta(change)
            if change.kind == "link":  # as s3fs stores one: the body is the target
                body = os.fsencode(change.target or "")
                writes[key] = Write(key, "put", base_ref, data=body, size=len(body), meta=meta)
            elif change.local is not None:
                writes[key] = Write(key, "put", base_ref, local=change.local, size=os.path.getsize(change.local), meta=meta)
            else:
                source = find(tree, change.base_path or "")
                assert isinstance(source, File)
                writes[key] = Write(key, "copy", base_ref, source=source.ref, meta=meta)  # a rename, or a chmod alone
        return list(writes.values()) + [d for k, d in deletes.items() if k not in writes]

    def _run(self, writes: list["Write"], do: Any) -> BaseException | None:
        """``do(write)`` for each, ``commit_parallel`` at a time; after the first
        failure no new one starts. The first failure, if any."""
        if not writes:
            return None
        first: list[BaseException] = []
        pool = self._writer_pool()
        futures = {pool.submit(self._guarded, do, w, first): w for w in writes}
        for future in futures:
            future.result()
        return first[0] if first else None

    @staticmethod
    def _guarded(do: Any, write: "Write", first: list[BaseException]) -> None:
        if first:
            return  # something failed: start nothing new
        try:
            do(write)
        except ConflictError:
            write.conflict = True
        except Exception as e:  # noqa: BLE001 - reported with what was written
            write.error = e
            first.append(e)

    def _writer_pool(self) -> ThreadPoolExecutor:
        if self._commit_pool is None:
            self._commit_pool = ThreadPoolExecutor(self.commit_parallel, thread_name_prefix="versionfs-s3-commit")
        return self._commit_pool

    def _write(self, w: "Write", metadata: dict[str, str], meter: "_Meter") -> None:
        if w.kind == "delete":
            w.version_id = self._delete(w.base)
        elif w.kind == "copy":
            w.version_id, w.etag = self._copy(w.key, w.source, w.base, {**metadata, **w.meta})
        else:
            w.version_id = self._upload(w, {**metadata, **w.meta}, meter)
        meter.done(w.size if w.kind != "put" or w.size <= self.multipart_threshold else 0)

    def _settle(self, writes: list["Write"]) -> list[VersionInfo] | None:
        """Check each write against the fresh listing: find ours where the answer
        was lost, and take ours back where it does not sit on staging's base (then
        the versions listed again)."""
        removed = False
        for w in writes:
            versions = self._kept.get(w.key, [])
            if w.version_id is None and (w.conflict or w.error is not None) and versions:
                # A retried conditional write fails once its first try got through;
                # a lost answer hides a write that happened: is the newest ours?
                if self._looks_ours(w, versions[0]) and self._sits_on_base(w, versions[1:]):
                    w.version_id, w.conflict = versions[0].version_id, False
                    w.error = None
                continue
            if w.version_id is None:
                continue
            position = next((i for i, v in enumerate(versions) if v.version_id == w.version_id), None)
            if position is None:
                continue  # not listed (yet): nothing to check it against
            if not self._sits_on_base(w, versions[position + 1:]):
                log.warning("%s: written on top of another writer's version (the store ignored the condition): "
                            "removing ours again", w.key)
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=w.key, VersionId=w.version_id)
                    w.version_id = None
                except Exception as e:  # noqa: BLE001 - said in the message
                    log.warning("%s: could not remove our version %s: %s", w.key, w.version_id, e)
                w.conflict = removed = True
        return self._versions() if removed else None

    def _sits_on_base(self, w: "Write", below: list[ObjectVersion]) -> bool:
        """Whether the versions below one of ours start with what staging's base had
        (identical copies of ours in between are skipped: a retried write)."""
        while below and w.kind == "put" and not below[0].deleted and self._looks_ours(w, below[0]) and \
                (w.base is None or below[0].version_id != w.base.version_id):
            below = below[1:]
        under = below[0] if below else None
        if w.base is None:
            return under is None or under.deleted
        return under is not None and under.version_id == w.base.version_id

    @staticmethod
    def _looks_ours(w: "Write", version: ObjectVersion) -> bool:
        if w.kind == "delete":
            return version.deleted
        expected = w.etag or (w.source.etag if w.source is not None else None)
        return not version.deleted and bool(expected) and (version.etag or "").strip('"') == expected.strip('"')

    @staticmethod
    def _condition(base: S3Ref | None) -> dict[str, str]:
        return {"IfMatch": base.etag} if base is not None and base.etag else {"IfNoneMatch": "*"}

    def _conflict(self, error: Exception, key: str) -> None:
        """Raise ConflictError for a failed precondition (a 404 on If-Match too:
        the key was deleted meanwhile)."""
        from botocore.exceptions import ClientError

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                raise ConflictError(f"{key}: changed by another writer since staging's base") from None

    def _upload(self, w: "Write", metadata: dict[str, str], meter: "_Meter") -> str | None:
        """Upload a staged file; its VersionId. ``w.etag`` is set before the
        request goes out (a lost answer is recognised by it)."""
        key, local, base = w.key, w.local, w.base
        if w.data is not None:
            size = len(w.data)
            digests = {"sha256": hashlib.sha256(w.data).hexdigest(), "md5": hashlib.md5(w.data).hexdigest()}
        else:
            size = os.path.getsize(local)
            digests = file_digests(local)
        meta = {**metadata, SHA_META: digests["sha256"]}
        try:
            if size <= self.multipart_threshold or w.data is not None:
                w.etag = digests["md5"]
                # The store checks the SHA-256 too: a corrupted upload is refused.
                checksum = base64.b64encode(bytes.fromhex(digests["sha256"])).decode()
                put = lambda body: self.client.put_object(  # noqa: E731
                    Bucket=self.bucket, Key=key, Body=body, Metadata=meta, ChecksumSHA256=checksum, **self._condition(base))
                if w.data is not None:
                    return put(w.data).get("VersionId")
                with open(local, "rb") as f:
                    # A small body goes as bytes: botocore then sends it at once, without
                    # waiting a round trip for "100 Continue" as it does for a file.
                    return put(f.read() if size <= SMALL_BODY else f).get("VersionId")
            return self._multipart(w, size, meta, meter)
        except Exception as e:
            self._conflict(e, key)
            raise

    def _multipart(self, w: "Write", size: int, meta: dict[str, str], meter: "_Meter") -> str | None:
        key, local, base = w.key, w.local, w.base
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta)["UploadId"]
        part_size = self.part_size
        try:
            def part(number: int) -> dict[str, Any]:
                with open(local, "rb") as f:
                    f.seek((number - 1) * part_size)
                    body = f.read(part_size)
                answer = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=body)
                meter.add(len(body))
                return {"PartNumber": number, "ETag": answer["ETag"], "md5": hashlib.md5(body).digest()}

            parts = list(self._pool.map(part, range(1, -(-size // part_size) + 1)))
            w.etag = f"{hashlib.md5(b''.join(p.pop('md5') for p in parts)).hexdigest()}-{len(parts)}"
            answer = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}, **self._condition(base)
            )
            return answer.get("VersionId")
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise

    def _copy(self, key: str, source: S3Ref, base: S3Ref | None, meta: dict[str, str]) -> tuple[str | None, str]:
        """A rename without edits, or a chmod alone: a copy made by the store itself,
        with the source's metadata and then ``meta`` (the file's mode, times, the message)."""
        kept = self.client.head_object(Bucket=self.bucket, Key=source.key, VersionId=source.version_id).get("Metadata", {})
        kept.pop(MESSAGE_META, None)  # the source's commit message is not this commit's
        try:
            answer = self.client.copy_object(
                Bucket=self.bucket, Key=key,
                CopySource={"Bucket": self.bucket, "Key": source.key, "VersionId": source.version_id},
                MetadataDirective="REPLACE", Metadata={**kept, **meta},
                **self._condition(base),
            )
        except Exception as e:
            self._conflict(e, key)
            raise
        return answer.get("VersionId"), (answer.get("CopyObjectResult", {}).get("ETag") or source.etag or "").strip('"')

    def _delete(self, ref: S3Ref) -> str | None:
        """A delete marker, only if the key still holds what staging's base had;
        the marker's VersionId."""
        try:
            if ref.etag:
                answer = self.client.delete_object(Bucket=self.bucket, Key=ref.key, IfMatch=ref.etag)
            else:
                answer = self.client.delete_object(Bucket=self.bucket, Key=ref.key)
        except Exception as e:
            self._conflict(e, ref.key)
            raise
        return answer.get("VersionId")

    # -- compact -----------------------------------------------------------------------
    def duplicates(self) -> list[Duplicate]:
        """Object versions whose content equals the key's previous version, never
        across a delete marker (one whole listing)."""
        out = []
        for versions in self._by_key_newest_first(self._list(self.prefix)[0]).values():
            previous: ObjectVersion | None = None
            for version in reversed(versions):  # oldest first
                if version.deleted:
                    previous = None
                elif previous is not None and self._same_object(previous, version):
                    out.append(Duplicate(f"s3://{self.bucket}/{version.key}", version.version_id, version.modified,
                                         previous.version_id, version))  # keep the first of a run
                else:
                    previous = version
        return out

    def _same_object(self, a: ObjectVersion, b: ObjectVersion) -> bool:
        if a.size != b.size:
            return False
        if a.etag and a.etag == b.etag:
            return True  # same MD5 (or same multipart parts' MD5s)
        digests = [stored_sha256(self._head(v.key, v.version_id)) for v in (a, b)]
        return digests[0] is not None and digests[0] == digests[1]

    def _head(self, key: str, version_id: str) -> dict[str, Any]:
        return self.client.head_object(Bucket=self.bucket, Key=key, VersionId=version_id, ChecksumMode="ENABLED")

    def remove_duplicate(self, duplicate: Duplicate) -> None:
        """Delete one object version for good (compact only)."""
        version: ObjectVersion = duplicate.ref
        self.client.delete_object(Bucket=self.bucket, Key=version.key, VersionId=version.version_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self._commit_pool is not None:
            self._commit_pool.shutdown(wait=False)
        self._get_pool.shutdown(wait=False)
        self._cache_writer.shutdown(wait=True)  # what was read stays cached


@dataclass(eq=False)
class Write:
    """One key a commit writes, and what became of it."""

    key: str
    kind: str  # "put", "copy" or "delete"
    base: S3Ref | None  # what staging's base had at the key (None: nothing live)
    local: str | None = None  # put: the staged file
    data: bytes | None = None  # put: the body itself (a symlink's target)
    meta: dict[str, str] = field(default_factory=dict)  # the file's own metadata (s3fs's names)
    source: S3Ref | None = None  # copy: the object version copied
    size: int = 0
    version_id: str | None = None  # ours, once it is in the store
    etag: str | None = None  # the ETag ours gets
    conflict: bool = False
    error: BaseException | None = None


class _Meter:
    """Progress of a commit, from the threads that write (``Progress``)."""

    def __init__(self, files: int, nbytes: int, report: Progress | None):
        self.files, self.nbytes, self.report = files, nbytes, report
        self.files_done = self.bytes_done = 0
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        self.done(nbytes, files=0)

    def done(self, nbytes: int, files: int = 1) -> None:
        with self.lock:
            self.files_done += files
            self.bytes_done += nbytes
            if self.report is not None:
                self.report(self.files_done, self.files, min(self.bytes_done, self.nbytes), self.nbytes)


def _clash(a: str, b: str) -> bool:
    """Whether one key is "below" the other (a file where a directory was)."""
    return a.startswith(b + "/") or b.startswith(a + "/")


@dataclass(frozen=True)
class DirListing:
    keys: dict[str, list[ObjectVersion]]  # name directly below -> its versions, newest first
    subdirs: frozenset[str]  # names of the "subdirectories" (common prefixes)
    size: int = 0  # object versions held (what keeping it costs: about 400 bytes each)


_FOREVER = 1 << 62


class _Scan:
    """What ``versions`` keeps of one pass over the whole listing. Keys come in
    order, so all keys below a directory come together: a directory's digest
    and intervals are complete when the listing leaves it."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.instants: set[dt.datetime] = set()
        self.dir_digests: dict[str, bytes] = {}
        self.alive: dict[str, tuple[tuple[int, int], ...]] = {}
        self._digest = hashlib.blake2b(digest_size=16)
        self._open: list[tuple[str, Any, list[tuple[int, int]]]] = []  # (directory, its digest, intervals) from the top
        self._pending: dict[str, list[ObjectVersion]] = {}  # keys whose versions may not all be listed yet

    @property
    def signature(self) -> bytes:
        return self._digest.digest()

    def add(self, page: list[ObjectVersion]) -> None:
        # Keys come in order from page to page, but within a page some servers list
        # every version before every delete marker, and a key's versions may go on
        # into the next page: every key of a page but its last is complete.
        for version in page:
            self._pending.setdefault(version.key, []).append(version)
        if not page:
            return
        last = max(v.key for v in page)
        for key in sorted(k for k in self._pending if k != last):
            self._key_done(key, self._pending.pop(key))

    def finish(self) -> None:
        for key in sorted(self._pending):
            self._key_done(key, self._pending.pop(key))
        while self._open:
            self._close()

    def _key_done(self, key: str, versions: list[ObjectVersion]) -> None:
        versions.sort(key=lambda v: v.modified, reverse=True)  # newest first; ties keep listing order
        self.instants.update(v.modified for v in versions)
        said = "".join(f"{v.key}\0{v.version_id}\n" for v in versions).encode("utf-8", "surrogateescape")
        self._digest.update(said)
        relative = key[len(self.prefix):]
        components = relative.split("/")[:-1]
        # The key's directories from the top ('' is the prefix itself): a directory's
        # listing (Delimiter "/") changes with any key below it.
        chain = ["", *("/".join(components[: i + 1]) for i in range(len(components)))]
        while self._open and self._open[-1][0] not in chain:
            self._close()
        for directory in chain[len(self._open):]:
            self._open.append((directory, hashlib.blake2b(digest_size=16), []))
        shown = path_parts(relative) is not None
        if not shown:  # said once, when the listing first meets it
            log.warning("key %r is not a valid path: not shown", key, extra=once(("s3-key", key)))
        live = _live_intervals(versions) if shown else []
        for directory, digest, intervals in self._open:
            digest.update(said)
            if directory and shown:
                intervals += live
                if len(intervals) > 4096:  # a directory of very many keys: keep it merged as it goes
                    intervals[:] = _merged(intervals)

    def _close(self) -> None:
        directory, digest, intervals = self._open.pop()
        # (A directory met again can only come from a server that lists keys out of
        # order across pages: what it had is kept, not overwritten.)
        if directory in self.dir_digests:
            digest.update(self.dir_digests[directory])
        self.dir_digests[directory] = digest.digest()
        if directory:
            self.alive[directory] = _merged([*self.alive.get(directory, ()), *intervals])


def _live_intervals(newest_first: list[ObjectVersion]) -> list[tuple[int, int]]:
    """When a key is shown: [start, end) ns intervals (the newest version at each
    instant decides: a delete marker hides it)."""
    if not any(v.deleted for v in newest_first):  # the usual case: shown from its first version on
        return [(to_ns(newest_first[-1].modified), _FOREVER)]
    state: dict[dt.datetime, bool] = {}
    for v in newest_first:
        state.setdefault(v.modified, not v.deleted)  # the first seen at a time is the newest then
    out: list[tuple[int, int]] = []
    start = None
    for instant in sorted(state):
        if state[instant] and start is None:
            start = to_ns(instant)
        elif not state[instant] and start is not None:
            out.append((start, to_ns(instant)))
            start = None
    if start is not None:
        out.append((start, _FOREVER))
    return out


def _merged(intervals: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return tuple(out)


def _file(version: ObjectVersion) -> File:
    return File(
        size=version.size,
        mtime_ns=to_ns(version.modified),
        ref=S3Ref(version.key, version.version_id, version.etag, version.size),
        layout=Layout(0, RANGE_PART),
        readahead=READAHEAD,
        meta=None,  # in the object's metadata: asked for when needed (file_meta)
    )


def s3fs_meta(change: Change) -> dict[str, str]:
    """The metadata of a staged file or link in s3fs's names."""
    out: dict[str, str] = {}
    kind = stat_mod.S_IFLNK if change.kind == "link" else stat_mod.S_IFREG
    mode = 0o777 if change.kind == "link" else change.mode
    if mode is not None:
        out[MODE_META] = str(kind | mode)
    if change.mtime_ns is not None:
        seconds, nanos = divmod(change.mtime_ns, 10**9)
        out[MTIME_META] = f"{seconds}.{nanos:09d}" if nanos else str(seconds)
    if change.uid is not None:
        out[UID_META] = str(change.uid)
    if change.gid is not None:
        out[GID_META] = str(change.gid)
    return out


def parse_s3fs_meta(metadata: dict[str, str]) -> FileMeta:
    """What s3fs's metadata names say (anything unreadable counts as not given)."""
    mode = link = None
    try:
        text = metadata[MODE_META].strip()
        full = int(text, 8) if text.startswith("0") and text.isdigit() else int(text, 0)
        link = stat_mod.S_ISLNK(full)
        mode = stat_mod.S_IMODE(full)
    except (KeyError, ValueError):
        pass
    mtime = None
    try:
        seconds, _, nanos = metadata[MTIME_META].partition(".")
        mtime = int(seconds) * 10**9 + (int(nanos) if nanos else 0)
    except (KeyError, ValueError):
        pass
    return FileMeta(mode=None if link else mode, link=bool(link), mtime_ns=mtime)


def _files_below(directory: Dir) -> list[File]:
    out = []
    for entry in directory.children.values():
        out += _files_below(entry) if isinstance(entry, Dir) else [entry]
    return out


def _written_note(keys: list[str]) -> str:
    if not keys:
        return "; nothing was written"
    return f"; already written ({len(keys)}): " + ", ".join(keys)


def stored_sha256(head: dict[str, Any]) -> str | None:
    """The content's SHA-256 (hex) as the store keeps it for an object version:
    the one versionfs wrote with it, else the store's own whole-object checksum."""
    stored = head.get("Metadata", {}).get(SHA_META)
    if stored:
        return stored
    checksum = head.get("ChecksumSHA256")
    if checksum and "-" not in checksum:  # "-N": a checksum of part checksums
        return base64.b64decode(checksum).hex()
    return None


def file_digests(path: str) -> dict[str, str]:
    """SHA-256 and MD5 of a local file (hex), read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            sha.update(block)
            md5.update(block)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def multipart_etag(path: str, part_size: int) -> str:
    """The ETag S3 gives a multipart upload in parts of ``part_size``:
    MD5 of the concatenated part MD5s, then "-" and the number of parts."""
    digests = []
    with open(path, "rb") as f:
        while block := f.read(part_size):
            digests.append(hashlib.md5(block).digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def guess_part_sizes(size: int, parts: int) -> list[int]:
    """Part sizes that give ``parts`` parts for ``size`` bytes: the common fixed
    ones (5, 8, 16, 64 MiB …) and the smallest whole MiB that does."""
    mib = 1 << 20
    candidates = [m * mib for m in (5, 8, 15, 16, 25, 32, 50, 64, 100, 128, 256, 512)]
    if parts:
        candidates.append(-(-size // parts // mib) * mib)
    return sorted({c for c in candidates if c > 0 and -(-size // c) == parts})


def enable_versioning(url: str, endpoint_url: str | None = None) -> str:
    """``versionfs init s3://bucket``: turn versioning on (creating nothing else)."""
    import boto3
    from botocore.config import Config

    bucket, _ = parse_url(url)
    # As the mount's probe: an endpoint that does not answer is said in seconds.
    client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
        retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=s3_data.PROBE_TIMEOUT,
        read_timeout=s3_data.PROBE_TIMEOUT))
    try:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    except Exception as e:  # noqa: BLE001 - said for people by bucket_failure
        raise bucket_failure(f"s3://{bucket}", bucket, e) from None
    return f"versioning enabled on s3://{bucket}"


def bucket_failure(what: str, bucket: str, error: Exception) -> Exception:
    """A store's refusal to open or set up a bucket, as one line that names the
    cause and the fix (anything else is returned as it is)."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return SourceError(f"{what}: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID, or use ~/.aws or an instance role)")
    if isinstance(error, EndpointConnectionError):
        where = urlparse(str(error.kwargs.get("endpoint_url", "")))
        return SourceError(f"{what}: cannot reach {where.scheme}://{where.netloc}: is the endpoint right "
                           "(--endpoint-url, endpoint_url=, AWS_ENDPOINT_URL) and the store up?")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = error.response.get("Error", {}).get("Message") or ""
        if code in ("NoSuchBucket", "404"):
            return SourceError(f"{what}: no such bucket (create it first, e.g. aws s3 mb s3://{bucket}, then versionfs init s3://{bucket})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            return SourceError(f"{what}: the store refuses these credentials ({code}): check AWS_PROFILE or the "
                               "access key, and the bucket's policy")
        return SourceError(f"{what}: the store refused: {code} {message}".rstrip())
    if isinstance(error, BotoCoreError):
        return SourceError(f"{what}: {error}")
    return error

