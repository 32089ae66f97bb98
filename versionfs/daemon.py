"""The daemon's lifetime: checks, mount, serve on trio, readiness, signals, unmount.

``serve`` runs in the foreground. ``start_background`` re-runs this program with
``-f`` in a new session and waits on a pipe until the child says the mount is
usable (or why it is not), so ``versionfs mount`` returns only once it can be used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import pyfuse3
import trio

from . import control
from .backends import is_store_url, open_backend
from .backends.base import Backend
from .cache import ReadAheadBudget, give_back_big_buffers
from .commit import Committer, finish_interrupted
from .control import XATTR_CONTROL
from .errors import ControlError, UserError
from .fs import VersionFS
from .mounts import FSTYPE, XATTR_ENDPOINT, XATTR_PID, XATTR_SOURCE, mount_fstype
from .namespace import Namespace
from .options import OPTIONS, MountOptions
from .selectors import choose
from .spool import SpoolLock
from .staging import Overlay
from .worker import Worker

log = logging.getLogger(__name__)
FUSE_DEVICE = "/dev/fuse"


def is_mountpoint(path: str) -> bool:
    return mount_fstype(path) is not None


def check_mountpoint(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path}: mount point does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{path}: mount point is not a directory")
    if is_mountpoint(path):
        raise UserError(f"{path}: something is already mounted there")
    if os.listdir(path):
        raise UserError(f"{path}: mount point is not empty (versionfs mounts only on an empty directory)")


def check_fuse_device() -> None:
    if not os.path.exists(FUSE_DEVICE):
        raise UserError(f"{FUSE_DEVICE} is missing: load the fuse module (modprobe fuse) or give the container the device")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise UserError(f"{FUSE_DEVICE}: permission denied (add yourself to the 'fuse' group or run as root)")


def fuse_options(opts: MountOptions) -> set[str]:
    options = set(pyfuse3.default_options) | {f"fsname=versionfs:{opts.source}", "subtype=versionfs"}
    for option in opts.fuse_options:
        options.add(option)
    return options


def fuse_mount(fs: VersionFS, mountpoint: str, options: set[str]) -> None:
    """``pyfuse3.init``, with libfuse's reason for a refusal as the message: libfuse
    writes it to file descriptor 2 and pyfuse3 raises only "fuse_session_new()
    failed". What libfuse wrote on a success (``-o debug``) is passed on to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:
        os.dup2(said.fileno(), 2)
        try:
            pyfuse3.init(fs, mountpoint, options)
            failure = None
        except RuntimeError as e:
            failure = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        text = said.read().decode(errors="replace")
    if failure is not None:
        raise UserError(fuse_refusal(mountpoint, text, str(failure)))
    sys.stderr.write(text)


def fuse_refusal(mountpoint: str, said: str, failure: str) -> str:
    """One line for a mount that libfuse or fusermount3 refused."""
    unknown = re.search(r"unknown option\(s\): `(.*)'", said)
    if unknown:
        names = [w for part in unknown[1].split() for w in part.removeprefix("-o").split(",") if w]
        own = ", ".join(f"{o.name}=" for o in OPTIONS)
        return (f"unknown mount option {', '.join(map(repr, names))}: versionfs takes {own}; "
                "FUSE takes ro, allow_other, default_permissions, … (see mount.fuse3(8))")
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    reason = lines[-1].removeprefix("fuse: ") if lines else failure
    return f"{mountpoint}: cannot mount: {reason}"


@dataclass
class Mount:
    """A mount's parts, put together by ``assemble``."""

    namespace: Namespace
    fs: VersionFS  # the FUSE handlers
    overlay: Overlay | None  # staging/ (None: a read-only mount)
    committer: Committer | None

    def close(self) -> None:
        if self.overlay is not None:
            self.overlay.store.close()


def assemble(backend: Backend, worker: Worker, spool: str | None, root_xattrs: Mapping[str, bytes] | None = None,
             readahead: ReadAheadBudget | None = None) -> Mount:
    """The one place a mount is put together from its parts: the namespace over
    ``backend`` (its version list read), with staging/ on the spool directory
    ``spool`` (None: read-only) once a commit the last daemon left unfinished is
    finished, and the FUSE handlers over it. Blocks (call before serving)."""
    namespace = Namespace(backend, worker, readahead, root_xattrs or {})
    worker.call(namespace.load)
    overlay = committer = None
    if spool is not None:
        overlay = Overlay(namespace, spool)
        try:
            finish_interrupted(overlay, set(namespace.by_name))
            overlay.check_source(backend.identity, backend.description)
        except BaseException:
            overlay.store.close()
            raise
        namespace.overlay = overlay  # the namespace shows it as staging/
        committer = Committer(namespace, overlay)
    return Mount(namespace, VersionFS(namespace), overlay, committer)


