"""What HDF5 keeps about an object, read straight from the file's bytes.

Opening a versioned dataset through HDF5 decodes its whole virtual mapping (one
entry per chunk) into selections, and asking for its creation properties copies
them all again: about 20 µs and several KiB per chunk, every time. A version's
listing, a file's history and an image's plan need far less: the shape, the
dtype, the attribute names and a few small values, and the mapping as compact
arrays. This module reads those from the object header (format versions 1 and
2, with continuation blocks), the global heap and the virtual dataset's heap
block, following the HDF5 file format specification (version 3.0).

Anything it does not know (shared messages, dense attribute storage, unusual
selections, a layout it has not seen) makes it answer None, and callers then ask
HDF5 through h5py: this is a fast path, never the only one.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import h5py
import numpy as np

from ..cache import Lru

# Message types (format spec IV.A.2).
DATASPACE, DATATYPE, FILL_VALUE, LAYOUT, CONTINUATION, ATTRIBUTE, ATTRIBUTE_INFO = 0x1, 0x3, 0x5, 0x8, 0x10, 0xC, 0x15
SHARED = 0x02  # message flag: the message lives elsewhere
UNDEFINED = (1 << 64) - 1
HEAP_CACHE_BYTES = 4 << 20  # small collections (attribute strings); a mapping's block is read each time
# What reading a file this module does not understand can raise: callers then ask h5py.
ERRORS = (ValueError, struct.error, OSError, OverflowError, IndexError, KeyError, TypeError)
HEADER_READ = 4096  # first read of an object header; most fit


class Message(NamedTuple):
    type: int
    flags: int
    body: bytes


@dataclass(frozen=True)
class Mapping:
    """A virtual dataset's mapping when every entry maps one block of it to one
    block of the same source dataset in the same file: entry i maps the box
    [vstart[i], vstart[i] + count[i]) onto [sstart[i], …) of ``source``."""

    source: str
    vstart: np.ndarray  # (n, rank) int64
    sstart: np.ndarray
    count: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.vstart.nbytes + self.sstart.nbytes + self.count.nbytes


@dataclass(frozen=True)
class ChunkIndex:
    """Where a chunked dataset's chunks are stored, as arrays in chunk order
    (row-major over the chunk grid): chunk i starts at element ``offsets[i]``,
    is stored at byte ``addresses[i]`` of the file, ``sizes[i]`` bytes long, with
    filter mask ``masks[i]``. About 8 * (rank + 3) bytes a chunk."""

    chunks: tuple[int, ...]
    offsets: np.ndarray  # (n, rank) int64
    addresses: np.ndarray  # int64
    sizes: np.ndarray  # int64
    masks: np.ndarray  # uint32

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.addresses.nbytes + self.sizes.nbytes + self.masks.nbytes


class ChunkMatch(NamedTuple):
    """Which raw chunk each mapping of a version's dataset is (``match_chunks``)."""

    cells: np.ndarray  # the chunk of the version's dataset (row-major number) each mapping fills
    at: np.ndarray  # where the raw chunk it maps is in the raw ``ChunkIndex``
    written: np.ndarray  # whether that raw chunk was ever written (else it reads as the fill value)


