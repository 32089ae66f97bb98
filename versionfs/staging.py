"""``staging/``: a writable overlay over one version, kept on local disk.

The base version is below; the *spool* is above: a SQLite table of staged
entries (``Row``) plus one blob file per staged file content, in the state
directory. A path's staged row wins over the base: ``file`` (content in a blob,
or in the base file at ``base_path`` for a rename or a metadata-only change),
``dir`` (``opaque`` hides the base's entries below it), or ``deleted`` (a
whiteout). Unchanged files are read from the base; the first write copies a file
up into a blob.

Durability: rows are committed to SQLite (WAL) as each operation ends and blobs
are written with pwrite, so a closed file survives ``kill -9`` and a clean
reboot; ``fsync`` also fsyncs the blob and the database. SQLite statements
and blob pread/pwrite run on the trio loop: with WAL and synchronous=NORMAL they
never fsync, so each is a copy into the page cache; every fsync, and copying a
whole file up, runs on a thread. Nothing here knows
HDF5 or S3: the backend only sees the base tree and, at commit, the changes.

Inodes follow objects, not paths: a live node is found again by path through
``Overlay.live`` and renames move it, so the kernel's view stays right.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat as stat_mod
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import count
from typing import TYPE_CHECKING, Callable, Iterator

import trio

from .backends.base import Dir, File, find, join
from .errors import FsError, classify, enoent
from .namespace import Attr, Handle, Node, SHORT_TTL

if TYPE_CHECKING:
    from .namespace import Namespace

log = logging.getLogger(__name__)
FILE_MODE, DIR_MODE = 0o644, 0o755
COPY_CHUNK = 8 << 20
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
# Generated at a version's root. Staging does not show the base's (so `rsync
# --delete` into staging leaves it alone); a file written there under that name
# is kept like any other but never committed (a copy of latest/ synced back works).
RESERVED_ROOT_NAMES = frozenset({".version.json"})


def split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class Row:
    path: str
    kind: str  # "file" | "dir" | "deleted"
    blob: str | None = None
    base_path: str | None = None
    mtime_ns: int | None = None
    mode: int | None = None
    opaque: bool = False
    # A blob copied up from the base file ``origin``: with ``tracked``, the byte
    # ranges written since (Store.written) are all that can differ from it.
    origin: str | None = None
    tracked: bool = False


RESERVE_BYTES = 1 << 20


class RetryFreed(Exception):
    """The reserve was given up on a full disk: run the change again."""


class Store:
    """The persistent spool: rows in SQLite, contents in blob files."""

    def __init__(self, directory: str):
        self.directory = directory
        self.blobs = os.path.join(directory, "blobs")
        os.makedirs(self.blobs, mode=0o700, exist_ok=True)
        self.db_path = os.path.join(directory, "staging.sqlite")
        self.db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS entries (path TEXT PRIMARY KEY, kind TEXT NOT NULL, blob TEXT,"
            " base_path TEXT, mtime_ns INTEGER, mode INTEGER, opaque INTEGER NOT NULL DEFAULT 0,"
            " origin TEXT, tracked INTEGER NOT NULL DEFAULT 0)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS written (blob TEXT NOT NULL, start INTEGER, stop INTEGER)")
        self.rows: dict[str, Row] = {}
        self.children: dict[str, set[str]] = {}
        self._reload()
        self.reserve = os.path.join(directory, "reserve")
        self.tidy()

    def keep_reserve(self) -> None:
        """A little disk space held back, so that removing files (which needs a
        database write) still works once the disk is full (see ``freeing``)."""
        if not os.path.exists(self.reserve):
            try:
                with open(self.reserve, "wb") as f:
                    f.write(bytes(RESERVE_BYTES))
            except OSError:
                try:
                    os.unlink(self.reserve)
                except FileNotFoundError:
                    pass

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
            raise RetryFreed() from None

    # -- rows ---------------------------------------------------------------
    def _index(self, row: Row) -> None:
        self.rows[row.path] = row
        if row.path:  # the root (a row for its attributes) is nobody's child
            parent, name = split(row.path)
            self.children.setdefault(parent, set()).add(name)

    def _unindex(self, path: str) -> None:
        if self.rows.pop(path, None) is not None and path:
            parent, name = split(path)
            names = self.children.get(parent)
            if names is not None:
                names.discard(name)
                if not names:
                    del self.children[parent]

    def put(self, row: Row) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.path, row.kind, row.blob, row.base_path, row.mtime_ns, row.mode, int(row.opaque), row.origin, int(row.tracked)),
        )
        self._index(row)

    def set_tracked(self, blob: str, tracked: bool) -> None:
        for row in [r for r in self.rows.values() if r.blob == blob and r.origin is not None]:
            self.put(replace(row, tracked=tracked))

    def add_written(self, blob: str, ranges: list[tuple[int, int]]) -> None:
        self.db.executemany("INSERT INTO written VALUES (?, ?, ?)", [(blob, a, b) for a, b in ranges])

    def written(self, blob: str) -> list[tuple[int, int]]:
        """The byte ranges written to ``blob`` since its copy-up, merged."""
        ranges = sorted(self.db.execute("SELECT start, stop FROM written WHERE blob = ?", (blob,)))
        return merge_ranges(ranges)

    def remove(self, path: str) -> None:
        self.db.execute("DELETE FROM entries WHERE path = ?", (path,))
        self._unindex(path)

    def subtree(self, path: str) -> list[Row]:
        """Rows at ``path`` and below it ('' = everything)."""
        return [r for p, r in self.rows.items() if not path or under(p, path)]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several changes, atomically (no await inside: trio tasks cannot interleave)."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            self._reload()
            raise
        self.db.execute("COMMIT")

    def _reload(self) -> None:
        self.rows.clear()
        self.children.clear()
        columns = "path, kind, blob, base_path, mtime_ns, mode, opaque, origin, tracked"
        for values in self.db.execute(f"SELECT {columns} FROM entries"):
            self._index(Row(*values[:6], opaque=bool(values[6]), origin=values[7], tracked=bool(values[8])))

    # -- meta -----------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- blobs -----------------------------------------------------------------
    def blob_path(self, blob: str) -> str:
        return os.path.join(self.blobs, blob)

    def new_blob(self) -> str:
        blob = uuid.uuid4().hex
        os.close(os.open(self.blob_path(blob), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return blob

    def drop_blob(self, blob: str | None) -> None:
        if blob is not None and not any(r.blob == blob for r in self.rows.values()):
            self.db.execute("DELETE FROM written WHERE blob = ?", (blob,))
            try:
                os.unlink(self.blob_path(blob))
            except FileNotFoundError:
                pass

    def clear(self) -> None:
        """Forget every staged change. The blobs go afterwards (collect_garbage),
        once the transaction this runs in has committed."""
        self.db.execute("DELETE FROM entries")
        self.db.execute("DELETE FROM written")
        self.rows.clear()
        self.children.clear()

    def tidy(self) -> None:
        """Remove the blobs no row refers to and take the reserve back (blocking)."""
        self.collect_garbage()
        self.keep_reserve()

    def collect_garbage(self) -> None:
        """Remove blobs no row refers to."""
        used = {r.blob for r in self.rows.values() if r.blob}
        for name in os.listdir(self.blobs):
            if name not in used:
                os.unlink(self.blob_path(name))

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


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def _local_errors(fn):
    """Local disk errors (ENOSPC, EDQUOT, ...) reach the caller as their errno;
    SQLite's "database or disk is full" is ENOSPC too."""

    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except (OSError, sqlite3.OperationalError) as e:
            failure = classify(e)
            if failure.bug:
                raise
            raise FsError(failure.errno, str(e)) from None

    wrapper.__name__ = fn.__name__
    return wrapper


