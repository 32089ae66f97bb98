"""Which path is which version: the one place that maps the mount's layout
(DESIGN.md section 1) onto a backend's versions and trees.

Nodes are backend-agnostic: they hold ``Dir``/``File`` entries that a backend
built, and ask the backend (on the worker thread) only for data. ``fs.py`` turns
nodes into inodes; it never looks inside them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from . import selectors
from .backends.base import Backend, Dir, File, VersionInfo
from .cache import BlockReader
from .errors import FsError, enoent
from .worker import Worker

log = logging.getLogger(__name__)

# Version trees never change: the kernel may cache them for a day. What moves
# when a version is added (root, versions/, latest, relative selectors) gets a
# second, and is invalidated explicitly as well.
IMMUTABLE_TTL = 86400.0
SHORT_TTL = 1.0
TREE_CACHE_SIZE = 32


@dataclass(frozen=True)
class Attr:
    is_dir: bool
    size: int
    mtime_ns: int
    mode: int  # permission bits
    nlink: int = 1


class Node:
    """A file-system object. Subclasses override what they support; the rest of
    the file-system interface answers EROFS (reads) or ENOTDIR/EISDIR."""

    key: Hashable
    is_dir = False
    ttl = IMMUTABLE_TTL  # how long the kernel may cache this node's name and attributes
    keep_cache = True  # its content never changes

    async def attr(self) -> Attr:
        raise NotImplementedError

    async def lookup(self, name: str) -> "Node":
        raise FsError(errno.ENOTDIR)

    async def children(self) -> list[tuple[str, "Node"]]:
        raise FsError(errno.ENOTDIR)

    async def open(self, flags: int) -> "Handle":
        raise FsError(errno.EISDIR)

    async def xattrs(self) -> dict[str, bytes]:
        return {}

    # Changes: read-only unless a subclass says otherwise.
    async def create(self, name: str, mode: int) -> tuple["Node", "Handle"]:
        raise FsError(errno.EROFS)

    async def mkdir(self, name: str, mode: int) -> "Node":
        raise FsError(errno.EROFS)

    async def unlink(self, name: str) -> None:
        raise FsError(errno.EROFS)

    async def rmdir(self, name: str) -> None:
        raise FsError(errno.EROFS)

    async def rename(self, name: str, new_parent: "Node", new_name: str, flags: int) -> None:
        raise FsError(errno.EROFS)

    async def setattr(self, size: int | None, mtime_ns: int | None, mode: int | None) -> None:
        raise FsError(errno.EROFS)

    async def make_special(self, name: str, kind: str) -> "Node":
        """Symlinks, hard links and device nodes."""
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
    """A file of a version. Keyed by (version, path) so that every view of the
    same version (latest/, versions/v/, @sel/) shares one inode and page cache."""

    def __init__(self, ns: "Namespace", version: str, path: str, entry: File):
        self.ns, self.entry = ns, entry
        self.key = ("file", version, path)

    async def attr(self) -> Attr:
        return Attr(False, await self.ns.file_size(self.entry), self.entry.mtime_ns, 0o444)

    async def _open(self) -> Handle:
        return await self.ns.open_file(self.entry)

    async def xattrs(self) -> dict[str, bytes]:
        """The stored file's own metadata (S3 user metadata), if the backend has any."""
        if self.entry.ref is None or not hasattr(self.ns.backend, "xattrs"):
            return {}
        return await self.ns.worker.run(self.ns.backend.xattrs, self.entry.ref)


class BlockReaderHandle(Handle):
    def __init__(self, reader: BlockReader):
        self.reader = reader

    async def read(self, offset: int, size: int) -> bytes:
        return await self.reader.read(offset, size)


class TreeDir(Node):
    """A directory of a version, as seen through one view (latest, versions, @sel).
    Views get distinct inodes: the kernel refuses a directory with two parents."""

    is_dir = True

    def __init__(self, ns: "Namespace", view: str, version: str, path: str, entry: Dir, ttl: float = IMMUTABLE_TTL):
        self.ns, self.view, self.version, self.path, self.entry = ns, view, version, path, entry
        self.key = ("dir", view, version, path)
        self.ttl = ttl

    async def attr(self) -> Attr:
        subdirs = sum(isinstance(e, Dir) for e in self.entry.children.values())
        return Attr(True, 0, self.entry.mtime_ns, 0o555, nlink=2 + subdirs)

    def _child(self, name: str, entry: Dir | File) -> Node:
        path = f"{self.path}/{name}"
        if isinstance(entry, Dir):
            return TreeDir(self.ns, self.view, self.version, path, entry)
        return TreeFile(self.ns, self.version, path, entry)

    async def lookup(self, name: str) -> Node:
        entry = self.entry.children.get(name)
        if entry is None:
            raise enoent()
        return self._child(name, entry)

    async def children(self) -> list[tuple[str, Node]]:
        return [(n, self._child(n, e)) for n, e in self.entry.children.items()]


class VersionsDir(Node):
    """``versions/``: one directory per version, oldest first."""

    is_dir = True
    ttl = SHORT_TTL
    key = ("versions",)

    def __init__(self, ns: "Namespace"):
        self.ns = ns

    async def attr(self) -> Attr:
        return Attr(True, 0, self.ns.newest_mtime_ns(), 0o555, nlink=2 + len(self.ns.index))

    async def lookup(self, name: str) -> Node:
        info = self.ns.by_name.get(name)
        if info is None:
            raise enoent()
        return await self.ns.version_root("versions", info)

    async def children(self) -> list[tuple[str, Node]]:
        return [(v.name, await self.ns.version_root("versions", v)) for v in self.ns.all_versions]


