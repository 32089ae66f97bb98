"""Building versioned HDF5 files with the versioned-hdf5 library itself."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from versioned_hdf5 import VersionedHDF5File

UTC = dt.timezone.utc


def make_versions(path: Path, *steps: Callable[[h5py.Group], None], names=None, timestamps=None) -> Path:
    """One version per step; each step edits the staged group in place."""
    with h5py.File(path, "a") as f:
        vf = VersionedHDF5File(f)
        for i, step in enumerate(steps):
            name = names[i] if names else f"v{i + 1}"
            ts = timestamps[i] if timestamps else None
            with vf.stage_version(name, timestamp=ts) as g:
                step(g)
    return path


def damaged_file(path: Path, chunk: int, damaged: int) -> Path:
    """A version with ``z`` (4 gzip chunks of ``chunk`` float64) and ``ok``, whose
    chunk number ``damaged`` of z has its stored bytes overwritten: the metadata
    stays readable, that chunk's data does not."""
    def step(g):
        g.create_dataset("z", data=np.arange(chunk * 4, dtype="f8"), chunks=(chunk,), compression="gzip")
        g.create_dataset("ok", data=np.arange(10))

    make_versions(path, step)
    with h5py.File(path, "r") as f:
        info = f["_version_data/z/raw_data"].id.get_chunk_info(damaged)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + 10)
        f.write(b"\xff" * (info.size - 20))
    return path


def version_dirs(versions: Path) -> list[str]:
    """``versions/`` as listed, without the ``<name>.h5`` images of HDF5 sources."""
    import os

    return [n for n in os.listdir(versions) if not n.endswith(".h5")]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def library_array(path: Path, version: str, name: str) -> np.ndarray:
    """What versioned-hdf5 returns for a dataset of a version."""
    with h5py.File(path, "r") as f:
        return VersionedHDF5File(f)[version][name][()]
