"""History at any size: listings, histories, commits, images and S3 views on
inputs of 1,000 versions, 10,000 keys and 100,000 chunks, each beside its
reference in the same run (inputs: bench/scale_inputs.py)."""

import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from versionfs.control import request as control_request

from harness import S3_SERVER, Context, MiB, Result, Row, daemon_pid, mounted, s3_mounted, s3_server, scratch_dir, timed
from scale_inputs import (CHUNKS_CHUNK, CHUNKS_COUNT, CHUNKS_DATASET, HISTORY_DATASET, HISTORY_ELEMENTS,
                          HISTORY_VERSIONS, S3_DIRS, S3_KEYS, S3_VERSIONS, ensure_chunks_file, ensure_history_file,
                          fill_bucket)

RANDOM_READS = 200
IDLE_SECONDS = 30


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ls(*args) -> int:
    out = subprocess.run(["ls", *map(str, args)], capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def local_listing(entries: int) -> float:
    """`ls -l` of a local directory of as many entries (what the kernel and ls cost per entry)."""
    tmp = Path(tempfile.mkdtemp(prefix="versionfs-bench-ls-"))
    try:
        for i in range(entries // 2):
            (tmp / f"v{i:05d}").mkdir()
            (tmp / f"v{i:05d}.h5").touch()
        return timed(lambda: ls("-l", tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def library_versions(path: Path) -> float:
    from versioned_hdf5 import VersionedHDF5File

    def run() -> None:
        with h5py.File(path, "r") as f:
            assert len(VersionedHDF5File(f).versions) == HISTORY_VERSIONS

    return timed(run)


def edit_in_place(path: Path, idx: np.ndarray) -> None:
    with open(path, "r+b", buffering=0) as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        header = f.tell()
        for i in idx.tolist():
            f.seek(header + 8 * i)
            f.write(np.float64(-1000.5 - i).tobytes())


def run(ctx: Context) -> Result:
    med = statistics.median
    ms = lambda times: med(times) * 1000  # noqa: E731
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows: list[Row] = []
    notes: list[str] = []

    # -- HDF5, N versions ----------------------------------------------------------------
    history_file = ensure_history_file()
    ref_lib, ref_local, ls_l, ls_plain, hist, hist_rss, commit_before, commit_after = [], [], [], [], [], [], [], []
    entries = 2 * (HISTORY_VERSIONS + 1)
    change = np.sort(np.random.default_rng(7).choice(HISTORY_ELEMENTS, 10, replace=False))
    for rep in range(ctx.reps):
        ref_lib.append(library_versions(history_file))
        ref_local.append(local_listing(entries))
        with mounted(history_file) as mnt:
            ls_l.append(timed(lambda: ls("-l", mnt / "versions")))
        with mounted(history_file) as mnt:
            ls_plain.append(timed(lambda: ls(mnt / "versions")))
        with mounted(history_file) as mnt:
            pid = daemon_pid(mnt)
            before = rss(pid)
            hist.append(timed(lambda: ls("-l", mnt / f"history/{HISTORY_DATASET}.npy")))
            hist_rss.append(rss(pid) - before)
            if rep == 0:
                assert ls(mnt / f"history/{HISTORY_DATASET}.npy") == HISTORY_VERSIONS
                built = control_request(str(mnt), "stats")["built"]
                notes.append(f"scale: after `ls -l history/` the daemon had built {built.get('trees', 0)} trees and opened "
                             f"{built.get('objects opened', 0)} datasets ({built.get('headers read', 0)} headers read directly)")
        if rep < 2:  # a commit of a 10-element change, on a fresh copy, before / after browsing history
            for browse, times in ((False, commit_before), (True, commit_after)):
                with scratch_dir() as tmp:
                    copy = tmp / "copy.h5"
                    shutil.copyfile(history_file, copy)
                    with mounted(copy) as mnt:
                        if browse:
                            ls("-l", mnt / f"history/{HISTORY_DATASET}.npy")
                        edit_in_place(mnt / f"staging/{HISTORY_DATASET}.npy", change)
                        times.append(timed(lambda: control_request(str(mnt), "commit", name="next")))
    reference = ms(ref_lib)
    per_entry = ms(ref_local)
    budget = reference + per_entry
    rows += [
        Row(f"N={HISTORY_VERSIONS}: versioned-hdf5 open + `versions` — reference", reference, None, "—", "ms", reference=True),
        Row(f"N={HISTORY_VERSIONS}: `ls -l` of a local directory of {entries} entries (the kernel's and ls's cost per entry)",
            per_entry, per_entry / reference, "— (informative)", "ms"),
        Row(f"N={HISTORY_VERSIONS}: first `ls -l versions/` (fresh mount)", ms(ls_l), ms(ls_l) / reference,
            f"≤ 2× (reference + local `ls -l`) ({met(ms(ls_l) <= 2 * budget)})", "ms"),
        Row(f"N={HISTORY_VERSIONS}: first `ls versions/` (fresh mount)", ms(ls_plain), ms(ls_plain) / reference,
            f"≤ 2× (reference + local `ls -l`) ({met(ms(ls_plain) <= 2 * budget)})", "ms"),
        Row(f"N={HISTORY_VERSIONS}: first `ls -l history/{HISTORY_DATASET}.npy/` (fresh mount)", ms(hist), ms(hist) / reference,
            f"well under a second ({met(ms(hist) < 500)})", "ms"),
        Row(f"N={HISTORY_VERSIONS}: daemon RSS growth over that listing, per version", med(hist_rss) / HISTORY_VERSIONS,
            None, f"a few hundred bytes ({met(med(hist_rss) / HISTORY_VERSIONS < 2000)})", "bytes"),
        Row(f"N={HISTORY_VERSIONS}: commit of a 10-element change (the daemon's answer), fresh mount", ms(commit_before),
            None, "— (the row below's reference)", "ms"),
        Row(f"N={HISTORY_VERSIONS}: the same commit after `ls -l history/{HISTORY_DATASET}.npy/`", ms(commit_after),
            ms(commit_after) / ms(commit_before), f"unaffected: ≤ 1.2× the row above ({met(ms(commit_after) <= 1.2 * ms(commit_before))})", "ms"),
    ]

    # -- 100k chunks ---------------------------------------------------------------------------
    chunks_file = ensure_chunks_file()
    lib_open, stat_npy, stat_h5, h5_rss, reads, h5py_reads = [], [], [], [], [], []
    n = CHUNKS_COUNT * CHUNKS_CHUNK
    rng = random.Random(5)
    offsets = [rng.randrange(0, n * 8 - 4096) // 8 * 8 for _ in range(RANDOM_READS)]

    def library_open_and_read() -> None:
        from versioned_hdf5 import VersionedHDF5File

        with h5py.File(chunks_file, "r") as f:
            VersionedHDF5File(f)["v1"][CHUNKS_DATASET][0:512]

    for rep in range(ctx.reps):
        lib_open.append(timed(library_open_and_read))
        with mounted(chunks_file) as mnt:
            stat_npy.append(timed(lambda: os.stat(mnt / f"latest/{CHUNKS_DATASET}.npy")))
            pid = daemon_pid(mnt)
            before = rss(pid)
            stat_h5.append(timed(lambda: os.stat(mnt / "latest.h5")))
            h5_rss.append(rss(pid) - before)
            with open(mnt / f"latest/{CHUNKS_DATASET}.npy", "rb", buffering=0) as f:
                header = 128
                for off in offsets[:20]:  # warm up the handle
                    os.pread(f.fileno(), 4096, header + off)
                for off in offsets:
                    t0 = time.perf_counter()
                    os.pread(f.fileno(), 4096, header + off)
                    reads.append(time.perf_counter() - t0)
        with h5py.File(chunks_file, "r") as f:
            ds = f[f"_version_data/versions/v1/{CHUNKS_DATASET}"]
            for off in offsets:
                t0 = time.perf_counter()
                ds[off // 8 : off // 8 + 512]
                h5py_reads.append(time.perf_counter() - t0)
    lib_ms = ms(lib_open)
    rows += [
        Row(f"{CHUNKS_COUNT // 1000}k chunks: versioned-hdf5 open + first read — reference", lib_ms, None, "—", "ms", reference=True),
        Row(f"{CHUNKS_COUNT // 1000}k chunks: first `stat latest/{CHUNKS_DATASET}.npy` (fresh mount)", ms(stat_npy), ms(stat_npy) / lib_ms,
            f"≤ the reference ({met(ms(stat_npy) <= lib_ms)})", "ms"),
        Row(f"{CHUNKS_COUNT // 1000}k chunks: first `stat latest.h5` (builds the image's metadata)", ms(stat_h5), ms(stat_h5) / lib_ms,
            f"≤ 1 s ({met(ms(stat_h5) <= 1000)})", "ms"),
        Row(f"{CHUNKS_COUNT // 1000}k chunks: daemon RSS growth over that `stat`, per chunk", med(h5_rss) / CHUNKS_COUNT, None,
            f"≤ 100 bytes ({met(med(h5_rss) / CHUNKS_COUNT <= 100)})", "bytes"),
        Row(f"{CHUNKS_COUNT // 1000}k chunks: random 4 KiB read, h5py direct (same elements) — reference", ms(h5py_reads), None, "—", "ms",
            reference=True),
        Row(f"{CHUNKS_COUNT // 1000}k chunks: random 4 KiB `pread` through `latest/{CHUNKS_DATASET}.npy`", ms(reads),
            ms(reads) / ms(h5py_reads), f"≤ 3× (i11's reads; {met(ms(reads) <= 3 * ms(h5py_reads))})", "ms"),
    ]
    notes.append("scale: image RSS growth per run (MiB): " + " / ".join(f"{r / MiB:.1f}" for r in h5_rss))

    # -- S3, K keys ------------------------------------------------------------------------------
    with s3_server() as srv:
        from s3servers import make_client, make_versioned_bucket

        url = srv.endpoint_url
        s3 = make_client(url)
        bucket = make_versioned_bucket(s3)
        t0 = time.perf_counter()
        fill_bucket(s3, bucket)
        notes.append(f"scale: filling {S3_KEYS:,} keys × {S3_VERSIONS} took {time.perf_counter() - t0:.0f} s")

        def listing(prefix: str, delimiter: str | None) -> int:
            kwargs = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
            pages = 0
            for _ in s3.get_paginator("list_object_versions").paginate(**kwargs):
                pages += 1
            return pages

        ref_all, ref_dir, mount_t, mount_req, ls_versions, ls_dir, s3_rss, idle = [], [], [], [], [], [], [], []
        for rep in range(ctx.reps):
            ref_all.append(timed(lambda: listing("", None)))
            ref_dir.append(timed(lambda: listing("d00/", "/")))
            t0 = time.perf_counter()
            with s3_mounted(url, bucket) as (mnt, _):
                mount_t.append(time.perf_counter() - t0)
                mount_req.append(control_request(str(mnt), "stats")["built"].get("list requests", 0))
                ls_versions.append(timed(lambda: ls(mnt / "versions")))
                ls_dir.append(timed(lambda: ls(mnt / "latest/d00")))
                s3_rss.append(rss(daemon_pid(mnt)))
                if rep == 0:
                    assert ls(mnt / "latest/d00") == S3_KEYS // S3_DIRS
                    before = control_request(str(mnt), "stats")["built"].get("list requests", 0)
                    time.sleep(IDLE_SECONDS)
                    idle.append((control_request(str(mnt), "stats")["built"].get("list requests", 0) - before) * 60 / IDLE_SECONDS)
    pages = -(-S3_KEYS * S3_VERSIONS // 1000)
    all_ms, dir_ms = ms(ref_all), ms(ref_dir)
    rows += [
        Row(f"S3 K={S3_KEYS:,}: boto3 ListObjectVersions of the whole prefix ({pages} pages) — reference", all_ms, None, "—", "ms",
            reference=True),
        Row(f"S3 K={S3_KEYS:,}: mount (until usable)", ms(mount_t), ms(mount_t) / all_ms,
            f"≤ the raw listing it needs: ≤ 1.2× ({med(mount_req):.0f} list requests; {met(ms(mount_t) <= 1.2 * all_ms)})", "ms"),
        Row(f"S3 K={S3_KEYS:,}: first `ls versions/`", ms(ls_versions), ms(ls_versions) / all_ms,
            f"proportional to the versions, not versions × keys ({met(ms(ls_versions) < all_ms)})", "ms"),
        Row(f"S3 K={S3_KEYS:,}: daemon RSS after that", med(s3_rss) / MiB, None, "— (informative)", "MiB"),
        Row(f"S3 K={S3_KEYS:,}: boto3 ListObjectVersions of one directory (Delimiter /) — reference", dir_ms, None, "—", "ms",
            reference=True),
        Row(f"S3 K={S3_KEYS:,}: first `ls latest/d00`", ms(ls_dir), ms(ls_dir) / dir_ms,
            f"about one directory's listing: ≤ 3× ({met(ms(ls_dir) <= 3 * dir_ms)})", "ms"),
        Row(f"S3 K={S3_KEYS:,}: idle list requests per minute (default poll, 5 s)", med(idle), None,
            f"documented: 60/5 × {pages} pages = {60 // 5 * pages} at most", "requests"),
    ]
    setup = (f"HDF5: {HISTORY_VERSIONS} versions of {HISTORY_ELEMENTS:,} float64 in 4096-element chunks, ~10 elements "
             f"changed per version; {CHUNKS_COUNT:,} chunks of {CHUNKS_CHUNK} float64 in one version; S3 ({S3_SERVER}): "
             f"{S3_KEYS:,} keys × {S3_VERSIONS} versions in {S3_DIRS} directories; medians of {ctx.reps} runs")
    return Result(setup, rows, notes)
