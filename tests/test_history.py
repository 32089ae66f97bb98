"""history/<path>/ through real mounts: one entry per distinct version of a file,
delete markers as empty ``…_deleted`` entries, ``@`` selectors as symlinks, and
directory histories that reach deleted files. Bytes are checked against
versioned-hdf5 and boto3; ``ls -l`` and ``diff`` run on the entries."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np
import pytest

from versionfs.errors import DamagedData

from helpers import library_array, make_versions, npy_bytes
from s3servers import make_client, make_versioned_bucket
from versionfs.backends.hdf5 import HDF5Backend
from versionfs.backends.s3 import S3Backend, version_name

UTC = dt.timezone.utc
TIMES = [dt.datetime(2024, 1, d, 12, tzinfo=UTC) for d in range(1, 6)]


def entries(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# -- HDF5 ---------------------------------------------------------------------------------------
def h1(g):
    g.create_dataset("x", data=np.arange(100), chunks=(10,))
    g.create_group("g").create_dataset("y", data=np.ones((4, 4)), chunks=(2, 2))


def h2(g):
    g["x"][55] = -1  # content: one chunk changes
    g["g/y"].attrs["unit"] = "m"  # attributes only


def h3(g):
    g.create_dataset("z", data=np.zeros(3))  # x and y untouched


def h4(g):
    del g["x"]


def h5(g):
    g.create_dataset("x", data=np.arange(100), chunks=(10,))  # back, with v1's content


@pytest.fixture(scope="module")
def hfile(tmp_path_factory):
    return make_versions(tmp_path_factory.mktemp("hist") / "h.h5", h1, h2, h3, h4, h5, timestamps=TIMES)


@pytest.fixture(scope="module")
def hmnt(hfile, module_mount):
    return module_mount(hfile)


def stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_hdf5_entries_are_the_versions_where_a_dataset_changed(hfile, hmnt):
    x = hmnt.path / "history/x.npy"
    names = [f"0000_{stamp(TIMES[0])}_v1", f"0001_{stamp(TIMES[1])}_v2",
             f"0002_{stamp(TIMES[3])}_v4_deleted", f"0003_{stamp(TIMES[4])}_v5"]
    assert entries(x) == names
    for name, version in [(names[0], "v1"), (names[1], "v2"), (names[3], "v5")]:
        assert (x / name).read_bytes() == npy_bytes(library_array(hfile, version, "x"))
    assert (x / names[2]).read_bytes() == b"" and os.stat(x / names[2]).st_size == 0
    for name, t in zip(names, [TIMES[0], TIMES[1], TIMES[3], TIMES[4]]):
        assert os.stat(x / name).st_mtime_ns == int(t.timestamp()) * 10**9
    # An attribute change is a new entry; a version that left it alone is not.
    assert entries(hmnt.path / "history/g/y.npy") == [f"0000_{stamp(TIMES[0])}_v1", f"0001_{stamp(TIMES[1])}_v2"]
    assert entries(hmnt.path / "history/z.npy") == [f"0000_{stamp(TIMES[2])}_v3"]


def test_hdf5_directory_histories_reach_deleted_files(hmnt):
    assert {"x.npy", "g", "z.npy", ".version.json"} <= set(entries(hmnt.path / "history"))
    assert entries(hmnt.path / "history/g") == [".attrs.json", "y.npy"]  # y got attributes in v2
    assert entries(hmnt.path / "history/g/.attrs.json") == [f"0000_{stamp(TIMES[1])}_v2"]
    with pytest.raises(FileNotFoundError):
        os.listdir(hmnt.path / "history/never.npy")


def test_hdf5_selectors_are_symlinks_to_the_entry(hmnt):
    x = hmnt.path / "history/x.npy"
    names = entries(x)
    assert os.readlink(x / "@-1") == names[-1]
    assert os.readlink(x / "@0") == names[0]
    assert os.readlink(x / "@-2") == names[2]  # the deletion
    assert os.readlink(x / "@id:v2") == names[1]
    assert os.readlink(x / "@2024-01-02T13:00") == names[1]  # as of: v2 (12:00) is the latest then
    assert os.readlink(x / "@2024-01-04") == names[1]  # before the deletion at 12:00 that day
    assert (x / "@0").read_bytes() == (x / names[0]).read_bytes()
    listing = subprocess.run(["ls", "-l", str(x / "@-1")], capture_output=True, text=True, check=True).stdout
    assert listing.startswith("l") and f"-> {names[-1]}" in listing
    for bad in ["@2023-12-31", "@7", "@-9", "@id:v3", "@id:", "@yesterday", "@1.5", "@"]:
        with pytest.raises(FileNotFoundError):
            os.lstat(x / bad)
    assert "@-1" not in os.listdir(x)  # lookup-only


def test_hdf5_entries_work_with_diff_and_are_read_only(hmnt):
    x = hmnt.path / "history/x.npy"
    names = entries(x)
    assert subprocess.run(["diff", "-q", str(x / names[0]), str(x / names[3])]).returncode == 0  # same content again
    assert subprocess.run(["diff", "-q", str(x / names[0]), str(x / names[1])], capture_output=True).returncode == 1
    listing = subprocess.run(["ls", "-l", str(x)], capture_output=True, text=True, check=True).stdout
    assert listing.count("-r--r--r--") == 4
    with pytest.raises(OSError) as e:
        open(x / names[0], "r+b")
    assert e.value.errno == errno.EROFS


def test_hdf5_history_compares_the_chunk_mapping_not_the_data(tmp_path):
    def v1(g):
        g.create_dataset("x", data=np.arange(4000.0), chunks=(1000,), compression="gzip")

    def v2(g):
        g["x"][1500] = -1

    def v3(g):
        g["x"].attrs["unit"] = "m"

    path = make_versions(tmp_path / "mapped.h5", v1, v2, v3)
    # Every stored chunk garbled: any read of data fails, metadata is intact.
    with h5py.File(path, "r") as f:
        raw = f["_version_data/x/raw_data"]
        chunks = [raw.id.get_chunk_info(i) for i in range(raw.id.get_num_chunks())]
    with open(path, "r+b") as f:
        for info in chunks:
            f.seek(info.byte_offset)
            f.write(b"\xff" * info.size)
    backend = HDF5Backend(str(path))
    try:
        assert [r.version_id for r in backend.history("x.npy").revisions] == ["v1", "v2", "v3"]
        with pytest.raises((OSError, DamagedData)):  # h5py's error, or the raw chunk reader's
            backend.read(backend.tree("v1").children["x.npy"].ref, 0, 1 << 20)  # the data is really gone
    finally:
        backend.close()


def test_odd_names_in_history(tmp_path, mount):
    def odd(g):
        g.create_dataset("@-1", data=np.arange(3))  # a name that looks like a selector
        g.create_dataset("plain", data=np.arange(3))

    def odd2(g):
        g["@-1"][0] = 7

    def odd3(g):
        del g["plain"]

    long_name = "n" * 240  # its entry name would pass 255 bytes: a hash stands in for it
    path = make_versions(tmp_path / "odd.h5", odd, odd2, odd3, names=["a b%", long_name, "v3"], timestamps=TIMES[:3])
    m = mount(path)
    at = m.path / "history/@-1.npy"
    names = entries(at)
    assert [n.split("_", 2)[2] for n in names] == ["a%20b%25", f"~{hashlib.sha1(long_name.encode()).hexdigest()[:16]}"]
    assert np.load(at / names[1]).tolist() == [7, 1, 2]
    assert os.readlink(at / "@-1") == names[1]
    assert os.readlink(at / "@id:a b%") == names[0] == os.readlink(at / "@id:a%20b%25")  # the id raw or as shown
    assert os.readlink(at / f"@id:{long_name}") == names[1]


def test_history_of_a_text_dataset(hfile, tmp_path, mount):
    def t1(g):
        g.create_dataset("labels", data=np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype())

    def t2(g):
        g["labels"][1] = "c"

    m = mount(make_versions(tmp_path / "t.h5", t1, t2))
    names = entries(m.path / "history/labels.txt")
    assert [(m.path / "history/labels.txt" / n).read_text() for n in names] == ["a\nb\n", "a\nc\n"]
    assert [os.stat(m.path / "history/labels.txt" / n).st_size for n in names] == [4, 4]


def test_history_follows_new_commits(tmp_path, mount):
    path = make_versions(tmp_path / "c.h5", h1, timestamps=TIMES[:1])
    m = mount(path)
    assert len(entries(m.path / "history/x.npy")) == 1
    np.save(m.path / "staging/x.npy", np.arange(100) * 2)
    from conftest import run_versionfs

    assert run_versionfs("commit", str(m.path), "-n", "next").returncode == 0
    names = entries(m.path / "history/x.npy")
    assert len(names) == 2 and names[1].endswith("_next")
    assert np.load(m.path / "history/x.npy" / names[1]).tolist() == (np.arange(100) * 2).tolist()


# -- S3 -----------------------------------------------------------------------------------------
@pytest.fixture(params=["moto", "ministack"])
def endpoint(request):
    return request.getfixturevalue(f"{request.param}_endpoint")


def s3_history_bucket(s3) -> str:
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="data/a.txt", Body=b"one")
    s3.put_object(Bucket=bucket, Key="data/sub/b.bin", Body=b"bbb")
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="data/a.txt", Body=b"two\n")
    time.sleep(1.05)
    s3.delete_object(Bucket=bucket, Key="data/sub/b.bin")  # the whole directory goes
    s3.put_object(Bucket=bucket, Key="elsewhere/c", Body=b"not under the prefix")
    return bucket


def listed_versions(s3, bucket: str, key: str) -> list[dict]:
    """A key's versions and delete markers, oldest first (boto3, directly)."""
    page = s3.list_object_versions(Bucket=bucket, Prefix=key)
    found = [dict(v, deleted=False) for v in page.get("Versions", []) if v["Key"] == key]
    found += [dict(v, deleted=True) for v in page.get("DeleteMarkers", []) if v["Key"] == key]
    return sorted(found, key=lambda v: v["LastModified"])