class Overlay:
    """The staging area of one mount: the store, its base version, live nodes."""

    def __init__(self, ns: "Namespace", directory: str):
        self.ns = ns
        self.store = Store(directory)
        self.epoch = 0  # bumped when staging is replaced wholesale (commit, discard)
        self.live: weakref.WeakValueDictionary[str, StagingNode] = weakref.WeakValueDictionary()
        self.writers = 0  # open writable handles
        self.blob_writers: dict[str, int] = {}  # blob -> open writable handles on it
        self.last_change = time.monotonic()
        self.lock = trio.Lock()  # held by commit/discard: changes wait for it
        self._serial = count(1)

    # -- base ----------------------------------------------------------------
    @property
    def base_version(self) -> str | None:
        return self.store.meta("base")

    async def base_tree(self) -> Dir:
        base = self.base_version
        if base is None or base not in self.ns.by_name:
            info = self.ns.current_info()
            base = info.name if info else None
            self.store.set_meta("base", base)
        return await self.ns.tree(base) if base else Dir(mtime_ns=self.ns.newest_mtime_ns())

    async def reset(self, base: str | None) -> None:
        """Empty staging on top of ``base`` (after a commit or a discard), and
        drop the record of a commit in progress, in one transaction; the blobs
        (possibly gigabytes) are removed off the trio loop."""
        self.reset_rows(base)
        await trio.to_thread.run_sync(self.store.tidy)

    def reset_rows(self, base: str | None) -> None:
        """``reset`` but for removing the blobs (``Store.tidy``): at start-up,
        before the trio loop runs, both are called in turn."""
        def clear() -> None:
            self.store.clear()
            self.store.set_meta("base", base)
            self.store.set_meta("committing", None)

        self.store.run_freeing(clear)
        self.epoch += 1
        self.live = weakref.WeakValueDictionary()
        self.touch()

    def touch(self) -> None:
        self.last_change = time.monotonic()

    @property
    def changed(self) -> bool:
        return bool(self.store.rows)

    # -- resolution --------------------------------------------------------------
    async def resolve(self, path: str) -> tuple[Row | None, File | Dir | None]:
        """(staged row at ``path``, base entry visible there). Both None: absent.
        A file row shows its own content (a blob, or the base file at base_path)."""
        base: File | Dir | None = await self.base_tree()
        row = self.store.rows.get("")
        parts = path.split("/") if path else []
        for i, name in enumerate(parts):
            base = base.children.get(name) if isinstance(base, Dir) else None
            row = self.store.rows.get("/".join(parts[: i + 1]))
            if row is None:
                if base is None:
                    return None, None
            elif row.kind == "deleted" or (row.kind == "file" and i < len(parts) - 1):
                return None, None
            elif row.kind == "file" or row.opaque or isinstance(base, File):
                base = None  # the row alone says what is here
        return row, base

    async def base_file(self, row: Row | None, path: str) -> File | None:
        """The base file whose bytes ``path`` shows (renames point elsewhere)."""
        source = row.base_path if row is not None and row.base_path is not None else path
        entry = find(await self.base_tree(), source)
        return entry if isinstance(entry, File) else None

    async def node(self, path: str) -> "StagingNode":
        row, base = await self.resolve(path)
        if path in RESERVED_ROOT_NAMES and row is None:
            raise enoent()
        is_dir = (row.kind == "dir") if row is not None else isinstance(base, Dir)
        if row is None and base is None and path:
            raise enoent()
        node = self.live.get(path)
        if node is None or node.is_dir != is_dir:
            node = (StagingDir if is_dir or not path else StagingFile)(self, path, next(self._serial))
            self.live[path] = node
        return node

    async def listing(self, path: str) -> dict[str, bool]:
        """name -> is_dir for the directory at ``path``."""
        row, base = await self.resolve(path)
        names: dict[str, bool] = {}
        if isinstance(base, Dir) and not (row is not None and row.opaque):
            names = {n: isinstance(e, Dir) for n, e in base.children.items() if path or n not in RESERVED_ROOT_NAMES}
        for name in self.store.children.get(path, ()):
            child = self.store.rows[join(path, name)]
            if child.kind == "deleted":
                names.pop(name, None)
            else:
                names[name] = child.kind == "dir"
        return names

    def moved(self, old: str, new: str) -> None:
        """Live nodes at ``old`` and below now live at ``new``."""
        for path, node in list(self.live.items()):
            if under(path, old):
                del self.live[path]
                node.path = new + path[len(old) :]
                self.live[node.path] = node


