"""S3 sources, read side: versions, views at an instant, keys that are not paths,
and reads, through real mounts of buckets on S3 servers on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import os
import random
import time

import pytest

from conftest import run_versionfs
from s3servers import make_bucket, make_client, make_versioned_bucket


@pytest.fixture(params=["moto", "ministack"])
def endpoint(request):
    return request.getfixturevalue(f"{request.param}_endpoint")


@pytest.fixture
def moto(moto_endpoint):
    return moto_endpoint


def s3_mount(mount, url, endpoint, *extra):
    return mount(url, "--endpoint-url", endpoint, *extra)


def history_bucket(s3) -> tuple[str, list[str]]:
    """Three instants a second apart: a put, an overwrite and more, a delete."""
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="data/a.txt", Body=b"one")
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="data/a.txt", Body=b"two")
    s3.put_object(Bucket=bucket, Key="data/sub/b.bin", Body=b"bbb")
    s3.put_object(Bucket=bucket, Key="data/a.txt.bak", Body=b"bak")
    s3.put_object(Bucket=bucket, Key="other/x", Body=b"not under the prefix")
    s3.put_object(Bucket=bucket, Key="data2/y", Body=b"a sibling prefix")
    time.sleep(1.05)
    s3.delete_object(Bucket=bucket, Key="data/sub/b.bin")
    return bucket


def tree(path) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def test_versions_and_views(endpoint, mount):
    s3 = make_client(endpoint)
    bucket = history_bucket(s3)
    m = s3_mount(mount, f"s3://{bucket}/data", endpoint)
    versions = os.listdir(m.path / "versions")
    # One version per instant at the store's precision: whole seconds put the three
    # writes of the middle step in one version, milliseconds in three.
    assert 3 <= len(versions) <= 5 and versions == sorted(versions)  # (writes may straddle a second)
    assert all(v.endswith("Z") and "T" in v for v in versions)
    first, second, third = versions[0], versions[-2], versions[-1]
    assert tree(m.path / "versions" / first) == {"a.txt": b"one"}
    assert tree(m.path / "versions" / second) == {"a.txt": b"two", "a.txt.bak": b"bak", "sub/b.bin": b"bbb"}
    assert tree(m.path / "versions" / third) == {"a.txt": b"two", "a.txt.bak": b"bak"}  # delete marker hides
    assert tree(m.path / "latest") == tree(m.path / "versions" / third)
    assert tree(m.path / "@-2") == tree(m.path / "versions" / second)
    assert tree(m.path / "@1")["a.txt"] == b"two"
    assert tree(m.path / f"@{second}") == tree(m.path / "versions" / second)
    assert not (m.path / "@2000-01-01").exists()
    st = os.stat(m.path / "versions" / second / "sub/b.bin")
    listed = s3.list_object_versions(Bucket=bucket, Prefix="data/sub/b.bin")["Versions"][0]
    assert st.st_mtime == listed["LastModified"].timestamp()


def test_reads_are_byte_exact_and_pinned_to_a_version(endpoint, mount):
    s3 = make_client(endpoint)
    bucket = make_versioned_bucket(s3)
    body = random.Random(1).randbytes(20 * 1024 * 1024 + 123)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=body)
    m = s3_mount(mount, f"s3://{bucket}", endpoint)
    path = m.path / "latest/big.bin"
    assert path.read_bytes() == body
    with open(path, "rb") as f:
        time.sleep(1.05)
        s3.put_object(Bucket=bucket, Key="big.bin", Body=b"replaced")  # another writer
        rng = random.Random(2)
        for _ in range(50):
            off, n = rng.randrange(len(body)), rng.randrange(1, 3_000_000)
            f.seek(off)
            assert f.read(n) == body[off : off + n]  # the open file keeps its version
    version_id = s3.list_object_versions(Bucket=bucket, Prefix="big.bin")["Versions"][-1]["VersionId"]
    direct = s3.get_object(Bucket=bucket, Key="big.bin", VersionId=version_id)["Body"].read()
    assert direct == body


def test_keys_that_are_not_paths_never_escape(moto, mount):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    for key in ["ok.txt", "dir/", "a//b", "./x", "../escape", "c/./d", "c/../../e", "n" * 256, "f", "f/g"]:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode()[:10])
    m = s3_mount(mount, f"s3://{bucket}", moto)
    shown = tree(m.path / "latest")
    assert shown.pop("ok.txt") == b"ok.txt"
    assert shown.pop("f/g") == b"f/g"
    assert [k for k in shown if k.startswith("f~")] and len(shown) == 1  # file "f" beside directory "f/"
    log = m.log
    for bad in ["a//b", "./x", "../escape", "c/./d", "c/../../e", "dir/"]:
        assert log.count(repr(bad)) == 1, bad  # logged once
    assert not (m.path.parent / "escape").exists()


def test_objects_from_before_versioning_are_the_null_version(endpoint, mount):
    s3 = make_client(endpoint)
    bucket = make_bucket(s3)
    s3.put_object(Bucket=bucket, Key="old.txt", Body=b"before versioning")
    result = run_versionfs("mount", f"s3://{bucket}", "/nonexistent", "--endpoint-url", endpoint)
    assert result.returncode == 1 and "versionfs init" in result.stderr
    assert run_versionfs("init", f"s3://{bucket}", "--endpoint-url", endpoint).returncode == 0
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="new.txt", Body=b"after")
    m = s3_mount(mount, f"s3://{bucket}", endpoint)
    assert tree(m.path / "latest") == {"old.txt": b"before versioning", "new.txt": b"after"}
    assert len(os.listdir(m.path / "versions")) == 2


def test_suspended_versioning_is_refused(endpoint, tmp_path):
    s3 = make_client(endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    (tmp_path / "m").mkdir()
    result = run_versionfs("mount", f"s3://{bucket}", str(tmp_path / "m"), "--endpoint-url", endpoint)
    assert result.returncode == 1 and "Suspended" in result.stderr and "versionfs init" in result.stderr


def test_many_versions_of_one_key_span_listing_pages(moto, mount):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    for i in range(1105):  # more than one page (1000) of one key's versions
        s3.put_object(Bucket=bucket, Key="k", Body=str(i).encode())
    s3.put_object(Bucket=bucket, Key="z", Body=b"last")
    m = s3_mount(mount, f"s3://{bucket}", moto)
    assert (m.path / "latest/k").read_bytes() == b"1104"
    assert (m.path / "latest/z").read_bytes() == b"last"


def test_errors_never_show_credentials(moto, tmp_path):
    (tmp_path / "m").mkdir()
    env_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    result = run_versionfs("mount", "s3://no-such-bucket-here", str(tmp_path / "m"), "--endpoint-url", moto)
    assert result.returncode == 1 and "no such bucket" in result.stderr
    assert env_secret not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_versionfs("log", "s3://no-such-bucket-here", "--endpoint-url", moto)
    assert result.returncode == 1 and env_secret not in result.stderr


def test_log_of_a_prefix(moto):
    s3 = make_client(moto)
    bucket = history_bucket(s3)
    doc = json.loads(run_versionfs("log", f"s3://{bucket}/data", "--endpoint-url", moto, "--json").stdout)
    assert len(doc) in (3, 4) and doc[-1]["current"]  # moto: whole seconds (a step may straddle one)


def test_versions_read_once_are_served_from_the_disk_cache(mount, tmp_path):
    """With the server gone, cached object versions still read (and the cache
    keeps to its bound)."""
    from s3servers import S3Server

    with S3Server("moto") as server:
        s3 = make_client(server.endpoint_url)
        bucket = make_versioned_bucket(s3)
        bodies = {f"f{i}.bin": random.Random(i).randbytes(9 * 1024 * 1024) for i in range(3)}
        for key, body in bodies.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        cache = tmp_path / "cache"
        m = mount(f"s3://{bucket}", "--endpoint-url", server.endpoint_url, "--cache-dir", str(cache), "--cache-size", "64M")
        for key, body in bodies.items():
            assert (m.path / "latest" / key).read_bytes() == body
        deadline = time.monotonic() + 10  # blocks are written to the cache beside the reads
        while sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and p.suffix != ".tmp") != 27 * 1024 * 1024:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)  # not the page cache
    for key, body in bodies.items():
        assert (m.path / "latest" / key).read_bytes() == body


def test_the_disk_cache_keeps_to_its_bound(tmp_path):
    from versionfs.cache import DiskCache

    cache = DiskCache(str(tmp_path / "c"), max_bytes=3_000)
    for i in range(10):
        cache.put("obj", i, bytes([i]) * 1_000)
    assert cache.get("obj", 9) == bytes([9]) * 1_000 and cache.get("obj", 0) is None
    assert sum(p.stat().st_size for p in (tmp_path / "c").iterdir()) <= 3_000
    again = DiskCache(str(tmp_path / "c"), max_bytes=3_000)  # a new mount finds them
    assert again.get("obj", 9) == bytes([9]) * 1_000


def test_user_metadata_as_xattrs(moto, mount):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="m.txt", Body=b"m", Metadata={"owner": "ops", "run": "42"})
    m = mount(f"s3://{bucket}", "--endpoint-url", moto)
    path = m.path / "latest/m.txt"
    assert os.getxattr(path, "user.owner") == b"ops" and os.getxattr(path, "user.run") == b"42"
    assert sorted(os.listxattr(path)) == ["user.owner", "user.run"]


def test_log_of_a_mount_point_uses_its_endpoint(moto, mount):
    s3 = make_client(moto)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    m = mount(f"s3://{bucket}", "--endpoint-url", moto)
    result = run_versionfs("log", str(m.path))
    assert result.returncode == 0 and result.stdout.count("\n") == 1, result.stderr


def test_an_unreachable_endpoint_is_said_at_once(tmp_path):
    (tmp_path / "m").mkdir()
    result = run_versionfs("mount", "s3://bucket", str(tmp_path / "m"), "--endpoint-url", "http://127.0.0.1:9", timeout=60)
    assert result.returncode == 1 and "cannot reach http://127.0.0.1:9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
