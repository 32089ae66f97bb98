"""staging/ with the tools people use: every result is compared with the same
commands run on a plain local directory."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess

import numpy as np
import pytest

from conftest import run_versionfs
from helpers import make_versions


def tree(path) -> dict[str, bytes | None]:
    """Relative path -> content (None for directories)."""
    out = {}
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        for d in dirs:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.normpath(os.path.join(rel, f))] = fh.read()
    return out


@pytest.fixture
def pair(tmp_path, mount):
    """(staging dir, local reference dir) starting equal."""
    def v1(g):
        g.create_dataset("x", data=np.arange(1000, dtype="i4"), chunks=(100,))
        g.create_group("sub").create_dataset("y", data=np.linspace(0, 1, 50))
        g["sub"].attrs["units"] = "m"

    m = mount(make_versions(tmp_path / "s.h5", v1))
    ref = tmp_path / "ref"
    subprocess.run(["cp", "-a", f"{m.path}/staging/.", str(ref)], check=True)
    return m, m.path / "staging", ref


def both(staging, ref, *cmd: str) -> None:
    for base in (staging, ref):
        subprocess.run([part.format(d=base) for part in cmd], check=True, capture_output=True)


def assert_same(staging, ref):
    assert tree(staging) == tree(ref)


def test_starts_equal_to_latest(pair):
    m, staging, ref = pair
    latest = tree(m.path / "latest")
    del latest[".version.json"]  # generated for versions; not part of staging
    assert tree(staging) == latest


def test_cp_rsync_tar_mv_rm_mkdir(pair, tmp_path):
    m, staging, ref = pair
    src = tmp_path / "src"
    (src / "deep/er").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "deep/er/b.txt").write_text("b\n")
    np.save(src / "arr.npy", np.arange(7))
    os.utime(src / "a.bin", (1_000_000_000, 1_000_000_000))
    both(staging, ref, "cp", str(src / "a.bin"), "{d}/copied.bin")
    both(staging, ref, "cp", "-a", str(src), "{d}/cpa")
    both(staging, ref, "rsync", "-a", f"{src}/", "{d}/rs/")
    assert os.stat(staging / "rs/a.bin").st_mtime == 1_000_000_000  # rsync set the mtime
    assert os.stat(staging / "cpa/a.bin").st_mtime == 1_000_000_000
    (src / "a.bin").unlink()
    (src / "new.txt").write_text("new\n")
    both(staging, ref, "rsync", "-a", "--delete", f"{src}/", "{d}/rs/")
    subprocess.run(["tar", "cf", str(tmp_path / "t.tar"), "-C", str(src), "."], check=True)
    both(staging, ref, "tar", "xf", str(tmp_path / "t.tar"), "-C", "{d}/cpa/deep")
    both(staging, ref, "mkdir", "-p", "{d}/m/n/o")
    both(staging, ref, "mv", "{d}/cpa", "{d}/m/n/moved")
    both(staging, ref, "mv", "{d}/x.npy", "{d}/m/x_renamed.npy")
    both(staging, ref, "mv", "{d}/sub", "{d}/sub_renamed")  # a directory from the base
    both(staging, ref, "rm", "-r", "{d}/rs")
    assert_same(staging, ref)


def test_truncate_holes_append_partial_overwrite(pair):
    m, staging, ref = pair
    for base in (staging, ref):
        subprocess.run(["truncate", "-s", "100", str(base / "x.npy")], check=True)
        with open(base / "sparse.bin", "wb") as f:
            f.seek(1_000_000)
            f.write(b"end")
        with open(base / "sub/y.npy", "r+b") as f:
            f.seek(200)
            f.write(b"\x00" * 8)
        with open(base / "log.txt", "a") as f:
            f.write("one\n")
        with open(base / "log.txt", "a") as f:
            f.write("two\n")
        fd = os.open(base / "log.txt", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"three\n")
        os.fsync(fd)
        os.close(fd)
        subprocess.run(["truncate", "-s", "+10", str(base / "log.txt")], check=True)
    assert (staging / "sparse.bin").read_bytes()[:1_000_000] == bytes(1_000_000)
    assert_same(staging, ref)


def test_editor_save(pair):
    m, staging, ref = pair
    for base in (staging, ref):
        with open(base / ".notes.txt.swp", "wb") as f:
            f.write(b"swap")
        (base / "notes.txt").write_text("v1\n")
        (base / "notes.txt~").write_text("backup\n")
        tmp = base / ".notes.txt.tmp"
        tmp.write_text("v2\n")
        os.replace(tmp, base / "notes.txt")  # rename over
        (base / ".notes.txt.swp").unlink()
    assert (staging / "notes.txt").read_text() == "v2\n"
    assert_same(staging, ref)


def test_refusals(pair):
    m, staging, ref = pair
    cases = {
        "hard link": (lambda: os.link(staging / "x.npy", staging / "hard"), errno.EPERM),
        "fifo": (lambda: os.mkfifo(staging / "fifo"), errno.EPERM),
        "device": (lambda: os.mknod(staging / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3)), errno.EPERM),
        "socket": (lambda: socket.socket(socket.AF_UNIX).bind(str(staging / "sock")), errno.EPERM),
        "long name": (lambda: open(staging / ("n" * 256), "w"), errno.ENAMETOOLONG),
        "rmdir not empty": (lambda: os.rmdir(staging / "sub"), errno.ENOTEMPTY),
        "unlink dir": (lambda: os.unlink(staging / "sub"), errno.EISDIR),
        "rename into itself": (lambda: os.rename(staging / "sub", staging / "sub/inner"), errno.EINVAL),
        "xattr": (lambda: os.setxattr(staging / "x.npy", "user.a", b"1"), errno.ENOTSUP),
    }
    for what, (attempt, expected) in cases.items():
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == expected, what
    assert os.statvfs(staging).f_namemax == 255
    assert os.statvfs(staging).f_bavail > 0  # the spool's disk
    (staging / ("n" * 255)).write_text("ok")  # 255 bytes is fine
    os.mknod(staging / "plain", 0o640 | stat.S_IFREG)  # mknod of a regular file is a create
    assert stat.S_ISREG(os.stat(staging / "plain").st_mode) and os.stat(staging / "plain").st_mode & 0o777 == 0o640
    os.unlink(staging / "plain")
    (staging / ".version.json").write_text("{}")  # allowed, never committed
    assert run_versionfs("status", str(m.path)).stdout.split("\n")[:-1] == ["A " + "n" * 255]


def test_listing_and_attributes(pair):
    m, staging, ref = pair
    assert sorted(os.listdir(staging)) == sorted(set(os.listdir(m.path / "latest")) - {".version.json"})
    st = os.stat(staging / "x.npy")
    assert st.st_mode & 0o777 == 0o644 and st.st_size == os.stat(m.path / "latest/x.npy").st_size
    os.utime(staging, ns=(10**9, 3 * 10**9))  # the root itself (rsync does this)
    assert os.stat(staging).st_mtime_ns == 3 * 10**9
    assert sorted(os.listdir(staging)) == sorted(set(os.listdir(m.path / "latest")) - {".version.json"})
    os.chmod(staging / "x.npy", 0o600)
    os.utime(staging / "x.npy", ns=(5 * 10**9, 7 * 10**9))
    st = os.stat(staging / "x.npy")
    assert st.st_mode & 0o777 == 0o600 and st.st_mtime_ns == 7 * 10**9


def test_a_full_spool_disk_is_enospc_and_loses_nothing(tmp_path, mount):
    """The state directory on a 2 MiB tmpfs: the write that does not fit fails with
    ENOSPC, what was staged before is intact, and the daemon carries on."""
    def v1(g):
        g.create_dataset("x", data=np.arange(100, dtype="i4"))

    state = tmp_path / "small-state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)], check=True)
    try:
        m = mount(make_versions(tmp_path / "full.h5", v1), "--state-dir", str(state))
        (m.path / "staging/small.bin").write_bytes(b"kept")
        with pytest.raises(OSError) as e:
            with open(m.path / "staging/big.bin", "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(512 * 1024))
                    f.flush()
        assert e.value.errno == errno.ENOSPC
        assert (m.path / "staging/small.bin").read_bytes() == b"kept"
        os.unlink(m.path / "staging/big.bin")
        assert run_versionfs("commit", str(m.path), "-n", "after-full").returncode == 0
        assert (m.path / "versions/after-full/small.bin").read_bytes() == b"kept"
        assert run_versionfs("umount", str(m.path)).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(state)])