class StagingNode(Node):
    ttl = SHORT_TTL
    keep_cache = False

    def __init__(self, overlay: Overlay, path: str, serial: int):
        self.overlay, self.path = overlay, path
        self.epoch = overlay.epoch
        self.key = ("staging", serial)

    def _check(self) -> None:
        if self.epoch != self.overlay.epoch:
            raise FsError(errno.ESTALE)  # staging was committed or discarded since

    async def make_special(self, name: str, kind: str) -> Node:
        raise FsError(errno.EPERM, f"{kind}s are not supported in staging")

    async def setxattr(self, name: str, value: bytes | None) -> None:
        raise FsError(errno.ENOTSUP, "extended attributes are not stored")

    @_local_errors
    async def setattr(self, size: int | None, mtime_ns: int | None, mode: int | None) -> None:
        self._check()
        async with self.overlay.lock:
            await self._setattr(size, mtime_ns, mode)
            self.overlay.touch()

    async def _setattr(self, size: int | None, mtime_ns: int | None, mode: int | None) -> None:
        raise NotImplementedError


class StagingFile(StagingNode):
    is_dir = False

    async def attr(self) -> Attr:
        self._check()
        row, _ = await self.overlay.resolve(self.path)
        if row is not None and row.blob is not None:
            st = os.stat(self.overlay.store.blob_path(row.blob))
            return Attr(False, st.st_size, st.st_mtime_ns, stat_mod.S_IMODE(st.st_mode))
        base = await self.overlay.base_file(row, self.path)
        if base is None:
            raise enoent()
        size = await self.overlay.ns.file_size(base)
        mtime = row.mtime_ns if row is not None and row.mtime_ns is not None else base.mtime_ns
        mode = row.mode if row is not None and row.mode is not None else FILE_MODE
        return Attr(False, size, mtime, mode)

    @_local_errors
    async def open(self, flags: int) -> Handle:
        self._check()
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if not writing:
            row, _ = await self.overlay.resolve(self.path)
            if row is not None and row.blob is not None:
                return BlobHandle(self.overlay, row.blob, os.O_RDONLY)
            base = await self.overlay.base_file(row, self.path)
            if base is None:
                raise enoent()
            return await self.overlay.ns.open_file(base)
        async with self.overlay.lock:
            blob = await self._copy_up(truncate=bool(flags & os.O_TRUNC))
            self.overlay.touch()
        return BlobHandle(self.overlay, blob, os.O_RDWR)

    async def _copy_up(self, truncate: bool = False) -> str:
        """Make sure this file's content is in a blob of its own; return the blob."""
        overlay, store = self.overlay, self.overlay.store
        row, _ = await overlay.resolve(self.path)
        if row is not None and row.blob is not None:
            if truncate:
                os.truncate(store.blob_path(row.blob), 0)
            return row.blob
        base = await overlay.base_file(row, self.path)
        if base is None:
            raise enoent()
        blob = store.new_blob()
        path = store.blob_path(blob)
        if not truncate:
            await copy_into(overlay, base, path)
        mtime = row.mtime_ns if row is not None and row.mtime_ns is not None else base.mtime_ns
        os.chmod(path, row.mode if row is not None and row.mode is not None else FILE_MODE)
        os.utime(path, ns=(mtime, mtime))
        origin = None if truncate else (row.base_path if row is not None and row.base_path else self.path)
        store.put(Row(self.path, "file", blob=blob, origin=origin, tracked=origin is not None))
        return blob

    async def _setattr(self, size: int | None, mtime_ns: int | None, mode: int | None) -> None:
        store = self.overlay.store
        if size is not None:
            blob = await self._copy_up(truncate=size == 0)
            old = os.path.getsize(store.blob_path(blob))
            os.truncate(store.blob_path(blob), size)
            if old != size:
                store.add_written(blob, [(min(old, size), max(old, size))])
        row, _ = await self.overlay.resolve(self.path)
        if row is not None and row.blob is not None:
            path = store.blob_path(row.blob)
            if mode is not None:
                os.chmod(path, stat_mod.S_IMODE(mode))
            if mtime_ns is not None:
                os.utime(path, ns=(os.stat(path).st_atime_ns, mtime_ns))
            return
        if mtime_ns is None and mode is None:
            return
        row = row or Row(self.path, "file", base_path=self.path)
        store.put(replace(
            row,
            mtime_ns=mtime_ns if mtime_ns is not None else row.mtime_ns,
            mode=stat_mod.S_IMODE(mode) if mode is not None else row.mode,
        ))


