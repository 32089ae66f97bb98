"""The command line: clear one-line errors, clean starts and stops, log/init/demo."""

from __future__ import annotations

import json
import os
import re
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
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["@0", "v1"], ["@1", "second"]]
    assert result.stdout.splitlines()[-1].endswith("(current)")
    doc = json.loads(run_versionfs("log", str(good), "--json").stdout)
    assert [v["name"] for v in doc] == ["v1", "second"] and doc[-1]["current"] and doc[-1]["previous"] == "v1"
    assert doc[1]["timestamp"].endswith("Z") and [v["position"] for v in doc] == [0, 1]
    assert run_versionfs("mount", str(good), str(mnt)).returncode == 0
    assert run_versionfs("log", str(mnt)).stdout == result.stdout  # a mount point stands for its source
    assert_one_line_error(run_versionfs("log", str(tmp_path)), "not in a versionfs mount")


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
    """Every command the demo prints runs as printed, in order, and does what it says."""
    directory = tmp_path / "demo"
    result = run_versionfs("demo", str(directory))
    mnt = directory / "mnt"
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        commands = [line[10:] for line in result.stdout.splitlines()[2:]]
        assert len(commands) == 17 and all(line[:10].strip().endswith(":") or not line[:10].strip()
                                           for line in result.stdout.splitlines()[2:])
        outputs = {}
        for command in commands:
            run = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=120)
            differs = command.split()[0].endswith("diff") or " diff " in command
            assert run.returncode == (1 if differs else 0), (command, run.stdout, run.stderr)
            assert "Traceback" not in run.stderr and "versionfs: " not in run.stderr, (command, run.stderr)
            outputs[command] = run.stdout
        by_start = lambda text: next(out for cmd, out in outputs.items() if text in cmd)  # noqa: E731
        assert "__first_version__" in by_start("/versions/") and "temperature.npy" in by_start("ls -R")
        assert '"units": "degC"' in by_start("cat ")
        assert "-2.5" in by_start("numpy.load")
        assert "rain_mm.npy" in by_start("diff -r") and "sunshine_h.npy" in by_start("diff -r")
        assert re.search(r"M daily/temperature\.npy\s+1 of 4 chunks", by_start("--stat"))
        assert "version:    2024-02  (@1 of 3)" in by_start("show ")
        assert len(by_start("history/daily").splitlines()) == 4  # total + three entries
        assert [line.split()[:3] for line in by_start("log " + str(mnt) + "/latest").splitlines()] == [
            ["A", "@0", "2024-01"], ["M", "@1", "2024-02"], ["M", "@2", "2024-02-fix"]]
        assert "/daily/temperature" in by_start("h5ls") and "differences found" in by_start("h5diff")
        assert by_start("status") == "M stations/names.txt\n"
        log_lines = outputs[next(cmd for cmd in commands if cmd.endswith(f"log {mnt}"))].splitlines()
        assert log_lines[-1].endswith("(current)  add Bern") and len(log_lines) == 4
        assert not is_mounted(mnt)  # "Done" unmounted it
        # Everything it made is in the demo directory.
        assert sorted(os.listdir(directory)) == ["mnt", "state", "weather.h5"]
    finally:
        force_unmount(mnt, None)


def test_version_flag():
    result = run_versionfs("--version")
    assert result.returncode == 0 and result.stdout.startswith("versionfs ")


COMMANDS = ["mount", "umount", "commit", "status", "discard", "rollback", "log", "show", "diff", "compact", "init",
            "demo", "completion"]


def test_help_reads_well():
    top = run_versionfs("--help")
    assert top.returncode == 0 and "SUPPRESS" not in top.stdout and "mount-helper" not in top.stdout
    for command in COMMANDS:
        assert f"    {command}" in top.stdout
    assert "exit codes:" in top.stdout and "3    commit, rollback: a conflict" in top.stdout
    wrong = run_versionfs("bogus")
    assert_one_line_error(wrong, "invalid choice: 'bogus'", "versionfs --help")
    assert wrong.returncode == 2 and "mount-helper" not in wrong.stderr and "SUPPRESS" not in wrong.stderr
    for command in COMMANDS:
        text = run_versionfs(command, "--help").stdout
        assert "examples:\n  versionfs " + command in text and "exit codes" in text, command
    mount_help = run_versionfs("mount", "--help").stdout
    assert re.search(r"SOURCE\s+a versioned HDF5 file", mount_help) and re.search(r"MOUNTPOINT\s+an empty directory", mount_help)
    assert re.search(r"MOUNTPOINT\s+a versionfs mount point, or any path inside one", run_versionfs("commit", "--help").stdout)
    assert "0    no differences\n  1    the versions differ" in run_versionfs("diff", "--help").stdout


def test_errors_name_the_cause(tmp_path, good, mount, mnt, moto_endpoint):
    # A truncated file: said so (the old check took "sblock" for a lock).
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    for args in (["log", str(truncated)], ["mount", str(truncated), str(mnt)]):
        assert_one_line_error(run_versionfs(*args), "truncated", "restore the whole file")
        assert "lock" not in run_versionfs(*args).stderr
    # A commit that another mount of the same file refuses.
    writable = mount(good)
    reader = mount(good, "-o", "ro")
    (writable.path / "staging/new.txt").write_text("x\n")
    refused = run_versionfs("commit", str(writable.path))
    assert_one_line_error(refused, "another process has the file open", "unmount or close it", "staging is kept")
    assert "FileBusy" not in refused.stderr
    assert run_versionfs("umount", str(reader.path)).returncode == 0
    assert run_versionfs("commit", str(writable.path)).returncode == 0
    # A bucket that does not exist, or an endpoint that does not answer.
    for args in (["init", "s3://missing-bucket"], ["log", "s3://missing-bucket"], ["mount", "s3://missing-bucket", str(mnt)]):
        result = run_versionfs(*args, "--endpoint-url", moto_endpoint)
        assert_one_line_error(result, "s3://missing-bucket", "no such bucket", "aws s3 mb")
        assert "botocore" not in result.stderr and "NoSuchBucket" not in result.stderr
    assert_one_line_error(run_versionfs("init", "s3://b", "--endpoint-url", "http://127.0.0.1:9"), "cannot reach", "endpoint")
