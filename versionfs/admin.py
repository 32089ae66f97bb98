"""Commands that act on a source directly, without a running mount: log, init."""

from __future__ import annotations

import json
import os

from .backends import open_backend
from .backends.base import VersionInfo
from .daemon import XATTR_ENDPOINT, XATTR_SOURCE
from .errors import SourceError
from .selectors import format_utc


def resolve_source(source_or_mountpoint: str, endpoint_url: str | None = None) -> tuple[str, str | None]:
    """(source, endpoint): a mount point of versionfs stands for its source and
    the endpoint it was mounted with (both read from the mount)."""
    if os.path.isdir(source_or_mountpoint):
        try:
            source = os.fsdecode(os.getxattr(source_or_mountpoint, XATTR_SOURCE))
        except OSError:
            raise SourceError(f"{source_or_mountpoint}: a directory, but not a versionfs mount") from None
        try:
            endpoint_url = endpoint_url or os.fsdecode(os.getxattr(source_or_mountpoint, XATTR_ENDPOINT))
        except OSError:
            pass
        return source, endpoint_url
    return source_or_mountpoint, endpoint_url


def versions(source: str, endpoint_url: str | None = None) -> tuple[list[VersionInfo], str | None]:
    backend = open_backend(*resolve_source(source, endpoint_url))
    try:
        return backend.versions(), backend.current()
    finally:
        backend.close()


def log_lines(source: str, as_json: bool, endpoint_url: str | None = None) -> list[str]:
    infos, current = versions(source, endpoint_url)
    if as_json:
        doc = [
            {
                "name": v.name,
                "timestamp": format_utc(v.timestamp),
                "previous": v.previous,
                "current": v.name == current,
                "attributes": dict(v.attrs),
            }
            for v in infos
        ]
        return [json.dumps(doc, indent=2, sort_keys=True)]
    width = max((len(v.name) for v in infos), default=0)
    return [
        f"{v.name:<{width}}  {format_utc(v.timestamp)}" + ("  (current)" if v.name == current else "")
        for v in infos
    ]


def init(source: str, endpoint_url: str | None = None) -> str:
    """Create an empty versioned HDF5 file (refusing an existing one), or enable
    versioning on a bucket."""
    if source.startswith("s3://"):
        from .backends.s3 import enable_versioning

        return enable_versioning(source, endpoint_url)
    import h5py
    from versioned_hdf5 import VersionedHDF5File

    if os.path.exists(source):
        raise SourceError(f"{source}: already exists")
    try:
        with h5py.File(source, "x") as f:
            VersionedHDF5File(f)
    except OSError as e:
        raise SourceError(f"{source}: cannot create: {e}") from None
    return f"created {source}"


def compact(source: str, dry_run: bool, endpoint_url: str | None = None) -> list[str]:
    """S3: remove consecutive duplicate versions of each key; one line per removal."""
    if not source.startswith("s3://"):
        raise SourceError(f"{source}: compact is for S3 sources (an HDF5 file dedups its chunks already)")
    backend = open_backend(source, endpoint_url)
    try:
        backend.versions()
        lines = []
        for duplicate, kept in backend.duplicates():
            if not dry_run:
                backend.remove_version(duplicate)
            lines.append(
                f"{'would remove' if dry_run else 'removed'} s3://{backend.bucket}/{duplicate.key} "
                f"version {duplicate.version_id} ({format_utc(duplicate.modified)}): same as {kept.version_id}"
            )
        return lines
    finally:
        backend.close()