async def copy_into(overlay: Overlay, base: File, path: str) -> None:
    """Copy a base file's bytes into a local file: a large piece per worker call,
    each written from a thread (the disk may be slow; the trio loop must not wait)."""
    handle = await overlay.ns.open_file(base)
    size = await overlay.ns.file_size(base)
    with open(path, "r+b") as out:
        for offset in range(0, size, COPY_CHUNK):
            data = await handle.read(offset, COPY_CHUNK)
            await trio.to_thread.run_sync(os.pwrite, out.fileno(), data, offset)
    await handle.release()


class StagingDir(StagingNode):
    is_dir = True

    async def attr(self) -> Attr:
        self._check()
        row, base = await self.overlay.resolve(self.path)
        if row is None and base is None and self.path:
            raise enoent()
        mtime = row.mtime_ns if row is not None and row.mtime_ns is not None else None
        if mtime is None:
            mtime = base.mtime_ns if base is not None else self.overlay.ns.newest_mtime_ns()
        mode = row.mode if row is not None and row.mode is not None else DIR_MODE
        return Attr(True, 0, mtime, mode, nlink=2)

    async def _setattr(self, size: int | None, mtime_ns: int | None, mode: int | None) -> None:
        if size is not None:
            raise FsError(errno.EISDIR)
        row, _ = await self.overlay.resolve(self.path)
        row = row or Row(self.path, "dir")  # a base directory: a row just for its attributes
        self.overlay.store.put(replace(
            row,
            mtime_ns=mtime_ns if mtime_ns is not None else row.mtime_ns,
            mode=stat_mod.S_IMODE(mode) if mode is not None else row.mode,
        ))

    async def lookup(self, name: str) -> Node:
        self._check()
        return await self.overlay.node(join(self.path, name))

    async def children(self) -> list[tuple[str, Node]]:
        self._check()
        listing = await self.overlay.listing(self.path)
        return [(name, await self.overlay.node(join(self.path, name))) for name in sorted(listing)]

    async def _absent(self, name: str) -> str:
        path = join(self.path, name)
        try:
            await self.overlay.node(path)
        except FsError:
            return path
        raise FsError(errno.EEXIST)

    async def _base_has(self, path: str) -> bool:
        """Whether the base still shows something at ``path`` (so removal needs a whiteout)."""
        parent, name = split(path)
        row, base = await self.overlay.resolve(parent)
        if row is not None and row.opaque:
            return False
        return isinstance(base, Dir) and name in base.children

    @_local_errors
    async def create(self, name: str, mode: int) -> tuple[Node, Handle]:
        self._check()
        async with self.overlay.lock:
            path = await self._absent(name)
            store = self.overlay.store
            blob = store.new_blob()
            os.chmod(store.blob_path(blob), stat_mod.S_IMODE(mode) or FILE_MODE)
            store.put(Row(path, "file", blob=blob))
            self.overlay.touch()
        node = await self.overlay.node(path)
        return node, BlobHandle(self.overlay, blob, os.O_RDWR)

    @_local_errors
    async def mkdir(self, name: str, mode: int) -> Node:
        self._check()
        async with self.overlay.lock:
            path = join(self.path, name)
            previous = self.overlay.store.rows.get(path)
            await self._absent(name)
            # A directory made where a deleted one was must not show the old contents.
            opaque = previous is not None and previous.kind == "deleted"
            self.overlay.store.put(Row(path, "dir", mode=stat_mod.S_IMODE(mode) or DIR_MODE, mtime_ns=time.time_ns(), opaque=opaque))
            self.overlay.touch()
        return await self.overlay.node(path)

    @_local_errors
    async def unlink(self, name: str) -> None:
        self._check()
        async with self.overlay.lock:
            path = join(self.path, name)
            if (await self.overlay.node(path)).is_dir:
                raise FsError(errno.EISDIR)
            await self._remove(path)
            self.overlay.touch()

    @_local_errors
    async def rmdir(self, name: str) -> None:
        self._check()
        async with self.overlay.lock:
            path = join(self.path, name)
            if not (await self.overlay.node(path)).is_dir:
                raise FsError(errno.ENOTDIR)
            if await self.overlay.listing(path):
                raise FsError(errno.ENOTEMPTY)
            await self._remove(path)
            self.overlay.touch()

    async def _remove(self, path: str) -> None:
        store = self.overlay.store
        whiteout = await self._base_has(path)
        rows = store.subtree(path)

        def remove() -> None:
            for row in rows:
                store.remove(row.path)
            if whiteout:
                store.put(Row(path, "deleted"))

        store.run_freeing(remove)
        for row in rows:
            store.drop_blob(row.blob)
        store.keep_reserve()
        self.overlay.live.pop(path, None)

    @_local_errors
    async def rename(self, name: str, new_parent: Node, new_name: str, flags: int) -> None:
        self._check()
        if not isinstance(new_parent, StagingDir):
            raise FsError(errno.EXDEV)
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        src, dst = join(self.path, name), join(new_parent.path, new_name)
        if src == dst:
            return
        if under(dst, src):
            raise FsError(errno.EINVAL)
        async with self.overlay.lock:
            node = await self.overlay.node(src)
            try:
                target = await self.overlay.node(dst)
            except FsError:
                target = None
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                if node.is_dir and not target.is_dir:
                    raise FsError(errno.ENOTDIR)
                if not node.is_dir and target.is_dir:
                    raise FsError(errno.EISDIR)
                if target.is_dir and await self.overlay.listing(dst):
                    raise FsError(errno.ENOTEMPTY)
            rows = await self._moved_rows(src, dst)
            store = self.overlay.store
            replaced = store.subtree(dst) if target is not None else []
            whiteout_src = await self._base_has(src)
            with store.transaction():
                for row in replaced:
                    store.remove(row.path)
                for row in store.subtree(src):
                    store.remove(row.path)
                if whiteout_src:
                    store.put(Row(src, "deleted"))
                for row in rows:  # moved directories are opaque: rows spell them out
                    store.put(row)
            for row in replaced:
                store.drop_blob(row.blob)
            self.overlay.live.pop(dst, None)
            self.overlay.moved(src, dst)
            self.overlay.touch()

    async def _moved_rows(self, src: str, dst: str) -> list[Row]:
        """The rows that make ``dst`` show what ``src`` shows now."""
        overlay = self.overlay
        row, base = await overlay.resolve(src)
        if row is not None and row.kind == "file":
            return [replace(row, path=dst)]
        if row is None and isinstance(base, File):
            return [Row(dst, "file", base_path=src)]
        # A directory: spell out everything below it (base entries become references).
        out = [Row(dst, "dir", mtime_ns=row.mtime_ns if row else base.mtime_ns, mode=row.mode if row else None, opaque=True)]
        for name, is_dir in (await overlay.listing(src)).items():
            out += await self._moved_rows(join(src, name), join(dst, name))
        return out