def expected_names(versions: list[dict]) -> list[str]:
    digits = 0 if all(v["LastModified"].microsecond == 0 for v in versions) else 3
    out = []
    for i, v in enumerate(versions):
        name = f"{i:04d}_{version_name(v['LastModified'], digits)}_{quote(v['VersionId'], safe='-._~')}"
        out.append(name + ("_deleted" if v["deleted"] else ""))
    return out


def test_s3_entries_are_every_object_version(endpoint, mount):
    s3 = make_client(endpoint)
    bucket = s3_history_bucket(s3)
    m = mount(f"s3://{bucket}/data", "--endpoint-url", endpoint)
    history = m.path / "history"
    assert entries(history) == ["a.txt", "sub"]  # sub/ is gone from latest/, not from history/
    assert not (m.path / "latest/sub").exists()

    a = listed_versions(s3, bucket, "data/a.txt")
    names = expected_names(a)
    assert entries(history / "a.txt") == names
    for name, v in zip(names, a):
        direct = s3.get_object(Bucket=bucket, Key="data/a.txt", VersionId=v["VersionId"])["Body"].read()
        assert (history / "a.txt" / name).read_bytes() == direct
        assert os.stat(history / "a.txt" / name).st_mtime == v["LastModified"].timestamp()

    b = listed_versions(s3, bucket, "data/sub/b.bin")
    b_names = expected_names(b)
    assert entries(history / "sub") == ["b.bin"]
    assert entries(history / "sub/b.bin") == b_names and b_names[-1].endswith("_deleted")
    assert (history / "sub/b.bin" / b_names[0]).read_bytes() == b"bbb"
    assert (history / "sub/b.bin" / b_names[1]).read_bytes() == b""


