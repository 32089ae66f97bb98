"""staging/ as a local disk (issue 12): owners, modes, times, link counts, files
unlinked while open, symbolic links, what a version keeps, sparse copy-up, one
staging per source, and "an error means nothing happened".

The first group drives the FUSE handlers without a kernel (``fastfs``); the rest
mount for real, also as a user other than root on an ``allow_other`` mount."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from versioned_hdf5 import VersionedHDF5File

from conftest import force_unmount, is_mounted, run_versionfs
from fastfs import FastFS, ctx, fast_fs
from helpers import make_versions
from s3servers import make_client, make_versioned_bucket

NOBODY = 65534


def v1(g):
    g.create_dataset("x", data=np.arange(1000, dtype="i4"), chunks=(100,))
    g.create_group("sub").create_dataset("y", data=np.linspace(0, 1, 50))


@pytest.fixture
def fast(tmp_path):
    with fast_fs(make_versions(tmp_path / "f.h5", v1), tmp_path / "state") as fs:
        yield fs


# -- without a kernel ----------------------------------------------------------------
def test_new_entries_belong_to_their_maker_with_exact_modes(fast):
    alice = ctx(uid=1000, gid=1000, umask=0o022)
    fast.setattr("staging", mode=0o777)  # so that alice may create here (the kernel checks)
    fast.mkdir("staging/d", 0o750, who=alice)
    fh = fast.open("staging/d/f", os.O_CREAT | os.O_WRONLY, 0o666, who=alice)
    fast.close_fh(fh)
    fast.mkdir("staging/zero", 0, who=ctx(umask=0))
    fh = fast.open("staging/zero0", os.O_CREAT | os.O_WRONLY, 0, who=ctx(umask=0))
    fast.close_fh(fh)
    d, f = fast.stat("staging/d"), fast.stat("staging/d/f")
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (1000, 1000, 0o750)
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 1000, 0o644)
    assert stat.S_IMODE(fast.stat("staging/zero").st_mode) == 0
    assert stat.S_IMODE(fast.stat("staging/zero0").st_mode) == 0
    fast.setattr("staging/d/f", mode=0o4755, who=alice)
    assert stat.S_IMODE(fast.stat("staging/d/f").st_mode) == 0o4755
    fast.remount()  # all of it is in the spool
    f = fast.stat("staging/d/f")
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 1000, 0o4755)


def test_chown_as_on_a_local_disk(fast):
    alice = ctx(uid=1000, gid=1000)
    fh = fast.open("staging/f", os.O_CREAT | os.O_WRONLY, 0o6755)
    fast.close_fh(fh)
    fast.setattr("staging/f", uid=1000, gid=1000)  # root gives it away; setuid and setgid go
    st = fast.stat("staging/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o755)
    with pytest.raises(OSError) as e:
        fast.setattr("staging/f", who=alice, uid=1001)  # only root gives files away
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        fast.setattr("staging/f", who=alice, gid=5)  # not one of alice's groups
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        fast.setattr("staging/x.npy", who=alice, gid=1000)  # not alice's file
    assert e.value.errno == errno.EPERM
    fast.setattr("staging/f", who=alice, uid=1000, gid=1000)  # to what it is: allowed
    assert fast.stat("staging/f").st_uid == 1000


def test_setgid_directory_passes_on_its_group(fast):
    fast.mkdir("staging/shared", 0o777)
    fast.setattr("staging/shared", gid=500, mode=0o2777)
    bob = ctx(uid=1001, gid=1001)
    fast.mkdir("staging/shared/sub", 0o755, who=bob)
    fh = fast.open("staging/shared/file", os.O_CREAT | os.O_WRONLY, 0o644, who=bob)
    fast.close_fh(fh)
    sub, file = fast.stat("staging/shared/sub"), fast.stat("staging/shared/file")
    assert sub.st_gid == 500 and sub.st_mode & stat.S_ISGID
    assert file.st_gid == 500 and not file.st_mode & stat.S_ISGID


def test_times_follow_posix(fast):
    fh = fast.open("staging/f", os.O_CREAT | os.O_WRONLY)
    fast.close_fh(fh)
    fast.mkdir("staging/d")
    d0, f0 = fast.stat("staging/d"), fast.stat("staging/f")
    time.sleep(0.01)
    fast.setattr("staging/f", mode=0o600)  # chmod: ctime only
    f1 = fast.stat("staging/f")
    assert f1.st_ctime_ns > f0.st_ctime_ns and f1.st_mtime_ns == f0.st_mtime_ns
    fast.setattr("staging/f", atime_ns=10**9)  # atime alone (UTIME_OMIT for the mtime)
    f2 = fast.stat("staging/f")
    assert f2.st_atime_ns == 10**9 and f2.st_mtime_ns == f0.st_mtime_ns and f2.st_ctime_ns >= f1.st_ctime_ns
    fast.setattr("staging/f", mtime_ns=7 * 10**9)
    assert fast.stat("staging/f").st_mtime_ns == 7 * 10**9 and fast.stat("staging/f").st_atime_ns == 10**9
    time.sleep(0.01)
    fast.write_bytes("staging/f", b"data", offset=0)  # a write: mtime and ctime
    f3 = fast.stat("staging/f")
    assert f3.st_mtime_ns > 7 * 10**9 and f3.st_ctime_ns > f2.st_ctime_ns
    for change in (lambda: fast.write_bytes("staging/d/new", b""), lambda: fast.rename("staging/d/new", "staging/d/renamed"),
                   lambda: fast.unlink("staging/d/renamed"), lambda: fast.mkdir("staging/sub/made")):
        before = fast.stat("staging/d"), fast.stat("staging/sub")
        time.sleep(0.01)
        change()
        after = fast.stat("staging/d"), fast.stat("staging/sub")
        assert any(a.st_mtime_ns > b.st_mtime_ns and a.st_ctime_ns > b.st_ctime_ns for a, b in zip(after, before))
    assert d0.st_mtime_ns < fast.stat("staging/d").st_mtime_ns


def test_directory_link_count_is_two_plus_subdirectories(fast):
    assert fast.stat("staging").st_nlink == 3  # sub/
    fast.mkdir("staging/a")
    fast.mkdir("staging/a/b")
    fast.mkdir("staging/a/c")
    fast.write_bytes("staging/a/file", b"")
    assert fast.stat("staging/a").st_nlink == 4 and fast.stat("staging").st_nlink == 4
    fast.rename("staging/a/c", "staging/sub/c")
    assert fast.stat("staging/a").st_nlink == 3 and fast.stat("staging/sub").st_nlink == 3
    fast.rmtree("staging/sub")
    assert fast.stat("staging").st_nlink == 3
    fast.remount()
    assert fast.stat("staging").st_nlink == 3 and fast.stat("staging/a").st_nlink == 3


def test_an_open_file_unlinked_keeps_working_until_closed(fast):
    fast.write_bytes("staging/f", b"hello world")
    fh = fast.open("staging/f", os.O_RDWR)
    inode = fast.ino("staging/f")
    fast.unlink("staging/f")
    assert not fast.exists("staging/f")
    st = fast.call(fast.fs.getattr, inode, ctx())  # fstat: getattr on the inode
    assert st.st_size == 11 and st.st_nlink == 0
    fast.write(fh, 6, b"there")
    assert fast.read(fh, 0, 100) == b"hello there"
    attr = fast.call(fast.fs.getattr, inode, ctx())
    attr.st_size = 5
    fast.call(fast.fs.setattr, inode, attr, __import__("fastfs").fields(size=True), fh, ctx())  # ftruncate
    assert fast.read(fh, 0, 100) == b"hello"
    fast.write_bytes("staging/f", b"another file")  # the name is free for a new one
    assert fast.read(fh, 0, 100) == b"hello"
    fast.close_fh(fh)
    assert fast.read_bytes("staging/f") == b"another file"
    assert fast.status() == ["A f"]


def test_an_open_base_file_unlinked_is_read_from_the_base(fast):
    fh = fast.open("staging/x.npy", os.O_RDONLY)
    inode = fast.ino("staging/x.npy")
    fast.unlink("staging/x.npy")
    assert fast.read(fh, 0, 6) == b"\x93NUMPY"
    assert fast.call(fast.fs.getattr, inode, ctx()).st_nlink == 0
    fast.close_fh(fh)


def test_symlinks_are_stored_and_committed(fast):
    fast.symlink("x.npy", "staging/link")
    fast.symlink("../nowhere", "staging/sub/dangling")
    assert fast.readlink("staging/link") == "x.npy"
    assert fast.read_bytes("staging/link")[:6] == b"\x93NUMPY"
    fast.setattr("staging/link", follow=False, uid=1000, gid=1000, mtime_ns=5 * 10**9)  # lchown, lutimes
    st = fast.lstat("staging/link")
    assert stat.S_ISLNK(st.st_mode) and st.st_uid == 1000 and st.st_mtime_ns == 5 * 10**9 and st.st_size == 5
    fast.rename("staging/link", "staging/sub/link2")
    assert sorted(fast.status()) == ["A sub/dangling", "A sub/link2"]
    assert fast.commit("two") == "two"
    for view in ("latest", "versions/two", "@-1"):
        assert fast.readlink(f"{view}/sub/link2") == "x.npy"
        assert fast.readlink(f"{view}/sub/dangling") == "../nowhere"
    history = fast.listdir("history/sub/link2")
    assert len(history) == 1 and fast.readlink(f"history/sub/link2/{history[0]}") == "x.npy"
    assert fast.readlink("staging/sub/link2") == "x.npy"  # staging on the new version
    fast.rename("staging/sub/link2", "staging/moved")  # a link of the base, renamed
    assert fast.commit("three") == "three" and fast.readlink("latest/moved") == "x.npy"
    with h5py.File(fast.source, "r") as f:
        assert "moved" in VersionedHDF5File(f)["three"]


def test_inode_numbers_stay_as_on_a_local_disk(fast):
    """Renames, metadata changes, writes and the kernel forgetting an inode (then
    looking it up again) keep an entry's inode number."""
    import gc

    fast.write_bytes("staging/new", b"x")
    fast.mkdir("staging/d")
    fast.symlink("new", "staging/l")
    names = ["staging/new", "staging/d", "staging/l", "staging/x.npy", "staging/sub"]
    before = [fast.ino(n, follow=False) for n in names]

    def forget_all() -> None:
        counts = list(fast.fs._lookups.items())
        fast.loop.run(fast.fs.forget, [(i, n) for i, n in counts if i != 1])
        gc.collect()

    forget_all()
    assert [fast.ino(n, follow=False) for n in names] == before
    fast.setattr("staging/x.npy", mode=0o600)
    fast.rename("staging/new", "staging/d/moved")
    fast.rename("staging/sub", "staging/d/sub2")  # a directory of the base
    fast.rename("staging/x.npy", "staging/d/x2.npy")  # a file of the base
    fast.write_bytes("staging/d/x2.npy", b"rewritten", offset=0)
    forget_all()
    after = ["staging/d/moved", "staging/d", "staging/l", "staging/d/x2.npy", "staging/d/sub2"]
    assert [fast.ino(n, follow=False) for n in after] == before
    fast.unlink("staging/d/moved")
    fast.write_bytes("staging/d/moved", b"another")  # a new file under an old name: a new inode
    assert fast.ino("staging/d/moved") not in before