class BlobHandle(Handle):
    """An open staged file: reads and writes go to its blob with pread/pwrite on
    the trio loop (page-cache copies); only fsync leaves the loop.

    A writer records the ranges it writes. While any writer has the blob open,
    its row is marked untracked in the database, so a crash before the ranges
    are saved makes the commit compare the whole file instead of trusting them.
    """

    def __init__(self, overlay: Overlay, blob: str, flags: int):
        self.overlay, self.blob = overlay, blob
        self.fd = os.open(overlay.store.blob_path(blob), flags)
        self.writable = flags != os.O_RDONLY
        self.ranges: list[tuple[int, int]] = []
        if self.writable:
            overlay.writers += 1
            overlay.blob_writers[blob] = overlay.blob_writers.get(blob, 0) + 1
            self.was_tracked = any(r.blob == blob and r.tracked for r in overlay.store.rows.values())
            if self.was_tracked and overlay.blob_writers[blob] == 1:
                overlay.store.set_tracked(blob, False)

    @_local_errors
    async def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    @_local_errors
    async def write(self, offset: int, data: bytes) -> int:
        written = os.pwrite(self.fd, data, offset)
        if self.ranges and self.ranges[-1][1] == offset:
            self.ranges[-1] = (self.ranges[-1][0], offset + written)  # sequential: one range
        else:
            self.ranges.append((offset, offset + written))
        self.overlay.touch()
        return written

    def _save_ranges(self) -> None:
        if self.ranges:
            self.overlay.store.add_written(self.blob, merge_ranges(self.ranges))
            self.ranges = []

    @_local_errors
    async def fsync(self) -> None:
        self._save_ranges()
        await trio.to_thread.run_sync(os.fsync, self.fd)
        await trio.to_thread.run_sync(self.overlay.store.sync)

    async def release(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        if not self.writable:
            return
        overlay = self.overlay
        overlay.writers -= 1
        overlay.blob_writers[self.blob] -= 1
        last = not overlay.blob_writers[self.blob]
        if last:
            del overlay.blob_writers[self.blob]
        overlay.touch()
        try:
            self._save_ranges()
            if last and self.was_tracked:
                overlay.store.set_tracked(self.blob, True)
        except sqlite3.Error as e:
            # The row stays untracked: the commit compares the whole file. Safe.
            log.warning("cannot record the ranges written to a staged file (%s): it will be compared in full", e)
