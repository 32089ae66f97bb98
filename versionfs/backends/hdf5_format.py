"""The versioned-HDF5 format as versionfs shows it: names, internal attributes,
the kinds of file a dataset becomes, the attribute JSON codec and the refs that
name a dataset's file form. A leaf: the reader (``hdf5``), the writer
(``hdf5_write``) and the image builder import it, and it imports none of them.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

VERSIONS_GROUP = "_version_data/versions"
FIRST_VERSION = "__first_version__"
TIMESTAMP_FMT = "%Y-%m-%d %H:%M:%S.%f%z"  # versioned_hdf5.versions.TIMESTAMP_FMT
RAW_ATTR = "_versionfs_raw"  # a dataset that holds a staged file's raw bytes
MESSAGE_ATTR = "_versionfs_message"  # a version's commit message
MTIME_ATTR = "_versionfs_mtime_ns"  # the mtime a file had when it was committed
MODE_ATTR = "_versionfs_mode"  # the permission bits a file had when it was committed
# A uint8 dataset holding a symbolic link's target (a staged symlink); the .h5
# image leaves it out (a plain HDF5 file has no place for a file-system link).
LINK_ATTR = "_versionfs_symlink"
NAME_ATTR = "_versionfs_name"  # the name a dataset stored under an internal name stands for (hdf5_write)
RENAMED_ATTR = "_versionfs_renamed"  # on a group that holds (or held) such a dataset
# versionfs's own marks on a dataset, kept when a dataset is copied (a rename).
FILE_MARKS = frozenset({RAW_ATTR, MTIME_ATTR, MODE_ATTR, LINK_ATTR})
# Attributes the format (or versionfs) uses for itself; never shown as user attributes.
INTERNAL_ATTRS = frozenset({"chunks", "raw_data", "prev_version", "committed", "timestamp", MESSAGE_ATTR, NAME_ATTR,
                            RENAMED_ATTR}) | FILE_MARKS
ATTRS_FILE = ".attrs.json"
VERSION_FILE = ".version.json"
RESERVED_NAMES = frozenset({ATTRS_FILE, VERSION_FILE})
# The file name a dataset of each kind gets: <name><extension>.
EXTENSIONS = {"npy": ".npy", "text": ".txt", "raw": "", "link": ""}


@dataclass(frozen=True, slots=True)
class NpyRef:
    """A fixed-size-dtype dataset shown as ``.npy``."""

    h5path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    header: bytes
    kind = "npy"

    @property
    def size(self) -> int:
        return len(self.header) + math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class TextRef:
    """A variable-length string or bytes dataset shown as line-oriented text."""

    h5path: str
    kind = "text"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A whole version as one plain HDF5 file (``hdf5_image``)."""

    version: str
    kind = "image"


@dataclass(frozen=True, slots=True)
class VersionFileRef:
    """A version's ``.version.json`` where its bytes are made only when read
    (they name every renamed or hidden object of the whole version)."""

    version: str
    kind = "version-file"


@dataclass(frozen=True, slots=True)
class RawRef:
    """A uint8 dataset holding the raw bytes of a staged file (doc/SEMANTICS.md §
    How staged files become the next version)."""

    h5path: str
    kind = "raw"


def parse_timestamp(raw: Any) -> dt.datetime:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dt.datetime.strptime(text, TIMESTAMP_FMT).astimezone(dt.timezone.utc)


def attr_to_json(value: Any) -> Any:
    """An HDF5 attribute as JSON. int64, float64, bool and strings (and lists of
    them) are plain JSON; any other dtype is ``{"dtype": <numpy str>, "value": …}``
    so nothing about the attribute is lost."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return {"dtype": "bytes", "value": _jsonable(value)}
    arr = np.asarray(value)
    plain = _jsonable(arr.tolist())
    if arr.dtype.kind == "O" or arr.dtype in (np.dtype(bool), np.dtype(np.int64), np.dtype(np.float64)):
        return plain
    if arr.dtype.kind == "U":
        return plain
    return {"dtype": arr.dtype.str if arr.dtype.names is None else str(arr.dtype.descr), "value": plain}


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bytes):
        # Bytes that are not UTF-8 become lone surrogates (\udc80-\udcff in the
        # JSON, see canonical_json): json_to_attr gives back exactly these bytes.
        return x.decode("utf-8", "surrogateescape")
    if isinstance(x, complex):
        return [x.real, x.imag]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def user_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: attr_to_json(v) for k, v in obj.attrs.items() if k not in INTERNAL_ATTRS}


def file_kind(dtype: np.dtype) -> str | None:
    """'npy', 'text', or None for dtypes versionfs cannot show as a file."""
    info = h5py.check_string_dtype(dtype)
    if info is not None and info.length is None:
        return "text"
    if dtype.hasobject:
        return None
    return "npy"


def json_to_attr(value: Any) -> Any:
    """The inverse of attr_to_json."""
    if isinstance(value, dict):
        if set(value) != {"dtype", "value"}:
            raise ValueError(f"an attribute value cannot be an object: {value!r}")
        spec, raw = value["dtype"], value["value"]
        if spec == "bytes":
            return np.bytes_(str(raw).encode("utf-8", "surrogateescape"))  # fixed-length, as it came
        dtype = np.dtype(ast.literal_eval(spec)) if spec.startswith("[") else np.dtype(spec)
        if dtype.kind == "c":
            raw = _complexify(raw)
        if dtype.kind == "S":
            raw = _bytesify(raw)
        return np.array(raw if dtype.names is None else _tuplify(raw), dtype=dtype)
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # h5py shows variable-length bytes that are not UTF-8 so
            return value.encode("utf-8", "surrogateescape")
        return value
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        return np.array([json_to_attr(v) for v in value])
    raise ValueError(f"unsupported attribute value {value!r}")


def _complexify(raw: Any) -> Any:
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, (int, float)) for x in raw):
        return complex(*raw)
    return [_complexify(x) for x in raw]


def _bytesify(raw: Any) -> Any:
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else [_bytesify(x) for x in raw]


def _tuplify(raw: Any) -> Any:
    if isinstance(raw, list) and raw and isinstance(raw[0], list):
        return [tuple(x) for x in raw]
    return tuple(raw)


def ref_h5path(ref: Any) -> str:
    return ref if isinstance(ref, str) else ref.h5path


def ref_name(ref: Any) -> str:
    return ref_h5path(ref).rsplit("/", 1)[1]


def ref_kind(ref: Any) -> str | None:
    return getattr(ref, "kind", None)


def strip_ext(leaf: str) -> str:
    """The dataset name a shown file name stands for, if it has a kind's extension."""
    for ext in filter(None, EXTENSIONS.values()):
        if leaf.endswith(ext):
            return leaf[: -len(ext)]
    return leaf
