"""Several readers at once: 4 readers of different HDF5 datasets against h5py in 4
threads, and 8 `cat` of different S3 objects against 8 boto3 downloads at once."""


import hashlib
import os
import statistics
import subprocess
import threading
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from bench_image import IMAGE_DATASETS, IMAGE_ELEMENTS, ensure_image_files
from harness import (Context, MiB, Result, Row, cpu_seconds, daemon_pid, drop_caches, mib_s, mounted, read_sequentially,
                     s3_mounted, s3_server, timed)

S3_OBJECTS = 8
S3_OBJECT_BYTES = 64 * MiB


def _in_threads(jobs: list[Callable[[], object]]) -> None:
    errors: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _hdf5(ctx: Context, rows: list[Row], notes: list[str]) -> bool:
    source, _ = ensure_image_files()  # 4 datasets of 256 MiB float64, 256 KiB chunks, unfiltered
    names = [f"d{i}" for i in range(IMAGE_DATASETS)]
    nbytes = IMAGE_DATASETS * IMAGE_ELEMENTS * 8
    dropped = True
    ref, ours, cpu = [], [], []

    def h5py_threads() -> None:
        with h5py.File(source, "r") as f:
            _in_threads([lambda n=n: f[f"_version_data/versions/v1/{n}"][...] for n in names])

    for rep in range(ctx.reps):
        dropped &= drop_caches()
        ref.append(timed(h5py_threads))
        with mounted(source) as mnt:
            paths = [mnt / "latest" / f"{n}.npy" for n in names]
            for p in paths:
                p.stat()
            pid = daemon_pid(mnt)
            dropped &= drop_caches()
            c0 = cpu_seconds(pid)
            t = timed(lambda: _in_threads([lambda p=p: read_sequentially(p) for p in paths]))
            ours.append(t)
            cpu.append((cpu_seconds(pid) - c0) / t)
            if rep == 0:
                with h5py.File(source, "r") as f:
                    for n, p in zip(names, paths):
                        want = hashlib.sha256(f[f"_version_data/versions/v1/{n}"][...].data).digest()
                        with open(p, "rb") as fh:
                            np.lib.format.read_magic(fh)
                            np.lib.format.read_array_header_1_0(fh)
                            assert hashlib.sha256(fh.read()).digest() == want, f"{p} differs from h5py"
    suffix = "" if dropped else " (cache not dropped)"
    med = statistics.median
    r, o = mib_s(nbytes, med(ref)), mib_s(nbytes, med(ours))
    rows.append(Row(f"h5py, 4 threads reading 4 datasets of one file at once, cold{suffix} — reference", r, None, "—",
                    reference=True))
    rows.append(Row(f"versionfs, 4 readers of `latest/d0…d3.npy` at once, 1 MiB `readinto`, cold{suffix}", o, o / r,
                    f"≥ 1.0× ({'met' if o >= r else '**not met**'})"))
    runs = lambda times: " / ".join(f"{mib_s(nbytes, t):.0f}" for t in times)  # noqa: E731
    notes.append(f"HDF5: 4 datasets of {IMAGE_ELEMENTS * 8 // MiB} MiB float64 in 256 KiB chunks (bench/data/image.h5), "
                 f"aggregate MiB/s; every run: h5py {runs(ref)}; versionfs {runs(ours)}; daemon busy {med(cpu):.0%} of one CPU. "
                 "Correctness (first run): each `.npy`'s data equals h5py's (sha256).")
    return dropped


def _s3(ctx: Context, rows: list[Row], notes: list[str]) -> bool:
    rng = np.random.default_rng(3)
    bodies = {f"obj{i}.bin": rng.bytes(S3_OBJECT_BYTES) for i in range(S3_OBJECTS)}
    nbytes = S3_OBJECTS * S3_OBJECT_BYTES
    dropped = True
    ref, ours, cpu, server = [], [], [], []

    class Sink:
        def __init__(self):
            self.n = 0

        def write(self, b) -> int:
            self.n += len(b)
            return len(b)

    with s3_server() as srv:
        from s3servers import make_client, make_versioned_bucket

        url, server_pid = srv.endpoint_url, srv.proc.pid
        s3 = make_client(url, max_pool_connections=8 * 10)  # a connection for each of boto3's 8 × 10 threads
        bucket = make_versioned_bucket(s3)
        for key, body in bodies.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        for rep in range(ctx.reps):
            sinks = {k: Sink() for k in bodies}
            dropped &= drop_caches()
            ref.append(timed(lambda: _in_threads([lambda k=k: s3.download_fileobj(bucket, k, sinks[k]) for k in bodies])))
            assert all(s.n == S3_OBJECT_BYTES for s in sinks.values())
            with s3_mounted(url, bucket) as (mnt, _):
                paths = [mnt / "latest" / k for k in bodies]
                for p in paths:
                    assert p.stat().st_size == S3_OBJECT_BYTES
                pid = daemon_pid(mnt)
                dropped &= drop_caches()
                c0, s0 = cpu_seconds(pid), cpu_seconds(server_pid)

                def cats() -> None:
                    procs = [subprocess.Popen(["cat", str(p)], stdout=subprocess.DEVNULL) for p in paths]
                    assert all(p.wait() == 0 for p in procs)

                t = timed(cats)
                ours.append(t)
                cpu.append((cpu_seconds(pid) - c0) / t)
                server.append((cpu_seconds(server_pid) - s0) / t)
                if rep == 0:
                    drop_caches()
                    for k, p in zip(bodies, paths):
                        assert hashlib.sha256(Path(p).read_bytes()).digest() == hashlib.sha256(bodies[k]).digest()
    suffix = "" if dropped else " (cache not dropped)"
    med = statistics.median
    r, o = mib_s(nbytes, med(ref)), mib_s(nbytes, med(ours))
    rows.append(Row("boto3, 8 `download_fileobj` of different 64 MiB objects at once — reference", r, None, "—", reference=True))
    rows.append(Row(f"versionfs, 8 `cat` of different 64 MiB objects at once, cold (fresh mount and disk cache){suffix}",
                    o, o / r, f"≥ 0.8× ({'met' if o >= 0.8 * r else '**not met**'})"))
    runs = lambda times: " / ".join(f"{mib_s(nbytes, t):.0f}" for t in times)  # noqa: E731
    notes.append(f"S3: 8 objects of 64 MiB on the bench's local S3 server, aggregate MiB/s; every run: boto3 {runs(ref)}; "
                 f"versionfs {runs(ours)}; daemon busy {med(cpu):.0%}, server {med(server):.0%} of one CPU. "
                 "Correctness (first run): what `cat` read equals each object (sha256).")
    return dropped


def run(ctx: Context) -> Result:
    rows: list[Row] = []
    notes: list[str] = []
    _hdf5(ctx, rows, notes)
    _s3(ctx, rows, notes)
    setup = f"readers at once, each on its own file; cold reads; medians of {ctx.reps} runs; {os.cpu_count()} CPUs"
    return Result(setup, rows, notes)
