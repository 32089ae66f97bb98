"""A request whose caller is killed is answered at once (EINTR) instead of when
the slow work it waits for ends, and that work is kept for the next request.
Driven through the FUSE handlers (fs.VersionFS) under trio, no kernel: the
kernel keeps a killed caller in state D until the daemon answers, which is
what the answer has to be prompt for."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pyfuse3
import pytest
import trio

from helpers import make_versions
from versionfs.backends.hdf5 import HDF5Backend
from versionfs.fs import VersionFS, being_killed
from versionfs.namespace import Namespace
from versionfs.worker import Worker


class Caller(pyfuse3.RequestContext):
    """The request context the kernel would give for process ``pid``."""

    def __init__(self, pid: int):
        self._pid = pid

    pid = property(lambda self: self._pid)
    uid = property(lambda self: os.getuid())
    gid = property(lambda self: os.getgid())
    umask = property(lambda self: 0o022)


class SlowListings:
    """An HDF5 backend whose directory listings wait until ``release`` is set."""

    def __init__(self, backend: HDF5Backend):
        self.backend = backend
        self.release = threading.Event()
        self.listed = 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def listdir(self, *args):
        self.release.wait(60)
        self.listed += 1
        return self.backend.listdir(*args)


@pytest.fixture
def source(tmp_path):
    return make_versions(tmp_path / "s.h5", lambda g: g.create_group("sub").create_dataset("x", data=np.arange(5)))


def test_being_killed_is_read_from_proc():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert not being_killed(sleeper.pid) and not being_killed(os.getpid())
        sleeper.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not being_killed(sleeper.pid):  # a zombie until reaped, then gone
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert being_killed(sleeper.pid)


def test_a_killed_callers_request_is_answered_at_once(source):
    backend = SlowListings(HDF5Backend(str(source)))
    worker = Worker()
    sleeper = subprocess.Popen(["sleep", "60"])

    async def main() -> None:
        ns = Namespace(backend, worker)
        await worker.run(ns.load)
        fs = VersionFS(ns)
        root = pyfuse3.ROOT_INODE
        async with trio.open_nursery() as nursery:
            ns.spawn = nursery.start_soon
            nursery.start_soon(fs.watch_callers)
            latest = await fs.lookup(root, b"latest", Caller(os.getpid()))
            answer: dict = {}

            async def ask() -> None:
                started = time.monotonic()
                try:
                    await fs.lookup(latest.st_ino, b"sub", Caller(sleeper.pid))
                    answer["errno"] = 0
                except pyfuse3.FUSEError as e:
                    answer["errno"] = e.errno
                answer["seconds"] = time.monotonic() - started

            nursery.start_soon(ask)
            await trio.sleep(0.5)
            assert not answer  # the listing is still under way
            sleeper.send_signal(signal.SIGKILL)
            with trio.fail_after(3):
                while not answer:
                    await trio.sleep(0.02)
            assert answer["errno"] == errno.EINTR and answer["seconds"] < 2.0
            assert backend.listed == 0  # answered before the work ended
            backend.release.set()
            # The work went on; the next request finds it done.
            sub = await fs.lookup(latest.st_ino, b"sub", Caller(os.getpid()))
            x = await fs.lookup(sub.st_ino, b"x.npy", Caller(os.getpid()))
            assert x.st_size == 128 + 5 * 8
            assert backend.listed == 2  # the top once (kept), then sub
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        backend.release.set()
        sleeper.kill()
        sleeper.wait()
        worker.close()
        backend.close()
