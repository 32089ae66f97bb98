"""The backend registry: which backend serves a source (``open_backend``,
``backend_class``), the one place that tells sources apart.

Backends are imported only when a source needs them, so ``versionfs log`` of an
HDF5 file never imports boto3, and no backend imports pyfuse3 or trio.
"""

from __future__ import annotations

import hashlib
import logging
import os

from .base import Backend

log = logging.getLogger(__name__)
DEFAULT_CACHE_BYTES = 4 << 30
DEFAULT_STORE_TIMEOUT = 30.0  # seconds a store may take to answer one read, retries included


def is_store_url(source: str) -> bool:
    """Whether a source is a remote store's URL (s3://…), not a local file's path."""
    return source.startswith("s3://")


def backend_class(source: str) -> type[Backend]:
    """The class of the backend that serves a source (its class attributes say
    what it can do before anything is opened)."""
    if is_store_url(source):
        from .s3 import S3Backend

        return S3Backend
    from .hdf5 import HDF5Backend

    return HDF5Backend


def create_source(source: str, endpoint_url: str | None = None) -> str:
    """``versionfs init``: an empty versioned HDF5 file (refusing an existing one),
    or versioning enabled on a bucket. Returns what was done, for people."""
    if is_store_url(source):
        from .s3 import enable_versioning

        return enable_versioning(source, endpoint_url)
    from .hdf5 import create_file

    return create_file(source)


def open_backend(source: str, endpoint_url: str | None = None, cache_dir: str | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, store_timeout: float = DEFAULT_STORE_TIMEOUT) -> Backend:
    """The backend for a source; with ``cache_dir``, what it builds or fetches is
    cached there (S3: object content; HDF5: the .h5 images' metadata).
    ``store_timeout``: a remote store's read that takes longer fails (StoreUnavailable)."""
    from ..cache import DiskCache

    cache = None
    if cache_dir is not None:
        name = hashlib.sha256(f"{endpoint_url or ''}\0{source}".encode()).hexdigest()[:16]
        try:
            cache = DiskCache(os.path.join(os.path.abspath(cache_dir), name), cache_bytes)
        except OSError as e:  # a cache only saves time: mount without one
            log.warning("no cache: %s: %s", cache_dir, e.strerror or e)
    if is_store_url(source):
        from .s3 import S3Backend

        return S3Backend(source, endpoint_url, cache, store_timeout)
    from .hdf5 import HDF5Backend

    return HDF5Backend(source, cache)
