"""How one array becomes one file: ``.npy`` bytes and the line-oriented text form.

Pure NumPy, no HDF5: the HDF5 backend decides *what* to read, this module decides
which elements a byte range needs and what the bytes are.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Iterable, Sequence

import numpy as np
from numpy.lib import _format_impl as npformat  # numpy.save's own header writer

Box = tuple[slice, ...]


def header(dtype: np.dtype, shape: Sequence[int]) -> bytes:
    """The exact header ``numpy.save`` writes for an array of this dtype and shape."""
    with warnings.catch_warnings():
        # Enum dtypes carry h5py metadata that .npy cannot store; numpy warns and
        # drops it, which is the documented rule (enums are their base integer).
        warnings.simplefilter("ignore", UserWarning)
        descr = npformat.dtype_to_descr(np.dtype(dtype))
    buf = io.BytesIO()
    fields = {"descr": descr, "fortran_order": False, "shape": tuple(int(n) for n in shape)}
    # version=None picks 1.0, 2.0 or 3.0 exactly as numpy.save does (numpy is
    # pinned, and a test compares every header with numpy.save's).
    npformat._write_array_header(buf, fields, None)
    return buf.getvalue()


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """Hyperslabs that together are elements [start, stop) of ``shape`` in C order.

    At most 2*ndim-1 boxes, listed in C order, so reading them one after another
    yields the flat range and touches only the chunks that overlap it.
    """
    shape = tuple(shape)
    if start >= stop:
        return []
    if not shape:
        return [()]
    inner = math.prod(shape[1:])
    r0, o0 = divmod(start, inner)
    r1, o1 = divmod(stop, inner)
    row = lambda r: slice(r, r + 1)  # noqa: E731
    if r0 == r1:
        return [(row(r0),) + b for b in flat_boxes(shape[1:], o0, o1)]
    boxes: list[Box] = []
    if o0:
        boxes += [(row(r0),) + b for b in flat_boxes(shape[1:], o0, inner)]
        r0 += 1
    if r1 > r0:
        boxes.append((slice(r0, r1),) + tuple(slice(0, n) for n in shape[1:]))
    if o1:
        boxes += [(row(r1),) + b for b in flat_boxes(shape[1:], 0, o1)]
    return boxes


def box_size(box: Box) -> int:
    return math.prod(s.stop - s.start for s in box)


# Line-oriented text for variable-length strings and bytes: one element per line,
# in C order, each followed by "\n". Only what would break the line structure is
# escaped: backslash, newline and carriage return.
_ESCAPES = {b"\\": b"\\\\", b"\n": b"\\n", b"\r": b"\\r"}
_UNESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}


def escape_line(value: bytes) -> bytes:
    if b"\\" in value or b"\n" in value or b"\r" in value:
        for raw, esc in _ESCAPES.items():
            value = value.replace(raw, esc)
    return value


def unescape_line(line: bytes) -> bytes:
    """Inverse of escape_line; a backslash before any other byte is kept as is."""
    if b"\\" not in line:
        return line
    out = bytearray()
    i = 0
    while i < len(line):
        c = line[i : i + 1]
        nxt = line[i + 1 : i + 2]
        if c == b"\\" and nxt in _UNESCAPES:
            out += _UNESCAPES[nxt]
            i += 2
        else:
            out += c
            i += 1
    return bytes(out)


def text_bytes(values: Iterable[bytes | str]) -> bytes:
    """The text file for a sequence of elements (str is written as UTF-8)."""
    lines = (
        escape_line(v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v))
        for v in values
    )
    return b"".join(line + b"\n" for line in lines)


def text_values(data: bytes) -> list[bytes]:
    """The elements of a text file; a missing final newline is tolerated."""
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [unescape_line(line) for line in lines]
