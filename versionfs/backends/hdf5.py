"""HDF5 backend: a file written by the ``versioned-hdf5`` library.

Committed versions are read with plain h5py: each version is the group
``/_version_data/versions/<name>`` whose datasets are virtual datasets mapping
into the per-dataset ``raw_data``; HDF5 resolves the mapping (and fill values for
unwritten chunks) on read, so a byte range reads only the chunks it overlaps.
The versioned-hdf5 library itself is only asked whether it accepts the file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import h5py
import numpy as np

from .. import __version__, journal
from ..cache import DiskCache, Lru
from ..errors import CommitRefused, FileBusy, SourceError
from ..logs import once
from . import hdf5_chunks, hdf5_image, hdf5_raw, hdf5_write, npy
from ..selectors import format_utc
from .hdf5_format import (ATTRS_FILE, EXTENSIONS, FIRST_VERSION, INTERNAL_ATTRS, LINK_ATTR, MESSAGE_ATTR, MODE_ATTR,
                          MTIME_ATTR, NAME_ATTR, RAW_ATTR, RENAMED_ATTR, RESERVED_NAMES, VERSION_FILE, VERSIONS_GROUP, ImageRef, NpyRef, RawRef,
                          TextRef, VersionFileRef, attr_to_json, file_kind, parse_timestamp, strip_ext, user_attrs)
from .base import (NAME_MAX, Change, ChunkCount, Dir, Duplicate, Execution, File, FileDelta, FileMeta, History, Layout, Progress, Revision,
                   VersionInfo, canonical_json, compare_by_reading, join, safe_name, version_json)

log = logging.getLogger(__name__)

TEXT_CACHE_BYTES = 64 << 20
IMAGE_CACHE_BYTES = 256 << 20  # built images kept (metadata only: pages, 24 bytes a chunk)
CHUNK_INDEX_BYTES = 128 << 20  # raw datasets' chunk indexes kept (about 40 bytes a chunk)
OBJECT_CACHE_SIZE = 1024  # object headers kept, read (about a KiB each)
OPEN_DATASETS = 16  # datasets kept open for reads
INDEX_CACHE_BYTES = 64 << 20  # chunk indexes of datasets read from their raw chunks


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    return npy.header(dtype, shape)


class _Link(NamedTuple):
    type: int  # h5py.h5l.TYPE_HARD, …
    u: int  # a hard link's object address


def _index_weight(found: "tuple[hdf5_chunks.ChunkIndex | None]") -> int:
    return 64 if found[0] is None else 256 + found[0].nbytes


class _Opened(NamedTuple):
    """An object h5py opened, where its header could not be read directly."""

    kind: str
    obj: Any


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


def _stands_for(values: dict[str, Any], name: str) -> str:
    """A dataset's name as shown: the one it stands for if the writer had to store
    it under an internal name (hdf5_write: a path keeps its dtype and rank)."""
    stored = values.get(NAME_ATTR)
    stored = stored.decode("utf-8", "surrogateescape") if isinstance(stored, bytes) else stored
    return stored if isinstance(stored, str) and stored and "/" not in stored else name


def create_file(path: str) -> str:
    """``versionfs init FILE.h5``: an empty versioned HDF5 file (never over an existing one)."""
    from versioned_hdf5 import VersionedHDF5File

    if os.path.exists(path):
        raise SourceError(f"{path}: already exists")
    try:
        with h5py.File(path, "x") as f:
            VersionedHDF5File(f)
    except OSError as e:
        raise SourceError(f"{path}: cannot create: {e.strerror or e}") from None
    return f"created {path}"


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
    no_compaction = "compact is for S3 sources (an HDF5 file dedups its chunks already)"

    def __init__(self, path: str, cache: DiskCache | None = None):
        self.path = os.path.abspath(path)
        self.description = self.path
        self.spool_key = self.path
        self.f = open_file(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)  # images read raw chunks with pread
        self.raw = hdf5_raw.RawReader(self.path, self.f.id)
        self._images: Lru[hdf5_image.Image] = Lru(IMAGE_CACHE_BYTES, weight=lambda image: image.nbytes)
        self._chunk_indexes: Lru[hdf5_raw.ChunkIndex] = Lru(CHUNK_INDEX_BYTES, weight=lambda index: index.nbytes)
        self.cache = cache  # built images, kept across mounts
        self._objects: Lru[hdf5_raw.ObjectInfo] = Lru(OBJECT_CACHE_SIZE)  # by object address
        self._datasets: Lru[h5py.Dataset] = Lru(OPEN_DATASETS)
        self._texts: Lru[bytes] = Lru(TEXT_CACHE_BYTES, weight=len)
        self._committed: dict[str, VersionInfo] = {}  # about 1 KiB a version
        self.counters: Counter[str] = Counter()  # what was built or read (the control socket's stats)
        self._lock = threading.RLock()  # h5py's file and these caches, for reads beside metadata calls
        self._objects_lock = threading.Lock()  # the header cache, used by both
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
        addresses: dict[str, int] = {}
        group.id.links.iterate(lambda name, link: addresses.__setitem__(name.decode("utf-8", "surrogateescape"), link.u),
                               info=True)
        for name, address in addresses.items():
            if name in self._committed:  # a committed version never changes: read it once
                infos[name] = self._committed[name]
                continue
            attrs = self._attrs_of(address, f"/{VERSIONS_GROUP}/{name}", ("committed", "timestamp", "prev_version", MESSAGE_ATTR))
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
                attrs=attrs["user"],
                placeholder=name == FIRST_VERSION,
                message=attr_to_json(attrs[MESSAGE_ATTR]) if MESSAGE_ATTR in attrs else None,
            )
            self._committed[name] = infos[name]

        depths: dict[str, int] = {}

        def depth(name: str) -> int:
            chain = []
            while name in infos and name not in depths and name not in chain and infos[name].previous:
                chain.append(name)
                name = infos[name].previous
            known = depths.get(name, 0)
            for n in reversed(chain):
                known += 1
                depths[n] = known
            return depths.get(chain[0], 0) if chain else depths.get(name, 0)

        # Oldest first; the empty first version always leads; chain depth breaks
        # timestamp ties (parents before children), then the name.
        return sorted(
            infos.values(),
            key=lambda v: (v.name != FIRST_VERSION, v.timestamp, depth(v.name), v.name),
        )

    def current(self) -> str | None:
        current = self.f[VERSIONS_GROUP].attrs.get("current_version")
        return current.decode() if isinstance(current, bytes) else current

    def _info(self, version: str) -> VersionInfo:
        info = self._committed.get(version)
        if info is None:
            self.versions()
            info = self._committed[version]
        return info

    # -- objects, read from their headers where possible (hdf5_raw) --------------------------
    def _object(self, address: int) -> hdf5_raw.ObjectInfo | None:
        with self._objects_lock:
            info = self._objects.get(address)
        if info is None:
            try:
                info = self.raw.object_info(address)
            except hdf5_raw.ERRORS as e:
                log.debug("object at %d is read through h5py (%s)", address, e)
                info = None
            self.counters["headers read"] += 1
            if info is not None:
                with self._objects_lock:
                    self._objects.put(address, info)
        return info

    def _attrs_of(self, address: int, h5path: str, wanted: tuple[str, ...] = ()) -> dict[str, Any]:
        """``user``: an object's user attributes as JSON, and the values of the
        internal attributes in ``wanted`` (as h5py gives them)."""
        info = self._object(address)
        out: dict[str, Any] = {}
        if info is not None and info.attrs is not None:
            try:
                user = {}
                for name, message in info.attrs.items():
                    if name not in INTERNAL_ATTRS:
                        user[name] = attr_to_json(self.raw.attribute_value(message))
                    elif name in wanted:
                        out[name] = self.raw.attribute_value(message)
                out["user"] = user
                return out
            except hdf5_raw.ERRORS as e:
                log.debug("%s: attributes read through h5py (%s)", h5path, e)
        obj = self.f[h5path]
        self.counters["objects opened"] += 1
        out = {name: obj.attrs[name] for name in wanted if name in obj.attrs}
        out["user"] = user_attrs(obj)
        return out

    # -- trees ------------------------------------------------------------------
    def tree(self, version: str) -> Dir:
        """The whole version (one listing per group)."""
        info = self._info(version)
        mtime = info.mtime_ns
        notes: dict[str, Any] = {"renamed": {}, "hidden": {}}
        root = Dir(mtime_ns=mtime, ref=f"/{VERSIONS_GROUP}/{version}")
        pending = [("", root)]
        while pending:
            path, node = pending.pop()
            node.children = self._entries(node.ref, path, mtime, notes)
            pending += [(join(path, n), e) for n, e in node.children.items() if isinstance(e, Dir)]
        root.children[VERSION_FILE] = self._generated(self._version_json(info, notes), mtime)
        self.counters["trees"] += 1
        return root

    def listdir(self, version: str, path: str, ref: Any) -> dict[str, File | Dir]:
        """One group of a version: its files, and its subgroups as directories whose
        entries are not loaded. The root's ``.version.json`` names every renamed or
        hidden object of the version, so its bytes (and size) are made from the
        whole tree, only when it is read or stat'ed."""
        info = self._info(version)
        self.counters["listings"] += 1
        entries = self._entries(ref or f"/{VERSIONS_GROUP}/{version}", path, info.mtime_ns, {"renamed": {}, "hidden": {}})
        if not path:
            entries[VERSION_FILE] = File(size=None, mtime_ns=info.mtime_ns, ref=VersionFileRef(version))
        return entries

    def _version_json(self, info: VersionInfo, notes: dict[str, Any]) -> bytes:
        extra = {k: v for k, v in notes.items() if v}
        group = self.f[VERSIONS_GROUP][info.name]
        if MESSAGE_ATTR in group.attrs:
            extra["message"] = attr_to_json(group.attrs[MESSAGE_ATTR])
        return version_json(info, extra)

    def _entries(self, group_path: str, path: str, mtime: int, notes: dict[str, Any]) -> dict[str, File | Dir]:
        """The entries of one group: groups first, then datasets, each in name order
        (so a group keeps its name where a dataset's shown name would take it)."""
        group = self.f[group_path]
        links: list[tuple[str, _Link]] = []
        # (h5py hands every call the same LinkInfo: copy what it says at once)
        group.id.links.iterate(
            lambda name, link: links.append((name.decode("utf-8", "surrogateescape"), _Link(link.type, link.u))), info=True)
        attrs: dict[str, Any] = {}
        # (a link's address, not H5Oget_info, which sizes the whole group's index)
        address = self.f.id.links.get_info(group_path.encode("utf-8", "surrogateescape")).u
        group_attrs = self._attrs_of(address, group_path)["user"]
        if group_attrs:
            attrs["."] = group_attrs
        groups, datasets = [], []
        for name, link in sorted(links, key=lambda item: item[0]):
            h5path = f"{group_path}/{name}"
            info = self._object(link.u) if link.type == h5py.h5l.TYPE_HARD else None
            if info is None:
                try:
                    obj = group[name]  # a soft link, or a header not read directly
                except (KeyError, OSError) as e:  # a broken link or damaged object
                    self._hide(notes, f"{path}/{name}", f"cannot be opened: {e}")
                    continue
                kind = "group" if isinstance(obj, h5py.Group) else "dataset" if isinstance(obj, h5py.Dataset) else type(obj).__name__
                info = _Opened(kind, obj)
            (groups if info.kind == "group" else datasets).append((name, h5path, link, info))
        taken: set[str] = set()
        out: dict[str, File | Dir] = {}
        for name, h5path, _, _ in groups:
            shown = self._show(safe_name(name, "", taken, RESERVED_NAMES), name, path, notes)
            taken.add(shown)
            out[shown] = Dir(mtime_ns=mtime, ref=h5path)
        for name, h5path, link, info in datasets:
            if info.kind != "dataset":
                self._hide(notes, f"{path}/{name}", f"unsupported object {info.kind}")
                continue
            described = self._describe(h5path, link, info)
            if isinstance(described, str):
                self._hide(notes, f"{path}/{name}", described)
                continue
            kind, dtype, shape, values = described
            ext = EXTENSIONS[kind]
            name = _stands_for(values, name)
            shown = self._show(safe_name(name, ext, taken, RESERVED_NAMES), name + ext, path, notes)
            taken.add(shown)
            out[shown] = self._file(h5path, kind, dtype, shape, values, mtime)
            if values["user"]:
                attrs[shown] = values["user"]
        if attrs:
            out[ATTRS_FILE] = self._generated(canonical_json(attrs), mtime)
        return out

    def _describe(self, h5path: str, link: Any, info: Any) -> tuple[str, np.dtype, tuple[int, ...], dict[str, Any]] | str:
        """(kind, dtype, shape, attribute values) of a dataset, or why it has no file form."""
        wanted = ("chunks", MTIME_ATTR, RAW_ATTR, LINK_ATTR, MODE_ATTR, NAME_ATTR)
        if isinstance(info, _Opened):
            ds = info.obj
            dtype, shape = ds.dtype, tuple(ds.shape)
            values = {name: ds.attrs[name] for name in wanted if name in ds.attrs}
            values["user"] = user_attrs(ds)
        else:
            dtype, shape = info.dtype, info.shape
            if dtype is None or shape is None:  # a shared or null type or space: ask HDF5
                ds = self.f[h5path]
                self.counters["objects opened"] += 1
                dtype, shape = ds.dtype, tuple(ds.shape)
            values = self._attrs_of(link.u, h5path, wanted)
        if dtype == np.uint8 and len(shape) == 1 and (LINK_ATTR in values or RAW_ATTR in values):
            return ("link" if LINK_ATTR in values else "raw"), dtype, shape, values  # a stored symlink, or raw bytes
        kind = file_kind(dtype)
        if kind is None:
            return f"dtype {dtype} has no file form"
        return kind, dtype, shape, values

    def _file(self, h5path: str, kind: str, dtype: np.dtype, shape: tuple[int, ...], values: dict[str, Any],
              mtime: int) -> File:
        # A file committed through staging keeps its own mtime (so rsync's quick
        # check works across snapshots); any other shows its version's time.
        mtime = int(values.get(MTIME_ATTR, mtime))
        mode = values.get(MODE_ATTR)
        meta = FileMeta(mode=int(mode) if mode is not None else None, link=kind == "link")
        if kind == "text":
            return File(size=None, mtime_ns=mtime, ref=TextRef(h5path), meta=meta)
        if kind in ("raw", "link"):
            return File(size=int(shape[0]), mtime_ns=mtime, ref=RawRef(h5path), meta=meta)
        ref = NpyRef(h5path, dtype, shape, _npy_header(dtype, shape))
        chunks = values.get("chunks")
        unit = 1 << 20
        if chunks is not None and len(shape) > 0:
            row = int(np.asarray(chunks).ravel()[0]) * math.prod(shape[1:]) * dtype.itemsize
            unit = row or unit
        return File(size=ref.size, mtime_ns=mtime, ref=ref, layout=Layout(len(ref.header), unit), meta=meta)

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
        # A few open datasets only: an open virtual dataset holds its whole
        # mapping in HDF5's memory (KiBs per chunk).
        ds = self._datasets.get(h5path)
        if ds is None:
            ds = self._datasets.put(h5path, self.f[h5path])
            self.counters["objects opened"] += 1
        return ds

    # -- history ------------------------------------------------------------------
    def history(self, path: str) -> History:
        """One revision per version in which the file at ``path`` appeared, changed
        (content or attributes) or went away, told apart by the dataset's stored
        description (shape, dtype, fill value, chunk mapping, attributes), never by
        reading data. Each version costs one lookup of the path (one listing of
        its directory where names are not plain); a directory's names cost one
        listing of it per version."""
        self.counters["histories"] += 1
        children: set[str] = set()
        revisions: list[Revision] = []
        previous: Any = None
        for info in self.versions():
            if info.placeholder:
                continue
            entry, state = self._entry_at(info, path) if path else (Dir(info.mtime_ns), None)
            if isinstance(entry, Dir):
                children.update(self.listdir(info.name, path, entry.ref))
            if state != previous:
                if isinstance(entry, File) and isinstance(entry.ref, VersionFileRef):
                    entry = self._generated(self._version_file(entry.ref.version), entry.mtime_ns)
                revisions.append(Revision(info.name, info.timestamp, format_utc(info.timestamp),
                                          entry if state is not None else None, info.name))
            previous = state
        return History(tuple(sorted(children)), tuple(revisions))

    def _entry_at(self, info: VersionInfo, path: str) -> tuple[File | Dir | None, Any]:
        """The entry at ``path`` in a version and, for a file, what history compares
        (``_state``), found without listing directories where the shown names are
        the stored ones."""
        group = f"/{VERSIONS_GROUP}/{info.name}"
        parts = path.split("/")
        for i, part in enumerate(parts):
            found, state = self._lookup(info, group, "/".join(parts[:i]), part)
            if i == len(parts) - 1:
                return found, state
            if not isinstance(found, Dir):
                return None, None
            group = found.ref
        return None, None

    def _lookup(self, info: VersionInfo, group_path: str, path: str, name: str) -> tuple[File | Dir | None, Any]:
        plain = "~" not in name and name not in RESERVED_NAMES and len(name.encode()) <= NAME_MAX and "/" not in name
        if plain:
            links, found = self.f.id.links, []
            for h5name in {name, strip_ext(name)}:
                at = f"{group_path}/{h5name}".encode("utf-8", "surrogateescape")
                if links.exists(at):
                    found.append((h5name, links.get_info(at)))
            if not found and not self._renamed_in(group_path):
                return None, None
            if len(found) == 1 and found[0][1].type == h5py.h5l.TYPE_HARD:
                (h5name, link), h5path = found[0], f"{group_path}/{found[0][0]}"
                obj = self._object(link.u)
                if obj is not None and obj.kind == "group" and h5name == name:
                    return Dir(info.mtime_ns, ref=h5path), None
                if obj is not None and obj.kind == "dataset":
                    described = self._describe(h5path, link, obj)
                    if not isinstance(described, str) and h5name + EXTENSIONS[described[0]] == name:
                        kind, dtype, shape, values = described
                        entry = self._file(h5path, kind, dtype, shape, values, info.mtime_ns)
                        return entry, self._state(entry, obj, values["user"])
        # A generated file, a renamed name, or two stored names that could be shown
        # as this one: as the directory's listing says.
        if not path and name == VERSION_FILE:
            entry = File(size=None, mtime_ns=info.mtime_ns, ref=VersionFileRef(info.name))
        else:
            entry = self.listdir(info.name, path, group_path).get(name)
        return entry, self._state(entry) if isinstance(entry, File) else None

    def _renamed_in(self, group_path: str) -> bool:
        """Whether a group holds datasets the writer stored under internal names
        (then a shown name is found only by listing the group)."""
        address = self.f.id.links.get_info(group_path.encode("utf-8", "surrogateescape")).u
        return RENAMED_ATTR in self._attrs_of(address, group_path, (RENAMED_ATTR,))

    def _state(self, entry: File, info: hdf5_raw.ObjectInfo | None = None, user: dict[str, Any] | None = None) -> Any:
        """What history compares: equal exactly when the file shows the same bytes
        (for a dataset: the same stored description), in 20-odd bytes."""
        if entry.content is not None:  # a generated file (.attrs.json)
            return ("content", hashlib.sha1(entry.content).digest())
        if isinstance(entry.ref, VersionFileRef):
            return ("content", hashlib.sha1(self._version_file(entry.ref.version)).digest())
        h5path = entry.ref.h5path
        if info is None:
            link = self.f.id.links.get_info(h5path.encode("utf-8", "surrogateescape"))
            info = self._object(link.u) if link.type == h5py.h5l.TYPE_HARD else None
            user = self._attrs_of(link.u, h5path)["user"] if info is not None else user_attrs(self._dataset(h5path))
        digest = hashlib.sha1()
        try:
            block = self.raw.mapping_block(info) if info is not None else None
        except hdf5_raw.ERRORS:
            block = None
        if block is not None:
            for part in (info.space_raw, info.dtype_raw, info.fill, block):
                digest.update(len(part).to_bytes(8, "little") + part)
        else:
            digest.update(repr(self.fingerprint(entry.ref)).encode())
        digest.update(canonical_json(user or {}))
        return ("data", digest.digest())

    def _version_file(self, version: str) -> bytes:
        key = ("version-file", version)
        data = self._texts.get(key)
        if data is None:
            data = self._texts.put(key, self.tree(version).children[VERSION_FILE].content)
        return data

    def image(self, version: str) -> File:
        """``X.h5``: the version as one plain HDF5 file (its size is known once built)."""
        return File(size=None, mtime_ns=self._info(version).mtime_ns, ref=ImageRef(version))

    def _image(self, version: str) -> hdf5_image.Image:
        image = self._images.get(version)
        if image is None:
            image = self._images.put(version, self._stored_image(version) or self._build_image(version))
        return image

    def _build_image(self, version: str) -> hdf5_image.Image:
        started = time.monotonic()
        self.counters["images"] += 1
        image = hdf5_image.build(self.f, f"{VERSIONS_GROUP}/{version}", INTERNAL_ATTRS, self.raw, self.raw_chunk_index)
        log.info("built the .h5 image of version %s: %d bytes, %d chunks, %.0f ms",
                 version, image.size, len(image.regions), (time.monotonic() - started) * 1000)
        if self.cache is not None and image.complete:
            self.cache.put(self._image_identity(version), 0, image.to_bytes())
        return image

    def raw_chunk_index(self, raw: h5py.Dataset) -> hdf5_raw.ChunkIndex | None:
        """Where a raw dataset's chunks are (shared by every version mapping into
        it; arrays of about 40 bytes a chunk, kept by size). Raw chunks are only
        ever appended, and commits clear it."""
        index = self._chunk_indexes.get(raw.name)
        if index is None:
            self.counters["chunk indexes"] += 1
            index = self._chunk_indexes.put(raw.name, hdf5_image.chunk_index_of(self.raw, raw))
        return index

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
        address = self.f.id.links.get_info(f"/{VERSIONS_GROUP}/{version}".encode("utf-8", "surrogateescape")).u
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
            if isinstance(ref, VersionFileRef):
                return len(self._version_file(ref.version))
            return len(self._text(ref))

    def read(self, ref: Any, offset: int, length: int) -> bytes | memoryview:
        if isinstance(ref, ImageRef):
            with self._lock:
                image = self._image(ref.version)
            return image.read(self._fd, offset, length)
        if isinstance(ref, NpyRef):
            return self._read_npy(ref, offset, length)
        with self._lock:
            if isinstance(ref, VersionFileRef):
                return self._version_file(ref.version)[offset : offset + length]
            if isinstance(ref, TextRef):
                return self._text(ref)[offset : offset + length]
            return self._dataset(ref.h5path)[offset : offset + length].tobytes()  # RawRef

    def xattrs(self, ref: Any) -> dict[str, bytes]:
        return {}  # attributes are in .attrs.json

    def same_content(self, entry: File, local: str, written: tuple[tuple[int, int], ...] | None) -> bool:
        return compare_by_reading(self, entry, local, written)

    def fingerprint(self, ref: Any) -> Any:
        """Shape, dtype, fill value and the chunk mapping: equal exactly when two
        versions of a dataset hold the same data (chunks are content-addressed).
        Read from the dataset's header where it can be (its mapping as arrays)."""
        if isinstance(ref, VersionFileRef):
            return ("content", self._version_file(ref.version))
        link = self.f.id.links.get_info(ref.h5path.encode("utf-8", "surrogateescape"))
        info = self._object(link.u) if link.type == h5py.h5l.TYPE_HARD else None
        if info is not None and info.vds is not None and info.shape is not None and info.dtype is not None:
            try:
                mapping = hdf5_raw.decode_mapping(self.raw.mapping_block(info), len(info.shape))
                fill = hdf5_raw.fill_value(info.fill)
            except hdf5_raw.ERRORS:
                mapping = None
            if mapping is not None:
                arrays = b"".join(a.tobytes() for a in (mapping.vstart, mapping.sstart, mapping.count))
                return (info.shape, info.dtype.str, fill, mapping.source,
                        hashlib.sha256(arrays).digest())
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
        before = {tuple(map(tuple, m.bounds)): (m.dataset, m.source_bounds) for m in hdf5_image.virtual_mapping(a)}
        after = [(tuple(map(tuple, m.bounds)), (m.dataset, m.source_bounds)) for m in hdf5_image.virtual_mapping(b)]
        if not after:  # not chunked in the format (a scalar): the whole file
            return FileDelta(False, old.size, new.size, new.size, None, tuple(notes))
        changed = [place for place, source in after if before.get(place) != source]
        fixed = file_kind(b.dtype) == "npy" or isinstance(new.ref, RawRef)
        nbytes = sum(int(np.prod([hi - lo + 1 for lo, hi in zip(*place)])) for place in changed) * b.dtype.itemsize
        return FileDelta(False, old.size, new.size, nbytes if fixed else None, ChunkCount(len(changed), len(after)), tuple(notes))

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
                self.raw = hdf5_raw.RawReader(self.path, self.f.id)
                # Images are rebuilt from the file as it is now (same bytes: an image
                # depends on content, not on where the raw chunks sit); headers are
                # read again (a commit may write into existing ones).
                self._images.clear()
                with self._objects_lock:
                    self._objects.clear()
                self._chunk_indexes.clear()
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
                        found = (self._read_index(h5path) or hdf5_chunks.chunk_index(self._dataset(h5path), self.f),)
                    except Exception as e:  # noqa: BLE001 - h5py reads it, and says what is wrong
                        log.debug("%s: read through h5py (%s)", h5path, e)
                        found = (None,)
                    with self._index_lock:
                        self._indexes.put(h5path, found)
        return found[0]

    def _read_index(self, h5path: str) -> hdf5_chunks.ChunkIndex | None:
        """``hdf5_chunks.ChunkIndex`` made from the dataset's header and the raw
        dataset's chunk index read from the file's bytes: no virtual dataset
        opened, no Python per chunk, whatever the number of chunks (None where
        they do not say it simply: then hdf5_chunks asks h5py)."""
        link = self.f.id.links.get_info(h5path.encode("utf-8", "surrogateescape"))
        info = self._object(link.u) if link.type == h5py.h5l.TYPE_HARD else None
        dtype = info.dtype if info is not None else None
        if info is None or info.vds is None or not info.shape or dtype is None or dtype.kind not in "biufc" or dtype.fields:
            return None
        try:
            mapping = hdf5_raw.decode_mapping(self.raw.mapping_block(info), len(info.shape))
            fill_bytes = hdf5_raw.fill_value(info.fill)
        except hdf5_raw.ERRORS:
            return None
        if mapping is None or not mapping.source:
            return None
        raw = self.f.get(mapping.source)
        if (not isinstance(raw, h5py.Dataset) or raw.chunks is None or raw.dtype != dtype or len(raw.chunks) != len(info.shape)
                or raw.id.get_type().get_size() != dtype.itemsize):
            return None
        filters = hdf5_chunks._filters(raw)
        stored = self.raw_chunk_index(raw)
        if filters is None or stored is None:
            return None
        shape, chunks = tuple(info.shape), tuple(raw.chunks)
        grid = tuple(-(-n // k) for n, k in zip(shape, chunks))
        cells_n = math.prod(grid)
        offsets, sizes, masks = np.full(cells_n, -1, np.int64), np.zeros(cells_n, np.int64), np.zeros(cells_n, np.uint32)
        if len(mapping.vstart) and cells_n:
            match = hdf5_raw.match_chunks(mapping.vstart, mapping.sstart, mapping.count, shape, raw.shape, stored)
            if match is None:
                return None  # not whole chunks one to one: hdf5_chunks decides
            cells, at = match.cells[match.written], match.at[match.written]
            offsets[cells], sizes[cells], masks[cells] = stored.addresses[at], stored.sizes[at], stored.masks[at]
        fill = np.zeros((), dtype)
        if fill_bytes is not None and len(fill_bytes) == dtype.itemsize:
            fill = np.frombuffer(fill_bytes, dtype, 1).reshape(()).copy()
        return hdf5_chunks.ChunkIndex(h5path, shape, chunks, dtype, fill, filters, offsets, sizes, masks)

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
        self.raw.close()
        self.f.close()

    def duplicates(self) -> list[Duplicate]:
        return []  # equal chunks are stored once (no_compaction)

    def remove_duplicate(self, duplicate: Duplicate) -> None:
        raise ValueError(f"{duplicate.name}: an HDF5 file has no duplicates to remove")

    def close(self) -> None:
        self._close_file()
        self._chunk_reader.pool.shutdown(wait=True)
        os.close(self._fd)

