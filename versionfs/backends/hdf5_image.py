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

A dataset without filters takes no HDF5 call per chunk at all: it is made with
fixed dimensions and every chunk allocated at once, which HDF5 stores with its
implicit chunk index (chunk k at the dataset's address plus k chunk sizes, no
index to write or read), and its regions are computed as arrays from the
version's mapping and the raw dataset's chunk index, both read from the
file's bytes (``hdf5_raw``) without opening the virtual dataset. Only
filtered (compressed) datasets are written chunk by chunk. Regions are kept
as arrays: 24 bytes a chunk.

Raw chunks are never moved once written (versioned-hdf5 appends new chunks and
the mount holds the file's lock), so their offsets stay valid while mounted.
Datasets whose mapping is not chunk for chunk (variable-length strings, whose
chunks point into the source's heap; scalars; anything unusual) are written
with their data, which then lives in the pages. Building the same version twice
gives byte-identical images: objects are created in name order and no
timestamps are stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import h5py
import numpy as np

from ..logs import once
from . import hdf5_raw
from .hdf5_format import LINK_ATTR, NAME_ATTR

log = logging.getLogger(__name__)

PAGE = 4096
BUILDER = 3  # how images are built: a change that alters their bytes must raise it (stored images)
FORMAT = ("v110", "v110")  # HDF5 1.10's file format: the implicit chunk index needs it


class RegionColumns(NamedTuple):
    """Regions as three columns (arrays or lists): one planned dataset's chunks,
    or what the recorder saw written (``Regions.of`` sorts them together)."""

    offsets: Any  # in the image
    lengths: Any
    sources: Any  # in the source file; negative: a fill pattern (see Regions)


@dataclass(frozen=True)
class Regions:
    """Bytes [offsets[i], offsets[i] + lengths[i]) of the image are bytes
    [sources[i], …) of the source file; a negative source ``-k - 1`` is fill
    pattern k (a whole chunk's bytes, from the region's start). Sorted by offset."""

    offsets: np.ndarray
    lengths: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def of(cls, parts: list[RegionColumns]) -> "Regions":
        arrays = [np.concatenate([np.asarray(p[i], np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
                  for i in range(len(RegionColumns._fields))]
        order = np.argsort(arrays[0], kind="stable")
        return cls(*(a[order] for a in arrays))


class Image:
    """A built image: its size, its metadata pages, its chunk regions and the fill
    patterns some regions repeat."""

    MAGIC = b"VFSIMG3\n"  # the stored form below; a new layout gets a new magic

    def __init__(self, size: int, pages: dict[int, bytes], regions: Regions, fills: list[bytes] | None = None,
                 complete: bool = True):
        self.size = size
        self.pages = pages
        self.regions = regions
        self.fills = fills or []
        # False: something was left out because of an error (it may not happen
        # again), so the image is not worth keeping beyond this mount.
        self.complete = complete

    @property
    def nbytes(self) -> int:
        """What keeping it costs in memory."""
        return PAGE * len(self.pages) + 24 * len(self.regions) + sum(map(len, self.fills))

    def to_bytes(self) -> bytes:
        """The image as it is kept on disk: magic, SHA-256 of the rest, the length
        of a JSON header, the header, the pages, the region arrays, the fills."""
        indexes = sorted(self.pages)
        header = json.dumps({"size": self.size, "pages": indexes, "regions": len(self.regions),
                             "fills": [len(f) for f in self.fills]}).encode()
        r = self.regions
        body = b"".join([len(header).to_bytes(8, "little"), header, *(bytes(self.pages[i]) for i in indexes),
                         r.offsets.astype("<i8").tobytes(), r.lengths.astype("<i8").tobytes(),
                         r.sources.astype("<i8").tobytes(), *self.fills])
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
        n = header["regions"]
        if len(data) != end + PAGE * len(header["pages"]) + 24 * n + sum(header["fills"]):
            raise ValueError("a stored image of the wrong length")
        pages = {index: data[end + i * PAGE : end + (i + 1) * PAGE] for i, index in enumerate(header["pages"])}
        at = end + PAGE * len(pages)
        arrays = [np.frombuffer(data, "<i8", n, at + 8 * n * i).astype(np.int64) for i in range(3)]
        at += 24 * n
        fills = []
        for length in header["fills"]:
            fills.append(data[at : at + length])
            at += length
        return cls(header["size"], pages, Regions(*arrays), fills)

    def read(self, fd: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the image; chunk bytes come from ``fd``."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        _copy_pages(self.pages, out, offset)
        view = memoryview(out)
        r = self.regions
        i = max(int(np.searchsorted(r.offsets, offset, "right")) - 1, 0)
        while i < len(r) and r.offsets[i] < end:
            start, size, source = int(r.offsets[i]), int(r.lengths[i]), int(r.sources[i])
            lo, hi = max(offset, start), min(end, start + size)
            if lo < hi:
                if source < 0:
                    pattern = self.fills[-source - 1]
                    view[lo - offset : hi - offset] = pattern[lo - start : hi - start]
                else:
                    got = os.preadv(fd, [view[lo - offset : hi - offset]], source + lo - start)
                    if got != hi - lo:
                        raise OSError(f"source file is shorter than a chunk it lists (at {source})")
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

    def __init__(self) -> None:
        self.pos = 0
        self.size = 0
        self.pages: dict[int, bytearray] = {}
        self.regions = RegionColumns([], [], [])  # chunk writes seen (lists, appended to)
        self.placeholder = np.zeros(1, np.uint8)  # chunk writes come from this buffer (made larger as needed)
        self._expected: tuple[int, int] | None = None  # (length, source offset) of the next chunk write

    def chunk_buffer(self, size: int) -> np.ndarray:
        if len(self.placeholder) < size:
            self.placeholder = np.zeros(size, np.uint8)
        return self.placeholder[:size]

    def forget_regions(self, count: int) -> None:
        for column in self.regions:
            del column[count:]

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
        if expected is not None and n == expected[0] and n and np.frombuffer(view, np.uint8).ctypes.data == self.placeholder.ctypes.data:
            for column, value in zip(self.regions, (self.pos, n, expected[1])):
                column.append(value)
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

    def __init__(self, source: h5py.File, group_path: str, internal_attrs: frozenset[str], raw: hdf5_raw.RawReader,
                 chunk_index: Callable[[h5py.Dataset], hdf5_raw.ChunkIndex | None]):
        self.source, self.group_path, self.internal_attrs = source, group_path, internal_attrs
        self.raw, self.chunk_index = raw, chunk_index
        self.failed = False  # something was left out because of an error
        self.recorder = _Recorder()
        self.parts: list[RegionColumns] = []  # regions of datasets with implicit chunk indexes
        self.fills: list[bytes] = []

    def build(self) -> Image:
        with h5py.File(self.recorder, "w", track_order=False, libver=FORMAT) as out:
            self._copy_group(self.source[self.group_path], out)
        recorder = self.recorder
        regions = Regions.of([recorder.regions, *self.parts])
        pages = {i: bytes(p) for i, p in recorder.pages.items()}
        return Image(recorder.size, pages, regions, self.fills, complete=not self.failed)

    # -- objects ---------------------------------------------------------------------
    def _copy_group(self, src: h5py.Group, dst: h5py.Group) -> None:
        self._copy_attrs(src, dst)
        links: list[tuple[str, int, int]] = []
        src.id.links.iterate(lambda n, link: links.append((n.decode("utf-8", "surrogateescape"), link.type, link.u)), info=True)
        names = {name for name, _, _ in links}
        for name, kind, address in sorted(links):
            path = f"{src.name}/{name}"
            if kind != h5py.h5l.TYPE_HARD:
                self._skip(path, "a soft or external link")
                continue
            try:
                info = self.raw.object_info(address)
            except hdf5_raw.ERRORS:
                info = None
            if info is not None and info.attrs is not None and LINK_ATTR in info.attrs:
                continue  # a stored symlink: a plain HDF5 file has no such thing (doc/SEMANTICS.md § Images: X.h5)
            if info is not None and info.kind == "dataset" and \
                    self._copy_planned(path, info, dst, _plain_name(name, self._stored_name(info), names)):
                continue
            try:
                obj = src[name]
            except (KeyError, OSError) as e:
                self.failed = True
                self._skip(path, f"cannot be opened: {e}")
                continue
            if isinstance(obj, h5py.Group):
                gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
                gcpl.set_obj_track_times(False)  # no timestamps: two builds are identical
                child = h5py.Group(h5py.h5g.create(dst.id, name.encode(), gcpl=gcpl))
                self._copy_group(obj, child)
            elif isinstance(obj, h5py.Dataset):
                if LINK_ATTR in obj.attrs:
                    continue  # a stored symlink: a plain HDF5 file has no such thing (doc/SEMANTICS.md § Images: X.h5)
                self._copy_or_skip(obj, dst, _plain_name(name, obj.attrs.get(NAME_ATTR), names))
            else:
                self._skip(obj.name, f"unsupported object {type(obj).__name__}")

    def _stored_name(self, info: hdf5_raw.ObjectInfo) -> Any:
        """NAME_ATTR of a dataset, read from its header (None if it has none)."""
        if info.attrs is None or NAME_ATTR not in info.attrs:
            return None
        try:
            return self.raw.attribute_value(info.attrs[NAME_ATTR])
        except hdf5_raw.ERRORS:
            return None

    def _copy_planned(self, path: str, info: hdf5_raw.ObjectInfo, dst: h5py.Group, name: str) -> bool:
        """Copy a versioned dataset by its chunks' places, read from the file's
        bytes (its virtual dataset is never opened); False where it cannot be."""
        recorded = len(self.recorder.regions.offsets)
        parts, fills = len(self.parts), len(self.fills)
        try:
            plan = self._plan(path, info)
            if plan is None:
                return False
            values = self._attr_values(info)
            if values is None:  # attributes not read directly: h5py copies the whole dataset
                return False
            self._write_planned(plan, dst, name)
            out = h5py.Dataset(h5py.h5d.open(dst.id, name.encode()))
            for attr, (value, shape, dtype) in values.items():
                out.attrs.create(attr, value, shape=shape, dtype=dtype)
            return True
        except Exception as e:  # noqa: BLE001 - then h5py's way, which reports what fails
            log.debug("%s: copied through h5py (%s: %s)", path, type(e).__name__, e)
            self.recorder.forget_regions(recorded)
            del self.parts[parts:], self.fills[fills:]
            if name in dst:
                del dst[name]
            return False

    def _attr_values(self, info: hdf5_raw.ObjectInfo) -> dict[str, tuple[Any, tuple[int, ...], np.dtype]] | None:
        if info.attrs is None:
            return None
        out = {}
        for name in sorted(info.attrs):
            if name in self.internal_attrs:
                continue
            message = info.attrs[name]
            parts = hdf5_raw._attribute_parts(message.body)
            if parts is None:
                return None
            dtype = self.raw.datatype(parts[0]).dtype
            if h5py.check_ref_dtype(dtype) is not None:
                return None
            out[name] = (self.raw.attribute_value(message), hdf5_raw.dataspace_shape(parts[1]), dtype)
        return out

    def _plan(self, path: str, info: hdf5_raw.ObjectInfo) -> "_Plan | None":
        """Each chunk of the version (row-major chunk number) and the raw chunk it
        is exactly, as arrays; None unless every mapped box is whole chunks of one
        raw dataset with the same chunking and dtype."""
        shape, dtype = info.shape, info.dtype
        if info.vds is None or not shape or dtype is None or dtype.hasobject:
            return None
        rank = len(shape)
        mapping = hdf5_raw.decode_mapping(self.raw.mapping_block(info), rank)
        if mapping is None:
            return None
        relative = path[len(self.group_path) + 2 :] if path.startswith("/") else path[len(self.group_path) + 1 :]
        raw = self.source.get(mapping.source or f"/_version_data/{relative}/raw_data")
        if not isinstance(raw, h5py.Dataset) or raw.chunks is None or raw.dtype != dtype or len(raw.chunks) != rank:
            return None
        chunks = np.array(raw.chunks, np.int64)
        v0, s0, count = mapping.vstart, mapping.sstart, mapping.count
        if (v0 % chunks).any() or (s0 % chunks).any():
            return None
        spans = -(-count // chunks)
        if (spans > 1).any():  # a box of several chunks: one row per chunk
            rows = [(v + i * chunks, s + i * chunks, np.minimum(chunks, c - i * chunks))
                    for v, s, c, n in zip(v0, s0, count, spans) for i in map(np.array, np.ndindex(*n))]
            v0, s0, count = (np.array([r[k] for r in rows], np.int64).reshape(-1, rank) for k in range(3))
        index = self.chunk_index(raw)
        match = hdf5_raw.match_chunks(v0, s0, count, tuple(shape), raw.shape, index) if index is not None else None
        if match is None:
            return None
        grid = tuple(int(g) for g in -(-np.array(shape) // chunks))
        by_number = np.argsort(match.cells, kind="stable")
        order = by_number[match.written[by_number]]  # a raw chunk never written reads as the fill value: left out
        pick = match.at[order]
        return _Plan(raw, tuple(shape), grid, match.cells[order], index.addresses[pick], index.sizes[pick],
                     index.masks[pick])

    def _write_planned(self, plan: "_Plan", dst: h5py.Group, name: str) -> None:
        raw = plan.raw
        dcpl = raw.id.get_create_plist().copy()
        dcpl.set_obj_track_times(False)
        type_id = raw.id.get_type()
        shape, chunks = plan.shape, raw.chunks
        nbytes = math.prod(chunks) * raw.dtype.itemsize
        implicit = (dcpl.get_nfilters() == 0 and all(0 < c <= n for c, n in zip(chunks, shape))
                    and bool((plan.sizes == nbytes).all()))
        if implicit:
            # Every chunk allocated at once, never written by HDF5: an implicit index.
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            dsid = h5py.h5d.create(dst.id, name.encode(), type_id, h5py.h5s.create_simple(shape, shape), dcpl=dcpl)
            total = math.prod(plan.grid)
            base = dsid.get_chunk_info(0).byte_offset
            if dsid.get_num_chunks() != total or dsid.get_chunk_info(total - 1).byte_offset != base + (total - 1) * nbytes:
                raise RuntimeError("chunks were not allocated as one run")
            self.parts.append(RegionColumns(base + plan.numbers * nbytes, np.full(len(plan.numbers), nbytes), plan.addresses))
            fill = np.zeros((), raw.dtype)
            fill[()] = raw.fillvalue
            if fill.tobytes().strip(b"\0"):  # unmapped chunks read as a fill value that is not zeros
                missing = np.setdiff1d(np.arange(total), plan.numbers)
                self.fills.append(np.full(math.prod(chunks), raw.fillvalue, raw.dtype).tobytes())
                self.parts.append(RegionColumns(base + missing * nbytes, np.full(len(missing), nbytes),
                                                np.full(len(missing), -len(self.fills))))
            return
        # Filtered chunks differ in size: written one by one from a shared zero buffer.
        space = h5py.h5s.create_simple(shape, (h5py.h5s.UNLIMITED,) * len(shape))
        dsid = h5py.h5d.create(dst.id, name.encode(), type_id, space, dcpl=dcpl)
        recorder = self.recorder
        for number, address, size, mask in zip(plan.numbers.tolist(), plan.addresses.tolist(), plan.sizes.tolist(),
                                               plan.masks.tolist()):
            offset = tuple(int(i) * c for i, c in zip(np.unravel_index(number, plan.grid), chunks))
            buffer = recorder.chunk_buffer(size)
            recorder.expect_chunk(size, address)
            dsid.write_direct_chunk(offset, buffer, mask)
            if not recorder.chunk_written():
                raise RuntimeError(f"{name}: a chunk write did not reach the file as one write")

    def _copy_or_skip(self, src: h5py.Dataset, dst: h5py.Group, name: str) -> None:
        """Copy a dataset with its data (h5py), else leave it out: one odd dataset
        must not cost the whole image."""
        try:
            self._copy_dataset(src, dst, name)
            return
        except Exception as e:  # noqa: BLE001
            if name in dst:
                del dst[name]
            error = f"{type(e).__name__}: {e}"
        self.failed = True
        self._skip(src.name, f"cannot be copied: {error}")

    def _copy_dataset(self, src: h5py.Dataset, dst: h5py.Group, name: str) -> None:
        if src.dtype.hasobject and h5py.check_string_dtype(src.dtype) is None:
            self._skip(src.name, f"dtype {src.dtype} has no plain form here")
            return
        raw = self._raw_of(src)
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
        if src.size:
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

    def _raw_of(self, ds: h5py.Dataset) -> h5py.Dataset | None:
        """The raw dataset behind a versioned dataset (its chunking and filters): the
        one its mapping names, or, for a dataset with no chunks mapped (empty or all
        fill), versioned-hdf5's ``/_version_data/<path>/raw_data``."""
        if not ds.is_virtual:
            return None
        names = {m.dataset for m in virtual_mapping(ds) if m.file == "."}
        if len(names) > 1:
            return None
        relative = ds.name[len(self.group_path) + 2 :]
        raw = self.source.get(names.pop() if names else f"/_version_data/{relative}/raw_data")
        return raw if isinstance(raw, h5py.Dataset) and raw.chunks is not None else None

    def _skip(self, what: str, why: str) -> None:
        # once per daemon, however often the image is rebuilt
        log.warning("%s is left out of the plain .h5 image: %s", what, why, extra=once(("image-skip", what)))


@dataclass(frozen=True)
class _Plan:
    """A dataset's chunks by row-major number, each with the raw chunk it is."""

    raw: h5py.Dataset
    shape: tuple[int, ...]  # the version's
    grid: tuple[int, ...]  # chunks per dimension
    numbers: np.ndarray  # chunk numbers that hold data (the rest read as the fill value)
    addresses: np.ndarray  # where each one's stored bytes are in the source file
    sizes: np.ndarray
    masks: np.ndarray


class VirtualMapping(NamedTuple):
    """One mapping of a virtual dataset (one per chunk of a versioned dataset)."""

    file: str  # the source file ("." is the same file)
    dataset: str  # the source dataset's path
    bounds: Any  # (first, last) corner, inclusive, of the mapped box in the virtual dataset
    source_bounds: Any  # the same in the source dataset


def virtual_mapping(ds: h5py.Dataset) -> list[VirtualMapping]:
    """Each mapping of a virtual dataset; [] for any other. Read straight from the creation
    properties: h5py's ``virtual_sources()`` makes objects per mapping, and there is
    one mapping per chunk."""
    if not ds.is_virtual:
        return []
    plist = ds._dcpl  # h5py's own copy of the creation properties: another costs time in the mappings
    return [
        VirtualMapping(plist.get_virtual_filename(i), plist.get_virtual_dsetname(i),
                       plist.get_virtual_vspace(i).get_select_bounds(), plist.get_virtual_srcspace(i).get_select_bounds())
        for i in range(plist.get_virtual_count())
    ]


def chunk_index_of(raw: hdf5_raw.RawReader, ds: h5py.Dataset) -> hdf5_raw.ChunkIndex | None:
    """A chunked dataset's chunk index: read from its B-tree's bytes where the
    format allows, else asked of HDF5 chunk by chunk (both into arrays)."""
    try:
        # The address from the link: H5Oget_info would walk the whole chunk index to size it.
        info = raw.object_info(ds.file.id.links.get_info(ds.name.encode("utf-8", "surrogateescape")).u)
        index = raw.chunk_index(info) if info is not None else None
    except hdf5_raw.ERRORS:
        index = None
    return index if index is not None else h5py_chunk_index(ds)


def h5py_chunk_index(ds: h5py.Dataset) -> hdf5_raw.ChunkIndex:
    """A chunked dataset's chunk index, asked of HDF5 chunk by chunk."""
    n, rank = ds.id.get_num_chunks(), ds.ndim
    offsets = np.zeros((n, rank), np.int64)
    addresses, sizes, masks = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.uint32)
    count = 0

    def note(info: Any) -> None:
        nonlocal count
        offsets[count], addresses[count], sizes[count], masks[count] = info.chunk_offset, info.byte_offset, info.size, info.filter_mask
        count += 1

    ds.id.chunk_iter(note)
    grid = tuple(-(-n_ // c) for n_, c in zip(ds.shape, ds.chunks))
    order = np.argsort(np.ravel_multi_index(tuple((offsets[:count] // ds.chunks).T), grid), kind="stable") if count and all(grid) else slice(None)
    return hdf5_raw.ChunkIndex(tuple(ds.chunks), offsets[:count][order], addresses[:count][order], sizes[:count][order],
                               masks[:count][order])


def build(source: h5py.File, group_path: str, internal_attrs: frozenset[str], raw: hdf5_raw.RawReader | None = None,
          chunk_index: Callable[[h5py.Dataset], hdf5_raw.ChunkIndex | None] | None = None) -> Image:
    """The plain-HDF5 image of the group ``group_path`` of ``source`` (blocking).
    ``chunk_index`` gives a raw dataset's chunk index (the backend keeps them)."""
    own = raw is None
    raw = raw or hdf5_raw.RawReader(source.filename, source.id)
    try:
        return _Builder(source, group_path, internal_attrs, raw, chunk_index or (lambda ds: chunk_index_of(raw, ds))).build()
    finally:
        if own:
            raw.close()


def _plain_name(name: str, stored: Any, names: set[str]) -> str:
    """The name a dataset has in the plain file: the one it stands for if the writer
    stored it under an internal name (``NAME_ATTR``), unless a sibling has that name."""
    stored = stored.decode("utf-8", "surrogateescape") if isinstance(stored, bytes) else stored
    return stored if isinstance(stored, str) and stored and "/" not in stored and stored not in names else name
