"""Cold reads of compressed datasets (gzip; shuffle + gzip) through latest/, against
h5py reading the same dataset directly."""


import os
import statistics
import sys
from pathlib import Path

import h5py
import numpy as np

from harness import (DATA_DIR, Context, MiB, Result, Row, daemon_pid, drop_caches, mib_s, mounted, proc_counters,
                     read_sequentially, timed, verify_npy)

COMPRESSED_FILE = DATA_DIR / "compressed.h5"
ELEMENTS = 32 * MiB  # per dataset: 128 MiB of float32, 256 MiB of int64
CHUNK = 1 << 18  # elements per chunk
DATASETS = {
    # name: (dtype, h5py filter options, what it looks like)
    "temps_gzip": ("<f4", {"compression": "gzip", "compression_opts": 4}, "a smooth float32 field to 0.01, gzip level 4"),
    "counts_shuffle_gzip": ("<i8", {"compression": "gzip", "compression_opts": 4, "shuffle": True},
                            "small int64 counts (Poisson), shuffle + gzip level 4"),
}


def _data(name: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if name == "temps_gzip":
        t = np.arange(ELEMENTS, dtype=np.float64)
        return np.round(15 + 10 * np.sin(t / 5e4) + rng.normal(0, 0.5, ELEMENTS), 2).astype("<f4")
    return rng.poisson(3.0, ELEMENTS).astype("<i8")


def ensure_file() -> Path:
    def ok() -> bool:
        try:
            with h5py.File(COMPRESSED_FILE, "r") as f:
                return all(f[f"_version_data/versions/v1/{n}"].shape == (ELEMENTS,) for n in DATASETS)
        except (OSError, KeyError):
            return False

    if ok():
        return COMPRESSED_FILE
    from versioned_hdf5 import VersionedHDF5File

    DATA_DIR.mkdir(exist_ok=True)
    print(f"creating {COMPRESSED_FILE} (once) ...", file=sys.stderr, flush=True)
    tmp = COMPRESSED_FILE.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        with VersionedHDF5File(f).stage_version("v1") as g:
            for name, (dtype, filters, _) in DATASETS.items():
                g.create_dataset(name, data=_data(name), chunks=(CHUNK,), **filters)
    os.replace(tmp, COMPRESSED_FILE)
    return COMPRESSED_FILE


def run(ctx: Context) -> Result:
    source = ensure_file()
    dropped = True
    times: dict[str, dict[str, list[float]]] = {n: {"h5py": [], "cold": []} for n in DATASETS}
    cpu: dict[str, list[float]] = {n: [] for n in DATASETS}
    sizes: dict[str, int] = {}
    stored: dict[str, int] = {}
    with h5py.File(source, "r") as f:
        for name in DATASETS:
            stored[name] = f[f"_version_data/{name}/raw_data"].id.get_storage_size()

    def h5py_read(name: str) -> np.ndarray:
        with h5py.File(source, "r") as f:
            return f[f"_version_data/versions/v1/{name}"][...]

    for rep in range(ctx.reps):
        for name in DATASETS:
            dropped &= drop_caches()
            times[name]["h5py"].append(timed(lambda: h5py_read(name)))
            with mounted(source) as mnt:
                path = mnt / "latest" / f"{name}.npy"
                sizes[name] = path.stat().st_size
                pid = daemon_pid(mnt)
                dropped &= drop_caches()
                _, c0 = proc_counters(pid)
                t = timed(lambda: read_sequentially(path))
                _, c1 = proc_counters(pid)
                times[name]["cold"].append(t)
                cpu[name].append((c1 - c0) / t)
                if rep == 0:
                    verify_npy(path, h5py_read(name))

    med = statistics.median
    suffix = "" if dropped else " (cache not dropped)"
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows, notes = [], []
    for name, (dtype, _, what) in DATASETS.items():
        nbytes = ELEMENTS * np.dtype(dtype).itemsize
        ref = mib_s(nbytes, med(times[name]["h5py"]))
        cold = mib_s(nbytes, med(times[name]["cold"]))
        rows.append(Row(f"h5py direct read of `{name}`, cold{suffix} — reference", ref, None, "—", reference=True))
        rows.append(Row(f"versionfs `latest/{name}.npy`, cold, 1 MiB `readinto`{suffix}", cold, cold / ref,
                        f"≥ 1.0× ({met(cold >= ref)})"))
        runs = lambda k: " / ".join(f"{mib_s(nbytes, t):.0f}" for t in times[name][k])  # noqa: E731
        notes.append(f"`{name}`: {what}; {nbytes // MiB} MiB in {stored[name] / MiB:.0f} MiB stored; every run (MiB/s): "
                     f"h5py {runs('h5py')}; versionfs {runs('cold')}; daemon busy {med(cpu[name]):.0%} of one CPU.")
    notes.append("Correctness (first run): the data bytes of each `.npy` equal h5py's (sha256).")
    setup = (f"two datasets of {ELEMENTS:,} elements in chunks of {CHUNK:,}, one version; each read cold "
             f"(page cache dropped, fresh mount); medians of {ctx.reps} runs; {os.cpu_count()} CPUs")
    return Result(setup, rows, notes)
