"""The store misbehaves (tests/faultproxy.py between the daemon and moto): reads
of cached content never wait for it, other reads fail with EIO within the bound
(--store-timeout), the daemon keeps answering, and all is normal again within
seconds of the store's return. Cut bodies, resets and slow answers are retried."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time

import pytest

from conftest import run_versionfs
from faultproxy import FaultProxy
from s3servers import make_client, make_versioned_bucket

MIB = 1 << 20
BOUND = 6  # --store-timeout of these mounts, seconds


@pytest.fixture
def proxy(moto_endpoint):
    p = FaultProxy(moto_endpoint)
    yield p
    p.close()


def drop_page_cache() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)


def wait_cached(cache, nbytes: int) -> None:
    deadline = time.monotonic() + 20  # blocks are written to the cache beside the reads
    while sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and p.suffix != ".tmp") < nbytes:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def timed_read(path):
    t0 = time.monotonic()
    try:
        data, error = path.read_bytes(), None
    except OSError as e:
        data, error = None, e.errno
    return data, error, time.monotonic() - t0


def test_an_outage_never_stalls_cached_reads_or_the_daemon(proxy, mount, tmp_path):
    s3 = make_client(proxy.url)
    bucket = make_versioned_bucket(s3)
    cached, uncached = random.Random(1).randbytes(9 * MIB), random.Random(2).randbytes(3 * MIB)
    s3.put_object(Bucket=bucket, Key="cached.bin", Body=cached)
    s3.put_object(Bucket=bucket, Key="later.bin", Body=uncached)
    cache = tmp_path / "cache"
    m = mount(f"s3://{bucket}", "--endpoint-url", proxy.url, "--cache-dir", str(cache), "--store-timeout", str(BOUND))
    assert (m.path / "latest/cached.bin").read_bytes() == cached
    wait_cached(cache, len(cached))
    drop_page_cache()

    proxy.mode = "blackhole"  # the store stops answering
    results = {}
    stuck = threading.Thread(target=lambda: results.update(later=timed_read(m.path / "latest/later.bin")))
    stuck.start()
    time.sleep(0.5)  # that read is waiting on the store now
    data, error, took = timed_read(m.path / "latest/cached.bin")
    assert error is None and data == cached and took < 2, took  # never waits for the store
    t0 = time.monotonic()
    status = run_versionfs("status", str(m.path), timeout=30)
    assert status.returncode == 0 and time.monotonic() - t0 < 4, status.stderr  # the daemon answers at once
    assert sorted(os.listdir(m.path / "latest")) == ["cached.bin", "later.bin"]
    stuck.join(60)
    data, error, took = results["later"]
    assert error == errno.EIO and BOUND - 1 < took < BOUND + 6, (error, took)  # EIO within the bound

    proxy.mode = "pass"  # the store is back
    data, error, took = timed_read(m.path / "latest/later.bin")
    assert error is None and data == uncached and took < 5, (error, took)  # normal within seconds
    log = m.log
    assert log.count("no answer from the store") == 1, log  # one line, however many requests failed
    assert "answering EIO" not in log and "Traceback" not in log


def test_cut_bodies_resets_and_slow_answers_are_retried(proxy, mount):
    s3 = make_client(proxy.url)
    bucket = make_versioned_bucket(s3)
    body = random.Random(3).randbytes(20 * MIB)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=body)
    m = mount(f"s3://{bucket}", "--endpoint-url", proxy.url, "--store-timeout", "20")
    proxy.cut(3)  # three answers end in the middle of their body
    assert (m.path / "latest/big.bin").read_bytes() == body
    assert proxy.cuts_done == 3
    drop_page_cache()
    proxy.mode, proxy.delay = "delay", 0.2  # slow, but answering
    with open(m.path / "latest/big.bin", "rb") as f:
        f.seek(13 * MIB)
        assert f.read(MIB) == body[13 * MIB : 14 * MIB]
    assert "no answer from the store" not in m.log and "answering EIO" not in m.log


def test_a_mount_against_an_endpoint_that_drops_packets_fails_in_seconds(proxy, tmp_path):
    (tmp_path / "m").mkdir()
    proxy.mode = "blackhole"
    t0 = time.monotonic()
    result = run_versionfs("mount", "s3://bucket", str(tmp_path / "m"), "--endpoint-url", proxy.url, timeout=60)
    took = time.monotonic() - t0
    # ~7 s on a quiet machine (bench: the outage rows); the bound here leaves room for a loaded one.
    assert result.returncode == 1 and took <= 20, (took, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "timeout" in result.stderr.lower(), result.stderr


def test_user_metadata_is_asked_once_per_object_version(proxy, mount):
    s3 = make_client(proxy.url)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="m.txt", Body=b"m", Metadata={"owner": "ops"})
    m = mount(f"s3://{bucket}", "--endpoint-url", proxy.url)
    path = m.path / "latest/m.txt"
    heads = lambda: sum(r.startswith("HEAD ") and "m.txt" in r for r in proxy.requests)  # noqa: E731
    before = heads()
    for _ in range(5):
        assert os.getxattr(path, "user.owner") == b"ops"
        assert os.listxattr(path) == ["user.owner"]
    assert heads() - before == 1
    proxy.mode = "blackhole"  # known already: answered without the store
    t0 = time.monotonic()
    assert os.getxattr(path, "user.owner") == b"ops" and time.monotonic() - t0 < 1
