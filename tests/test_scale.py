"""Costs that grow with what is asked, through real mounts: listing versions/
builds no tree, listing or image (counted by the daemon's stats request), a
view loads one directory at a time, history/ of a few hundred versions keeps a
bounded amount of memory, and S3 views list one directory each."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import run_versionfs
from helpers import library_array, npy_bytes
from s3servers import make_client, make_versioned_bucket
from versionfs.control import request

UTC = dt.timezone.utc
VERSIONS = 200
ELEMENTS, CHUNK = 250_000, 1000  # 250 chunks: what a virtual dataset costs to open shows


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """VERSIONS versions of one dataset, a few elements changed in each (a few seconds)."""
    import h5py
    from versioned_hdf5 import VersionedHDF5File

    path = tmp_path_factory.mktemp("many") / "many.h5"
    rng = np.random.default_rng(0)
    start = dt.datetime(2020, 1, 1, tzinfo=UTC)
    with h5py.File(path, "w") as f:
        vf = VersionedHDF5File(f)
        with vf.stage_version("v000", timestamp=start) as g:
            g.create_dataset("x", data=rng.standard_normal(ELEMENTS), chunks=(CHUNK,))
            g.create_group("sub").create_dataset("y", data=np.arange(10))
        for i in range(1, VERSIONS):
            with vf.stage_version(f"v{i:03d}", timestamp=start + dt.timedelta(days=i)) as g:
                g["x"][int(rng.integers(0, ELEMENTS))] = i
    return path


def stats(mnt) -> dict:
    return request(str(mnt), "stats")


def built(mnt) -> dict:
    return stats(mnt)["built"]


def ls(*args) -> list[str]:
    return subprocess.run(["ls", *map(str, args)], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("options", [(), ("-o", "ro")])
def test_listing_versions_builds_nothing(many, mount, options):
    m = mount(many, *options)
    before = built(m.path)
    assert len(ls("-l", m.path / "versions")) == 1 + 2 * (VERSIONS + 1)  # total, then each tree and its .h5
    ls(m.path / "versions")
    ls("-la", m.path)
    after = built(m.path)
    for what in ("trees", "listings", "images", "histories", "objects opened"):
        # staging/ (not on -o ro) starts from latest's whole tree: the only one built
        allowed = 1 if what == "trees" and not options else 0
        assert after.get(what, 0) - before.get(what, 0) <= allowed, what
    # One directory, one listing: latest/ and then sub/, never the whole version.
    assert ls(m.path / "latest") == ["sub", "x.npy"]
    assert ls(m.path / "latest/sub") == ["y.npy"]
    now = built(m.path)
    assert now.get("listings", 0) - after.get("listings", 0) <= 2 and now.get("trees", 0) == after.get("trees", 0)
    # The image's size is built when asked for alone, and then it is exact.
    time.sleep(2.1)  # past the listing's grace for placeholder sizes
    size = os.stat(m.path / "versions/v100.h5").st_size
    assert size > ELEMENTS * 8 and built(m.path)["images"] == before.get("images", 0) + 1
    assert not m.log.count("answering EIO")


def test_a_read_right_after_a_listing_gets_every_byte(many, mount):
    m = mount(many, "-o", "ro")
    listing = ls("-l", m.path / "versions")
    assert any(line.endswith(" v150.h5") and " 0 " in line for line in listing)  # a placeholder size, not built
    data = (m.path / "versions/v150.h5").read_bytes()  # opened at once: the exact size is given
    assert len(data) == os.stat(m.path / "versions/v150.h5").st_size > ELEMENTS * 8
    assert (m.path / "versions/v150/.version.json").read_bytes().startswith(b"{")


def test_history_of_hundreds_of_versions_stays_small(many, mount):
    m = mount(many, "-o", "ro")
    rss = stats(m.path)["rss_bytes"]
    entries = ls("-l", m.path / "history/x.npy")
    assert len(entries) == 1 + VERSIONS  # every version changed x
    after = stats(m.path)
    # No version's dataset opened (an open virtual dataset holds KiBs per chunk);
    # what is kept is a bounded number of small entries.
    assert after["built"].get("objects opened", 0) == 0 and after["built"].get("trees", 0) == 0
    assert after["kept"]["history entries"] <= VERSIONS + 10
    assert after["rss_bytes"] - rss < 40 << 20, (after["rss_bytes"] - rss) / VERSIONS
    assert after["built"]["histories"] == 1  # x.npy's alone: not the top's (a listing per version)
    names = sorted(os.listdir(m.path / "history/x.npy"))
    assert (m.path / "history/x.npy" / names[150]).read_bytes() == npy_bytes(library_array(many, "v150", "x"))
    ls("-l", m.path / "history")  # the top's names: one more history, not one per name
    assert built(m.path)["histories"] == 2
    assert ls(m.path / "history/sub/y.npy") == [sorted(os.listdir(m.path / "history/sub/y.npy"))[0]]  # changed once


def test_commit_after_browsing_history_reopens_nothing_it_kept(many, tmp_path, mount):
    import shutil

    source = tmp_path / "copy.h5"
    shutil.copy(many, source)
    m = mount(source)
    ls("-l", m.path / "history/x.npy")
    opened = built(m.path).get("objects opened", 0)
    array = np.load(m.path / "latest/x.npy")
    array[5] = -1
    np.save(m.path / "staging/x.npy", array)
    assert run_versionfs("commit", str(m.path), "-n", "next").returncode == 0
    assert len(ls(m.path / "history/x.npy")) == VERSIONS + 1
    # The commit compared and wrote through its own handles: the few the reader kept were closed.
    assert built(m.path).get("objects opened", 0) - opened < 10


# -- S3 ---------------------------------------------------------------------------------------
@pytest.fixture
def moto(moto_endpoint):
    return moto_endpoint


def test_s3_views_list_one_directory_at_a_time(moto, mount):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    for d in range(4):
        for k in range(5):
            s3.put_object(Bucket=bucket, Key=f"d{d}/k{k}", Body=f"{d}{k}".encode())
    time.sleep(1.05)
    before_changes = dt.datetime.now(UTC).isoformat()
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="d1/k0", Body=b"new")
    s3.delete_object(Bucket=bucket, Key="d3/k0")
    for k in range(1, 5):
        s3.delete_object(Bucket=bucket, Key=f"d2/k{k}")
    s3.delete_object(Bucket=bucket, Key="d2/k0")  # d2 is empty in the latest version
    m = mount(f"s3://{bucket}", "--endpoint-url", moto, "-o", "ro")
    before = built(m.path)
    versions = ls(m.path / "versions")
    assert len(versions) >= 2
    ls("-l", m.path / "versions")
    after = built(m.path)
    assert after.get("directory listings", 0) == before.get("directory listings", 0) == 0
    assert after.get("trees", 0) == 0
    assert ls(m.path / "latest/d1") == [f"k{k}" for k in range(5)]
    assert (m.path / "latest/d1/k0").read_bytes() == b"new"
    assert built(m.path)["directory listings"] == 2  # the top (to find d1), then d1
    assert ls(m.path / "latest") == ["d0", "d1", "d3"]  # d2 holds nothing shown then
    assert ls(m.path / f"@{before_changes}") == ["d0", "d1", "d2", "d3"]
    assert (m.path / f"@{before_changes}/d1/k0").read_bytes() == b"10"
    assert built(m.path)["directory listings"] == 2  # shared by every version


def test_poll_sets_how_often_other_writers_are_looked_for(moto, mount):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"one")
    never = mount(f"s3://{bucket}", "--endpoint-url", moto, "-o", "ro", "--poll", "0")
    often = mount(f"s3://{bucket}", "--endpoint-url", moto, "-o", "ro", "--poll", "0.5")
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"two")
    deadline = time.monotonic() + 10
    while (often.path / "latest/a.txt").read_bytes() != b"two":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    lists = built(often.path)["version lists"]
    time.sleep(2)
    assert built(often.path)["version lists"] >= lists + 2  # about one listing of the prefix per 0.5 s
    assert (never.path / "latest/a.txt").read_bytes() == b"one"
    assert built(never.path)["version lists"] == 1  # the mount's own


def test_poll_is_a_mount_option_too():
    from versionfs import options
    from versionfs.mount_helper import mount_argv

    argv = mount_argv(["s3://b/p", "/mnt", "-o", "ro,poll=60,_netdev"])[0]
    assert argv[:3] == ["mount", "s3://b/p", "/mnt"] and options.split_words(argv[argv.index("-o") + 1:]) == ["ro", "poll=60"]
    assert options.from_arguments("s3://b/p", "/mnt", ["ro,poll=60"], {}).poll == 60
    assert options.from_arguments("s3://b/p", "/mnt", ["poll=0"], {}).poll == 0
    assert run_versionfs("mount", "s3://b", "/nonexistent", "--poll", "-1").returncode == 2