def test_s3_selectors_and_tools(endpoint, mount):
    s3 = make_client(endpoint)
    bucket = s3_history_bucket(s3)
    m = mount(f"s3://{bucket}/data", "--endpoint-url", endpoint)
    a_dir = m.path / "history/a.txt"
    a = listed_versions(s3, bucket, "data/a.txt")
    names = entries(a_dir)
    assert os.readlink(a_dir / "@-1") == names[1] and os.readlink(a_dir / "@0") == names[0]
    assert os.readlink(a_dir / f"@id:{a[0]['VersionId']}") == names[0]
    between = a[0]["LastModified"] + dt.timedelta(milliseconds=500)
    assert os.readlink(a_dir / f"@{between.isoformat()}") == names[0]
    b_dir = m.path / "history/sub/b.bin"
    deleted = listed_versions(s3, bucket, "data/sub/b.bin")[-1]
    assert os.readlink(b_dir / "@-1").endswith("_deleted")
    assert os.readlink(b_dir / f"@id:{deleted['VersionId']}") == os.readlink(b_dir / "@-1")
    for bad in ["@2000-01-01", "@5", "@id:nope", "@latest"]:
        assert not os.path.lexists(a_dir / bad)
    diff = subprocess.run(["diff", str(a_dir / names[0]), str(a_dir / names[1])], capture_output=True, text=True)
    assert diff.returncode == 1 and "< one" in diff.stdout and "> two" in diff.stdout
    ls = subprocess.run(["ls", "-lR", str(m.path / "history")], capture_output=True, text=True)
    assert ls.returncode == 0 and "_deleted" in ls.stdout


