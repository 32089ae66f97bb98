"""The FUSE handlers (``fs.VersionFS``) driven without a kernel: the calls the
kernel would make for a path operation, on one trio loop in a thread. Errors come
back as ``OSError`` with the errno the kernel would hand the program, so a test
can run the same operation here and on a local directory and compare.

Only what the kernel itself decides (path walking, "is a directory" for an open
for writing) is done here; everything else is the daemon's answer.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pyfuse3
import trio

from versionfs.backends import open_backend
from versionfs.daemon import assemble
from versionfs.errors import FsError
from versionfs.worker import Worker


def ctx(uid: int = 0, gid: int = 0, umask: int = 0o022, pid: int = 0) -> SimpleNamespace:
    return SimpleNamespace(uid=uid, gid=gid, umask=umask, pid=pid)


def fields(**set_: bool) -> SimpleNamespace:
    names = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime", "update_mtime", "update_ctime")
    return SimpleNamespace(**{n: set_.get(n[len("update_"):], False) for n in names})


class Loop:
    """One trio loop in a thread; ``run(afn, *args)`` runs a coroutine on it."""

    def __init__(self) -> None:
        ready = threading.Event()
        self._stop: trio.Event | None = None

        async def main() -> None:
            self._stop = trio.Event()
            self.token = trio.lowlevel.current_trio_token()
            ready.set()
            await self._stop.wait()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        ready.wait()

    def run(self, afn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join()


class FastFS:
    """A mount of ``source`` without the kernel: ``staging/`` paths and the rest."""

    def __init__(self, source: str, state: str, loop: Loop | None = None):
        self.source, self.state = source, state
        self.loop = loop or Loop()
        self.worker = Worker()
        self.backend = self.worker.call(open_backend, source, None, None, 0)
        self.open_overlay()

    def open_overlay(self) -> None:
        """The parts as the daemon puts them together (``assemble``)."""
        mount = assemble(self.backend, self.worker, self.state)
        self.ns, self.fs = mount.namespace, mount.fs
        assert mount.overlay is not None and mount.committer is not None
        self.overlay, self.committer = mount.overlay, mount.committer
        self.ns.listeners.clear()  # no kernel to tell about new versions

    def remount(self) -> None:
        """As after an unmount and a mount: everything from the spool again."""
        self.overlay.store.close()
        self.open_overlay()

    def close(self) -> None:
        self.overlay.store.close()
        self.worker.call(self.backend.close)
        self.worker.close()

    # -- plumbing ----------------------------------------------------------------
    async def _call(self, afn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await afn(*args)
        except pyfuse3.FUSEError as e:
            raise OSError(e.errno, os.strerror(e.errno)) from None
        except FsError as e:  # a node called directly (readdir needs a kernel's token)
            raise OSError(e.errno, os.strerror(e.errno)) from None

    def call(self, afn: Callable[..., Any], *args: Any) -> Any:
        """One handler call, from the test's thread."""
        return self.loop.run(self._call, afn, *args)

    async def _walk(self, path: str, follow_last: bool = True, who: SimpleNamespace | None = None) -> tuple[int, bytes, int | None]:
        """What the kernel's path walk finds: (parent inode, last name, inode or
        None if the last name is absent), following symbolic links on the way
        (and at the end, with ``follow_last``) as the kernel does."""
        who = who or ctx()
        parts = [p for p in path.split("/") if p and p != "."]
        for _ in range(40):  # then ELOOP, as the kernel says
            here: list[str] = []
            inode, parent = pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE
            restart = None
            for i, name in enumerate(parts):
                if name == "..":
                    here = here[:-1]
                    inode = pyfuse3.ROOT_INODE
                    for up in here:
                        inode = (await self._call(self.fs.lookup, inode, os.fsencode(up), who)).st_ino
                    continue
                parent = inode
                last = i == len(parts) - 1
                try:
                    entry = await self._call(self.fs.lookup, inode, os.fsencode(name), who)
                except OSError as e:
                    if e.errno == errno.ENOENT and last:
                        return parent, os.fsencode(name), None
                    raise
                if stat.S_ISLNK(entry.st_mode) and (not last or follow_last):
                    target = os.fsdecode(await self._call(self.fs.readlink, entry.st_ino, who))
                    if target.startswith("/"):
                        raise OSError(errno.ENOENT, "a link out of the mount")
                    restart = here + [p for p in target.split("/") if p and p != "."] + parts[i + 1:]
                    break
                if not last and not stat.S_ISDIR(entry.st_mode):
                    raise OSError(errno.ENOTDIR, "not a directory")
                here.append(name)
                inode = entry.st_ino
            if restart is None:
                return parent, os.fsencode(parts[-1]) if parts else b"", inode
            parts = restart
        raise OSError(errno.ELOOP, "too many links")

    async def _ino(self, path: str, who: SimpleNamespace | None = None, follow: bool = True) -> int:
        _, _, inode = await self._walk(path, follow, who)
        if inode is None:
            raise OSError(errno.ENOENT, "no such file")
        return inode

    async def _parent(self, path: str) -> tuple[int, bytes]:
        parent, name, _ = await self._walk(path, follow_last=False)
        return parent, name

    async def _exists(self, path: str) -> bool:
        try:
            return (await self._walk(path, False))[2] is not None
        except OSError:
            return False

    def walk(self, path: str, follow_last: bool = True, who: SimpleNamespace | None = None) -> tuple[int, bytes, int | None]:
        return self.loop.run(self._walk, path, follow_last, who)

    def ino(self, path: str, who: SimpleNamespace | None = None, follow: bool = True) -> int:
        return self.loop.run(self._ino, path, who, follow)

    def stat(self, path: str, who: SimpleNamespace | None = None) -> pyfuse3.EntryAttributes:
        async def op() -> Any:
            return await self._call(self.fs.getattr, await self._ino(path, who), who or ctx())
        return self.loop.run(op)

    def lstat(self, path: str) -> pyfuse3.EntryAttributes:
        async def op() -> Any:
            return await self._call(self.fs.getattr, await self._ino(path, follow=False), ctx())
        return self.loop.run(op)

    def exists(self, path: str) -> bool:
        try:
            self.ino(path, follow=False)
            return True
        except OSError:
            return False

    # -- what programs do -------------------------------------------------------------
    async def _open(self, path: str, flags: int, mode: int = 0o666, who: SimpleNamespace | None = None) -> int:
        who = who or ctx()
        parent, name, inode = await self._walk(path, True, who)
        if inode is None:
            if not flags & os.O_CREAT:
                raise OSError(errno.ENOENT, "no such file")
            info, _ = await self._call(self.fs.create, parent, name, stat.S_IFREG | mode, flags, who)
            return info.fh
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.EEXIST, "exists")
        if stat.S_ISDIR((await self._call(self.fs.getattr, inode, who)).st_mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EISDIR, "is a directory")
        return (await self._call(self.fs.open, inode, flags, who)).fh

    def open(self, path: str, flags: int, mode: int = 0o666, who: SimpleNamespace | None = None) -> int:
        """open(2): a file handle (fh)."""
        return self.loop.run(self._open, path, flags, mode, who)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self.call(self.fs.read, fh, offset, size)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return self.call(self.fs.write, fh, offset, data)

    def close_fh(self, fh: int) -> None:
        self.call(self.fs.release, fh)

    async def _read_all(self, fh: int) -> bytes:
        out, offset = [], 0
        while chunk := await self._call(self.fs.read, fh, offset, 1 << 20):
            out.append(chunk)
            offset += len(chunk)
        return b"".join(out)

    def read_bytes(self, path: str) -> bytes:
        async def op() -> bytes:
            fh = await self._open(path, os.O_RDONLY)
            try:
                return await self._read_all(fh)
            finally:
                await self._call(self.fs.release, fh)
        return self.loop.run(op)

    def write_bytes(self, path: str, data: bytes, offset: int | None = None, append: bool = False) -> None:
        flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if offset is None and not append else os.O_CREAT if append else 0)

        async def op() -> None:
            fh = await self._open(path, flags)
            try:
                at = offset or 0
                if append:
                    at = (await self._call(self.fs.getattr, await self._ino(path), ctx())).st_size
                await self._call(self.fs.write, fh, at, data)
            finally:
                await self._call(self.fs.release, fh)
        self.loop.run(op)

    def truncate(self, path: str, size: int) -> None:
        async def op() -> None:
            inode = await self._ino(path)
            if stat.S_ISDIR((await self._call(self.fs.getattr, inode, ctx())).st_mode):
                raise OSError(errno.EISDIR, "is a directory")
            attr = pyfuse3.EntryAttributes()
            attr.st_size = size
            await self._call(self.fs.setattr, inode, attr, fields(size=True), None, ctx())
        self.loop.run(op)

    def setattr(self, path: str, who: SimpleNamespace | None = None, follow: bool = True, **values: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        for key, value in values.items():
            setattr(attr, f"st_{key}", value)
        set_ = {k.replace("_ns", ""): True for k in values}

        async def op() -> Any:
            inode = await self._ino(path, who, follow)
            return await self._call(self.fs.setattr, inode, attr, fields(**set_), None, who or ctx())
        return self.loop.run(op)

    def _at_parent(self, path: str, handler: Callable[..., Any], *args: Any) -> Any:
        async def op() -> Any:
            parent, name = await self._parent(path)
            return await self._call(handler, parent, name, *args)
        return self.loop.run(op)

    def mkdir(self, path: str, mode: int = 0o777, who: SimpleNamespace | None = None) -> None:
        self._at_parent(path, self.fs.mkdir, stat.S_IFDIR | mode, who or ctx())

    def mknod(self, path: str, mode: int, who: SimpleNamespace | None = None) -> None:
        self._at_parent(path, self.fs.mknod, mode, 0, who or ctx())

    def unlink(self, path: str, who: SimpleNamespace | None = None) -> None:
        self._at_parent(path, self.fs.unlink, who or ctx())

    def rmdir(self, path: str) -> None:
        self._at_parent(path, self.fs.rmdir, ctx())

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        async def op() -> None:
            old_parent, old_name = await self._parent(old)
            new_parent, new_name = await self._parent(new)
            # The kernel's own checks (lock_rename's "trap"): a target that is an
            # ancestor of the source is ENOTEMPTY, a source that is an ancestor of
            # the target EINVAL. The paths here have no links in them.
            src, dst = os.path.normpath(old), os.path.normpath(new)
            if await self._exists(src) and src != dst:
                if src.startswith(dst + "/"):
                    raise OSError(errno.ENOTEMPTY, "an ancestor")
                if dst.startswith(src + "/"):
                    raise OSError(errno.EINVAL, "into itself")
            await self._call(self.fs.rename, old_parent, old_name, new_parent, new_name, flags, ctx())
        self.loop.run(op)

    def symlink(self, target: str, path: str, who: SimpleNamespace | None = None) -> None:
        self._at_parent(path, self.fs.symlink, os.fsencode(target), who or ctx())

    def link(self, existing: str, path: str) -> None:
        async def op() -> None:
            inode = await self._ino(existing, follow=False)
            parent, name = await self._parent(path)
            await self._call(self.fs.link, inode, parent, name, ctx())
        self.loop.run(op)

    def readlink(self, path: str) -> str:
        async def op() -> bytes:
            return await self._call(self.fs.readlink, await self._ino(path, follow=False), ctx())
        return os.fsdecode(self.loop.run(op))

    def listdir(self, path: str) -> list[str]:
        async def op() -> list[str]:
            node = self.fs._node(await self._ino(path))
            return [name for name, _ in await self._call(node.children)]
        return self.loop.run(op)

    def rmtree(self, path: str) -> None:
        for name in self.listdir(path):
            child = f"{path}/{name}"
            if stat.S_ISDIR(self.lstat(child).st_mode):
                self.rmtree(child)
            else:
                self.unlink(child)
        self.rmdir(path)

    def tree(self, path: str) -> dict[str, Any]:
        """Relative path -> (kind, mode, content or link target or nlink)."""
        async def walk(inode: int, prefix: str, out: dict[str, Any]) -> None:
            node = self.fs._node(inode)
            for name, _ in await self._call(node.children):
                entry = await self._call(self.fs.lookup, inode, os.fsencode(name), ctx())
                rel = f"{prefix}{name}"
                if stat.S_ISDIR(entry.st_mode):
                    out[rel] = ("dir", stat.S_IMODE(entry.st_mode), entry.st_nlink)
                    await walk(entry.st_ino, rel + "/", out)
                elif stat.S_ISLNK(entry.st_mode):
                    out[rel] = ("link", os.fsdecode(await self._call(self.fs.readlink, entry.st_ino, ctx())))
                else:
                    fh = (await self._call(self.fs.open, entry.st_ino, os.O_RDONLY, ctx())).fh
                    try:
                        out[rel] = ("file", stat.S_IMODE(entry.st_mode), await self._read_all(fh))
                    finally:
                        await self._call(self.fs.release, fh)

        async def op() -> dict[str, Any]:
            out: dict[str, Any] = {}
            await walk(await self._ino(path), "", out)
            return out
        return self.loop.run(op)

    def commit(self, name: str | None = None) -> str | None:
        return self.loop.run(self.committer.commit, name)

    def status(self) -> list[str]:
        return self.loop.run(self.committer.status)

    def discard(self) -> None:
        self.loop.run(self.committer.discard)


@contextmanager
def fast_fs(source: Any, state: Any) -> Iterator[FastFS]:
    """A FastFS on ``source`` with its spool in ``state``; closed, with its loop, after."""
    fs = FastFS(str(source), str(state))
    try:
        yield fs
    finally:
        fs.close()
        fs.loop.close()


def local_tree(path: str) -> dict[str, Any]:
    """``FastFS.tree`` of a local directory."""
    out: dict[str, Any] = {}
    for name in sorted(os.listdir(path)):
        child = os.path.join(path, name)
        st = os.lstat(child)
        if stat.S_ISDIR(st.st_mode):
            out[name] = ("dir", stat.S_IMODE(st.st_mode), st.st_nlink)
            out.update({f"{name}/{k}": v for k, v in local_tree(child).items()})
        elif stat.S_ISLNK(st.st_mode):
            out[name] = ("link", os.readlink(child))
        else:
            with open(child, "rb") as f:
                out[name] = ("file", stat.S_IMODE(st.st_mode), f.read())
    return out