def test_refusals_have_one_errno_each(fast):
    for attempt in (lambda: fast.link("staging/x.npy", "staging/hard"),
                    lambda: fast.mknod("staging/fifo", stat.S_IFIFO | 0o644),
                    lambda: fast.mknod("staging/sock", stat.S_IFSOCK | 0o644),
                    lambda: fast.mknod("staging/dev", stat.S_IFCHR | 0o644)):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EPERM
    fast.mknod("staging/plain", stat.S_IFREG | 0o600)
    assert stat.S_IMODE(fast.stat("staging/plain").st_mode) == 0o600
    assert fast.status() == ["A plain"]


def test_read_only_trees_answer_erofs(fast):
    for attempt in (lambda: fast.setattr("latest/x.npy", mode=0o600), lambda: fast.symlink("a", "latest/l"),
                    lambda: fast.mkdir("latest/d"), lambda: fast.mknod("latest/n", stat.S_IFREG | 0o644)):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS


def test_a_version_keeps_mode_bits_and_mtime(fast):
    fast.write_bytes("staging/run.sh", b"#!/bin/sh\necho hi\n")
    fast.setattr("staging/run.sh", mode=0o755, mtime_ns=1_700_000_000_123_456_789)
    assert fast.commit("two") == "two"
    st = fast.stat("latest/run.sh")
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime_ns == 1_700_000_000_123_456_789
    assert stat.S_IMODE(fast.stat("staging/run.sh").st_mode) == 0o755
    fast.setattr("staging/run.sh", mode=0o755)  # the same mode again, same bytes: unchanged
    fast.write_bytes("staging/run.sh", b"#!/bin/sh\necho hi\n")
    fast.setattr("staging/run.sh", mode=0o755)
    assert fast.status() == []


