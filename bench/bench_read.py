"""Sequential reads of a 512 MiB dataset through latest/, against the disk (and h5py)."""


import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from harness import (DATA_DIR, Context, MiB, Result, Row, daemon_pid, drop_caches, mib_s, mounted, proc_counters,
    read_sequentially, timed, verify_npy)

# The big-read dataset: 1-D float64, random (so compression could not help), unfiltered.
BIG_FILE = DATA_DIR / "big.h5"
BIG_ELEMENTS = 64 * MiB  # 67_108_864 float64 = 512 MiB
BIG_CHUNK = 1 << 18  # 2 MiB chunks
BIG_VERSION = "v1"
BIG_H5PATH = f"_version_data/versions/{BIG_VERSION}/big"  # what versioned-hdf5 reads for a read-only file


# -- the big dataset ------------------------------------------------------------------
def big_file_ok() -> bool:
    try:
        with h5py.File(BIG_FILE, "r") as f:
            ds = f[BIG_H5PATH]
            return ds.shape == (BIG_ELEMENTS,) and ds.dtype == np.float64
    except (OSError, KeyError):
        return False


def ensure_big_file() -> Path:
    """Make the 512 MiB versioned file once; kept in bench/data/ for later runs."""
    if BIG_FILE.exists() and big_file_ok():
        return BIG_FILE
    from versioned_hdf5 import VersionedHDF5File

    DATA_DIR.mkdir(exist_ok=True)
    print(f"creating {BIG_FILE} ({BIG_ELEMENTS * 8 // MiB} MiB, once) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    data = np.random.default_rng(0).standard_normal(BIG_ELEMENTS)
    tmp = BIG_FILE.with_suffix(".h5.tmp")  # renamed into place only when complete
    with h5py.File(tmp, "w") as f:
        with VersionedHDF5File(f).stage_version(BIG_VERSION) as g:
            g.create_dataset("big", data=data, chunks=(BIG_CHUNK,))
    os.replace(tmp, BIG_FILE)
    print(f"created in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return BIG_FILE



# -- benchmarks ------------------------------------------------------------------------
def run(ctx: Context) -> Result:
    """Sequential read of latest/big.npy, cold and warm, against a plain sequential
    read of the file (the disk), and h5py reading the same dataset, cold."""
    source = ensure_big_file()
    nbytes = BIG_ELEMENTS * 8
    dropped = True

    def h5py_read() -> np.ndarray:
        with h5py.File(source, "r") as f:
            return f[BIG_H5PATH][...]

    ref_times, disk, cold, warm, cat = [], [], [], [], []
    daemon_cold_read, daemon_cold_cpu, daemon_warm_read = [], [], []
    for rep in range(ctx.reps):
        # Reference and versionfs alternate, so that drifts of the (virtual) disk
        # or of the host hit both alike.
        dropped &= drop_caches()
        ref_times.append(timed(h5py_read))
        # The plain file read sets the ceiling: is the reference disk-bound in this run?
        dropped &= drop_caches()
        disk.append(timed(lambda: read_sequentially(source)))
        # A fresh mount per repetition: nothing cached in the daemon either.
        with mounted(source) as mnt:
            path = mnt / "latest" / "big.npy"
            size = path.stat().st_size
            pid = daemon_pid(mnt)
            dropped &= drop_caches()
            r0, c0 = proc_counters(pid)
            t = timed(lambda: read_sequentially(path))
            r1, c1 = proc_counters(pid)
            cold.append(t)
            daemon_cold_read.append(r1 - r0)
            daemon_cold_cpu.append((c1 - c0) / t)
            # Warm: the same file again, at once; keep_cache should serve it from RAM.
            warm.append(timed(lambda: read_sequentially(path)))
            r2, _ = proc_counters(pid)
            daemon_warm_read.append(r2 - r1)
            if rep == 0:
                verify_npy(path, h5py_read())
            # cat, cold: what a shell user sees (cat reads 128 KiB at a time).
            dropped &= drop_caches()
            cat.append(timed(lambda: subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)))

    def speed(times: list[float], n: int = nbytes) -> float:
        return mib_s(n, statistics.median(times))

    h5py_s = speed(ref_times)
    ref = speed(disk, source.stat().st_size)  # the disk in this run: what a read can reach
    cold_s, warm_s, cat_s = speed(cold, size), speed(warm, size), speed(cat, size)
    suffix = "" if dropped else " (cache not dropped)"
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows = [
        Row(f"plain sequential read of the .h5 file, cold{suffix} (the disk) — reference", ref, None, "—", reference=True),
        Row(f"h5py direct read of the dataset, cold{suffix}", h5py_s, h5py_s / ref, "— (informative)"),
        Row(f"versionfs `latest/big.npy`, cold, 1 MiB `readinto`{suffix}", cold_s, cold_s / ref,
            f"≥ 0.8× the disk ({met(cold_s >= 0.8 * ref)}; {cold_s / h5py_s:.2f}× h5py)"),
        Row(f"versionfs `latest/big.npy`, cold, `cat > /dev/null`{suffix}", cat_s, cat_s / ref, "≥ 0.8 (informative)"),
        Row("versionfs `latest/big.npy`, warm re-read (page cache)", warm_s, warm_s / ref, f"from page cache, ≫ cold ({warm_s / cold_s:.1f}× cold)"),
    ]
    med = statistics.median
    runs = lambda times, n=nbytes: " / ".join(f"{mib_s(n, t):.0f}" for t in times)  # noqa: E731
    setup = (
        f"dataset of {nbytes // MiB} MiB float64, 1-D, {BIG_ELEMENTS:,} elements, chunks of "
        f"{BIG_CHUNK:,} ({BIG_CHUNK * 8 // MiB} MiB), no compression; medians of {ctx.reps} runs"
    )
    notes = [
        f"Daemon during a cold read: read {med(daemon_cold_read) / MiB:.0f} MiB from the source "
        f"(file is {size / MiB:.0f} MiB), busy {med(daemon_cold_cpu):.0%} of one CPU.",
        f"Daemon during a warm re-read: read {med(daemon_warm_read) / MiB:.1f} MiB "
        f"({'served by the page cache' if med(daemon_warm_read) < MiB else 'NOT served by the page cache'}).",
        f"Every run (MiB/s): disk {runs(disk, source.stat().st_size)}; h5py {runs(ref_times)}; cold {runs(cold, size)}; "
        f"cat {runs(cat, size)}; warm {runs(warm, size)}.",
        "Correctness: `big.npy` header matches numpy's, data bytes equal h5py's (sha256).",
    ]
    return Result(setup, rows, notes)