def serve(opts: MountOptions, ready: Callable[[str | None], None]) -> None:
    """Mount and serve until unmounted or signalled. ``ready(None)`` is called once
    the mount answers; ``ready(message)`` if it never will. Blocks."""
    give_back_big_buffers()
    worker = Worker()
    backend: Backend | None = None
    mounted = False
    lock: SpoolLock | None = None
    mount: Mount | None = None
    try:
        mountpoint = os.path.abspath(opts.mountpoint)
        source = opts.source if is_store_url(opts.source) else os.path.abspath(opts.source)
        backend = worker.call(open_backend, source, opts.endpoint_url, cache_dir(opts.cache_dir), opts.cache_size,
                              opts.store_timeout)
        worker.adopt(backend.execution)
        check_mountpoint(mountpoint)
        check_fuse_device()
        root_xattrs = {
            XATTR_PID: str(os.getpid()).encode(),
            XATTR_SOURCE: os.fsencode(backend.description),
            XATTR_CONTROL: os.fsencode(control.socket_path(mountpoint)),
        }
        if opts.endpoint_url:
            root_xattrs[XATTR_ENDPOINT] = opts.endpoint_url.encode()
        spool = None
        if not opts.read_only:
            spool = spool_dir(opts.state_dir, backend)
            lock = SpoolLock(spool, mountpoint)  # one writable mount per source and state directory
        mount = assemble(backend, worker, spool, root_xattrs, ReadAheadBudget(opts.readahead_memory))
        fuse_mount(mount.fs, mountpoint, fuse_options(opts))
        mounted = True
        os.chdir("/")  # never keep a directory busy
        log.info("mounted %s on %s", backend.description, mountpoint)
        trio.run(_serve, mount, opts, mountpoint, ready)
    except UserError as e:
        ready(str(e))
        raise
    except BaseException as e:
        ready(f"internal error: {e} (the traceback is in the daemon's log)")
        raise
    finally:
        if mounted:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", opts.mountpoint)
        if mount is not None:
            mount.close()
        if lock is not None:
            lock.release()
        if backend is not None:
            worker.call(backend.close)
        worker.close()


async def _serve(mount: Mount, opts: MountOptions, mountpoint: str, ready: Callable[[str | None], None]) -> None:
    namespace, fs, committer = mount.namespace, mount.fs, mount.committer
    started = time.monotonic()

    async def health() -> dict:
        latest = namespace.current_info()
        overlay = mount.overlay
        return {
            "pid": os.getpid(),
            "source": namespace.backend.description,
            "uptime": time.monotonic() - started,
            "versions": len(namespace.all_versions),
            "latest": latest.name if latest else None,
            "base": overlay.base_version if overlay else None,
            "open_for_writing": overlay.writers if overlay else 0,
            "errors": fs.failure_count,
        }

    async def select(selector: str) -> dict | None:
        """The version a SELECTOR argument names here (rollback says which)."""
        info = choose(selector, namespace.index, namespace.by_name)
        latest = namespace.current_info()
        return None if info is None else {"name": info.name, "latest": latest is not None and info.name == latest.name}
    async def stats() -> dict:
        """What was built and what is kept (tests assert that listings build nothing)."""
        return {"built": dict(namespace.backend.counters), "kept": namespace.kept(), "rss_bytes": _rss_bytes()}

    async def read_only(**_: object) -> None:
        raise ControlError("this mount is read-only (-o ro): it has no staging/")

    async with trio.open_nursery() as nursery:
        await nursery.start(namespace.run_background)
        handlers = {"health": health, "stats": stats, "select": select}
        if committer is not None:
            handlers.update(commit=committer.commit, status=committer.status, discard=committer.discard,
                            rollback=committer.rollback)
            if opts.autocommit:
                nursery.start_soon(_autocommit, committer, opts.autocommit)
        else:
            handlers.update(commit=read_only, status=read_only, discard=read_only, rollback=read_only)
        await nursery.start(control.serve, control.socket_path(mountpoint), handlers)
        interval = poll_interval(namespace.backend, opts.poll)
        if interval:
            nursery.start_soon(_watch_versions, namespace, interval)
        nursery.start_soon(fs.watch_callers)
        nursery.start_soon(_on_signals)
        nursery.start_soon(_announce_ready, mountpoint, ready)
        await pyfuse3.main()
        notify("STOPPING=1")
        if committer is not None:
            # Unmounted or signalled: a commit that is running finishes first.
            async with committer.overlay.lock:
                nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def _autocommit(committer: Committer, idle_seconds: float) -> None:
    """Commit once staging has been idle (no open writers, no changes) that long."""
    overlay = committer.overlay
    failed_state = None
    while True:
        await trio.sleep(min(idle_seconds, 1.0))
        idle = time.monotonic() - overlay.last_change
        if overlay.changed and not overlay.writers and idle >= idle_seconds and overlay.last_change != failed_state:
            try:
                name = await committer.commit()
                log.info("autocommit: %s", name or "unchanged")
            except UserError as e:
                log.warning("autocommit: %s", e)
                failed_state = overlay.last_change  # retried once staging changes again


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def poll_interval(backend: Backend, asked: float | None) -> float | None:
    """How often to list versions again: --poll where other writers can add
    versions (the backend says so by having an interval), else never."""
    if backend.poll_interval is None:
        if asked:
            log.info("--poll is ignored: only this mount adds versions to %s", backend.description)
        return None
    return backend.poll_interval if asked is None else asked or None


