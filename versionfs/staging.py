"""``staging/``: a writable overlay over one version, kept on local disk.

The base version is below; the spool (``spool.Store``: rows in SQLite, contents
in blob files) is above. A staged row wins over the base; unchanged entries are
read from the base. While a file is in staging it behaves as on a local disk:
owner, group, mode bits and three times are kept per entry (doc/SEMANTICS.md: staging's
metadata), a directory's link count is 2 plus its subdirectories, and a file
unlinked while open keeps working through its descriptors until closed.

Copy-up is sparse for large files: the first write into a file of the base
makes a blob of the file's full size with holes, copies in only the units of the
file's layout (header + chunk rows) that the write touches, and records which
ranges are present; reads of the rest still come from the base. Whoever needs
every byte of the blob (a commit that uploads or compares it whole) fills the
holes first (``Overlay.fill``).

Durability: rows are committed to SQLite (WAL) as each operation ends and blobs
are written with pwrite, so a closed file survives ``kill -9`` and a clean
reboot; ``fsync`` also fsyncs the blob and the database. SQLite statements and
small pwrites run on the trio loop (page-cache copies); fsync, copying whole
files, truncating and removing blobs and checkpointing run on threads. Nothing
here knows HDF5 or S3: the backend only sees the base tree and, at commit, the
changes.

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
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from .backends.base import Dir, File, find, join
from .errors import FsError, UserError, classify, enoent
from .namespace import DIR_MODE, FILE_MODE, SHORT_TTL, Attr, Caller, Handle, Node, SetAttr
from .spool import Row, Store, merge_ranges, missing_ranges, split, under

if TYPE_CHECKING:
    from .namespace import Namespace

log = logging.getLogger(__name__)
LINK_MODE = 0o777
COPY_CHUNK = 8 << 20
SPARSE_MIN = 4 << 20  # base files at least this large are copied up sparsely
LOOP_WRITE_MAX = 1 << 20  # larger pwrites of copied-up bytes run on a thread
BULK_YIELD = 2000  # rows between yields to the trio loop in bulk work
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


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


@dataclass
class Sparse:
    """A sparse blob: bytes below ``limit`` outside ``present`` are the base's."""

    base: File
    limit: int
    present: list[tuple[int, int]]
    reader: Handle | None = None

    def missing(self, start: int, stop: int) -> list[tuple[int, int]]:
        return missing_ranges(self.present, start, min(stop, self.limit))


