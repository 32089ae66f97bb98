"""Staged changes → one new version of a versioned-HDF5 file.

The commit goes through versioned-hdf5's own ``stage_version`` (so unchanged
datasets are not rewritten and changed ones are chunk-deduplicated by the
library), on an h5py file opened through ``JournaledFile`` (so the commit is
atomic and durable). How staged files map to datasets (README, "Writing"):

- ``<name>.npy`` (valid, fixed-size dtype) is dataset ``<name>``;
- ``<name>.txt`` is a variable-length string dataset ``<name>`` when the text
  form maps back to exactly the same bytes;
- ``.attrs.json`` sets the attributes of its directory and its files;
- anything else (and a new ``.npy`` or ``.txt`` that is not valid) is stored
  losslessly as raw bytes: a uint8 dataset with the file's whole name, marked
  with RAW_ATTR, and shown again as that file.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import posixpath
from typing import Any

import h5py
import numpy as np
from h5py._hl.filters import guess_chunk
from versioned_hdf5 import VersionedHDF5File

from ..errors import CommitError
from ..journal import JournaledFile
from . import npy
from .base import Change, Dir, File, Progress, find
from .hdf5_format import (ATTRS_FILE, EXTENSIONS, FILE_MARKS, FIRST_VERSION, INTERNAL_ATTRS, LINK_ATTR, MESSAGE_ATTR,
                          MODE_ATTR, MTIME_ATTR, RAW_ATTR, VERSION_FILE, json_to_attr, ref_h5path, ref_kind, ref_name,
                          strip_ext)

log = logging.getLogger(__name__)

SLAB_BYTES = 64 << 20
UTC = dt.timezone.utc


def commit(path: str, parent: str | None, changes: list[Change], name: str, message: str | None, parent_tree: Dir,
           progress: Progress | None = None) -> None:
    """Write ``changes`` on top of ``parent`` as version ``name`` (blocking)."""
    jf = JournaledFile(path)
    try:
        with h5py.File(jf, "r+") as f:
            vf = VersionedHDF5File(f)
            prev = parent or FIRST_VERSION
            with vf.stage_version(name, prev_version=prev, timestamp=dt.datetime.now(UTC)) as group:
                writer = _Writer(f, group, prev, parent_tree)
                writer.carry_root_attrs()
                if message:
                    group.attrs[MESSAGE_ATTR] = message
                writer.apply(changes, progress)
        jf.commit()
    except BaseException:
        jf.abort()
        raise


class _Writer:
    def __init__(self, f: h5py.File, group: Any, prev: str, tree: Dir):
        self.f, self.g, self.prev, self.tree = f, group, prev, tree
        self.prev_group = f[f"_version_data/versions/{prev}"]

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

    def carry_root_attrs(self) -> None:
        # versioned-hdf5 copies every object's attributes except the root's.
        for key, value in self.prev_group.attrs.items():
            if key not in INTERNAL_ATTRS:
                self.g.attrs[key] = value

    # -- changes -----------------------------------------------------------------
    def apply(self, changes: list[Change], progress: Progress | None = None) -> None:
        attrs_files = []
        for done, change in enumerate(sorted(changes, key=_order)):
            if progress is not None:
                progress(done, len(changes))
            leaf = posixpath.basename(change.path)
            if change.kind == "delete":
                if leaf != ATTRS_FILE:
                    self.delete(change.path)
                else:
                    attrs_files.append((change, b"{}"))
            elif change.kind == "dir":
                self.g.require_group(self.target(change.path)[0])
            elif leaf == VERSION_FILE and "/" not in change.path:
                continue  # generated; never stored
            elif leaf == ATTRS_FILE:
                attrs_files.append((change, self.content(change)))
            else:
                name = self.put_link(change) if change.kind == "link" else self.put_file(change)
                if name in self.g:
                    self.keep_metadata(self.g[name], change)
        for change, data in attrs_files:
            self.set_attrs(change.path, data)

    def keep_metadata(self, ds: Any, change: Change) -> None:
        """What a version keeps of a staged file besides its bytes (README)."""
        mtime = change.mtime_ns
        if mtime is None and change.local is not None:
            mtime = os.stat(change.local).st_mtime_ns
        if mtime is not None:
            ds.attrs[MTIME_ATTR] = np.int64(mtime)
        if change.mode is not None and change.kind != "link":
            ds.attrs[MODE_ATTR] = np.int64(change.mode)

    def put_link(self, change: Change) -> str:
        """A symbolic link: a uint8 dataset of its target, marked with LINK_ATTR."""
        h5path, entry = self.target(change.path)
        parent_h5 = posixpath.dirname(h5path)
        if isinstance(entry, File) and entry.ref is not None:
            if h5path in self.g:
                del self.g[h5path]  # what was there (e.g. x for x.npy); the link has the whole name
            h5path = posixpath.join(parent_h5, posixpath.basename(change.path))
        if parent_h5:
            self.g.require_group(parent_h5)
        target = np.frombuffer(os.fsencode(change.target or ""), dtype=np.uint8)
        self._create(h5path, target, guess_chunk(target.shape, None, 1), None)
        self.g[h5path].attrs[LINK_ATTR] = True
        return h5path

    def content(self, change: Change) -> bytes:
        if change.local is not None:
            with open(change.local, "rb") as fh:
                return fh.read()
        entry = find(self.tree, change.base_path or change.path)
        assert isinstance(entry, File)
        if entry.content is not None:
            return entry.content
        # A rename onto an existing file: the bytes the parent version shows.
        ds = self.f[ref_h5path(entry.ref)]
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
        if entry is None:
            return
        if h5path in self.g:
            del self.g[h5path]

    def put_file(self, change: Change) -> str:
        """Store one staged file; returns the dataset it went to."""
        h5path, entry = self.target(change.path)
        leaf = posixpath.basename(change.path)
        parent_h5 = posixpath.dirname(h5path)
        if parent_h5:
            self.g.require_group(parent_h5)
        kind = ref_kind(entry.ref) if isinstance(entry, File) and entry.ref is not None else None
        if kind is None and change.base_path is not None:
            source = find(self.tree, change.base_path)
            if isinstance(source, File) and source.ref is not None and source.content is None:
                # A rename: copy the dataset as it is (same dtype, chunks, attributes).
                dest = _renamed(h5path, leaf, ref_kind(source.ref))
                self.copy_dataset(ref_h5path(source.ref), dest)
                return dest
        if kind == "npy" or (kind is None and leaf.endswith(".npy")):
            array = _load_npy(change.local) if change.local is not None else _parse_npy(self.content(change))
            if array is not None:
                name = h5path if kind else h5path[: -len(".npy")]
                self.put_array(name, array, change.path, exists=kind is not None, written=change.written)
                return name
            if kind:
                raise CommitError(f"{change.path}: not a valid .npy file (it replaces dataset /{h5path})")
        data = self.content(change)
        if kind == "text" or (kind is None and leaf.endswith(".txt")):
            values = npy.text_values(data)
            if npy.text_bytes(values) == data:
                name = h5path if kind else h5path[: -len(".txt")]
                self.put_text(name, values, change.path, exists=kind is not None)
                return name
            if kind:
                raise CommitError(f"{change.path}: this text does not map back to the same bytes (see README, text form)")
        self.put_raw(h5path, data, exists=kind == "raw")
        return h5path

    def copy_dataset(self, source: str, dest: str) -> None:
        src = self.prev_group[source.split(f"/versions/{self.prev}/", 1)[1]]
        self._create(dest, src[()], _chunks_of(src), src.fillvalue)
        for key, value in src.attrs.items():
            if key not in INTERNAL_ATTRS or key in FILE_MARKS:
                self.g[dest].attrs[key] = value

    def put_array(self, name: str, array: np.ndarray, shown: str, exists: bool,
                  written: tuple[tuple[int, int], ...] | None = None) -> None:
        if not exists or name not in self.g:
            return self._create(name, array, guess_chunk(array.shape, None, array.dtype.itemsize) if array.ndim else None, None)
        ds = self.g[name]
        if ds.dtype != array.dtype:
            raise CommitError(f"{shown}: dtype {array.dtype} cannot replace {ds.dtype} of dataset /{name} (remove the file and commit, then add it back)")
        if ds.ndim != array.ndim:
            raise CommitError(f"{shown}: a {array.ndim}-D array cannot replace the {ds.ndim}-D dataset /{name}")
        if ds.shape != array.shape:
            ds.resize(array.shape)
        if array.ndim == 0:
            ds[()] = array[()]
            return
        # Compare with the parent version a slab at a time and write only the chunk
        # rows that differ (bytes decide: NaN and -0.0 count as they are stored):
        # the library then hashes and stores just those chunks.
        chunk0 = int(ds.attrs["chunks"][0]) if "chunks" in ds.attrs else 1
        row_bytes = max(1, array.nbytes // max(1, array.shape[0]))
        step = max(chunk0, (SLAB_BYTES // row_bytes) // chunk0 * chunk0)
        old = self.prev_group.get(name)
        comparable = isinstance(old, h5py.Dataset) and old.dtype == array.dtype and old.shape[1:] == array.shape[1:]
        rows = _written_chunk_rows(written, array, chunk0) if comparable and old.shape == array.shape else None
        if rows is not None:
            # An in-place edit: only the chunk rows it wrote can differ.
            for row in rows:
                stop = min(row + chunk0, array.shape[0])
                new = np.ascontiguousarray(array[row:stop])
                if _differing_chunk_rows(np.ascontiguousarray(old[row:stop]), new, chunk0):
                    ds[row:stop] = new
            return
        for start in range(0, array.shape[0], step):
            new = np.ascontiguousarray(array[start : start + step])
            stop = start + len(new)
            if not comparable or stop > old.shape[0] or not new.size:
                ds[start:stop] = new
                continue
            before = np.ascontiguousarray(old[start:stop])
            for row in _differing_chunk_rows(before, new, chunk0):
                ds[start + row : start + min(row + chunk0, len(new))] = new[row : row + chunk0]

    def put_text(self, name: str, values: list[bytes], shown: str, exists: bool) -> None:
        try:
            array = np.array([v.decode("utf-8") for v in values], dtype=object)
            dtype = h5py.string_dtype("utf-8")
        except UnicodeDecodeError:
            array, dtype = np.array(values, dtype=object), h5py.string_dtype("ascii")
        if exists and name in self.g:
            ds = self.g[name]
            if ds.ndim != 1:
                if int(np.prod(ds.shape)) != len(values):
                    raise CommitError(f"{shown}: {len(values)} lines cannot fill the {ds.shape} dataset /{name}")
                ds[...] = array.reshape(ds.shape)
                return
            if ds.shape != array.shape:
                ds.resize(array.shape)
            if len(array):
                ds[...] = array
            return
        self.g.create_dataset(name, data=array, dtype=dtype)

    def put_raw(self, name: str, data: bytes, exists: bool) -> None:
        array = np.frombuffer(data, dtype=np.uint8)
        if exists and name in self.g:
            del self.g[name]
        self._create(name, array, guess_chunk(array.shape, None, 1), None)
        self.g[name].attrs[RAW_ATTR] = True

    def _create(self, name: str, array: np.ndarray, chunks: Any, fillvalue: Any) -> None:
        if name in self.g:
            del self.g[name]
        kwargs: dict[str, Any] = {"data": array}
        if chunks is not None:
            kwargs["chunks"] = tuple(chunks)
        if fillvalue is not None:
            kwargs["fillvalue"] = fillvalue
        self.g.create_dataset(name, **kwargs)

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
        listed = {}
        for shown, attrs in decoded.items():
            if shown == ".":
                listed["."] = attrs
                continue
            h5path, _ = self.target(posixpath.join(directory, shown) if directory else shown)
            leaf = posixpath.basename(h5path)
            # The dataset a shown file name stands for: itself (raw files) or minus its extension.
            name = next((c for c in (leaf, strip_ext(leaf)) if c in group and not isinstance(group[c], h5py.Group)), None)
            if name is None:
                log.warning("%s: no file %r here; its attributes are ignored", path, shown)
                continue
            listed[name] = attrs
        targets = {".": group} | {name: group[name] for name in group}
        for key, obj in targets.items():
            if key != "." and key not in listed and isinstance(obj, h5py.Group):
                continue  # a subgroup's own .attrs.json says what it has
            wanted = listed.get(key, {})
            for attr in [a for a in obj.attrs.keys() if a not in INTERNAL_ATTRS and a not in wanted]:
                del obj.attrs[attr]
            for attr, value in wanted.items():
                obj.attrs[attr] = value


def _load_npy(path: str) -> np.ndarray | None:
    """The array of a local .npy file, memory-mapped (large files are not read
    into memory); None if it is not one versionfs can store."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # an empty array cannot be mapped
        with open(path, "rb") as f:
            return _parse_npy(f.read())
    except Exception:  # noqa: BLE001 - any parse failure means "not .npy"
        return None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject or array.dtype.names is None and array.dtype.kind == "V":
        return None
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _parse_npy(data: bytes) -> np.ndarray | None:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not .npy"
        return None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        return None
    return np.ascontiguousarray(array)


