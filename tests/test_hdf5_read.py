"""Reading versions through a real mount, compared byte for byte with what the
versioned-hdf5 library returns."""

from __future__ import annotations

import json
import os
import random
import subprocess

import h5py
import numpy as np
import pytest

import zoo
from helpers import library_array, make_versions, npy_bytes

VERSIONS = ["v1", "v2", "v3"]


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    return zoo.build(tmp_path_factory.mktemp("zoo") / "zoo.h5")


@pytest.fixture(scope="module")
def zmnt(zoo_file, module_mount):
    return module_mount(zoo_file)


def datasets_of(path, version):
    with h5py.File(path, "r") as f:
        names = []
        f[f"_version_data/versions/{version}"].visititems(
            lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.dtype.kind != "O" else None
        )
        return names


@pytest.mark.parametrize("version", VERSIONS)
def test_every_dataset_is_numpy_save_of_the_library_array(zoo_file, zmnt, version):
    names = datasets_of(zoo_file, version)
    assert len(names) >= 19
    for name in names:
        expected = library_array(zoo_file, version, name)
        path = zmnt.path / "versions" / version / f"{name}.npy"
        data = path.read_bytes()
        assert data == npy_bytes(expected), name
        assert os.stat(path).st_size == len(data)
        loaded = np.load(path)
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        np.testing.assert_array_equal(loaded, expected)


def test_dtypes_and_shapes(zmnt):
    latest = zmnt.path / "latest"
    assert np.load(latest / "records.npy").dtype == zoo.COMPOUND
    assert np.load(latest / "colors.npy").tolist() == [0, 1, 7, 7, 0]  # enums: base integers
    assert np.load(latest / "ints/i8_be.npy").dtype == np.dtype(">i8")
    assert np.load(latest / "fixed_s.npy").tolist() == [b"alpha", b"be\x00ta", b"", b"0123456789"]
    assert np.load(latest / "cube.npy").shape == (20, 30, 40)
    assert np.load(latest / "empty2d.npy").shape == (0, 5)
    sparse = np.load(latest / "sparse.npy")
    assert (sparse[:2100] == -7).all() and (sparse[2100:2200] == 5).all() and sparse[4500] == 1
    assert np.load(latest / "growing.npy").shape == (250,)
    assert np.load(zmnt.path / "versions/v1/growing.npy").shape == (100,)


def test_random_byte_ranges(zoo_file, zmnt):
    rng = random.Random(7)
    for name in ["cube", "sparse", "records", "growing", "c64", "fixed_s", "empty"]:
        expected = npy_bytes(library_array(zoo_file, "v2", name))
        size = len(expected)
        fd = os.open(zmnt.path / "versions/v2" / f"{name}.npy", os.O_RDONLY)
        try:
            probes = [(0, 1), (size - 1, 1), (0, size), (size, 10), (size + 100, 10), (5, 0), (size - 3, 100)]
            probes += [(rng.randrange(size + 1), rng.randrange(1, 70000)) for _ in range(150)]
            for off, n in probes:
                assert os.pread(fd, n, off) == expected[off : off + n], (name, off, n)
        finally:
            os.close(fd)


def test_ranges_across_chunk_boundaries(zoo_file, zmnt):
    # cube: chunks (7, 11, 13) of float32 after a 128-byte header
    expected = npy_bytes(library_array(zoo_file, "v3", "cube"))
    with open(zmnt.path / "latest/cube.npy", "rb") as f:
        for element in [13 * 1 - 1, 40 - 1, 11 * 40 - 2, 7 * 30 * 40 - 1, 7 * 30 * 40 * 2 + 5]:
            off = 128 + element * 4 - 3
            f.seek(off)
            assert f.read(11) == expected[off : off + 11]


def test_text_dataset(zoo_file, zmnt):
    expected = b"plain\nwith\\nnewline\nback\\\\slash\n" + "ünïcødé ✓\n".encode() + b"\ntab\there\ncr\\r\n"
    assert (zmnt.path / "versions/v1/labels.txt").read_bytes() == expected
    assert (zmnt.path / "latest/labels.txt").read_bytes() == expected + b"added\n"
    assert os.stat(zmnt.path / "latest/labels.txt").st_size == len(expected) + 6


