"""``@<selector>`` through a real mount agrees with versioned-hdf5's own lookups."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os

import h5py
import numpy as np
import pytest
from versioned_hdf5 import VersionedHDF5File

from helpers import UTC, make_versions, version_dirs

US = dt.timedelta(microseconds=1)


def version_at(mnt, selector: str) -> str | None:
    try:
        return json.loads((mnt.path / f"@{selector}" / ".version.json").read_text())["name"]
    except FileNotFoundError:
        return None


def library_as_of(path, instant: dt.datetime) -> str | None:
    with h5py.File(path, "r") as f:
        try:
            return VersionedHDF5File(f).get_version_by_timestamp(instant).name.rsplit("/", 1)[1]
        except KeyError:
            return None


def iso(instant: dt.datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def many_versions(path, count: int, seed: int) -> tuple[list[str], list[dt.datetime]]:
    rng = np.random.default_rng(seed)
    # Gaps from one microsecond to days, so boundaries are tight and loose.
    gaps = rng.choice([1, 2, 999_999, 3_600_000_000, 86_400_000_000], size=count)
    start = dt.datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    times = [start + dt.timedelta(microseconds=int(g)) for g in np.cumsum(gaps)]
    names = [f"v{i:04d}" for i in range(count)]

    def step(i):
        def edit(g):
            if "x" not in g:
                g.create_dataset("x", data=np.zeros(4, dtype="i8"), chunks=(4,))
            g["x"][i % 4] = i
        return edit

    make_versions(path, *[step(i) for i in range(count)], names=names, timestamps=times)
    return names, times


@pytest.fixture(scope="module")
def small(tmp_path_factory, module_mount):
    path = tmp_path_factory.mktemp("sel") / "small.h5"
    names, times = many_versions(path, 30, seed=1)
    return path, names, times, module_mount(path)


@pytest.fixture(scope="module")
def thousand(tmp_path_factory, module_mount):
    path = tmp_path_factory.mktemp("sel") / "thousand.h5"
    names, times = many_versions(path, 1010, seed=2)
    return path, names, times, module_mount(path)


def test_every_boundary_agrees_with_the_library(small):
    path, names, times, mnt = small
    probes = [times[0] - US, times[0] - dt.timedelta(days=400)]
    for t in times:
        probes += [t - US, t, t + US]
    for instant in probes:
        expected = library_as_of(path, instant)
        assert version_at(mnt, iso(instant)) == expected, instant
    assert version_at(mnt, iso(times[0] - US)) is None  # before the first: ENOENT


def test_time_forms_at_the_root(small):
    _, names, times, mnt = small
    t = times[5]
    local = t.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert version_at(mnt, local.strftime("%Y-%m-%dT%H:%M:%S.%f+02:00")) == names[5]
    assert version_at(mnt, t.strftime("%Y-%m-%d %H:%M:%S.%f")) == names[5]
    day_after = (times[-1] + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    assert version_at(mnt, day_after) == names[-1]
    minute = (times[-1] + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    assert version_at(mnt, minute) == names[-1]
    assert version_at(mnt, "2024-01-15") is None  # midnight, before the first version


def test_positions(small):
    _, names, _, mnt = small
    assert version_at(mnt, "-1") == names[-1]
    assert version_at(mnt, "-2") == names[-2]
    assert version_at(mnt, "0") == names[0]  # __first_version__ is never counted
    assert version_at(mnt, "1") == names[1]
    assert version_at(mnt, str(len(names) - 1)) == names[-1]
    assert version_at(mnt, str(len(names))) is None
    assert version_at(mnt, f"-{len(names) + 1}") is None


@pytest.mark.parametrize("bad", ["", "latest", "--1", "+1", "1.5", "2024-13-01", "2024-01-15T25:00", "tomorrow", "id:x", "2024-01-15Z", "-"])
def test_anything_else_is_enoent(small, bad):
    mnt = small[3]
    with pytest.raises(OSError) as e:
        os.stat(mnt.path / f"@{bad}")
    assert e.value.errno == errno.ENOENT
    assert mnt.path.exists()  # the daemon is alive


def test_selectors_are_lookup_only(small):
    mnt = small[3]
    assert not [n for n in os.listdir(mnt.path) if n.startswith("@")]


def test_a_thousand_versions(thousand):
    path, names, times, mnt = thousand
    listed = version_dirs(mnt.path / "versions")
    assert listed == ["__first_version__", *names]
    assert version_at(mnt, "-1") == names[-1] and version_at(mnt, "0") == names[0]
    assert version_at(mnt, "500") == names[500]
    for i in range(0, len(names), 97):
        for instant in (times[i] - US, times[i], times[i] + US):
            assert version_at(mnt, iso(instant)) == library_as_of(path, instant), instant
    assert np.load(mnt.path / f"versions/{names[777]}/x.npy")[777 % 4] == 777