class Overlay:
    """The staging area of one mount: the store, its base version, live nodes."""

    def __init__(self, ns: "Namespace", directory: str):
        self.ns = ns
        self.owner = (os.getuid(), os.getgid())  # who base entries belong to
        self.store = Store(directory, self.owner)
        self.generated: frozenset[str] = ns.backend.generated_names
        self.epoch = 0  # bumped when staging is replaced wholesale (commit, discard)
        self.live: weakref.WeakValueDictionary[str, StagingNode] = weakref.WeakValueDictionary()
        self.writers = 0  # open writable handles
        self.blob_writers: dict[str, int] = {}  # blob -> open writable handles on it
        self.open_blobs: dict[str, int] = {}  # blob -> open handles on it (reads too)
        self.pending_times: dict[str, int] = {}  # blob -> time of its last write, not yet in its row
        self.sparse: dict[str, Sparse] = {}
        self.last_change = time.monotonic()
        self.lock = trio.Lock()  # held by commit/discard and every change
        self._base: Dir | None = None
        self._base_name: str | None = None
        self._base_subdirs: dict[int, int] = {}

    # -- base ----------------------------------------------------------------
    @property
    def base_version(self) -> str | None:
        return self.store.meta("base")

    async def base_tree(self) -> Dir:
        base = self.base_version
        if self._base is not None and base == self._base_name:
            return self._base
        if base is None or base not in self.ns.by_name:
            info = self.ns.current_info()
            base = info.name if info else None
            self.store.set_meta("base", base)
        tree = await self.ns.tree(base) if base else Dir(mtime_ns=self.ns.newest_mtime_ns())
        self._set_base(tree, base)
        return tree

    def _set_base(self, tree: Dir, name: str | None) -> None:
        self._base, self._base_name = tree, name
        self._base_subdirs = {}
        self.store.base_is_dir = self._base_dir_shown
        self.store.recount()

    def _base_dir_shown(self, path: str) -> bool:
        """Whether the base has a directory at ``path`` that staging would show
        (no staged ancestor hides the base below it)."""
        if self._base is None or not isinstance(find(self._base, path), Dir):
            return False
        rows = self.store.rows
        parent = path
        while parent:
            parent = split(parent)[0]
            row = rows.get(parent)
            if row is not None and (row.opaque or row.kind != "dir"):
                return False
        return True

    def base_subdirs(self, entry: Dir) -> int:
        n = self._base_subdirs.get(id(entry))
        if n is None:
            n = self._base_subdirs[id(entry)] = sum(isinstance(e, Dir) for e in entry.children.values())
        return n

    async def reset(self, base: str | None) -> None:
        """Empty staging on top of ``base`` (after a commit or a discard), and
        drop the record of a commit in progress, in one transaction; the blobs
        (possibly gigabytes) are removed off the trio loop."""
        self.reset_rows(base)
        keep = frozenset(self.open_blobs)
        await trio.to_thread.run_sync(lambda: (self.store.collect_garbage(keep), self.store.keep_reserve()))

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
        self.sparse.clear()
        self.pending_times.clear()
        self._base = None
        self.touch()

    def check_source(self, identity: str, description: str) -> None:
        """At mount: refuse staged changes that belong to another source (the
        file was replaced, e.g. ``rm f.h5; versionfs init f.h5``) or to a base
        version the source does not have; record the source otherwise."""
        store = self.store
        recorded = store.meta("identity")
        base = self.base_version
        where = store.directory
        advice = (f"to drop them: rm -r {where}; to keep them: mv {where} {where}.saved (then mount again)")
        if recorded is not None and recorded != identity and self.changed:
            raise UserError(f"{description}: staging in {where} was made for another source ({recorded}, now {identity}); "
                            f"its changes are not applied to this one. {advice}")
        if base is not None and base not in self.ns.by_name and self.changed:
            raise UserError(f"{description}: staging in {where} is based on version {base}, which this source does "
                            f"not have; its changes are not applied. {advice}")
        if recorded != identity or (base is not None and base not in self.ns.by_name):
            info = self.ns.current_info()
            with store.transaction():
                store.set_meta("identity", identity)
                if not self.changed:
                    store.set_meta("base", info.name if info else None)

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
        rows = self.store.rows
        row = rows.get("")
        if path:
            parts = path.split("/")
            last = len(parts) - 1
            here = ""
            for i, name in enumerate(parts):
                base = base.children.get(name) if isinstance(base, Dir) else None
                here = f"{here}/{name}" if here else name
                row = rows.get(here)
                if row is None:
                    if base is None:
                        return None, None
                elif row.kind == "deleted" or (row.kind != "dir" and i < last):
                    return None, None
                elif row.kind != "dir" or row.opaque or isinstance(base, File):
                    base = None  # the row alone says what is here
                if i == 0 and row is None and name in self.generated:
                    return None, None  # the base's generated files are not staging's
        return row, base

    async def base_file(self, row: Row | None, path: str) -> File | None:
        """The base file whose bytes ``path`` shows (renames point elsewhere)."""
        source = row.base_path if row is not None and row.base_path is not None else path
        entry = find(await self.base_tree(), source)
        return entry if isinstance(entry, File) else None

    async def node(self, path: str) -> "StagingNode":
        row, base = await self.resolve(path)
        if row is None and base is None and path:
            raise enoent()
        if row is not None:
            cls = {"dir": StagingDir, "link": StagingLink}.get(row.kind, StagingFile)
            if row.kind == "file" and row.blob is None:
                source = await self.base_file(row, path)
                if source is not None and (await self.ns.file_meta(source)).link:
                    cls = StagingLink  # a renamed base link
        elif isinstance(base, Dir) or not path:
            cls = StagingDir
        else:
            cls = StagingLink if (await self.ns.file_meta(base)).link else StagingFile
        # The same entry is the same node (and inode) whatever its path, also
        # after the kernel has forgotten it: by its ino, or by its base path.
        if row is not None and row.ino is not None:
            key: tuple = ("staging", self.epoch, row.ino)
        else:
            key = ("staging-base", self.epoch, (row.base_path or row.origin or path) if row is not None else path)
        node = self.live.get(path)
        if type(node) is not cls or node.key != key:
            node = cls(self, path, key)
            self.live[path] = node
        return node

    async def listing(self, path: str) -> dict[str, bool]:
        """name -> is_dir for the directory at ``path``."""
        row, base = await self.resolve(path)
        names: dict[str, bool] = {}
        if isinstance(base, Dir):
            names = {n: isinstance(e, Dir) for n, e in base.children.items() if path or n not in self.generated}
        for name in self.store.children.get(path, ()):
            child = self.store.rows[join(path, name)]
            if child.kind == "deleted":
                names.pop(name, None)
            else:
                names[name] = child.kind == "dir"
        return names

    def moved(self, old: str, new: str, is_dir: bool) -> None:
        """Live nodes at ``old`` (and below it, for a directory) now live at ``new``."""
        node = self.live.pop(old, None)
        if node is not None:
            node.path = new
            self.live[new] = node
        if is_dir:
            for path, node in list(self.live.items()):
                if path.startswith(old + "/"):
                    del self.live[path]
                    node.path = new + path[len(old):]
                    self.live[node.path] = node

    def doomed(self, path: str, is_dir: bool) -> list[tuple["StagingNode", Row | None]]:
        """The live nodes at ``path`` (and below it) with their rows, before an
        operation removes them from the tree (see ``StagingNode.detach``)."""
        paths = [p for p in self.live if under(p, path)] if is_dir else [path]
        return [(self.live[p], self.store.rows.get(p)) for p in paths if p in self.live]

    def detach(self, doomed: list[tuple["StagingNode", Row | None]]) -> None:
        """Once the operation is done: those nodes are gone from the tree; open
        ones keep working."""
        for node, row in doomed:
            if self.live.get(node.path) is node:
                del self.live[node.path]
            node.detach(row)

    def base_entry(self, row: Row | None, path: str) -> File | Dir | None:
        """The base entry a path's bytes come from (the base tree is loaded)."""
        source = row.base_path if row is not None and row.base_path is not None else path
        return find(self._base, source) if self._base is not None else None

    # -- metadata ------------------------------------------------------------
    def meta_row(self, row: Row | None, base: File | Dir | None, path: str) -> Row:
        """A row for ``path`` that carries its current metadata (a base entry's
        defaults where nothing is staged)."""
        if row is not None:
            return row
        uid, gid = self.owner
        if isinstance(base, Dir) or (base is None and not path):
            mtime = base.mtime_ns if isinstance(base, Dir) else self.ns.newest_mtime_ns()
            return Row(path, "dir", uid=uid, gid=gid, mode=DIR_MODE, atime_ns=mtime, mtime_ns=mtime, ctime_ns=mtime)
        if not isinstance(base, File):  # nothing there any more (a detached node's last view)
            now = time.time_ns()
            return Row(path, "file", uid=uid, gid=gid, mode=FILE_MODE, atime_ns=now, mtime_ns=now, ctime_ns=now)
        meta = base.meta
        link = meta is not None and meta.link
        mode = LINK_MODE if link else meta.mode if meta is not None and meta.mode is not None else FILE_MODE
        return Row(path, "file", base_path=path, uid=uid, gid=gid, mode=mode,
                   atime_ns=base.mtime_ns, mtime_ns=base.mtime_ns, ctime_ns=base.mtime_ns)

    def times_of(self, row: Row) -> tuple[int, int]:
        """(mtime, ctime), with writes not yet saved in the row."""
        written = self.pending_times.get(row.blob) if row.blob is not None else None
        if written is not None:
            return max(written, row.mtime_ns or 0), max(written, row.ctime_ns or 0)
        return row.mtime_ns or 0, row.ctime_ns or 0

    def save_times(self, blob: str) -> None:
        """Write the time of a blob's last write into its rows."""
        written = self.pending_times.pop(blob, None)
        if written is not None:
            for row in self.store.rows_of(blob):
                self.store.put(replace(row, mtime_ns=max(written, row.mtime_ns or 0), ctime_ns=max(written, row.ctime_ns or 0)))

    def touch_dir(self, row: Row | None, base: File | Dir | None, path: str, now: int) -> None:
        """A directory's entries changed: its mtime and ctime are now (in the
        caller's transaction)."""
        dir_row = self.meta_row(row, base, path)
        self.store.put(replace(dir_row, mtime_ns=now, ctime_ns=now))

    # -- sparse blobs --------------------------------------------------------------
    async def sparse_of(self, row: Row) -> Sparse | None:
        if row.fill_limit is None or row.blob is None:
            return None
        await self.base_tree()
        return self.sparse_now(row)

    def sparse_now(self, row: Row) -> Sparse | None:
        """``sparse_of`` with the base tree loaded (one object per blob, shared by
        its open files)."""
        if row.fill_limit is None or row.blob is None:
            return None
        state = self.sparse.get(row.blob)
        if state is None:
            base = find(self._base, row.origin or row.path) if self._base is not None else None
            if not isinstance(base, File):
                raise FsError(errno.EIO, f"staging: the base of sparse {row.path} is gone")
            state = self.sparse[row.blob] = Sparse(base, row.fill_limit, self.store.present(row.blob))
        return state

    async def read_base(self, state: Sparse, start: int, stop: int) -> bytes:
        if state.reader is None:
            state.reader = await self.ns.open_file(state.base)
        data = bytes(await state.reader.read(start, stop - start))
        if len(data) != stop - start:
            raise FsError(errno.EIO, "staging: the base file is shorter than recorded")
        return data

    async def fill(self, row: Row) -> None:
        """Copy every byte a sparse blob still takes from the base into it (off
        the trio loop, a large piece at a time); the blob is then complete."""
        state = await self.sparse_of(row)
        if state is None or row.blob in self.blob_writers:
            return  # open for writing: its handles copy up as they go (a commit waits for them)
        fd = os.open(self.store.blob_path(row.blob), os.O_WRONLY)
        try:
            for start, stop in state.missing(0, state.limit):
                for offset in range(start, stop, COPY_CHUNK):
                    end = min(stop, offset + COPY_CHUNK)
                    data = await self.read_base(state, offset, end)
                    await trio.to_thread.run_sync(os.pwrite, fd, data, offset)
        finally:
            os.close(fd)
        with self.store.transaction():
            self.store.set_present(row.blob, [])
            for r in self.store.rows_of(row.blob):
                self.store.put(replace(r, fill_limit=None))
        state.limit = 0  # complete: open readers stop reading the base
        self.sparse.pop(row.blob, None)


