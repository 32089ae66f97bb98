"""The pyfuse3 adapter: inodes, handles and errno mapping over namespace nodes.

It knows nothing of HDF5 or S3. Every handler goes through ``_guard``: an
``FsError`` becomes its errno; any other exception is answered as
``errors.classify`` says: a store's or the disk's condition with its errno and
one log line, anything unexpected with EIO, logged once with its traceback. No
handler can ever end the daemon.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections import Counter
from typing import Any, Awaitable, Callable, Hashable, Sequence, TypeVar

import pyfuse3
import trio

from .errors import FsError, classify
from .logs import once
from .namespace import REQUEST, Caller, Handle, Namespace, Node, Request, SetAttr, mode_bits

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
NAME_MAX = 255
# A size a listing left out (it costs a build: an .h5 image, a text file) stays
# left out this long for the stats that follow the listing (``ls -l``), unless
# the file is opened: then its exact size is given at once.
LISTING_GRACE = 2.0
# A request still unanswered after this long is given up (EINTR) once its caller
# is being killed: the kernel keeps a killed caller waiting (state D) until then.
INTERRUPT_CHECK = 0.25


def _guard(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: "VersionFS", *args: Any) -> Any:
        ctx = args[-1] if args and isinstance(args[-1], pyfuse3.RequestContext) else None
        request = Request(ctx.pid) if ctx is not None else None
        token = REQUEST.set(request)
        if request is not None:
            self._requests.add(request)
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception as e:  # noqa: BLE001 - the daemon must survive anything
            failure = classify(e)
            if failure.bug:
                self.report_failure(fn.__name__, e)
            else:  # the store's or the disk's condition, not a bug: one line, no traceback
                log.log(failure.level, "%s: %s (%s)", fn.__name__, e, errno.errorcode.get(failure.errno, failure.errno),
                        extra=once(("failure", fn.__name__, str(e))))
            raise pyfuse3.FUSEError(failure.errno) from None
        finally:
            REQUEST.reset(token)
            if request is not None:
                self._requests.discard(request)

    return wrapper  # type: ignore[return-value]


def being_killed(pid: int) -> bool:
    """Whether a process (a thread id, as FUSE gives it) is gone, a zombie, or has
    SIGKILL pending (a fatal signal, such as Ctrl-C's SIGINT without a handler,
    is turned into SIGKILL for every thread of the process)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return True
    if status.get("State", "").strip()[:1] in ("Z", "X"):
        return True
    sigkill = 1 << (9 - 1)
    return any(int(status.get(field, "0").strip() or "0", 16) & sigkill for field in ("SigPnd", "ShdPnd"))
def caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask, ctx.pid)


def _name(raw: bytes) -> str:
    if len(raw) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    return os.fsdecode(raw)


class VersionFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, namespace: Namespace):
        super().__init__()
        self.ns = namespace
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: namespace.root}
        self._inodes: dict[Hashable, int] = {namespace.root.key: pyfuse3.ROOT_INODE}
        self._lookups: Counter[int] = Counter()
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, Any] = {}
        self._next_fh = 1
        self._failures: Counter[tuple[str, str]] = Counter()
        self._root_names: set[str] = set()  # root entries the kernel may have cached
        self._placeholders: dict[int, float] = {}  # inode -> until when a listing's placeholder attributes stand
        self._requests: set[Request] = set()  # being answered (those with a caller)
        self.uid, self.gid = os.getuid(), os.getgid()
        namespace.listeners.append(self.invalidate_root_entries)

    @property
    def failure_count(self) -> int:
        """Requests answered with EIO because of an unexpected error."""
        return sum(self._failures.values())

    # -- bookkeeping ------------------------------------------------------------
    def report_failure(self, op: str, exc: BaseException) -> None:
        key = (op, f"{type(exc).__name__}: {exc}")
        self._failures[key] += 1
        log.error("%s failed, answering EIO: %s", op, key[1], exc_info=exc, extra=once(("eio", key)))
        log.debug("%s failed (%d times): %s", op, self._failures[key], key[1])

    def _inode(self, node: Node, count: bool) -> int:
        inode = self._inodes.get(node.key)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._inodes[node.key] = inode
        self._nodes[inode] = node  # the freshest view of the same object
        if count:
            self._lookups[inode] += 1
        return inode

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    async def _entry(self, node: Node, count: bool = True, listing: bool = False) -> pyfuse3.EntryAttributes:
        inode = self._inode(node, False)  # counted below, once the kernel is sure to get the entry
        placeholder = listing
        if not listing and inode in self._placeholders:  # a stat right after a listing (ls -l)
            placeholder = self._placeholders[inode] > time.monotonic()
            if not placeholder:
                del self._placeholders[inode]
        attr = await (node.listing_attr() if placeholder else node.attr())
        if listing and not attr.exact:
            self._note_placeholder(inode)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        # A listing's placeholder stands for the stats that follow it (ls -l) in the
        # kernel too; an open invalidates it there (see open).
        entry.entry_timeout = entry.attr_timeout = node.ttl if attr.exact else LISTING_GRACE if listing else 0
        entry.st_mode = mode_bits(attr)
        entry.st_nlink = attr.nlink
        entry.st_uid = self.uid if attr.uid is None else attr.uid
        entry.st_gid = self.gid if attr.gid is None else attr.gid
        entry.st_size = attr.size
        entry.st_blksize = 1 << 17
        entry.st_blocks = -(-attr.size // 512)
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_atime_ns = attr.mtime_ns if attr.atime_ns is None else attr.atime_ns
        entry.st_ctime_ns = attr.mtime_ns if attr.ctime_ns is None else attr.ctime_ns
        if count:
            self._lookups[inode] += 1
        return entry

    def _note_placeholder(self, inode: int) -> None:
        now = time.monotonic()
        if len(self._placeholders) > 8192:
            self._placeholders = {i: t for i, t in self._placeholders.items() if t > now}
        self._placeholders[inode] = now + LISTING_GRACE

    async def watch_callers(self) -> None:
        """Give up the waits of requests whose caller is being killed (run in the
        daemon's nursery). pyfuse3 does not pass FUSE_INTERRUPT on, so the caller
        is asked of /proc: a killed process that waits on us has SIGKILL pending."""
        while True:
            await trio.sleep(INTERRUPT_CHECK)
            now = time.monotonic()
            for request in list(self._requests):
                if not request.interrupted and now - request.started >= INTERRUPT_CHECK and being_killed(request.pid):
                    log.info("request of process %d given up: the process is being killed", request.pid)
                    request.interrupt()

    def _new_handle(self, obj: Any) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = obj
        return fh

    def _handle(self, fh: int) -> Any:
        obj = self._handles.get(fh)
        if obj is None:
            raise FsError(errno.EBADF)
        return obj

    def invalidate_root_entries(self) -> None:
        """After a new version or a new staging: the kernel forgets every root
        entry (latest, staging, @…); looked up again, they get fresh inodes."""
        for name in self._root_names:
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, os.fsencode(name), ignore_enoent=True)
        self._root_names.clear()

    # -- lookups and attributes ------------------------------------------------
    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self._node(parent_inode).lookup(_name(name))
        if parent_inode == pyfuse3.ROOT_INODE:
            self._root_names.add(os.fsdecode(name))
        return await self._entry(node)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(self._node(inode), count=False)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            self._lookups[inode] -= nlookup
            if self._lookups[inode] <= 0 and inode != pyfuse3.ROOT_INODE:
                del self._lookups[inode]
                node = self._nodes.pop(inode, None)
                if node is not None and not node.keeps_inode:
                    self._inodes.pop(node.key, None)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(await self._node(inode).readlink())

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # The listing is taken once per opendir so that offsets stay stable.
        return self._new_handle((inode, await self._node(inode).children()))

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, entries = self._handle(fh)
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            entry = await self._entry(node, count=False, listing=True)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, i + 1):
                break
            self._lookups[entry.st_ino] += 1  # readdirplus counts as a lookup
            if inode == pyfuse3.ROOT_INODE:
                self._root_names.add(name)

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        space = self.ns.space()  # the disk staged data goes to, if any
        if space is not None:
            for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
                setattr(data, attr, getattr(space, attr))
        else:
            data.f_bsize = data.f_frsize = 4096
        data.f_namemax = NAME_MAX
        return data

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # `ls -l` asks two or three of these for every entry (SELinux label, ACLs):
        # only user.* attributes ever exist here, so the others are answered at once.
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._getxattr(inode, name)

    @_guard
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        value = (await self._node(inode).xattrs()).get(os.fsdecode(name))
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in await self._node(inode).xattrs()]

    # -- files --------------------------------------------------------------
    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if self._placeholders.pop(inode, 0) > time.monotonic():
            # Opened: its reader needs the exact size, which the kernel must ask for
            # again (it would stop reads at the placeholder's). No writeback cache:
            # safe from a handler.
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError as e:
                log.debug("cannot invalidate inode %d: %s", inode, e)
        handle: Handle = await node.open(flags)
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=node.keep_cache)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._handle(fh).read(off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._handle(fh).write(off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        await self._handle(fh).flush()

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._handle(fh).fsync()

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @_guard
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            await handle.release()

    # -- changes (read-only nodes answer EROFS) ----------------------------------
    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, handle = await self._node(parent_inode).create(_name(name), mode, caller(ctx))
        return pyfuse3.FileInfo(fh=self._new_handle(handle)), await self._entry(node)

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(await self._node(parent_inode).mkdir(_name(name), mode, caller(ctx)))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._node(parent_inode).unlink(_name(name))

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._node(parent_inode).rmdir(_name(name))

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode_old)
        await parent.rename(_name(name_old), self._node(parent_inode_new), _name(name_new), flags)

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        # pyfuse3 has turned UTIME_NOW into the time now; UTIME_OMIT leaves a field unset.
        await node.setattr(SetAttr(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        ), caller(ctx))
        return await self._entry(node, count=False)

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(await self._node(parent_inode).symlink(_name(name), os.fsdecode(target), caller(ctx)))

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(await self._node(new_parent_inode).link(_name(new_name), self._node(inode)))

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(await self._node(parent_inode).mknod(_name(name), mode, caller(ctx)))

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._node(inode).setxattr(os.fsdecode(name), value)

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._node(inode).setxattr(os.fsdecode(name), None)
