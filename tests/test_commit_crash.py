"""Crash safety and dedup of commits through the mount.

The daemon is killed (SIGKILL) at random instants of real commits; after a
remount the file must open with the old version list or the new one, every
version must read back right, and staged data must still be there unless the
new version is complete.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from versioned_hdf5 import VersionedHDF5File

from conftest import VERSIONFS, force_unmount, run_versionfs
from helpers import make_versions

N = 4_000_000  # 32 MiB of float64 in 128 KiB chunks: a commit takes a moment


def v1(g):
    g.create_dataset("x", data=np.arange(N, dtype="f8"), chunks=(16_384,))
    g.create_dataset("keep", data=np.arange(10))


def check_file(path, committed: list[str], trial: int) -> bool:
    """True if trial's version exists. Asserts everything else about the file."""
    with h5py.File(path, "r") as f:
        vf = VersionedHDF5File(f)
        names = set(vf._versions) - {"__first_version__"}
        new = f"t{trial}"
        assert names in (set(committed), set(committed) | {new}), (names, committed)
        for name in names:
            x = vf[name]["x"]
            k = int(name[1:]) if name.startswith("t") else 0
            assert x[0] == k and x[N // 2] == N // 2 and x[-1] == N - 1
            assert (vf[name]["keep"][()] == np.arange(10)).all()
        return new in names


def run_trials(tmp_path, trials: int, seed: int) -> list[str]:
    source = make_versions(tmp_path / "crash.h5", v1)
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    rng = random.Random(seed)
    committed, outcomes = ["v1"], []
    duration = None
    for trial in range(trials):
        assert run_versionfs("mount", str(source), str(mnt), "--state-dir", str(state)).returncode == 0
        pid = int(os.getxattr(mnt, "user.versionfs.pid"))
        try:
            staging = mnt / "staging"
            x = np.load(staging / "x.npy", mmap_mode="r").copy()
            x[0] = trial
            np.save(staging / "x.npy", x)
            np.save(staging / f"more{trial}.npy", np.random.default_rng(trial).standard_normal(2_000_000))
            (staging / f"note{trial}.txt").write_text(f"trial {trial}\n")
            started = time.monotonic()
            commit = subprocess.Popen([*VERSIONFS, "commit", str(mnt), "-n", f"t{trial}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if duration is None:  # the first trial measures a whole commit
                commit.wait(timeout=120)
                duration = time.monotonic() - started
            else:
                time.sleep(rng.uniform(0, duration * 1.2))
                os.kill(pid, signal.SIGKILL)
                commit.wait(timeout=60)
        finally:
            force_unmount(mnt, pid)
        # Remount: recovery runs, then the library and the mount agree.
        assert run_versionfs("mount", str(source), str(mnt), "--state-dir", str(state)).returncode == 0
        pid = int(os.getxattr(mnt, "user.versionfs.pid"))
        try:
            done = check_file(source, committed, trial)
            status = run_versionfs("status", str(mnt)).stdout.split("\n")
            if done:
                committed.append(f"t{trial}")
                assert status == [""], status
                assert (mnt / "latest" / f"note{trial}.txt").read_text() == f"trial {trial}\n"
            else:
                assert sorted(status) == ["", f"A more{trial}.npy", f"A note{trial}.txt", "M x.npy"], status
                assert np.load(mnt / "staging/x.npy", mmap_mode="r")[0] == trial
                assert run_versionfs("discard", str(mnt)).returncode == 0
            outcomes.append("new" if done else "old")
        finally:
            assert run_versionfs("umount", str(mnt)).returncode == 0
    return outcomes


def test_kill_during_commits(tmp_path):
    outcomes = run_trials(tmp_path, 6, seed=1)
    assert outcomes[0] == "new"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_during_commits_many(tmp_path):
    outcomes = run_trials(tmp_path, 60, seed=2)
    assert "old" in outcomes and outcomes.count("new") > 1


def test_dedup_writes_only_changed_chunks(tmp_path, mount):
    chunk = 16_384  # elements: 128 KiB chunks
    source = make_versions(tmp_path / "dedup.h5", lambda g: (
        g.create_dataset("x", data=np.random.default_rng(0).standard_normal(chunk * 800), chunks=(chunk,)),
        g.create_dataset("other", data=np.random.default_rng(1).standard_normal(chunk * 200), chunks=(chunk,)),
    ))
    m = mount(source)
    before = os.path.getsize(source)
    x = np.load(m.path / "staging/x.npy")
    changed = range(0, 800, 100)  # 8 of 800 chunks: 1%
    for c in changed:
        x[c * chunk + 5] += 1
    np.save(m.path / "staging/x.npy", x)
    np.save(m.path / "staging/other.npy", np.load(m.path / "latest/other.npy"))  # identical rewrite
    assert run_versionfs("commit", str(m.path), "-n", "one-percent").returncode == 0
    grown = os.path.getsize(source) - before
    chunk_bytes = chunk * 8
    assert grown < len(changed) * chunk_bytes + 2 * 1024 * 1024, grown  # ~1 MiB of chunks + metadata
    assert grown < x.nbytes * 0.05
    with h5py.File(source, "r") as f:
        v = VersionedHDF5File(f)["one-percent"]
        assert (v["x"][()] == x).all()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB file system of its own (tmpfs; needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("short, step", [(56, 8), pytest.param(128, 2, marks=[pytest.mark.slow, pytest.mark.timeout(1800)])])
def test_a_full_disk_leaves_the_mount_as_it_was(small_disk, tmp_path, mount, short, step):
    """Commits into a file whose disk has less room than they need, a few KiB more
    each time (so the disk fills while data is appended, while metadata is, while
    the journal is written): each fails with one line, the mount and the file stay
    as they were, staging is kept; the first commit with room succeeds, no remount."""
    from versionfs.backends.base import Change
    from versionfs.backends.hdf5 import HDF5Backend

    def v1_small(g):
        g.create_dataset("x", data=np.arange(200_000, dtype="f8"), chunks=(16_384,))

    data = np.random.default_rng(5).standard_normal(1_000_000)  # 8 MiB to append
    np.save(tmp_path / "big.npy", data)
    (tmp_path / "note.txt").write_text("a note\n")
    # How much this commit grows the file: the same commit, on a copy on a big disk.
    trial = make_versions(tmp_path / "trial.h5", v1_small)
    before = os.path.getsize(trial)
    backend = HDF5Backend(str(trial))
    changes = [Change("big.npy", "file", local=str(tmp_path / "big.npy")), Change("note.txt", "file", local=str(tmp_path / "note.txt"))]
    backend.commit("v1", changes, "full", None, backend.tree("v1"))
    backend.close()
    growth = os.path.getsize(trial) - before

    source = make_versions(small_disk / "f.h5", v1_small)
    original = source.read_bytes()
    m = mount(source)
    staging = m.path / "staging"
    np.save(staging / "big.npy", data)
    (staging / "note.txt").write_text("a note\n")
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free_bytes(small_disk) - growth + short * 1024)
    failures = 0
    while True:
        result = run_versionfs("commit", str(m.path), "-n", "full")
        if result.returncode == 0:
            break
        failures += 1
        assert result.returncode == 1 and "No space left on device" in result.stderr, (result.stderr, m.log[-3000:])
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert source.read_bytes() == original  # the file is as it was
        assert not os.path.exists(str(source) + ".versionfs-journal")
        assert sorted(os.listdir(m.path)) == ["history", "latest", "latest.h5", "staging", "versions"]
        assert sorted(os.listdir(m.path / "versions")) == ["__first_version__", "__first_version__.h5", "v1", "v1.h5"]
        assert np.load(m.path / "latest/x.npy")[-1] == 199_999
        assert sorted(run_versionfs("status", str(m.path)).stdout.split()) == ["A", "A", "big.npy", "note.txt"]
        assert failures < 2 * short // step
        os.truncate(filler, max(0, os.path.getsize(filler) - step * 1024))  # a little more room
    assert failures >= short // step // 2  # it did fail at many instants before there was room
    assert np.array_equal(np.load(m.path / "latest/big.npy"), data)
    assert (m.path / "latest/note.txt").read_text() == "a note\n"
    assert run_versionfs("status", str(m.path)).stdout == ""
    assert "answering EIO" not in m.log
    with h5py.File(source, "r") as f:
        assert np.array_equal(VersionedHDF5File(f)["full"]["big"][()], data)


def killed_commit_with_journal(tmp_path, rng, trial: int):
    """A commit killed while its journal is on disk: (source, mount point, state dir)."""
    source = make_versions(tmp_path / "crash.h5", v1)
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir(exist_ok=True)
    for attempt in range(20):
        assert run_versionfs("mount", str(source), str(mnt), "--state-dir", str(state)).returncode == 0
        pid = int(os.getxattr(mnt, "user.versionfs.pid"))
        try:
            x = np.load(mnt / "staging" / "x.npy", mmap_mode="r").copy()
            x[0] = trial  # trial > 0: check_file knows version t<k> by x[0] == k
            np.save(mnt / "staging" / "x.npy", x)
            np.save(mnt / "staging" / "more.npy", np.random.default_rng(trial).standard_normal(2_000_000))
            commit = subprocess.Popen([*VERSIONFS, "commit", str(mnt), "-n", f"t{trial}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            journal = source.parent / (source.name + ".versionfs-journal")
            deadline = time.monotonic() + 60
            while not journal.exists() and commit.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
            os.kill(pid, signal.SIGKILL)
            commit.wait(timeout=60)
        finally:
            force_unmount(mnt, pid)
        if journal.exists():
            return source, mnt, state
        assert run_versionfs("mount", str(source), str(mnt), "--state-dir", str(state)).returncode == 0
        assert run_versionfs("discard", str(mnt)).returncode == 0 and run_versionfs("umount", str(mnt)).returncode == 0
    pytest.fail("no commit was killed while its journal existed")


@pytest.mark.parametrize("trials", [1, pytest.param(8, marks=[pytest.mark.slow, pytest.mark.timeout(1800)])])
def test_a_killed_commit_s_journal_is_rolled_back_only_into_its_own_file(tmp_path, trials):
    rng = random.Random(trials)
    other = make_versions(tmp_path / "other.h5", lambda g: g.create_dataset("w", data=np.arange(5000)))
    for trial in range(1, trials + 1):
        base = tmp_path / f"trial{trial}"
        base.mkdir()
        source, mnt, state = killed_commit_with_journal(base, rng, trial)
        journal = source.parent / (source.name + ".versionfs-journal")
        crashed, journal_bytes = source.read_bytes(), journal.read_bytes()
        shutil.copyfile(other, source)  # another versioned file copied over it
        for command in (["mount", str(source), str(mnt), "--state-dir", str(state)], ["log", str(source)]):
            result = run_versionfs(*command)
            assert result.returncode == 1 and "does not belong" in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
        assert source.read_bytes() == other.read_bytes() and journal.read_bytes() == journal_bytes
        source.write_bytes(crashed)  # the file is put back: now the journal is rolled back into it
        assert run_versionfs("mount", str(source), str(mnt), "--state-dir", str(state)).returncode == 0
        pid = int(os.getxattr(mnt, "user.versionfs.pid"))
        try:
            assert not journal.exists()
            done = check_file(source, ["v1"], trial)
            status = sorted(run_versionfs("status", str(mnt)).stdout.split("\n"))
            assert status == ([""] if done else ["", "A more.npy", "M x.npy"]), status
        finally:
            assert run_versionfs("umount", str(mnt)).returncode == 0
            force_unmount(mnt, pid)
