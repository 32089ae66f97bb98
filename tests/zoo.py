"""A versioned HDF5 file with every dtype and shape the mount must show."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import h5py
import numpy as np

from helpers import make_versions

UTC = dt.timezone.utc
COMPOUND = np.dtype([("a", "<i4"), ("b", "<f8"), ("c", "S3")])
ENUM = h5py.enum_dtype({"RED": 0, "GREEN": 1, "BLUE": 7}, basetype="i1")
LABELS = ["plain", "with\nnewline", "back\\slash", "ünïcødé ✓", "", "tab\there", "cr\r"]
TIMES = [dt.datetime(2024, 1, 15, 10, 30, tzinfo=UTC), dt.datetime(2024, 2, 1, 0, 0, 0, 1, tzinfo=UTC), dt.datetime(2024, 3, 1, 12, tzinfo=UTC)]


def v1(g: h5py.Group) -> None:
    rng = np.random.default_rng(1)
    ints = g.create_group("ints")
    for dt_ in ["i1", "u2", "<i4", ">i8", "u8"]:
        ints.create_dataset(dt_.strip("<>") + ("_be" if dt_.startswith(">") else ""), data=rng.integers(0, 100, 1000).astype(dt_), chunks=(64,))
    floats = g.create_group("floats")
    for dt_ in ["f2", "f4", "f8"]:
        floats.create_dataset(dt_, data=rng.standard_normal(777).astype(dt_), chunks=(100,))
    g.create_dataset("flags", data=rng.integers(0, 2, 300).astype(bool), chunks=(50,))
    g.create_dataset("c64", data=(rng.standard_normal(200) + 1j * rng.standard_normal(200)).astype("c8"), chunks=(32,))
    g.create_dataset("c128", data=rng.standard_normal(200) + 1j * rng.standard_normal(200), chunks=(32,))
    g.create_dataset("fixed_s", data=np.array([b"alpha", b"be\x00ta", b"", b"0123456789"], dtype="S10"))
    rec = np.zeros(50, dtype=COMPOUND)
    rec["a"], rec["b"], rec["c"] = np.arange(50), np.linspace(0, 1, 50), b"xyz"
    g.create_dataset("records", data=rec, chunks=(16,))
    g.create_dataset("colors", data=np.array([0, 1, 7, 7, 0], dtype="i1"), dtype=ENUM)
    g.create_dataset("cube", data=rng.standard_normal((20, 30, 40)).astype("f4"), chunks=(7, 11, 13))
    g.create_dataset("growing", data=np.arange(100, dtype="i8"), chunks=(32,), maxshape=(None,))
    sparse = g.create_dataset("sparse", shape=(5000,), dtype="i4", chunks=(1000,), fillvalue=-7)
    sparse[2100:2200] = 5
    g.create_group("a").create_group("b").create_group("c").create_dataset("deep", data=np.arange(10))
    g.create_dataset("empty", data=np.zeros((0,), dtype="f8"))
    g.create_dataset("empty2d", data=np.zeros((0, 5), dtype="i2"), chunks=(4, 5))
    g.create_dataset("doomed", data=np.arange(5))
    g.create_dataset("labels", data=np.array(LABELS, dtype=object), dtype=h5py.string_dtype())
    g.attrs["title"] = "zoo"
    g.attrs["count"] = np.int32(3)
    g.attrs["ratio"] = 0.25
    g["floats"].attrs["units"] = "m/s"
    g["cube"].attrs["axes"] = np.array(["t", "y", "x"], dtype=object)
    g["cube"].attrs["scale"] = np.array([1.5, 2.5])


def v2(g: h5py.Group) -> None:
    g["growing"].resize((250,))
    g["growing"][100:] = np.arange(100, 250) * 10
    g["cube"][3, 4, 5] = 99.0
    del g["doomed"]
    g["sparse"][4500] = 1


def v3(g: h5py.Group) -> None:
    g["ints/i1"][0] = -1
    g["labels"].resize((len(LABELS) + 1,))
    g["labels"][len(LABELS)] = "added"


def build(path: Path) -> Path:
    return make_versions(path, v1, v2, v3, timestamps=TIMES)


DATASETS_V1 = [
    "ints/i1", "ints/u2", "ints/i4", "ints/i8_be", "ints/u8", "floats/f2", "floats/f4", "floats/f8",
    "flags", "c64", "c128", "fixed_s", "records", "colors", "cube", "growing", "sparse", "a/b/c/deep",
    "empty", "empty2d", "doomed",
]
