"""Fixtures: real versioned HDF5 files and real mounts.

Every mount is made by the real ``versionfs mount`` (which returns once the
mount is usable) and always taken down: ``fusermount3 -u -z``, then the daemon
is killed by pid if it is still there. A test whose daemon logged "answering
EIO" (an unexpected failure, fs._guard) fails, unless it is marked
``eio_expected``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from s3servers import ministack_endpoint, moto_endpoint  # noqa: F401 - fixtures
from versionfs.daemon import process_alive as alive

# Tests never reach a real cloud: dummy credentials, no profile, no instance
# metadata service; S3 tests talk to servers on 127.0.0.1 only.
for _var in [v for v in os.environ if v.startswith("AWS_")]:
    del os.environ[_var]
# Mounts made without --cache-dir cache under a throw-away directory, never ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="versionfs-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret-key", AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
)

VERSIONFS = [sys.executable, "-m", "versionfs"]


def run_versionfs(*args: str, check: bool = False, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*VERSIONFS, *args], capture_output=True, text=True, check=check, timeout=timeout, **kw)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def daemon_pid(mnt: Path) -> int | None:
    try:
        return int(os.getxattr(mnt, "user.versionfs.pid"))
    except OSError:
        return None


def force_unmount(mnt: Path, pid: int | None) -> None:
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    if pid is not None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


class Mount:
    def __init__(self, source: str, path: Path, state: Path):
        self.source, self.path, self.state = source, path, state
        self.pid = daemon_pid(path)

    @property
    def log(self) -> str:
        logs = list((self.state / "logs").glob("*.log"))
        return "".join(p.read_text() for p in logs)

    def __truediv__(self, other: str) -> Path:
        return self.path / other


class Mounter:
    """Mounts sources on fresh directories and undoes every one of them."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.made: list[Mount] = []

    def __call__(self, source: str | os.PathLike, *extra: str) -> Mount:
        base = self.tmp.mktemp("mnt")
        mnt, state = base / "mnt", base / "state"
        mnt.mkdir()
        if "--cache-dir" not in extra:  # each mount builds and fetches afresh unless a test shares a cache
            extra = (*extra, "--cache-dir", str(base / "cache"))
        result = run_versionfs("mount", str(source), str(mnt), "--state-dir", str(state), *extra)
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        m = Mount(str(source), mnt, state)
        self.made.append(m)
        return m

    def close(self) -> None:
        for m in self.made:
            force_unmount(m.path, m.pid)

    def unexpected_eio(self) -> list[str]:
        """The daemons' "answering EIO" lines (each names the request and the cause)."""
        return [line for m in self.made for line in m.log.splitlines() if "answering EIO" in line]


def fail_on_unexpected_eio(request: pytest.FixtureRequest, mounter: Mounter) -> None:
    lines = mounter.unexpected_eio()
    if lines and request.node.get_closest_marker("eio_expected") is None:
        pytest.fail("the daemon answered EIO (mark the test eio_expected if that is the point):\n" + "\n".join(lines[:5]),
                    pytrace=False)


@pytest.fixture
def mnt(tmp_path) -> Iterator[Path]:
    """An empty mount point; whatever gets mounted there is taken down after."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path, daemon_pid(path) if is_mounted(path) else None)


@pytest.fixture
def mount(request, tmp_path_factory) -> Iterator[Mounter]:
    """``mount(source, *extra_args)`` mounts on a fresh directory; all are undone."""
    mounter = Mounter(tmp_path_factory)
    yield mounter
    mounter.close()
    fail_on_unexpected_eio(request, mounter)


@pytest.fixture(scope="module")
def module_mount(request, tmp_path_factory) -> Iterator[Mounter]:
    mounter = Mounter(tmp_path_factory)
    yield mounter
    mounter.close()
    fail_on_unexpected_eio(request, mounter)
