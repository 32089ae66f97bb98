"""Cold and warm reads of one S3 object through versionfs, boto3, rclone and s3fs."""


import hashlib
import os
import shutil
import statistics
from pathlib import Path
from typing import Callable

import numpy as np

from harness import (S3_SERVER, Context, MiB, Result, Row, _tool_version, _version_of, cpu_seconds, daemon_pid,
    drop_caches, foreign_mount, mib_s, read_sequentially, s3_mounted, s3_server, timed)

# The S3 benchmark: one object of random bytes in a versioned bucket on a local server.
S3_OBJECT_BYTES = 256 * MiB
S3_KEY = "big.bin"


def run(ctx: Context) -> Result:
    """Cold sequential read of one 256 MiB object through versionfs, against boto3's
    download_fileobj of the same object and against rclone and s3fs mounts of the same
    bucket, all on one local S3 server; warm re-reads from versionfs's disk cache."""
    for tool in ("rclone", "s3fs"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: `make setup` (or apt-get install rclone s3fs)")
    data = np.random.default_rng(1).bytes(S3_OBJECT_BYTES)
    want = hashlib.sha256(data).hexdigest()
    nbytes = len(data)
    dropped = True

    class Sink:
        """A file that keeps nothing (``/dev/null`` for boto3), or hashes what it gets."""

        def __init__(self, digest: "hashlib._Hash | None" = None):
            self.n, self.digest = 0, digest

        def write(self, b) -> int:
            self.n += len(b)
            if self.digest is not None:
                self.digest.update(b)
            return len(b)

    def check(name: str, path: Path) -> None:
        h = hashlib.sha256()
        assert read_sequentially(path, h) == nbytes and h.hexdigest() == want, f"{name}: {path} is not the object"

    times: dict[str, list[float]] = {k: [] for k in (
        "boto3", "cold", "disk", "page", "rclone", "rclone_full", "rclone_full_disk", "s3fs")}
    server_cpu: dict[str, list[float]] = {k: [] for k in ("boto3", "cold", "rclone", "rclone_full", "s3fs")}
    client_cpu: dict[str, list[float]] = {k: [] for k in ("boto3", "cold", "disk", "rclone", "rclone_full", "s3fs")}
    cache_bytes = []
    with s3_server() as srv:
        from s3servers import make_client, make_versioned_bucket

        url, server_pid = srv.endpoint_url, srv.proc.pid
        s3 = make_client(url)
        bucket = make_versioned_bucket(s3)
        t_put = timed(lambda: s3.put_object(Bucket=bucket, Key=S3_KEY, Body=data))
        version_id = s3.head_object(Bucket=bucket, Key=S3_KEY)["VersionId"]
        # The fix is in place: a ranged GET of the version is answered with the range.
        r = s3.get_object(Bucket=bucket, Key=S3_KEY, VersionId=version_id, Range="bytes=1-2")
        assert r["Body"].read() == data[1:3] and "ContentRange" in r, "ranged GET of a version not honoured"

        def measure(key: str, fn: Callable[[], object], client_pid: int | None = None) -> float:
            """Time ``fn`` cold (page cache dropped first); CPU of the server and the
            client process meanwhile, as shares of one CPU."""
            nonlocal dropped
            dropped &= drop_caches()
            s0 = cpu_seconds(server_pid)
            c0 = cpu_seconds(client_pid or os.getpid())
            t = timed(fn)
            if key in server_cpu:
                server_cpu[key].append((cpu_seconds(server_pid) - s0) / t)
            if key in client_cpu:
                client_cpu[key].append((cpu_seconds(client_pid or os.getpid()) - c0) / t)
            times[key].append(t)
            return t

        for rep in range(ctx.reps):
            # The reference: boto3's managed download (ranged GETs of 8 MiB on 10
            # threads, its defaults) into a sink that keeps nothing, as a read into
            # one buffer keeps nothing.
            sink = Sink()
            measure("boto3", lambda: s3.download_fileobj(bucket, S3_KEY, sink))
            assert sink.n == nbytes, sink.n
            if rep == 0:
                sink = Sink(hashlib.sha256())
                s3.download_fileobj(bucket, S3_KEY, sink)
                assert sink.digest.hexdigest() == want, "boto3 download differs from the object"
            # versionfs: a fresh mount with an empty cache per repetition.
            with s3_mounted(url, bucket) as (mnt, cache):
                path = mnt / "latest" / S3_KEY
                pid = daemon_pid(mnt)
                assert path.stat().st_size == nbytes
                measure("cold", lambda: read_sequentially(path), pid)
                cache_bytes.append(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()))
                # Page cache dropped, disk cache kept: served from the disk cache.
                measure("disk", lambda: read_sequentially(path), pid)
                # And at once again: the page cache.
                times["page"].append(timed(lambda: read_sequentially(path)))
                if rep == 0:
                    drop_caches()
                    check("versionfs", path)
            # The other mounts, cold, each freshly mounted.
            for key, kind, mode in (("rclone", "rclone", "off"), ("rclone_full", "rclone", "full"), ("s3fs", "s3fs", "")):
                with foreign_mount(kind, url, bucket, mode) as (mnt, pid):
                    path = mnt / S3_KEY
                    assert path.stat().st_size == nbytes
                    measure(key, lambda: read_sequentially(path), pid)
                    if key == "rclone_full":  # its re-read comes from its disk cache
                        measure("rclone_full_disk", lambda: read_sequentially(path), pid)
                    if rep == 0:
                        drop_caches()
                        check(f"{kind} {mode}".strip(), path)

    med = statistics.median
    speed = {k: mib_s(nbytes, med(v)) for k, v in times.items()}
    ref, cold = speed["boto3"], speed["cold"]
    suffix = "" if dropped else " (cache not dropped)"
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    ahead = lambda other: f"versionfs ahead ({met(cold > speed[other])}: {cold:,.0f} vs {speed[other]:,.0f})"  # noqa: E731
    rows = [
        Row("boto3 `download_fileobj` (8 MiB ranged GETs on 10 threads) into a sink that keeps nothing — reference",
            ref, None, "—", reference=True),
        Row(f"versionfs `latest/{S3_KEY}`, cold (fresh mount and disk cache), 1 MiB `readinto`{suffix}", cold,
            cold / ref, f"≥ 1.0× ({met(cold >= ref)})"),
        Row(f"`rclone mount`, `--vfs-cache-mode off` (its default), cold, 1 MiB `readinto`{suffix}", speed["rclone"],
            speed["rclone"] / ref, ahead("rclone")),
        Row(f"`rclone mount`, `--vfs-cache-mode full`, cold, 1 MiB `readinto`{suffix}", speed["rclone_full"],
            speed["rclone_full"] / ref, ahead("rclone_full")),
        Row(f"`s3fs` (its defaults: no disk cache), cold, 1 MiB `readinto`{suffix}", speed["s3fs"],
            speed["s3fs"] / ref, ahead("s3fs")),
        Row(f"versionfs re-read, page cache dropped: from its disk cache{suffix}", speed["disk"], speed["disk"] / ref,
            "— (informative)"),
        Row(f"`rclone mount --vfs-cache-mode full` re-read, page cache dropped: from its disk cache{suffix}",
            speed["rclone_full_disk"], speed["rclone_full_disk"] / ref, "— (informative)"),
        Row("versionfs re-read at once (page cache)", speed["page"], speed["page"] / ref, "— (informative)"),
    ]
    runs = lambda k: " / ".join(f"{mib_s(nbytes, t):.0f}" for t in times[k])  # noqa: E731
    pct = lambda d, k: f"{med(d[k]):.0%}"  # noqa: E731
    setup = (
        f"one object of {nbytes // MiB} MiB of random bytes in a versioned bucket on a local {S3_SERVER} "
        f"{_version_of(S3_SERVER)} server on 127.0.0.1 (in memory; its versioned GETs made to honour Range), "
        f"rclone {_tool_version(['rclone', 'version'])}, s3fs {_tool_version(['s3fs', '--version'])}; "
        f"every read cold (page cache dropped, fresh mount); medians of {ctx.reps} runs"
    )
    notes = [
        f"CPU during the cold reads (share of one CPU; the machine has {os.cpu_count()}): server "
        f"{pct(server_cpu, 'boto3')} for boto3, {pct(server_cpu, 'cold')} for versionfs, {pct(server_cpu, 'rclone')} for rclone off, "
        f"{pct(server_cpu, 'rclone_full')} for rclone full, {pct(server_cpu, 's3fs')} for s3fs; the client itself "
        f"(boto3's process, versionfs's daemon, rclone, s3fs) {pct(client_cpu, 'boto3')} / {pct(client_cpu, 'cold')} / "
        f"{pct(client_cpu, 'rclone')} / {pct(client_cpu, 'rclone_full')} / {pct(client_cpu, 's3fs')}; versionfs's daemon during the "
        f"re-read from its disk cache {pct(client_cpu, 'disk')}.",
        f"versionfs's disk cache after a cold read: {med(cache_bytes) / MiB:.0f} MiB (the object is {nbytes // MiB} MiB).",
        f"Every run (MiB/s): boto3 {runs('boto3')}; versionfs cold {runs('cold')}; rclone off {runs('rclone')}; "
        f"rclone full {runs('rclone_full')}; s3fs {runs('s3fs')}; versionfs from disk cache {runs('disk')}; "
        f"rclone full from disk cache {runs('rclone_full_disk')}; versionfs page cache {runs('page')}.",
        f"The object went up in one PUT of {t_put:.1f} s.",
        "Correctness (first run): the sha256 of what boto3 downloaded and of what versionfs (from its disk cache), "
        "rclone (both modes) and s3fs read equals the object's.",
    ]
    return Result(setup, rows, notes)


