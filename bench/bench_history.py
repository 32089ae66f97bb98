"""history/ of one S3 directory with many object versions, against boto3."""


import os
import statistics
import subprocess
from pathlib import Path

from harness import S3_SERVER, Context, Result, Row, s3_mounted, s3_server, timed

# The history benchmark: many keys, each with a few versions, in many directories.
HISTORY_DIRS = 20
HISTORY_KEYS = 200  # per directory
HISTORY_VERSIONS = 2  # per key: 8,000 object versions in all


# -- history/ on S3 ------------------------------------------------------------------------
def run(ctx: Context) -> Result:
    """`ls -l` of one directory's history and of one key's on a bucket of many keys,
    against boto3 listing the same directory / key directly; and the whole prefix."""
    with s3_server() as srv:
        from concurrent.futures import ThreadPoolExecutor

        from s3servers import make_client, make_versioned_bucket

        url = srv.endpoint_url
        s3 = make_client(url)
        bucket = make_versioned_bucket(s3)
        keys = [f"d{d:02d}/k{k:04d}" for d in range(HISTORY_DIRS) for k in range(HISTORY_KEYS)]
        with ThreadPoolExecutor(8) as pool:
            for v in range(HISTORY_VERSIONS):
                list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=f"{key} {v}".encode()), keys))
        directory, key = "d07", "d07/k0123"

        def boto3_list(prefix: str, delimiter: str | None = "/") -> int:
            kwargs = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
            n = 0
            for page in s3.get_paginator("list_object_versions").paginate(**kwargs):
                n += len(page.get("Versions", [])) + len(page.get("DeleteMarkers", [])) + len(page.get("CommonPrefixes", []))
            return n

        def ls(path: Path) -> int:
            out = subprocess.run(["ls", "-l", str(path)], capture_output=True, text=True, check=True).stdout
            return len(out.splitlines()) - 1

        ref_dir, ref_key, ref_all, mount_dir, mount_key, mount_again = [], [], [], [], [], []
        for rep in range(ctx.reps):
            ref_dir.append(timed(lambda: boto3_list(directory + "/")))
            ref_key.append(timed(lambda: boto3_list(key)))
            ref_all.append(timed(lambda: boto3_list("", None)))
            with s3_mounted(url, bucket) as (mnt, _):
                history = mnt / "history"
                os.stat(history)  # the mount itself is not measured
                mount_dir.append(timed(lambda: ls(history / directory)))
                mount_key.append(timed(lambda: ls(history / key)))
                mount_again.append(timed(lambda: ls(history / directory)))
                if rep == 0:
                    assert ls(history / directory) == HISTORY_KEYS, "history/d07 does not list every key"
                    assert ls(history / key) == HISTORY_VERSIONS, "history/d07/k0123 does not list every version"
                    latest = sorted(os.listdir(history / key))[-1]
                    assert (history / key / latest).read_bytes() == f"{key} {HISTORY_VERSIONS - 1}".encode()

    med = statistics.median
    ms = lambda times: med(times) * 1000  # noqa: E731
    rows = [
        Row("boto3: ListObjectVersions of one directory (Delimiter /) — reference", ms(ref_dir), None, "—", unit="ms", reference=True),
        Row(f"`ls -l history/{directory}/` ({HISTORY_KEYS} names), first time on a fresh mount", ms(mount_dir),
            ms(mount_dir) / ms(ref_dir), "a listing per directory, not per prefix: ≪ the whole-prefix listing "
            f"({'met' if ms(mount_dir) < ms(ref_all) / 4 else '**not met**'})", unit="ms"),
        Row(f"`ls -l history/{key}/` ({HISTORY_VERSIONS} entries), first time", ms(mount_key), ms(mount_key) / ms(ref_dir),
            "— (informative)", unit="ms"),
        Row(f"`ls -l history/{directory}/` again (cached)", ms(mount_again), ms(mount_again) / ms(ref_dir), "— (informative)", unit="ms"),
        Row("boto3: ListObjectVersions of one key, directly", ms(ref_key), ms(ref_key) / ms(ref_dir), "— (informative)", unit="ms"),
        Row(f"boto3: ListObjectVersions of the whole prefix ({len(keys) * HISTORY_VERSIONS:,} versions)", ms(ref_all),
            ms(ref_all) / ms(ref_dir), "— (what a whole-prefix listing would cost)", unit="ms"),
    ]
    setup = (f"{S3_SERVER} on 127.0.0.1; {HISTORY_DIRS} directories × {HISTORY_KEYS} keys × {HISTORY_VERSIONS} versions; "
             f"medians of {ctx.reps} runs")
    notes = ["Correctness: the directory lists every key, the key every version, and the newest entry holds the newest body."]
    return Result(setup, rows, notes)


