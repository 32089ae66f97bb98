"""Atomic, durable changes to one file: a rollback journal for HDF5 commits.

HDF5 has no journal: a writer killed mid-commit can leave the whole file
unreadable, committed versions included. ``JournaledFile`` is the file object
h5py writes through (its ``fileobj`` driver) during a commit:

- bytes appended past the original end go straight to the file (they are
  invisible to readers of the old version, whose metadata ends before them);
- writes over existing bytes are kept in memory (``_shadow``) and reach the
  file only in ``commit``, after a journal holding the *old* bytes of every
  such block is durable.

``commit``: journal records + checksum, fsync (and its directory); fsync the
file (appended data); write the shadow blocks in place; fsync; delete the
journal, fsync its directory. ``recover`` (run
before every open) rolls back a complete leftover journal and truncates to the
original size, so after a crash at any instant the file is either the old one
or the new one.

A journal is bound to the very file it was written for: its header (written
before the commit writes a byte, durable with the rest of the journal) names the file's path, inode, size and mtime
when the commit began and a SHA-256 of its first block; a complete journal also
has the new size and first block. ``recover`` writes nothing unless the file
still is that file (same path and inode, not shorter than it was, not older,
its first block the old or the new one) and every record is sane (a block of
the original size, in order, under the checksum). Anything else is refused
with ``JournalRefused``, leaving both files as they are. (st_dev is recorded
but not required: device numbers can change across a reboot; inode numbers of
a local file system do not.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass
from typing import NamedTuple

from .errors import FileBusy, JournalRefused

JOURNAL_SUFFIX = ".versionfs-journal"
MAGIC = b"VFSJRNL2"
OLD_MAGICS = (b"VFSJRNL1",)  # written by earlier versions, without an identity
TRAILER = b"END!"
BLOCK = 4096
SPILL_MAX = 256 << 20  # what a failed commit holds in memory before HDF5 is told
_LENGTH = struct.Struct("<I")  # a length-prefixed part
_RECORD = struct.Struct("<QQ")  # offset, length
_SHA = 32


@dataclass(frozen=True)
class Identity:
    """The file a journal was written for, as it was when the commit began."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    head: str  # SHA-256 (hex) of the first min(BLOCK, size) bytes

    @classmethod
    def of(cls, fd: int, path: str) -> "Identity":
        st = os.fstat(fd)
        return cls(os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, _head(fd, st.st_size))


class Undo(NamedTuple):
    """One journaled block: what undoing the commit writes back."""

    offset: int
    old: bytes  # the block's bytes before the commit


@dataclass(frozen=True)
class Journal:
    """A parsed journal: the identity, and for a complete one what replaced it."""

    identity: Identity
    complete: bool
    new_size: int = 0
    new_head: str = ""
    records: tuple[Undo, ...] = ()


def journal_path(path: str) -> str:
    return path + JOURNAL_SUFFIX


def _head(fd: int, size: int) -> str:
    return hashlib.sha256(os.pread(fd, min(BLOCK, size), 0)).hexdigest()


