"""Behaviours doc/SEMANTICS.md states that no other test checked. Fast tier:
the FUSE handlers driven without a kernel (``fastfs``); each docstring names
the section of SEMANTICS.md it backs."""

from __future__ import annotations

import errno
import json
import os
import stat

import h5py
import numpy as np
import pytest

from fastfs import FastFS, ctx, fast_fs
from helpers import make_versions
from versionfs.backends.base import canonical_json
from versionfs.backends.hdf5_format import attr_to_json, json_to_attr


def v1(g):
    g.create_dataset("x", data=np.arange(100, dtype="i4"), chunks=(10,))
    g.create_group("sub").create_dataset("y", data=np.linspace(0, 1, 5))


@pytest.fixture
def fast(tmp_path):
    with fast_fs(make_versions(tmp_path / "f.h5", v1), tmp_path / "state") as fs:
        yield fs


def getattr_of(fast: FastFS, inode: int):
    return fast.call(fast.fs.getattr, inode, ctx())


@pytest.mark.parametrize("end", ["commit", "discard"])
def test_a_working_directory_in_staging_is_stale_after_a_commit_or_discard(fast, end):
    """SEMANTICS.md § Consistency: inodes of staging/ (staging/ itself and every
    directory and file below it) answer ESTALE once a commit or a discard has
    replaced staging; a new lookup (``cd`` again) finds the new staging."""
    fast.write_bytes("staging/sub/new.txt", b"hello\n")
    held = {path: fast.ino(path) for path in ("staging", "staging/sub", "staging/sub/new.txt")}
    for inode in held.values():
        getattr_of(fast, inode)  # fine before
    if end == "commit":
        assert fast.commit("v2") == "v2"
    else:
        fast.discard()
    for path, inode in held.items():
        with pytest.raises(OSError) as e:
            getattr_of(fast, inode)
        assert e.value.errno == errno.ESTALE, path
    assert stat.S_ISDIR(fast.stat("staging/sub").st_mode)  # looked up again: the new staging
    assert fast.exists("staging/sub/new.txt") == (end == "commit")
    assert getattr_of(fast, fast.ino("latest/sub"))  # version trees are not affected


def test_private_attributes_that_library_users_see(fast, tmp_path):
    """SEMANTICS.md § Private attributes: a committed file's dataset carries
    _versionfs_mtime_ns and _versionfs_mode (raw files also _versionfs_raw), the
    version group _versionfs_message; the mount never shows them in .attrs.json."""
    fast.write_bytes("staging/run.sh", b"#!/bin/sh\necho hi\n")
    fast.setattr("staging/run.sh", mode=0o755, mtime_ns=1_700_000_000_123_456_789)
    assert fast.loop.run(fast.committer.commit, "v2", "add the script") == "v2"
    shown = fast.read_bytes("latest/.attrs.json") if fast.exists("latest/.attrs.json") else b"{}"
    assert b"_versionfs" not in shown
    version_file = json.loads(fast.read_bytes("latest/.version.json"))
    assert version_file["message"] == "add the script" and "_versionfs_message" not in version_file["attributes"]
    with h5py.File(fast.source, "r") as f:  # as a library user reads the source
        version = f["_version_data/versions/v2"]
        assert version.attrs["_versionfs_message"] == "add the script"
        script = version["run.sh"]
        assert script.attrs["_versionfs_mtime_ns"] == 1_700_000_000_123_456_789
        assert stat.S_IMODE(int(script.attrs["_versionfs_mode"])) == 0o755
        assert bool(script.attrs["_versionfs_raw"]) is True
        assert script[:].tobytes() == b"#!/bin/sh\necho hi\n"


def test_complex_attributes_round_trip(fast):
    """SEMANTICS.md § Attributes: a complex value is {"dtype": "<c16", "value":
    [real, imag]} (arrays: a list of such pairs), and such JSON written to
    staging's .attrs.json is stored as that complex dtype."""
    assert attr_to_json(np.complex128(1 + 2j)) == {"dtype": "<c16", "value": [1.0, 2.0]}
    pairs = attr_to_json(np.array([1 + 2j, 3 - 4j], dtype="c8"))
    assert pairs == {"dtype": "<c8", "value": [[1.0, 2.0], [3.0, -4.0]]}
    back = json_to_attr(pairs)
    assert back.dtype == np.dtype("c8") and list(back) == [1 + 2j, 3 - 4j]
    assert json_to_attr({"dtype": "<c16", "value": [1.0, 2.0]}) == 1 + 2j
    attrs = {".": {"z": {"dtype": "<c16", "value": [0.5, -1.5]}}, "x.npy": {"w": pairs}}
    fast.write_bytes("staging/.attrs.json", json.dumps(attrs).encode())
    assert fast.commit("v2") == "v2"
    assert json.loads(fast.read_bytes("latest/.attrs.json")) == attrs
    with h5py.File(fast.source, "r") as f:
        version = f["_version_data/versions/v2"]
        assert version.attrs["z"] == 0.5 - 1.5j and version.attrs["z"].dtype == np.dtype("c16")
        assert list(version["x"].attrs["w"]) == [1 + 2j, 3 - 4j]


