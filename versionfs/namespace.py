"""Which path is which version: the one place that maps the mount's layout
(doc/SEMANTICS.md § The layout) onto a backend's versions and trees.

Nodes are backend-agnostic: they hold ``Dir``/``File`` entries that a backend
built, and ask the backend (through the worker) only for data. ``fs.py`` turns
nodes into inodes; it never looks inside them.
"""

from __future__ import annotations

import contextvars
import errno
import hashlib
import logging
import os
import stat as stat_mod
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple
from urllib.parse import quote, unquote

import outcome
import trio

from . import selectors
from .backends.base import (LINK_MAX, NAME_MAX, NO_ATTRS, Backend, Dir, Entry, File, FileMeta, History, Revision, VersionInfo,
                            find, join, to_ns)
from .cache import BlockReader, Lru, ReadAheadBudget, release_freed_memory
from .errors import FsError, enoent
from .logs import once
from .worker import Worker

log = logging.getLogger(__name__)

# Version trees never change: the kernel may cache them for a day. What moves
# when a version is added (root, versions/, latest, relative selectors) gets a
# second, and is invalidated explicitly as well.
IMMUTABLE_TTL = 86400.0
SHORT_TTL = 1.0
# What is kept in memory, by size (doc/OPERATING.md § Disk and memory): entries of whole trees,
# entries of single directories, entries of history directories. An entry is
# about half a KiB, so each is bounded at about 50 MiB.
TREE_CACHE_ENTRIES = 100_000
LISTING_CACHE_ENTRIES = 100_000
HISTORY_CACHE_ENTRIES = 100_000
BIG_BUILD = 0.1  # seconds: backend work that long is followed by giving freed memory back


class Request:
    """The FUSE request a task is answering: who asked, since when, and the waits
    that can be given up when its caller is killed (``Namespace.run``)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.started = time.monotonic()
        self.interrupted = False
        self.waits: set[trio.CancelScope] = set()

    def interrupt(self) -> None:
        self.interrupted = True
        for scope in self.waits:
            scope.cancel()


# Set by fs.py for the task that answers a request.
REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar("versionfs_request", default=None)
# The mode bits a file or directory of a version shows where the version kept
# none (staging shows the same, so copying latest/ back into it changes nothing):
# versions are read-only all the same (EROFS).
FILE_MODE, DIR_MODE = 0o644, 0o755
# How long a lookup or stat waits for a file's metadata (S3: a HEAD) before it
# answers with defaults the kernel does not keep (the request goes on and fills
# the cache): a store that does not answer never holds up lookups for long.
META_WAIT = 1.0


@dataclass(frozen=True)
class Attr:
    is_dir: bool
    size: int
    mtime_ns: int
    mode: int  # permission bits (with setuid, setgid, sticky)
    nlink: int = 1
    is_link: bool = False  # a symbolic link (``history/…/@-1``, a stored link)
    exact: bool = True  # False: a listing's placeholder (size not computed); never cached by the kernel
    uid: int | None = None  # None: the mounting user
    gid: int | None = None
    atime_ns: int | None = None  # None: the mtime
    ctime_ns: int | None = None


@dataclass(frozen=True)
class Caller:
    """Who asks (the FUSE request context)."""

    uid: int
    gid: int
    umask: int = 0o022
    pid: int = 0

    def groups(self) -> frozenset[int]:
        """The caller's groups: its gid and supplementary groups (from /proc)."""
        found = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        found.update(int(g) for g in line.split()[1:])
                        break
        except (OSError, ValueError):
            pass
        return frozenset(found)


ROOT = Caller(0, 0, 0)


