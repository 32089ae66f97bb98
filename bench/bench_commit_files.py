"""HDF5 commits of many files: 500 new small text files, 2,000 new small files, and
a mixed change set like fsstress leaves (creates, renames, truncates, deletions, deep
directories), each against versioned-hdf5 making the same datasets in one
``stage_version``."""

import random
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from versionfs.control import request as control_request

from harness import Context, Result, Row, mounted, scratch_dir, timed

TEXTS = 500
FILES = 2000
MIX_BASE = 240  # files of the base version the mix works on
MIX_SEED = 13


@dataclass
class Mix:
    """A change set in display paths, applied the same way to staging/ and to the library."""

    base: dict[str, bytes]  # the base version's raw files
    create: dict[str, bytes] = field(default_factory=dict)
    rename: dict[str, str] = field(default_factory=dict)  # old -> new (no edit)
    truncate: dict[str, int] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # new empty directories


def texts(n: int) -> dict[str, bytes]:
    rng = random.Random(1)
    return {f"t{i:04d}.txt": "".join(f"reading {rng.random():.6f} at station {i}\n" for _ in range(rng.randint(1, 8))).encode()
            for i in range(n)}


def blobs(n: int, prefix: str = "f", seed: int = 2) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{prefix}{i:04d}.bin": rng.randbytes(rng.randint(200, 16 << 10)) for i in range(n)}


def mix() -> Mix:
    rng = random.Random(MIX_SEED)
    base = {f"d{i % 12}/s{i % 5}/f{i:03d}.bin": rng.randbytes(rng.randint(100, 32 << 10)) for i in range(MIX_BASE)}
    m = Mix(base)
    names = sorted(base)
    rng.shuffle(names)
    for path in names[:60]:
        m.rename[path] = f"r{rng.randint(0, 3)}/{path.replace('/', '_')}"
    for path in names[60:120]:
        m.truncate[path] = rng.randint(0, len(base[path]) // 2)
    m.delete = names[120:160]
    for i in range(161):
        depth = rng.randint(1, 6)
        m.create["/".join(f"p{rng.randint(0, 2)}" for _ in range(depth)) + f"/n{i:03d}.bin"] = rng.randbytes(rng.randint(0, 24 << 10))
    m.dirs = [f"e{i}/x/y" for i in range(8)]
    return m


def raw_chunks(size: int) -> tuple[int, ...]:
    from versionfs.backends.hdf5_write import _raw_chunks

    return _raw_chunks(size)


def make_base(path: Path, files: dict[str, bytes]) -> None:
    from versioned_hdf5 import VersionedHDF5File

    with h5py.File(path, "w") as f:
        with VersionedHDF5File(f).stage_version("v1") as g:
            g.create_dataset("keep", data=np.arange(1000))
            for name, data in files.items():
                raw(g, name, data)


def raw(g, name: str, data: bytes) -> None:
    """A raw file as versionfs stores it: a uint8 dataset of its whole name."""
    g.create_dataset(name, data=np.frombuffer(data, dtype=np.uint8), chunks=raw_chunks(len(data)))
    g[name].attrs["_versionfs_raw"] = True


def library(path: Path, change: Callable) -> None:
    from versioned_hdf5 import VersionedHDF5File

    with h5py.File(path, "r+") as f:
        with VersionedHDF5File(f).stage_version("v2") as g:
            change(g)


def stage_files(staging: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def stage_mix(staging: Path, m: Mix) -> None:
    for old, new in m.rename.items():
        (staging / new).parent.mkdir(parents=True, exist_ok=True)
        (staging / old).rename(staging / new)
    for path, size in m.truncate.items():
        with open(staging / path, "r+b") as f:
            f.truncate(size)
    for path in m.delete:
        (staging / path).unlink()
    stage_files(staging, m.create)
    for d in m.dirs:
        (staging / d).mkdir(parents=True)


def library_mix(g, m: Mix) -> None:
    for old, new in m.rename.items():
        raw(g, new, m.base[old])
        del g[old]
    for path, size in m.truncate.items():
        g[path].resize((size,))  # the library keeps the path's chunk shape: a resize
    for path in m.delete:
        del g[path]
    for path, data in m.create.items():
        raw(g, path, data)
    for d in m.dirs:
        g.create_group(d)


def text_dataset(g, name: str, data: bytes) -> None:
    lines = [line.decode() for line in data.split(b"\n")[:-1]]
    g.create_dataset(name[: -len(".txt")], data=np.array(lines, dtype=object), dtype=h5py.string_dtype())


def measure(ctx: Context, base_files: dict[str, bytes], stage: Callable[[Path], None], change: Callable) -> tuple[list[float], list[float], int]:
    """(reference times, versionfs times, entries staged): each rep on fresh copies."""
    ref, ours, entries = [], [], 0
    with scratch_dir() as tmp:
        base = tmp / "base.h5"
        make_base(base, base_files)
        for _ in range(ctx.reps):
            copy = tmp / "ref.h5"
            shutil.copyfile(base, copy)
            ref.append(timed(lambda: library(copy, change)))
            copy.unlink()
            copy = tmp / "ours.h5"
            shutil.copyfile(base, copy)
            with mounted(copy) as mnt:
                stage(mnt / "staging")
                entries = len(control_request(str(mnt), "status"))
                name: list = []
                ours.append(timed(lambda: name.append(control_request(str(mnt), "commit", name="v2"))))
                assert name == ["v2"], name
            copy.unlink()
    return ref, ours, entries


def run(ctx: Context) -> Result:
    med = statistics.median
    ms = lambda times: med(times) * 1000  # noqa: E731
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows, notes = [], []
    cases = [
        (f"{TEXTS} new small text files", {}, texts(TEXTS), None),
        (f"{FILES:,} new small files (200 B – 16 KiB, raw)", {}, blobs(FILES), None),
        ("a mixed change set like fsstress's", None, None, mix()),
    ]
    for title, base, files, m in cases:
        if m is None:
            add = text_dataset if title.endswith("text files") else raw
            ref, ours, entries = measure(ctx, base, lambda s: stage_files(s, files),
                                         lambda g: [add(g, n, d) for n, d in files.items()])
        else:
            ref, ours, entries = measure(ctx, m.base, lambda s: stage_mix(s, m), lambda g: library_mix(g, m))
            title += f" ({len(m.create)} creates in deep directories, {len(m.rename)} renames, {len(m.truncate)} truncates, {len(m.delete)} deletions, {len(m.dirs)} new directories; {entries} staged entries)"
        rows += [
            Row(f"versioned-hdf5 making the datasets of {title} in one `stage_version`, open to close — reference", ms(ref), None, "—", "ms", reference=True),
            Row(f"commit of {title} (the daemon's answer)", ms(ours), ms(ours) / ms(ref), f"≤ 1.5× ({met(ms(ours) <= 1.5 * ms(ref))})", "ms"),
        ]
        notes.append(f"{title}: every run (ms): reference " + " / ".join(f"{t * 1000:.0f}" for t in ref)
                     + "; versionfs " + " / ".join(f"{t * 1000:.0f}" for t in ours) + f"; {entries} lines of `status`.")
    setup = (f"a versioned file with one small dataset (and, for the mix, {MIX_BASE} raw files in two levels of "
             f"directories), a fresh copy per measurement, warm; medians of {ctx.reps} runs")
    return Result(setup, rows, notes)