class StagingNode(Node):
    ttl = SHORT_TTL
    keep_cache = False
    kind = "file"

    keeps_inode = True  # a local file system's inode numbers do not change

    def __init__(self, overlay: Overlay, path: str, key: tuple):
        self.overlay, self.path = overlay, path
        self.epoch = overlay.epoch
        self.key = key
        # Set once unlinked (or replaced) while the kernel still knows it: what
        # it was, kept for open descriptors and fstat until the last close.
        self.detached: Row | None = None
        self.detached_base: File | Dir | None = None
        self.detached_fd = -1

    def _check(self) -> None:
        if self.epoch != self.overlay.epoch:
            raise FsError(errno.ESTALE)  # staging was committed or discarded since

    def detach(self, row: Row | None) -> None:
        """This node's path no longer shows it (it was unlinked or replaced):
        keep what it was, for open descriptors and fstat until the last close."""
        self.detached = row if row is not None else self.overlay.meta_row(None, self.overlay.base_entry(None, self.path), self.path)
        self.detached_base = self.overlay.base_entry(row, self.path) if row is None or row.blob is None else None

    @property
    def gone(self) -> bool:
        return self.detached is not None

    async def current(self) -> tuple[Row, File | Dir | None]:
        """(a row with this node's metadata, the base entry behind it)."""
        self._check()
        if self.detached is not None:
            return self.detached, self.detached_base
        row, base = await self.overlay.resolve(self.path)
        if row is None and base is None and self.path:
            raise enoent()
        return self.overlay.meta_row(row, base, self.path), base

    def _attr(self, row: Row, is_dir: bool, size: int, nlink: int, is_link: bool = False) -> Attr:
        mtime, ctime = self.overlay.times_of(row)
        return Attr(is_dir, size, mtime, row.mode if row.mode is not None else 0, nlink=nlink, is_link=is_link,
                    uid=row.uid, gid=row.gid, atime_ns=row.atime_ns, ctime_ns=ctime)

    async def setxattr(self, name: str, value: bytes | None) -> None:
        raise FsError(errno.ENOTSUP, "extended attributes are not stored")

    @_local_errors
    async def setattr(self, changes: SetAttr, caller: Caller) -> None:
        self._check()
        async with self.overlay.lock:
            await self._setattr(changes, caller)
            self.overlay.touch()

    async def _setattr(self, changes: SetAttr, caller: Caller) -> None:
        overlay, store = self.overlay, self.overlay.store
        if changes.size is not None:
            await self._truncate(changes.size)
        row, base = await self.current()
        now = time.time_ns()
        mtime, ctime = overlay.times_of(row)
        new = replace(row, mtime_ns=mtime, ctime_ns=ctime)
        if changes.size is not None and changes.mtime_ns is None:
            new = replace(new, mtime_ns=now)
        changed = changes.size is not None
        mode = row.mode or 0
        if changes.uid is not None or changes.gid is not None:
            uid = changes.uid if changes.uid is not None else row.uid
            gid = changes.gid if changes.gid is not None else row.gid
            if caller.uid != 0:
                if uid != row.uid:
                    raise FsError(errno.EPERM, "only root may give a file away")
                if gid != row.gid and (caller.uid != row.uid or gid not in caller.groups()):
                    raise FsError(errno.EPERM, "the group must be one of the owner's groups")
            if self.kind != "dir" and self.kind != "link":
                # As on a local disk: a change of owner clears setuid, and setgid
                # where it means "run as the group" (group-executable).
                mode &= ~stat_mod.S_ISUID
                if mode & stat_mod.S_IXGRP:
                    mode &= ~stat_mod.S_ISGID
            new = replace(new, uid=uid, gid=gid, mode=mode)
            changed = True
        if changes.mode is not None and self.kind != "link":
            mode = stat_mod.S_IMODE(changes.mode)
            if caller.uid != 0 and (new.gid not in caller.groups()):
                mode &= ~stat_mod.S_ISGID
            new = replace(new, mode=mode)
            changed = True
        if changes.atime_ns is not None:
            new = replace(new, atime_ns=changes.atime_ns)
            changed = True
        if changes.mtime_ns is not None:
            new = replace(new, mtime_ns=changes.mtime_ns)
            changed = True
        if changed:
            new = replace(new, ctime_ns=changes.ctime_ns if changes.ctime_ns is not None else now)
        if new == row:
            return
        if self.gone:
            self.detached = new
            return
        if row.blob is not None:
            overlay.pending_times.pop(row.blob, None)
        store.put(new)

    async def _truncate(self, size: int) -> None:
        raise FsError(errno.EISDIR)

    async def listing_attr(self) -> Attr:
        return await self.attr()


