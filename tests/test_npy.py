"""The .npy and text forms, checked against numpy.save and by round trips."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import npy_bytes
from versionfs.backends import npy

DTYPES = [
    "i1", "u1", "<i2", ">i4", "<u8", "<f2", "<f4", ">f8", "<c8", "<c16", "?", "S7",
    np.dtype([("a", "<i4"), ("b", "<f8"), ("c", "S3")]),
    np.dtype({"names": ["x", "y"], "formats": ["<i2", "<f8"], "offsets": [0, 8], "itemsize": 24}),
    np.dtype([("nested", [("p", "<u2"), ("q", "<f4", (2,))])]),
    np.dtype([("ünïcode", "<i4")]),  # needs format 3.0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4, 5)])
def test_header_matches_numpy_save(dtype, shape):
    a = np.zeros(shape, dtype=dtype)
    full = npy_bytes(a)
    h = npy.header(np.dtype(dtype), shape)
    assert full[: len(h)] == h
    assert len(full) == len(h) + a.nbytes


def test_header_of_many_fields_uses_format_2():
    dtype = np.dtype([(f"field_{i:05d}", "<i4") for i in range(5000)])
    assert npy.header(dtype, (1,)) == npy_bytes(np.zeros((1,), dtype))[:-dtype.itemsize]


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    data=st.data(),
)
def test_flat_boxes_are_exactly_the_range(shape, data):
    n = math.prod(shape)
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    a = np.arange(n).reshape(shape)
    boxes = npy.flat_boxes(shape, start, stop)
    got = np.concatenate([a[b].ravel() for b in boxes]) if boxes else np.array([], dtype=int)
    assert got.tolist() == list(range(start, stop))
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    assert sum(npy.box_size(b) for b in boxes) == stop - start


@given(st.lists(st.binary()))
def test_text_round_trip(values):
    assert npy.text_values(npy.text_bytes(values)) == values


@given(st.lists(st.text()))
def test_text_lines_are_one_per_element(values):
    data = npy.text_bytes(values)
    assert data.count(b"\n") == len(values)
    assert [v.decode() for v in npy.text_values(data)] == values


def test_text_rules():
    assert npy.text_bytes(["a", "b\nc", "d\\n", "", "e\r"]) == b"a\nb\\nc\nd\\\\n\n\ne\\r\n"
    assert npy.text_values(b"x\ny") == [b"x", b"y"]  # no final newline is fine
    assert npy.text_values(b"a\\tb\n") == [b"a\\tb"]  # unknown escapes stay as they are
