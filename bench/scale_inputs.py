"""The inputs of the ``scale`` benchmark, made once under bench/data (git-ignored)
and reused: a versioned HDF5 file of many versions, one of many chunks, and an
S3 bucket of many keys (made afresh on each run's server)."""

import datetime as dt
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from harness import DATA_DIR

UTC = dt.timezone.utc

# N versions of a 1e6-float64 dataset in 4096-element chunks, ~10 elements changed per version.
HISTORY_FILE = DATA_DIR / "scale_history.h5"
HISTORY_VERSIONS = 1000
HISTORY_ELEMENTS = 1_000_000
HISTORY_CHUNK = 4096
HISTORY_CHANGED = 10  # elements per version
HISTORY_DATASET = "big"

# One version of a dataset of 100k chunks (4 KiB each: a random 4 KiB read is one chunk).
CHUNKS_FILE = DATA_DIR / "scale_chunks.h5"
CHUNKS_COUNT = 100_000
CHUNKS_CHUNK = 512  # float64 elements per chunk
CHUNKS_DATASET = "big"

# S3: K keys x 2 versions in 100 directories.
S3_KEYS = 10_000
S3_DIRS = 100
S3_VERSIONS = 2


def version_name(i: int) -> str:
    return f"v{i:04d}"


def version_time(i: int) -> dt.datetime:
    return dt.datetime(2020, 1, 1, tzinfo=UTC) + dt.timedelta(days=i)


def history_change(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Version i's change: (sorted element indices, new values)."""
    rng = np.random.default_rng(i)
    idx = np.unique(rng.integers(0, HISTORY_ELEMENTS, HISTORY_CHANGED))
    return idx, rng.standard_normal(len(idx))


def _valid(path: Path, check) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return bool(check(f))
    except (OSError, KeyError):
        return False


def ensure_history_file(versions: int = HISTORY_VERSIONS, path: Path = HISTORY_FILE) -> Path:
    """The N-version file, made once with versioned-hdf5 itself (about a minute)."""
    last = f"_version_data/versions/{version_name(versions - 1)}"
    if _valid(path, lambda f: last in f and f"_version_data/versions/{version_name(versions)}" not in f):
        return path
    from versioned_hdf5 import VersionedHDF5File

    DATA_DIR.mkdir(exist_ok=True)
    print(f"creating {path} ({versions} versions, once) ...", file=sys.stderr, flush=True)
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        vf = VersionedHDF5File(f)
        data = np.random.default_rng(0).standard_normal(HISTORY_ELEMENTS)
        with vf.stage_version(version_name(0), timestamp=version_time(0)) as g:
            g.create_dataset(HISTORY_DATASET, data=data, chunks=(HISTORY_CHUNK,))
        for i in range(1, versions):
            idx, values = history_change(i)
            with vf.stage_version(version_name(i), timestamp=version_time(i)) as g:
                g[HISTORY_DATASET][idx] = values
    os.replace(tmp, path)
    return path


def ensure_chunks_file(path: Path = CHUNKS_FILE) -> Path:
    """One version of a float64 dataset of CHUNKS_COUNT chunks (400 MiB), made once."""
    n = CHUNKS_COUNT * CHUNKS_CHUNK
    if _valid(path, lambda f: f[f"_version_data/versions/v1/{CHUNKS_DATASET}"].shape == (n,)):
        return path
    from versioned_hdf5 import VersionedHDF5File

    DATA_DIR.mkdir(exist_ok=True)
    print(f"creating {path} ({CHUNKS_COUNT} chunks, once) ...", file=sys.stderr, flush=True)
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        with VersionedHDF5File(f).stage_version("v1", timestamp=version_time(0)) as g:
            g.create_dataset(CHUNKS_DATASET, data=np.random.default_rng(3).standard_normal(n), chunks=(CHUNKS_CHUNK,))
    os.replace(tmp, path)
    return path


def s3_key(i: int) -> str:
    return f"d{i % S3_DIRS:02d}/k{i:06d}"


def fill_bucket(s3, bucket: str, keys: int = S3_KEYS, versions: int = S3_VERSIONS) -> list[str]:
    """``keys`` keys in S3_DIRS directories, each written ``versions`` times."""
    names = [s3_key(i) for i in range(keys)]
    with ThreadPoolExecutor(16) as pool:
        for v in range(versions):
            list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=f"{key} {v}".encode()), names))
    return names
