"""Caching immutable content: the kernel's small reads served from larger blocks
(``BlockReader``) under one read-ahead memory budget for all open files
(``ReadAheadBudget``), content kept on local disk across mounts (``DiskCache``),
and the in-memory keep-the-most-recent map the rest use (``Lru``).

The model is mountpoint-s3's prefetcher: a file read sequentially gets a read
window that starts at one block and doubles each time a read had to wait for
data, up to the file's largest window; the window ahead of the reader is fetched
in the background, one block per backend call (so blocks arrive, and are
decoded, in parallel), and blocks behind the reader are dropped. Every byte held
counts against the budget; when it is spent, windows shrink back, down to one
block ahead, which a sequential reader may always have. A read that is not
sequential fetches only the chunk rows it needs, keeps nothing and resets the
window. Re-reads are the kernel page cache's job (``keep_cache``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Generic, Hashable, TypeVar

import trio

from .errors import StoreUnavailable
from .options import DEFAULT_READAHEAD_BYTES  # the budget of all open files together (--readahead-memory)

MIN_BLOCK = 1 << 20  # blocks of about 1 MiB (whole chunk rows): one backend call each
# The largest window of a local file: 16 MiB ahead keeps the disk busy with
# several reads at once (measured against 8 and 32: bench/README.md).
MAX_WINDOW_BYTES = 16 << 20
# The kernel's read-ahead requests queue behind the reads it must answer first,
# so they arrive out of order by up to what it reads ahead (8 MiB, see
# daemon.READAHEAD_KB): reads that near the stream belong to it.
KERNEL_REORDER = 8 << 20
# A block the store could not give answers the requests for it that come this
# soon after with the same failure: the kernel retries a failed read-ahead at
# once, page by page, and each retry would wait the whole --store-timeout again.
FAILURE_ECHO = 1.0

V = TypeVar("V")


def give_back_big_buffers() -> None:
    """Buffers over 1 MiB straight from mmap, so that a freed one (a build's
    temporaries, a read window) goes back to the system: glibc otherwise raises
    that threshold as big buffers are freed and keeps them in the heap, and the
    daemon's memory would grow with what it once built, not with what it keeps."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def release_freed_memory() -> None:
    """Give memory freed inside the heap back to the system (glibc's malloc_trim;
    nothing elsewhere). After a big build its temporaries are freed but stay in
    the process's heap, fragmented: the daemon's RSS would follow what it once
    built, not what it keeps. Blocking, a few milliseconds."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


class ReadAheadBudget:
    """The bytes all open files may hold in blocks read ahead (on the trio loop:
    no locking). ``reserve`` always succeeds (the one block a sequential reader
    may always have ahead, and the blocks a read waits for); ``try_reserve`` only
    within the limit."""

    def __init__(self, limit: int = DEFAULT_READAHEAD_BYTES):
        self.limit = limit
        self.used = 0
        self.peak = 0

    @property
    def available(self) -> int:
        return max(0, self.limit - self.used)

    def try_reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.reserve(n)
        return True

    def reserve(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n


Fetch = Callable[[int, int], Awaitable["bytes | memoryview"]]
Spawn = Callable[..., Any]


class _Pending:
    """A fetch under way: readers of its blocks wait for ``done``; a failure is
    handed to them (``error``) instead of being fetched again at once."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class BlockReader:
    """Reads of one open file, batched into aligned blocks fetched by ``fetch``.
    ``spawn`` (a nursery's start_soon), if given, enables background read-ahead;
    ``budget`` bounds it together with every other open file's. ``close`` gives
    back what the reader holds."""

    def __init__(self, fetch: Fetch, size: int, layout: tuple[int, int], spawn: Spawn | None = None,
                 max_window: int = MAX_WINDOW_BYTES, budget: ReadAheadBudget | None = None):
        origin, unit = layout
        self._fetch = fetch
        self._spawn = spawn
        self._budget = budget if budget is not None else ReadAheadBudget()
        self.size = size
        # Block -1 is [0, origin) (a header); block k >= 0 starts at origin + k*B.
        self._origin = min(origin, size)
        unit = max(1, unit)
        self._block = unit * max(1, MIN_BLOCK // unit) if unit <= max_window // 2 else MIN_BLOCK
        self._max_window = max(1, max_window // self._block)
        self._window = 1  # blocks wanted ahead of the reader
        self._next_offset = 0  # where the sequential stream's reads have reached
        self._alone_end = -1  # where the last read that was not sequential ended
        self._blocks: dict[int, memoryview] = {}
        self._consumed: dict[int, int] = {}  # bytes of a held block read so far: all read, it goes
        self._pending: dict[int, _Pending] = {}
        self._held = 0  # bytes of blocks and pending fetches, counted in the budget
        self._generation = 0  # bumped when the reader drops what it holds
        self._failed: dict[int, tuple[float, StoreUnavailable]] = {}  # block -> (when, why), see FAILURE_ECHO
        self._closed = False

    def _start(self, index: int) -> int:
        return 0 if index < 0 else min(self.size, self._origin + index * self._block)

    def _index(self, offset: int) -> int:
        return -1 if offset < self._origin else (offset - self._origin) // self._block

    def _length(self, index: int) -> int:
        return self._start(index + 1) - self._start(index)

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        index = self._index(offset)
        self._echo_failure(index, self._index(end - 1))
        # Sequential: in a block held or on its way, or within KERNEL_REORDER of
        # where the stream's reads have reached, behind or ahead.
        expected, slack = self._next_offset, max(self._block, KERNEL_REORDER)
        sequential = (expected - slack <= offset <= expected + slack
                      or index in self._blocks or index in self._pending)
        if sequential:
            self._next_offset = max(expected, end)
        elif offset == self._alone_end:  # a new sequential stream, where a lone read ended
            sequential, self._next_offset, self._window = True, end, 1
        else:
            self._alone_end, self._window = end, 1
        try:
            if not sequential:
                return await self._read_alone(offset, end)
            return await self._read_blocks(offset, end)
        except StoreUnavailable:
            raise  # asking again would only wait as long again
        except Exception:  # noqa: BLE001
            # A damaged region fails its whole block, but the bytes asked for
            # may still be readable on their own: try exactly those (uncached).
            return await self._fetch(offset, end - offset)

    async def _read_alone(self, offset: int, end: int) -> bytes | memoryview:
        """A read that is not sequential: exactly its bytes (the backend reads the
        chunks they need), nothing kept; the window is back to one block. The
        stream's blocks stay (until read, or far behind); a read that starts where
        this one ends begins a new stream."""
        return await self._fetch(offset, end - offset)

    async def _read_blocks(self, offset: int, end: int) -> bytes | memoryview:
        first, last = self._index(offset), self._index(end - 1)
        waited = False
        missing = [i for i in range(first, last + 1) if i not in self._blocks and i not in self._pending]
        if missing and missing[-1] - missing[0] == len(missing) - 1:  # one run: one fetch (else block by block below)
            waited = True
            n = self._start(missing[-1] + 1) - self._start(missing[0])
            self._budget.reserve(n)
            self._held += n
            await self._fill(missing[0], missing[-1] + 1)
        parts = []
        pos = offset
        while pos < end:
            index = self._index(pos)
            data = self._blocks.get(index)
            if data is None:
                pending = self._pending.get(index)
                waited = True
                if pending is not None:
                    await pending.done.wait()
                    if pending.error is not None:
                        raise pending.error
                data = self._blocks.get(index)
                if data is None:  # that fetch failed (or was dropped): fetch it ourselves
                    self._budget.reserve(self._length(index))
                    self._held += self._length(index)
                    await self._fill(index, index + 1)
                    data = self._blocks[index]
            start = self._start(index)
            if not len(data):  # the file shrank under us: a short read, never a loop
                break
            part = data[pos - start : end - start]
            parts.append(part)
            pos = start + len(data)
            # The kernel asks for each page once, not always in order (its read-ahead
            # queues behind reads it must answer first): a block goes once all of it was read.
            self._consumed[index] = self._consumed.get(index, 0) + len(part)
            if self._consumed[index] >= len(data):
                self._drop(index)
        frontier = self._index(max(end, self._next_offset))
        self._drop_outside(frontier - 2 * self._max_window, frontier + self._max_window + 1)
        if waited:
            self._grow()
        # Ahead of where the stream has reached, not of this read: a request that
        # arrives late must not fetch again blocks read already.
        self._read_ahead(frontier)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _echo_failure(self, first: int, last: int) -> None:
        """Raise the store's failure again for a block that failed a moment ago."""
        if not self._failed:
            return
        now = time.monotonic()
        for i, (when, error) in list(self._failed.items()):
            if now - when > FAILURE_ECHO:
                del self._failed[i]
            elif first <= i <= last:
                raise error

    def _grow(self) -> None:
        """The reader waited for data: a larger window, if the budget has room."""
        wanted = min(self._window * 2, self._max_window)
        if wanted > self._window and self._budget.available >= (wanted - self._window) * self._block:
            self._window = wanted

    def _read_ahead(self, index: int) -> None:
        """Blocks [index, index + window) held or on their way, one background fetch
        each, as far as the budget allows; the first of them always."""
        if self._spawn is None or self._closed:
            return
        for i in range(index, index + self._window):
            if self._start(i) >= self.size:
                break
            if i in self._blocks or i in self._pending:
                continue
            n = self._length(i)
            if i == index:
                self._budget.reserve(n)
            elif not self._budget.try_reserve(n):
                self._window = max(1, self._window // 2)  # the budget is spent: shrink
                break
            self._held += n
            done = self._pending[i] = _Pending()
            self._spawn(self._prefetch, i, done, self._generation)

    async def _prefetch(self, index: int, done: _Pending, generation: int) -> None:
        try:
            await self._fill(index, index + 1, done, generation)
        except Exception:  # noqa: BLE001 - the real read will retry and report
            pass

    async def _fill(self, first: int, last: int, done: _Pending | None = None, generation: int | None = None) -> None:
        """Fetch blocks [first, last) in one call; their bytes are already counted in
        ``_held`` and the budget (a failure gives them back: nothing is kept).
        ``done`` and ``generation``: a fetch announced earlier (read-ahead)."""
        indices = range(first, last)
        if generation is None:
            generation = self._generation
        if done is None:
            done = _Pending()
            for i in indices:
                self._pending[i] = done
        elif generation != self._generation:  # dropped before it started
            done.done.set()
            return
        stored = 0
        try:
            start = self._start(first)
            try:
                data = memoryview(await self._fetch(start, self._start(last) - start))
            except Exception as e:
                done.error = e
                if isinstance(e, StoreUnavailable):
                    for i in indices:
                        self._failed[i] = (time.monotonic(), e)
                raise
            if generation == self._generation and not self._closed:
                for i in indices:
                    self._blocks[i] = data[self._start(i) - start : self._start(i + 1) - start]
                    stored += self._length(i)
        finally:
            for i in indices:
                if self._pending.get(i) is done:
                    del self._pending[i]
            unused = sum(self._length(i) for i in indices) - stored
            if unused and generation == self._generation:
                self._give_back(unused)
            done.done.set()

    def _give_back(self, n: int) -> None:
        self._held -= n
        self._budget.release(n)

    def _drop(self, index: int) -> None:
        if self._blocks.pop(index, None) is not None:
            self._give_back(self._length(index))
        self._consumed.pop(index, None)

    def _drop_outside(self, lo: int, hi: int) -> None:
        """Drop blocks before ``lo`` and from ``hi`` on: read ahead for a position
        the reader left, or read only in part."""
        for i in [i for i in self._blocks if not lo <= i < hi]:
            self._drop(i)

    def _drop_all(self) -> None:
        """Forget every block and pending fetch (their bytes go back now; fetches
        still under way keep nothing when they end)."""
        if self._held:
            self._budget.release(self._held)
        self._held = 0
        self._blocks.clear()
        self._consumed.clear()
        self._pending.clear()
        self._generation += 1

    def close(self) -> None:
        self._drop_all()
        self._closed = True


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
