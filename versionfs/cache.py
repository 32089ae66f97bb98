"""Caching immutable content: the kernel's small reads served from larger blocks
(``BlockReader``), content kept on local disk across mounts (``DiskCache``), and
the in-memory keep-the-most-recent map the rest use (``Lru``).

The kernel asks for 128 KiB at a time. Each miss here fetches a whole window of
blocks on the worker thread in one call, aligned to the file's layout (whole
chunk rows of an HDF5 dataset), and the window doubles while reads stay
sequential. Once it is at full size, the next window is fetched in the
background while the kernel drains the current one, so the worker's reading and
the kernel's copying overlap. Re-reads are the kernel page cache's job
(``keep_cache``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Generic, Hashable, TypeVar

import trio

MIN_BLOCK = 1 << 20
# Windows of a few MiB: large enough to amortise a thread hop and HDF5's
# per-call cost, small enough that buffers are recycled by malloc instead of
# being mapped and faulted in afresh every time.
MAX_WINDOW_BYTES = 8 << 20

V = TypeVar("V")


class Lru(Generic[V]):
    """A map that keeps only its most recently used entries: at most ``limit`` of
    them, or, with ``weight``, entries whose weights add up to at most ``limit``
    (the newest one is always kept)."""

    def __init__(self, limit: int, weight: Callable[[V], int] = lambda value: 1):
        self.limit, self.weight = limit, weight
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._total = 0

    def get(self, key: Hashable) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> V:
        if key in self._items:
            self._total -= self.weight(self._items.pop(key))
        self._items[key] = value
        self._total += self.weight(value)
        while self._total > self.limit and len(self._items) > 1:
            self._total -= self.weight(self._items.popitem(last=False)[1])
        return value

    def clear(self) -> None:
        self._items.clear()
        self._total = 0

    def discard(self, key: Hashable) -> None:
        if key in self._items:
            self._total -= self.weight(self._items.pop(key))

    @property
    def total(self) -> int:
        """The weights of what is kept, added up."""
        return self._total


Fetch = Callable[[int, int], Awaitable["bytes | memoryview"]]
Spawn = Callable[..., Any]


class BlockReader:
    """Reads of one open file, batched into aligned blocks fetched by ``fetch``.
    ``spawn`` (a nursery's start_soon), if given, enables background prefetch."""

    def __init__(self, fetch: Fetch, size: int, layout: tuple[int, int], spawn: Spawn | None = None,
                 max_window: int = MAX_WINDOW_BYTES):
        origin, unit = layout
        self._fetch = fetch
        self._spawn = spawn
        self.size = size
        # Block -1 is [0, origin) (a header); block k >= 0 starts at origin + k*B.
        self._origin = min(origin, size)
        unit = max(1, unit)
        self._block = unit * max(1, MIN_BLOCK // unit) if unit <= max_window // 2 else MIN_BLOCK
        self._max_window = max(1, max_window // self._block)
        self._max_cached = 4 * max_window
        self._window = 1
        self._next_offset = 0
        self._blocks: OrderedDict[int, memoryview] = OrderedDict()
        self._cached = 0
        self._pending: dict[int, trio.Event] = {}

    def _start(self, index: int) -> int:
        return 0 if index < 0 else min(self.size, self._origin + index * self._block)

    def _index(self, offset: int) -> int:
        return -1 if offset < self._origin else (offset - self._origin) // self._block

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        try:
            return await self._read_blocks(offset, end)
        except Exception:  # noqa: BLE001
            # A damaged region fails its whole window, but the bytes asked for
            # may still be readable on their own: try exactly those (uncached).
            return bytes(await self._fetch(offset, end - offset))

    async def _read_blocks(self, offset: int, end: int) -> bytes:
        sequential = offset == self._next_offset
        self._window = min(self._window * 2, self._max_window) if sequential else 1
        self._next_offset = end
        parts = []
        pos = offset
        while pos < end:
            index = self._index(pos)
            data = await self._get(index)
            start = self._start(index)
            if not len(data):  # the file shrank under us: a short read, never a loop
                break
            parts.append(data[pos - start : end - start])
            pos = start + len(data)
        if sequential and self._window == self._max_window and self._spawn is not None:
            ahead = self._index(end) + self._window
            if self._start(ahead) < self.size and ahead not in self._blocks and ahead not in self._pending:
                self._spawn(self._prefetch, ahead)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    async def _prefetch(self, index: int) -> None:
        try:
            await self._fill(index)
        except Exception:  # noqa: BLE001 - the real read will retry and report
            pass

    async def _get(self, index: int) -> memoryview:
        while True:
            data = self._blocks.get(index)
            if data is not None:
                self._blocks.move_to_end(index)
                return data
            pending = self._pending.get(index)
            if pending is None:
                await self._fill(index)
            else:
                await pending.wait()
                if index not in self._blocks:  # that fetch failed: try ourselves
                    await self._fill(index)

    async def _fill(self, index: int) -> None:
        last = index + 1 if index < 0 else index + self._window
        while last > index + 1 and (last - 1 in self._blocks or last - 1 in self._pending):
            last -= 1
        indices = range(index, last)
        done = trio.Event()
        for i in indices:
            self._pending[i] = done
        try:
            start = self._start(index)
            data = memoryview(await self._fetch(start, self._start(last) - start))
            for i in indices:
                block = data[self._start(i) - start : self._start(i + 1) - start]
                self._cached += len(block) - len(self._blocks.pop(i, b""))
                self._blocks[i] = block
        finally:
            for i in indices:
                self._pending.pop(i, None)
            done.set()
        while self._cached > self._max_cached and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._cached -= len(old)


class DiskCache:
    """Immutable content kept on local disk across mounts: one file per block,
    keyed by an identity that names one content for ever and the block's index
    (S3: the bucket, key, VersionId and ETag; HDF5: a version's image, see
    ``HDF5Backend._image_identity``). Least recently used blocks go first once
    the total passes ``max_bytes``. Blocking: used from the worker thread."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self._lock = threading.Lock()  # several GETs finish at once
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        found = []
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            try:
                if name.endswith(".tmp"):
                    os.unlink(path)  # a write a crash interrupted (or another daemon's, under way)
                    continue
                st = os.stat(path)
            except FileNotFoundError:  # another daemon sharing the cache removed it meanwhile
                continue
            found.append((st.st_atime_ns, name, st.st_size))
        for _, name, size in sorted(found):
            self._sizes[name] = size
        self._total = sum(self._sizes.values())

    def _name(self, identity: str, index: int) -> str:
        return f"{hashlib.sha256(identity.encode()).hexdigest()[:40]}.{index}"

    def get(self, identity: str, index: int) -> bytes | None:
        name = self._name(identity, index)
        with self._lock:
            if name not in self._sizes:
                return None
            self._sizes.move_to_end(name)
        try:
            with open(os.path.join(self.directory, name), "rb") as f:
                return f.read()
        except FileNotFoundError:  # evicted meanwhile
            return None

    def put(self, identity: str, index: int, data: bytes) -> None:
        name = self._name(identity, index)
        path = os.path.join(self.directory, name)
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        except OSError:  # a full or read-only cache disk only costs speed
            return
        with self._lock:
            self._total += len(data) - self._sizes.pop(name, 0)
            self._sizes[name] = len(data)
            evicted = []
            while self._total > self.max_bytes and len(self._sizes) > 1:
                old, size = self._sizes.popitem(last=False)
                self._total -= size
                evicted.append(old)
        for old in evicted:
            try:
                os.unlink(os.path.join(self.directory, old))
            except FileNotFoundError:
                pass
