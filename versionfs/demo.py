"""``versionfs demo``: a small, realistic versioned HDF5 file to explore."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys

import h5py
import numpy as np

UTC = dt.timezone.utc
STATIONS = ["Zürich", "Genève", "Basel", "Lugano"]


def make_demo_file(path: str) -> None:
    """Three versions of a weather-station archive, a month apart."""
    from versioned_hdf5 import VersionedHDF5File

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


def demo_paths(directory: str) -> tuple[str, str]:
    directory = os.path.abspath(directory)
    return os.path.join(directory, "weather.h5"), os.path.join(directory, "mnt")


def command_name() -> str:
    """``versionfs`` if that is on PATH, else the full path of this one."""
    here = os.path.join(os.path.dirname(sys.executable), "versionfs")
    if os.path.exists(here) and shutil.which("versionfs") != here:
        return here
    return "versionfs"


def instructions(source: str, mnt: str) -> str:
    versionfs = command_name()
    return f"""\
versionfs demo: {source} is mounted on {mnt}

Browse:   ls {mnt}/versions/ ; ls -R {mnt}/latest/ ; cat {mnt}/latest/.attrs.json
          python3 -c "import numpy; print(numpy.load('{mnt}/latest/daily/temperature.npy')[:5])"
Diff:     diff -r {mnt}/versions/2024-02 {mnt}/versions/2024-02-fix
By time:  ls "{mnt}/@2024-03-02/daily"   (the version current on 2 March 2024)
History:  ls -l {mnt}/history/daily/temperature.npy/ {mnt}/history/daily/rain_mm.npy/
As HDF5:  h5ls -r {mnt}/latest.h5 ; h5diff {mnt}/versions/2024-02.h5 {mnt}/versions/2024-02-fix.h5
Change:   cp {mnt}/latest/stations/names.txt /tmp/names.txt && echo Bern >> /tmp/names.txt
          cp /tmp/names.txt {mnt}/staging/stations/names.txt && {versionfs} status {mnt}
Commit:   {versionfs} commit {mnt} -m "add Bern" && {versionfs} log {mnt}
Done:     {versionfs} umount {mnt}
"""