@dataclass(frozen=True)
class SetAttr:
    """A setattr request: each field None means "leave as it is"."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None


class Node:
    """A file-system object. Subclasses override what they support; the rest of
    the file-system interface answers EROFS (reads) or ENOTDIR/EISDIR."""

    key: Hashable
    is_dir = False
    ttl = IMMUTABLE_TTL  # how long the kernel may cache this node's name and attributes
    keep_cache = True  # its content never changes
    # True: the key keeps its inode number after the kernel forgets it (staging,
    # whose entries a test may stat before and after; version trees need not).
    keeps_inode = False

    async def attr(self) -> Attr:
        raise NotImplementedError

    async def listing_attr(self) -> Attr:
        """The attributes a directory listing gives: ``attr()`` unless that is costly."""
        return await self.attr()

    async def lookup(self, name: str) -> "Node":
        raise FsError(errno.ENOTDIR)

    async def children(self) -> list[tuple[str, "Node"]]:
        raise FsError(errno.ENOTDIR)

    async def open(self, flags: int) -> "Handle":
        raise FsError(errno.EISDIR)

    async def xattrs(self) -> dict[str, bytes]:
        return {}

    async def readlink(self) -> str:
        raise FsError(errno.EINVAL)

    # Changes: read-only unless a subclass says otherwise.
    async def create(self, name: str, mode: int, caller: Caller) -> tuple["Node", "Handle"]:
        raise FsError(errno.EROFS)

    async def mkdir(self, name: str, mode: int, caller: Caller) -> "Node":
        raise FsError(errno.EROFS)

    async def unlink(self, name: str) -> None:
        raise FsError(errno.EROFS)

    async def rmdir(self, name: str) -> None:
        raise FsError(errno.EROFS)

    async def rename(self, name: str, new_parent: "Node", new_name: str, flags: int) -> None:
        raise FsError(errno.EROFS)

    async def setattr(self, changes: SetAttr, caller: Caller) -> None:
        raise FsError(errno.EROFS)

    async def symlink(self, name: str, target: str, caller: Caller) -> "Node":
        raise FsError(errno.EROFS)

    async def mknod(self, name: str, mode: int, caller: Caller) -> "Node":
        """A regular file (mode S_IFREG or no type); fifos, sockets and devices."""
        raise FsError(errno.EROFS)

    async def link(self, name: str, target: "Node") -> "Node":
        """A hard link to ``target`` named ``name`` in this directory."""
        raise FsError(errno.EROFS)

    async def setxattr(self, name: str, value: bytes | None) -> None:
        """Set (or, with None, remove) an extended attribute."""
        raise FsError(errno.EROFS)


class Handle:
    async def read(self, offset: int, size: int) -> bytes:
        raise FsError(errno.EBADF)

    async def write(self, offset: int, data: bytes) -> int:
        raise FsError(errno.EBADF)

    async def flush(self) -> None:
        pass

    async def fsync(self) -> None:
        pass

    async def release(self) -> None:
        pass


class BytesHandle(Handle):
    def __init__(self, content: bytes):
        self.content = content

    async def read(self, offset: int, size: int) -> bytes:
        return self.content[offset : offset + size]


class _ReadOnlyFile(Node):
    async def open(self, flags: int) -> Handle:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FsError(errno.EROFS)
        return await self._open()

    async def _open(self) -> Handle:
        raise NotImplementedError


class TreeFile(_ReadOnlyFile):
    """A file of a version. Keyed by what it is, e.g. ("file", version, path), so
    that every view of the same version (latest/, versions/v/, @sel/) shares one
    inode and page cache."""

    def __init__(self, ns: "Namespace", key: Hashable, entry: File, ttl: float = IMMUTABLE_TTL, own_mtime: bool = True):
        self.ns, self.entry, self.key, self.ttl = ns, entry, key, ttl
        self.own_mtime = own_mtime  # False: the entry's mtime says it all (history/ shows the revision's time)

    async def attr(self) -> Attr:
        meta = await self.ns.file_meta_soon(self.entry)
        if meta is None:
            return Attr(False, await self.ns.file_size(self.entry), self.entry.mtime_ns, FILE_MODE, exact=False)
        return Attr(False, await self.ns.file_size(self.entry), *self._mtime_mode(meta))

    def _mtime_mode(self, meta: FileMeta) -> tuple[int, int]:
        mode = meta.mode if meta.mode is not None else FILE_MODE  # as committed
        mtime = meta.mtime_ns if meta.mtime_ns is not None and self.own_mtime else self.entry.mtime_ns
        return mtime, mode

    async def listing_attr(self) -> Attr:
        # A size not known yet (an .h5 image, a text file) costs a build or a read,
        # metadata not known yet (S3) a request: a listing pays neither; the kernel
        # asks again, for exact attributes, when something stats or reads the file.
        entry = self.entry
        if entry.meta is None:  # a regular file all the same: a link's metadata is fetched with the listing
            return Attr(False, entry.size or 0, entry.mtime_ns, FILE_MODE, exact=False)
        if entry.size is None and entry.content is None:  # only the size stands in: the rest is known
            return Attr(False, 0, *self._mtime_mode(entry.meta), exact=False)
        return await self.attr()

    async def _open(self) -> Handle:
        return await self.ns.open_file(self.entry)

    async def xattrs(self) -> dict[str, bytes]:
        """The stored file's own metadata (S3 user metadata), if the backend has any."""
        if self.entry.ref is None:
            return {}
        return await self.ns.worker.run(self.ns.backend.xattrs, self.entry.ref)