def test_dot_version_json_is_generated_for_hdf5(fast):
    assert "version.json" not in "".join(fast.listdir("staging"))
    fast.write_bytes("staging/.version.json", b"{}")
    assert fast.status() == []  # never committed: each version generates its own


def test_errors_leave_staging_as_it_was(fast):
    """A rename that fails in its transaction changes nothing (in memory either)."""
    for i in range(50):
        fast.write_bytes(f"staging/sub/f{i}", b"x")
    before = fast.tree("staging")
    store = fast.overlay.store
    real = store.put_many

    def full(rows):
        real(rows[: len(rows) // 2])
        raise __import__("sqlite3").OperationalError("database or disk is full")

    store.put_many = full  # the disk fills up halfway through the rename's rows
    try:
        with pytest.raises(OSError) as e:
            fast.rename("staging/sub", "staging/moved")
        assert e.value.errno == errno.ENOSPC
    finally:
        store.put_many = real
    assert fast.tree("staging") == before
    fast.remount()
    assert fast.tree("staging") == before


def test_staged_operations_do_not_scan_the_spool(fast):
    """Lookups, creates, renames and removals cost the same with 20,000 staged rows as with 200."""
    def cost(n: int) -> float:
        fast.discard()
        fast.loop.run(_stage_many, fast, n)
        started = time.perf_counter()
        for i in range(100):
            fast.write_bytes(f"staging/t{i}", b"x")
            fast.rename(f"staging/t{i}", f"staging/sub/t{i}")
            fast.unlink(f"staging/sub/t{i}")
        return time.perf_counter() - started

    small = min(cost(200) for _ in range(2))  # the best of two: the machine is shared
    large = min(cost(20_000) for _ in range(2))
    assert large < 3 * small + 0.5, (small, large)


async def _stage_many(fast: FastFS, n: int) -> None:
    from versionfs.spool import Row

    now = time.time_ns()
    rows = [Row(f"bulk/d{i // 100}/f{i}", "file", blob=None, base_path="x.npy", uid=0, gid=0, mode=0o644,
                atime_ns=now, mtime_ns=now, ctime_ns=now) for i in range(n)]
    rows += [Row(f"bulk/d{i}", "dir", uid=0, gid=0, mode=0o755, atime_ns=now, mtime_ns=now, ctime_ns=now)
             for i in range(n // 100)]
    rows.append(Row("bulk", "dir", uid=0, gid=0, mode=0o755, atime_ns=now, mtime_ns=now, ctime_ns=now))
    with fast.overlay.store.transaction():
        fast.overlay.store.put_many(rows)


# -- sparse copy-up ------------------------------------------------------------------------
def test_sparse_copy_up_without_a_kernel(tmp_path):
    """A write into a big base file copies in one chunk row; reads, a truncate, an
    unlink while open and the commit all see the file's true bytes."""
    def big(g):
        g.create_dataset("big", data=np.arange(1_000_000, dtype="f8"), chunks=(10_000,))

    fs = FastFS(str(make_versions(tmp_path / "s.h5", big)), str(tmp_path / "state"))
    try:
        expected = bytearray(fs.read_bytes("latest/big.npy"))
        fh = fs.open("staging/big.npy", os.O_RDWR)
        fs.write(fh, 128 + 8 * 500_000, b"\xff" * 24)
        expected[128 + 8 * 500_000 : 128 + 8 * 500_000 + 24] = b"\xff" * 24
        row = fs.overlay.store.rows["big.npy"]
        assert row.fill_limit == len(expected) and fs.overlay.store.present(row.blob) == [(0, 128), (128 + 8 * 500_000, 128 + 8 * 510_000)]
        assert fs.read(fh, 0, len(expected)) == bytes(expected)
        fs.close_fh(fh)
        assert fs.read_bytes("staging/big.npy") == bytes(expected)
        assert fs.status() == ["M big.npy"]
        fh = fs.open("staging/big.npy", os.O_RDONLY)
        fs.unlink("staging/big.npy")  # the present ranges leave the spool: the open file keeps them
        assert fs.read(fh, 0, len(expected)) == bytes(expected)
        fs.close_fh(fh)
        fs.discard()
        fh = fs.open("staging/big.npy", os.O_RDWR)
        fs.write(fh, 128 + 8 * 10, b"\x00" * 8)
        fs.close_fh(fh)
        fs.truncate("staging/big.npy", 128 + 8 * 20)  # shorter: nothing past it comes from the base again
        fs.truncate("staging/big.npy", 128 + 8 * 40)
        data = fs.read_bytes("staging/big.npy")
        assert len(data) == 128 + 8 * 40 and data[128 + 8 * 20 :] == bytes(8 * 20)
        assert data[: 128 + 8 * 20] == bytes(expected[:128 + 80]) + bytes(8) + bytes(expected[128 + 88 : 128 + 160])
        fs.discard()
        fh = fs.open("staging/big.npy", os.O_RDWR)
        fs.write(fh, 128 + 8 * 999_999, np.array([-7.0]).tobytes())  # the last chunk row
        fs.close_fh(fh)
        assert fs.commit("two") == "two"
        with h5py.File(fs.source, "r") as f:
            got = VersionedHDF5File(f)["two"]["big"][()]
        want = np.arange(1_000_000, dtype="f8")
        want[-1] = -7
        assert (got == want).all()
    finally:
        fs.close()
        fs.loop.close()


def test_sparse_copy_up_copies_only_the_units_written(tmp_path, mount):
    def big(g):
        g.create_dataset("big", data=np.arange(4_000_000, dtype="f8"), chunks=(100_000,))

    src = make_versions(tmp_path / "big.h5", big)
    m = mount(src)
    staging = m.path / "staging/big.npy"
    with open(staging, "r+b") as f:
        f.seek(128 + 8 * 2_000_000)
        f.write(np.array([-1.0, -2.0, -3.0]).tobytes())
    blobs = [p for p in (m.state / "staging").rglob("blobs/*")]
    assert len(blobs) == 1
    st = blobs[0].stat()
    assert st.st_size == 128 + 8 * 4_000_000 and st.st_blocks * 512 < 2 * 8 * 100_000 + 65536  # one chunk row (+ header)
    expected = np.arange(4_000_000, dtype="f8")
    expected[2_000_000:2_000_003] = [-1, -2, -3]
    assert (np.load(staging) == expected).all()  # the holes read from the base
    assert run_versionfs("status", str(m.path)).stdout == "M big.npy\n"
    assert run_versionfs("commit", str(m.path), "-n", "two").returncode == 0
    with h5py.File(src, "r") as f:
        assert (VersionedHDF5File(f)["two"]["big"][()] == expected).all()


def test_sparse_copy_up_is_filled_before_a_whole_file_is_read(tmp_path, mount):
    """A rename of a sparse file is committed with every byte (not the holes)."""
    def big(g):
        g.create_dataset("big", data=np.arange(2_000_000, dtype="f8"), chunks=(50_000,))

    src = make_versions(tmp_path / "big2.h5", big)
    m = mount(src)
    with open(m.path / "staging/big.npy", "r+b") as f:
        f.seek(128)
        f.write(np.array([42.0]).tobytes())
    os.rename(m.path / "staging/big.npy", m.path / "staging/moved.npy")
    assert run_versionfs("commit", str(m.path), "-n", "two").returncode == 0
    expected = np.arange(2_000_000, dtype="f8")
    expected[0] = 42
    with h5py.File(src, "r") as f:
        assert (VersionedHDF5File(f)["two"]["moved"][()] == expected).all()


# -- one staging per source ------------------------------------------------------------------
def test_a_second_writable_mount_of_a_source_is_refused(tmp_path, mount):
    src = make_versions(tmp_path / "w.h5", v1)
    state = tmp_path / "state"
    first = mount(src, "--state-dir", str(state))
    mnt2 = tmp_path / "m2"
    mnt2.mkdir()
    try:
        result = run_versionfs("mount", str(src), str(mnt2), "--state-dir", str(state))
        assert result.returncode == 1 and not is_mounted(mnt2)
        assert str(first.path) in result.stderr and len(result.stderr.strip().splitlines()) == 1
        ro = run_versionfs("mount", str(src), str(mnt2), "--state-dir", str(state), "-o", "ro")
        assert ro.returncode == 0 and (mnt2 / "latest/x.npy").exists() and not (mnt2 / "staging").exists()
    finally:
        force_unmount(mnt2, None)


def test_staging_of_a_replaced_file_is_never_applied_to_the_new_one(tmp_path, mount):
    src = make_versions(tmp_path / "p.h5", v1)
    state = tmp_path / "state"
    m = mount(src, "--state-dir", str(state))
    (m.path / "staging/a.txt").write_text("staged for the old file\n")
    assert run_versionfs("umount", str(m.path)).returncode == 0
    src.unlink()
    assert run_versionfs("init", str(src)).returncode == 0
    mnt = tmp_path / "again"
    mnt.mkdir()
    try:
        result = run_versionfs("mount", str(src), str(mnt), "--state-dir", str(state))
        assert result.returncode == 1 and not is_mounted(mnt)
        message = result.stderr.strip()
        assert "another source" in message and "rm -r" in message and "mv" in message and len(message.splitlines()) == 1
        spool = next((state / "staging").iterdir())
        shutil.move(str(spool), str(spool) + ".saved")  # kept aside, as the message says
        assert run_versionfs("mount", str(src), str(mnt), "--state-dir", str(state)).returncode == 0
        assert os.listdir(mnt / "staging") == []
    finally:
        force_unmount(mnt, None)


# -- real mounts: other users, tools --------------------------------------------------------
@pytest.fixture
def shared_mount(tmp_path):
    """A mount that other users may use: -o allow_other,default_permissions, in a
    directory everyone can reach."""
    base = Path(tempfile.mkdtemp(prefix="vfs-shared-", dir="/tmp"))
    os.chmod(base, 0o755)
    src = make_versions(base / "s.h5", v1)
    mnt = base / "mnt"
    mnt.mkdir()
    result = run_versionfs("mount", str(src), str(mnt), "--state-dir", str(base / "state"), "--cache-dir",
                           str(base / "cache"), "-o", "allow_other,default_permissions")
    assert result.returncode == 0, result.stderr
    pid = int(os.getxattr(mnt, "user.versionfs.pid"))
    yield mnt
    force_unmount(mnt, pid)
    shutil.rmtree(base, ignore_errors=True)


def as_user(uid: int, *cmd: str, gid: int | None = None) -> subprocess.CompletedProcess:
    gid = uid if gid is None else gid
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
                          capture_output=True, text=True)


def test_other_users_of_an_allow_other_mount(shared_mount):
    staging = shared_mount / "staging"
    os.mkdir(staging / "shared", 0o777)
    os.chmod(staging / "shared", 0o1777)  # sticky, like /tmp
    made = as_user(NOBODY, "sh", "-c", f"umask 022; mkdir {staging}/shared/mine && echo data > {staging}/shared/mine/f"
                                        f" && echo more >> {staging}/shared/mine/f && chmod 600 {staging}/shared/mine/f")
    assert made.returncode == 0, made.stderr
    st = os.stat(staging / "shared/mine/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert (staging / "shared/mine/f").read_text() == "data\nmore\n"
    other = 65533
    assert as_user(other, "cat", f"{staging}/shared/mine/f").returncode != 0  # 0600: permission denied
    assert as_user(other, "rm", "-rf", f"{staging}/shared/mine").returncode != 0  # sticky directory
    assert as_user(NOBODY, "chown", "0", f"{staging}/shared/mine/f").returncode != 0  # no giving away
    assert as_user(NOBODY, "touch", f"{staging}/x.npy").returncode != 0  # root's file, 0644
    os.chown(staging / "shared/mine/f", other, other)  # root may give it away
    assert as_user(other, "cat", f"{staging}/shared/mine/f").stdout == "data\nmore\n"


def test_open_unlinked_through_the_kernel(shared_mount):
    path = shared_mount / "staging/tmpfile"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"abcdef")
        os.unlink(path)
        assert not path.exists()
        assert os.fstat(fd).st_size == 6 and os.fstat(fd).st_nlink == 0
        os.pwrite(fd, b"XY", 2)
        assert os.pread(fd, 100, 0) == b"abXYef"
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3 and os.pread(fd, 100, 0) == b"abX"
    finally:
        os.close(fd)
    assert run_versionfs("status", str(shared_mount)).stdout == ""


def _tree_with_links(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin/run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "bin/run.sh", 0o755)
    (root / "data.txt").write_text("numbers\n")
    os.chmod(root / "data.txt", 0o640)
    os.symlink("bin/run.sh", root / "run")
    os.symlink("../data.txt", root / "bin/data")
    os.symlink("missing/target", root / "dangling")
    for p in (root / "bin/run.sh", root / "data.txt"):
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_000))


def _listing(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, p.read_bytes())
    return out


def test_rsync_a_with_symlinks_round_trips(tmp_path, mount):
    src = make_versions(tmp_path / "r.h5", v1)
    m = mount(src)
    tree = tmp_path / "tree"
    _tree_with_links(tree)
    subprocess.run(["rsync", "-a", f"{tree}/", f"{m.path}/staging/in/"], check=True)
    assert run_versionfs("commit", str(m.path), "-n", "links").returncode == 0
    out = tmp_path / "out"
    subprocess.run(["rsync", "-a", f"{m.path}/latest/in/", f"{out}/"], check=True)
    assert _listing(out) == _listing(tree)
    assert subprocess.run([str(m.path / "latest/in/run")], capture_output=True, text=True).stdout == "run\n"
    # The .h5 image has no place for them: they are left out, the rest is there.
    listing = subprocess.run(["h5ls", "-r", str(m.path / "latest.h5")], capture_output=True, text=True).stdout
    assert "/in/bin/run.sh" in listing and "/in/run " not in listing and "dangling" not in listing


def test_s3_keeps_links_and_modes_as_s3fs_does(moto_endpoint, mount):
    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="data.txt", Body=b"numbers\n")
    # A link and an executable as s3fs-fuse writes them show as such.
    s3.put_object(Bucket=bucket, Key="made-by-s3fs", Body=b"data.txt", Metadata={"mode": str(stat.S_IFLNK | 0o777)})
    s3.put_object(Bucket=bucket, Key="tool.sh", Body=b"#!/bin/sh\n", Metadata={"mode": str(stat.S_IFREG | 0o750), "mtime": "1600000000"})
    m = mount(f"s3://{bucket}", "--endpoint-url", moto_endpoint)
    latest, staging = m.path / "latest", m.path / "staging"
    assert os.readlink(latest / "made-by-s3fs") == "data.txt" and (latest / "made-by-s3fs").read_text() == "numbers\n"
    assert stat.S_IMODE(os.stat(latest / "tool.sh").st_mode) == 0o750 and os.stat(latest / "tool.sh").st_mtime == 1_600_000_000
    assert os.readlink(staging / "made-by-s3fs") == "data.txt"
    assert {e.name: e.is_symlink() for e in os.scandir(staging)} == {"data.txt": False, "made-by-s3fs": True, "tool.sh": False}
    os.symlink("data.txt", staging / "link")
    (staging / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(staging / "run.sh", 0o755)
    os.utime(staging / "run.sh", ns=(0, 1_650_000_000_250_000_000))
    time.sleep(1.05)
    assert run_versionfs("commit", str(m.path)).returncode == 0
    head = s3.head_object(Bucket=bucket, Key="link")
    assert head["Metadata"]["mode"] == str(stat.S_IFLNK | 0o777)
    assert s3.get_object(Bucket=bucket, Key="link")["Body"].read() == b"data.txt"
    meta = s3.head_object(Bucket=bucket, Key="run.sh")["Metadata"]
    assert meta["mode"] == str(stat.S_IFREG | 0o755) and meta["mtime"] == "1650000000.250000000"
    assert meta["uid"] == str(os.getuid()) and meta["gid"] == str(os.getgid())
    assert os.readlink(latest / "link") == "data.txt"
    assert stat.S_IMODE(os.stat(latest / "run.sh").st_mode) == 0o755
    assert os.stat(latest / "run.sh").st_mtime_ns == 1_650_000_000_250_000_000
    entries = os.listdir(m.path / "history/link")
    assert len(entries) == 1 and os.readlink(m.path / "history/link" / entries[0]) == "data.txt"


def test_s3_dot_version_json_is_an_ordinary_file(moto_endpoint, mount):
    """S3 generates no names: a key named .version.json is staged and committed."""
    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key=".version.json", Body=b'{"mine": 1}\n')
    m = mount(f"s3://{bucket}", "--endpoint-url", moto_endpoint)
    staged = m.path / "staging/.version.json"
    assert staged.read_bytes() == b'{"mine": 1}\n'
    staged.write_bytes(b'{"mine": 2}\n')
    assert run_versionfs("status", str(m.path)).stdout == "M .version.json\n"
    time.sleep(1.05)
    assert run_versionfs("commit", str(m.path)).returncode == 0
    assert s3.get_object(Bucket=bucket, Key=".version.json")["Body"].read() == b'{"mine": 2}\n'


