"""versionfs commit / status / discard / rollback through real mounts, checked
with the versioned-hdf5 library itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from versioned_hdf5 import VersionedHDF5File

from conftest import is_mounted, run_versionfs
from helpers import make_versions, npy_bytes, version_dirs


def v1(g):
    g.create_dataset("x", data=np.arange(1000, dtype="i4"), chunks=(100,))
    g.create_dataset("big", data=np.zeros((400, 256)), chunks=(10, 256))
    sub = g.create_group("sub")
    sub.create_dataset("y", data=np.linspace(0, 1, 50))
    sub.attrs["units"] = "m"
    g["x"].attrs["scale"] = 2.5
    g.attrs["project"] = "alpha"


@pytest.fixture
def src(tmp_path):
    return make_versions(tmp_path / "c.h5", v1)


def vfs(*args: str) -> subprocess.CompletedProcess:
    return run_versionfs(*args)


def commit(m, *args: str) -> str:
    result = vfs("commit", str(m.path), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def library(path, version=None):
    f = h5py.File(path, "r")
    vf = VersionedHDF5File(f)
    return f, vf, vf[version] if version else vf[vf.current_version]


def test_commit_writes_what_staging_shows(src, mount):
    m = mount(src)
    staging = m.path / "staging"
    x = np.load(staging / "x.npy")
    x[10:20] = -5
    np.save(staging / "x.npy", x)
    np.save(staging / "sub" / "new2d.npy", np.arange(60.0).reshape(6, 10))
    (staging / "labels.txt").write_text("alpha\nbeta γ\nwith \\n escape\n")
    (staging / "notes.md").write_bytes(b"# notes\n\x00\xff raw bytes")
    (staging / "broken.npy").write_bytes(b"not an npy file")
    (staging / "empty_group").mkdir()
    os.unlink(staging / "big.npy")
    attrs = json.loads((staging / "sub/.attrs.json").read_text())
    attrs["."]["units"] = "km"
    attrs["y.npy"] = {"calibrated": True, "gain": {"dtype": "<f4", "value": 1.5}}
    (staging / "sub/.attrs.json").write_text(json.dumps(attrs))

    status = vfs("status", str(m.path)).stdout.splitlines()
    assert sorted(status) == sorted([
        "M x.npy", "A sub/new2d.npy", "A labels.txt", "A notes.md", "A broken.npy",
        "A empty_group/", "D big.npy", "M sub/.attrs.json",
    ])
    assert commit(m, "-n", "second", "-m", "tuning") == "second"

    f, vf, v = library(src)
    with f:
        assert vf.current_version == "second"
        assert (v["x"][10:20] == -5).all() and v["x"][5] == 5
        assert v["x"].attrs["scale"] == 2.5  # unchanged attributes stay
        assert v["sub/new2d"].shape == (6, 10) and v["sub/new2d"][5, 9] == 59
        assert [s.decode() for s in v["labels"][()]] == ["alpha", "beta γ", "with \n escape"]
        assert "big" not in v and "empty_group" in v
        assert v["sub"].attrs["units"] == "km"
        assert v["sub/y"].attrs["calibrated"] == True  # noqa: E712
        assert v["sub/y"].attrs["gain"].dtype == np.float32
        assert v.attrs["project"] == "alpha"  # root attributes carried forward
        assert vf["v1"]["big"].shape == (400, 256)  # history untouched
    # The new version reads back through the mount exactly as staged.
    latest = m.path / "latest"
    assert (latest / "notes.md").read_bytes() == b"# notes\n\x00\xff raw bytes"
    assert (latest / "broken.npy").read_bytes() == b"not an npy file"
    assert (latest / "labels.txt").read_text() == "alpha\nbeta γ\nwith \\n escape\n"
    assert json.loads((latest / ".version.json").read_text())["message"] == "tuning"
    assert json.loads((latest / "sub/.attrs.json").read_text())["."] == {"units": "km"}
    # ... and staging is now the new version, with an empty spool.
    assert vfs("status", str(m.path)).stdout == ""
    assert sorted(os.listdir(m.path / "staging")) == sorted(set(os.listdir(latest)) - {".version.json"})


def test_new_version_is_visible_at_once(src, mount):
    m = mount(src)
    before = np.load(m.path / "latest/x.npy")  # the kernel has cached latest/ now
    assert np.load(m.path / "@-1/x.npy")[0] == 0
    x = before.copy()
    x[0] = 777
    np.save(m.path / "staging/x.npy", x)
    name = commit(m)
    assert np.load(m.path / "latest/x.npy")[0] == 777
    assert np.load(m.path / "@-1/x.npy")[0] == 777
    assert np.load(m.path / "@-2/x.npy")[0] == 0
    assert name in os.listdir(m.path / "versions")
    assert name.endswith("Z") and "T" in name  # default names are UTC times


def test_skip_if_unchanged(src, mount, tmp_path):
    m = mount(src)
    assert commit(m) == "unchanged"  # nothing written
    # Rewritten with identical bytes, touched, rsynced with --checksum: unchanged.
    (m.path / "staging/x.npy").write_bytes((m.path / "latest/x.npy").read_bytes())
    os.utime(m.path / "staging/sub/y.npy", (1, 1))
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", f"{m.path}/latest/.", str(copy)], check=True)
    subprocess.run(["rsync", "-a", "--checksum", f"{copy}/", f"{m.path}/staging/"], check=True)
    assert vfs("status", str(m.path)).stdout == ""
    assert commit(m) == "unchanged"
    with h5py.File(src, "r") as f:
        assert sorted(f["_version_data/versions"]) == ["__first_version__", "v1"]


def test_unchanged_commit_reads_no_data(tmp_path, mount):
    # A 1 TiB sparse dataset: reading it would never finish.
    def step(g):
        g.create_dataset("huge", shape=(2**40,), dtype="i1", chunks=(2**20,), fillvalue=3)

    m = mount(make_versions(tmp_path / "h.h5", step))
    assert commit(m) == "unchanged"
    os.utime(m.path / "staging/huge.npy", (5, 5))
    assert commit(m) == "unchanged"


def test_bad_content_fails_naming_the_path_and_keeps_staging(src, mount):
    m = mount(src)
    staging = m.path / "staging"
    np.save(staging / "x.npy", np.arange(1000, dtype="f8"))  # dtype change
    result = vfs("commit", str(m.path))
    assert result.returncode == 1 and "x.npy" in result.stderr and "dtype" in result.stderr
    assert vfs("status", str(m.path)).stdout.strip() == "M x.npy"
    np.save(staging / "x.npy", np.arange(1000, dtype="i4").reshape(10, 100))  # rank change
    result = vfs("commit", str(m.path))
    assert result.returncode == 1 and "x.npy" in result.stderr
    (staging / "x.npy").write_bytes(b"garbage")  # not .npy where a dataset is
    result = vfs("commit", str(m.path))
    assert result.returncode == 1 and "x.npy" in result.stderr
    (staging / "sub/.attrs.json").write_text("{not json")
    os.unlink(staging / "x.npy")
    result = vfs("commit", str(m.path))
    assert result.returncode == 1 and "sub/.attrs.json" in result.stderr
    with h5py.File(src, "r") as f:
        assert sorted(f["_version_data/versions"]) == ["__first_version__", "v1"]
    assert sorted(vfs("status", str(m.path)).stdout.split("\n")) == ["", "D x.npy", "M sub/.attrs.json"]


@pytest.mark.parametrize("name", ["", "a/b", "@x", ".hidden", "__first_version__", "v1", "n" * 256])
def test_version_names_are_checked(src, mount, name):
    m = mount(src)
    (m.path / "staging/new.bin").write_bytes(b"1")
    result = vfs("commit", str(m.path), "-n", name)
    assert result.returncode == 1 and result.stderr.strip()
    assert vfs("status", str(m.path)).stdout.strip() == "A new.bin"


def test_discard(src, mount):
    m = mount(src)
    (m.path / "staging/new.bin").write_bytes(b"1")
    os.unlink(m.path / "staging/x.npy")
    assert vfs("discard", str(m.path)).returncode == 0
    assert vfs("status", str(m.path)).stdout == ""
    assert sorted(os.listdir(m.path / "staging")) == sorted(set(os.listdir(m.path / "latest")) - {".version.json"})


def test_rollback(src, mount):
    m = mount(src)
    np.save(m.path / "staging/x.npy", np.full(1000, 9, dtype="i4"))
    (m.path / "staging/extra.bin").write_bytes(b"e")
    second = commit(m, "-n", "second")
    name = vfs("rollback", str(m.path), "@-2", "-n", "back").stdout.strip()
    assert name == "back"
    assert version_dirs(m.path / "versions") == ["__first_version__", "v1", "second", "back"]
    result = subprocess.run(["diff", "-r", "--exclude=.version.json", str(m.path / "versions/v1"), str(m.path / "latest")])
    assert result.returncode == 0
    assert np.load(m.path / f"versions/{second}/x.npy")[0] == 9  # history is never rewritten
    assert json.loads((m.path / "latest/.version.json").read_text())["message"] == "rollback to v1"
    assert vfs("rollback", str(m.path), "v1").stdout.strip() == "unchanged"  # already that content
    assert vfs("rollback", str(m.path), "nosuch").returncode == 1
    (m.path / "staging/pending.bin").write_bytes(b"p")
    result = vfs("rollback", str(m.path), "v1")
    assert result.returncode == 1 and "staging has changes" in result.stderr


def test_conflicts_and_rebase(src, tmp_path, mount):
    m = mount(src)
    staging = m.path / "staging"
    x = np.load(staging / "x.npy")
    x[0] = -1
    np.save(staging / "x.npy", x)
    (staging / "mine.bin").write_bytes(b"mine")
    assert vfs("umount", str(m.path)).returncode == 0
    # Meanwhile someone else commits with the library: x changes.
    make_versions(src, lambda g: g["x"].__setitem__(1, 111), names=["theirs"])
    m2 = mount(src, "--state-dir", str(m.state))
    result = vfs("commit", str(m2.path))
    assert result.returncode == 3 and "x.npy" in result.stderr and "mine.bin" not in result.stderr
    assert sorted(vfs("status", str(m2.path)).stdout.split()) == sorted(["M", "x.npy", "A", "mine.bin"])
    # Undo the conflicting path: the rest commits on top of their version.
    subprocess.run(["cp", str(m2.path / "latest/x.npy"), str(m2.path / "staging/x.npy")], check=True)
    commit(m2)
    f, vf, v = library(src)
    with f:
        assert v["x"][1] == 111 and v["x"][0] == 0 and "mine.bin" in v
        assert v.attrs["prev_version"] == "theirs"


def test_staged_files_survive_kill_9(src, mount):
    m = mount(src)
    (m.path / "staging/closed.bin").write_bytes(b"closed")
    fd = os.open(m.path / "staging/synced.bin", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"synced")
    os.fsync(fd)
    os.kill(m.pid, signal.SIGKILL)
    try:
        os.close(fd)
    except OSError:
        pass  # the daemon is gone
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)])
    m2 = mount(src, "--state-dir", str(m.state))
    assert (m2.path / "staging/closed.bin").read_bytes() == b"closed"
    assert (m2.path / "staging/synced.bin").read_bytes() == b"synced"
    assert sorted(vfs("status", str(m2.path)).stdout.split()) == ["A", "A", "closed.bin", "synced.bin"]


def test_autocommit(src, mount):
    m = mount(src, "--autocommit", "1")
    with open(m.path / "staging/auto.bin", "wb") as f:
        f.write(b"a")
        time.sleep(2.5)  # open for writing: no commit yet
        with h5py.File(src, "r", locking=False) as h:
            assert len(h["_version_data/versions"]) == 2
    deadline = time.monotonic() + 20
    while len(version_dirs(m.path / "versions")) < 3:
        assert time.monotonic() < deadline, m.log
        time.sleep(0.2)
    assert (m.path / "latest/auto.bin").read_bytes() == b"a"
    time.sleep(2)
    assert len(version_dirs(m.path / "versions")) == 3  # no empty commits


def test_control_channel_is_private(src, mount):
    m = mount(src)
    (m.path / "staging/new.bin").write_bytes(b"1")
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "versionfs", "commit", str(m.path)],
        capture_output=True, text=True, cwd="/",
    )
    assert result.returncode != 0
    assert vfs("status", str(m.path)).stdout.strip() == "A new.bin"
    assert is_mounted(m.path)


def test_read_only_mount_has_no_staging(src, mount):
    m = mount(src, "-o", "ro")
    assert "staging" not in os.listdir(m.path)
    result = vfs("commit", str(m.path))
    assert result.returncode == 1 and "staging" in result.stderr


def test_in_place_edits_commit_exactly_what_was_written(src, mount):
    m = mount(src)
    path = m.path / "staging/big.npy"
    header = len(npy_bytes(np.zeros((0, 256))))
    expected = np.zeros((400, 256))
    with open(path, "r+b") as f:  # two separate regions, one across a chunk boundary
        f.seek(header + (10 * 256 - 1) * 8)
        f.write(np.array([1.5, 2.5]).tobytes())
        expected.flat[10 * 256 - 1 : 10 * 256 + 1] = [1.5, 2.5]
        f.seek(header + 399 * 256 * 8)
        f.write(np.array([7.0]).tobytes())
        expected[399, 0] = 7.0
    mm = np.load(path, mmap_mode="r+")  # and through a shared writable mapping
    mm[200, 100] = -3.0
    expected[200, 100] = -3.0
    mm.flush()
    del mm
    with open(m.path / "staging/x.npy", "r+b") as f:  # rewriting identical bytes
        f.seek(128)
        same = f.read(40)
        f.seek(128)
        f.write(same)
    assert vfs("status", str(m.path)).stdout == "M big.npy\n"
    assert commit(m, "-n", "edited") == "edited"
    f, vf, v = library(src)
    with f:
        assert (v["big"][()] == expected).all()
        assert (v["x"][()] == np.arange(1000)).all()


def test_an_edit_interrupted_by_a_crash_is_compared_in_full(src, mount):
    m = mount(src)
    fd = os.open(m.path / "staging/x.npy", os.O_WRONLY)
    os.pwrite(fd, np.array([-9], dtype="i4").tobytes(), 128 + 4 * 500)
    os.kill(m.pid, signal.SIGKILL)  # the written ranges were never saved
    try:
        os.close(fd)
    except OSError:
        pass
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)])
    m2 = mount(src, "--state-dir", str(m.state))
    assert vfs("status", str(m2.path)).stdout == "M x.npy\n"
    commit(m2, "-n", "after-crash")
    f, vf, v = library(src)
    with f:
        assert v["x"][500] == -9 and v["x"][499] == 499


def test_a_path_keeps_what_versioned_hdf5_pinned_for_it(src, mount, tmp_path):
    """versioned-hdf5 keeps a path's chunk shape, dtype and rank for ever once a
    dataset existed there: shorter raw files, emptied ones, an rsync of a shorter
    file and a path re-added with another size, dtype or rank all commit."""
    m = mount(src)
    staging = m.path / "staging"
    notes, blob = os.urandom(1000), os.urandom(1 << 20)
    (staging / "notes.bin").write_bytes(notes)
    (staging / "blob.dat").write_bytes(blob)
    commit(m, "-n", "r1")
    (staging / "notes.bin").write_bytes(notes[:500])
    (staging / "blob.dat").write_bytes(b"")
    commit(m, "-n", "r2")
    shorter = tmp_path / "shorter"
    shorter.mkdir()
    (shorter / "notes.bin").write_bytes(notes[:123])
    subprocess.run(["rsync", "-a", f"{shorter}/", f"{staging}/"], check=True)
    commit(m, "-n", "r3")
    np.save(staging / "e.npy", np.arange(100.0))
    commit(m, "-n", "r4")
    os.unlink(staging / "e.npy")
    commit(m, "-n", "r5")
    np.save(staging / "e.npy", np.arange(5000.0))  # another size
    commit(m, "-n", "r6")
    os.unlink(staging / "e.npy")
    commit(m, "-n", "r7")
    e = np.arange(60, dtype="i2").reshape(6, 10)
    np.save(staging / "e.npy", e)  # another dtype and rank: a new dataset
    commit(m, "-n", "r8")
    with open(staging / "e.npy", "r+b") as f:  # an edit in place of it
        f.seek(-2, os.SEEK_END)
        f.write(np.array([-7], dtype="i2").tobytes())
    e[-1, -1] = -7
    commit(m, "-n", "r9")
    versions = m.path / "versions"
    assert (versions / "r1/notes.bin").read_bytes() == notes and (versions / "r1/blob.dat").read_bytes() == blob
    assert (versions / "r2/notes.bin").read_bytes() == notes[:500] and (versions / "r2/blob.dat").read_bytes() == b""
    assert (versions / "r3/notes.bin").read_bytes() == notes[:123]
    assert np.array_equal(np.load(versions / "r6/e.npy"), np.arange(5000.0))
    assert not (versions / "r7/e.npy").exists()
    for name in ("r8", "r9"):
        got = np.load(versions / name / "e.npy")
        assert got.dtype == np.int16 and got.shape == (6, 10)
    assert np.array_equal(np.load(versions / "r9/e.npy"), e)
    assert sorted(line.split("_")[0] for line in os.listdir(m.path / "history/e.npy")) == ["0000", "0001", "0002", "0003", "0004", "0005"]
    f, vf, v = library(src, "r9")
    with f:
        assert vf["r2"]["notes.bin"][()].tobytes() == notes[:500]
        assert np.array_equal(vf["r6"]["e"][()], np.arange(5000.0))
        # The new dtype and rank are kept under an internal name, shown as e.npy.
        [stored] = [n for n in v if n.startswith("e~")]
        assert np.array_equal(v[stored][()], e) and v[stored].attrs["_versionfs_name"] == "e"
    with h5py.File(versions / "r9.h5", "r") as plain:  # the plain file has it under its own name
        assert np.array_equal(plain["e"][()], e) and "_versionfs_name" not in plain["e"].attrs


def peak_rss(pid: int) -> int:
    """The daemon's peak resident memory so far (bytes)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def sparse_commit_growth(src, mount, size: int) -> int:
    """Peak memory a commit of a sparse raw file and a sparse .npy of ``size``
    bytes each adds to the daemon; checks what was stored."""
    m = mount(src)
    with open(m.path / "staging/sparse.bin", "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"middle")
    array = np.lib.format.open_memmap(m.path / "staging/sparse.npy", mode="w+", dtype="f8", shape=(size // 8,))
    array[size // 16] = 2.5
    array.flush()
    del array
    before = peak_rss(m.pid)
    commit(m, "-n", "sparse")
    growth = peak_rss(m.pid) - before
    with open(m.path / "latest/sparse.bin", "rb") as f:
        f.seek(size // 2 - 1)
        assert f.read(8) == b"\0middle\0" and os.fstat(f.fileno()).st_size == size
    assert np.load(m.path / "latest/sparse.npy", mmap_mode="r")[size // 16] == 2.5
    return growth


def test_a_commit_s_memory_is_bounded_whatever_the_file_size(src, mount):
    growth = sparse_commit_growth(src, mount, 256 << 20)
    assert growth < 200 << 20, growth  # two 256 MiB files went through it


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_commit_of_2_gib_stays_within_its_slab(src, mount):
    growth = sparse_commit_growth(src, mount, 2 << 30)
    assert growth < 300 << 20, growth
