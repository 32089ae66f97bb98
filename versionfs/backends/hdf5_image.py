"""One version of a versioned HDF5 file as a self-contained plain HDF5 file.

A version's datasets are virtual datasets whose chunks map, one to one, onto
chunks of a per-dataset ``raw_data`` that has the same chunk shape, dtype and
filters. So the plain file can hold, for each chunk, exactly the stored (still
compressed) bytes of the raw chunk it maps to. The image is built in two parts:

- **metadata**: h5py writes the plain file through a recording file object.
  Every chunk is written with ``write_direct_chunk`` from one shared zero buffer
  of the stored chunk's size; the recorder keeps every other write (superblock,
  object headers, chunk indexes, attributes) in 4 KiB pages, and for a chunk it
  keeps only *where* it landed. That takes time in the number of chunks, not
  bytes, and gives the exact size before any data is read.
- **data**: a read of the image copies pages and, where it meets a chunk,
  reads the raw chunk's bytes straight from the source file (``pread``).

Raw chunks are never moved once written (versioned-hdf5 appends new chunks and
the mount holds the file's lock), so their offsets stay valid while mounted.
Datasets whose mapping is not chunk for chunk (variable-length strings, whose
chunks point into the source's heap; scalars; anything unusual) are written
with their data, which then lives in the pages. Building the same version twice
gives byte-identical images: objects are created in name order and no
timestamps are stored.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..logs import once
from .hdf5_format import LINK_ATTR

log = logging.getLogger(__name__)

PAGE = 4096
BUILDER = 2  # how images are built: a change that alters their bytes must raise it (stored images)


@dataclass(frozen=True)
class Region:
    """Bytes [offset, offset+length) of the image are bytes [source, …) of the source file."""

    offset: int
    length: int
    source: int


class Image:
    """A built image: its size, its metadata pages and its chunk regions."""

    MAGIC = b"VFSIMG2\n"  # the stored form below; a new layout gets a new magic

    def __init__(self, size: int, pages: dict[int, bytearray], regions: list[Region], complete: bool = True):
        self.size = size
        self.pages = pages
        self.regions = sorted(regions, key=lambda r: r.offset)
        self._starts = [r.offset for r in self.regions]
        # False: something was left out because of an error (it may not happen
        # again), so the image is not worth keeping beyond this mount.
        self.complete = complete

    def to_bytes(self) -> bytes:
        """The image as it is kept on disk: magic, SHA-256 of the rest, the length
        of a JSON header, the header, the pages."""
        indexes = sorted(self.pages)
        header = json.dumps({"size": self.size, "pages": indexes,
                             "regions": [[r.offset, r.length, r.source] for r in self.regions]}).encode()
        body = b"".join([len(header).to_bytes(8, "little"), header, *(bytes(self.pages[i]) for i in indexes)])
        return self.MAGIC + hashlib.sha256(body).digest() + body

    @classmethod
    def from_bytes(cls, data: bytes) -> "Image":
        """An image kept by ``to_bytes``; ValueError if it is not one, whole."""
        head = len(cls.MAGIC) + 32
        if not data.startswith(cls.MAGIC) or hashlib.sha256(data[head:]).digest() != data[len(cls.MAGIC) : head]:
            raise ValueError("not a stored image, or a damaged one")
        start = head + 8
        end = start + int.from_bytes(data[head:start], "little")
        header = json.loads(data[start:end])
        if len(data) != end + PAGE * len(header["pages"]):
            raise ValueError("a stored image of the wrong length")
        pages = {index: bytearray(data[end + i * PAGE : end + (i + 1) * PAGE]) for i, index in enumerate(header["pages"])}
        return cls(header["size"], pages, [Region(*r) for r in header["regions"]])

    def read(self, fd: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the image; chunk bytes come from ``fd``."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        _copy_pages(self.pages, out, offset)
        view = memoryview(out)
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while i < len(self.regions) and self.regions[i].offset < end:
            region = self.regions[i]
            lo, hi = max(offset, region.offset), min(end, region.offset + region.length)
            if lo < hi:
                want = hi - lo
                got = os.preadv(fd, [view[lo - offset : hi - offset]], region.source + lo - region.offset)
                if got != want:
                    raise OSError(f"source file is shorter than a chunk it lists (at {region.source})")
            i += 1
        return bytes(out)


def _copy_pages(pages: dict[int, bytearray], out: bytearray | memoryview, offset: int) -> None:
    """Copy what the pages hold of bytes [offset, offset+len(out)) into ``out``
    (bytes no page holds are left as they are: zeros in a fresh buffer)."""
    end = offset + len(out)
    for index in range(offset // PAGE, (end - 1) // PAGE + 1):
        page = pages.get(index)
        if page is not None:
            lo, hi = max(offset, index * PAGE), min(end, (index + 1) * PAGE)
            out[lo - offset : hi - offset] = page[lo - index * PAGE : hi - index * PAGE]


class _Recorder:
    """A file object for h5py's ``fileobj`` driver that keeps metadata writes in
    pages and turns the writes of ``placeholder`` into chunk regions."""

    def __init__(self, placeholder: np.ndarray):
        self.pos = 0
        self.size = 0
        self.pages: dict[int, bytearray] = {}
        self.regions: list[Region] = []
        self._placeholder = placeholder.ctypes.data
        self._expected: tuple[int, int] | None = None  # (length, source offset) of the next chunk write

    def expect_chunk(self, length: int, source: int) -> None:
        self._expected = (length, source)

    def chunk_written(self) -> bool:
        done = self._expected is None
        self._expected = None
        return done

    # -- the file-object interface h5py uses ------------------------------------------
    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        expected = self._expected
        if expected is not None and n == expected[0] and n and np.frombuffer(view, np.uint8).ctypes.data == self._placeholder:
            self.regions.append(Region(self.pos, n, expected[1]))
            self._expected = None
        else:
            self._paint(self.pos, view)
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def _paint(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            index, start = divmod(offset + done, PAGE)
            take = min(PAGE - start, len(view) - done)
            page = self.pages.setdefault(index, bytearray(PAGE))
            page[start : start + take] = view[done : done + take]
            done += take

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        view[:] = bytes(len(view))
        if n:
            _copy_pages(self.pages, view[:n], self.pos)
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self.size - self.pos) if size < 0 else size)
        n = self.readinto(buffer)
        return bytes(buffer[:n])

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        for index in [i for i in self.pages if i * PAGE >= self.size]:
            del self.pages[index]
        return self.size

    def flush(self) -> None:
        pass


class _Builder:
    """One build of one version's image (``build`` below)."""

    def __init__(self, source: h5py.File, group_path: str, internal_attrs: frozenset[str]):
        self.source, self.group_path, self.internal_attrs = source, group_path, internal_attrs
        self.failed = False  # something was left out because of an error
        self._chunk_index: dict[str, dict[tuple[int, ...], tuple[int, int, int]]] = {}
        group = source[group_path]
        # Every dataset's chunk plan first: the shared zero buffer must hold the largest chunk.
        self.plans: dict[str, Any] = {}
        for path, ds in _datasets(group):
            try:
                plan = self._plan(ds)
            except Exception as e:  # noqa: BLE001 - copied with its data instead, or left out
                log.warning("%s: its chunks cannot be mapped (%s); copying its data", path, e)
                plan = None
            if plan is not None:
                self.plans[path] = plan
        largest = max((size for _, chunks in self.plans.values() for *_, size in chunks), default=1)
        self.placeholder = np.zeros(largest, np.uint8)
        self.recorder = _Recorder(self.placeholder)

    def build(self) -> Image:
        with h5py.File(self.recorder, "w", track_order=False) as out:
            self._copy_group(self.source[self.group_path], out)
        recorder = self.recorder
        return Image(recorder.size, recorder.pages, recorder.regions, complete=not self.failed)

    # -- objects ---------------------------------------------------------------------
    def _copy_group(self, src: h5py.Group, dst: h5py.Group) -> None:
        self._copy_attrs(src, dst)
        for name in sorted(src):
            link = src.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                self._skip(f"{src.name}/{name}", "a soft or external link")
                continue
            try:
                obj = src[name]
            except (KeyError, OSError) as e:
                self.failed = True
                self._skip(f"{src.name}/{name}", f"cannot be opened: {e}")
                continue
            if isinstance(obj, h5py.Group):
                gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
                gcpl.set_obj_track_times(False)  # no timestamps: two builds are identical
                child = h5py.Group(h5py.h5g.create(dst.id, name.encode(), gcpl=gcpl))
                self._copy_group(obj, child)
            elif isinstance(obj, h5py.Dataset):
                if LINK_ATTR in obj.attrs:
                    continue  # a stored symlink: a plain HDF5 file has no such thing (README)
                self._copy_or_skip(obj, dst, name, self.plans.get(obj.name))
            else:
                self._skip(obj.name, f"unsupported object {type(obj).__name__}")

    def _copy_or_skip(self, src: h5py.Dataset, dst: h5py.Group, name: str, plan: Any) -> None:
        """Copy a dataset by its chunks' places, else with its data, else leave it
        out: one odd dataset must not cost the whole image."""
        for attempt in ([plan, None] if plan is not None else [None]):
            regions = len(self.recorder.regions)
            try:
                self._copy_dataset(src, dst, name, attempt)
                return
            except Exception as e:  # noqa: BLE001
                # Undo it all: the link, and the chunk places it recorded (their
                # space may be reused by later metadata).
                del self.recorder.regions[regions:]
                if name in dst:
                    del dst[name]
                error = f"{type(e).__name__}: {e}"
        self.failed = True
        self._skip(src.name, f"cannot be copied: {error}")

    def _copy_dataset(self, src: h5py.Dataset, dst: h5py.Group, name: str, plan: Any) -> None:
        if src.dtype.hasobject and h5py.check_string_dtype(src.dtype) is None:
            self._skip(src.name, f"dtype {src.dtype} has no plain form here")
            return
        raw = self.source[plan[0]] if plan is not None else self._raw_of(src)
        dcpl = raw.id.get_create_plist().copy() if raw is not None and src.ndim else h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_obj_track_times(False)
        if src.ndim == 0:
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        type_id = (raw if raw is not None else src).id.get_type()
        # A raw dataset's fill value is the version's (versioned-hdf5 sets both).
        # Numbers only: h5py's set_fill_value garbles fixed-length strings.
        if raw is None and src.dtype.kind in "biufc":
            dcpl.set_fill_value(np.array(src.fillvalue, dtype=src.dtype))
        # Unlimited extents: versioned datasets can always be resized, and a chunk
        # may be larger than a fixed extent allows.
        unlimited = (h5py.h5s.UNLIMITED,) * src.ndim if dcpl.get_layout() == h5py.h5d.CHUNKED else src.shape
        space = h5py.h5s.create_simple(src.shape, unlimited) if src.ndim else h5py.h5s.create(h5py.h5s.SCALAR)
        dsid = h5py.h5d.create(dst.id, name.encode(), type_id, space, dcpl=dcpl)
        out = h5py.Dataset(dsid)
        if plan is not None:
            for chunk_offset, mask, source, size in plan[1]:
                self.recorder.expect_chunk(size, source)
                dsid.write_direct_chunk(chunk_offset, self.placeholder[:size], mask)
                if not self.recorder.chunk_written():
                    raise RuntimeError(f"{src.name}: a chunk write did not reach the file as one write")
        elif src.size:
            out[...] = src[()]
        self._copy_attrs(src, out)

    def _copy_attrs(self, src: h5py.HLObject, dst: h5py.HLObject) -> None:
        for name in sorted(src.attrs):
            if name in self.internal_attrs:
                continue
            attr = src.attrs.get_id(name)
            if h5py.check_ref_dtype(attr.dtype) is not None:
                self._skip(f"{src.name} attribute {name}", "an object reference (it points into the source file)")
                continue
            value = src.attrs[name]
            if isinstance(value, h5py.Empty) or attr.shape is None:
                dst.attrs.create(name, h5py.Empty(attr.dtype))
            else:
                dst.attrs.create(name, value, shape=attr.shape, dtype=attr.dtype)

    # -- chunk plans -------------------------------------------------------------------
    def _plan(self, ds: h5py.Dataset) -> tuple[str, list[tuple[tuple[int, ...], int, int, int]]] | None:
        """(raw dataset, [(chunk offset, filter mask, source byte offset, stored size)])
        when every chunk of ``ds`` is exactly one raw chunk; else None."""
        if not ds.is_virtual or ds.ndim == 0 or ds.dtype.hasobject:
            return None
        mapping = virtual_mapping(ds)
        names = {name for _, name, _, _ in mapping}
        if any(file != "." for file, _, _, _ in mapping) or len(names) > 1:
            return None
        raw_name = names.pop() if names else None
        raw = self.source[raw_name] if raw_name else self._raw_of(ds)
        if raw is None or raw.chunks is None or raw.dtype != ds.dtype or len(raw.chunks) != ds.ndim:
            return None
        chunks, shape = raw.chunks, ds.shape
        index = self._chunks_of(raw)
        plan, seen = [], set()
        for _, _, (v0, v1), (s0, _) in mapping:
            if any(a % c or b % c for a, b, c in zip(v0, s0, chunks)):
                return None
            spans = [-(-(hi - lo + 1) // c) for lo, hi, c in zip(v0, v1, chunks)]
            # versioned-hdf5 maps one chunk at a time: skip the grid walk then.
            starts = [v0] if all(n == 1 for n in spans) else [
                tuple(lo + i * c for lo, i, c in zip(v0, start, chunks)) for start in np.ndindex(*spans)]
            for chunk in starts:
                # The mapped box must be the whole in-bounds part of the chunk.
                stop = tuple(min(c0 + c, hi + 1) for c0, c, hi in zip(chunk, chunks, v1))
                if stop != tuple(min(c0 + c, n) for c0, c, n in zip(chunk, chunks, shape)) or chunk in seen:
                    return None
                seen.add(chunk)
                info = index.get(tuple(s + c0 - v for s, c0, v in zip(s0, chunk, v0)))
                if info is not None:  # an unwritten raw chunk reads as the fill value: leave it out
                    plan.append((chunk, *info))
        plan.sort()
        return raw.name, plan

    def _chunks_of(self, raw: h5py.Dataset) -> dict[tuple[int, ...], tuple[int, int, int]]:
        index = self._chunk_index.get(raw.name)
        if index is None:
            index = {}

            def note(info: Any) -> None:
                index[tuple(info.chunk_offset)] = (info.filter_mask, info.byte_offset, info.size)

            raw.id.chunk_iter(note)
            self._chunk_index[raw.name] = index
        return index

    def _raw_of(self, ds: h5py.Dataset) -> h5py.Dataset | None:
        """The raw dataset behind a versioned dataset (its chunking and filters): the
        one its mapping names, or, for a dataset with no chunks mapped (empty or all
        fill), versioned-hdf5's ``/_version_data/<path>/raw_data``."""
        if not ds.is_virtual:
            return None
        names = {name for file, name, _, _ in virtual_mapping(ds) if file == "."}
        if len(names) > 1:
            return None
        relative = ds.name[len(self.group_path) + 1 :]
        raw = self.source.get(names.pop() if names else f"/_version_data/{relative}/raw_data")
        return raw if isinstance(raw, h5py.Dataset) and raw.chunks is not None else None

    def _skip(self, what: str, why: str) -> None:
        # once per daemon, however often the image is rebuilt
        log.warning("%s is left out of the plain .h5 image: %s", what, why, extra=once(("image-skip", what)))


def virtual_mapping(ds: h5py.Dataset) -> list[tuple[str, str, Any, Any]]:
    """(source file, source dataset, bounds in ``ds``, bounds in the source) of each
    mapping of a virtual dataset; [] for any other. Read straight from the creation
    properties: h5py's ``virtual_sources()`` makes objects per mapping, and there is
    one mapping per chunk."""
    if not ds.is_virtual:
        return []
    plist = ds._dcpl  # h5py's own copy of the creation properties: another costs time in the mappings
    return [
        (plist.get_virtual_filename(i), plist.get_virtual_dsetname(i),
         plist.get_virtual_vspace(i).get_select_bounds(), plist.get_virtual_srcspace(i).get_select_bounds())
        for i in range(plist.get_virtual_count())
    ]


def _datasets(group: h5py.Group) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append((obj.name, obj))

    try:
        group.visititems(visit)
    except (KeyError, OSError):  # a damaged object: the copy says which
        pass
    return found


def build(source: h5py.File, group_path: str, internal_attrs: frozenset[str]) -> Image:
    """The plain-HDF5 image of the group ``group_path`` of ``source`` (blocking)."""
    return _Builder(source, group_path, internal_attrs).build()