class TreeLink(Node):
    """A symbolic link stored in a version (its content is the target)."""

    def __init__(self, ns: "Namespace", key: Hashable, entry: File, ttl: float = IMMUTABLE_TTL, own_mtime: bool = True):
        self.ns, self.entry, self.key, self.ttl = ns, entry, key, ttl
        self.own_mtime = own_mtime

    async def attr(self) -> Attr:
        meta = await self.ns.file_meta(self.entry)
        mtime = meta.mtime_ns if meta.mtime_ns is not None and self.own_mtime else self.entry.mtime_ns
        return Attr(False, len(os.fsencode(await self.readlink())), mtime, 0o777, is_link=True)

    async def readlink(self) -> str:
        return await self.ns.link_target(self.entry)


class BlockReaderHandle(Handle):
    def __init__(self, reader: BlockReader):
        self.reader = reader

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        return await self.reader.read(offset, size)

    async def release(self) -> None:
        self.reader.close()  # its read-ahead goes back to the budget


class TreeDir(Node):
    """A directory of a version, as seen through one view (latest, versions, @sel).
    Views get distinct inodes: the kernel refuses a directory with two parents.
    Its entries are loaded when it is listed or looked into, one directory at a
    time; its own attributes cost nothing (link count 1: subdirectories are not
    counted, as on btrfs)."""

    is_dir = True

    def __init__(self, ns: "Namespace", view: str, version: str, path: str, entry: Dir, ttl: float = IMMUTABLE_TTL):
        self.ns, self.view, self.version, self.path, self.entry = ns, view, version, path, entry
        self.key = ("dir", view, version, path)
        self.ttl = ttl

    async def attr(self) -> Attr:
        return Attr(True, 0, self.entry.mtime_ns, DIR_MODE, nlink=1)

    def _child(self, name: str, entry: Dir | File) -> Node:
        path = join(self.path, name)
        if isinstance(entry, Dir):
            return TreeDir(self.ns, self.view, self.version, path, entry)
        return self.ns.file_node(("file", self.version, path), entry)

    async def _entries(self) -> dict[str, Dir | File]:
        return await self.ns.listdir(self.version, self.path, self.entry.ref)

    async def lookup(self, name: str) -> Node:
        entry = (await self._entries()).get(name)
        if entry is None:
            raise enoent()
        if isinstance(entry, File) and entry.may_be_link:
            await self.ns.file_meta_soon(entry)  # a link or a file: known before the kernel gets an inode
        return self._child(name, entry)

    async def children(self) -> list[tuple[str, Node]]:
        entries = await self._entries()
        await self.ns.link_metas(entries.values())
        return [(n, self._child(n, e)) for n, e in entries.items()]


