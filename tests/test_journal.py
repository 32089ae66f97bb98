"""The rollback journal: a commit killed at any instant leaves the old file or the new one.

A child process commits a new version through ``JournaledFile`` and is killed
(SIGKILL) right after its k-th file-changing system call (pwrite, ftruncate,
fsync, unlink) in the journal module: every instant between two of those calls
is a distinct crash point. The parent then runs recovery and checks the file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from versioned_hdf5 import VersionedHDF5File

from conftest import run_versionfs
from helpers import make_versions
from versionfs import journal

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import h5py, numpy as np
    from versioned_hdf5 import VersionedHDF5File
    from versionfs import journal

    path, kill_after = sys.argv[1], int(sys.argv[2])
    calls = 0

    class CountingOs:
        def __getattr__(self, name):
            return getattr(os, name)

    def counted(fn):
        def wrapper(*args):
            global calls
            result = fn(*args)
            calls += 1
            if calls == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    proxy = CountingOs()
    for name in ("pwrite", "ftruncate", "fsync", "unlink"):
        setattr(proxy, name, counted(getattr(os, name)))
    journal.os = proxy

    jf = journal.JournaledFile(path)
    with h5py.File(jf, "r+") as f:
        with VersionedHDF5File(f).stage_version("new") as g:
            g["x"][5:4000] = -1
            g.create_dataset("y", data=np.arange(50_000), chunks=(10_000,))
            del g["z"]
            g.attrs["note"] = "the new version"
    jf.commit()
    print(calls)
    """
)


def build(path):
    def v1(g):
        g.create_dataset("x", data=np.arange(100_000), chunks=(1000,))
        g.create_dataset("z", data=np.ones(10))

    def v2(g):
        g["x"][0] = 42

    return make_versions(path, v1, v2)


def check(path) -> str:
    """The file opens, its version list is old or new, and every version reads right."""
    with h5py.File(path, "r") as f:
        vf = VersionedHDF5File(f)
        names = sorted(vf._versions)
        assert names in (["__first_version__", "v1", "v2"], ["__first_version__", "new", "v1", "v2"]), names
        x1 = vf["v1"]["x"][()]
        assert x1[0] == 0 and (x1 == np.arange(100_000)).all()
        assert vf["v2"]["x"][0] == 42 and vf["v2"]["z"][()].tolist() == [1.0] * 10
        if "new" in names:
            assert vf.current_version == "new"
            x = vf["new"]["x"][()]
            assert (x[5:4000] == -1).all() and x[0] == 42 and x[4000] == 4000
            assert (vf["new"]["y"][()] == np.arange(50_000)).all()
            assert "z" not in vf["new"]
            return "new"
        assert vf.current_version == "v2"
        return "old"