def test_s3_history_lists_one_directory_at_a_time_and_caches_it(moto, tmp_path):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    for d in range(5):
        for k in range(20):
            s3.put_object(Bucket=bucket, Key=f"d{d}/k{k}", Body=b"x")
    s3.put_object(Bucket=bucket, Key="d0/k0", Body=b"y")
    backend = S3Backend(f"s3://{bucket}", endpoint_url=moto)
    calls: list[dict] = []
    backend.client.meta.events.register("before-parameter-build.s3.ListObjectVersions",
                                        lambda params, **_: calls.append(dict(params)))
    try:
        backend.versions()
        calls.clear()
        top = backend.history("")
        assert top.children == tuple(f"d{d}" for d in range(5)) and not top.revisions
        assert [(c["Prefix"], c.get("Delimiter")) for c in calls] == [("", "/")]
        k0 = backend.history("d0/k0")
        assert len(k0.revisions) == 2
        assert [(c["Prefix"], c.get("Delimiter")) for c in calls[1:]] == [("d0/", "/")]  # a key needs its directory only
        calls.clear()
        backend.history("d0/k0")
        backend.history("")
        assert calls == []  # cached
    finally:
        backend.close()


@pytest.fixture
def moto(moto_endpoint):
    return moto_endpoint


def test_restoring_one_file_from_its_history_with_cp(tmp_path, mount):
    from conftest import run_versionfs

    path = make_versions(tmp_path / "r.h5", h1, h2, timestamps=TIMES[:2])
    m = mount(path)
    subprocess.run(["cp", str(m.path / "history/x.npy/@0"), str(m.path / "staging/x.npy")], check=True)
    assert run_versionfs("status", str(m.path)).stdout.split() == ["M", "x.npy"]
    assert run_versionfs("commit", str(m.path), "-n", "restored").stdout.strip() == "restored"
    assert (m.path / "latest/x.npy").read_bytes() == npy_bytes(library_array(path, "v1", "x"))
    assert entries(m.path / "history/x.npy")[-1].endswith("_restored")


def test_s3_history_pages_through_directories(moto):
    # moto only: ministack loses keys when it pages a listing with a Delimiter
    # (tests/test_s3servers.py::test_list_versions_pagination_with_delimiter).
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    for k in range(7):
        s3.put_object(Bucket=bucket, Key=f"dir/k{k}", Body=b"1")
        s3.put_object(Bucket=bucket, Key=f"dir/sub{k}/x", Body=b"1")
    for body in [b"again", b"and again"]:  # a second apart: moto's order within one second is wrong
        time.sleep(1.05)
        s3.put_object(Bucket=bucket, Key="dir/k3", Body=body)
    time.sleep(1.05)
    s3.delete_object(Bucket=bucket, Key="dir/k3")
    paged, whole = (S3Backend(f"s3://{bucket}", endpoint_url=moto) for _ in range(2))
    paged.list_page = 2  # pages end on keys, on versions of one key, and on common prefixes
    try:
        for backend in (paged, whole):
            backend.versions()
        for path in ["", "dir", "dir/k3", "dir/sub4", "dir/sub4/x"]:
            a, b = paged.history(path), whole.history(path)
            assert a.children == b.children and [r.version_id for r in a.revisions] == [r.version_id for r in b.revisions], path
        top = whole.history("dir")
        assert top.children == tuple(sorted([f"k{k}" for k in range(7)] + [f"sub{k}" for k in range(7)]))
        assert len(whole.history("dir/k3").revisions) == 4 and whole.history("dir/k3").revisions[-1].file is None
    finally:
        paged.close()
        whole.close()


def test_s3_history_shows_another_writers_change(moto, mount):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"one")
    m = mount(f"s3://{bucket}", "--endpoint-url", moto)
    assert len(entries(m.path / "history/a.txt")) == 1
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"two")
    deadline = time.monotonic() + 15
    while len(entries(m.path / "history/a.txt")) < 2:  # the next poll sees it
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert (m.path / "history/a.txt/@-1").read_bytes() == b"two"
