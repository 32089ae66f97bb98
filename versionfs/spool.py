"""The spool: staging's persistent half. Rows in SQLite, contents in blob files.

A path's staged row wins over the base version: ``file`` (content in a blob, or
in the base file at ``base_path`` for a rename or a metadata-only change),
``link`` (a symbolic link to ``target``), ``dir`` (``opaque`` hides the base's
entries below it) or ``deleted`` (a whiteout). Every row but a whiteout carries
the entry's owner, mode and times.

Indexes, so that no operation costs in proportion to what is staged: the rows by
path (a dict), each directory's staged names (``children``), the rows of each
blob (``blob_rows``) and, per directory, how many subdirectories its rows add to
or take from the base (``subdir_delta``, for link counts).

Nothing here takes milliseconds on the caller's thread: blobs are removed, and
SQLite's WAL is checkpointed (that is where SQLite fsyncs), by one background
thread. Statements run with ``synchronous=NORMAL`` in WAL mode, so a commit of
a transaction is a write into the page cache.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from .errors import SpoolBusy

log = logging.getLogger(__name__)
RESERVE_BYTES = 1 << 20
CHECKPOINT_EVERY = 2.0  # seconds between WAL checkpoints while rows change
SCHEMA = 2
COLUMNS = ("path", "kind", "blob", "base_path", "target", "opaque", "origin", "tracked", "fill_limit",
           "uid", "gid", "mode", "atime_ns", "mtime_ns", "ctime_ns", "ino")


def split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class Row:
    path: str
    kind: str  # "file" | "link" | "dir" | "deleted"
    blob: str | None = None
    base_path: str | None = None
    target: str | None = None  # a link's target
    opaque: bool = False
    # A blob copied up from the base file ``origin``: with ``tracked``, the byte
    # ranges written since (Store.written) are all that can differ from it.
    origin: str | None = None
    tracked: bool = False
    # A sparse copy-up: bytes below fill_limit that are not in Store.present are
    # still the origin's (holes in the blob); None: the blob holds every byte.
    fill_limit: int | None = None
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None  # permission bits (with setuid, setgid, sticky)
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    # What the entry is, whatever its path: set when staging makes it (create,
    # mkdir, symlink) and kept by renames; None: an entry of the base, known by
    # its base path. Inode numbers follow it.
    ino: int | None = None

    def values(self) -> tuple:
        return tuple(getattr(self, c) if c not in ("opaque", "tracked") else int(getattr(self, c)) for c in COLUMNS)

    @classmethod
    def from_values(cls, values: tuple) -> "Row":
        fields = dict(zip(COLUMNS, values))
        fields["opaque"], fields["tracked"] = bool(fields["opaque"]), bool(fields["tracked"])
        return cls(**fields)


class RetryFreed(Exception):
    """The reserve was given up on a full disk: run the change again."""


class Store:
    """The persistent spool of one source (see the module docstring)."""

    def __init__(self, directory: str, owner: tuple[int, int] = (os.getuid(), os.getgid())):
        self.directory = directory
        self.blobs = os.path.join(directory, "blobs")
        os.makedirs(self.blobs, mode=0o700, exist_ok=True)
        self.db_path = os.path.join(directory, "staging.sqlite")
        self.db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints (and their fsyncs) run on our thread
        self._create_schema(owner)
        self.rows: dict[str, Row] = {}
        self.children: dict[str, set[str]] = {}
        self.blob_rows: dict[str, set[str]] = {}
        self.subdir_delta: dict[str, int] = {}
        self._meta: dict[str, str | None] = {}  # read-through cache of the meta table
        # Whether the base version has a directory at a path (set by the overlay).
        self.base_is_dir: Callable[[str], bool] = lambda path: False
        self._reload()
        self.reserve = os.path.join(directory, "reserve")
        self._reserved = False  # the reserve is known to be there
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._last_checkpoint = time.monotonic()
        self._dirty = False
        self._thread = threading.Thread(target=self._background, name="versionfs-spool", daemon=True)
        self._thread.start()
        self.tidy()

    def _create_schema(self, owner: tuple[int, int]) -> None:
        db = self.db
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        old = [r[1] for r in db.execute("PRAGMA table_info(entries)")]
        if not old:
            db.execute(
                "CREATE TABLE entries (path TEXT PRIMARY KEY, kind TEXT NOT NULL, blob TEXT, base_path TEXT,"
                " target TEXT, opaque INTEGER NOT NULL DEFAULT 0, origin TEXT, tracked INTEGER NOT NULL DEFAULT 0,"
                " fill_limit INTEGER, uid INTEGER, gid INTEGER, mode INTEGER, atime_ns INTEGER, mtime_ns INTEGER,"
                " ctime_ns INTEGER, ino INTEGER)")
        elif "uid" not in old:
            self._migrate(owner)
        elif "ino" not in old:
            db.execute("ALTER TABLE entries ADD COLUMN ino INTEGER")
        db.execute("CREATE TABLE IF NOT EXISTS written (blob TEXT NOT NULL, start INTEGER, stop INTEGER)")
        db.execute("CREATE INDEX IF NOT EXISTS written_blob ON written (blob)")
        db.execute("CREATE TABLE IF NOT EXISTS present (blob TEXT NOT NULL, start INTEGER, stop INTEGER)")
        db.execute("CREATE INDEX IF NOT EXISTS present_blob ON present (blob)")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))

    def _migrate(self, owner: tuple[int, int]) -> None:
        """A spool of the first schema (mode and mtime of a staged file were its
        blob's): add the new columns and fill them, keeping every staged change."""
        db = self.db
        db.execute("BEGIN")
        for column in ("target TEXT", "fill_limit INTEGER", "uid INTEGER", "gid INTEGER", "atime_ns INTEGER", "ctime_ns INTEGER",
                       "ino INTEGER"):
            db.execute(f"ALTER TABLE entries ADD COLUMN {column}")
        now = time.time_ns()
        for path, kind, blob, mode, mtime in list(db.execute("SELECT path, kind, blob, mode, mtime_ns FROM entries")):
            if kind == "deleted":
                continue
            if blob is not None:
                try:
                    st = os.stat(os.path.join(self.blobs, blob))
                    mode, mtime = st.st_mode & 0o7777, st.st_mtime_ns
                except FileNotFoundError:
                    pass
            mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
            mtime = mtime if mtime is not None else now
            db.execute("UPDATE entries SET uid=?, gid=?, mode=?, atime_ns=?, mtime_ns=?, ctime_ns=? WHERE path=?",
                       (owner[0], owner[1], mode, mtime, mtime, mtime, path))
        db.execute("COMMIT")
        log.info("%s: staging's spool upgraded to schema %d", self.directory, SCHEMA)

    # -- the background thread -------------------------------------------------------
    def _background(self) -> None:
        checkpointer: sqlite3.Connection | None = None
        while True:
            job = self._jobs.get()
            if job is None:
                break
            try:
                if job == "checkpoint":
                    if checkpointer is None:
                        checkpointer = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
                        checkpointer.execute("PRAGMA busy_timeout=1000")
                    checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                else:
                    job()
            except Exception as e:  # noqa: BLE001 - a failed clean-up is retried by tidy()
                log.warning("staging spool: background job failed: %s", e)
        if checkpointer is not None:
            checkpointer.close()

    def later(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the spool's thread (blob removal: can take milliseconds)."""
        self._jobs.put(job)

    def _changed(self) -> None:
        self._dirty = True
        now = time.monotonic()
        if now - self._last_checkpoint >= CHECKPOINT_EVERY:
            self._last_checkpoint = now
            self._dirty = False
            self._jobs.put("checkpoint")

    def close(self) -> None:
        """Finish the background work (pending removals, a last checkpoint)."""
        if self._thread.is_alive():
            self._jobs.put("checkpoint")
            self._jobs.put(None)
            self._thread.join()
        self.db.close()

    # -- space ------------------------------------------------------------------------
    def keep_reserve(self) -> None:
        """A little disk space held back, so that removing files (which needs a
        database write) still works once the disk is full (see ``freeing``)."""
        if self._reserved:
            return
        if not os.path.exists(self.reserve):
            try:
                with open(self.reserve, "wb") as f:
                    f.write(bytes(RESERVE_BYTES))
            except OSError:
                try:
                    os.unlink(self.reserve)
                except FileNotFoundError:
                    pass
        self._reserved = os.path.exists(self.reserve)

    def run_freeing(self, change: Callable[[], None]) -> None:
        """``change()`` in a transaction that frees space; run again once if the
        reserve had to be given up for it (see ``freeing``)."""
        try:
            with self.freeing():
                change()
        except RetryFreed:
            with self.freeing():
                change()

    @contextmanager
    def freeing(self) -> Iterator[None]:
        """Run changes that free space; on a full disk, give up the reserve first."""
        try:
            with self.transaction():
                yield
        except sqlite3.OperationalError as e:
            if "full" not in str(e) or not os.path.exists(self.reserve):
                raise
            os.unlink(self.reserve)
            self._reserved = False
            raise RetryFreed() from None

    # -- rows ---------------------------------------------------------------------------
    def _contribution(self, row: Row) -> int:
        """What a row adds to its parent's count of subdirectories, over the base's."""
        return (row.kind == "dir") - self.base_is_dir(row.path)

    def _index(self, row: Row) -> None:
        old = self.rows.get(row.path)
        if old is not None:
            self._unindex(row.path)
        self.rows[row.path] = row
        if row.path:  # the root (a row for its attributes) is nobody's child
            parent, name = split(row.path)
            self.children.setdefault(parent, set()).add(name)
            delta = self._contribution(row)
            if delta:
                self.subdir_delta[parent] = self.subdir_delta.get(parent, 0) + delta
        if row.blob is not None:
            self.blob_rows.setdefault(row.blob, set()).add(row.path)

    def _unindex(self, path: str) -> None:
        row = self.rows.pop(path, None)
        if row is None:
            return
        if path:
            parent, name = split(path)
            names = self.children.get(parent)
            if names is not None:
                names.discard(name)
                if not names:
                    del self.children[parent]
            delta = self._contribution(row)
            if delta:
                self.subdir_delta[parent] = self.subdir_delta.get(parent, 0) - delta
        if row.blob is not None:
            paths = self.blob_rows.get(row.blob)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self.blob_rows[row.blob]

    def put(self, row: Row) -> None:
        self.db.execute(f"INSERT OR REPLACE INTO entries VALUES ({', '.join('?' * len(COLUMNS))})", row.values())
        self._index(row)
        self._changed()

    def put_many(self, rows: list[Row]) -> None:
        self.db.executemany(f"INSERT OR REPLACE INTO entries VALUES ({', '.join('?' * len(COLUMNS))})",
                            [r.values() for r in rows])
        for row in rows:
            self._index(row)
        self._changed()

    def remove(self, path: str) -> None:
        self.db.execute("DELETE FROM entries WHERE path = ?", (path,))
        self._unindex(path)
        self._changed()

    def remove_many(self, paths: list[str]) -> None:
        self.db.executemany("DELETE FROM entries WHERE path = ?", [(p,) for p in paths])
        for path in paths:
            self._unindex(path)
        self._changed()

    def subtree(self, path: str) -> list[Row]:
        """Rows at ``path`` and below it ('' = everything), from the children index."""
        if not path:
            return list(self.rows.values())
        out: list[Row] = []
        pending = [path]
        while pending:
            here = pending.pop()
            row = self.rows.get(here)
            if row is not None:
                out.append(row)
            pending += [f"{here}/{name}" for name in self.children.get(here, ())]
        return out

    def rows_of(self, blob: str) -> list[Row]:
        return [self.rows[p] for p in self.blob_rows.get(blob, ())]

    def set_tracked(self, blob: str, tracked: bool) -> None:
        for row in self.rows_of(blob):
            if row.origin is not None and row.tracked != tracked:
                self.put(replace(row, tracked=tracked))

    def recount(self) -> None:
        """Compute the subdirectory deltas again (the base changed)."""
        self.subdir_delta.clear()
        for row in self.rows.values():
            if row.path:
                delta = self._contribution(row)
                if delta:
                    parent = split(row.path)[0]
                    self.subdir_delta[parent] = self.subdir_delta.get(parent, 0) + delta

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several changes, atomically: on any failure (a full disk at COMMIT too)
        the database and the in-memory indexes are as before. No await inside:
        trio tasks cannot interleave."""
        self.db.execute("BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._reload()
            raise

    def _reload(self) -> None:
        self._last_ino = max(getattr(self, "_last_ino", 0),
                             self.db.execute("SELECT max(ino) FROM entries").fetchone()[0] or 0)
        self._meta.clear()
        self.rows.clear()
        self.children.clear()
        self.blob_rows.clear()
        self.subdir_delta.clear()
        for values in self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM entries"):
            self._index(Row.from_values(values))

    # -- byte ranges of blobs -------------------------------------------------------------
    def add_written(self, blob: str, ranges: list[tuple[int, int]]) -> None:
        self.db.executemany("INSERT INTO written VALUES (?, ?, ?)", [(blob, a, b) for a, b in ranges])

    def written(self, blob: str) -> list[tuple[int, int]]:
        """The byte ranges written to ``blob`` since its copy-up, merged."""
        return merge_ranges(list(self.db.execute("SELECT start, stop FROM written WHERE blob = ?", (blob,))))

    def present(self, blob: str) -> list[tuple[int, int]]:
        """The byte ranges of a sparse blob that hold the file's bytes, merged."""
        return merge_ranges(list(self.db.execute("SELECT start, stop FROM present WHERE blob = ?", (blob,))))

    def set_present(self, blob: str, ranges: list[tuple[int, int]]) -> None:
        self.db.execute("DELETE FROM present WHERE blob = ?", (blob,))
        self.db.executemany("INSERT INTO present VALUES (?, ?, ?)", [(blob, a, b) for a, b in ranges])

    def new_ino(self) -> int:
        """A new entry's identity (unique among this spool's rows, and in this
        process: counted on from the largest one staged)."""
        self._last_ino += 1
        return self._last_ino

    # -- meta -------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        if key not in self._meta:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            self._meta[key] = row[0] if row else None
        return self._meta[key]

    def set_meta(self, key: str, value: str | None) -> None:
        self._meta.pop(key, None)
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- blobs ---------------------------------------------------------------------------------
    def blob_path(self, blob: str) -> str:
        return os.path.join(self.blobs, blob)

    def new_blob(self) -> str:
        blob, fd = self.open_new_blob()
        os.close(fd)
        return blob

    def open_new_blob(self) -> tuple[str, int]:
        """A new empty blob and a read-write descriptor of it."""
        blob = uuid.uuid4().hex
        return blob, os.open(self.blob_path(blob), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)

    def drop_blob(self, blob: str | None, row: Row | None = None) -> None:
        """Forget a blob no row uses any more; its file goes on the spool's thread
        (an open descriptor keeps working until closed). ``row``: the last one
        that had it (what it says spares the statements for ranges it never had)."""
        if blob is None or blob in self.blob_rows:
            return
        if row is None or row.origin is not None:
            self.db.execute("DELETE FROM written WHERE blob = ?", (blob,))
        if row is None or row.fill_limit is not None:
            self.db.execute("DELETE FROM present WHERE blob = ?", (blob,))
        path = self.blob_path(blob)
        self.later(lambda: _unlink(path))

    def clear(self) -> None:
        """Forget every staged change. The blobs go afterwards (collect_garbage),
        once the transaction this runs in has committed."""
        self.db.execute("DELETE FROM entries")
        self.db.execute("DELETE FROM written")
        self.db.execute("DELETE FROM present")
        self.rows.clear()
        self.children.clear()
        self.blob_rows.clear()
        self.subdir_delta.clear()

    def tidy(self) -> None:
        """Remove the blobs no row refers to and take the reserve back (blocking)."""
        self.collect_garbage()
        self.keep_reserve()

    def collect_garbage(self, keep: frozenset[str] = frozenset()) -> None:
        """Remove blobs no row refers to (and none in ``keep``: open elsewhere)."""
        used = set(self.blob_rows) | keep
        for name in os.listdir(self.blobs):
            if name not in used:
                _unlink(self.blob_path(name))

    def sync(self) -> None:
        """Make every committed row durable against power loss (blocking)."""
        for path in (self.db_path + "-wal", self.db_path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if start >= stop:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def missing_ranges(present: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of [start, stop) that the merged ``present`` ranges do not cover."""
    out, pos = [], start
    for a, b in present:
        if b <= pos:
            continue
        if a >= stop:
            break
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
        if pos >= stop:
            break
    if pos < stop:
        out.append((pos, stop))
    return out


# -- one staging per source ----------------------------------------------------------------
LOCK_FILE = "lock"


class SpoolLock:
    """An exclusive lock on a spool directory, held by the one writable mount of
    its source for as long as the daemon runs (released by the kernel when it
    exits, however it exits). The file says who holds it."""

    def __init__(self, directory: str, holder: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, LOCK_FILE)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = json.loads(os.pread(self.fd, 4096, 0) or b"{}")
            except ValueError:
                who = {}
            os.close(self.fd)
            raise SpoolBusy(
                f"staging of this source is in use by the mount at {who.get('mountpoint', '?')} (pid {who.get('pid', '?')}); "
                "unmount it first, or mount this one with -o ro") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "mountpoint": holder}).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
