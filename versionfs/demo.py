"""``versionfs demo``: a small, realistic versioned HDF5 file to explore."""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import sys
from typing import NamedTuple

import h5py
import numpy as np

UTC = dt.timezone.utc
STATIONS = ["Zürich", "Genève", "Basel", "Lugano"]


def make_demo_file(path: str, state: str) -> None:
    """Three versions of a weather-station archive, a month apart; a new file
    starts with an empty staging (its state directory is the demo's own)."""
    from versioned_hdf5 import VersionedHDF5File

    shutil.rmtree(state, ignore_errors=True)

    rng = np.random.default_rng(42)
    days = 31
    temps = np.round(rng.normal(4, 3, size=(days, len(STATIONS))), 1)
    with h5py.File(path, "w") as f:
        vf = VersionedHDF5File(f)
        with vf.stage_version("2024-01", timestamp=dt.datetime(2024, 2, 1, 6, 0, tzinfo=UTC)) as g:
            g.attrs["title"] = "Daily station readings"
            st = g.create_group("stations")
            st.create_dataset("names", data=np.array(STATIONS, dtype=object), dtype=h5py.string_dtype())
            st.create_dataset("elevation_m", data=np.array([408, 375, 260, 273], dtype="i4"))
            d = g.create_group("daily")
            d.create_dataset("temperature", data=temps, chunks=(16, len(STATIONS)))
            d["temperature"].attrs["units"] = "degC"
            d.create_dataset("rain_mm", data=np.round(rng.gamma(1, 2, size=(days, len(STATIONS))), 1), chunks=(16, len(STATIONS)))
        with vf.stage_version("2024-02", timestamp=dt.datetime(2024, 3, 1, 6, 0, tzinfo=UTC)) as g:
            more = np.round(rng.normal(6, 3, size=(29, len(STATIONS))), 1)
            t = g["daily/temperature"]
            t.resize((days + 29, len(STATIONS)))
            t[days:] = more
            r = g["daily/rain_mm"]
            r.resize((days + 29, len(STATIONS)))
            r[days:] = np.round(rng.gamma(1, 2, size=(29, len(STATIONS))), 1)
            g.attrs["title"] = "Daily station readings (Jan-Feb)"
        with vf.stage_version("2024-02-fix", timestamp=dt.datetime(2024, 3, 4, 9, 30, tzinfo=UTC)) as g:
            g["daily/temperature"][3, 1] = -2.5  # a corrected reading
            g["daily/temperature"].attrs["note"] = "Genève 4 Jan corrected"
            del g["daily/rain_mm"]
            g["daily"].create_dataset("sunshine_h", data=np.round(rng.uniform(0, 9, size=(60, len(STATIONS))), 1), chunks=(16, len(STATIONS)))


class DemoPaths(NamedTuple):
    """The demo's places: all inside one directory."""

    source: str  # the versioned HDF5 file
    mountpoint: str
    state: str  # the state directory


def demo_paths(directory: str) -> DemoPaths:
    directory = os.path.abspath(directory)
    return DemoPaths(*(os.path.join(directory, name) for name in ("weather.h5", "mnt", "state")))


def command_name() -> str:
    """``versionfs`` if that is on PATH, else the full path of this one."""
    here = os.path.join(os.path.dirname(sys.executable), "versionfs")
    if os.path.exists(here) and shutil.which("versionfs") != here:
        return shlex.quote(here)
    return "versionfs"


DIFFERS = ("diff", "h5diff")  # suggestions whose exit status 1 means "they differ", as it should


def suggestions(source: str, mnt: str) -> list[tuple[str, str]]:
    """(label, command) pairs: each runs as printed, from anywhere, with what this
    machine has (the venv's python, this versionfs), and writes only into the mount."""
    versionfs, python, m = command_name(), shlex.quote(sys.executable), shlex.quote(mnt)
    load = f"import numpy; print(numpy.load('{mnt}/latest/daily/temperature.npy')[:5])"
    return [
        ("Browse", f"ls {m}/versions/"),
        ("", f"ls -R {m}/latest/"),
        ("", f"cat {m}/latest/daily/.attrs.json"),
        ("", f"{python} -c {_python_text(load)}"),
        ("Diff", f"diff -r {m}/versions/2024-02 {m}/versions/2024-02-fix"),
        ("", f"{versionfs} diff {m} 2024-02 2024-02-fix --stat"),
        ("By time", f"ls {m}/@2024-03-02/daily"),
        ("", f"{versionfs} show {m} @2024-03-02"),
        ("History", f"ls -l {m}/history/daily/temperature.npy/"),
        ("", f"{versionfs} log {m}/latest/daily/temperature.npy"),
        ("As HDF5", f"h5ls -r {m}/latest.h5"),
        ("", f"h5diff {m}/versions/2024-02.h5 {m}/versions/2024-02-fix.h5"),
        ("Change", f"echo Bern >> {m}/staging/stations/names.txt"),
        ("", f"{versionfs} status {m}"),
        ("Commit", f'{versionfs} commit {m} -m "add Bern"'),
        ("", f"{versionfs} log {m}"),
        ("Done", f"{versionfs} umount {m}"),
    ]


def _python_text(code: str) -> str:
    """The code as one shell word, in double quotes where that is safe (easier to read)."""
    return f'"{code}"' if not re.search(r'["$`\\!]', code) else shlex.quote(code)


def instructions(source: str, mnt: str) -> str:
    lines = [f"versionfs demo: {source} is mounted on {mnt}", ""]
    lines += [f"{label + ':' if label else '':<10}{command}" for label, command in suggestions(source, mnt)]
    return "\n".join(lines) + "\n"