def test_attributes_and_version_json(zmnt):
    root_attrs = json.loads((zmnt.path / "versions/v1/.attrs.json").read_text())
    assert root_attrs["."] == {"title": "zoo", "count": {"dtype": "<i4", "value": 3}, "ratio": 0.25}
    assert root_attrs["cube.npy"] == {"axes": ["t", "y", "x"], "scale": [1.5, 2.5]}
    assert "chunks" not in json.dumps(root_attrs) and "raw_data" not in json.dumps(root_attrs)
    assert json.loads((zmnt.path / "versions/v1/floats/.attrs.json").read_text()) == {".": {"units": "m/s"}}
    assert not (zmnt.path / "versions/v1/ints/.attrs.json").exists()
    text = (zmnt.path / "versions/v1/.attrs.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    meta = json.loads((zmnt.path / "versions/v2/.version.json").read_text())
    assert meta == {"name": "v2", "timestamp": "2024-02-01T00:00:00.000001Z", "previous": "v1", "attributes": {}}
    assert json.loads((zmnt.path / "latest/.version.json").read_text())["name"] == "v3"


def test_layout_listing_and_times(zmnt):
    assert os.listdir(zmnt.path) == ["latest", "latest.h5", "versions", "history", "staging"]
    assert os.listdir(zmnt.path / "versions") == [  # oldest first, each with its image
        "__first_version__", "__first_version__.h5", "v1", "v1.h5", "v2", "v2.h5", "v3", "v3.h5"]
    for version, when in zip(VERSIONS, zoo.TIMES):
        st = os.stat(zmnt.path / "versions" / version)
        assert st.st_mtime_ns == int(when.timestamp()) * 10**9 + when.microsecond * 1000
        assert os.stat(zmnt.path / "versions" / version / "cube.npy").st_mtime_ns == st.st_mtime_ns
    assert os.listdir(zmnt.path / "versions/__first_version__") == [".version.json"]
    assert "doomed.npy" in os.listdir(zmnt.path / "versions/v1")
    assert not (zmnt.path / "versions/v2/doomed.npy").exists()
    assert sorted(os.listdir(zmnt.path / "latest")) == sorted(os.listdir(zmnt.path / "versions/v3"))


def test_cat_cp_and_diff_see_the_library_data(zoo_file, zmnt, tmp_path):
    # The tree a user would make by hand with numpy.save from the library...
    expected = tmp_path / "expected"
    for name in datasets_of(zoo_file, "v2"):
        (expected / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(expected / f"{name}.npy", library_array(zoo_file, "v2", name))
    data_only = ["--exclude=.attrs.json", "--exclude=.version.json", "--exclude=*.txt"]
    result = subprocess.run(["diff", "-r", *data_only, str(expected), str(zmnt.path / "versions/v2")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    # ...and cp -r / cat of the mount give the same bytes.
    subprocess.run(["cp", "-r", str(zmnt.path / "versions/v2"), str(tmp_path / "copy")], check=True)
    assert subprocess.run(["diff", "-r", str(zmnt.path / "versions/v2"), str(tmp_path / "copy")]).returncode == 0
    cat = subprocess.run(["cat", str(zmnt.path / "versions/v2/cube.npy")], capture_output=True, check=True)
    assert cat.stdout == (expected / "cube.npy").read_bytes()
    # diff -r between two versions names exactly what changed.
    result = subprocess.run(["diff", "-rq", str(zmnt.path / "versions/v1"), str(zmnt.path / "versions/v2")], capture_output=True, text=True)
    assert result.returncode == 1
    changed = {line.split()[1].rsplit("/v1/", 1)[-1] if line.startswith("Files") else line for line in result.stdout.splitlines()}
    # root attributes are not carried forward by the library, so .attrs.json changes too
    assert changed == {".attrs.json", ".version.json", "cube.npy", "growing.npy", "sparse.npy", f"Only in {zmnt.path / 'versions/v1'}: doomed.npy"}


def test_a_read_touches_only_the_chunks_it_overlaps(tmp_path, mount):
    # A 1 TiB dataset with one written chunk: any read that is not partial
    # would never finish (or would exhaust memory).
    def step(g):
        d = g.create_dataset("huge", shape=(2**40,), dtype="i1", chunks=(2**20,), fillvalue=3)
        d[2**39 : 2**39 + 10] = 9

    m = mount(make_versions(tmp_path / "huge.h5", step))
    path = m.path / "latest/huge.npy"
    header = len(npy_bytes(np.zeros(0, "i1")))
    assert os.stat(path).st_size == header + 2**40
    with open(path, "rb") as f:
        f.seek(header + 2**39 - 2)
        assert f.read(14) == bytes([3, 3] + [9] * 10 + [3, 3])
        f.seek(header + 2**40 - 4)
        assert f.read(100) == bytes([3] * 4)


def _filtered_file(path):
    """Datasets h5py users make: gzip, shuffle+gzip, lzf, fletcher32; 1-D and N-D;
    edge chunks; chunks never written (fill value)."""
    rng = np.random.default_rng(5)

    def step(g):
        g.create_dataset("gzip", data=rng.standard_normal(50_000), chunks=(4096,), compression="gzip")
        g.create_dataset("shuffle_gzip", data=rng.integers(0, 1000, 30_001).astype("<i4"), chunks=(1000,),
                         compression="gzip", compression_opts=6, shuffle=True)
        g.create_dataset("cube_gzip", data=rng.standard_normal((19, 23, 17)).astype(">f4"), chunks=(5, 7, 4),
                         compression="gzip", shuffle=True)
        g.create_dataset("rows_gzip", data=rng.integers(0, 9, (1001, 7)).astype("u2"), chunks=(64, 7), compression="gzip")
        sparse = g.create_dataset("sparse_gzip", shape=(20_000,), dtype="f8", chunks=(1000,), compression="gzip",
                                  fillvalue=2.5)
        sparse[5000:6500] = 1.0
        g.create_dataset("lzf", data=rng.standard_normal(9000), chunks=(1000,), compression="lzf")
        g.create_dataset("fletcher", data=np.arange(5000, dtype="i8"), chunks=(512,), fletcher32=True)

    def step2(g):
        g["gzip"][100:200] = -1.0  # a new version maps most chunks to the old raw chunks
        g["cube_gzip"][3, 4, 5] = 99.0

    return make_versions(path, step, step2)


def test_compressed_and_filtered_datasets_are_numpy_save(tmp_path, mount):
    path = _filtered_file(tmp_path / "filtered.h5")
    m = mount(path)
    rng = random.Random(11)
    for version in ("v1", "v2"):
        for name in ("gzip", "shuffle_gzip", "cube_gzip", "rows_gzip", "sparse_gzip", "lzf", "fletcher"):
            expected = npy_bytes(library_array(path, version, name))
            file = m.path / "versions" / version / f"{name}.npy"
            assert file.read_bytes() == expected, (version, name)
            fd = os.open(file, os.O_RDONLY)
            try:
                for _ in range(40):
                    off, n = rng.randrange(len(expected) + 1), rng.randrange(1, 40_000)
                    assert os.pread(fd, n, off) == expected[off : off + n], (version, name, off, n)
            finally:
                os.close(fd)


def test_reads_of_chunked_datasets_need_no_h5py(tmp_path):
    """Once a dataset's chunk index is known, its reads never wait for h5py (held
    here as a long h5py call, such as a commit or an image build, would hold it)."""
    import threading

    from versionfs.backends.base import find
    from versionfs.backends.hdf5 import HDF5Backend

    path = _filtered_file(tmp_path / "filtered.h5")
    backend = HDF5Backend(str(path))
    try:
        tree = backend.tree("v2")
        refs = {name: find(tree, f"{name}.npy").ref for name in ("gzip", "shuffle_gzip", "cube_gzip", "sparse_gzip")}
        expected = {name: npy_bytes(library_array(path, "v2", name)) for name in refs}
        for name, ref in refs.items():
            backend.read(ref, 500, 10)  # the first read of data makes the index
        held, release = threading.Event(), threading.Event()

        def long_h5py_call():
            with backend._lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=long_h5py_call)
        holder.start()
        held.wait()
        results = {}
        reader = threading.Thread(target=lambda: results.update(
            {name: bytes(backend.read(ref, 0, len(expected[name]))) for name, ref in refs.items()}))
        reader.start()
        reader.join(10)
        finished = not reader.is_alive()
        release.set()
        holder.join()
        reader.join()
        assert finished, "a read waited for h5py"
        assert results == expected
    finally:
        backend.close()