def test_dot_version_json_written_in_staging_is_kept_there_and_never_committed(fast):
    """SEMANTICS.md § staging/: the base's generated .version.json is not in
    staging; one written at its root is an ordinary staged file that status and
    commit ignore (each version generates its own), gone after the commit."""
    assert ".version.json" not in fast.listdir("staging")
    fast.write_bytes("staging/.version.json", b'{"name": "mine"}')
    assert fast.read_bytes("staging/.version.json") == b'{"name": "mine"}'
    assert fast.status() == []
    fast.write_bytes("staging/a.txt", b"a\n")
    assert fast.status() == ["A a.txt"]
    assert fast.commit("v2") == "v2"
    assert json.loads(fast.read_bytes("latest/.version.json"))["name"] == "v2"
    assert ".version.json" not in fast.listdir("staging")


def test_rollback_to_a_future_time_is_the_latest_and_unchanged(fast):
    """SEMANTICS.md § Where versionfs departs from its design contract: a time in
    the future selects the latest version, so rolling back to it changes nothing."""
    fast.write_bytes("staging/a.txt", b"a\n")
    assert fast.commit("v2") == "v2"
    assert fast.loop.run(fast.committer.rollback, "@2099-01-01") is None
    assert fast.loop.run(fast.committer.rollback, "@-2") is not None
    assert not fast.exists("latest/a.txt")


def test_version_trees_show_the_kept_mode_or_0644_and_0755(fast):
    """SEMANTICS.md § The layout: files of a version show the mode bits the version
    kept, 0644 where it kept none; directories 0755; writes there are EROFS."""
    fast.write_bytes("staging/run.sh", b"#!/bin/sh\n")
    fast.setattr("staging/run.sh", mode=0o750)
    assert fast.commit("v2") == "v2"
    assert stat.S_IMODE(fast.stat("latest/run.sh").st_mode) == 0o750
    assert stat.S_IMODE(fast.stat("latest/x.npy").st_mode) == 0o644
    assert stat.S_IMODE(fast.stat("latest/sub").st_mode) == 0o755
    with pytest.raises(OSError) as e:
        fast.write_bytes("latest/x.npy", b"no")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    assert os.path.basename(fast.source) == "f.h5"


def test_odd_names_get_one_rule(tmp_path):
    """SEMANTICS.md § Odd names: a dataset `a` beside a group `a.npy` is shown as
    `a~<8 hex of sha1("a")>.npy` (the group keeps its name), and `.version.json`
    lists the rename under "renamed": shown path -> the name it would have had."""
    import hashlib

    def odd(g):
        g.create_group("a.npy").create_dataset("inner", data=np.arange(3))
        g.create_dataset("a", data=np.arange(4))

    fs = FastFS(str(make_versions(tmp_path / "odd.h5", odd)), str(tmp_path / "state"))
    try:
        shown = f"a~{hashlib.sha1(b'a').hexdigest()[:8]}.npy"
        assert sorted(fs.listdir("latest")) == sorted([".version.json", "a.npy", shown])
        assert stat.S_ISDIR(fs.stat("latest/a.npy").st_mode)
        assert np.load(__import__("io").BytesIO(fs.read_bytes(f"latest/{shown}"))).tolist() == [0, 1, 2, 3]
        renamed = json.loads(fs.read_bytes("latest/.version.json"))["renamed"]
        assert renamed == {shown: "a.npy"}  # the usual shown name of dataset `a`
    finally:
        fs.close()
        fs.loop.close()


def test_a_chmod_alone_of_a_base_file_is_committed(fast):
    """SEMANTICS.md § What a version keeps: a chmod of a file of the base that is not
    written is a change (M); the version keeps the new mode and the same data (the
    dataset's chunks are shared, nothing is rewritten). A touch or chown alone is not."""
    fast.setattr("staging/x.npy", mode=0o600)
    fast.setattr("staging/sub/y.npy", mtime_ns=1_600_000_000_000_000_000)
    assert stat.S_IMODE(fast.stat("staging/x.npy").st_mode) == 0o600
    assert fast.status() == ["M x.npy"]
    before = fast.read_bytes("latest/x.npy")
    assert fast.commit("v2") == "v2"
    assert stat.S_IMODE(fast.stat("latest/x.npy").st_mode) == 0o600
    assert fast.read_bytes("latest/x.npy") == before
    assert stat.S_IMODE(fast.stat("versions/v1/x.npy").st_mode) == 0o644  # the old version as it was
    assert fast.status() == []
    with h5py.File(fast.source, "r") as f:
        assert stat.S_IMODE(int(f["_version_data/versions/v2/x"].attrs["_versionfs_mode"])) == 0o600
        assert "_versionfs_mode" not in f["_version_data/versions/v1/x"].attrs