class StagingFile(StagingNode):
    is_dir = False

    def detach(self, row: Row | None) -> None:
        super().detach(row)
        if row is not None and row.fill_limit is not None:
            self.overlay.sparse_now(row)  # its present ranges leave the spool with the row
        if row is not None and row.blob is not None:
            # Keep the content reachable: the blob's file goes once unused.
            self.detached_fd = os.open(self.overlay.store.blob_path(row.blob), os.O_RDWR)
            weakref.finalize(self, os.close, self.detached_fd)

    async def attr(self) -> Attr:
        row, base = await self.current()
        nlink = 0 if self.gone else 1
        if row.blob is not None:
            st = os.fstat(self.detached_fd) if self.detached_fd >= 0 else os.stat(self.overlay.store.blob_path(row.blob))
            return self._attr(row, False, st.st_size, nlink)
        source = self.detached_base if self.gone else await self.overlay.base_file(row, self.path)
        if not isinstance(source, File):
            raise enoent()
        return self._attr(row, False, await self.overlay.ns.file_size(source), nlink)

    async def listing_attr(self) -> Attr:
        row, base = await self.current()
        if row.blob is None:
            source = await self.overlay.base_file(row, self.path)
            if isinstance(source, File) and source.size is None and source.content is None:
                return Attr(False, 0, row.mtime_ns or 0, row.mode or 0, exact=False, uid=row.uid, gid=row.gid)
        return await self.attr()

    @_local_errors
    async def open(self, flags: int) -> Handle:
        self._check()
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        overlay = self.overlay
        if self.gone:
            if self.detached_fd >= 0:
                fd = os.open(f"/proc/self/fd/{self.detached_fd}", os.O_RDWR if writing else os.O_RDONLY)
                return BlobHandle(overlay, self.detached.blob, fd, bool(writing), await overlay.sparse_of(self.detached))
            if writing or not isinstance(self.detached_base, File):
                raise FsError(errno.ENOENT, "an unlinked file opened again for writing")
            return await overlay.ns.open_file(self.detached_base)
        if not writing:
            row, _ = await overlay.resolve(self.path)
            if row is not None and row.blob is not None:
                fd = os.open(overlay.store.blob_path(row.blob), os.O_RDONLY)
                return BlobHandle(overlay, row.blob, fd, False, await overlay.sparse_of(row))
            base = await overlay.base_file(row, self.path)
            if base is None:
                raise enoent()
            return await overlay.ns.open_file(base)
        async with overlay.lock:
            row = await self._copy_up(truncate=bool(flags & os.O_TRUNC))
            fd = os.open(overlay.store.blob_path(row.blob), os.O_RDWR)
            overlay.touch()
            return BlobHandle(overlay, row.blob, fd, True, await overlay.sparse_of(row))

    async def _copy_up(self, truncate: bool = False) -> Row:
        """Make sure this file's content is in a blob of its own; return its row."""
        overlay, store = self.overlay, self.overlay.store
        row, base = await overlay.resolve(self.path)
        if row is not None and row.blob is not None:
            if truncate:
                await self._truncate_blob(row, 0)
                now = time.time_ns()
                overlay.pending_times.pop(row.blob, None)
                row = replace(store.rows[self.path], mtime_ns=now, ctime_ns=now)
                store.put(row)
            return row
        source = await overlay.base_file(row, self.path)
        if source is None:
            raise enoent()
        meta = overlay.meta_row(row, base, self.path)
        size = 0 if truncate else await overlay.ns.file_size(source)
        blob = store.new_blob()
        path = store.blob_path(blob)
        sparse = size >= SPARSE_MIN and source.content is None
        try:
            if sparse:
                os.truncate(path, size)  # a hole of the full size: cheap
            elif size:
                await copy_into(overlay, source, path)
            origin = None if truncate else (row.base_path if row is not None and row.base_path else self.path)
            new = replace(meta, kind="file", blob=blob, base_path=None, origin=origin, tracked=origin is not None,
                          fill_limit=size if sparse else None)
            if truncate:
                now = time.time_ns()
                new = replace(new, mtime_ns=now, ctime_ns=now)
            store.put(new)
        except BaseException:
            os.unlink(path)
            raise
        return new

    async def _truncate_blob(self, row: Row, size: int) -> None:
        store = self.overlay.store
        path = store.blob_path(row.blob)
        old = os.fstat(self.detached_fd).st_size if self.detached_fd >= 0 else os.path.getsize(path)
        cut: Any = (os.ftruncate, self.detached_fd) if self.detached_fd >= 0 else (os.truncate, path)
        if max(old, size) - min(old, size) > LOOP_WRITE_MAX:
            await trio.to_thread.run_sync(*cut, size)  # freeing (or allocating) much can take milliseconds
        else:
            cut[0](cut[1], size)
        state = await self.overlay.sparse_of(row)
        if self.gone:
            return
        with store.transaction():
            if old != size and row.tracked:
                store.add_written(row.blob, [(min(old, size), max(old, size))])
            if state is not None and size < state.limit:
                # Bytes past the new end are zeros from now on, never the base's again.
                state.limit = size
                state.present = merge_ranges([(a, min(b, size)) for a, b in state.present if a < size])
                store.set_present(row.blob, state.present)
                store.put(replace(row, fill_limit=size if size else None))
                if not size:
                    self.overlay.sparse.pop(row.blob, None)

    async def _truncate(self, size: int) -> None:
        if self.detached_fd >= 0:
            await self._truncate_blob(self.detached, size)
            return
        if self.gone:
            raise FsError(errno.ENOENT)
        await self._copy_up(truncate=size == 0)
        await self._truncate_blob(self.overlay.store.rows[self.path], size)


