"""HDF5 backend: a file written by the ``versioned-hdf5`` library.

Committed versions are read with plain h5py: each version is the group
``/_version_data/versions/<name>`` whose datasets are virtual datasets mapping
into the per-dataset ``raw_data``; HDF5 resolves the mapping (and fill values for
unwritten chunks) on read, so a byte range reads only the chunks it overlaps.
The versioned-hdf5 library itself is only asked whether it accepts the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h5py
import numpy as np

from .. import __version__, journal
from ..cache import DiskCache, Lru
from ..errors import CommitRefused, FileBusy, SourceError
from ..logs import once
from . import hdf5_chunks, hdf5_image, hdf5_write, npy
from ..selectors import format_utc
from .hdf5_format import (ATTRS_FILE, EXTENSIONS, FIRST_VERSION, INTERNAL_ATTRS, LINK_ATTR, MESSAGE_ATTR, MODE_ATTR,
                          MTIME_ATTR, RAW_ATTR, RESERVED_NAMES, VERSION_FILE, VERSIONS_GROUP, ImageRef, NpyRef, RawRef,
                          TextRef, attr_to_json, file_kind, parse_timestamp, user_attrs)
from .base import (Change, Dir, Execution, File, FileDelta, FileMeta, History, Progress, Revision, VersionInfo,
                   canonical_json, compare_by_reading, join, safe_name, to_ns, version_json)

log = logging.getLogger(__name__)

TEXT_CACHE_BYTES = 64 << 20
IMAGE_CACHE_SIZE = 64  # built images kept (metadata only: pages and chunk offsets)
INDEX_CACHE_BYTES = 64 << 20  # chunk indexes of datasets read from their raw chunks


def _index_weight(found: "tuple[hdf5_chunks.ChunkIndex | None]") -> int:
    return 64 if found[0] is None else 256 + found[0].nbytes


def open_file(path: str) -> h5py.File:
    """Open a versioned HDF5 file read-only, or raise SourceError saying why not.
    An interrupted commit's journal is rolled back first."""
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SourceError(f"{path}: is a directory, not an HDF5 file")
    try:
        if journal.recover(path):
            log.warning("%s: rolled back an interrupted commit", path)
    except journal.FileBusy as e:
        raise SourceError(str(e)) from None
    except OSError as e:
        raise SourceError(f"{path}: has an interrupted commit to roll back, but: {e.strerror}") from None
    if not h5py.is_hdf5(path):
        raise SourceError(f"{path}: not an HDF5 file")
    try:
        # A 64 MiB chunk cache with many slots keeps partially read chunks hot
        # between neighbouring block reads.
        f = h5py.File(path, "r", rdcc_nbytes=64 << 20, rdcc_nslots=100_003)
    except OSError as e:
        raise open_failure(path, str(e)) from None
    try:
        if VERSIONS_GROUP not in f:
            raise SourceError(
                f"{path}: not a versioned HDF5 file (no /{VERSIONS_GROUP} group); "
                "'versionfs init' creates one"
            )
        from versioned_hdf5 import VersionedHDF5File  # the format's own checks

        try:
            VersionedHDF5File(f)
        except ValueError as e:
            raise SourceError(f"{path}: refused by versioned-hdf5: {str(e).splitlines()[0]}") from None
    except BaseException:
        f.close()
        raise
    return f


def open_failure(path: str, message: str) -> SourceError:
    """HDF5's reason for not opening a file, said for people."""
    if "unable to lock file" in message:
        return SourceError(f"{path}: in use by a program writing it (HDF5's file lock is taken); close that program first")
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", message)
    if truncated:
        return SourceError(f"{path}: truncated: {truncated[1]} of its {truncated[2]} bytes are there "
                           "(a copy or transfer that stopped early?); restore the whole file")
    reason = re.sub(r"^Unable to (?:synchronously )?open file \((.*)\)$", r"\1", message)
    return SourceError(f"{path}: HDF5 cannot open it: {reason}")


