"""An S3 outage (packets dropped: tests/faultproxy.py between the daemon and the
server), then the store's return; and a mount against an endpoint that drops
packets. Times, each against what it must stay within."""


import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from harness import Context, MiB, Result, Row, drop_caches, s3_mounted, s3_server, versionfs

STORE_TIMEOUT = 10.0  # --store-timeout of the mount measured


def _read(path: Path) -> tuple[bytes | None, float]:
    t0 = time.perf_counter()
    try:
        data = path.read_bytes()
    except OSError:
        data = None
    return data, time.perf_counter() - t0


def run(ctx: Context) -> Result:
    rng = np.random.default_rng(4)
    cached, later = rng.bytes(32 * MiB), rng.bytes(8 * MiB)
    t: dict[str, list[float]] = {k: [] for k in ("cached", "status", "eio", "back", "mount")}
    with s3_server() as srv:
        from faultproxy import FaultProxy  # tests/ is on the path now
        from s3servers import make_client, make_versioned_bucket

        s3 = make_client(srv.endpoint_url)
        bucket = make_versioned_bucket(s3)
        s3.put_object(Bucket=bucket, Key="cached.bin", Body=cached)
        s3.put_object(Bucket=bucket, Key="later.bin", Body=later)
        for _ in range(ctx.reps):
            proxy = FaultProxy(srv.endpoint_url)
            try:
                with s3_mounted(proxy.url, bucket, "--store-timeout", str(STORE_TIMEOUT)) as (mnt, cache):
                    assert (mnt / "latest/cached.bin").read_bytes() == cached
                    deadline = time.monotonic() + 30
                    while sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) < len(cached):
                        assert time.monotonic() < deadline, "the disk cache was never written"
                        time.sleep(0.05)
                    drop_caches()
                    proxy.mode = "blackhole"
                    result: dict[str, tuple[bytes | None, float]] = {}
                    stuck = threading.Thread(target=lambda: result.update(later=_read(mnt / "latest/later.bin")))
                    stuck.start()
                    time.sleep(0.5)
                    data, took = _read(mnt / "latest/cached.bin")
                    assert data == cached
                    t["cached"].append(took)
                    t0 = time.perf_counter()
                    versionfs("status", str(mnt))
                    t["status"].append(time.perf_counter() - t0)
                    stuck.join()
                    data, took = result["later"]
                    assert data is None, "the read did not fail"
                    t["eio"].append(took + 0.5)  # it started half a second before the cached read
                    proxy.mode = "pass"
                    data, took = _read(mnt / "latest/later.bin")
                    assert data == later
                    t["back"].append(took)
            finally:
                proxy.close()
            proxy = FaultProxy(srv.endpoint_url)
            try:
                proxy.mode = "blackhole"
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "m").mkdir()
                    t0 = time.perf_counter()
                    r = subprocess.run([sys.executable, "-m", "versionfs", "mount", f"s3://{bucket}", str(Path(tmp) / "m"),
                                        "--endpoint-url", proxy.url, "--state-dir", str(Path(tmp) / "state")],
                                       capture_output=True, text=True)
                    t["mount"].append(time.perf_counter() - t0)
                    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            finally:
                proxy.close()
    med = lambda k: statistics.median(t[k]) * 1000  # noqa: E731
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows = [
        Row("during the outage: a read of 32 MiB already in the disk cache (page cache dropped)", med("cached"), None,
            f"never waits for the store ({met(med('cached') < 1000)})", unit="ms"),
        Row("during the outage: `versionfs status`", med("status"), None,
            f"answers at once ({met(med('status') < 2000)})", unit="ms"),
        Row(f"during the outage: a read that needs the store, until EIO (`--store-timeout {STORE_TIMEOUT:g}`)", med("eio"), None,
            f"EIO within the bound ({met(med('eio') <= STORE_TIMEOUT * 1000 + 1000)})", unit="ms"),
        Row("the store back: the same read", med("back"), None, f"normal within seconds ({met(med('back') < 3000)})", unit="ms"),
        Row("`versionfs mount` against an endpoint that drops packets, until its one-line error", med("mount"), None,
            f"≤ 10 s ({met(med('mount') <= 10_000)})", unit="ms"),
    ]
    runs = lambda k: " / ".join(f"{v * 1000:.0f}" for v in t[k])  # noqa: E731
    notes = [f"Every run (ms): cached {runs('cached')}; status {runs('status')}; until EIO {runs('eio')}; "
             f"back {runs('back')}; mount {runs('mount')}. `status` and `mount` include starting the CLI "
             f"(a Python process) on a machine with {os.cpu_count()} CPUs."]
    setup = ("a versionfs mount of a bucket on the bench's local S3 server through a loopback proxy that stops "
             f"forwarding anything (packets dropped), then forwards again; medians of {ctx.reps} runs")
    return Result(setup, rows, notes)