def run_child(path, kill_after: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(path), str(kill_after)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return build(tmp_path_factory.mktemp("journal") / "original.h5")


@pytest.fixture(scope="module")
def total_calls(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("journal") / "full.h5"
    shutil.copy(original, path)
    result = run_child(path, 0)
    assert result.returncode == 0, result.stderr
    assert check(path) == "new"
    assert not (path.parent / (path.name + journal.JOURNAL_SUFFIX)).exists()
    return int(result.stdout)


def crash_and_check(original, tmp_path, k: int) -> str:
    path = tmp_path / f"crash{k}.h5"
    shutil.copy(original, path)
    result = run_child(path, k)
    assert result.returncode == -9, (k, result.stderr)
    journal.recover(str(path))
    return check(path)


def crash_points(total: int, count: int) -> list[int]:
    return sorted({1, 2, total - 3, total - 2, total - 1, total, *np.linspace(1, total, count).astype(int).tolist()})


def test_commit_without_crash_leaves_no_journal(total_calls):
    assert total_calls > 5


def test_crash_at_sampled_instants(original, total_calls, tmp_path):
    outcomes = [crash_and_check(original, tmp_path, k) for k in crash_points(total_calls, 16)]
    assert "old" in outcomes and outcomes[-1] == "new"  # killed after the journal's deletion


@pytest.mark.slow
def test_crash_at_every_instant(original, total_calls, tmp_path):
    outcomes = [crash_and_check(original, tmp_path, k) for k in range(1, total_calls + 1)]
    # Once the new bytes started going in place the outcome must be "new" ever after.
    first_new = outcomes.index("new")
    assert all(o == "new" for o in outcomes[first_new:])


def test_abort_restores_the_original_bytes(original, tmp_path):
    path = tmp_path / "abort.h5"
    shutil.copy(original, path)
    before = path.read_bytes()
    jf = journal.JournaledFile(str(path))
    with h5py.File(jf, "r+") as f:
        with VersionedHDF5File(f).stage_version("new") as g:
            g.create_dataset("big", data=np.arange(1_000_000))
    jf.abort()
    assert path.read_bytes() == before


def test_a_second_writer_is_refused(original, tmp_path):
    path = tmp_path / "busy.h5"
    shutil.copy(original, path)
    jf = journal.JournaledFile(str(path))
    try:
        with pytest.raises(journal.FileBusy):
            journal.JournaledFile(str(path))
        with pytest.raises(OSError):  # HDF5's own lock sees ours
            h5py.File(path, "r+")
    finally:
        jf.abort()


def leftover_journal(original, tmp_path, total_calls, name: str):
    """A copy of the original file whose commit was killed halfway: its journal is left."""
    path = tmp_path / name
    shutil.copy(original, path)
    k = total_calls // 2
    assert run_child(path, k).returncode == -9
    assert os.path.exists(journal.journal_path(str(path)))
    return path


@pytest.mark.parametrize("how", ["copied over", "moved over"])
def test_a_journal_is_never_rolled_back_into_another_file(original, total_calls, tmp_path, how):
    path = leftover_journal(original, tmp_path, total_calls, "f.h5")
    other = make_versions(tmp_path / "other.h5", lambda g: g.create_dataset("w", data=np.arange(3000)),
                          lambda g: g["w"].__setitem__(0, 7))
    if how == "copied over":
        shutil.copyfile(other, path)  # the same inode, other content
    else:
        shutil.copyfile(other, tmp_path / "tmp.h5")
        os.replace(tmp_path / "tmp.h5", path)
    before, journal_bytes = path.read_bytes(), open(journal.journal_path(str(path)), "rb").read()
    with pytest.raises(journal.JournalRefused, match="does not belong"):
        journal.recover(str(path))
    result = run_versionfs("log", str(path))
    assert result.returncode == 1 and "journal" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before  # both files as they were
    assert open(journal.journal_path(str(path)), "rb").read() == journal_bytes
    with h5py.File(path, "r") as f:
        assert sorted(VersionedHDF5File(f)._versions) == ["__first_version__", "v1", "v2"]


def test_a_journal_record_outside_the_file_is_refused(original, tmp_path):
    path = tmp_path / "f.h5"
    shutil.copy(original, path)
    before = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    identity = journal.Identity.of(fd, str(path))  # the right file: only the record is wrong
    os.close(fd)
    head = identity.head
    for records in ([(2**40, b"x" * 10)], [(4096, b"x" * 10), (0, b"y")], [(identity.size - 5, b"z" * 10)]):
        with open(journal.journal_path(str(path)), "wb") as j:
            j.write(journal.complete(identity, records, 10, head))  # a valid checksum
        with pytest.raises(journal.JournalRefused):
            journal.recover(str(path))
        assert path.read_bytes() == before
    os.unlink(journal.journal_path(str(path)))


def test_a_journal_cut_short_at_its_creation_is_dropped(original, tmp_path):
    path = tmp_path / "f.h5"
    shutil.copy(original, path)
    before = path.read_bytes()
    with open(journal.journal_path(str(path)), "wb") as j:
        j.write(journal.MAGIC[:5])  # the commit died writing its first bytes: nothing else happened
    assert journal.recover(str(path))
    assert path.read_bytes() == before and not os.path.exists(journal.journal_path(str(path)))