class VersionsDir(Node):
    """``versions/``: one directory per version, oldest first, each followed by
    its image file (``<name>.h5``) where the backend has one."""

    is_dir = True
    ttl = SHORT_TTL
    key = ("versions",)

    def __init__(self, ns: "Namespace"):
        self.ns = ns

    async def attr(self) -> Attr:
        return Attr(True, 0, self.ns.newest_mtime_ns(), 0o555, nlink=2 + len(self.ns.index))

    async def lookup(self, name: str) -> Node:
        info = self.ns.by_name.get(name)
        if info is not None:
            return self.ns.version_root("versions", info)
        info = self.ns.by_name.get(self.ns.image_base(name) or "")
        if info is None or self.ns.image_name(info) is None:
            raise enoent()
        return await self.ns.image(info)

    async def children(self) -> list[tuple[str, Node]]:
        # Names and times only: no version's tree, listing or image is built.
        out: list[tuple[str, Node]] = []
        images = await self.ns.images(self.ns.all_versions) if self.ns.backend.image_ext else {}
        for v in self.ns.all_versions:
            out.append((v.name, self.ns.version_root("versions", v)))
            if v.name in images and self.ns.image_name(v) is not None:
                out.append((v.name + self.ns.backend.image_ext, images[v.name]))
        return out


class Root(Node):
    is_dir = True
    ttl = SHORT_TTL
    key = ("root",)

    def __init__(self, ns: "Namespace", info: Mapping[str, bytes]):
        self.ns = ns
        self.info = info  # xattrs the daemon publishes (pid, source, control socket)

    async def attr(self) -> Attr:
        # "." and "..", then versions/ and history/, and latest/ and staging/ where they exist
        subdirs = 2 + (self.ns.current_info() is not None) + (self.ns.overlay is not None)
        return Attr(True, 0, self.ns.newest_mtime_ns(), 0o555, nlink=2 + subdirs)

    async def xattrs(self) -> dict[str, bytes]:
        return dict(self.info)

    async def lookup(self, name: str) -> Node:
        if name == "latest":
            return self.ns.latest()
        if name == "versions":
            return self.ns.versions_dir
        if name == "history":
            return HistoryDir(self.ns, "")
        image_base = self.ns.image_base(name)
        if image_base == "latest":
            return await self.ns.latest_image()
        if name.startswith("@"):
            try:
                return await self.ns.select(name)  # a version's tree (also @id:<name ending in .h5>)
            except FsError:
                if image_base is None:
                    raise
            return await self.ns.select(image_base, image=True)
        if name == "staging" and self.ns.overlay is not None:
            return await self.ns.overlay.node("")
        raise enoent()

    async def children(self) -> list[tuple[str, Node]]:
        out: list[tuple[str, Node]] = []
        if self.ns.current_info() is not None:
            out.append(("latest", self.ns.latest()))
            if self.ns.backend.image_ext:
                out.append(("latest" + self.ns.backend.image_ext, await self.ns.latest_image()))
        out.append(("versions", self.ns.versions_dir))
        out.append(("history", HistoryDir(self.ns, "")))
        if self.ns.overlay is not None:
            out.append(("staging", await self.ns.overlay.node("")))
        return out


