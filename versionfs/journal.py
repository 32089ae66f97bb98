"""Atomic, durable changes to one file: a rollback journal for HDF5 commits.

HDF5 has no journal: a writer killed mid-commit can leave the whole file
unreadable, committed versions included. ``JournaledFile`` is the file object
h5py writes through (its ``fileobj`` driver) during a commit:

- bytes appended past the original end go straight to the file (they are
  invisible to readers of the old version, whose metadata ends before them);
- writes over existing bytes are kept in memory (``_shadow``) and reach the
  file only in ``commit``, after a journal holding the *old* bytes of every
  such block is durable.

``commit``: journal records + checksum, fsync; fsync the file (appended data);
write the shadow blocks in place; fsync; delete the journal. ``recover`` (run
before every open) rolls back a complete leftover journal and truncates to the
original size, so after a crash at any instant the file is either the old one
or the new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct

from .errors import FileBusy

JOURNAL_SUFFIX = ".versionfs-journal"
MAGIC = b"VFSJRNL1"
TRAILER = b"END!"
BLOCK = 4096
_HEADER = struct.Struct("<8sQ")  # magic, original size
_RECORD = struct.Struct("<QQ")  # offset, length


def journal_path(path: str) -> str:
    return path + JOURNAL_SUFFIX


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(path: str) -> bool:
    """Undo an interrupted commit of ``path``, if one left its journal. True if so.
    Raises FileBusy while another process is committing."""
    if not os.path.exists(journal_path(path)):
        return False
    fd = _lock(path)
    try:
        return _recover_locked(fd, path)
    finally:
        os.close(fd)


def _lock(path: str) -> int:
    """Open ``path`` read-write with an exclusive lock (HDF5's own locks see it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FileBusy(f"{path}: in use by another process") from None
    return fd


def _recover_locked(fd: int, path: str) -> bool:
    jpath = journal_path(path)
    try:
        with open(jpath, "rb") as j:
            data = j.read()
    except FileNotFoundError:
        return False
    if len(data) >= _HEADER.size:
        magic, base_size = _HEADER.unpack_from(data)
        if magic == MAGIC:
            for offset, old in _records(data):
                os.pwrite(fd, old, offset)
            os.ftruncate(fd, base_size)
            os.fsync(fd)
    os.unlink(jpath)
    _fsync_dir(jpath)
    return True


def _records(data: bytes) -> list[tuple[int, bytes]]:
    """The old-bytes records of a complete journal; [] if it is incomplete
    (then nothing was written in place yet)."""
    body_end = len(data) - len(TRAILER) - 32
    if body_end < _HEADER.size or data[-len(TRAILER):] != TRAILER:
        return []
    if hashlib.sha256(data[:body_end]).digest() != data[body_end : body_end + 32]:
        return []
    records, pos = [], _HEADER.size
    while pos < body_end:
        offset, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        records.append((offset, data[pos : pos + length]))
        pos += length
    return records


class JournaledFile:
    """A file object for h5py (``h5py.File(JournaledFile(path), "r+")``). Holds
    an exclusive lock on the file from open to commit/abort."""

    def __init__(self, path: str):
        self.path = path
        self.fd = _lock(path)
        _recover_locked(self.fd, path)
        self.base_size = os.fstat(self.fd).st_size
        self.size = self.base_size
        self.pos = 0
        self._shadow: dict[int, bytearray] = {}
        self._journal = open(journal_path(path), "wb")
        self._journal.write(_HEADER.pack(MAGIC, self.base_size))
        self._journal.flush()
        os.fsync(self._journal.fileno())
        _fsync_dir(path)

    # -- the file-object interface h5py's fileobj driver uses ----------------------
    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence] + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        view[:] = self._read(self.pos, len(view))
        self.pos += len(view)
        return len(view)

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else n
        data = bytes(self._read(self.pos, n))
        self.pos += n
        return data

    def write(self, buf) -> int:
        data = memoryview(buf).cast("B")
        self._write(self.pos, data)
        self.pos += len(data)
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if size < self.base_size:
            # Existing bytes must stay until commit: shadow them as zeros.
            for i in range(size // BLOCK, self._blocks_in_base()):
                block = self._block(i)
                cut = max(0, size - i * BLOCK)
                block[cut:] = bytes(len(block) - cut)
        os.ftruncate(self.fd, max(size, self.base_size))
        self.size = size
        return size

    def flush(self) -> None:
        pass  # durability is commit's job

    # -- shadowing -----------------------------------------------------------------
    def _blocks_in_base(self) -> int:
        return -(-self.base_size // BLOCK)

    def _block(self, i: int) -> bytearray:
        block = self._shadow.get(i)
        if block is None:
            length = min(BLOCK, self.base_size - i * BLOCK)
            block = self._shadow[i] = bytearray(os.pread(self.fd, length, i * BLOCK))
        return block

    def _read(self, pos: int, n: int) -> bytearray:
        out = bytearray(n)  # past the end reads as zeros, as with HDF5's own drivers
        end = min(pos + n, self.size)
        if end <= pos:
            return out
        data = os.pread(self.fd, end - pos, pos)
        out[: len(data)] = data
        if pos < self.base_size and self._shadow:
            first, last = pos // BLOCK, (min(end, self.base_size) - 1) // BLOCK
            indices = range(first, last + 1)
            if len(self._shadow) < len(indices):
                indices = sorted(i for i in self._shadow if first <= i <= last)
            for i in indices:
                block = self._shadow.get(i)
                if block is not None:
                    lo, hi = max(pos, i * BLOCK), min(end, i * BLOCK + len(block))
                    out[lo - pos : hi - pos] = block[lo - i * BLOCK : hi - i * BLOCK]
        return out

    def _write(self, pos: int, data: memoryview) -> None:
        end = pos + len(data)
        if pos < self.base_size:
            for i in range(pos // BLOCK, (min(end, self.base_size) - 1) // BLOCK + 1):
                block = self._block(i)
                lo, hi = max(pos, i * BLOCK), min(end, i * BLOCK + len(block))
                block[lo - i * BLOCK : hi - i * BLOCK] = data[lo - pos : hi - pos]
        if end > self.base_size:
            start = max(pos, self.base_size)
            os.pwrite(self.fd, data[start - pos :], start)
        self.size = max(self.size, end)

    # -- the end of a commit -------------------------------------------------------
    def commit(self) -> None:
        """Make the new content durable, atomically (see the module docstring)."""
        body = bytearray(_HEADER.pack(MAGIC, self.base_size))
        for i in sorted(self._shadow):
            old = os.pread(self.fd, len(self._shadow[i]), i * BLOCK)
            body += _RECORD.pack(i * BLOCK, len(old)) + old
        self._journal.seek(0)
        self._journal.write(body + hashlib.sha256(body).digest() + TRAILER)
        self._journal.flush()
        os.fsync(self._journal.fileno())
        os.fsync(self.fd)  # appended data is durable before anything points to it
        for i, block in sorted(self._shadow.items()):
            os.pwrite(self.fd, block, i * BLOCK)
        os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        self._finish()

    def abort(self) -> None:
        """Forget every change: the file is as it was opened."""
        os.ftruncate(self.fd, self.base_size)
        os.fsync(self.fd)
        self._finish()

    def _finish(self) -> None:
        self._shadow.clear()
        self._journal.close()
        os.unlink(journal_path(self.path))
        _fsync_dir(self.path)
        os.close(self.fd)  # releases the lock