class HDF5Backend:
    """Versions of one versioned-HDF5 file (see the module docstring).

    Metadata calls run one at a time on one thread (h5py serialises every call
    anyway). Reads run on threads of their own: what they need of h5py they do
    under ``_lock`` (a commit holds it throughout: it closes and reopens the
    file), and chunks they read straight from the file need no lock at all."""

    execution = Execution(serial=True, reads=8)  # reads wait on the disk or decode without the GIL
    names_versions = True
    poll_interval = None  # the file is locked while mounted: only our commits add versions
    image_ext = ".h5"  # each version is also one plain HDF5 file, X.h5 beside X/
    signature = None  # a version never changes once its name is listed
    generated_names = frozenset({VERSION_FILE})  # each version's .version.json
    edits_in_place = True  # hdf5_write reads only the chunk rows an in-place edit wrote

    def __init__(self, path: str, cache: DiskCache | None = None):
        self.path = os.path.abspath(path)
        self.description = self.path
        self.spool_key = self.path
        self.f = open_file(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)  # images read raw chunks with pread
        self._images: Lru[hdf5_image.Image] = Lru(IMAGE_CACHE_SIZE)
        self.cache = cache  # built images, kept across mounts
        self._paths: dict[str, dict[str, File | tuple[str, ...]]] = {}  # history/: see _paths_of
        self._states: dict[str, Any] = {}  # dataset path -> what history compares
        self._datasets: dict[str, h5py.Dataset] = {}
        self._texts: Lru[bytes] = Lru(TEXT_CACHE_BYTES, weight=len)
        self._committed: dict[str, VersionInfo] = {}
        self._lock = threading.RLock()  # h5py's file and these caches, for reads beside metadata calls
        # Datasets read from their raw chunks: their indexes (16 bytes a chunk), and the
        # threads that decode the chunks of one read in parallel.
        self._indexes: Lru[tuple[hdf5_chunks.ChunkIndex | None]] = Lru(INDEX_CACHE_BYTES, weight=_index_weight)
        self._index_lock = threading.Lock()  # only around the Lru: never held while waiting
        self._chunk_reader = hdf5_chunks.ChunkReader(self._fd, ThreadPoolExecutor(
            max(2, os.cpu_count() or 2), thread_name_prefix="versionfs-decode"))

        self.identity = self._identity()

    def _identity(self) -> str:
        """The versioned file itself, whatever its path or inode: the time its
        empty first version was made (a new ``versionfs init`` makes another)."""
        group = self.f[VERSIONS_GROUP]
        first = group[FIRST_VERSION].attrs.get("timestamp") if FIRST_VERSION in group else None
        if isinstance(first, bytes):
            first = first.decode()
        return f"hdf5:{first or h5py.h5o.get_info(group.id).addr}"

    # -- versions ---------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        group = self.f[VERSIONS_GROUP]
        infos: dict[str, VersionInfo] = {}
        for name in group:
            if name in self._committed:  # a committed version never changes: read it once
                infos[name] = self._committed[name]
                continue
            attrs = group[name].attrs
            if name != FIRST_VERSION and not attrs.get("committed", False):
                continue  # a version a writer never finished: the library hides it too
            try:
                timestamp = parse_timestamp(attrs["timestamp"])
            except (KeyError, ValueError) as e:
                log.warning("version %r has no valid timestamp (%s): not shown", name, e, extra=once(f"version:{name}"))
                continue
            previous = attrs.get("prev_version")
            infos[name] = VersionInfo(
                name=name,
                timestamp=timestamp,
                previous=previous if previous else None,
                attrs=user_attrs(group[name]),
                placeholder=name == FIRST_VERSION,
                message=attr_to_json(attrs[MESSAGE_ATTR]) if MESSAGE_ATTR in attrs else None,
            )
            self._committed[name] = infos[name]

        def depth(name: str) -> int:
            n, seen = 0, set()
            while name in infos and name not in seen and infos[name].previous:
                seen.add(name)
                name, n = infos[name].previous, n + 1
            return n

        # Oldest first; the empty first version always leads; chain depth breaks
        # timestamp ties (parents before children), then the name.
        return sorted(
            infos.values(),
            key=lambda v: (v.name != FIRST_VERSION, v.timestamp, depth(v.name), v.name),
        )

    def current(self) -> str | None:
        current = self.f[VERSIONS_GROUP].attrs.get("current_version")
        return current.decode() if isinstance(current, bytes) else current

    # -- trees ------------------------------------------------------------------
    def tree(self, version: str) -> Dir:
        group = self.f[VERSIONS_GROUP][version]
        info = VersionInfo(
            name=version,
            timestamp=parse_timestamp(group.attrs["timestamp"]),
            previous=group.attrs.get("prev_version") or None,
            attrs=user_attrs(group),
        )
        mtime = info.mtime_ns
        notes: dict[str, Any] = {"renamed": {}, "hidden": {}}
        root = self._dir(group, "", mtime, notes)
        extra = {k: v for k, v in notes.items() if v}
        if MESSAGE_ATTR in group.attrs:
            extra["message"] = attr_to_json(group.attrs[MESSAGE_ATTR])
        root.children[VERSION_FILE] = self._generated(version_json(info, extra), mtime)
        return root

    def _dir(self, group: h5py.Group, path: str, mtime: int, notes: dict[str, Any]) -> Dir:
        node = Dir(mtime_ns=mtime, ref=group.name)
        attrs: dict[str, Any] = {}
        if group.attrs.keys() - INTERNAL_ATTRS:
            attrs["."] = user_attrs(group)
        groups, datasets = [], []
        for name in sorted(group):
            try:
                obj = group[name]
            except (KeyError, OSError) as e:  # a broken link or damaged object
                self._hide(notes, f"{path}/{name}", f"cannot be opened: {e}")
                continue
            (groups if isinstance(obj, h5py.Group) else datasets).append((name, obj))
        taken: set[str] = set()
        for name, obj in groups:
            shown = self._show(safe_name(name, "", taken, RESERVED_NAMES), name, path, notes)
            taken.add(shown)
            node.children[shown] = self._dir(obj, f"{path}/{name}", mtime, notes)
        for name, obj in datasets:
            if not isinstance(obj, h5py.Dataset):
                self._hide(notes, f"{path}/{name}", f"unsupported object {type(obj).__name__}")
                continue
            marked = obj.dtype == np.uint8 and obj.ndim == 1
            kind = ("link" if marked and LINK_ATTR in obj.attrs else "raw" if marked and RAW_ATTR in obj.attrs
                    else file_kind(obj.dtype))
            if kind is None:
                self._hide(notes, f"{path}/{name}", f"dtype {obj.dtype} has no file form")
                continue
            ext = EXTENSIONS[kind]
            shown = self._show(safe_name(name, ext, taken, RESERVED_NAMES), name + ext, path, notes)
            taken.add(shown)
            node.children[shown] = self._file(obj, kind, mtime)
            if obj.attrs.keys() - INTERNAL_ATTRS:
                attrs[shown] = user_attrs(obj)
        if attrs:
            node.children[ATTRS_FILE] = self._generated(canonical_json(attrs), mtime)
        return node

    def _file(self, ds: h5py.Dataset, kind: str, mtime: int) -> File:
        # A file committed through staging keeps its own mtime (so rsync's quick
        # check works across snapshots); any other shows its version's time.
        mtime = int(ds.attrs.get(MTIME_ATTR, mtime))
        mode = ds.attrs.get(MODE_ATTR)
        meta = FileMeta(mode=int(mode) if mode is not None else None, link=kind == "link")
        if kind == "text":
            return File(size=None, mtime_ns=mtime, ref=TextRef(ds.name), meta=meta)
        if kind in ("raw", "link"):
            return File(size=int(ds.shape[0]), mtime_ns=mtime, ref=RawRef(ds.name), meta=meta)
        dtype = ds.dtype
        ref = NpyRef(ds.name, dtype, tuple(ds.shape), npy.header(dtype, ds.shape))
        chunks = ds.attrs.get("chunks")
        unit = 1 << 20
        if chunks is not None and len(ds.shape) > 0:
            row = int(chunks[0]) * int(np.prod(ds.shape[1:], dtype=np.int64)) * dtype.itemsize
            unit = row or unit
        return File(size=ref.size, mtime_ns=mtime, ref=ref, layout=(len(ref.header), unit), meta=meta)

    @staticmethod
    def _generated(content: bytes, mtime: int) -> File:
        return File(size=len(content), mtime_ns=mtime, content=content)

    def _show(self, shown: str, wanted: str, path: str, notes: dict[str, Any]) -> str:
        if shown != wanted:
            notes["renamed"][f"{path}/{shown}".lstrip("/")] = f"{path}/{wanted}".lstrip("/")
            log.warning("%s/%s is shown as %s (name taken, reserved or too long)", path, wanted, shown,
                        extra=once(f"rename:{path}/{wanted}"))
        return shown

    def _hide(self, notes: dict[str, Any], path: str, why: str) -> None:
        notes["hidden"][path.lstrip("/")] = why
        log.warning("%s is not shown: %s", path, why, extra=once(f"hide:{path}"))

    # -- data -------------------------------------------------------------------
    def _dataset(self, h5path: str) -> h5py.Dataset:
        ds = self._datasets.get(h5path)
        if ds is None:
            ds = self._datasets[h5path] = self.f[h5path]
        return ds

    # -- history ------------------------------------------------------------------
    def history(self, path: str) -> History:
        """One revision per version in which the file at ``path`` appeared, changed
        (content or attributes) or went away, told apart by the chunk mapping and
        attributes, never by reading data."""
        children: set[str] = set()
        revisions: list[Revision] = []
        previous: Any = None
        for info in self.versions():
            if info.placeholder:
                continue
            entry = self._paths_of(info.name).get(path)
            if isinstance(entry, tuple):
                children.update(entry)
            state = self._state(entry) if isinstance(entry, File) else None
            if state != previous:
                shown = entry if state is not None else None
                revisions.append(Revision(info.name, info.timestamp, format_utc(info.timestamp), shown, info.name))
            previous = state
        return History(tuple(sorted(children)), tuple(revisions))

    def _paths_of(self, version: str) -> dict[str, File | tuple[str, ...]]:
        """Every path of a version: a file's entry, or a directory's names. Kept for
        every version once made (versions never change; a few hundred bytes a
        path), so a history lookup is one dictionary lookup per version."""
        paths = self._paths.get(version)
        if paths is None:
            paths = self._paths[version] = {}
            pending: list[tuple[str, Dir]] = [("", self.tree(version))]
            while pending:
                prefix, directory = pending.pop()
                paths[prefix] = tuple(directory.children)
                for name, entry in directory.children.items():
                    below = join(prefix, name)
                    if isinstance(entry, Dir):
                        pending.append((below, entry))
                    else:
                        paths[below] = entry
        return paths

    def _state(self, entry: File) -> Any:
        if entry.content is not None:  # a generated file (.attrs.json, .version.json)
            return ("content", hashlib.sha256(entry.content).hexdigest())
        h5path = entry.ref.h5path
        state = self._states.get(h5path)
        if state is None:
            attrs = canonical_json(user_attrs(self._dataset(h5path)))
            state = self._states[h5path] = ("data", self.fingerprint(entry.ref), attrs)
        return state

    def image(self, version: str) -> File:
        """``X.h5``: the version as one plain HDF5 file (its size is known once built)."""
        timestamp = parse_timestamp(self.f[VERSIONS_GROUP][version].attrs["timestamp"])
        return File(size=None, mtime_ns=to_ns(timestamp), ref=ImageRef(version))

    def _image(self, version: str) -> hdf5_image.Image:
        image = self._images.get(version)
        if image is None:
            image = self._images.put(version, self._stored_image(version) or self._build_image(version))
        return image

    def _build_image(self, version: str) -> hdf5_image.Image:
        started = time.monotonic()
        image = hdf5_image.build(self.f, f"{VERSIONS_GROUP}/{version}", INTERNAL_ATTRS)
        log.info("built the .h5 image of version %s: %d bytes, %d chunks, %.0f ms",
                 version, image.size, len(image.regions), (time.monotonic() - started) * 1000)
        if self.cache is not None and image.complete:
            self.cache.put(self._image_identity(version), 0, image.to_bytes())
        return image

    def _stored_image(self, version: str) -> hdf5_image.Image | None:
        """The image from the disk cache, if this very file had it built before."""
        if self.cache is None:
            return None
        data = self.cache.get(self._image_identity(version), 0)
        try:
            return hdf5_image.Image.from_bytes(data) if data else None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("a cached image of version %s is damaged (%s): building it again", version, e)
            return None

    def _image_identity(self, version: str) -> str:
        """Names one image for ever: an image points at raw chunks by byte offset,
        so it is only good for the file exactly as it was (any write changes its
        mtime, ctime or size; another file has another inode or object addresses),
        built by the same code and libraries."""
        st = os.fstat(self._fd)
        address = h5py.h5o.get_info(self.f[VERSIONS_GROUP][version].id).addr
        return "\0".join(map(str, (
            "hdf5-image", hdf5_image.Image.MAGIC, hdf5_image.BUILDER, __version__, h5py.version.version,
            h5py.version.hdf5_version, self.path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            version, address)))

    def file_meta(self, ref: Any) -> FileMeta:
        return FileMeta()  # every tree entry has its metadata already

    def file_metas(self, refs: list[Any]) -> list[FileMeta]:
        return [FileMeta() for _ in refs]

    def file_size(self, ref: Any) -> int:
        with self._lock:
            if isinstance(ref, ImageRef):
                return self._image(ref.version).size
            return len(self._text(ref))

    def read(self, ref: Any, offset: int, length: int) -> bytes | memoryview:
        if isinstance(ref, ImageRef):
            with self._lock:
                image = self._image(ref.version)
            return image.read(self._fd, offset, length)
        if isinstance(ref, NpyRef):
            return self._read_npy(ref, offset, length)
        with self._lock:
            if isinstance(ref, TextRef):
                return self._text(ref)[offset : offset + length]
            return self._dataset(ref.h5path)[offset : offset + length].tobytes()  # RawRef

    def xattrs(self, ref: Any) -> dict[str, bytes]:
        return {}  # attributes are in .attrs.json

    def same_content(self, entry: File, local: str, written: tuple[tuple[int, int], ...] | None) -> bool:
        return compare_by_reading(self, entry, local, written)

    def fingerprint(self, ref: Any) -> Any:
        """Shape, dtype, fill value and the chunk mapping: equal exactly when two
        versions of a dataset hold the same data (chunks are content-addressed)."""
        ds = self._dataset(ref.h5path)
        return (ds.shape, ds.dtype.str, repr(ds.fillvalue), hdf5_image.virtual_mapping(ds))

    def file_delta(self, old: File, new: File) -> FileDelta:
        """Chunks are content-addressed: a chunk of ``new`` whose place maps to
        another raw chunk than in ``old`` (or that ``old`` does not have) changed;
        counted from the two virtual mappings, no data read."""
        if self.fingerprint(old.ref) == self.fingerprint(new.ref):
            return FileDelta(True, old.size, new.size)
        a, b = self._dataset(old.ref.h5path), self._dataset(new.ref.h5path)
        notes = []
        if a.shape != b.shape:
            notes.append(f"shape {a.shape} -> {b.shape}")
        if a.dtype != b.dtype:
            notes.append(f"dtype {a.dtype.str} -> {b.dtype.str}")
        if repr(a.fillvalue) != repr(b.fillvalue):
            notes.append("fill value")
        before = {tuple(map(tuple, place)): (raw, slot) for _, raw, place, slot in hdf5_image.virtual_mapping(a)}
        after = [(tuple(map(tuple, place)), (raw, slot)) for _, raw, place, slot in hdf5_image.virtual_mapping(b)]
        if not after:  # not chunked in the format (a scalar): the whole file
            return FileDelta(False, old.size, new.size, new.size, None, tuple(notes))
        changed = [place for place, source in after if before.get(place) != source]
        fixed = file_kind(b.dtype) == "npy" or isinstance(new.ref, RawRef)
        nbytes = sum(int(np.prod([hi - lo + 1 for lo, hi in zip(*place)])) for place in changed) * b.dtype.itemsize
        return FileDelta(False, old.size, new.size, nbytes if fixed else None, (len(changed), len(after)), tuple(notes))

    def commit(self, parent: str | None, changes: list[Change], name: str | None, message: str | None,
               parent_tree: Dir, progress: Progress | None = None) -> str:
        # The read handle holds a shared lock and h5py cannot have the file open
        # twice in different modes: close it for the commit, reopen after.
        with self._lock:
            self._close_file()
            try:
                hdf5_write.commit(self.path, parent, changes, name, message, parent_tree, progress)
            except FileBusy:
                raise CommitRefused(f"{self.path}: another process has the file open (another versionfs mount of it, or a "
                                    "program reading it with HDF5); unmount or close it, then commit again (staging is kept)") from None
            finally:
                self.f = open_file(self.path)
                # Images are rebuilt from the file as it is now (same bytes: an image
                # depends on content, not on where the raw chunks sit).
                self._images.clear()
        # self._fd stays: a commit writes the same file in place, and raw chunks
        # never move, so reads under way beside it stay right.
        return name

    def _read_npy(self, ref: NpyRef, offset: int, length: int) -> bytes | memoryview:
        head, itemsize = len(ref.header), ref.dtype.itemsize
        end = min(offset + length, ref.size)
        if offset >= end:
            return b""
        header = ref.header[offset : min(end, head)] if offset < head else b""
        if end <= head or not itemsize:
            return header
        d0, d1 = max(offset, head) - head, end - head
        e0, e1 = d0 // itemsize, -(-d1 // itemsize)
        # Compound dtypes may have padding: zeros make those bytes the same every
        # time. Everything else skips the cost of clearing the buffer.
        padded = ref.dtype.names is not None
        buf = (np.zeros if padded else np.empty)(e1 - e0, dtype=ref.dtype)
        index = self._chunk_index(ref.h5path)
        if index is not None:
            self._chunk_reader.read(index, e0, e1, buf)  # no h5py, no lock
        else:
            with self._lock:
                ds = self._dataset(ref.h5path)
                if not ref.shape:
                    buf[0] = ds[()]
                else:
                    pos = 0
                    for box in npy.flat_boxes(ref.shape, e0, e1):
                        n = npy.box_size(box)
                        ds.read_direct(buf[pos : pos + n].reshape([s.stop - s.start for s in box]), source_sel=box)
                        pos += n
        data = memoryview(buf.view(np.uint8))[d0 - e0 * itemsize : d1 - e0 * itemsize]
        return header + bytes(data) if header else data

    def _chunk_index(self, h5path: str) -> hdf5_chunks.ChunkIndex | None:
        """How to read a dataset from its raw chunks (None: through h5py), made
        once per dataset of a version (versions never change)."""
        with self._index_lock:
            found = self._indexes.get(h5path)
        if found is None:
            with self._lock:
                with self._index_lock:
                    found = self._indexes.get(h5path)
                if found is None:
                    try:
                        found = (hdf5_chunks.chunk_index(self._dataset(h5path), self.f),)
                    except Exception as e:  # noqa: BLE001 - h5py reads it, and says what is wrong
                        log.debug("%s: read through h5py (%s)", h5path, e)
                        found = (None,)
                    with self._index_lock:
                        self._indexes.put(h5path, found)
        return found[0]

    def _text(self, ref: TextRef) -> bytes:
        data = self._texts.get(ref.h5path)
        if data is None:
            values = self._dataset(ref.h5path)[()]
            values = [values] if np.ndim(values) == 0 else np.asarray(values, dtype=object).ravel()
            data = self._texts.put(ref.h5path, npy.text_bytes(values))
        return data

    def _close_file(self) -> None:
        self._datasets.clear()
        self._texts.clear()
        self.f.close()

    def close(self) -> None:
        self._close_file()
        self._chunk_reader.pool.shutdown(wait=True)
        os.close(self._fd)