class HistoryDir(Node):
    """``history/<path>/``: the names that ever existed below ``path`` (each a
    history directory again) and, if ``path`` was a file, one read-only file per
    distinct version of it, oldest first. ``@<selector>`` inside it is a symlink
    to the entry it selects. Its attributes are cheap on purpose: listing a
    history directory must not compute the history of every child."""

    is_dir = True
    ttl = SHORT_TTL  # new versions add entries

    def __init__(self, ns: "Namespace", path: str):
        self.ns, self.path = ns, path
        self.key = ("history", path)

    async def attr(self) -> Attr:
        return Attr(True, 0, self.ns.newest_mtime_ns(), 0o555, nlink=2)

    async def lookup(self, name: str) -> Node:
        latest = self.ns.current_info()
        if not self.path and not self.ns.has_history("") and latest is not None:
            # A name the latest version has was there: no need for the names of
            # every version (a listing per version) to go into history/<name>/.
            if name in await self.ns.listdir(latest.name, "", None):
                return HistoryDir(self.ns, name)
        listing = await self.ns.history(self.path)
        # Real names first: a file or directory named "@…" stays reachable.
        entry = listing.entries.get(name)
        if entry is not None:
            if entry.file.may_be_link:
                await self.ns.file_meta_soon(entry.file)
            return self.ns.file_node(("history-file", self.path, name), entry.file, own_mtime=False)
        if name in listing.history.children:
            return HistoryDir(self.ns, join(self.path, name))
        selector = selectors.parse(name[1:]) if name.startswith("@") else None
        chosen = listing.index.resolve(selector) if selector is not None else None
        if chosen is None and isinstance(selector, selectors.ById):
            chosen = listing.index.resolve(selectors.ById(unquote(selector.id)))  # the id as entry names show it
        if chosen is None:
            raise enoent()
        ttl = SHORT_TTL if selector.is_relative() else IMMUTABLE_TTL
        return HistoryLink(("history-link", self.path, name), chosen, ttl)

    async def children(self) -> list[tuple[str, Node]]:
        listing = await self.ns.history(self.path)
        await self.ns.link_metas(entry.file for entry in listing.entries.values())
        out: list[tuple[str, Node]] = [(n, HistoryDir(self.ns, join(self.path, n))) for n in listing.history.children]
        out += [(n, self.ns.file_node(("history-file", self.path, n), entry.file, own_mtime=False))
                for n, entry in listing.entries.items() if n not in listing.history.children]
        return out


class HistoryLink(Node):
    """``@<selector>`` in a history directory: a symlink to the entry it selects."""

    def __init__(self, key: Hashable, target: tuple[str, HistoryEntry], ttl: float):
        self.key, self.ttl = key, ttl
        self.target, (self.revision, _) = target

    async def attr(self) -> Attr:
        return Attr(False, len(os.fsencode(self.target)), to_ns(self.revision.timestamp), 0o777, is_link=True)

    async def readlink(self) -> str:
        return self.target


class HistoryEntry(NamedTuple):
    """One entry of ``history/<path>/`` (one per revision: kept in bulk, as small as a tuple)."""

    revision: Revision
    file: File  # the file shown: the revision's, with its time as mtime (empty for a deletion)


@dataclass(frozen=True)
class HistoryListing:
    """A ``History`` with its entries' names and files, and its selector index
    (made in one place)."""

    history: History
    entries: dict[str, HistoryEntry]  # by entry name
    index: selectors.VersionIndex[tuple[str, HistoryEntry]]  # (entry name, entry) items


def history_listing(history: History) -> HistoryListing:
    """Entry names ``NNNN_<time>_<id>`` (``…_deleted`` for a deletion); the id is
    percent-encoded so that any VersionId is one safe name (doc/SEMANTICS.md § Odd names)."""
    width = max(4, len(str(len(history.revisions) - 1)))
    entries: dict[str, HistoryEntry] = {}
    for position, revision in enumerate(history.revisions):
        id_text = quote(revision.version_id, safe="-._~")
        suffix = "_deleted" if revision.file is None else ""
        name = f"{position:0{width}d}_{revision.time_label}_{id_text}{suffix}"
        if len(name.encode()) > NAME_MAX:  # a very long id: its hash stands in
            digest = hashlib.sha1(revision.version_id.encode()).hexdigest()[:16]
            name = f"{position:0{width}d}_{revision.time_label}_~{digest}{suffix}"
        mtime = to_ns(revision.timestamp)
        if revision.file is None:
            shown = File(size=0, mtime_ns=mtime, content=b"")
        else:  # (the same object where the time agrees: one kept per entry, not two)
            shown = revision.file if revision.file.mtime_ns == mtime else replace(revision.file, mtime_ns=mtime)
        entries[name] = HistoryEntry(revision, shown)
    items = list(entries.items())
    index = selectors.VersionIndex(items, [r.timestamp for _, (r, _) in items], [r.version_id for _, (r, _) in items])
    return HistoryListing(history, entries, index)