def _written_chunk_rows(written: tuple[tuple[int, int], ...] | None, array: np.ndarray, chunk0: int) -> list[int] | None:
    """First rows of the chunk runs that written byte ranges of the .npy touch;
    None if unknown or if the header was written (then compare everything)."""
    if written is None or not isinstance(array, np.memmap):
        return None
    header = array.offset
    row_bytes = array.nbytes // array.shape[0] if array.shape[0] else 0
    if not row_bytes or any(start < header for start, _ in written):
        return None
    runs: set[int] = set()
    for start, stop in written:
        first, last = (start - header) // row_bytes, (stop - 1 - header) // row_bytes
        runs.update(range(first // chunk0 * chunk0, min(last, array.shape[0] - 1) + 1, chunk0))
    return sorted(r for r in runs if r < array.shape[0])


def _differing_chunk_rows(before: np.ndarray, after: np.ndarray, chunk0: int) -> list[int]:
    """First rows of the runs of ``chunk0`` rows whose bytes differ (bytes decide:
    NaN and -0.0 count as stored). One long row per chunk run keeps numpy fast."""
    a, b = before.view(np.uint8).reshape(-1), after.view(np.uint8).reshape(-1)
    block = chunk0 * (a.size // len(after))
    full = a.size // block
    rows = np.flatnonzero((a[: full * block].reshape(full, block) != b[: full * block].reshape(full, block)).any(axis=1))
    out = [int(r) * chunk0 for r in rows]
    if full * block < a.size and (a[full * block :] != b[full * block :]).any():
        out.append(full * chunk0)
    return out


def _chunks_of(ds: h5py.Dataset) -> tuple[int, ...] | None:
    chunks = ds.attrs.get("chunks")
    return tuple(int(c) for c in chunks) if chunks is not None else ds.chunks


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
