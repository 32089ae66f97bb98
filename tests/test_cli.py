"""The command line: clear one-line errors, clean starts and stops, log/init/demo."""

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

from conftest import VERSIONFS, alive, daemon_pid, force_unmount, is_mounted, run_versionfs
from helpers import make_versions, version_dirs


@pytest.fixture
def good(tmp_path):
    return make_versions(tmp_path / "good.h5", lambda g: g.create_dataset("x", data=np.arange(5)))



def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_sources_are_refused_clearly(tmp_path, mnt):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    future = make_versions(tmp_path / "future.h5", lambda g: g.create_dataset("x", data=np.arange(3)))
    with h5py.File(future, "r+") as f:
        f["_version_data/versions"].attrs["data_version"] = 99
    cases = [
        (tmp_path / "missing.h5", "no such file"),
        (text, "not an HDF5 file"),
        (plain, "not a versioned HDF5 file"),
        (future, "refused by versioned-hdf5"),
        (tmp_path, "is a directory"),
    ]
    for source, words in cases:
        assert_one_line_error(run_versionfs("mount", str(source), str(mnt)), str(source), words)
        assert not is_mounted(mnt)


def test_unknown_mount_option_is_named(good, mnt):
    for extra in ([], ["-f"]):
        result = run_versionfs("mount", str(good), str(mnt), "-o", "ro,bogus_opt", *extra)
        assert_one_line_error(result, "unknown mount option 'bogus_opt'", "state_dir=")
        assert "fuse_session_new" not in result.stderr and "RuntimeError" not in result.stderr
        assert not is_mounted(mnt)


def test_bad_mount_points_are_refused_clearly(tmp_path, good, mnt):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    cases = [
        (tmp_path / "nowhere", "does not exist"),
        (tmp_path / "full", "not empty"),
        (good, "not a directory"),
    ]
    for target, words in cases:
        assert_one_line_error(run_versionfs("mount", str(good), str(target)), words)
    assert run_versionfs("mount", str(good), str(mnt)).returncode == 0
    assert_one_line_error(run_versionfs("mount", str(good), str(mnt)), "already mounted")


def test_missing_fuse_device(tmp_path, good, mnt):
    # A private mount namespace whose /dev has no fuse device (but a /dev/null).
    script = f"""
        mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 &&
        exec {sys.executable} -m versionfs mount {good} {mnt}
    """
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True)
    assert_one_line_error(result, "/dev/fuse is missing")
    assert not is_mounted(mnt)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(good, mnt, signum):
    proc = subprocess.Popen([*VERSIONFS, "mount", str(good), str(mnt), "-f"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert np.load(mnt / "latest/x.npy").tolist() == [0, 1, 2, 3, 4]
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_umount_waits_for_the_daemon(good, mnt):
    assert run_versionfs("mount", str(good), str(mnt)).returncode == 0
    pid = daemon_pid(mnt)
    assert pid and alive(pid)
    result = run_versionfs("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert not alive(pid)  # gone (or a zombie its reaper has yet to collect)
    assert_one_line_error(run_versionfs("umount", str(mnt)), "not mounted")


def test_umount_of_a_busy_mount_says_so(good, mnt):
    assert run_versionfs("mount", str(good), str(mnt)).returncode == 0
    with open(mnt / "latest/x.npy", "rb"):
        assert_one_line_error(run_versionfs("umount", str(mnt)), "cannot unmount")
    assert run_versionfs("umount", str(mnt)).returncode == 0


def test_log(tmp_path, good, mnt):
    make_versions(good, lambda g: g["x"].resize((7,)), names=["second"])
    result = run_versionfs("log", str(good))
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["__first_version__", "v1", "second"]
    assert result.stdout.splitlines()[-1].endswith("(current)")
    doc = json.loads(run_versionfs("log", str(good), "--json").stdout)
    assert [v["name"] for v in doc] == names and doc[-1]["current"] and doc[-1]["previous"] == "v1"
    assert doc[1]["timestamp"].endswith("Z")
    assert run_versionfs("mount", str(good), str(mnt)).returncode == 0
    assert run_versionfs("log", str(mnt)).stdout == result.stdout  # a mount point stands for its source
    assert_one_line_error(run_versionfs("log", str(tmp_path)), "not a versionfs mount")


def test_init(tmp_path, mount):
    path = tmp_path / "new.h5"
    result = run_versionfs("init", str(path))
    assert result.returncode == 0, result.stderr
    with h5py.File(path, "r") as f:
        assert VersionedHDF5File(f).current_version == "__first_version__"
    assert_one_line_error(run_versionfs("init", str(path)), "already exists")
    m = mount(path)
    assert version_dirs(m.path / "versions") == ["__first_version__"]
    assert os.listdir(m.path / "latest") == [".version.json"]
    assert not (m.path / "@-1").exists()


def test_demo(tmp_path):
    result = run_versionfs("demo", str(tmp_path / "demo"))
    mnt = tmp_path / "demo" / "mnt"
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        assert str(mnt) in result.stdout and "diff -r" in result.stdout
        assert f"{mnt}/staging/" in result.stdout and "versionfs commit" in result.stdout
        assert version_dirs(mnt / "versions") == ["__first_version__", "2024-01", "2024-02", "2024-02-fix"]
        diff = subprocess.run(["diff", "-r", str(mnt / "versions/2024-02"), str(mnt / "versions/2024-02-fix")], capture_output=True, text=True)
        assert diff.returncode == 1 and "rain_mm.npy" in diff.stdout and "sunshine_h.npy" in diff.stdout
        assert np.load(mnt / "@2024-03-02/daily/temperature.npy").shape == (60, 4)
        assert np.load(mnt / "latest/daily/temperature.npy")[3, 1] == -2.5
        # What it says to try under "History" and "As HDF5" works.
        assert "history/daily/temperature.npy/" in result.stdout and "latest.h5" in result.stdout
        assert [n.split("_", 2)[2] for n in sorted(os.listdir(mnt / "history/daily/rain_mm.npy"))] == [
            "2024-01", "2024-02", "2024-02-fix_deleted"]
        assert len(os.listdir(mnt / "history/daily/temperature.npy")) == 3
        assert subprocess.run(["h5ls", "-r", str(mnt / "latest.h5")], capture_output=True).returncode == 0
        h5diff = subprocess.run(["h5diff", str(mnt / "versions/2024-02.h5"), str(mnt / "versions/2024-02-fix.h5")],
                                capture_output=True)
        assert h5diff.returncode == 1
        assert run_versionfs("umount", str(mnt)).returncode == 0
    finally:
        force_unmount(mnt, None)


def test_version_flag():
    result = run_versionfs("--version")
    assert result.returncode == 0 and result.stdout.startswith("versionfs ")