def test_a_touch_or_chown_alone_of_a_base_symlink_is_not_a_change(fast):
    """SEMANTICS.md § What a version keeps: only a mode change of a file not written
    counts; a link's mode is always 0777, so `touch -h` or `chown -h` of a committed
    symbolic link changes nothing."""
    fast.symlink("x.npy", "staging/to_x")
    assert fast.commit("v2") == "v2"
    fast.setattr("staging/to_x", follow=False, mtime_ns=1_600_000_000_000_000_000)
    fast.setattr("staging/to_x", follow=False, uid=0, gid=0)
    assert fast.status() == []
    assert fast.commit("v3") is None
    assert fast.readlink("latest/to_x") == "x.npy"


def test_equal_timestamps_are_ordered_parent_before_child(tmp_path):
    """SEMANTICS.md § Selectors: versions with the same timestamp are listed parent
    before child (the prev_version chain), not by name, and an as-of lookup that lands
    on the tie takes the last of them."""
    import datetime as dt

    t = dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.timezone.utc)
    steps = [lambda g, i=i: g.create_dataset(f"d{i}", data=np.arange(3)) for i in range(3)]
    source = make_versions(tmp_path / "tie.h5", *steps, names=["b", "a", "c"], timestamps=[t, t, t])
    fs = FastFS(str(source), str(tmp_path / "state"))
    try:
        assert [n for n in fs.listdir("versions") if not n.endswith(".h5")] == ["__first_version__", "b", "a", "c"]
        assert sorted(fs.listdir("@2024-01-15T10:30")) == sorted(fs.listdir("versions/c"))
        assert sorted(fs.listdir("@0")) == sorted(fs.listdir("versions/b"))
    finally:
        fs.close()
        fs.loop.close()


def test_rename_exchange_is_einval_and_changes_nothing(fast):
    """SEMANTICS.md § Refusals: rename(2) with RENAME_EXCHANGE answers EINVAL, and
    both names keep what they had."""
    fast.write_bytes("staging/a.txt", b"a\n")
    fast.write_bytes("staging/b.txt", b"b\n")
    with pytest.raises(OSError) as e:
        fast.rename("staging/a.txt", "staging/b.txt", 2)  # RENAME_EXCHANGE
    assert e.value.errno == errno.EINVAL
    assert (fast.read_bytes("staging/a.txt"), fast.read_bytes("staging/b.txt")) == (b"a\n", b"b\n")


def test_bytes_attributes_that_are_not_utf8_round_trip(fast):
    """SEMANTICS.md § Attributes: bytes attributes are shown as UTF-8 text; bytes that
    are not UTF-8 as \\udcXX escapes (lone surrogates, Python's surrogateescape), which
    read back to exactly those bytes, so an edited .attrs.json keeps them."""
    for value in (np.bytes_(b"\xffab"), np.array([b"ok", b"\xfe"], dtype="S2"), np.bytes_(b"a\\xffb")):
        shown = canonical_json(attr_to_json(value))
        shown.decode("utf-8")  # the file is valid UTF-8
        back = json_to_attr(json.loads(shown))
        assert np.asarray(back).tobytes() == np.asarray(value).tobytes()
    attrs = {"x.npy": {"tag": {"dtype": "bytes", "value": "\udcffab"}, "vlen": "\udcfe"}}
    fast.write_bytes("staging/.attrs.json", canonical_json(attrs))
    assert fast.commit("v2") == "v2"
    with h5py.File(fast.source, "r") as f:
        assert f["_version_data/versions/v2/x"].attrs["tag"] == np.bytes_(b"\xffab")
        assert f["_version_data/versions/v2/x"].attrs["vlen"] == "\udcfe"  # h5py's own view of b"\xfe"
    assert json.loads(fast.read_bytes("latest/.attrs.json")) == attrs


def test_private_attributes_cannot_be_set_through_attrs_json(fast):
    """SEMANTICS.md § Private attributes: names versionfs or the library keep for
    themselves are ignored in an edited .attrs.json (a user cannot set a file's
    mode or a version's message that way); other attributes are set."""
    attrs = {"x.npy": {"_versionfs_mode": 0o100000, "units": "m"}}
    fast.write_bytes("staging/.attrs.json", json.dumps(attrs).encode())
    assert fast.commit("v2") == "v2"
    assert stat.S_IMODE(fast.stat("latest/x.npy").st_mode) == 0o644
    assert json.loads(fast.read_bytes("latest/.attrs.json")) == {"x.npy": {"units": "m"}}
    with h5py.File(fast.source, "r") as f:
        assert "_versionfs_mode" not in f["_version_data/versions/v2/x"].attrs


def test_a_writer_of_the_mounted_file_gets_hdf5_s_lock_error(fast):
    """SEMANTICS.md § Commits and durability: while mounted, the source is held open
    with HDF5's file lock, so another program opening it for writing fails; reading
    it stays possible."""
    import subprocess
    import sys

    def attempt(mode: str) -> subprocess.CompletedProcess:
        code = f"import h5py; h5py.File({fast.source!r}, {mode!r}).close()"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    writer = attempt("r+")
    assert writer.returncode != 0 and "lock" in writer.stderr.lower(), writer.stderr[-500:]
    assert attempt("r").returncode == 0
