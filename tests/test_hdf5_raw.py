"""The direct reader of HDF5 object headers (backends/hdf5_raw.py) against h5py:
same shapes, dtypes, attribute values and virtual mappings, and the same trees
whether a header is read directly or through h5py."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import zoo
from helpers import make_versions
from versionfs.backends import hdf5_raw
from versionfs.backends.hdf5 import HDF5Backend
from versionfs.backends.hdf5_image import virtual_mapping


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    return zoo.build(tmp_path_factory.mktemp("rawzoo") / "zoo.h5")


def v2_headers(g):
    """Objects with version-2 headers (libver latest) and dense attribute storage."""
    many = g.create_dataset("many_attrs", data=np.arange(10.0), chunks=(4,))
    for i in range(40):
        many.attrs[f"a{i:02d}"] = i
    g.create_dataset("plain", data=np.arange(7), chunks=(3,))
    g["plain"].attrs["long"] = "x" * 70000  # too big for the header: stored densely
    g.create_group("grp").attrs["note"] = "hi"


def objects_of(f: h5py.File):
    found = []
    f.visititems(lambda name, obj: found.append((name, obj)))
    return found


def test_headers_say_what_h5py_says(zoo_file):
    with h5py.File(zoo_file, "r") as f:
        raw = hdf5_raw.RawReader(str(zoo_file), f.id)
        checked_mappings = checked_attrs = 0
        for name, obj in objects_of(f):
            info = raw.object_info(h5py.h5o.get_info(f.id, name.encode()).addr)
            assert info is not None, name
            if isinstance(obj, h5py.Group):
                assert info.kind == "group", name
                continue
            assert info.kind == "dataset" and info.shape == obj.shape and info.dtype == obj.dtype, name
            for attr, message in (info.attrs or {}).items():
                value, expected = raw.attribute_value(message), obj.attrs[attr]
                assert type(value) is type(expected), (name, attr)
                assert np.asarray(value).dtype == np.asarray(expected).dtype, (name, attr)
                assert np.array_equal(np.asarray(value), np.asarray(expected)), (name, attr)
                checked_attrs += 1
            if obj.is_virtual and obj.ndim:
                mapping = hdf5_raw.decode_mapping(raw.mapping_block(info), obj.ndim)
                expected = virtual_mapping(obj)
                assert mapping is not None and len(mapping.vstart) == len(expected), name
                for i, (file, source, (v0, v1), (s0, _)) in enumerate(expected):
                    assert (file, source) == (".", mapping.source), name
                    assert tuple(mapping.vstart[i]) == tuple(v0) and tuple(mapping.sstart[i]) == tuple(s0), name
                    assert tuple(mapping.vstart[i] + mapping.count[i] - 1) == tuple(v1), name
                    checked_mappings += 1
        raw.close()
    assert checked_mappings > 100 and checked_attrs > 20


def test_dense_attributes_and_v2_headers_fall_back_to_h5py(tmp_path):
    path = tmp_path / "v2.h5"
    with h5py.File(path, "w", libver="latest") as f:
        v2_headers(f)
    with h5py.File(path, "r") as f:
        raw = hdf5_raw.RawReader(str(path), f.id)
        many = raw.object_info(h5py.h5o.get_info(f.id, b"many_attrs").addr)
        assert many.kind == "dataset" and many.shape == (10,) and many.attrs is None  # dense: ask h5py
        grp = raw.object_info(h5py.h5o.get_info(f.id, b"grp").addr)
        assert grp.kind == "group" and raw.attribute_value(grp.attrs["note"]) == "hi"
        raw.close()


def trees_equal(a, b, path=""):
    assert sorted(a.children) == sorted(b.children), path
    for name, entry in a.children.items():
        other = b.children[name]
        assert type(entry) is type(other), f"{path}/{name}"
        if hasattr(entry, "children"):
            trees_equal(entry, other, f"{path}/{name}")
        else:
            assert (entry.size, entry.mtime_ns, entry.content, entry.ref, entry.layout) == (
                other.size, other.mtime_ns, other.content, other.ref, other.layout), f"{path}/{name}"


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_trees_are_the_same_read_directly_or_through_h5py(zoo_file, version, monkeypatch):
    direct = HDF5Backend(str(zoo_file))
    fallback = HDF5Backend(str(zoo_file))
    try:
        monkeypatch.setattr(fallback.raw, "object_info", lambda addr: None)  # every header through h5py
        a, b = direct.tree(version), fallback.tree(version)
        trees_equal(a, b)
        assert direct.counters["objects opened"] == 0  # no virtual dataset was opened
        assert fallback.counters["objects opened"] > 0
        assert direct.history("cube.npy") == fallback.history("cube.npy")
        for path in ["growing.npy", "labels.txt", "floats/.attrs.json", ".attrs.json", "floats", ""]:
            ha, hb = direct.history(path), fallback.history(path)
            assert ha.children == hb.children, path
            assert [r.version_id for r in ha.revisions] == [r.version_id for r in hb.revisions], path
    finally:
        direct.close()
        fallback.close()


def test_listings_of_a_version_with_v2_headers(tmp_path):
    path = make_versions(tmp_path / "lat.h5", v2_headers)
    backend = HDF5Backend(str(path))
    try:
        entries = backend.listdir("v1", "", None)
        assert {"many_attrs.npy", "plain.npy", "grp", ".attrs.json", ".version.json"} <= set(entries)
        attrs = backend.read(entries[".attrs.json"].ref, 0, 1 << 20) if entries[".attrs.json"].content is None else entries[".attrs.json"].content
        assert b'"a39": 39' in attrs and b'"long"' in attrs
        assert backend.listdir("v1", "grp", entries["grp"].ref) == {".attrs.json": backend.tree("v1").children["grp"].children[".attrs.json"]}
    finally:
        backend.close()
