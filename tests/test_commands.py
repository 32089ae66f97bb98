"""log, show and diff through the real command, on a source, on a mount and on
paths inside a mount; --json of every command that prints results."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import run_versionfs
from helpers import make_versions
from s3servers import make_client, make_versioned_bucket

UTC = dt.timezone.utc
CHUNK = 1000


def one_line_error(result, code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Error" not in lines[0] and "Traceback" not in result.stderr
    return lines[0]


def ok(*args: str) -> subprocess.CompletedProcess:
    result = run_versionfs(*args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def backdated(tmp_path_factory):
    """Versions whose times are older than the file (so older than its
    __first_version__): x in v1, y added in v2 (and x's attributes), x's first
    chunk changed and y deleted in v3."""
    path = tmp_path_factory.mktemp("log") / "log.h5"

    def v1(g):
        g.create_dataset("x", data=np.arange(4 * CHUNK, dtype="f8"), chunks=(CHUNK,), compression="gzip")

    def v2(g):
        g.create_dataset("y", data=np.ones(10))
        g["x"].attrs["units"] = "m"

    def v3(g):
        g["x"][:10] = -1
        del g["y"]
        g.create_group("sub").create_dataset("z", data=np.arange(3))

    stamps = [dt.datetime(2024, m, 1, 6, tzinfo=UTC) for m in (1, 2, 3)]
    return make_versions(path, v1, v2, v3, names=["v1", "v2", "v3"], timestamps=stamps)


def test_log_oldest_first_messages_filters(backdated, mount, tmp_path):
    src = tmp_path / "log.h5"
    src.write_bytes(backdated.read_bytes())  # a copy: this test commits
    lines = ok("log", str(src)).stdout.splitlines()
    # __first_version__ (stamped at the file's creation, after these) is not listed: line N is @N.
    assert [line.split()[:3] for line in lines] == [
        ["@0", "v1", "2024-01-01T06:00:00Z"], ["@1", "v2", "2024-02-01T06:00:00Z"],
        ["@2", "v3", "2024-03-01T06:00:00Z"]]
    assert lines[-1].endswith("(current)")
    assert [line.split()[1] for line in ok("log", str(src), "-n", "2").stdout.splitlines()] == ["v2", "v3"]
    ranged = ok("log", str(src), "--since", "2024-01-15", "--until", "2024-02-01T06:00+00:00").stdout
    assert [line.split()[1] for line in ranged.splitlines()] == ["v2"]
    one_line_error(run_versionfs("log", str(src), "--since", "2024-13-01"), 1, "--since", "not a time")
    one_line_error(run_versionfs("log", str(src), "-n", "0"), 2, "positive")

    m = mount(src)
    np.save(m.path / "staging/x.npy", np.zeros(4 * CHUNK))
    name = ok("commit", str(m.path), "-m", "zeros for x").stdout.strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{6}Z", name)  # the default name: no ':' to escape
    assert all("%" not in entry for entry in os.listdir(m.path / "history/x.npy"))
    last = ok("log", str(m.path)).stdout.splitlines()[-1]
    assert last.split()[:2] == ["@3", name] and last.endswith("(current)  zeros for x")

    # Only the versions in which a file changed, as history/ has them; from anywhere in the mount.
    expected = [["A", "@0", "v1"], ["M", "@1", "v2"], ["M", "@2", "v3"], ["M", "@3", name]]  # v2: its attributes
    for where in ([str(src), "x.npy"], [str(m.path), "x.npy"], [str(m.path / "latest/x.npy")],
                  [str(m.path / "versions/v1/x.npy")], [str(m.path / "@-1/x.npy")], [str(m.path / "staging/x.npy")],
                  [str(m.path / "history/x.npy")], [str(m.path / "history/x.npy" / sorted(os.listdir(m.path / "history/x.npy"))[0])]):
        assert [line.split()[:3] for line in ok("log", *where).stdout.splitlines()] == expected, where
    assert len(os.listdir(m.path / "history/x.npy")) == 4  # the same count as history/
    assert [line.split()[:3] for line in ok("log", str(m.path), "y.npy").stdout.splitlines()] == [
        ["A", "@1", "v2"], ["D", "@2", "v3"]]
    assert len(ok("log", str(m.path / "versions/v2")).stdout.splitlines()) == 4  # a version's root: every version
    doc = json.loads(ok("log", str(m.path / "latest/x.npy"), "--json").stdout)
    assert [(d["name"], d["change"], d["position"]) for d in doc] == [("v1", "A", 0), ("v2", "M", 1), ("v3", "M", 2),
                                                                     (name, "M", 3)]
    assert doc[-1]["message"] == "zeros for x" and doc[-1]["current"] and doc[-1]["previous"] == "v3"
    assert set(doc[0]) == {"position", "name", "timestamp", "previous", "message", "current", "attributes", "change"}
    one_line_error(run_versionfs("log", str(m.path), "nope.npy"), 1, "nope.npy", "never a file")
    one_line_error(run_versionfs("log", str(m.path), "sub"), 1, "a directory")

    # status takes any path inside a mount too.
    (m.path / "staging/sub/new.txt").write_text("new\n")
    for where in (m.path, m.path / "staging/sub", m.path / "latest/x.npy"):
        assert ok("status", str(where)).stdout == "A sub/new.txt\n"

    empty = tmp_path / "empty.h5"
    ok("init", str(empty))
    one_line_error(run_versionfs("log", str(empty)), 1, "no versions")


def test_show(backdated, mount):
    m = mount(backdated)
    text = ok("show", str(backdated), "@-2").stdout
    assert "version:    v2  (@1 of 3)" in text and "time:       2024-02-01T06:00:00Z" in text and "parent:     v1" in text
    doc = json.loads(ok("show", str(m.path), "@2024-02-15", "--json").stdout)
    assert doc["name"] == "v2" and doc["position"] == 1 and doc["previous"] == "v1" and not doc["current"]
    assert json.loads(ok("show", str(backdated), "v3", "--json").stdout)["current"]
    # With a path: that file's entry in history/, by the very names history/ shows.
    doc = json.loads(ok("show", str(m.path), "@2024-02-15", "x.npy", "--json").stdout)
    entries = sorted(os.listdir(m.path / "history/x.npy"))
    assert doc["entry"] == str(m.path / "history/x.npy" / entries[1]) and doc["changed_in"] == "v2"  # its attributes
    assert open(doc["entry"], "rb").read() == (m.path / "versions/v2/x.npy").read_bytes()
    assert doc["size"] == (m.path / "versions/v2/x.npy").stat().st_size
    assert json.loads(ok("show", str(backdated), "@-1", "x.npy", "--json").stdout)["entry"] == f"history/x.npy/{entries[2]}"
    deleted = ok("show", str(m.path / "latest/y.npy"), "v3").stdout
    assert "changed in: v3  (deleted there)" in deleted
    one_line_error(run_versionfs("show", str(backdated), "v1", "y.npy"), 1, "not there yet in version v1")
    assert ok("show", str(backdated), "v1", "x.npy").stdout.splitlines()[4:] == [
        "file:       x.npy", f"entry:      history/x.npy/{entries[0]}", "changed in: v1", "size:       32128 bytes"]
    one_line_error(run_versionfs("show", str(backdated), "@2023-01-01"), 1, "no version", "matches '@2023-01-01'")
    one_line_error(run_versionfs("show", str(backdated), "@0001-01-01T00:30+01:00"), 1, "no version")


def _damage_raw_chunks(path, dataset: str) -> None:
    """Overwrite every stored chunk of a dataset: its metadata stays, no byte of data reads."""
    with h5py.File(path, "r") as f:
        raw = f[f"_version_data/{dataset}/raw_data"].id
        places = [raw.get_chunk_info(i) for i in range(raw.get_num_chunks())]
    with open(path, "r+b") as f:
        for info in places:
            f.seek(info.byte_offset)
            f.write(b"\xff" * info.size)


def test_diff_hdf5(backdated, mount, tmp_path):
    src = tmp_path / "diff.h5"
    src.write_bytes(backdated.read_bytes())
    m = mount(src)
    # What diff -rq of the mount's trees says, diff says (less the root's .version.json).
    rq = subprocess.run(["diff", "-rq", str(m.path / "versions/v1"), str(m.path / "versions/v3")], capture_output=True, text=True).stdout
    result = run_versionfs("diff", str(src), "v1", "v3")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == ["A .attrs.json", "A sub/z.npy", "M x.npy"]
    assert "x.npy differ" in rq and "Only in" in rq and rq.count("\n") == 4  # .version.json too
    stat = run_versionfs("diff", str(m.path), "@0", "@-1", "--stat").stdout
    assert re.search(r"M x\.npy\s+1 of 4 chunks, 7\.8 KiB changed$", stat, re.M), stat
    assert stat.splitlines()[-1] == " 3 changed: 2 added, 1 modified, 0 removed"
    doc = json.loads(run_versionfs("diff", str(m.path / "latest"), "v1", "v3", "--json").stdout)
    x = next(d for d in doc["differences"] if d["path"] == "x.npy")
    assert doc["old"] == "v1" and doc["new"] == "v3" and x["status"] == "M"
    assert x["chunks"] == [1, 4] and x["changed_bytes"] == CHUNK * 8 and not x["same"]
    assert x["old_size"] == x["new_size"] == (m.path / "latest/x.npy").stat().st_size
    v2 = run_versionfs("diff", str(src), "v2", "v3", "--stat").stdout
    assert re.search(r"D y\.npy$", v2, re.M) and "x.npy" in v2
    assert run_versionfs("diff", str(src), "v1", "v2", "--name-only").stdout.splitlines() == [".attrs.json", "y.npy"]
    # Only below the paths given (a path in a mount implies it).
    assert run_versionfs("diff", str(src), "v1", "v3", "sub").stdout == "A sub/z.npy\n"
    assert run_versionfs("diff", str(m.path / "latest/x.npy"), "v1", "v3").stdout == "M x.npy\n"
    same = run_versionfs("diff", str(src), "v2", "@1")
    assert same.returncode == 0 and same.stdout == ""
    one_line_error(run_versionfs("diff", str(src), "v1", "nope"), 2, "matches 'nope'")
    one_line_error(run_versionfs("diff", str(src), "v1", "v3", "nope.npy"), 2, "in neither v1 nor v3")
    one_line_error(run_versionfs("diff", str(tmp_path / "missing.h5"), "v1", "v3"), 2, "no such file")
    # From the format alone: with every stored chunk of x destroyed, diff still answers.
    run_versionfs("umount", str(m.path), check=True)
    _damage_raw_chunks(src, "x")
    stat = run_versionfs("diff", str(src), "v1", "v3", "--stat")
    assert stat.returncode == 1 and re.search(r"M x\.npy\s+1 of 4 chunks", stat.stdout), stat.stderr


def test_s3_log_show_diff_compact(moto_endpoint, mount):
    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    for key, body in [("d/same", b"same"), ("d/changed", b"one"), ("d/gone", b"bye"), ("d/again", b"identical")]:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="d/changed", Body=b"two!")
    s3.delete_object(Bucket=bucket, Key="d/gone")
    s3.put_object(Bucket=bucket, Key="d/new", Body=b"new")
    s3.put_object(Bucket=bucket, Key="d/again", Body=b"identical")  # a new VersionId, the same content
    url, endpoint = f"s3://{bucket}/d", ["--endpoint-url", moto_endpoint]
    lines = ok("log", url, *endpoint).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["@0", "@1"] and lines[-1].endswith("(current)")
    assert [line.split()[:2] for line in ok("log", url, "gone", *endpoint).stdout.splitlines()] == [["A", "@0"], ["D", "@1"]]
    one_line_error(run_versionfs("log", f"s3://{bucket}/typo", *endpoint), 1, "no versions", "is the name right?")
    m = mount(url, *endpoint)
    result = run_versionfs("diff", str(m.path), "@0", "@1")  # the endpoint comes from the mount
    assert result.returncode == 1 and result.stdout.splitlines() == ["M changed", "D gone", "A new"], result.stderr
    stat = run_versionfs("diff", str(m.path), "@0", "@1", "--stat").stdout
    assert re.search(r"M changed\s+size 3 B -> 4 B$", stat, re.M), stat
    assert run_versionfs("diff", str(m.path), "@1", "@-1").returncode == 0
    shown = json.loads(ok("show", str(m.path / "latest/changed"), "@-1", "--json").stdout)
    entries = sorted(os.listdir(m.path / "history/changed"))
    assert shown["entry"] == str(m.path / "history/changed" / entries[-1]) and shown["size"] == 4
    dry = json.loads(ok("compact", url, "--dry-run", "--json", *endpoint).stdout)
    assert [(r["key"], r["removed"]) for r in dry] == [(f"s3://{bucket}/d/again", False)]
    assert ok("compact", url, *endpoint).stdout.startswith(f"removed s3://{bucket}/d/again version ")


def test_json_of_commit_status_rollback(backdated, mount, tmp_path):
    src = tmp_path / "json.h5"
    src.write_bytes(backdated.read_bytes())
    m = mount(src)
    (m.path / "staging/new.txt").write_text("hello\n")
    status = json.loads(ok("status", str(m.path), "--json").stdout)
    assert status["changes"] == [{"code": "A", "path": "new.txt"}] and status["daemon"]["versions"] == 4
    name = json.loads(ok("commit", str(m.path), "--json").stdout)["version"]
    assert name in os.listdir(m.path / "versions")
    assert json.loads(ok("commit", str(m.path), "--json").stdout) == {"version": None}
    back = json.loads(ok("rollback", str(m.path), "@-2", "--json").stdout)
    assert back["selected"] == "v3" and back["version"] in os.listdir(m.path / "versions")
    assert not (m.path / "latest/new.txt").exists()
    # A time in the future selects the latest version (as @2099-01-01/ in the mount does), and says so.
    future = ok("rollback", str(m.path), "@2099-01-01")
    assert future.stdout == "unchanged\n" and f"selects {back['version']}, the latest version" in future.stderr
    one_line_error(run_versionfs("rollback", str(m.path), "@0001-01-01T00:30+01:00"), 1, "no version matches")
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "@0001-01-01T00:30+01:00")  # ENOENT, not EIO
    assert "answering EIO" not in m.log