def match_chunks(vstart: np.ndarray, sstart: np.ndarray, count: np.ndarray, shape: tuple[int, ...],
                 raw_shape: tuple[int, ...], raw: ChunkIndex) -> ChunkMatch | None:
    """Where every mapping (boxes at ``vstart`` in the version's dataset and at
    ``sstart`` in the raw one, ``count`` elements each way; (n, rank) arrays) is one
    whole chunk, its in-bounds part, onto one raw chunk, each chunk once: which
    raw chunk each one is. None where they are not (then h5py reads it)."""
    c = np.array(raw.chunks, np.int64)
    if (vstart % c).any() or (sstart % c).any() or not np.array_equal(vstart + count, np.minimum(vstart + c, np.array(shape, np.int64))):
        return None
    grid = tuple(-(-n // k) for n, k in zip(shape, raw.chunks))
    cells = np.ravel_multi_index(tuple((vstart // c).T), grid) if len(vstart) else np.zeros(0, np.int64)
    if len(np.unique(cells)) != len(cells):  # a chunk mapped twice
        return None
    raw_grid = tuple(-(-n // k) for n, k in zip(raw_shape, raw.chunks))
    have = np.ravel_multi_index(tuple((raw.offsets // c).T), raw_grid) if len(raw.offsets) else np.zeros(0, np.int64)
    want = np.ravel_multi_index(tuple((sstart // c).T), raw_grid) if len(sstart) else np.zeros(0, np.int64)
    at = np.minimum(np.searchsorted(have, want), max(len(have) - 1, 0))
    written = (have[at] == want) if len(have) else np.zeros(len(want), bool)
    return ChunkMatch(cells, at, written)


@dataclass(frozen=True)
class ObjectInfo:
    """What an object header says (None where it does not say, or not simply)."""

    kind: str  # "dataset", "group" or "other"
    shape: tuple[int, ...] | None
    dtype: np.dtype | None
    fill: bytes  # the fill value message as stored ('' if none)
    layout: bytes  # the layout message as stored
    dtype_raw: bytes
    space_raw: bytes
    vds: tuple[int, int] | None  # a virtual dataset's heap block: (collection address, object index)
    attrs: dict[str, Message] | None  # attribute name -> its message; None: stored densely (ask h5py)


class _HeapCollection(NamedTuple):
    size: int
    objects: dict[int, memoryview]


class RawReader:
    """Reads object headers and heaps of one open HDF5 file (blocking)."""

    def __init__(self, path: str, fid: h5py.h5f.FileID):
        self._fd = os.open(path, os.O_RDONLY)
        fcpl = fid.get_create_plist()
        self.sizeof_addr, self.sizeof_size = fcpl.get_sizes()
        self.base = fcpl.get_userblock()  # addresses count from the superblock
        if (self.sizeof_addr, self.sizeof_size) != (8, 8):
            raise ValueError("only files with 8-byte addresses and lengths are read directly")
        self._heaps: Lru[_HeapCollection] = Lru(HEAP_CACHE_BYTES, weight=lambda heap: heap.size)
        self._types: dict[bytes, Any] = {}  # datatype message -> decoded type (few distinct ones)
        self._lock = threading.Lock()  # the caches: metadata calls and reads use one reader

    def close(self) -> None:
        os.close(self._fd)

    def datatype(self, message: bytes) -> Any:
        """The HDF5 type a datatype message describes (H5Tdecode reads the same
        encoding behind a two-byte prefix)."""
        with self._lock:
            tid = self._types.get(message)
        if tid is None:
            tid = h5py.h5t.decode(b"\x03\x00" + message)
            with self._lock:
                if len(self._types) > 256:
                    self._types.clear()
                self._types[message] = tid
        return tid

    def _read(self, addr: int, length: int) -> bytes:
        data = os.pread(self._fd, length, self.base + addr)
        if len(data) != length:
            raise ValueError(f"the file ends inside an object at {addr}")
        return data

    # -- object headers ----------------------------------------------------------------
    def messages(self, addr: int) -> list[Message] | None:
        """Every message of the object header at ``addr`` (continuations followed)."""
        head = os.pread(self._fd, HEADER_READ, self.base + addr)
        if head[:4] == b"OHDR":
            return self._messages_v2(addr, head)
        if head[:1] == b"\x01":
            return self._messages_v1(addr, head)
        return None

    def _messages_v1(self, addr: int, head: bytes) -> list[Message] | None:
        _, _, count, _, size = struct.unpack_from("<BBHII", head)
        out: list[Message] = []
        blocks = [(addr + 16, size, head[16 : 16 + size] if 16 + size <= len(head) else None)]
        while blocks:
            start, length, data = blocks.pop(0)
            data = data if data is not None else self._read(start, length)
            pos = 0
            while pos + 8 <= length:
                mtype, msize, mflags = struct.unpack_from("<HHB", data, pos)
                body = data[pos + 8 : pos + 8 + msize]
                if mtype == CONTINUATION:
                    blocks.append((*struct.unpack_from("<QQ", body), None))
                elif mtype:
                    out.append(Message(mtype, mflags, body))
                pos += 8 + msize
        return out

    def _messages_v2(self, addr: int, head: bytes) -> list[Message] | None:
        if head[4] != 2:
            return None
        flags = head[5]
        pos = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 0x03)
        size = int.from_bytes(head[pos : pos + width], "little")
        pos += width
        order = 2 if flags & 0x04 else 0
        chunks = [(head if pos + size <= len(head) else self._read(addr, pos + size), pos, pos + size)]
        out: list[Message] = []
        while chunks:
            data, pos, end = chunks.pop(0)
            while pos + 4 + order <= end:
                mtype, msize, mflags = struct.unpack_from("<BHB", data, pos)
                body_at = pos + 4 + order
                body = data[body_at : body_at + msize]
                if mtype == CONTINUATION:
                    where, length = struct.unpack_from("<QQ", body)
                    block = self._read(where, length)
                    if block[:4] != b"OCHK":
                        return None
                    chunks.append((block, 4, length - 4))  # the last 4 bytes are a checksum
                elif mtype:
                    out.append(Message(mtype, mflags, body))
                pos = body_at + msize
        return out

    def object_info(self, addr: int) -> ObjectInfo | None:
        messages = self.messages(addr)
        if messages is None:
            return None
        by_type: dict[int, Message] = {}
        attrs: dict[str, Message] | None = {}
        for m in messages:
            if m.type == ATTRIBUTE:
                name = attribute_name(m.body)
                if name is None or attrs is None:
                    attrs = None
                else:
                    attrs[name] = m
            elif m.type == ATTRIBUTE_INFO and _dense_attributes(m.body) and attrs is not None:
                attrs = None
            else:
                by_type.setdefault(m.type, m)
        if DATATYPE not in by_type or DATASPACE not in by_type:
            kind = "group" if any(t in by_type for t in (0x11, 0x02, 0x06, 0x0A)) else "other"
            return ObjectInfo(kind, None, None, b"", b"", b"", b"", None, attrs)
        dtype_msg, space_msg = by_type[DATATYPE], by_type[DATASPACE]
        shape = None if space_msg.flags & SHARED else dataspace_shape(space_msg.body)
        dtype = None
        if not dtype_msg.flags & SHARED:
            try:
                dtype = self.datatype(dtype_msg.body).dtype
            except (ValueError, TypeError, OSError):
                dtype = None
        layout = by_type.get(LAYOUT)
        vds = None
        if layout is not None and layout.body[:2] == b"\x04\x03":
            vds = struct.unpack_from("<QI", layout.body, 2)
        fill = by_type.get(FILL_VALUE)
        return ObjectInfo("dataset", shape, dtype, fill.body if fill else b"", layout.body if layout else b"",
                          dtype_msg.body, space_msg.body, vds, attrs)

    # -- heaps -------------------------------------------------------------------------
    def heap_object(self, collection: int, index: int) -> bytes:
        """One object of a global heap collection (collections are cached, indexed)."""
        with self._lock:
            objects = self._heaps.get(collection)
        if objects is None:
            head = self._read(collection, 16)
            if head[:4] != b"GCOL":
                raise ValueError(f"no global heap collection at {collection}")
            data = memoryview(self._read(collection, struct.unpack_from("<Q", head, 8)[0]))
            objects = _HeapCollection(len(data), {})
            pos = 16
            while pos + 16 <= len(data):
                found, _, _, size = struct.unpack_from("<HHIQ", data, pos)
                if found == 0:
                    break
                objects.objects[found] = data[pos + 16 : pos + 16 + size]
                pos += 16 + ((size + 7) & ~7)
            with self._lock:
                self._heaps.put(collection, objects)
        found = objects.objects.get(index)
        if found is None:
            raise ValueError(f"no object {index} in the global heap collection at {collection}")
        return bytes(found)

    def mapping_block(self, info: ObjectInfo) -> bytes | None:
        """A virtual dataset's encoded mapping (the bytes of its heap block)."""
        if info.vds is None:
            return None
        if info.vds[0] == UNDEFINED:  # no mappings at all (every element is the fill value)
            return b""
        collection, index = info.vds
        head = self._read(collection, 16)
        if head[:4] != b"GCOL":
            raise ValueError(f"no global heap collection at {collection}")
        size = struct.unpack_from("<Q", head, 8)[0]
        if size <= 4096:
            return self.heap_object(collection, index)
        # A block of its own (versioned-hdf5 writes one per dataset and version):
        # read once, never cached.
        data = memoryview(self._read(collection, size))
        pos = 16
        while pos + 16 <= len(data):
            found, _, _, length = struct.unpack_from("<HHIQ", data, pos)
            if found == index:
                return bytes(data[pos + 16 : pos + 16 + length])
            if found == 0:
                break
            pos += 16 + ((length + 7) & ~7)
        raise ValueError(f"no object {index} in the global heap collection at {collection}")

    def chunk_index(self, info: ObjectInfo) -> ChunkIndex | None:
        """The chunk index of a dataset stored in a version 1 B-tree (what files
        of the earliest format, as versioned-hdf5 writes them, use); None for any
        other index. One read per B-tree node, decoded a node at a time."""
        layout = info.layout
        if info.shape is None or len(layout) < 4 or layout[:2] != b"\x03\x02":
            return None
        dims = layout[2]
        rank = dims - 1
        address = struct.unpack_from("<Q", layout, 3)[0]
        chunks = struct.unpack_from(f"<{rank}I", layout, 11)
        if rank != len(info.shape):
            return None
        record = np.dtype([("size", "<u4"), ("mask", "<u4"), ("offsets", "<u8", (dims,)), ("child", "<u8")])
        leaves: list[bytes] = []
        pending = [] if address == UNDEFINED else [address]
        while pending:
            node = pending.pop()
            head = self._read(node, 24)
            if head[:4] != b"TREE" or head[4] != 1:
                return None
            level, used = head[5], struct.unpack_from("<H", head, 6)[0]
            body = self._read(node + 24, used * record.itemsize)
            if level:
                pending += [int(c) for c in np.frombuffer(body, record, used)["child"][::-1]]
            else:
                leaves.append(body)
        entries = np.frombuffer(b"".join(leaves), record)
        offsets = entries["offsets"][:, :rank].astype(np.int64)
        grid = [-(-n // c) for n, c in zip(info.shape, chunks)] if all(info.shape) else [0] * rank
        if len(entries) and grid and all(grid):
            order = np.argsort(np.ravel_multi_index(tuple((offsets // chunks).T), grid, mode="clip"), kind="stable")
            entries, offsets = entries[order], offsets[order]
        return ChunkIndex(tuple(chunks), offsets, entries["child"].astype(np.int64), entries["size"].astype(np.int64),
                          entries["mask"].copy())

    # -- attributes ------------------------------------------------------------------------
    def attribute_value(self, message: Message) -> Any:
        """An attribute's value as h5py gives it, for numbers, fixed strings and
        variable-length strings; raises ValueError for anything else."""
        parsed = _attribute_parts(message.body)
        if parsed is None or message.flags & SHARED:
            raise ValueError("an attribute stored in a way not read directly")
        dtype_raw, space_raw, data = parsed
        shape = dataspace_shape(space_raw)
        if shape is None:
            raise ValueError("an empty or unusual attribute dataspace")
        tid = self.datatype(dtype_raw)
        count = math.prod(shape)
        if isinstance(tid, h5py.h5t.TypeStringID) and tid.is_variable_str():
            values = []
            for i in range(count):
                length, collection, index = struct.unpack_from("<IQI", data, 16 * i)
                raw = self.heap_object(collection, index)[:length] if length else b""
                values.append(raw.decode("utf-8", "surrogateescape"))
            if not shape:
                return values[0]
            return np.array(values, dtype=object).reshape(shape)
        dtype = tid.dtype
        if dtype.hasobject or dtype.itemsize * count > len(data):
            raise ValueError("an attribute of a dtype not read directly")
        array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape).copy()
        return array[()] if not shape else array


def attribute_name(body: bytes) -> str | None:
    version = body[0]
    if version not in (1, 2, 3):
        return None
    name_size = struct.unpack_from("<H", body, 2)[0]
    start = 8 if version < 3 else 9
    return body[start : start + name_size].rstrip(b"\0").decode("utf-8", "surrogateescape")


def _attribute_parts(body: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(datatype, dataspace, data) of an attribute message."""
    version, flags = body[0], body[1]
    name_size, type_size, space_size = struct.unpack_from("<HHH", body, 2)
    if version == 1:
        pad = lambda n: (n + 7) & ~7  # noqa: E731
        pos = 8 + pad(name_size)
        dtype_raw = body[pos : pos + type_size]
        pos += pad(type_size)
        space_raw = body[pos : pos + space_size]
        pos += pad(space_size)
    elif version in (2, 3):
        if flags & 0x03:  # a shared datatype or dataspace
            return None
        pos = (8 if version == 2 else 9) + name_size
        dtype_raw = body[pos : pos + type_size]
        pos += type_size
        space_raw = body[pos : pos + space_size]
        pos += space_size
    else:
        return None
    return dtype_raw, space_raw, body[pos:]


def _dense_attributes(body: bytes) -> bool:
    """Whether an attribute info message says attributes are in a fractal heap."""
    flags = body[1]
    pos = 2 + (2 if flags & 0x01 else 0)
    return struct.unpack_from("<Q", body, pos)[0] != UNDEFINED


def fill_value(body: bytes) -> bytes | None:
    """The fill value a fill value message stores (None: the library's default)."""
    if not body:
        return None
    version = body[0]
    if version in (1, 2):
        defined = body[3]
        if version == 2 and not defined:
            return None
        size = struct.unpack_from("<I", body, 4)[0]
        return body[8 : 8 + size] if size else None
    if version == 3:
        flags = body[1]
        if not flags & 0x20:
            return None
        size = struct.unpack_from("<I", body, 2)[0]
        return body[6 : 6 + size]
    raise ValueError(f"fill value message version {version}")


def dataspace_shape(body: bytes) -> tuple[int, ...] | None:
    """The current dimensions of a dataspace message; None for a null dataspace."""
    version, rank = body[0], body[1]
    if version == 1:
        pos = 8
    elif version == 2:
        if body[3] == 2:  # null
            return None
        pos = 4
    else:
        return None
    return struct.unpack_from(f"<{rank}Q", body, pos) if rank else ()


# -- a virtual dataset's mapping ---------------------------------------------------------------
def decode_mapping(block: bytes, rank: int) -> Mapping | None:
    """The mapping encoded in a virtual dataset's heap block (version 0: entries of
    source file, source dataset, source selection, virtual selection) when it is
    one block to one block of one dataset in this file; else None. Entries that
    are laid out alike (versioned-hdf5 writes them so) are decoded together."""
    if rank < 1:
        return None
    count = struct.unpack_from("<Q", block, 1)[0] if block else 0
    if block and block[0] != 0:
        return None
    if count == 0:
        return Mapping("", *(np.zeros((0, rank), np.int64) for _ in range(3)))
    first = _entry(block, 9, rank)
    if first is None:
        return None
    source, length = first[0], first[4]
    body = np.frombuffer(block, np.uint8, count * length, 9) if 9 + count * length + 4 == len(block) else None
    if body is not None:
        rows = body.reshape(count, length)
        fixed = np.ones(length, bool)
        for at, width in first[5]:
            fixed[at : at + width] = False
        if (rows[:, fixed] == rows[0, fixed]).all():
            return _coordinates(rows, first[5], rank, source)
        return None
    # Entries of different lengths: one at a time.
    starts, pos = [], 9
    for _ in range(count):
        entry = _entry(block, pos, rank)
        if entry is None or entry[0] != source:
            return None
        starts.append(entry[1:4])
        pos += entry[4]
    vstart, sstart, count_ = (np.array([s[i] for s in starts], np.int64).reshape(-1, rank) for i in range(3))
    return Mapping(source, vstart, sstart, count_)


def _entry(block: bytes, pos: int, rank: int) -> tuple[str, tuple, tuple, tuple, int, list[tuple[int, int]]] | None:
    """(source dataset, virtual start, source start, count, entry length, the
    (offset, width) of each coordinate within it) of one mapping entry."""
    start = pos
    end = block.index(b"\0", pos)
    if block[pos:end] != b".":
        return None  # a source in another file
    pos = end + 1
    end = block.index(b"\0", pos)
    source = block[pos:end].decode("utf-8", "surrogateescape")
    pos = end + 1
    fields: list[tuple[int, int]] = []
    boxes = []
    for _ in range(2):  # the source selection, then the virtual one
        parsed = _block_selection(block, pos, rank)
        if parsed is None:
            return None
        lo, hi, width, coords_at, pos = parsed
        fields += [(coords_at - start + i * width, width) for i in range(2 * rank)]
        boxes.append((lo, hi))
    (slo, shi), (vlo, vhi) = boxes
    counts = tuple(h - l + 1 for l, h in zip(vlo, vhi))
    if counts != tuple(h - l + 1 for l, h in zip(slo, shi)):
        return None
    return source, vlo, slo, counts, pos - start, fields


def _block_selection(block: bytes, pos: int, rank: int) -> tuple[tuple, tuple, int, int, int] | None:
    """A serialized hyperslab selection of exactly one block: (low corner, high
    corner, coordinate width, offset of the coordinates, position after it)."""
    kind, version = struct.unpack_from("<II", block, pos)
    if kind != 2:  # not a hyperslab
        return None
    if version == 1:
        _, _, sel_rank, blocks = struct.unpack_from("<IIII", block, pos + 8)
        width, at = 4, pos + 24
        fmt = "<%dI" % (2 * rank)
    elif version == 3:
        flags, width = block[pos + 8], block[pos + 9]
        sel_rank = struct.unpack_from("<I", block, pos + 10)[0]
        if flags & 0x01 or width not in (2, 4, 8):  # regular hyperslabs: not one block
            return None
        code = {2: "H", 4: "I", 8: "Q"}[width]
        blocks = struct.unpack_from("<" + code, block, pos + 14)[0]
        at = pos + 14 + width
        fmt = "<%d%s" % (2 * rank, code)
    else:
        return None
    if sel_rank != rank or blocks != 1:
        return None
    coords = struct.unpack_from(fmt, block, at)
    return coords[:rank], coords[rank:], width, at, at + 2 * rank * width


def _coordinates(rows: np.ndarray, fields: list[tuple[int, int]], rank: int, source: str) -> Mapping | None:
    width = fields[0][1]
    dtype = {2: "<u2", 4: "<u4", 8: "<u8"}[width]
    columns = [rows[:, at : at + width].copy().view(dtype).ravel().astype(np.int64) for at, _ in fields]
    slo, shi = np.stack(columns[:rank], 1), np.stack(columns[rank : 2 * rank], 1)
    vlo, vhi = np.stack(columns[2 * rank : 3 * rank], 1), np.stack(columns[3 * rank :], 1)
    if not np.array_equal(vhi - vlo, shi - slo):
        return None
    return Mapping(source, vlo, slo, vhi - vlo + 1)
