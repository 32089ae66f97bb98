"""S3 commits of many small files, on moto and on ministack, against boto3's
``upload_file`` of the same files on 10 threads into the same server."""

import random
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from versionfs.control import request as control_request

from harness import BENCH_DIR, Context, Result, Row, s3_mounted, timed

FILES = 1000
SERVERS = ("moto", "ministack")


def small_files(directory: Path) -> dict[str, Path]:
    rng = random.Random(3)
    out = {}
    for i in range(FILES):
        path = directory / f"d{i % 10}" / f"f{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(200, 8 << 10)))
        out[f"d{i % 10}/f{i:04d}.bin"] = path
    return out


def run(ctx: Context) -> Result:
    tests = str(BENCH_DIR.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from s3servers import S3Server, make_client, make_versioned_bucket

    rows, notes = [], []
    med = statistics.median
    ms = lambda times: med(times) * 1000  # noqa: E731
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="versionfs-bench-s3-files-") as tmp:
        files = small_files(Path(tmp))
        for kind in SERVERS:
            ref, ours = [], []
            with S3Server(kind, versioned_range_fix=kind == "ministack") as srv:
                url = srv.endpoint_url
                s3 = make_client(url, max_pool_connections=16)
                for _ in range(ctx.reps):
                    bucket = make_versioned_bucket(s3)
                    with ThreadPoolExecutor(10) as pool:
                        ref.append(timed(lambda: list(pool.map(lambda kv: s3.upload_file(str(kv[1]), bucket, kv[0]), files.items()))))
                    assert s3.list_objects_v2(Bucket=bucket, MaxKeys=1000)["KeyCount"] == FILES
                    bucket = make_versioned_bucket(s3)
                    with s3_mounted(url, bucket) as (mnt, _):
                        for key, path in files.items():
                            target = mnt / "staging" / key
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(path.read_bytes())
                        ours.append(timed(lambda: control_request(str(mnt), "commit")))
                    listing = s3.list_object_versions(Bucket=bucket, MaxKeys=1000)
                    assert len(listing.get("Versions", [])) == FILES, "every file once"
            rows += [
                Row(f"{kind}: boto3 `upload_file` of {FILES:,} small files (200 B – 8 KiB) on 10 threads — reference", ms(ref), None, "—", "ms", reference=True),
                Row(f"{kind}: commit of the same {FILES:,} files from `staging/` (the daemon's answer)", ms(ours), ms(ours) / ms(ref), f"≤ 1.0× ({met(ms(ours) <= ms(ref))})", "ms"),
            ]
            notes.append(f"{kind}: every run (ms): boto3 " + " / ".join(f"{t * 1000:.0f}" for t in ref)
                         + "; versionfs " + " / ".join(f"{t * 1000:.0f}" for t in ours) + ".")
    setup = (f"{FILES:,} files of 200 B – 8 KiB in 10 directories, each run into a fresh versioned bucket of the same "
             f"local server (moto, then ministack); medians of {ctx.reps} runs")
    return Result(setup, rows, notes)