def test_a_rename_on_a_full_spool_disk_is_all_or_nothing(tmp_path, mount):
    """On a full state disk a rename of a directory of 300 entries either
    happens whole or fails with ENOSPC having changed nothing, also as the next
    mount sees it (test_errors_leave_staging_as_it_was makes it fail for sure)."""
    def v(g):
        g.create_dataset("x", data=np.arange(10))

    state = tmp_path / "small"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)], check=True)
    src = make_versions(tmp_path / "full.h5", v)
    try:
        m = mount(src, "--state-dir", str(state))
        staging = m.path / "staging"
        (staging / "d").mkdir()
        for i in range(300):
            (staging / f"d/{'n' * 200}{i}").write_bytes(b"")
        before = sorted(os.listdir(staging / "d"))
        filler = state / "filler"
        with open(filler, "wb") as f:  # the disk is full now
            try:
                while True:
                    f.write(bytes(64 << 10))
                    f.flush()
            except OSError:
                pass
        renamed = []
        for attempt in range(3):
            try:
                os.rename(staging / ("d" if not renamed else renamed[-1]), staging / f"e{attempt}")
                renamed.append(f"e{attempt}")
            except OSError as e:
                assert e.errno == errno.ENOSPC
        where = renamed[-1] if renamed else "d"
        assert sorted(os.listdir(staging)) == [where, "x.npy"] and sorted(os.listdir(staging / where)) == before
        filler.unlink()
        assert run_versionfs("umount", str(m.path)).returncode == 0
        m2 = mount(src, "--state-dir", str(state))
        assert sorted(os.listdir(m2.path / "staging")) == [where, "x.npy"]
        assert sorted(os.listdir(m2.path / "staging" / where)) == before
        assert run_versionfs("umount", str(m2.path)).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(state)])