POLL_SHARE = 10  # a poll waits at least this many times as long as the last listing took


async def _watch_versions(namespace: Namespace, interval: float) -> None:
    """Other writers' versions appear within ``interval`` seconds, or, where one
    listing takes long (a prefix of very many versions), within POLL_SHARE times
    that: polling never takes more than a tenth of the daemon's time."""
    wait = interval
    while True:
        await trio.sleep(wait)
        started = time.monotonic()
        try:
            if await namespace.reload():
                namespace.notify_changed()
        except Exception as e:  # noqa: BLE001 - a store hiccup must not end the daemon
            log.warning("cannot list versions: %s", e)
        wait = max(interval, POLL_SHARE * (time.monotonic() - started))


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _announce_ready(mountpoint: str, ready: Callable[[str | None], None]) -> None:
    # A stat from another thread goes through the kernel to our own handlers:
    # when it returns, the mount is usable.
    st = await trio.to_thread.run_sync(os.stat, mountpoint)
    raise_readahead(st.st_dev)
    ready(None)
    notify("READY=1")


READAHEAD_KB = 8192


def raise_readahead(device: int) -> None:
    """Ask the kernel to read ahead 8 MiB on this mount instead of FUSE's 128 KiB:
    fewer, larger requests (a sequential read runs faster by a fifth or more).
    Only root may; for anyone else the default stays, silently."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.debug("read-ahead stays at the kernel's default (%s)", e)


def notify(state: str) -> None:
    """sd_notify(3) for Type=notify services: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd: %s", e)


# -- background start and stop ------------------------------------------------------
def state_dir(explicit: str | None = None) -> str:
    """Absolute: the daemon changes its working directory to / once mounted."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.abspath(explicit or os.path.join(base, "versionfs"))


def cache_dir(explicit: str | None = None) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.abspath(explicit or os.path.join(base, "versionfs"))


def staging_dir(state: str | None, source: str) -> str:
    """Staged data of one source: kept across mounts (and crashes) of that source."""
    name = hashlib.sha256(source.encode()).hexdigest()[:16]
    return os.path.join(state_dir(state), "staging", name)


def spool_dir(state: str | None, backend: Backend) -> str:
    """The spool of a backend's source, by its spool key. A spool made before the
    key included an S3 endpoint (keyed by the description) is moved to its new
    place, once."""
    directory = staging_dir(state, backend.spool_key)
    old = staging_dir(state, backend.description)
    if old != directory and os.path.isdir(old) and not os.path.exists(directory):
        os.rename(old, directory)
        log.info("staging of %s moved to %s", backend.description, directory)
    return directory


def log_path(mountpoint: str, state: str | None = None) -> str:
    name = os.path.abspath(mountpoint).strip("/").replace("/", "-") or "-"
    return os.path.join(state_dir(state), "logs", f"{name}.log")


def start_background(child_argv: list[str], mountpoint: str, state: str | None) -> None:
    """Start ``versionfs <child_argv> --ready-fd N`` detached; return when it is ready."""
    path = log_path(mountpoint, state)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    read_end, write_end = os.pipe()
    with open(path, "ab") as logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "versionfs", *child_argv, "--ready-fd", str(write_end)],
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
        )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "ready":
        return
    if not answer:
        proc.wait()
        answer = f"the daemon exited ({proc.returncode}) before the mount was ready; see {path}"
    raise UserError(answer)


def ready_writer(fd: int | None) -> Callable[[str | None], None]:
    """The readiness callback: writes once to the pipe of ``start_background``."""
    state = {"fd": fd}

    def ready(error: str | None) -> None:
        fd = state["fd"]
        if fd is None:
            return
        state["fd"] = None
        try:
            os.write(fd, b"ready" if error is None else error.encode())
        finally:
            os.close(fd)

    return ready


def unmount(mountpoint: str, timeout: float = 120.0) -> None:
    """Unmount a versionfs mount and wait until its daemon has exited."""
    mountpoint = os.path.abspath(mountpoint)
    fstype = mount_fstype(mountpoint)
    if fstype is None:
        raise UserError(f"{mountpoint}: not mounted")
    if fstype != FSTYPE:
        raise UserError(f"{mountpoint}: not a versionfs mount ({fstype})")
    try:
        pid = int(os.getxattr(mountpoint, XATTR_PID))
    except (OSError, ValueError):
        pid = None
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "fusermount3 failed"
        raise UserError(f"{mountpoint}: cannot unmount: {reason}")
    deadline = time.monotonic() + timeout
    while pid is not None and process_alive(pid):
        if time.monotonic() > deadline:
            raise UserError(f"{mountpoint}: unmounted, but daemon {pid} is still running after {timeout:.0f}s")
        time.sleep(0.05)


def process_alive(pid: int) -> bool:
    """Running (a zombie that its parent has yet to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False
