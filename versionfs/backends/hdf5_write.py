"""Staged changes → one new version of a versioned-HDF5 file.

The commit goes through versioned-hdf5's own ``stage_version`` (so unchanged
datasets are not rewritten and changed ones are chunk-deduplicated by the
library), on an h5py file opened through ``JournaledFile`` (so the commit is
atomic and durable). How staged files map to datasets (doc/SEMANTICS.md, "How staged files become the next version"):

- ``<name>.npy`` (valid, fixed-size dtype) is dataset ``<name>``;
- ``<name>.txt`` is a variable-length string dataset ``<name>`` when the text
  form maps back to exactly the same bytes;
- ``.attrs.json`` sets the attributes of its directory and its files;
- anything else (and a new ``.npy`` or ``.txt`` that is not valid) is stored
  losslessly as raw bytes: a uint8 dataset with the file's whole name, marked
  with RAW_ATTR, and shown again as that file.

Memory stays bounded whatever the size of a file: a new or rewritten ``.npy``
or raw file is *streamed*, read a slab at a time by versioned-hdf5's own
``rewrite_dataset`` (which hashes and deduplicates each slab against every
chunk the path ever had) straight into the path's ``raw_data``; its virtual
dataset is made after ``stage_version`` has written everything else. Small
files (INLINE_MAX, up to INLINE_BUDGET in all) go through the staged group as
a user's ``create_dataset`` would (streaming costs more per dataset), and an
in-place edit (``Change.written``) too, with only its written chunk rows.

versioned-hdf5 keeps a path's chunk shape, dtype and rank for ever once a
dataset existed there (``_version_data/<path>/raw_data``). A new dataset at a
path reuses what is kept there; one the kept ``raw_data`` cannot hold (another
dtype or rank, or so many chunks of the old shape that memory would not stay
bounded) is stored under a free internal name beside it, ``<name>~<n>``, with
the shown name in NAME_ATTR.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
from h5py._hl.filters import guess_chunk
from numpy.lib import format as npy_format
from versioned_hdf5 import VersionedHDF5File
from versioned_hdf5.backend import DEFAULT_CHUNK_SIZE, are_compatible_dtypes, rewrite_dataset, write_dataset
from versioned_hdf5.slicetools import create_virtual_dataset

from ..errors import CommitError
from ..journal import JournaledFile
from ..logs import once
from . import npy
from .base import Change, Dir, File, Progress, find
from .hdf5_format import (ATTRS_FILE, EXTENSIONS, FILE_MARKS, FIRST_VERSION, INTERNAL_ATTRS, LINK_ATTR, MESSAGE_ATTR,
                          MODE_ATTR, MTIME_ATTR, NAME_ATTR, RAW_ATTR, RENAMED_ATTR, VERSION_FILE, VERSIONS_GROUP, json_to_attr,
                          ref_h5path, ref_kind, ref_name, strip_ext)

log = logging.getLogger(__name__)

SLAB_BYTES = 64 << 20  # what one step of a commit holds in memory
INLINE_MAX = 8 << 20  # a new dataset this small goes through the staged group ...
INLINE_BUDGET = 128 << 20  # ... while all of those of one commit stay under this
MAX_CHUNKS = 1 << 20  # a dataset with more chunks of its path's kept shape gets a new internal name
RAW_CHUNK_MIN = 4096  # bytes: a raw file's chunks are never smaller (its path keeps them for ever)
TEXT_MAX_BYTES = 64 << 20  # a new .txt larger than this is stored as raw bytes (text is parsed in memory)
UTC = dt.timezone.utc


def commit(path: str, parent: str | None, changes: list[Change], name: str, message: str | None, parent_tree: Dir,
           progress: Progress | None = None) -> None:
    """Write ``changes`` on top of ``parent`` as version ``name`` (blocking)."""
    jf = JournaledFile(path)
    try:
        meter = Meter(changes, parent_tree, progress, jf.check)
        with h5py.File(jf, "r+") as f:
            vf = VersionedHDF5File(f)
            prev = parent or FIRST_VERSION
            writer = _Writer(f, prev, parent_tree, meter)
            with vf.stage_version(name, prev_version=prev, timestamp=dt.datetime.now(UTC)) as group:
                writer.start(group)
                if message:
                    group.attrs[MESSAGE_ATTR] = message
                writer.apply(changes)
            writer.finish(name)
        jf.commit()
        return
    except BaseException as e:
        jf.abort()
        failure = jf.failure or (e if isinstance(e, OSError) and e.errno else None)
        if failure is None:
            raise
        reason = failure.strerror
    # Raised outside the handler and with no traceback kept: frames of the failed
    # commit hold h5py objects of a closed file, which crash the interpreter when
    # they are freed late (seen at exit after a full disk).
    jf.failure = failure = None
    raise CommitError(f"{path}: the new version could not be written ({reason}); the file is as it was and staging "
                      "is kept: commit again once that is fixed")


class Meter:
    """Progress of one commit in files and bytes (``Progress`` is told both)."""

    def __init__(self, changes: list[Change], tree: Dir, report: Progress | None, check: Any = None):
        self.report, self.check = report, check  # check(): raises once the commit cannot succeed
        self.files_total = len(changes)
        self.bytes_total = sum(_change_bytes(c, tree) for c in changes)
        self.files = self.bytes = 0

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes
        self._tell()

    def file_done(self) -> None:
        self.files += 1
        self._tell()

    def _tell(self) -> None:
        if self.check is not None:
            self.check()
        if self.report is not None:
            self.report(self.files, self.files_total, min(self.bytes, self.bytes_total), self.bytes_total)


def _change_bytes(change: Change, tree: Dir) -> int:
    """The bytes a change reads: its written ranges, its file, or a renamed source."""
    if change.kind != "file":
        return 0
    if change.local is not None:
        if change.written is not None:
            return sum(stop - start for start, stop in change.written)
        return os.path.getsize(change.local)
    source = find(tree, change.base_path or "")
    return (source.size or 0) if isinstance(source, File) else 0


@dataclass(frozen=True)
class NpyLayout:
    """Where a local .npy file keeps its array (only its header is read)."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def array(self) -> "FileArray | np.ndarray":
        """Something rewrite_dataset reads a block of chunks at a time."""
        if self.fortran:  # rare: read through a map (numpy does the transposition)
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        return FileArray(self.path, self.offset, self.dtype, self.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return FileArray(self.path, self.offset, self.dtype, self.shape)[start:stop]


def npy_layout(path: str) -> NpyLayout | None:
    """The layout of a local ``.npy`` file versionfs can store as a dataset; None
    if it is not one (not .npy, wrong length, object or plain void dtype, 0-d:
    versioned-hdf5 has no scalar datasets)."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran, dtype = read_header(f, max_header_size=1 << 20)
            offset = f.tell()
    except Exception:  # noqa: BLE001 - any parse failure means "not .npy"
        return None
    if dtype.hasobject or (dtype.names is None and dtype.kind == "V") or not shape or not dtype.itemsize:
        return None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) != offset + nbytes:
        return None
    return NpyLayout(path, offset, dtype, tuple(shape), bool(fortran) and len(shape) > 1)


@dataclass
class FileArray:
    """A C-order array at ``offset`` of a local file, read whole rows at a time:
    indexing reads just the rows asked for, so nothing else stays in memory."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    meter: Meter | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        start, stop, _ = index[0].indices(self.shape[0])
        out = np.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            at = self.offset + start * (out.nbytes // max(1, len(out)))
            f.seek(at)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CommitError(f"{self.path}: shorter than its .npy header says (changed during the commit?)")
                done += n
            # The next block is read from disk while this one is hashed.
            os.posix_fadvise(f.fileno(), at + done, done, os.POSIX_FADV_WILLNEED)
        if self.meter is not None:
            self.meter.add(out.nbytes)
        return out[(slice(None), *index[1:])]


@dataclass
class Metered:
    """An array-like (a dataset of the parent version) whose reads count as progress."""

    source: Any
    meter: Meter

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    @property
    def ndim(self) -> int:
        return len(self.source.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        out = self.source[index]
        self.meter.add(out.nbytes)
        return out


@dataclass
class Streamed:
    """A dataset written straight to its raw_data; its virtual dataset is made
    once stage_version has written the rest of the version."""

    staged: Any  # the committed StagedChangesArray
    fillvalue: Any
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Place:
    """Where a new dataset goes: its name and what its path keeps."""

    name: str
    chunks: tuple[int, ...]
    fillvalue: Any


class _Writer:
    def __init__(self, f: h5py.File, prev: str, tree: Dir, meter: Meter):
        self.f, self.prev, self.tree, self.meter = f, prev, tree, meter
        self.prev_group = f[f"{VERSIONS_GROUP}/{prev}"]
        self.data = f["_version_data"]
        self.g: Any = None
        self.streamed: dict[str, Streamed] = {}  # h5 name -> dataset made after stage_version
        self.placed: dict[str, str] = {}  # shown path -> h5 name of a dataset this commit made
        self.inline_bytes = 0  # of the new datasets staged in memory
        self.made: set[str] = set()  # h5 names of datasets this commit put in the staged group
        self.dropped: set[str] = set()  # h5 names of inherited datasets this commit removed

    def start(self, group: Any) -> None:
        self.g = group
        # versioned-hdf5 copies every object's attributes except the root's.
        for key, value in self.prev_group.attrs.items():
            if key not in INTERNAL_ATTRS or key == RENAMED_ATTR:
                group.attrs[key] = value

    def finish(self, version: str) -> None:
        """The streamed datasets' virtual datasets, in the committed version group."""
        for name, s in self.streamed.items():
            create_virtual_dataset(self.f, version, name, s.staged, attrs=s.attrs, fillvalue=s.fillvalue)

    # -- names -------------------------------------------------------------------
    def target(self, path: str) -> tuple[str, File | Dir | None]:
        """The HDF5 path of a display path (leaf as shown) and its parent-tree entry."""
        parts, entry, out = path.split("/"), self.tree, []
        for part in parts:
            child = entry.children.get(part) if isinstance(entry, Dir) else None
            if child is not None and child.ref is not None:
                out.append(ref_name(child.ref))
            else:
                out.append(part)
            entry = child
        return "/".join(out), entry

    def group(self, h5dir: str) -> Any:
        """The staged group at ``h5dir``, made if needed (asked of the file itself:
        groups are real from the start, and InMemoryGroup's own membership test
        walks every name of the group)."""
        if not h5dir:
            return self.g
        if not h5py.Group.__contains__(self.g, h5dir):
            return self.g.create_group(h5dir)
        return self.g[h5dir]

    def place(self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: tuple[int, ...]) -> Place:
        """Where a new dataset of this dtype and shape goes (see the module docstring)."""
        if "/" in name and name.partition("/")[0] == "versions":
            raise CommitError("/versions: versioned-hdf5 keeps its versions there; a top-level directory cannot have "
                              "that name (rename it)")
        candidate, n = name, 1
        while True:
            kept = self._kept(candidate)
            if kept is None and candidate != "versions" and not self._taken(candidate):
                return Place(candidate, chunks, None)
            if kept is not None and kept is not False:
                kept_chunks = tuple(int(c) for c in kept.attrs["chunks"])
                if (are_compatible_dtypes(dtype, kept.dtype) and len(kept_chunks) == len(shape)
                        and _chunk_count(shape, kept_chunks) <= max(MAX_CHUNKS, _chunk_count(shape, chunks))):
                    return Place(candidate, kept_chunks, kept.fillvalue)
            n += 1
            candidate = f"{name}~{n}"

    def _kept(self, name: str) -> Any:
        """The raw_data versioned-hdf5 keeps for a path; None if the path is free,
        False if it is taken by something else (a group of other paths)."""
        try:
            node = self.data.get(name)
            if node is None:
                return None
            raw = node.get("raw_data") if isinstance(node, h5py.Group) else None
        except (KeyError, TypeError, ValueError):
            return False
        return raw if isinstance(raw, h5py.Dataset) and "chunks" in raw.attrs else False

    def _taken(self, name: str) -> bool:
        # An empty group with that name in the version (it never had a dataset).
        return h5py.Group.__contains__(self.g, name)

    def drop(self, name: str) -> None:
        """Remove the dataset the version has at ``name`` (inherited, or made by this
        commit), if any. Asked of what is known first: InMemoryGroup's KeyError
        message lists every name of the group."""
        self.streamed.pop(name, None)
        if name in self.made or (name not in self.dropped and h5py.Group.__contains__(self.prev_group, name)):
            self.made.discard(name)
            self.dropped.add(name)
            try:
                del self.g[name]
            except KeyError:
                pass

    # -- changes -----------------------------------------------------------------
    def apply(self, changes: list[Change]) -> None:
        attrs_files = []
        for change in sorted(changes, key=_order):
            try:
                self._apply(change, attrs_files)
            except (CommitError, OSError):
                raise
            except (ValueError, TypeError, NotImplementedError, KeyError) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CommitError(f"{change.path}: cannot be stored: {first}") from None
            self.meter.file_done()
        for change, data in attrs_files:
            self.set_attrs(change.path, data)

    def _apply(self, change: Change, attrs_files: list) -> None:
        leaf = posixpath.basename(change.path)
        if change.kind == "delete":
            if leaf != ATTRS_FILE:
                self.delete(change.path)
            else:
                attrs_files.append((change, b"{}"))
        elif change.kind == "dir":
            self.group(self.target(change.path)[0])
        elif leaf == VERSION_FILE and "/" not in change.path:
            return  # generated; never stored
        elif leaf == ATTRS_FILE:
            attrs_files.append((change, self.content(change)))
        elif change.kind == "link":
            self.put_link(change)
        else:
            self.put_file(change)

    @staticmethod
    def marks(change: Change) -> dict[str, Any]:
        """What a version keeps of a staged file besides its bytes (doc/SEMANTICS.md § What a version keeps)."""
        marks: dict[str, Any] = {}
        mtime = change.mtime_ns
        if mtime is None and change.local is not None:
            mtime = os.stat(change.local).st_mtime_ns
        if mtime is not None:
            marks[MTIME_ATTR] = np.int64(mtime)
        if change.mode is not None and change.kind != "link":
            marks[MODE_ATTR] = np.int64(change.mode)
        return marks

    def put_link(self, change: Change) -> None:
        """A symbolic link: a uint8 dataset of its target, marked with LINK_ATTR,
        with the link's whole name."""
        h5path, entry = self.target(change.path)
        parent_h5 = posixpath.dirname(h5path)
        if isinstance(entry, File) and entry.ref is not None:
            self.drop(h5path)  # what was there (e.g. x for x.npy)
            h5path = posixpath.join(parent_h5, posixpath.basename(change.path))
        self.group(parent_h5)
        target = np.frombuffer(os.fsencode(change.target or ""), dtype=np.uint8)
        self.drop(h5path)
        self.stream(h5path, target, change.path, _raw_chunks(len(target)), {**self.marks(change), LINK_ATTR: True})

    def content(self, change: Change) -> bytes:
        if change.local is not None:
            with open(change.local, "rb") as fh:
                return fh.read()
        entry = find(self.tree, change.base_path or change.path)
        assert isinstance(entry, File)
        if entry.content is not None:
            return entry.content
        # A rename onto an existing file of another kind: the bytes the parent version shows.
        ds = self.prev_group[_relative(entry.ref, self.prev)]
        kind = ref_kind(entry.ref)
        if kind == "raw":
            return ds[()].tobytes()
        if kind == "text":
            return npy.text_bytes(np.asarray(ds[()], dtype=object).ravel())
        buf = io.BytesIO()
        np.save(buf, ds[()])
        return buf.getvalue()

    def delete(self, path: str) -> None:
        h5path, entry = self.target(path)
        if entry is not None:
            self.drop(h5path)

    def put_file(self, change: Change) -> None:
        """Store one staged file."""
        h5path, entry = self.target(change.path)
        leaf = posixpath.basename(change.path)
        self.group(posixpath.dirname(h5path))
        kind = ref_kind(entry.ref) if isinstance(entry, File) and entry.ref is not None else None
        marks = self.marks(change)
        if change.local is None and change.base_path == change.path and kind is not None:
            # Its metadata alone (a chmod): the inherited dataset keeps its data, new marks.
            name = h5path
            for key, value in marks.items():
                self.g[name].attrs[key] = value
            return None
        if change.local is None:
            source = find(self.tree, change.base_path or "")
            if isinstance(source, File) and source.ref is not None and source.content is None:
                source_kind = ref_kind(source.ref)
                if kind is None or kind == source_kind:
                    # A rename: the dataset as it is (same dtype, chunks, attributes).
                    dest = _renamed(h5path, leaf, source_kind) if kind is None else h5path
                    return self.copy_dataset(self.prev_group[_relative(source.ref, self.prev)], dest, change.path, marks)
        if kind == "npy" or (kind is None and leaf.endswith(".npy")):
            layout = npy_layout(change.local) if change.local is not None else _saved_layout(self.content(change))
            if layout is not None:
                name = h5path if kind else h5path[: -len(".npy")]
                return self.put_array(name, layout, change, existing=kind is not None, attrs=marks)
            if kind:
                raise CommitError(f"{change.path}: not a valid .npy file (it replaces dataset /{h5path})")
        size = os.path.getsize(change.local) if change.local is not None else None
        if kind == "text" or (kind is None and leaf.endswith(".txt") and (size is None or size <= TEXT_MAX_BYTES)):
            data = self.content(change)
            values = npy.text_values(data)
            if npy.text_bytes(values) == data:
                name = h5path if kind else h5path[: -len(".txt")]
                self.meter.add(len(data))
                return self.put_text(name, values, change.path, existing=kind is not None, attrs=marks)
            if kind:
                raise CommitError(f"{change.path}: this text does not map back to the same bytes (see doc/SEMANTICS.md, text form)")
        if change.local is not None:
            source: Any = FileArray(change.local, 0, np.dtype(np.uint8), (size,), self.meter)
        else:
            data = self.content(change)
            source = np.frombuffer(data, dtype=np.uint8)
            self.meter.add(len(data))
        self.drop(h5path)
        self.stream(h5path, source, change.path, _raw_chunks(source.shape[0]), {**marks, RAW_ATTR: True})

    def copy_dataset(self, source: h5py.Dataset, dest: str, shown: str, marks: dict[str, Any]) -> None:
        # Its user attributes and versionfs's marks, then what the change says.
        attrs = {k: v for k, v in source.attrs.items() if k not in INTERNAL_ATTRS or k in FILE_MARKS} | marks
        chunks = _chunks_of(source)
        self.drop(dest)
        if h5py.check_string_dtype(source.dtype) is not None:  # text: small, through the staged group
            values = np.asarray(source[()], dtype=object)
            self.meter.add(sum(len(v) for v in values.ravel()) if values.size else 0)
            place = self.place(dest, source.dtype, values.shape, chunks)
            ds = self.group(posixpath.dirname(place.name)).create_dataset(
                posixpath.basename(place.name), data=values, dtype=source.dtype, chunks=place.chunks)
            self.made.add(place.name)
            self._set(ds.attrs, attrs, place, dest)
            self.placed[shown] = place.name
            return
        self.stream(dest, Metered(source, self.meter), shown, chunks, attrs, fillvalue=source.fillvalue)

    def put_array(self, name: str, layout: NpyLayout, change: Change, existing: bool, attrs: dict[str, Any]) -> None:
        shown = change.path
        if existing:
            old = self.prev_group.get(name)
            if isinstance(old, h5py.Dataset):
                if old.dtype != layout.dtype:
                    raise CommitError(f"{shown}: dtype {layout.dtype} cannot replace {old.dtype} of dataset /{name} "
                                      "(remove the file and commit, then add it back: it is then a new dataset)")
                if old.ndim != len(layout.shape):
                    raise CommitError(f"{shown}: a {len(layout.shape)}-D array cannot replace the {old.ndim}-D dataset "
                                      f"/{name} (remove the file and commit, then add it back: it is then a new dataset)")
                if self.edit_in_place(name, old, layout, change.written):
                    for key, value in attrs.items():
                        self.g[name].attrs[key] = value
                    return
                attrs = {**{k: v for k, v in old.attrs.items() if k not in ("chunks", "raw_data")}, **attrs}
        self.drop(name)
        source = layout.array()
        if isinstance(source, FileArray):
            source.meter = self.meter
        else:
            source = Metered(source, self.meter)
        self.stream(name, source, shown, guess_chunk(layout.shape, None, layout.dtype.itemsize), attrs)

    def edit_in_place(self, name: str, old: h5py.Dataset, layout: NpyLayout,
                      written: tuple[tuple[int, int], ...] | None) -> bool:
        """An edit in place of a few chunk rows, through the staged dataset: only
        the rows it wrote are read and, where they differ, written. False when
        that does not apply (then the whole file is streamed)."""
        if written is None or layout.fortran or old.shape != layout.shape:
            return False
        chunk0 = int(old.attrs["chunks"][0]) if "chunks" in old.attrs else 1
        rows = _written_chunk_rows(written, layout, chunk0)
        if rows is None or len(rows) * chunk0 * layout.row_bytes > 4 * SLAB_BYTES:
            return False
        ds = self.g[name]
        for row in rows:
            stop = min(row + chunk0, layout.shape[0])
            new = layout.rows(row, stop)
            self.meter.add(new.nbytes)
            ds[row:stop] = new  # unchanged chunks are found by their hash: nothing new is stored
        return True

    def stream(self, name: str, source: Any, shown: str, chunks: tuple[int, ...], attrs: dict[str, Any],
               fillvalue: Any = None) -> None:
        """Write a new dataset: a small one through the staged group (committed by
        versioned-hdf5 as any create_dataset, while the small ones of this commit
        stay under INLINE_BUDGET in all), any other straight to its raw_data, a
        slab at a time, so that memory stays bounded."""
        place = self.place(name, source.dtype, tuple(source.shape), tuple(chunks))
        fill = place.fillvalue if place.fillvalue is not None else fillvalue
        nbytes = int(np.prod(source.shape, dtype=np.int64)) * source.dtype.itemsize
        if nbytes <= INLINE_MAX and self.inline_bytes + nbytes <= INLINE_BUDGET:
            self.inline_bytes += nbytes
            data = source[(slice(None),) * len(source.shape)]
            ds = self.group(posixpath.dirname(place.name)).create_dataset(
                posixpath.basename(place.name), data=data, chunks=place.chunks, fillvalue=fill)
            self.made.add(place.name)
            self._set(ds.attrs, attrs, place, name)
        else:
            empty = np.empty((0,) * len(source.shape), dtype=source.dtype)
            write_dataset(self.f, place.name, empty, chunks=place.chunks, fillvalue=fill)  # makes raw_data if new
            staged = rewrite_dataset(self.f, place.name, source, chunks=place.chunks, fillvalue=fill, max_bytes=SLAB_BYTES)
            streamed = self.streamed[place.name] = Streamed(staged, fill)
            self._set(streamed.attrs, attrs, place, name)
        self.placed[shown] = place.name

    def _set(self, target: Any, attrs: dict[str, Any], place: Place, wanted: str) -> None:
        for key, value in attrs.items():
            target[key] = value
        if place.name != wanted and NAME_ATTR not in attrs:
            target[NAME_ATTR] = posixpath.basename(wanted)
        if NAME_ATTR in attrs or place.name != wanted:
            # Readers find such a dataset only by listing its group: say so there.
            self.group(posixpath.dirname(place.name)).attrs[RENAMED_ATTR] = True

    def put_text(self, name: str, values: list[bytes], shown: str, existing: bool, attrs: dict[str, Any]) -> None:
        try:
            array = np.array([v.decode("utf-8") for v in values], dtype=object)
            dtype = h5py.string_dtype("utf-8")
        except UnicodeDecodeError:
            array, dtype = np.array(values, dtype=object), h5py.string_dtype("ascii")
        if existing and name in self.prev_group:
            ds = self.g[name]
            if ds.ndim != 1:
                if int(np.prod(ds.shape)) != len(values):
                    raise CommitError(f"{shown}: {len(values)} lines cannot fill the {ds.shape} dataset /{name}")
                ds[...] = array.reshape(ds.shape)
            else:
                if ds.shape != array.shape:
                    ds.resize(array.shape)
                if len(array):
                    ds[...] = array
            for key, value in attrs.items():
                ds.attrs[key] = value
            return
        place = self.place(name, dtype, array.shape, (DEFAULT_CHUNK_SIZE,))
        ds = self.group(posixpath.dirname(place.name)).create_dataset(
            posixpath.basename(place.name), data=array, dtype=dtype, chunks=place.chunks)
        self.made.add(place.name)
        self._set(ds.attrs, attrs, place, name)
        self.placed[shown] = place.name

    def set_attrs(self, path: str, data: bytes) -> None:
        directory = posixpath.dirname(path)
        try:
            doc = json.loads(data or b"{}")
            if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
                raise ValueError("expected {name: {attribute: value}}")
            decoded = {name: {k: json_to_attr(v) for k, v in attrs.items()} for name, attrs in doc.items()}
        except (ValueError, TypeError, SyntaxError) as e:
            raise CommitError(f"{path}: {e}") from None
        group_h5 = self.target(directory)[0] if directory else ""
        group = self.g[group_h5] if group_h5 else self.g
        prefix = group_h5 + "/" if group_h5 else ""
        # What the directory holds now: the staged group's datasets and groups, and
        # the datasets streamed into this directory.
        targets: dict[str, Any] = {".": group} | {name: group[name] for name in group}
        targets |= {n[len(prefix):]: s for n, s in self.streamed.items() if n.startswith(prefix) and "/" not in n[len(prefix):]}
        listed = {}
        for shown, attrs in decoded.items():
            if shown == ".":
                listed["."] = attrs
                continue
            shown_path = posixpath.join(directory, shown) if directory else shown
            made = self.placed.get(shown_path)
            if made is not None:
                name = posixpath.basename(made)
            else:
                leaf = posixpath.basename(self.target(shown_path)[0])
                # The dataset a shown file name stands for: itself (raw files) or minus its extension.
                name = next((c for c in (leaf, strip_ext(leaf)) if c in targets and not isinstance(targets[c], h5py.Group)), None)
            if name is None or name not in targets:
                log.warning("%s: no file %r here; its attributes are ignored", path, shown)
                continue
            listed[name] = attrs
        for key, obj in targets.items():
            if key != "." and key not in listed and isinstance(obj, h5py.Group):
                continue  # a subgroup's own .attrs.json says what it has
            wanted = listed.get(key, {})
            attributes = obj.attrs
            for attr in [a for a in attributes.keys() if a not in INTERNAL_ATTRS and a not in wanted]:
                del attributes[attr]
            for attr, value in wanted.items():
                if attr in INTERNAL_ATTRS:  # versionfs's own and the library's: not the user's to set
                    log.warning("%s: attribute %r is reserved; ignored", path, attr, extra=once(("reserved attr", attr)))
                    continue
                attributes[attr] = value


def _relative(ref: Any, version: str) -> str:
    return ref_h5path(ref).split(f"/versions/{version}/", 1)[1]


def _saved_layout(data: bytes) -> NpyLayout | None:
    """The layout of .npy bytes (a rename onto a file of another kind), via a temporary file."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="versionfs-npy-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    layout = npy_layout(path)
    if layout is None:
        os.unlink(path)
    return layout  # the file stays until the process ends: a rare case


def _chunk_count(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    return int(np.prod([-(-s // c) for s, c in zip(shape, chunks)], dtype=np.int64)) if shape else 1


def _raw_chunks(size: int) -> tuple[int, ...]:
    return (max(RAW_CHUNK_MIN, guess_chunk((max(size, 1),), None, 1)[0]),)


def _written_chunk_rows(written: tuple[tuple[int, int], ...], layout: NpyLayout, chunk0: int) -> list[int] | None:
    """First rows of the chunk runs that written byte ranges of the .npy touch;
    None if the header was written (then compare everything)."""
    header, row_bytes, nrows = layout.offset, layout.row_bytes, layout.shape[0]
    if not row_bytes or any(start < header for start, _ in written):
        return None
    runs: set[int] = set()
    for start, stop in written:
        first, last = (start - header) // row_bytes, (stop - 1 - header) // row_bytes
        runs.update(range(first // chunk0 * chunk0, min(last, nrows - 1) + 1, chunk0))
    return sorted(r for r in runs if r < nrows)


def _chunks_of(ds: h5py.Dataset) -> tuple[int, ...]:
    chunks = ds.attrs.get("chunks")
    if chunks is not None:
        return tuple(int(c) for c in chunks)
    return ds.chunks or guess_chunk(ds.shape, None, ds.dtype.itemsize)


def _order(change: Change) -> tuple[int, int, str]:
    # Deletions first (deepest first), then new directories (shallowest first), then files.
    depth = change.path.count("/")
    rank = {"delete": 0, "dir": 1, "file": 2, "link": 2}[change.kind]
    return rank, -depth if rank == 0 else depth, change.path


def _renamed(h5path: str, leaf: str, kind: str | None) -> str:
    """The dataset name for a renamed file: its new shown name minus the extension
    its kind shows (a raw file keeps its whole name)."""
    ext = EXTENSIONS.get(kind or "")
    return h5path[: -len(ext)] if ext and leaf.endswith(ext) else h5path