class Namespace:
    """The mount's layout over one backend. Call ``await reload()`` after the
    version list may have changed; it returns the root names to invalidate."""

    def __init__(self, backend: Backend, worker: Worker, readahead: ReadAheadBudget | None = None,
                 root_xattrs: Mapping[str, bytes] = NO_ATTRS):
        self.backend, self.worker = backend, worker
        # One bound on the read-ahead of every open file together (--readahead-memory).
        self.readahead = readahead if readahead is not None else ReadAheadBudget()
        self._trees: Lru[Dir] = Lru(TREE_CACHE_ENTRIES, weight=_tree_size)
        self._listings: Lru[dict[str, Entry]] = Lru(LISTING_CACHE_ENTRIES, weight=len)
        self._running: dict[Hashable, _Running] = {}  # backend work under way, by what it makes
        self.root = Root(self, root_xattrs)
        self.versions_dir = VersionsDir(self)
        self.all_versions: list[VersionInfo] = []
        self.by_name: dict[str, VersionInfo] = {}
        self.index: selectors.VersionIndex[VersionInfo] = selectors.VersionIndex([], [])
        self._current: str | None = None
        self._newest_mtime_ns = 0
        # Starts background tasks (builds, prefetch) once serving (``run_background``).
        self.spawn: Callable[..., Any] | None = None
        self.overlay: Any = None  # staging.Overlay, when the mount has staging/
        self._images: dict[str, File] = {}  # version -> its image file entry (sizes are kept)
        self._histories: Lru[HistoryListing] = Lru(HISTORY_CACHE_ENTRIES, weight=lambda h: 1 + len(h.entries) + len(h.history.children))
        self.listeners: list[Callable[[], None]] = []  # told when versions or staging change

    def space(self) -> os.statvfs_result | None:
        return os.statvfs(self.overlay.store.directory) if self.overlay is not None else None

    def notify_changed(self) -> None:
        for listener in self.listeners:
            listener()

    async def run_background(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the namespace's background work (shared builds, prefetch) until
        cancelled: the daemon starts this in its nursery once serving."""
        async with trio.open_nursery() as nursery:
            self.spawn = nursery.start_soon
            task_status.started()
            await trio.sleep_forever()

    def load(self) -> None:
        """Read the version list (blocking; call on the worker)."""
        versions = self.backend.versions()
        current = self.backend.current()
        self.all_versions = versions
        self.by_name = {v.name: v for v in versions}
        # Asked for by every getattr of the root, versions/ and history/: computed once.
        self._newest_mtime_ns = max((v.mtime_ns for v in versions), default=0)
        # Selectors count real versions only: a placeholder (HDF5's empty
        # __first_version__) is listed in versions/ but is never @0 or an as-of answer.
        real = [v for v in versions if not v.placeholder]
        self.index = selectors.VersionIndex(real, [v.timestamp for v in real], [v.name for v in real])
        self._current = current if current in self.by_name else (versions[-1].name if versions else None)

    def _state(self) -> tuple[Any, ...]:
        # A backend whose versions can gain content under the same name (S3 on a
        # store with whole-second times) says so with its listing's signature.
        return ([v.name for v in self.all_versions], self._current, self.backend.signature)

    async def reload(self) -> bool:
        """Read the version list again; True if it changed."""
        before = self._state()
        await self.worker.run(self.load)
        changed = self._state() != before
        if changed:
            self._histories.clear()
            self._trees.clear()
            self._listings.clear()
        return changed

    def kept(self) -> dict[str, int]:
        """Entries each cache holds now (doc/OPERATING.md § Disk and memory)."""
        return {"tree entries": self._trees.total, "listing entries": self._listings.total,
                "history entries": self._histories.total, "image entries": len(self._images)}

    def current_info(self) -> VersionInfo | None:
        return self.by_name.get(self._current) if self._current else None

    def newest_mtime_ns(self) -> int:
        return self._newest_mtime_ns

    async def run(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking backend work that may take long (a tree, a listing, a history,
        an image), done once for everyone who asks for the same ``key`` meanwhile,
        in the background: a request that waits for it can be answered (EINTR, by
        fs.py) when its caller is killed, and what was built is kept for the next."""
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = _Running(trio.Event())

            async def work() -> None:
                started = time.monotonic()
                try:
                    running.result = await outcome.acapture(self.worker.run, fn, *args)
                    if time.monotonic() - started > BIG_BUILD:  # its temporaries go back to the system
                        await trio.to_thread.run_sync(release_freed_memory)
                finally:
                    del self._running[key]
                    running.done.set()

            if self.spawn is None:  # no daemon nursery (a test driving the namespace): in line
                await work()
            else:
                self.spawn(work)
        request = REQUEST.get()
        with trio.CancelScope() as wait:
            if request is not None:
                request.waits.add(wait)
                if request.interrupted:
                    wait.cancel()
            await running.done.wait()
        if request is not None:
            request.waits.discard(wait)
        if wait.cancelled_caught:  # the caller was killed: answered now, the work goes on for the next
            raise FsError(errno.EINTR)
        assert running.result is not None
        return running.result.unwrap()

    async def tree(self, name: str) -> Dir:
        """A whole version (staging's base, commits, rollbacks)."""
        tree = self._trees.get(name)
        if tree is None:
            tree = self._trees.put(name, await self.run(("tree", name), self.backend.tree, name))
        return tree

    async def listdir(self, version: str, path: str, ref: Any) -> dict[str, Entry]:
        """One directory of a version: from its whole tree if that is loaded anyway,
        else one backend listing, kept by size."""
        tree = self._trees.get(version)
        if tree is not None:
            entry = find(tree, path)
            if isinstance(entry, Dir):
                return entry.children
        key = (version, path)
        entries = self._listings.get(key)
        if entries is None:
            entries = self._listings.put(key, await self.run(("listdir", key), self.backend.listdir, version, path, ref))
        return entries
    def file_node(self, key: Hashable, entry: File, ttl: float = IMMUTABLE_TTL, own_mtime: bool = True) -> Node:
        """The node of a file of a version: a link where its metadata says so
        (metadata not known yet: a file node, whose listing gives no inode)."""
        if entry.meta is not None and entry.meta.link:
            return TreeLink(self, key, entry, ttl, own_mtime)
        return TreeFile(self, key, entry, ttl, own_mtime)

    async def file_meta(self, entry: File) -> FileMeta:
        if entry.meta is None:
            entry.meta = await self.worker.run(self.backend.file_meta, entry.ref)
        return entry.meta

    async def link_metas(self, entries: Iterable[Dir | File]) -> None:
        """Before a listing gives inodes: the metadata of the files that may be
        links (not known yet: small S3 objects), in one batch of requests. A
        link must be a link from its first inode on: the kernel keeps the type."""
        wanted = [e for e in entries if isinstance(e, File) and e.meta is None and e.may_be_link]
        if wanted:
            metas = await self.worker.run(self.backend.file_metas, [e.ref for e in wanted])
            for entry, meta in zip(wanted, metas):
                entry.meta = meta

    async def file_meta_soon(self, entry: File) -> FileMeta | None:
        """``file_meta``, or None if the store takes longer than META_WAIT (the
        request still completes and fills the backend's cache)."""
        if entry.meta is not None:
            return entry.meta
        with trio.move_on_after(META_WAIT):
            entry.meta = await self.worker.run_or_leave(self.backend.file_meta, entry.ref)
            return entry.meta
        log.warning("the store is slow to give a file's metadata: its mode and mtime are shown as defaults for now",
                    extra=once("slow-meta"))
        return None

    async def link_target(self, entry: File) -> str:
        handle = await self.open_file(entry)
        try:
            return os.fsdecode(bytes(await handle.read(0, LINK_MAX + 1)))
        finally:
            await handle.release()

    async def file_size(self, entry: File) -> int:
        if entry.size is None:
            entry.size = await self.run(("size", entry.ref), self.backend.file_size, entry.ref)
        return entry.size

    async def open_file(self, entry: File) -> Handle:
        """A read handle on a file of a version (shared by every view and staging)."""
        if entry.content is not None:
            return BytesHandle(entry.content)
        size = await self.file_size(entry)
        backend, ref = self.backend, entry.ref
        fetch = lambda offset, length: self.worker.read(backend.read, ref, offset, length)  # noqa: E731
        window = {"max_window": entry.readahead} if entry.readahead else {}
        return BlockReaderHandle(BlockReader(fetch, size, entry.layout, self.spawn, budget=self.readahead, **window))

    def version_root(self, view: str, info: VersionInfo, ttl: float = IMMUTABLE_TTL) -> TreeDir:
        return TreeDir(self, view, info.name, "", Dir(mtime_ns=info.mtime_ns), ttl)

    def latest(self) -> TreeDir:
        info = self.current_info()
        if info is None:
            raise enoent()
        return self.version_root("latest", info, SHORT_TTL)

    async def select(self, name: str, image: bool = False) -> Node:
        """``@<selector>`` at the root (its image, with ``image``); ENOENT for
        anything that is not one."""
        selector = selectors.parse(name[1:])
        info = self.index.resolve(selector) if selector else None
        if info is None:
            raise enoent()
        ttl = SHORT_TTL if selector.is_relative() else IMMUTABLE_TTL
        if image:
            return await self.image(info, ttl)
        return self.version_root(name, info, ttl)

    # -- X.h5: a version as one file ------------------------------------------------------
    def image_base(self, name: str) -> str | None:
        """``X`` for a name ``X.h5`` when the backend has images, else None."""
        ext = self.backend.image_ext
        if ext and name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
        return None

    def image_name(self, info: VersionInfo) -> str | None:
        """``<name>.h5`` in versions/, or None where that name cannot be shown: it
        is another version's own name (the directory wins), or over 255 bytes.
        Either is logged once; the image stays reachable by position or time
        (``@<n>.h5``)."""
        name = info.name + (self.backend.image_ext or "")
        why = "is another version's name" if name in self.by_name else "is too long" if len(name.encode()) > NAME_MAX else None
        if why is None:
            return name
        log.warning("versions/%s is not shown: the name %s (reach the image by position or time: @<n>.h5)", name, why,
                    extra=once(("unshown-image", name)))
        return None

    async def image(self, info: VersionInfo, ttl: float = IMMUTABLE_TTL) -> TreeFile:
        return (await self.images([info], ttl))[info.name]

    async def images(self, infos: list[VersionInfo], ttl: float = IMMUTABLE_TTL) -> dict[str, TreeFile]:
        """The image files of versions (their entries only: nothing is built), in
        one backend call for all that were never asked for."""
        missing = [v.name for v in infos if v.name not in self._images]
        if missing:
            self._images.update(await self.worker.run(lambda: {v: self.backend.image(v) for v in missing}))
        return {v.name: TreeFile(self, ("image", v.name), self._images[v.name], ttl) for v in infos}

    async def latest_image(self) -> TreeFile:
        info = self.current_info()
        if info is None:
            raise enoent()
        return await self.image(info, SHORT_TTL)

    # -- history/ ---------------------------------------------------------------------------
    def has_history(self, path: str) -> bool:
        return self._histories.get(path) is not None

    async def history(self, path: str) -> HistoryListing:
        """What ``history/<path>/`` shows; ENOENT if nothing was ever there."""
        listing = self._histories.get(path)
        if listing is None:
            history = await self.run(("history", path), self.backend.history, path)
            if path and not history.children and not history.revisions:
                raise enoent()
            listing = self._histories.put(path, history_listing(history))
        return listing


@dataclass
class _Running:
    done: trio.Event
    result: outcome.Outcome | None = None


def _tree_size(tree: Dir) -> int:
    """Entries in a whole tree (what it costs to keep)."""
    size, pending = 0, [tree]
    while pending:
        directory = pending.pop()
        size += len(directory.children)
        pending += [e for e in directory.children.values() if isinstance(e, Dir)]
    return size


def mode_bits(attr: Attr) -> int:
    kind = stat_mod.S_IFDIR if attr.is_dir else stat_mod.S_IFLNK if attr.is_link else stat_mod.S_IFREG
    return kind | attr.mode


__all__ = ["Attr", "Handle", "Namespace", "Node", "mode_bits"]