def _part(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def header(identity: Identity) -> bytes:
    """The journal's first bytes: magic, the identity (JSON) and its checksum."""
    doc = json.dumps(asdict(identity), sort_keys=True).encode()
    return MAGIC + _part(doc) + hashlib.sha256(doc).digest()


def complete(identity: Identity, records: list[Undo], new_size: int, new_head: str) -> bytes:
    """A whole journal: the header, the old bytes of every block about to be
    overwritten, the new size and first block, a checksum of all that, a trailer."""
    body = bytearray(header(identity))
    body += _part(json.dumps({"new_size": new_size, "new_head": new_head, "records": len(records)}).encode())
    for offset, old in records:
        body += _RECORD.pack(offset, len(old)) + old
    return bytes(body) + hashlib.sha256(body).digest() + TRAILER


def parse(data: bytes) -> Journal | None:
    """The journal in ``data``; None if it is a prefix of a header (the commit
    died creating it: nothing was written to the file yet). Raises
    JournalRefused for anything that is not a journal versionfs could have written."""
    if len(data) < len(MAGIC) + _LENGTH.size and MAGIC.startswith(data[: len(MAGIC)]):
        return None
    if data[: len(MAGIC)] in OLD_MAGICS:
        raise JournalRefused("it was written by an earlier versionfs and does not say which file it belongs to")
    if data[: len(MAGIC)] != MAGIC:
        raise JournalRefused("it is not a versionfs journal")
    pos = len(MAGIC)
    (length,) = _LENGTH.unpack_from(data, pos)
    doc_end = pos + _LENGTH.size + length
    if length > 1 << 16:
        raise JournalRefused("its header is damaged")
    if len(data) < doc_end + _SHA:
        return None  # a header cut short as it was written: nothing else happened yet
    doc = data[pos + _LENGTH.size : doc_end]
    if hashlib.sha256(doc).digest() != data[doc_end : doc_end + _SHA]:
        raise JournalRefused("its header is damaged")
    try:
        identity = Identity(**json.loads(doc))
    except (ValueError, TypeError) as e:
        raise JournalRefused(f"its header is damaged ({e})") from None
    body_end = len(data) - len(TRAILER) - _SHA
    if data[-len(TRAILER):] != TRAILER or body_end < doc_end + _SHA or \
            hashlib.sha256(data[:body_end]).digest() != data[body_end : body_end + _SHA]:
        return Journal(identity, complete=False)  # never finished: nothing was written in place
    return _complete(identity, data, doc_end + _SHA, body_end)


def _complete(identity: Identity, data: bytes, pos: int, body_end: int) -> Journal:
    """The records of a complete journal, each checked: a whole block (or the
    last, short one) of the original size, in increasing order."""
    try:
        (length,) = _LENGTH.unpack_from(data, pos)
        summary = json.loads(data[pos + _LENGTH.size : pos + _LENGTH.size + length])
        new_size, new_head, count = int(summary["new_size"]), str(summary["new_head"]), int(summary["records"])
    except (ValueError, TypeError, KeyError, struct.error) as e:
        raise JournalRefused(f"its summary is damaged ({e})") from None
    pos += _LENGTH.size + length
    records, previous = [], -1
    while pos < body_end:
        if pos + _RECORD.size > body_end:
            raise JournalRefused("a record is cut short")
        offset, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if offset % BLOCK or offset <= previous or length == 0 or length > BLOCK or \
                offset + length > identity.size or pos + length > body_end:
            raise JournalRefused(f"a record ({length} bytes at {offset}) is not one of the file's "
                                 f"{identity.size} bytes as they were")
        records.append(Undo(offset, data[pos : pos + length]))
        previous, pos = offset, pos + length
    if len(records) != count or new_size < 0:
        raise JournalRefused("its records do not add up")
    return Journal(identity, True, new_size, new_head, tuple(records))


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(path: str) -> bool:
    """Undo an interrupted commit of ``path``, if one left its journal. True if so.
    Raises FileBusy while another process is committing, JournalRefused if the
    journal does not belong to the file as it is (nothing is changed then)."""
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
    try:
        journal = parse(data)
        if journal is not None:
            _check_binding(journal, fd, path)
    except JournalRefused as e:
        raise JournalRefused(
            f"{path}: the commit journal {jpath} does not belong to this file as it is now: {e}. Nothing was "
            f"changed. If {os.path.basename(path)} was replaced on purpose, remove the journal; if the journal "
            "was moved here from elsewhere, put it back beside its own file") from None
    if journal is not None:
        for offset, old in journal.records:
            os.pwrite(fd, old, offset)
        os.ftruncate(fd, journal.identity.size)
        os.fsync(fd)
    os.unlink(jpath)
    _fsync_dir(jpath)
    return True


def _check_binding(journal: Journal, fd: int, path: str) -> None:
    """Raise JournalRefused unless ``fd`` is the file the journal was written for,
    in a state the commit could have left (module docstring)."""
    want, st = journal.identity, os.fstat(fd)
    if os.path.abspath(path) != want.path:
        raise JournalRefused(f"it was written for {want.path}")
    if st.st_ino != want.ino:
        raise JournalRefused("the file was replaced (another inode)")
    if st.st_mtime_ns < want.mtime_ns:
        raise JournalRefused("the file is older than when the commit began")
    sizes = {want.size: want.head}
    if journal.complete:
        sizes[journal.new_size] = journal.new_head
    if st.st_size < want.size and not (journal.complete and st.st_size == journal.new_size):
        raise JournalRefused(f"the file is shorter ({st.st_size} bytes) than when the commit began ({want.size})")
    if not any(_head(fd, min(size, st.st_size)) == head for size, head in sizes.items()):
        raise JournalRefused("its first bytes are neither those the commit began with nor those it wrote")


class JournaledFile:
    """A file object for h5py (``h5py.File(JournaledFile(path), "r+")``). Holds
    an exclusive lock on the file from open to commit/abort."""

    def __init__(self, path: str):
        self.path = path
        self.fd, self._jfd = _lock(path), -1
        self._shadow: dict[int, bytearray] = {}
        self._undo: list[Undo] = []
        self.failure: OSError | None = None  # the first write to the file that failed
        self._spilled: dict[int, bytearray] = {}  # blocks written after it (see _spill_write)
        try:
            _recover_locked(self.fd, path)
            self.identity = Identity.of(self.fd, path)
        except BaseException:
            self._close()
            raise
        self.base_size = self.size = self.identity.size
        self.pos = 0
        try:
            # Not fsynced yet: until the journal is complete nothing below the old
            # size changes, and bytes appended past it are harmless to HDF5.
            self._jfd = os.open(journal_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            _write_all(self._jfd, header(self.identity))
        except BaseException:
            self._finish()
            raise

    # -- the file-object interface h5py's fileobj driver uses ----------------------
    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence] + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        self._read_into(self.pos, view)
        self.pos += len(view)
        return len(view)

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else n
        out = bytearray(n)
        self._read_into(self.pos, memoryview(out))
        self.pos += n
        return bytes(out)

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
        out = bytearray(n)
        self._read_into(pos, memoryview(out))
        return out

    def _read_into(self, pos: int, out: memoryview) -> None:
        """The file as the commit has made it so far, straight into ``out`` (past
        the end reads as zeros, as with HDF5's own drivers)."""
        end = min(pos + len(out), self.size)
        done = 0
        while pos + done < end:
            n = os.preadv(self.fd, [out[done : end - pos]], pos + done)
            if not n:
                break
            done += n
        if done < len(out):
            out[done:] = bytes(len(out) - done)
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
        if self._spilled and end > self.base_size:
            for i in range(max(pos, self.base_size) // BLOCK, (end - 1) // BLOCK + 1):
                block = self._spilled.get(i)
                if block is not None:
                    lo, hi = max(pos, i * BLOCK), min(end, (i + 1) * BLOCK)
                    out[lo - pos : hi - pos] = block[lo - i * BLOCK : hi - i * BLOCK]

    def _write(self, pos: int, data: memoryview) -> None:
        end = pos + len(data)
        if pos < self.base_size:
            for i in range(pos // BLOCK, (min(end, self.base_size) - 1) // BLOCK + 1):
                block = self._block(i)
                lo, hi = max(pos, i * BLOCK), min(end, i * BLOCK + len(block))
                block[lo - i * BLOCK : hi - i * BLOCK] = data[lo - pos : hi - pos]
        if end > self.base_size:
            start = max(pos, self.base_size)
            if self.failure is None:
                try:
                    _write_all(self.fd, data[start - pos :], start)
                except OSError as e:
                    self.failure = e
            if self.failure is not None:
                self._spill_write(start, data[start - pos :])
        self.size = max(self.size, end)

    def _spill_write(self, pos: int, data: memoryview) -> None:
        """After a failed write (a full disk) the commit is lost, but HDF5 is not
        told: libhdf5 can crash on its error paths (seen with a full disk). What it
        writes from then on is kept in memory, so that it reads back what it wrote,
        until the writer sees ``failure`` (``check``) and the commit is aborted."""
        end = pos + len(data)
        for i in range(pos // BLOCK, (end - 1) // BLOCK + 1):
            block = self._spilled.get(i)
            if block is None:
                block = self._spilled[i] = bytearray(BLOCK)
                on_disk = os.pread(self.fd, BLOCK, i * BLOCK)
                block[: len(on_disk)] = on_disk
            lo, hi = max(pos, i * BLOCK), min(end, (i + 1) * BLOCK)
            block[lo - i * BLOCK : hi - i * BLOCK] = data[lo - pos : hi - pos]
        if len(self._spilled) * BLOCK > SPILL_MAX:
            raise self.failure  # HDF5's error path after all, rather than unbounded memory

    def check(self) -> None:
        """Raise the first failed write: the commit cannot succeed any more."""
        if self.failure is not None:
            raise self.failure

    # -- the end of a commit -------------------------------------------------------
    def commit(self) -> None:
        """Make the new content durable, atomically (see the module docstring)."""
        self.check()
        records = [Undo(i * BLOCK, os.pread(self.fd, len(self._shadow[i]), i * BLOCK)) for i in sorted(self._shadow)]
        new_head = hashlib.sha256(self._read(0, min(BLOCK, self.size))).hexdigest()
        _write_all(self._jfd, complete(self.identity, records, self.size, new_head))
        os.fsync(self._jfd)
        _fsync_dir(self.path)  # the journal's name too
        os.fsync(self.fd)  # appended data is durable before anything points to it
        self._undo = records  # from here on, undoing means writing these back
        for i, block in sorted(self._shadow.items()):
            _write_all(self.fd, block, i * BLOCK)
        os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        self._undo = []
        self._finish()

    def abort(self) -> None:
        """Forget every change: the file is as it was opened. If even that fails
        (a disk that went away), the journal stays for the next open to roll back."""
        if self.fd < 0:
            return  # finished already
        try:
            for offset, old in self._undo:
                os.pwrite(self.fd, old, offset)
            os.ftruncate(self.fd, self.base_size)
            os.fsync(self.fd)
        except OSError:
            self._close()
            raise
        self._finish()

    def _finish(self) -> None:
        """The file is consistent: drop the journal, release the file."""
        self._close()
        try:
            os.unlink(journal_path(self.path))
            _fsync_dir(self.path)
        except FileNotFoundError:
            pass

    def _close(self) -> None:
        self._shadow.clear()
        self._spilled.clear()
        for fd in (self._jfd, self.fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._jfd = self.fd = -1  # closing the file releases the lock


def _write_all(fd: int, data: bytes | memoryview, offset: int = 0) -> None:
    """Write all of ``data`` at ``offset`` (unbuffered: a failed write leaves
    nothing pending that a later close could try again)."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