class StagingLink(StagingNode):
    """A symbolic link: a staged row (``link``), or a link of the base."""

    is_dir = False
    kind = "link"

    async def attr(self) -> Attr:
        row, base = await self.current()
        nlink = 0 if self.gone else 1
        target = await self.readlink()
        return self._attr(replace(row, mode=LINK_MODE), False, len(os.fsencode(target)), nlink, is_link=True)

    async def readlink(self) -> str:
        row, base = await self.current()
        if row.target is not None:
            return row.target
        source = self.detached_base if self.gone else await self.overlay.base_file(row, self.path)
        if not isinstance(source, File):
            raise enoent()
        return await self.overlay.ns.link_target(source)


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
    kind = "dir"

    async def attr(self) -> Attr:
        row, base = await self.current()
        if self.gone:
            return self._attr(row, True, 0, 0)
        subdirs = self.overlay.store.subdir_delta.get(self.path, 0)
        if isinstance(base, Dir):
            subdirs += self.overlay.base_subdirs(base)
        return self._attr(row, True, 0, 2 + subdirs)

    async def lookup(self, name: str) -> Node:
        self._check()
        if self.gone:
            raise enoent()
        return await self.overlay.node(join(self.path, name))

    async def children(self) -> list[tuple[str, Node]]:
        self._check()
        if self.gone:
            return []
        row, base = await self.overlay.resolve(self.path)
        if isinstance(base, Dir):
            await self.overlay.ns.link_metas(base.children.values())
        listing = await self.overlay.listing(self.path)
        return [(name, await self.overlay.node(join(self.path, name))) for name in sorted(listing)]

    async def _absent(self, name: str) -> tuple[str, Row | None]:
        """The path of a new entry ``name`` here (EEXIST if taken) and the
        whiteout it replaces, if any."""
        if self.gone:
            raise enoent()
        path = join(self.path, name)
        row, base = await self.overlay.resolve(path)
        if row is not None or base is not None:
            if row is None or row.kind != "deleted":
                raise FsError(errno.EEXIST)
        return path, self.overlay.store.rows.get(path)

    async def _new_owner(self, caller: Caller, mode: int, is_dir: bool) -> tuple[Row, Row, Dir | File | None]:
        """A new entry's owner, group and mode (setgid directories pass on their
        group, and directories their setgid bit), and this directory's row and base."""
        here, base = await self.current()
        mode = stat_mod.S_IMODE(mode) & ~caller.umask
        gid = caller.gid
        if (here.mode or 0) & stat_mod.S_ISGID:
            gid = here.gid
            if is_dir:
                mode |= stat_mod.S_ISGID
        now = time.time_ns()
        return Row("", "file", uid=caller.uid, gid=gid, mode=mode, atime_ns=now, mtime_ns=now, ctime_ns=now), here, base

    def _touch(self, here: Row, base: Dir | File | None, now: int) -> None:
        self.overlay.store.put(replace(here, mtime_ns=now, ctime_ns=now))

    @_local_errors
    async def create(self, name: str, mode: int, caller: Caller) -> tuple[Node, Handle]:
        self._check()
        overlay, store = self.overlay, self.overlay.store
        async with overlay.lock:
            path, _ = await self._absent(name)
            new, here, base = await self._new_owner(caller, mode, False)
            blob, fd = store.open_new_blob()
            try:
                with store.transaction():
                    store.put(replace(new, path=path, blob=blob, ino=store.new_ino()))
                    self._touch(here, base, new.mtime_ns)
            except BaseException:
                os.close(fd)
                os.unlink(store.blob_path(blob))
                raise
            overlay.touch()
            handle = BlobHandle(overlay, blob, fd, True, None)
        return await overlay.node(path), handle

    @_local_errors
    async def mknod(self, name: str, mode: int, caller: Caller) -> Node:
        if stat_mod.S_IFMT(mode) not in (0, stat_mod.S_IFREG):
            kind = {stat_mod.S_IFIFO: "fifo", stat_mod.S_IFSOCK: "socket"}.get(stat_mod.S_IFMT(mode), "device node")
            raise FsError(errno.EPERM, f"{kind}s are not supported in staging")
        node, handle = await self.create(name, mode, caller)
        await handle.release()
        return node

    @_local_errors
    async def mkdir(self, name: str, mode: int, caller: Caller) -> Node:
        self._check()
        overlay, store = self.overlay, self.overlay.store
        async with overlay.lock:
            path, previous = await self._absent(name)
            new, here, base = await self._new_owner(caller, mode, True)
            # A directory made where a deleted one was must not show the old contents.
            opaque = previous is not None and previous.kind == "deleted"
            with store.transaction():
                store.put(replace(new, path=path, kind="dir", opaque=opaque, ino=store.new_ino()))
                self._touch(here, base, new.mtime_ns)
            overlay.touch()
        return await overlay.node(path)

    @_local_errors
    async def symlink(self, name: str, target: str, caller: Caller) -> Node:
        self._check()
        overlay, store = self.overlay, self.overlay.store
        async with overlay.lock:
            path, _ = await self._absent(name)
            new, here, base = await self._new_owner(caller, LINK_MODE, False)
            with store.transaction():
                store.put(replace(new, path=path, kind="link", target=target, mode=LINK_MODE, ino=store.new_ino()))
                self._touch(here, base, new.mtime_ns)
            overlay.touch()
        return await overlay.node(path)

    async def link(self, name: str, target: Node) -> Node:
        raise FsError(errno.EPERM, "hard links are not supported in staging")

    @_local_errors
    async def unlink(self, name: str) -> None:
        self._check()
        async with self.overlay.lock:
            path = join(self.path, name)
            if (await self.overlay.node(path)).is_dir:
                raise FsError(errno.EISDIR)
            await self._remove(path, False)
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
            await self._remove(path, True)
            self.overlay.touch()

    async def _base_has(self, path: str) -> bool:
        """Whether the base still shows something at ``path`` (so removal needs a whiteout)."""
        parent, name = split(path)
        row, base = await self.overlay.resolve(parent)
        return isinstance(base, Dir) and name in base.children

    async def _remove(self, path: str, is_dir: bool) -> None:
        overlay, store = self.overlay, self.overlay.store
        whiteout = await self._base_has(path)
        rows = store.subtree(path)
        here, base = await self.current()
        now = time.time_ns()
        doomed = overlay.doomed(path, is_dir)

        def remove() -> None:
            store.remove_many([row.path for row in rows])
            if whiteout:
                store.put(Row(path, "deleted"))
            self._touch(here, base, now)

        store.run_freeing(remove)
        overlay.detach(doomed)
        for row in rows:
            store.drop_blob(row.blob, row)
        store.keep_reserve()

    @_local_errors
    async def rename(self, name: str, new_parent: Node, new_name: str, flags: int) -> None:
        self._check()
        if not isinstance(new_parent, StagingDir):
            raise FsError(errno.EXDEV)
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        src, dst = join(self.path, name), join(new_parent.path, new_name)
        overlay, store = self.overlay, self.overlay.store
        async with overlay.lock:
            node = await overlay.node(src)
            if src == dst:
                return
            if under(dst, src):
                raise FsError(errno.EINVAL)
            try:
                target = await overlay.node(dst)
            except FsError:
                target = None
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                if node.is_dir and not target.is_dir:
                    raise FsError(errno.ENOTDIR)
                if not node.is_dir and target.is_dir:
                    raise FsError(errno.EISDIR)
                if target.is_dir and await overlay.listing(dst):
                    raise FsError(errno.ENOTEMPTY)
            now = time.time_ns()
            rows = await self._moved_rows(src, dst, now)
            replaced = store.subtree(dst) if target is not None else []
            whiteout_src = await self._base_has(src)
            removed = store.subtree(src)
            here, here_base = await self.current()
            there, there_base = await new_parent.current()
            moved_blobs = {r.blob for r in rows if r.blob}
            doomed = overlay.doomed(dst, target.is_dir) if target is not None else []
            with store.transaction():
                store.remove_many([r.path for r in replaced] + [r.path for r in removed])
                if whiteout_src:
                    store.put(Row(src, "deleted"))
                store.put_many(rows)  # moved directories are opaque: rows spell them out
                self._touch(here, here_base, now)
                if new_parent.path != self.path:
                    there = store.rows.get(new_parent.path, there)
                    new_parent._touch(there, there_base, now)
            overlay.detach(doomed)
            for row in replaced:
                if row.blob not in moved_blobs:
                    store.drop_blob(row.blob, row)
            overlay.moved(src, dst, node.is_dir)
            overlay.touch()

    async def _moved_rows(self, src: str, dst: str, now: int) -> list[Row]:
        """The rows that make ``dst`` show what ``src`` shows now (its ctime is now)."""
        overlay = self.overlay
        out: list[Row] = []
        pending = [(src, dst, True)]
        while pending:
            old, new, top = pending.pop()
            row, base = await overlay.resolve(old)
            meta = overlay.meta_row(row, base, old)
            if top:
                meta = replace(meta, ctime_ns=now)
            if meta.kind != "dir":
                if row is None:  # a base file or link: a reference to its bytes
                    meta = replace(meta, base_path=old)
                out.append(replace(meta, path=new))
            else:
                if row is None:  # a directory of the base: known by its base path still
                    meta = replace(meta, base_path=old)
                out.append(replace(meta, path=new, opaque=True))
                for name in await overlay.listing(old):
                    pending.append((join(old, name), join(new, name), False))
            if len(out) % BULK_YIELD == 0:
                await trio.sleep(0)
        return out