class Root(Node):
    is_dir = True
    ttl = SHORT_TTL
    key = ("root",)

    def __init__(self, ns: "Namespace"):
        self.ns = ns
        self.info: dict[str, bytes] = {}  # xattrs the daemon publishes (pid, source)

    async def attr(self) -> Attr:
        return Attr(True, 0, self.ns.newest_mtime_ns(), 0o555, nlink=4)

    async def xattrs(self) -> dict[str, bytes]:
        return dict(self.info)

    async def lookup(self, name: str) -> Node:
        if name == "latest":
            return await self.ns.latest()
        if name == "versions":
            return self.ns.versions_dir
        if name.startswith("@"):
            return await self.ns.select(name)
        if name == "staging" and self.ns.overlay is not None:
            return await self.ns.overlay.node("")
        raise enoent()

    async def children(self) -> list[tuple[str, Node]]:
        out: list[tuple[str, Node]] = []
        if self.ns.current_info() is not None:
            out.append(("latest", await self.ns.latest()))
        out.append(("versions", self.ns.versions_dir))
        if self.ns.overlay is not None:
            out.append(("staging", await self.ns.overlay.node("")))
        return out


class Namespace:
    """The mount's layout over one backend. Call ``await reload()`` after the
    version list may have changed; it returns the root names to invalidate."""

    def __init__(self, backend: Backend, worker: Worker):
        self.backend, self.worker = backend, worker
        self._trees: OrderedDict[str, Dir] = OrderedDict()
        self.root = Root(self)
        self.versions_dir = VersionsDir(self)
        self.all_versions: list[VersionInfo] = []
        self.by_name: dict[str, VersionInfo] = {}
        self.index: selectors.VersionIndex[VersionInfo] = selectors.VersionIndex([], [])
        self._current: str | None = None
        # Starts background tasks (prefetch) in the daemon's nursery, once serving.
        self.spawn: Callable[..., Any] | None = None
        self.overlay: Any = None  # staging.Overlay, when the mount has staging/
        self.listeners: list[Callable[[], None]] = []  # told when versions or staging change

    def space(self) -> os.statvfs_result | None:
        return os.statvfs(self.overlay.store.directory) if self.overlay is not None else None

    def notify_changed(self) -> None:
        for listener in self.listeners:
            listener()

    def load(self) -> None:
        """Read the version list (blocking; call on the worker)."""
        versions = self.backend.versions()
        current = self.backend.current()
        self.all_versions = versions
        self.by_name = {v.name: v for v in versions}
        # Selectors count real versions only: a placeholder (HDF5's empty
        # __first_version__) is listed in versions/ but is never @0 or an as-of answer.
        real = [v for v in versions if not v.placeholder]
        self.index = selectors.VersionIndex(real, [v.timestamp for v in real])
        self._current = current if current in self.by_name else (versions[-1].name if versions else None)

    async def reload(self) -> bool:
        """Read the version list again; True if it changed."""
        before = ([v.name for v in self.all_versions], self._current)
        await self.worker.run(self.load)
        return ([v.name for v in self.all_versions], self._current) != before

    def current_info(self) -> VersionInfo | None:
        return self.by_name.get(self._current) if self._current else None

    def newest_mtime_ns(self) -> int:
        return max((v.mtime_ns for v in self.all_versions), default=0)

    async def tree(self, name: str) -> Dir:
        tree = self._trees.get(name)
        if tree is None:
            tree = await self.worker.run(self.backend.tree, name)
            self._trees[name] = tree
            while len(self._trees) > TREE_CACHE_SIZE:
                self._trees.popitem(last=False)
        else:
            self._trees.move_to_end(name)
        return tree

    async def file_size(self, entry: File) -> int:
        if entry.size is None:
            entry.size = await self.worker.run(self.backend.file_size, entry.ref)
        return entry.size

    async def open_file(self, entry: File) -> Handle:
        """A read handle on a file of a version (shared by every view and staging)."""
        if entry.content is not None:
            return BytesHandle(entry.content)
        size = await self.file_size(entry)
        backend, ref = self.backend, entry.ref
        fetch = lambda offset, length: self.worker.run(backend.read, ref, offset, length)  # noqa: E731
        window = {"max_window": entry.readahead} if entry.readahead else {}
        return BlockReaderHandle(BlockReader(fetch, size, entry.layout, self.spawn, **window))

    async def version_root(self, view: str, info: VersionInfo, ttl: float = IMMUTABLE_TTL) -> TreeDir:
        return TreeDir(self, view, info.name, "", await self.tree(info.name), ttl)

    async def latest(self) -> TreeDir:
        info = self.current_info()
        if info is None:
            raise enoent()
        return await self.version_root("latest", info, SHORT_TTL)

    async def select(self, name: str) -> TreeDir:
        """``@<selector>`` at the root; ENOENT for anything that is not one."""
        selector = selectors.parse(name[1:])
        info = self.index.resolve(selector) if selector else None
        if info is None:
            raise enoent()
        ttl = SHORT_TTL if selector.is_relative() else IMMUTABLE_TTL
        return await self.version_root(name, info, ttl)


def mode_bits(attr: Attr) -> int:
    return (stat_mod.S_IFDIR if attr.is_dir else stat_mod.S_IFREG) | attr.mode


__all__ = ["Attr", "Handle", "Namespace", "Node", "mode_bits"]
