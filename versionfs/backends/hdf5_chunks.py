"""Reading a version's dataset straight from the file's raw chunks.

A version's dataset is a virtual dataset whose chunks map one to one onto
chunks of the dataset's ``raw_data`` (see ``hdf5_image``). Once that mapping is
known (``ChunkIndex``, numpy arrays: 16 bytes a chunk), a byte range of the
``.npy`` needs no h5py at all: an unfiltered chunk is ``pread`` straight into
the output buffer at its stored offset, a compressed one is read raw and
decoded here (zlib and numpy release the GIL, so chunks of one read decode in
parallel on a thread pool), a chunk never written is the fill value.

Only what is certain to give numpy's bytes takes this path: plain numeric
dtypes (bool, integers, floats, complex) whose stored type has the same size,
filters deflate and shuffle, and mappings of whole chunks. Anything else (and a
mapping too long to read quickly, see ``MAX_MAPPINGS``) is read through h5py.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import h5py
import numpy as np

from ..errors import DamagedData
from . import npy
from . import hdf5_raw
from .hdf5_image import h5py_chunk_index, virtual_mapping

FILTER_DEFLATE, FILTER_SHUFFLE = h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE
SUPPORTED_FILTERS = frozenset({FILTER_DEFLATE, FILTER_SHUFFLE})
# h5py gives a virtual dataset's mapping one call per chunk (~50-100 us each):
# past this many, the first read would wait seconds, so h5py reads those.
MAX_MAPPINGS = 20_000


@dataclass(frozen=True)
class ChunkIndex:
    """Where every chunk of one version's dataset is stored. Arrays over the chunk
    grid in C order: file offset (-1: never written, the fill value), stored size,
    filter mask (bit i set: filter i was skipped for that chunk)."""

    name: str  # the dataset, for messages
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill: np.ndarray  # 0-d, of dtype
    filters: tuple[int, ...]  # as applied on writing (reading undoes them last to first)
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    masks: np.ndarray  # uint32

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.sizes.nbytes + self.masks.nbytes


def chunk_index(ds: h5py.Dataset, file: h5py.File) -> ChunkIndex | None:
    """The index of a version's dataset, or None where this module cannot read it
    exactly (h5py then reads it). Blocking, needs h5py: call under the backend's lock."""
    dtype = ds.dtype
    if ds.ndim == 0 or dtype.kind not in "biufc" or dtype.fields is not None:
        return None
    # Each copy of a virtual dataset's creation properties costs time in its number
    # of mappings (seconds at 100k): first a look at how many chunks its raw_data
    # (versioned-hdf5's /_version_data/<path>/raw_data) has, which costs nothing.
    parts = ds.name.split("/", 4)  # "", "_version_data", "versions", <version>, <path>
    if len(parts) == 5 and parts[1:3] == ["_version_data", "versions"]:
        raw = file.get(f"/_version_data/{parts[4]}/raw_data")
        if isinstance(raw, h5py.Dataset) and raw.chunks is not None and raw.id.get_num_chunks() > MAX_MAPPINGS:
            return None
    if not ds.is_virtual or ds._dcpl.get_virtual_count() > MAX_MAPPINGS:  # h5py's own copy, made once
        return None
    mapping = virtual_mapping(ds)
    names = {m.dataset for m in mapping}
    if any(m.file != "." for m in mapping) or len(names) != 1:
        return None
    raw = file[names.pop()]
    if raw.chunks is None or raw.dtype != dtype or len(raw.chunks) != ds.ndim or raw.id.get_type().get_size() != dtype.itemsize:
        return None
    filters = _filters(raw)
    if filters is None:
        return None
    chunks, shape = tuple(raw.chunks), tuple(ds.shape)
    grid = tuple(-(-n // c) for n, c in zip(shape, chunks))
    ncells = math.prod(grid)
    offsets = np.full(ncells, -1, np.int64)
    sizes = np.zeros(ncells, np.int64)
    masks = np.zeros(ncells, np.uint32)
    if mapping and ncells:
        v0 = np.array([m.bounds[0] for m in mapping], np.int64)
        count = np.array([m.bounds[1] for m in mapping], np.int64) + 1 - v0
        s0 = np.array([m.source_bounds[0] for m in mapping], np.int64)
        if not np.array_equal(np.array([m.source_bounds[1] for m in mapping], np.int64) + 1 - s0, count):
            return None  # a box onto one of another extent
        stored = h5py_chunk_index(raw)
        match = hdf5_raw.match_chunks(v0, s0, count, shape, raw.shape, stored)
        if match is None:
            return None
        cells, at = match.cells[match.written], match.at[match.written]
        offsets[cells], sizes[cells], masks[cells] = stored.addresses[at], stored.sizes[at], stored.masks[at]
    fill = np.array(ds.fillvalue, dtype=dtype)
    return ChunkIndex(ds.name, shape, chunks, dtype, fill, filters, offsets, sizes, masks)


def _filters(raw: h5py.Dataset) -> tuple[int, ...] | None:
    plist = raw.id.get_create_plist()
    codes = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
    return codes if all(code in SUPPORTED_FILTERS for code in codes) else None


class ChunkReader:
    """Elements of indexed datasets, read with ``pread`` from ``fd`` and decoded on
    ``pool`` (thread-safe: no state but the pool)."""

    def __init__(self, fd: int, pool: ThreadPoolExecutor):
        self.fd, self.pool = fd, pool

    def read(self, index: ChunkIndex, e0: int, e1: int, out: np.ndarray) -> None:
        """Elements [e0, e1) in C order into ``out`` (a 1-D array of e1 - e0 elements)."""
        if e0 >= e1:
            return
        shape, chunks = index.shape, index.chunks
        if chunks[1:] == shape[1:] or len(shape) == 1:
            self._read_rows(index, e0, e1, out)
            return
        pos = 0
        for box in npy.flat_boxes(shape, e0, e1):
            n = npy.box_size(box)
            self._read_box(index, box, out[pos : pos + n].reshape([s.stop - s.start for s in box]))
            pos += n

    # -- only the first axis chunked (1-D included): each chunk is a run of the flat range --
    def _read_rows(self, index: ChunkIndex, e0: int, e1: int, out: np.ndarray) -> None:
        per_chunk = index.chunks[0] * math.prod(index.shape[1:])
        jobs = []
        for k in range(e0 // per_chunk, (e1 - 1) // per_chunk + 1):
            lo, hi = max(e0, k * per_chunk), min(e1, (k + 1) * per_chunk)
            jobs.append((k, lo - k * per_chunk, out[lo - e0 : hi - e0]))
        self._run(jobs, lambda job: self._fill_run(index, *job))

    def _fill_run(self, index: ChunkIndex, cell: int, skip: int, into: np.ndarray) -> None:
        """Elements [skip, skip + len(into)) of chunk ``cell`` (flat in the chunk)."""
        offset = int(index.offsets[cell])
        if offset < 0:
            into[...] = index.fill
            return
        if not self._filtered(index, cell):
            itemsize = index.dtype.itemsize
            view = memoryview(into.view(np.uint8))
            self._pread_into(view, offset + skip * itemsize, index)
            return
        into[...] = self._decoded(index, cell).reshape(-1)[skip : skip + len(into)]

    # -- the general case: chunk boxes cut out of each hyperslab ----------------------------
    def _read_box(self, index: ChunkIndex, box: Sequence[slice], out: np.ndarray) -> None:
        chunks, grid = index.chunks, index.grid
        first = [s.start // c for s, c in zip(box, chunks)]
        last = [(s.stop - 1) // c for s, c in zip(box, chunks)]
        jobs = []
        for corner in np.ndindex(*[b - a + 1 for a, b in zip(first, last)]):
            coords = [a + i for a, i in zip(first, corner)]
            cell = int(np.ravel_multi_index(coords, grid))
            lo = [max(s.start, k * c) for s, k, c in zip(box, coords, chunks)]
            hi = [min(s.stop, (k + 1) * c) for s, k, c in zip(box, coords, chunks)]
            target = out[tuple(slice(a - s.start, b - s.start) for a, b, s in zip(lo, hi, box))]
            within = tuple(slice(a - k * c, b - k * c) for a, b, k, c in zip(lo, hi, coords, chunks))
            jobs.append((cell, within, target))
        self._run(jobs, lambda job: self._fill_box(index, *job))

    def _fill_box(self, index: ChunkIndex, cell: int, within: tuple[slice, ...], target: np.ndarray) -> None:
        if index.offsets[cell] < 0:
            target[...] = index.fill
        else:
            target[...] = self._decoded(index, cell).reshape(index.chunks)[within]

    # -- chunks ------------------------------------------------------------------------------
    def _run(self, jobs: list, fn) -> None:
        if len(jobs) > 1:
            list(self.pool.map(fn, jobs))
        else:
            for job in jobs:
                fn(job)

    @staticmethod
    def _filtered(index: ChunkIndex, cell: int) -> bool:
        mask = int(index.masks[cell])
        return any(not mask & (1 << i) for i in range(len(index.filters)))

    def _pread_into(self, view: memoryview, offset: int, index: ChunkIndex) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise DamagedData(f"{index.name}: the file ends inside a chunk (at byte {offset + done})")
            done += got

    def _decoded(self, index: ChunkIndex, cell: int) -> np.ndarray:
        """The whole chunk ``cell``, decoded: a flat array of the chunk's elements."""
        offset, size = int(index.offsets[cell]), int(index.sizes[cell])
        data = bytearray(size)
        self._pread_into(memoryview(data), offset, index)
        nbytes = math.prod(index.chunks) * index.dtype.itemsize
        mask = int(index.masks[cell])
        raw: bytes | bytearray | np.ndarray = data
        try:
            for i in reversed(range(len(index.filters))):
                if mask & (1 << i):
                    continue
                if index.filters[i] == FILTER_DEFLATE:
                    raw = zlib.decompress(raw, bufsize=nbytes)
                else:  # FILTER_SHUFFLE: byte k of every element was stored together
                    raw = _unshuffle(raw, index.dtype.itemsize)
        except zlib.error as e:
            raise DamagedData(f"{index.name}: a damaged chunk at byte {offset} ({e})") from None
        if len(raw) != nbytes:
            raise DamagedData(f"{index.name}: a chunk at byte {offset} decodes to {len(raw)} bytes, not {nbytes}")
        return np.frombuffer(raw, dtype=index.dtype)


def _unshuffle(data: bytes | bytearray | np.ndarray, itemsize: int) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8)
    n = len(raw) // itemsize
    if itemsize == 1 or n <= 1:
        return raw
    out = np.empty_like(raw)
    out[: n * itemsize].reshape(n, itemsize)[...] = raw[: n * itemsize].reshape(itemsize, n).T
    out[n * itemsize :] = raw[n * itemsize :]  # what does not fill an element is stored as it is
    return out
