"""X.h5 beside every tree: each version as one self-contained plain HDF5 file,
checked through real mounts with h5py, h5dump, h5ls, h5diff, cmp and ls -l
against what the versioned-hdf5 library returns."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from versioned_hdf5 import VersionedHDF5File

import zoo
from conftest import run_versionfs
from helpers import damaged_file, library_array, make_versions
from versionfs.backends import hdf5_image
from versionfs.backends.hdf5_format import INTERNAL_ATTRS

VERSIONS = ["v1", "v2", "v3"]


def packed(g):
    rng = np.random.default_rng(0)
    g.create_dataset("gzip", data=np.arange(100_000, dtype="f8").reshape(1000, 100), chunks=(64, 30),
                     compression="gzip", compression_opts=4, shuffle=True)
    g.create_dataset("checksummed", data=np.arange(1000, dtype="i4"), chunks=(100,), fletcher32=True)
    g.create_dataset("lzf", data=rng.integers(0, 5, (300, 7)), chunks=(50, 7), compression="lzf")
    g.create_dataset("big", data=rng.standard_normal((2000, 1000)), chunks=(256, 1000))
    g["gzip"].attrs["note"] = "compressed"


def packed2(g):
    g["gzip"][5, 5] = -1
    g["lzf"].resize((310, 7))


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    return zoo.build(tmp_path_factory.mktemp("zoo") / "zoo.h5")


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    return make_versions(tmp_path_factory.mktemp("packed") / "packed.h5", packed, packed2)


@pytest.fixture(scope="module")
def zmnt(zoo_file, module_mount):
    return module_mount(zoo_file)


@pytest.fixture(scope="module")
def pmnt(packed_file, module_mount):
    return module_mount(packed_file)


def objects(f: h5py.Group) -> dict[str, h5py.HLObject]:
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj))
    return found


def same_attrs(a: h5py.HLObject, b: h5py.HLObject) -> None:
    wanted = {k: v for k, v in a.attrs.items() if k not in INTERNAL_ATTRS}
    got = dict(b.attrs.items())
    assert sorted(wanted) == sorted(got), a.name
    for k, v in wanted.items():
        assert np.array_equal(np.asarray(v), np.asarray(got[k])), (a.name, k)
        assert b.attrs.get_id(k).dtype == a.attrs.get_id(k).dtype, (a.name, k)


def check_image(source: Path, version: str, image: Path) -> None:
    """The image holds exactly the version: same objects, data, dtypes, chunking,
    filters and attributes, and nothing of the versioning format."""
    size = os.stat(image).st_size  # before any read
    data = image.read_bytes()
    assert len(data) == size
    with h5py.File(source, "r") as f, h5py.File(image, "r") as img:
        group = f[f"_version_data/versions/{version}"]
        lib = VersionedHDF5File(f)[version]
        wanted, got = objects(group), objects(img)
        assert sorted(wanted) == sorted(got)
        assert not any(name.startswith("_version_data") for name in got)
        same_attrs(group, img)
        for name, obj in wanted.items():
            out = got[name]
            same_attrs(obj, out)
            if isinstance(obj, h5py.Group):
                assert isinstance(out, h5py.Group)
                continue
            expected = lib[name][()]
            assert out.dtype == obj.dtype and out.shape == obj.shape, name
            if expected.dtype.kind == "O":
                assert list(out.asstr()[()] if out.ndim else [out.asstr()[()]]) == [
                    x.decode() if isinstance(x, bytes) else x for x in (expected if out.ndim else [expected])]
            else:
                np.testing.assert_array_equal(out[()], expected, err_msg=name)
            if out.ndim:
                raw = f[f"_version_data/{name}/raw_data"]
                assert (out.chunks, out.compression, out.compression_opts, out.shuffle, out.fletcher32) == (
                    raw.chunks, raw.compression, raw.compression_opts, raw.shuffle, raw.fletcher32), name
            if out.dtype.kind in "biuf":
                assert out.fillvalue == obj.fillvalue, name


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_of_the_zoo_is_a_plain_file(zoo_file, zmnt, version):
    check_image(zoo_file, version, zmnt.path / "versions" / f"{version}.h5")


def test_compressed_and_checksummed_chunks_are_served_as_stored(packed_file, pmnt):
    for version in ["v1", "v2"]:
        check_image(packed_file, version, pmnt.path / "versions" / f"{version}.h5")
    header = subprocess.run(["h5dump", "-p", "-H", str(pmnt.path / "latest.h5")], capture_output=True, text=True)
    assert header.returncode == 0
    assert "COMPRESSION DEFLATE { LEVEL 4 }" in header.stdout and "PREPROCESSING SHUFFLE" in header.stdout
    assert "CHECKSUM FLETCHER32" in header.stdout and "CHUNKED ( 64, 30 )" in header.stdout


def test_h5dump_h5ls_and_h5diff(zmnt):
    versions = zmnt.path / "versions"
    dump = subprocess.run(["h5dump", str(versions / "v3.h5")], capture_output=True, text=True)
    assert dump.returncode == 0 and '"added"' in dump.stdout and "_version_data" not in dump.stdout
    listing = subprocess.run(["h5ls", "-r", str(versions / "v1.h5")], capture_output=True, text=True, check=True).stdout
    names = {line.split()[0] for line in listing.splitlines()}
    assert {"/cube", "/a/b/c/deep", "/doomed", "/labels", "/records"} <= names
    same = subprocess.run(["h5diff", str(zmnt.path / "latest.h5"), str(versions / "v3.h5")], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout
    diff = subprocess.run(["h5diff", "-r", str(versions / "v2.h5"), str(versions / "v3.h5")], capture_output=True, text=True)
    assert diff.returncode == 1
    found: dict[str, str] = {}
    current = None
    for line in diff.stdout.splitlines():
        if line.startswith("dataset: <"):
            current = line.split("<")[1].split(">")[0]
        elif "differences found" in line and current:
            found[current] = line.split()[0]
    assert found["/ints/i1"] == "1" and found["/cube"] == "0" and found["/growing"] == "0"


def test_selectors_latest_and_listing(zmnt):
    root = zmnt.path
    assert subprocess.run(["cmp", str(root / "latest.h5"), str(root / "versions/v3.h5")]).returncode == 0
    assert subprocess.run(["cmp", str(root / "@0.h5"), str(root / "versions/v1.h5")]).returncode == 0
    assert subprocess.run(["cmp", str(root / "@2024-02-15.h5"), str(root / "versions/v2.h5")]).returncode == 0
    assert subprocess.run(["cmp", str(root / "@id:v2.h5"), str(root / "versions/v2.h5")]).returncode == 0
    for bad in ["@2000-01-01.h5", "@9.h5", "@nope.h5", ".h5", "versions/nope.h5", "latest.h5x"]:
        assert not (root / bad).exists(), bad
    assert "latest.h5" in os.listdir(root) and "@-1.h5" not in os.listdir(root)
    assert [n for n in os.listdir(root / "versions") if n.endswith(".h5")] == [
        "__first_version__.h5", "v1.h5", "v2.h5", "v3.h5"]
    listing = subprocess.run(["ls", "-l", str(root / "versions")], capture_output=True, text=True, check=True).stdout
    for version in VERSIONS:
        line = next(line for line in listing.splitlines() if line.endswith(f" {version}.h5"))
        assert line.startswith("-rw-r--r--") and int(line.split()[4]) == os.stat(root / f"versions/{version}.h5").st_size
    with pytest.raises(OSError) as e:
        open(root / "latest.h5", "r+b")
    assert e.value.errno == errno.EROFS


def test_two_builds_are_byte_identical(zoo_file, zmnt, mount):
    first = {v: (zmnt.path / f"versions/{v}.h5").read_bytes() for v in VERSIONS}
    time.sleep(1.1)  # HDF5 keeps times in seconds: a build that stored one would differ
    again = mount(zoo_file)  # another daemon builds it afresh
    for version in VERSIONS:
        assert first[version] == (again.path / f"versions/{version}.h5").read_bytes()


def test_only_metadata_is_built_up_front(packed_file):
    with h5py.File(packed_file, "r") as f:
        image = hdf5_image.build(f, "_version_data/versions/v1", INTERNAL_ATTRS)
    kept = sum(len(page) for page in image.pages.values())
    assert image.size > 16_000_000 and kept < 200_000  # 16 MB of chunks, not copied
    assert image.regions.lengths.sum() > 16_000_000


def test_a_plain_copy_made_with_h5py_has_no_differences(zoo_file, zmnt, tmp_path):
    copy = tmp_path / "copy.h5"
    with h5py.File(zoo_file, "r") as f, h5py.File(copy, "w") as out:
        version = VersionedHDF5File(f)["v2"]
        for name, obj in objects(f["_version_data/versions/v2"]).items():
            if isinstance(obj, h5py.Dataset):
                out.create_dataset(name, data=version[name][()], dtype=obj.dtype)
            else:
                out.require_group(name)
            for key, value in obj.attrs.items():
                if key not in INTERNAL_ATTRS:
                    out[name].attrs[key] = value
    # h5diff calls any two empty datasets "not comparable": those are left out.
    result = subprocess.run(["h5diff", "--exclude-path", "/empty", "--exclude-path", "/empty2d",
                             str(zmnt.path / "versions/v2.h5"), str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_images_follow_commits(tmp_path, mount):
    path = make_versions(tmp_path / "c.h5", packed)
    m = mount(path)
    before = (m.path / "versions/v1.h5").read_bytes()
    np.save(m.path / "staging/checksummed.npy", np.arange(1000, dtype="i4") * 3)
    assert run_versionfs("commit", str(m.path), "-n", "v2").returncode == 0
    with h5py.File(m.path / "latest.h5", "r") as img:
        assert img["checksummed"][()].tolist() == (np.arange(1000) * 3).tolist()
        assert img["checksummed"].fletcher32
    assert (m.path / "versions/v1.h5").read_bytes() == before
    check_image(path, "v2", m.path / "versions/v2.h5")


def test_s3_sources_have_no_images(moto_endpoint, mount):
    from s3servers import make_client, make_versioned_bucket

    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="a", Body=b"a")
    m = mount(f"s3://{bucket}", "--endpoint-url", moto_endpoint)
    assert not (m.path / "latest.h5").exists() and "latest.h5" not in os.listdir(m.path)
    assert not any(n.endswith(".h5") for n in os.listdir(m.path / "versions"))


def test_a_listing_builds_no_image_and_reads_never_stop_short(zoo_file, mount):
    m = mount(zoo_file)
    names = os.listdir(m.path / "versions")  # readdirplus: attributes of every entry
    os.listdir(m.path)
    assert "v2.h5" in names and "built the .h5 image" not in m.log
    # Read without any stat first: the size the listing left open must not cut the read short.
    fd = os.open(m.path / "versions/v2.h5", os.O_RDONLY)
    try:
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    finally:
        os.close(fd)
    assert len(data) == os.stat(m.path / "versions/v2.h5").st_size > 0
    assert m.log.count("built the .h5 image of version v2") == 1


def test_what_a_plain_file_cannot_hold_is_left_out_and_logged_once(tmp_path, mount):
    def step(g):
        g.create_dataset("ok", data=np.arange(10), chunks=(4,))
        g["ok"].attrs["kept"] = 1

    path = make_versions(tmp_path / "odd.h5", step)
    with h5py.File(path, "a") as f:  # objects versioned-hdf5 itself would not write
        group = f["_version_data/versions/v1"]
        ragged = group.create_dataset("ragged", shape=(2,), dtype=h5py.vlen_dtype(np.dtype("i4")))
        ragged[0], ragged[1] = np.arange(2), np.arange(3)
        group["alias"] = h5py.SoftLink("/_version_data/versions/v1/ok")
        group["ok"].attrs["where"] = f["_version_data/versions/v1/ok"].ref
    m = mount(path)
    with h5py.File(m.path / "latest.h5", "r") as img:
        assert list(img) == ["ok"] and img["ok"][()].tolist() == list(range(10))
        assert dict(img["ok"].attrs) == {"kept": 1}
    assert (m.path / "versions/v1.h5").read_bytes() == (m.path / "latest.h5").read_bytes()
    log = m.log
    for what in ["ragged", "alias", "ok attribute where"]:
        assert log.count(f"{what} is left out of the plain .h5 image") == 1, log


def test_a_damaged_chunk_fails_only_its_reads(tmp_path, mount):
    m = mount(damaged_file(tmp_path / "damaged.h5", chunk=2**16, damaged=2))
    image = (m.path / "latest.h5").read_bytes()  # the stored bytes, damage included, are served as they are
    assert len(image) == os.stat(m.path / "latest.h5").st_size
    with h5py.File(m.path / "latest.h5", "r") as img:
        assert img["ok"][()].tolist() == list(range(10))
        assert img["z"][: 2**16].tolist() == list(range(2**16))
        with pytest.raises(OSError):
            img["z"][2 * 2**16 : 2 * 2**16 + 1]
    assert subprocess.run(["h5dump", "-d", "/z", str(m.path / "latest.h5")], capture_output=True).returncode != 0
    assert subprocess.run(["h5dump", "-H", str(m.path / "latest.h5")], capture_output=True).returncode == 0


def test_xarray_and_pandas_read_it(zoo_file, zmnt):
    import xarray as xr

    image = zmnt.path / "versions/v2.h5"
    with xr.open_dataset(image, engine="h5netcdf", phony_dims="sort") as top:
        np.testing.assert_array_equal(top["cube"].values, library_array(zoo_file, "v2", "cube"))
        assert top["cube"].attrs["scale"].tolist() == [1.5, 2.5]
        np.testing.assert_array_equal(top["sparse"].values, library_array(zoo_file, "v2", "sparse"))
    with xr.open_dataset(image, engine="h5netcdf", phony_dims="sort", group="floats") as floats:
        assert floats.attrs["units"] == "m/s"
        table = floats.to_dataframe()  # pandas
        assert list(table.columns) == ["f2", "f4", "f8"] and len(table) == 777
        np.testing.assert_array_equal(table["f8"].to_numpy(), library_array(zoo_file, "v2", "floats/f8"))


@pytest.mark.parametrize("source_start", [4, 2])  # chunk-aligned: chunks served from the source; not: data copied
def test_mappings_of_several_chunks_or_off_the_chunk_grid(tmp_path, source_start):
    path = tmp_path / "hand.h5"
    with h5py.File(path, "w") as f:
        raw = f.create_dataset("_version_data/x/raw_data", data=np.arange(16, dtype="i8"), chunks=(4,), maxshape=(None,))
        layout = h5py.VirtualLayout(shape=(8,), dtype="i8")
        layout[0:8] = h5py.VirtualSource(".", raw.name, shape=(16,))[source_start : source_start + 8]
        f.create_group("_version_data/versions/v1").create_virtual_dataset("x", layout, fillvalue=-1)
    with h5py.File(path, "r") as f:
        image = hdf5_image.build(f, "_version_data/versions/v1", INTERNAL_ATTRS)
    assert len(image.regions) == (2 if source_start % 4 == 0 else 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        (tmp_path / "image.h5").write_bytes(image.read(fd, 0, image.size))
    finally:
        os.close(fd)
    with h5py.File(tmp_path / "image.h5", "r") as img:
        assert img["x"][()].tolist() == list(range(source_start, source_start + 8)) and img["x"].chunks == (4,)


def test_image_names_that_collide_or_are_too_long(tmp_path, mount):
    def step(g):
        g.create_dataset("x", data=np.arange(3))

    long_name = "v" * 253
    path = make_versions(tmp_path / "names.h5", step, step, step, names=["x", "x.h5", long_name])
    m = mount(path)
    versions = os.listdir(m.path / "versions")
    assert versions == ["__first_version__", "__first_version__.h5", "x", "x.h5", "x.h5.h5", long_name]
    assert os.path.isdir(m.path / "versions/x.h5")  # the version keeps its name
    assert os.path.isdir(m.path / "@id:x.h5") and os.path.isfile(m.path / "@id:x.h5.h5")
    with h5py.File(m.path / "@0.h5", "r") as img:  # x's image, by position
        assert img["x"][()].tolist() == [0, 1, 2]
    assert os.path.isfile(m.path / "@-1.h5")  # the long name's image, by position
    os.listdir(m.path / "versions")
    log = m.log
    assert log.count("versions/x.h5 is not shown") == 1 and log.count(f"versions/{long_name}.h5 is not shown") == 1


def test_built_images_are_kept_across_mounts(packed_file, tmp_path, mount):
    cache = tmp_path / "cache"
    first = mount(packed_file, "--cache-dir", str(cache))
    data = (first.path / "versions/v1.h5").read_bytes()
    assert "built the .h5 image of version v1" in first.log
    second = mount(packed_file, "--cache-dir", str(cache))  # another daemon, the same cache
    assert (second.path / "versions/v1.h5").read_bytes() == data
    assert "built the .h5 image" not in second.log


def test_a_cached_image_is_only_used_for_the_same_file(tmp_path):
    from versionfs.backends.hdf5 import HDF5Backend
    from versionfs.cache import DiskCache

    path = make_versions(tmp_path / "c.h5", packed)
    cache = DiskCache(str(tmp_path / "cache"), 1 << 30)

    def image_bytes() -> tuple[bytes, bool]:
        backend = HDF5Backend(str(path), cache)
        try:
            built = backend._stored_image("v1") is None
            ref = backend.image("v1").ref
            return bytes(backend.read(ref, 0, backend.file_size(ref))), built
        finally:
            backend.close()

    data, built = image_bytes()
    assert built and image_bytes() == (data, False)  # kept
    os.utime(path, ns=(1, 1))  # the file changed (here only its mtime): never trust the old offsets
    assert image_bytes() == (data, True)
    for name in os.listdir(tmp_path / "cache"):  # a damaged cache entry is built again
        with open(tmp_path / "cache" / name, "r+b") as f:
            f.truncate(100)
    assert image_bytes() == (data, True)


def test_an_image_missing_something_by_error_is_not_kept_and_no_cache_is_no_failure(tmp_path, mount):
    def step(g):
        g.create_dataset("ok", data=np.arange(3))

    path = make_versions(tmp_path / "ext.h5", step)
    with h5py.File(path, "a") as f:  # data in an external file that is not there: every read of it fails
        f["_version_data/versions/v1"].create_dataset("gone", shape=(4,), dtype="i4", external=[(str(tmp_path / "nowhere.bin"), 0, 16)])
    cache = tmp_path / "cache"
    m = mount(path, "--cache-dir", str(cache))
    with h5py.File(m.path / "latest.h5", "r") as img:
        assert list(img) == ["ok"]
    assert "gone is left out of the plain .h5 image: cannot be copied" in m.log
    assert [f for _, _, files in os.walk(cache) for f in files] == []  # built again next time, not kept
    (tmp_path / "a-file").write_text("")
    unusable = mount(path, "--cache-dir", str(tmp_path / "a-file" / "cache"))  # cannot be made: no cache, still a mount
    assert (unusable.path / "latest/ok.npy").exists() and "no cache:" in unusable.log