class BlobHandle(Handle):
    """An open staged file: reads and writes go to its blob with pread/pwrite on
    the trio loop (page-cache copies); only fsync leaves the loop.

    A writer records the ranges it writes. While any writer has the blob open,
    its row is marked untracked in the database, so a crash before the ranges
    are saved makes the commit compare the whole file instead of trusting them.
    A sparse blob's holes read from the base; a write first copies in the whole
    layout units it touches (``Overlay.sparse``).
    """

    def __init__(self, overlay: Overlay, blob: str, fd: int, writable: bool, sparse: Sparse | None):
        self.overlay, self.blob, self.fd, self.writable, self.sparse = overlay, blob, fd, writable, sparse
        self.ranges: list[tuple[int, int]] = []
        overlay.open_blobs[blob] = overlay.open_blobs.get(blob, 0) + 1
        self.was_tracked = False
        if self.writable:
            overlay.writers += 1
            overlay.blob_writers[blob] = overlay.blob_writers.get(blob, 0) + 1
            self.was_tracked = any(r.tracked for r in overlay.store.rows_of(blob))
            if self.was_tracked and overlay.blob_writers[blob] == 1:
                overlay.store.set_tracked(blob, False)

    @_local_errors
    async def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        sparse = self.sparse
        if sparse is None or offset >= sparse.limit or not data:
            return data
        holes = sparse.missing(offset, offset + len(data))
        if not holes:
            return data
        out = bytearray(data)
        for start, stop in holes:
            out[start - offset : stop - offset] = await self.overlay.read_base(sparse, start, stop)
        return bytes(out)

    @_local_errors
    async def write(self, offset: int, data: bytes) -> int:
        if self.sparse is not None and offset < self.sparse.limit:
            await self._fill_units(offset, offset + len(data))
        written = os.pwrite(self.fd, data, offset)
        if self.ranges and self.ranges[-1][1] == offset:
            self.ranges[-1] = (self.ranges[-1][0], offset + written)  # sequential: one range
        else:
            self.ranges.append((offset, offset + written))
        self.overlay.pending_times[self.blob] = time.time_ns()
        self.overlay.touch()
        return written

    async def _fill_units(self, start: int, stop: int) -> None:
        """Copy in from the base the header and the whole layout units that
        [start, stop) touches, but for the bytes this write replaces."""
        sparse = self.sparse
        header, unit = sparse.base.layout
        unit = max(unit, 1)
        wanted: list[tuple[int, int]] = [(0, min(header, sparse.limit))]
        first = start if start < header else header + (start - header) // unit * unit
        last = stop if stop <= header else header + -(-(stop - header) // unit) * unit
        wanted.append((first, min(last, sparse.limit)))
        fills = [gap for a, b in wanted for gap in sparse.missing(a, b)]
        if not fills:
            return
        for a, b in fills:
            # Only the parts this write does not cover are read from the base.
            for gap_start, gap_stop in ((a, min(b, start)), (max(a, stop), b)):
                if gap_start < gap_stop:
                    data = await self.overlay.read_base(sparse, gap_start, gap_stop)
                    if len(data) > LOOP_WRITE_MAX:
                        await trio.to_thread.run_sync(os.pwrite, self.fd, data, gap_start)
                    else:
                        os.pwrite(self.fd, data, gap_start)
        sparse.present = merge_ranges(sparse.present + [r for r in wanted if r[0] < r[1]])
        if self.blob in self.overlay.store.blob_rows:
            self.overlay.store.set_present(self.blob, sparse.present)

    def _save(self) -> None:
        store = self.overlay.store
        if self.blob not in store.blob_rows:
            self.ranges = []
            self.overlay.pending_times.pop(self.blob, None)
            return  # unlinked while open: nothing to keep
        if self.ranges and not self.was_tracked:
            self.ranges = []  # nothing trusts them: the commit compares such a file whole
        if not self.ranges and self.blob not in self.overlay.pending_times:
            return
        with store.transaction():
            if self.ranges:
                store.add_written(self.blob, merge_ranges(self.ranges))
                self.ranges = []
            self.overlay.save_times(self.blob)

    @_local_errors
    async def fsync(self) -> None:
        self._save()
        await trio.to_thread.run_sync(os.fsync, self.fd)
        await trio.to_thread.run_sync(self.overlay.store.sync)

    async def release(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        overlay = self.overlay
        overlay.open_blobs[self.blob] -= 1
        if not overlay.open_blobs[self.blob]:
            del overlay.open_blobs[self.blob]
        if not self.writable:
            return
        overlay.writers -= 1
        overlay.blob_writers[self.blob] -= 1
        last = not overlay.blob_writers[self.blob]
        if last:
            del overlay.blob_writers[self.blob]
        overlay.touch()
        try:
            self._save()
            if last and self.was_tracked:
                overlay.store.set_tracked(self.blob, True)
        except sqlite3.Error as e:
            # The row stays untracked: the commit compares the whole file. Safe.
            log.warning("cannot record the ranges written to a staged file (%s): it will be compared in full", e)


__all__ = ["Overlay", "Row", "Store", "StagingDir", "StagingFile", "StagingLink", "copy_into"]
