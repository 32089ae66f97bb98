"""versionfs benchmarks: ``make bench`` (or ``python bench/run.py [--only NAME]``).

Every benchmark is a function in ``BENCHES`` that measures its own reference in
the same run (so machine and disk speed cancel out) and returns rows for one
markdown table. The table is printed and, after a full run, written into
bench/README.md between the results markers. Add a benchmark by writing another
``bench_*`` function and listing it in BENCHES.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from versionfs.control import request as control_request

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "data"  # git-ignored; big inputs are made once and kept
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results -->", "<!-- /results -->"
MiB = 1 << 20

# The big-read dataset: 1-D float64, random (so compression could not help), unfiltered.
BIG_FILE = DATA_DIR / "big.h5"
BIG_ELEMENTS = 64 * MiB  # 67_108_864 float64 = 512 MiB
BIG_CHUNK = 1 << 18  # 2 MiB chunks
BIG_VERSION = "v1"
BIG_H5PATH = f"_version_data/versions/{BIG_VERSION}/big"  # what versioned-hdf5 reads for a read-only file
READ_BUFFER = 1 * MiB  # like cp

# The S3 benchmark: one object of random bytes in a versioned bucket on a local server.
S3_OBJECT_BYTES = 256 * MiB
S3_KEY = "big.bin"
S3_SERVER = "ministack"  # of tests/s3servers.py; see bench/README.md for why not moto
RCLONE_REMOTE = "vfsbench"  # configured by RCLONE_CONFIG_VFSBENCH_* variables only
MOUNT_TIMEOUT = 30.0  # seconds for rclone / s3fs to show their mount

# The image benchmark: a 1 GiB version (4 datasets of 256 MiB random float64, 256 KiB
# chunks: 4096 chunks whose places the image's metadata must record) and a plain copy.
IMAGE_FILE = DATA_DIR / "image.h5"
IMAGE_PLAIN = DATA_DIR / "image_plain.h5"
IMAGE_DATASETS = 4
IMAGE_ELEMENTS = 32 * MiB  # float64 per dataset: 256 MiB
IMAGE_CHUNK = 1 << 15  # 256 KiB chunks

# The history benchmark: many keys, each with a few versions, in many directories.
HISTORY_DIRS = 20
HISTORY_KEYS = 200  # per directory
HISTORY_VERSIONS = 2  # per key: 8,000 object versions in all

# The commit benchmark's change to that dataset: one element in every 100th chunk (1%).
COMMIT_STRIDE = 100
COMMIT_NAME = "v2"
CLI_RUNS = 3  # unchanged commits and `--version` runs per repetition


UNIT_RATIO = {"MiB/s": "speed", "ms": "time", "MiB": "size"}  # what a row's ratio compares


@dataclass
class Row:
    measurement: str
    value: float  # a median, in ``unit``
    ratio: float | None  # value / this benchmark's reference value (None: no ratio, informative)
    goal: str
    unit: str = "MiB/s"  # a key of UNIT_RATIO
    reference: bool = False  # this row is the benchmark's reference


@dataclass
class Result:
    setup: str  # what was measured on what input, printed above the table
    rows: list[Row]
    notes: list[str] = field(default_factory=list)  # printed under the table


@dataclass
class Context:
    reps: int


# -- helpers -----------------------------------------------------------------------
def drop_caches() -> bool:
    """Empty the page cache (also the kernel's cache of FUSE files). Needs root."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_sequentially(path: str | Path, digest: "hashlib._Hash | None" = None) -> int:
    """Read a file start to end with readinto of one buffer, as cp does; bytes read."""
    buf = bytearray(READ_BUFFER)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
            if digest is not None:
                digest.update(view[:n])
    return total


def proc_io(pid: int) -> tuple[int, int, float]:
    """(bytes the process read, bytes it wrote, both via syscalls, CPU seconds used) so far."""
    with open(f"/proc/{pid}/io") as f:
        io = dict(line.split(": ") for line in f.read().splitlines())
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return int(io["rchar"]), int(io["wchar"]), cpu


def proc_counters(pid: int) -> tuple[int, float]:
    """(bytes the process read via syscalls, CPU seconds used) so far."""
    rchar, _, cpu = proc_io(pid)
    return rchar, cpu


def machine_line() -> str:
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return (
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} · {os.cpu_count()} CPUs · "
        f"{mem_kib / (1 << 20):.0f} GiB RAM · Linux {platform.release()} · "
        f"Python {platform.python_version()}, h5py {h5py.__version__}, numpy {np.__version__}"
    )


def versionfs(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # ``python -m versionfs`` from this interpreter: works from .venv and /tmp/venv alike.
    return subprocess.run([sys.executable, "-m", "versionfs", *args], capture_output=True, text=True, check=check, env=env)


def timed_versionfs(*args: str, expect: str | None = None) -> float:
    """Seconds one ``versionfs`` command takes, start-up of the CLI included; its
    output must be ``expect`` (when given)."""
    t0 = time.perf_counter()
    r = versionfs(*args, check=False)
    t = time.perf_counter() - t0
    if r.returncode != 0 or (expect is not None and r.stdout.strip() != expect):
        raise RuntimeError(f"versionfs {' '.join(args)}: exit {r.returncode}, {r.stdout.strip()!r} {r.stderr.strip()!r}")
    return t


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="versionfs-bench-copy-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def mounted(source: Path) -> Iterator[Path]:
    """A fresh versionfs mount of ``source`` with its own throw-away state and cache
    directories (so no daemon state survives between cold runs); always unmounted."""
    tmp = Path(tempfile.mkdtemp(prefix="versionfs-bench-"))
    mnt, state = tmp / "mnt", tmp / "state"
    mnt.mkdir()
    old_env = {k: os.environ.get(k) for k in ("XDG_STATE_HOME", "XDG_CACHE_HOME")}
    os.environ["XDG_STATE_HOME"], os.environ["XDG_CACHE_HOME"] = str(state), str(tmp / "cache")
    try:
        r = versionfs("mount", str(source), str(mnt), "--state-dir", str(state), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"versionfs mount failed: {r.stderr.strip()}")
        yield mnt
    finally:
        r = versionfs("umount", str(mnt), check=False)
        if r.returncode != 0 and "not mounted" not in r.stderr:
            print(f"warning: versionfs umount: {r.stderr.strip()}", file=sys.stderr)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)  # in case
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def daemon_pid(mnt: Path) -> int:
    return int(os.getxattr(mnt, "user.versionfs.pid"))


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


# -- the big dataset ------------------------------------------------------------------
def big_file_ok() -> bool:
    try:
        with h5py.File(BIG_FILE, "r") as f:
            ds = f[BIG_H5PATH]
            return ds.shape == (BIG_ELEMENTS,) and ds.dtype == np.float64
    except (OSError, KeyError):
        return False


def ensure_big_file() -> Path:
    """Make the 512 MiB versioned file once; kept in bench/data/ for later runs."""
    if BIG_FILE.exists() and big_file_ok():
        return BIG_FILE
    from versioned_hdf5 import VersionedHDF5File

    DATA_DIR.mkdir(exist_ok=True)
    print(f"creating {BIG_FILE} ({BIG_ELEMENTS * 8 // MiB} MiB, once) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    data = np.random.default_rng(0).standard_normal(BIG_ELEMENTS)
    tmp = BIG_FILE.with_suffix(".h5.tmp")  # renamed into place only when complete
    with h5py.File(tmp, "w") as f:
        with VersionedHDF5File(f).stage_version(BIG_VERSION) as g:
            g.create_dataset("big", data=data, chunks=(BIG_CHUNK,))
    os.replace(tmp, BIG_FILE)
    print(f"created in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return BIG_FILE


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the data) of an open .npy file."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    return shape, fortran, dtype, f.tell()


def verify_npy(path: Path, expected: np.ndarray) -> None:
    """The file is numpy's .npy of ``expected``: header fields, size, data bytes."""
    with open(path, "rb") as f:
        shape, fortran, dtype, header_len = read_npy_header(f)
        assert (shape, fortran, dtype) == (expected.shape, False, expected.dtype), (shape, fortran, dtype)
        assert os.fstat(f.fileno()).st_size == header_len + expected.nbytes, "st_size is not header + data"
        got = hashlib.sha256()
        while chunk := f.read(16 * MiB):
            got.update(chunk)
    assert got.digest() == hashlib.sha256(expected.data).digest(), f"{path} differs from the h5py data"


# -- benchmarks ------------------------------------------------------------------------
def bench_read(ctx: Context) -> Result:
    """Sequential read of latest/big.npy, cold and warm, against h5py reading the
    same dataset directly from the same file, cold."""
    source = ensure_big_file()
    nbytes = BIG_ELEMENTS * 8
    dropped = True

    def h5py_read() -> np.ndarray:
        with h5py.File(source, "r") as f:
            return f[BIG_H5PATH][...]

    ref_times, disk, cold, warm, cat = [], [], [], [], []
    daemon_cold_read, daemon_cold_cpu, daemon_warm_read = [], [], []
    for rep in range(ctx.reps):
        # Reference and versionfs alternate, so that drifts of the (virtual) disk
        # or of the host hit both alike.
        dropped &= drop_caches()
        ref_times.append(timed(h5py_read))
        # The plain file read sets the ceiling: is the reference disk-bound in this run?
        dropped &= drop_caches()
        disk.append(timed(lambda: read_sequentially(source)))
        # A fresh mount per repetition: nothing cached in the daemon either.
        with mounted(source) as mnt:
            path = mnt / "latest" / "big.npy"
            size = path.stat().st_size
            pid = daemon_pid(mnt)
            dropped &= drop_caches()
            r0, c0 = proc_counters(pid)
            t = timed(lambda: read_sequentially(path))
            r1, c1 = proc_counters(pid)
            cold.append(t)
            daemon_cold_read.append(r1 - r0)
            daemon_cold_cpu.append((c1 - c0) / t)
            # Warm: the same file again, at once; keep_cache should serve it from RAM.
            warm.append(timed(lambda: read_sequentially(path)))
            r2, _ = proc_counters(pid)
            daemon_warm_read.append(r2 - r1)
            if rep == 0:
                verify_npy(path, h5py_read())
            # cat, cold: what a shell user sees (cat reads 128 KiB at a time).
            dropped &= drop_caches()
            cat.append(timed(lambda: subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)))

    def speed(times: list[float], n: int = nbytes) -> float:
        return mib_s(n, statistics.median(times))

    ref = speed(ref_times)
    disk_s = speed(disk, source.stat().st_size)
    cold_s, warm_s, cat_s = speed(cold, size), speed(warm, size), speed(cat, size)
    suffix = "" if dropped else " (cache not dropped)"
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows = [
        Row(f"h5py direct read of the dataset, cold{suffix} — reference", ref, None, "—", reference=True),
        Row(f"plain sequential read of the .h5 file, cold{suffix} (disk ceiling)", disk_s, disk_s / ref, "— (informative)"),
        Row(f"versionfs `latest/big.npy`, cold, 1 MiB `readinto`{suffix}", cold_s, cold_s / ref, f"≥ 0.8 ({met(cold_s >= 0.8 * ref)})"),
        Row(f"versionfs `latest/big.npy`, cold, `cat > /dev/null`{suffix}", cat_s, cat_s / ref, "≥ 0.8 (informative)"),
        Row("versionfs `latest/big.npy`, warm re-read (page cache)", warm_s, warm_s / ref, f"from page cache, ≫ cold ({warm_s / cold_s:.1f}× cold)"),
    ]
    med = statistics.median
    runs = lambda times, n=nbytes: " / ".join(f"{mib_s(n, t):.0f}" for t in times)  # noqa: E731
    setup = (
        f"dataset of {nbytes // MiB} MiB float64, 1-D, {BIG_ELEMENTS:,} elements, chunks of "
        f"{BIG_CHUNK:,} ({BIG_CHUNK * 8 // MiB} MiB), no compression; medians of {ctx.reps} runs"
    )
    notes = [
        f"Daemon during a cold read: read {med(daemon_cold_read) / MiB:.0f} MiB from the source "
        f"(file is {size / MiB:.0f} MiB), busy {med(daemon_cold_cpu):.0%} of one CPU.",
        f"Daemon during a warm re-read: read {med(daemon_warm_read) / MiB:.1f} MiB "
        f"({'served by the page cache' if med(daemon_warm_read) < MiB else 'NOT served by the page cache'}).",
        f"Every run (MiB/s): reference {runs(ref_times)}; disk {runs(disk, source.stat().st_size)}; cold {runs(cold, size)}; "
        f"cat {runs(cat, size)}; warm {runs(warm, size)}.",
        "Correctness: `big.npy` header matches numpy's, data bytes equal h5py's (sha256).",
    ]
    return Result(setup, rows, notes)


def commit_change() -> tuple[np.ndarray, np.ndarray]:
    """The 1% change: (element indices, new values); one element in the middle of
    every COMMIT_STRIDE-th chunk, starting half a stride in (so neither the first nor
    the last chunk: a compare that stops at the first difference gets no head start),
    set to values far outside the N(0, 1) data."""
    chunks = np.arange(COMMIT_STRIDE // 2, BIG_ELEMENTS // BIG_CHUNK, COMMIT_STRIDE)
    return chunks * BIG_CHUNK + BIG_CHUNK // 2, 1000.5 + np.arange(len(chunks), dtype=np.float64)


def edit_npy_in_place(path: Path, idx: np.ndarray, values: np.ndarray) -> None:
    """Overwrite elements of a 1-D float64 .npy file where they are: 8 bytes each."""
    with open(path, "r+b", buffering=0) as f:
        shape, fortran, dtype, header_len = read_npy_header(f)
        assert (shape, fortran, dtype) == ((BIG_ELEMENTS,), False, np.dtype("<f8")), (shape, fortran, dtype)
        for i, value in zip(idx.tolist(), values.astype("<f8")):
            f.seek(header_len + 8 * i)
            assert f.write(value.tobytes()) == 8


def bench_commit(ctx: Context) -> Result:
    """A commit of a 1% change of the big dataset through versionfs, staged by an
    in-place edit and by a whole rewrite of staging/big.npy, against versioned-hdf5's
    own stage_version of the same change; and a commit with nothing staged."""
    from versioned_hdf5 import VersionedHDF5File

    source = ensure_big_file()
    idx, values = commit_change()
    with h5py.File(source, "r") as f:
        expected = f[BIG_H5PATH][...]
    original = expected[idx].copy()
    expected[idx] = values
    nbytes, nchunks = expected.nbytes, BIG_ELEMENTS // BIG_CHUNK
    dropped = True

    def reference(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            vf = VersionedHDF5File(f)
            with vf.stage_version(COMMIT_NAME) as g:
                g["big"][idx] = values

    def verify(path: Path) -> None:
        """The new version holds the changed array, the old one is untouched."""
        with h5py.File(path, "r") as f:
            vf = VersionedHDF5File(f)
            got = vf[COMMIT_NAME]["big"][...]
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), f"{path}: version {COMMIT_NAME} differs"
            assert np.array_equal(vf[BIG_VERSION]["big"][idx], original), f"{path}: version {BIG_VERSION} changed"

    ref_t, ref_growth = [], []
    edit_t, inplace_t, inplace_growth, inplace_io = [], [], [], []
    save_t, rewrite_t, rewrite_growth, rewrite_io = [], [], [], []
    unchanged_t, startup_t, python_t, request_t = [], [], [], []

    def staged_commit(copy: Path, stage: Callable[[Path], None], stage_times, commit_times, growths, io, cli: bool) -> None:
        """Mount a fresh copy, stage the change, commit it cold; on the first run check
        the new version with the library once unmounted."""
        nonlocal dropped
        size0 = copy.stat().st_size
        with mounted(copy) as mnt:
            if cli:
                # Nothing staged yet: the unchanged commit, and the bare start-up of the CLI.
                for _ in range(CLI_RUNS):
                    python_t.append(timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)))
                    startup_t.append(timed_versionfs("--version"))
                    unchanged_t.append(timed_versionfs("commit", str(mnt), expect="unchanged"))
                    # The same request from a client that is already running (what the
                    # daemon takes to answer, without the interpreter's start-up).
                    request_t.append(timed(lambda: control_request(str(mnt), "commit") is None or True))
            pid = daemon_pid(mnt)
            stage_times.append(timed(lambda: stage(mnt / "staging" / "big.npy")))
            dropped &= drop_caches()
            c0 = proc_io(pid)
            # Timed at the control channel (as the unchanged commit is): the CLI's
            # start-up, shown in its own row, would add the same to every commit.
            name = []
            commit_times.append(timed(lambda: name.append(control_request(str(mnt), "commit", name=COMMIT_NAME))))
            assert name == [COMMIT_NAME], name
            c1 = proc_io(pid)
            io.append(tuple(b - a for a, b in zip(c0, c1)))
        growths.append(copy.stat().st_size - size0)
        if len(commit_times) == 1:
            verify(copy)

    def edit_staged(path: Path) -> None:
        edit_npy_in_place(path, idx, values)

    def save_staged(path: Path) -> None:
        np.save(path, expected)

    for rep in range(ctx.reps):
        with scratch_dir() as tmp:
            # The reference: the library on a copy of the file, open to close, cold.
            copy = tmp / "reference.h5"
            shutil.copyfile(source, copy)
            size0 = copy.stat().st_size
            dropped &= drop_caches()
            ref_t.append(timed(lambda: reference(copy)))
            ref_growth.append(copy.stat().st_size - size0)
            if rep == 0:
                verify(copy)
            copy.unlink()
            for name, stage, lists, cli in (
                ("in-place.h5", edit_staged, (edit_t, inplace_t, inplace_growth, inplace_io), True),
                ("rewrite.h5", save_staged, (save_t, rewrite_t, rewrite_growth, rewrite_io), False),
            ):
                copy = tmp / name
                shutil.copyfile(source, copy)
                staged_commit(copy, stage, *lists, cli)
                copy.unlink()

    med = statistics.median
    ms = lambda times: med(times) * 1000  # noqa: E731
    ref_ms, inplace_ms, rewrite_ms, unchanged_ms = ms(ref_t), ms(inplace_t), ms(rewrite_t), ms(unchanged_t)
    ref_mib = med(ref_growth) / MiB
    suffix = "" if dropped else " (cache not dropped)"
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    rows = [
        Row(f"versioned-hdf5 `stage_version` of the 1% change, open to close, cold{suffix} — reference", ref_ms, None, "—", "ms", reference=True),
        Row(f"commit after an in-place edit of `staging/big.npy` (the daemon's answer), cold{suffix}", inplace_ms, inplace_ms / ref_ms, f"≤ 1.5× ({met(inplace_ms <= 1.5 * ref_ms)})", "ms"),
        Row(f"commit after `np.save` of the whole changed array to `staging/big.npy` (the daemon's answer), cold{suffix}", rewrite_ms, rewrite_ms / ref_ms, f"≤ 1.5× ({met(rewrite_ms <= 1.5 * ref_ms)})", "ms"),
        Row(f"staging the in-place edit: open `r+b` (copies the file up into the spool), write 8 bytes × {len(idx)}, close", ms(edit_t), None, "— (informative)", "ms"),
        Row(f"staging the rewrite: `np.save` of {nbytes // MiB} MiB through the mount", ms(save_t), None, "— (informative)", "ms"),
        Row("unchanged commit: the daemon's answer to the commit request (nothing staged), warm", ms(request_t), None, f"< 50 ms ({met(ms(request_t) < 50)})", "ms"),
        Row("`versionfs commit` with nothing staged (prints `unchanged`), whole CLI run, warm", unchanged_ms, None, "— (informative: includes start-up)", "ms"),
        Row("`versionfs --version` (start-up of the CLI: add it to a commit's time for the whole command), warm", ms(startup_t), None, "— (informative)", "ms"),
        Row("`python -c pass` (start-up of the interpreter alone), warm", ms(python_t), None, "— (informative)", "ms"),
        Row("file growth, versioned-hdf5 reference commit — reference", ref_mib, None, "—", "MiB", reference=True),
        Row("file growth, `versionfs commit` after the in-place edit", med(inplace_growth) / MiB, med(inplace_growth) / MiB / ref_mib, "≈ reference (informative)", "MiB"),
        Row("file growth, `versionfs commit` after the rewrite", med(rewrite_growth) / MiB, med(rewrite_growth) / MiB / ref_mib, "≈ reference (informative)", "MiB"),
    ]
    runs = lambda times: " / ".join(f"{t * 1000:.0f}" for t in times)  # noqa: E731

    def daemon(io: list[tuple[int, int, float]], times: list[float]) -> str:
        r, w, cpu = (med([x[k] for x in io]) for k in range(3))
        return f"read {r / MiB:,.0f} MiB, wrote {w / MiB:,.0f} MiB, used {cpu:.1f} s of CPU in {med(times):.1f} s"

    setup = (
        f"the read benchmark's {nbytes // MiB} MiB dataset, a fresh copy of its file per measurement; the change: one "
        f"element in the middle of every {COMMIT_STRIDE}th chunk ({len(idx)} of {nchunks} chunks, {len(idx) / nchunks:.1%} "
        f"of the data); commits cold (page cache dropped after staging); medians of {ctx.reps} runs "
        f"({ctx.reps * CLI_RUNS} for the warm CLI rows)"
    )
    notes = [
        f"Commit times are the daemon's answer to the commit request; `versionfs commit` adds the CLI's start-up: "
        f"{ms(startup_t):.0f} ms for `--version` (of which {ms(python_t):.0f} ms the bare interpreter), "
        f"against {unchanged_ms:.0f} ms for the whole unchanged commit.",
        f"Daemon during the commit after the in-place edit: {daemon(inplace_io, inplace_t)}; after the rewrite: "
        f"{daemon(rewrite_io, rewrite_t)} (syscall bytes: the staged file read through a memory map is not counted; "
        f"the dataset is {nbytes // MiB} MiB).",
        f"Staging the rewrite ran at {mib_s(nbytes, med(save_t)):.0f} MiB/s.",
        f"Every run (ms): reference {runs(ref_t)}; in-place commit {runs(inplace_t)}; rewrite commit {runs(rewrite_t)}; "
        f"in-place staging {runs(edit_t)}; rewrite staging {runs(save_t)}; unchanged {runs(unchanged_t)}; "
        f"`--version` {runs(startup_t)}; `python -c pass` {runs(python_t)}.",
        f"File growth (MiB, every run): reference {' / '.join(f'{g / MiB:.2f}' for g in ref_growth)}; in-place "
        f"{' / '.join(f'{g / MiB:.2f}' for g in inplace_growth)}; rewrite {' / '.join(f'{g / MiB:.2f}' for g in rewrite_growth)}; "
        f"the changed chunks are {len(idx) * BIG_CHUNK * 8 / MiB:.0f} MiB.",
        f"Correctness (first run): after each commit, `VersionedHDF5File(f)['{COMMIT_NAME}']['big']` equals the changed "
        f"array byte for byte and version `{BIG_VERSION}` still holds the old values.",
    ]
    return Result(setup, rows, notes)


# -- S3 --------------------------------------------------------------------------------
# ministack answers a GET with a VersionId with the whole object, whatever its Range
# (its unversioned GETs honour Range). versionfs always reads by VersionId in ranged
# GETs of 8 MiB, so on the stock server every one of them would carry the whole
# 256 MiB object: 32 times the data, a measure of that defect and nothing else. The
# server is started with its versioned GET made to slice the body as its unversioned
# GET does (and as AWS does); nothing else changes, and the benchmark checks it.
MINISTACK_RANGE_FIX = """
import ministack.services.s3 as s3

_get_object = s3._get_object


def get_object(bucket_name, key, headers, query_params=None):
    status, out, body = _get_object(bucket_name, key, headers, query_params)
    rng = headers.get("range", "")
    if status == 200 and rng and s3._qp(query_params or {}, "versionId", "") and "Content-Range" not in out:
        total = len(body)
        parsed = s3._parse_range(rng, total)
        if parsed is not None:
            start, end = parsed
            body = body[start : end + 1]
            out = {k: v for k, v in out.items() if not k.lower().startswith("x-amz-checksum-")}
            out["Content-Length"] = str(len(body))
            out["Content-Range"] = f"bytes {start}-{end}/{total}"
            return 206, out, body
    return status, out, body


s3._get_object = get_object
from ministack.app import main

main()
"""


@contextlib.contextmanager
def s3_server() -> Iterator["object"]:
    """A ``tests/s3servers.py`` server on 127.0.0.1 (ministack, with ranged GETs of a
    version: see MINISTACK_RANGE_FIX); always stopped."""
    tests = str(BENCH_DIR.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import s3servers

    srv = s3servers.S3Server(S3_SERVER)
    plain = s3servers._COMMANDS[S3_SERVER]

    def command(port: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
        cmd, env = plain(port, workdir)
        assert cmd[1:] == ["-m", "ministack"], cmd  # what the fix replaces
        return [cmd[0], "-c", MINISTACK_RANGE_FIX], env

    s3servers._COMMANDS[S3_SERVER] = command
    try:
        srv.start()
    finally:
        s3servers._COMMANDS[S3_SERVER] = plain
    try:
        yield srv
    finally:
        srv.stop()


def s3_env(tmp: Path) -> dict[str, str]:
    """The environment of the mount processes: dummy credentials only (no AWS_* or
    proxy settings of the caller's), XDG directories in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_")) and "proxy" not in k.lower()}
    env.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true", XDG_STATE_HOME=str(tmp / "state"), XDG_CACHE_HOME=str(tmp / "xdg-cache"),
    )
    return env


@contextlib.contextmanager
def s3_mounted(url: str, bucket: str) -> Iterator[tuple[Path, Path]]:
    """A versionfs mount of s3://``bucket`` with a fresh, throw-away cache and state
    directory: (mount point, cache directory); always unmounted."""
    tmp = Path(tempfile.mkdtemp(prefix="versionfs-bench-s3-"))
    mnt, cache, state = tmp / "mnt", tmp / "cache", tmp / "state"
    mnt.mkdir()
    env = s3_env(tmp)
    try:
        r = versionfs("mount", f"s3://{bucket}", str(mnt), "--endpoint-url", url, "--cache-dir", str(cache),
                      "--state-dir", str(state), check=False, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"versionfs mount s3://{bucket} failed: {r.stderr.strip()}")
        yield mnt, cache
    finally:
        r = versionfs("umount", str(mnt), check=False, env=env)
        if r.returncode != 0 and "not mounted" not in r.stderr:
            print(f"warning: versionfs umount: {r.stderr.strip()}", file=sys.stderr)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)  # in case
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def foreign_mount(kind: str, url: str, bucket: str, cache_mode: str = "off") -> Iterator[tuple[Path, int]]:
    """An ``rclone mount`` (with ``--vfs-cache-mode cache_mode``) or ``s3fs`` mount of
    ``bucket``, run in the foreground as our child: (mount point, its pid). Always
    unmounted and the process ended; its cache and config go with the temp dir."""
    tmp = Path(tempfile.mkdtemp(prefix=f"versionfs-bench-{kind}-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    env = s3_env(tmp)
    if kind == "rclone":
        name = RCLONE_REMOTE.upper()
        env.update({
            f"RCLONE_CONFIG_{name}_TYPE": "s3", f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{name}_ENDPOINT": url, f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": "testing",
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": "testing", f"RCLONE_CONFIG_{name}_FORCE_PATH_STYLE": "true",
            f"RCLONE_CONFIG_{name}_REGION": "us-east-1", "RCLONE_CONFIG": str(tmp / "rclone.conf"),
        })
        cmd = ["rclone", "mount", f"{RCLONE_REMOTE}:{bucket}", str(mnt), "--vfs-cache-mode", cache_mode,
               "--cache-dir", str(tmp / "rclone-cache"), "--log-level", "ERROR"]
    elif kind == "s3fs":
        passwd = tmp / "passwd"
        passwd.write_text("testing:testing\n")
        passwd.chmod(0o600)
        cmd = ["s3fs", bucket, str(mnt), "-f", "-o", f"url={url},use_path_request_style,passwd_file={passwd}"]
    else:
        raise ValueError(kind)
    log = open(tmp / "log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{kind} mount did not come up (exit {proc.poll()}): {log.read()[-2000:]}")
            time.sleep(0.05)
        yield mnt, proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    return proc_io(pid)[2]


def bench_s3(ctx: Context) -> Result:
    """Cold sequential read of one 256 MiB object through versionfs, against boto3's
    download_fileobj of the same object and against rclone and s3fs mounts of the same
    bucket, all on one local S3 server; warm re-reads from versionfs's disk cache."""
    for tool in ("rclone", "s3fs"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: `make setup` (or apt-get install rclone s3fs)")
    data = np.random.default_rng(1).bytes(S3_OBJECT_BYTES)
    want = hashlib.sha256(data).hexdigest()
    nbytes = len(data)
    dropped = True

    class Sink:
        """A file that keeps nothing (``/dev/null`` for boto3), or hashes what it gets."""

        def __init__(self, digest: "hashlib._Hash | None" = None):
            self.n, self.digest = 0, digest

        def write(self, b) -> int:
            self.n += len(b)
            if self.digest is not None:
                self.digest.update(b)
            return len(b)

    def check(name: str, path: Path) -> None:
        h = hashlib.sha256()
        assert read_sequentially(path, h) == nbytes and h.hexdigest() == want, f"{name}: {path} is not the object"

    times: dict[str, list[float]] = {k: [] for k in (
        "boto3", "cold", "disk", "page", "rclone", "rclone_full", "rclone_full_disk", "s3fs")}
    server_cpu: dict[str, list[float]] = {k: [] for k in ("boto3", "cold", "rclone", "rclone_full", "s3fs")}
    client_cpu: dict[str, list[float]] = {k: [] for k in ("boto3", "cold", "disk", "rclone", "rclone_full", "s3fs")}
    cache_bytes = []
    with s3_server() as srv:
        from s3servers import make_client, make_versioned_bucket

        url, server_pid = srv.endpoint_url, srv.proc.pid
        s3 = make_client(url)
        bucket = make_versioned_bucket(s3)
        t_put = timed(lambda: s3.put_object(Bucket=bucket, Key=S3_KEY, Body=data))
        version_id = s3.head_object(Bucket=bucket, Key=S3_KEY)["VersionId"]
        # The fix is in place: a ranged GET of the version is answered with the range.
        r = s3.get_object(Bucket=bucket, Key=S3_KEY, VersionId=version_id, Range="bytes=1-2")
        assert r["Body"].read() == data[1:3] and "ContentRange" in r, "ranged GET of a version not honoured"

        def measure(key: str, fn: Callable[[], object], client_pid: int | None = None) -> float:
            """Time ``fn`` cold (page cache dropped first); CPU of the server and the
            client process meanwhile, as shares of one CPU."""
            nonlocal dropped
            dropped &= drop_caches()
            s0 = cpu_seconds(server_pid)
            c0 = cpu_seconds(client_pid or os.getpid())
            t = timed(fn)
            if key in server_cpu:
                server_cpu[key].append((cpu_seconds(server_pid) - s0) / t)
            if key in client_cpu:
                client_cpu[key].append((cpu_seconds(client_pid or os.getpid()) - c0) / t)
            times[key].append(t)
            return t

        for rep in range(ctx.reps):
            # The reference: boto3's managed download (ranged GETs of 8 MiB on 10
            # threads, its defaults) into a sink that keeps nothing, as a read into
            # one buffer keeps nothing.
            sink = Sink()
            measure("boto3", lambda: s3.download_fileobj(bucket, S3_KEY, sink))
            assert sink.n == nbytes, sink.n
            if rep == 0:
                sink = Sink(hashlib.sha256())
                s3.download_fileobj(bucket, S3_KEY, sink)
                assert sink.digest.hexdigest() == want, "boto3 download differs from the object"
            # versionfs: a fresh mount with an empty cache per repetition.
            with s3_mounted(url, bucket) as (mnt, cache):
                path = mnt / "latest" / S3_KEY
                pid = daemon_pid(mnt)
                assert path.stat().st_size == nbytes
                measure("cold", lambda: read_sequentially(path), pid)
                cache_bytes.append(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()))
                # Page cache dropped, disk cache kept: served from the disk cache.
                measure("disk", lambda: read_sequentially(path), pid)
                # And at once again: the page cache.
                times["page"].append(timed(lambda: read_sequentially(path)))
                if rep == 0:
                    drop_caches()
                    check("versionfs", path)
            # The other mounts, cold, each freshly mounted.
            for key, kind, mode in (("rclone", "rclone", "off"), ("rclone_full", "rclone", "full"), ("s3fs", "s3fs", "")):
                with foreign_mount(kind, url, bucket, mode) as (mnt, pid):
                    path = mnt / S3_KEY
                    assert path.stat().st_size == nbytes
                    measure(key, lambda: read_sequentially(path), pid)
                    if key == "rclone_full":  # its re-read comes from its disk cache
                        measure("rclone_full_disk", lambda: read_sequentially(path), pid)
                    if rep == 0:
                        drop_caches()
                        check(f"{kind} {mode}".strip(), path)

    med = statistics.median
    speed = {k: mib_s(nbytes, med(v)) for k, v in times.items()}
    ref, cold = speed["boto3"], speed["cold"]
    suffix = "" if dropped else " (cache not dropped)"
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    ahead = lambda other: f"versionfs ahead ({met(cold > speed[other])}: {cold:,.0f} vs {speed[other]:,.0f})"  # noqa: E731
    rows = [
        Row("boto3 `download_fileobj` (8 MiB ranged GETs on 10 threads) into a sink that keeps nothing — reference",
            ref, None, "—", reference=True),
        Row(f"versionfs `latest/{S3_KEY}`, cold (fresh mount and disk cache), 1 MiB `readinto`{suffix}", cold,
            cold / ref, f"≥ 1.0× ({met(cold >= ref)})"),
        Row(f"`rclone mount`, `--vfs-cache-mode off` (its default), cold, 1 MiB `readinto`{suffix}", speed["rclone"],
            speed["rclone"] / ref, ahead("rclone")),
        Row(f"`rclone mount`, `--vfs-cache-mode full`, cold, 1 MiB `readinto`{suffix}", speed["rclone_full"],
            speed["rclone_full"] / ref, ahead("rclone_full")),
        Row(f"`s3fs` (its defaults: no disk cache), cold, 1 MiB `readinto`{suffix}", speed["s3fs"],
            speed["s3fs"] / ref, ahead("s3fs")),
        Row(f"versionfs re-read, page cache dropped: from its disk cache{suffix}", speed["disk"], speed["disk"] / ref,
            "— (informative)"),
        Row(f"`rclone mount --vfs-cache-mode full` re-read, page cache dropped: from its disk cache{suffix}",
            speed["rclone_full_disk"], speed["rclone_full_disk"] / ref, "— (informative)"),
        Row("versionfs re-read at once (page cache)", speed["page"], speed["page"] / ref, "— (informative)"),
    ]
    runs = lambda k: " / ".join(f"{mib_s(nbytes, t):.0f}" for t in times[k])  # noqa: E731
    pct = lambda d, k: f"{med(d[k]):.0%}"  # noqa: E731
    setup = (
        f"one object of {nbytes // MiB} MiB of random bytes in a versioned bucket on a local {S3_SERVER} "
        f"{_version_of(S3_SERVER)} server on 127.0.0.1 (in memory; its versioned GETs made to honour Range), "
        f"rclone {_tool_version(['rclone', 'version'])}, s3fs {_tool_version(['s3fs', '--version'])}; "
        f"every read cold (page cache dropped, fresh mount); medians of {ctx.reps} runs"
    )
    notes = [
        f"CPU during the cold reads (share of one CPU; the machine has {os.cpu_count()}): server "
        f"{pct(server_cpu, 'boto3')} for boto3, {pct(server_cpu, 'cold')} for versionfs, {pct(server_cpu, 'rclone')} for rclone off, "
        f"{pct(server_cpu, 'rclone_full')} for rclone full, {pct(server_cpu, 's3fs')} for s3fs; the client itself "
        f"(boto3's process, versionfs's daemon, rclone, s3fs) {pct(client_cpu, 'boto3')} / {pct(client_cpu, 'cold')} / "
        f"{pct(client_cpu, 'rclone')} / {pct(client_cpu, 'rclone_full')} / {pct(client_cpu, 's3fs')}; versionfs's daemon during the "
        f"re-read from its disk cache {pct(client_cpu, 'disk')}.",
        f"versionfs's disk cache after a cold read: {med(cache_bytes) / MiB:.0f} MiB (the object is {nbytes // MiB} MiB).",
        f"Every run (MiB/s): boto3 {runs('boto3')}; versionfs cold {runs('cold')}; rclone off {runs('rclone')}; "
        f"rclone full {runs('rclone_full')}; s3fs {runs('s3fs')}; versionfs from disk cache {runs('disk')}; "
        f"rclone full from disk cache {runs('rclone_full_disk')}; versionfs page cache {runs('page')}.",
        f"The object went up in one PUT of {t_put:.1f} s.",
        "Correctness (first run): the sha256 of what boto3 downloaded and of what versionfs (from its disk cache), "
        "rclone (both modes) and s3fs read equals the object's.",
    ]
    return Result(setup, rows, notes)


# -- the X.h5 image ----------------------------------------------------------------------
def ensure_image_files() -> tuple[Path, Path]:
    """The 1 GiB versioned file and a plain h5py copy of its version (made once)."""
    def ok() -> bool:
        try:
            with h5py.File(IMAGE_FILE, "r") as f, h5py.File(IMAGE_PLAIN, "r") as p:
                return all(f"_version_data/versions/v1/d{i}" in f and p[f"d{i}"].shape == (IMAGE_ELEMENTS,)
                           for i in range(IMAGE_DATASETS))
        except (OSError, KeyError):
            return False

    if ok():
        return IMAGE_FILE, IMAGE_PLAIN
    from versioned_hdf5 import VersionedHDF5File

    DATA_DIR.mkdir(exist_ok=True)
    print(f"creating {IMAGE_FILE} and {IMAGE_PLAIN} (1 GiB each, once) ...", file=sys.stderr, flush=True)
    rng = np.random.default_rng(2)
    tmp, tmp_plain = IMAGE_FILE.with_suffix(".h5.tmp"), IMAGE_PLAIN.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f, h5py.File(tmp_plain, "w") as plain:
        with VersionedHDF5File(f).stage_version("v1") as g:
            for i in range(IMAGE_DATASETS):
                data = rng.standard_normal(IMAGE_ELEMENTS)
                g.create_dataset(f"d{i}", data=data, chunks=(IMAGE_CHUNK,))
                plain.create_dataset(f"d{i}", data=data, chunks=(IMAGE_CHUNK,), maxshape=(None,))
    os.replace(tmp, IMAGE_FILE)
    os.replace(tmp_plain, IMAGE_PLAIN)
    return IMAGE_FILE, IMAGE_PLAIN


def bench_image(ctx: Context) -> Result:
    """Open + `h5dump -H` of a 1 GiB version's `latest.h5` on a fresh mount, against the
    same on a plain copy of the version; and a full cold read of each."""
    source, plain = ensure_image_files()
    dropped = True

    def h5dump_header(path: Path) -> str:
        return subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, check=True).stdout

    ref, lookup, header, daemon_read, full_ref, full = [], [], [], [], [], []
    for rep in range(ctx.reps):
        dropped &= drop_caches()
        ref.append(timed(lambda: h5dump_header(plain)))
        with mounted(source) as mnt:
            image = mnt / "latest.h5"
            pid = daemon_pid(mnt)
            dropped &= drop_caches()
            r0, _ = proc_counters(pid)
            # The first lookup builds the image's metadata: timed on its own, and in the total.
            lookup.append(timed(image.stat))
            header.append(lookup[-1] + timed(lambda: h5dump_header(image)))
            r1, _ = proc_counters(pid)
            daemon_read.append(r1 - r0)
            if rep == 0:
                out = h5dump_header(image).replace(str(image), "X")
                assert out == h5dump_header(plain).replace(str(plain), "X"), "h5dump -H differs from the plain copy's"
                with h5py.File(image, "r") as img, h5py.File(plain, "r") as p:
                    for i in range(IMAGE_DATASETS):
                        assert np.array_equal(img[f"d{i}"][::997], p[f"d{i}"][::997]), f"d{i} differs"
            dropped &= drop_caches()
            full.append(timed(lambda: read_sequentially(image)))
            size = image.stat().st_size
        dropped &= drop_caches()
        full_ref.append(timed(lambda: read_sequentially(plain)))

    med = statistics.median
    suffix = "" if dropped else " (cache not dropped)"
    ms = lambda times: med(times) * 1000  # noqa: E731
    share = med(daemon_read) / size
    rows = [
        Row(f"open + `h5dump -H` of the plain copy, cold{suffix} — reference", ms(ref), None, "—", unit="ms", reference=True),
        Row(f"open + `h5dump -H` of `latest.h5` on a fresh mount, cold{suffix}", ms(header), ms(header) / ms(ref),
            f"not proportional to the version's size: reads < 1% of it ({share:.1%}: {'met' if share < 0.01 else '**not met**'}); "
            f"{med(header) / med(full):.0%} of a full cold read's time", unit="ms"),
        Row("… of which the first `stat` (builds the image's metadata)", ms(lookup), ms(lookup) / ms(ref), "— (informative)", unit="ms"),
        Row(f"sequential read of the plain copy, cold{suffix}", mib_s(plain.stat().st_size, med(full_ref)), None, "— (informative)"),
        Row(f"sequential read of `latest.h5`, cold{suffix}", mib_s(size, med(full)), None, "— (informative)"),
    ]
    notes = [
        f"Daemon reads from the source during lookup + `h5dump -H`: {med(daemon_read) / MiB:.1f} MiB "
        f"(the version is {size / MiB:.0f} MiB).",
        "Every run (ms): reference " + " / ".join(f"{t * 1000:.0f}" for t in ref) + "; latest.h5 "
        + " / ".join(f"{t * 1000:.0f}" for t in header) + ".",
        "Correctness: `h5dump -H` output equals the plain copy's; every 997th element of each dataset equals it.",
    ]
    setup = (f"one version of {IMAGE_DATASETS} datasets × {IMAGE_ELEMENTS * 8 // MiB} MiB random float64, "
             f"chunks of {IMAGE_CHUNK * 8 // 1024} KiB ({IMAGE_DATASETS * IMAGE_ELEMENTS // IMAGE_CHUNK} chunks), "
             f"no compression; medians of {ctx.reps} runs")
    return Result(setup, rows, notes)


# -- history/ on S3 ------------------------------------------------------------------------
def bench_history(ctx: Context) -> Result:
    """`ls -l` of one directory's history and of one key's on a bucket of many keys,
    against boto3 listing the same directory / key directly; and the whole prefix."""
    with s3_server() as srv:
        from concurrent.futures import ThreadPoolExecutor

        from s3servers import make_client, make_versioned_bucket

        url = srv.endpoint_url
        s3 = make_client(url)
        bucket = make_versioned_bucket(s3)
        keys = [f"d{d:02d}/k{k:04d}" for d in range(HISTORY_DIRS) for k in range(HISTORY_KEYS)]
        with ThreadPoolExecutor(8) as pool:
            for v in range(HISTORY_VERSIONS):
                list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=f"{key} {v}".encode()), keys))
        directory, key = "d07", "d07/k0123"

        def boto3_list(prefix: str, delimiter: str | None = "/") -> int:
            kwargs = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
            n = 0
            for page in s3.get_paginator("list_object_versions").paginate(**kwargs):
                n += len(page.get("Versions", [])) + len(page.get("DeleteMarkers", [])) + len(page.get("CommonPrefixes", []))
            return n

        def ls(path: Path) -> int:
            out = subprocess.run(["ls", "-l", str(path)], capture_output=True, text=True, check=True).stdout
            return len(out.splitlines()) - 1

        ref_dir, ref_key, ref_all, mount_dir, mount_key, mount_again = [], [], [], [], [], []
        for rep in range(ctx.reps):
            ref_dir.append(timed(lambda: boto3_list(directory + "/")))
            ref_key.append(timed(lambda: boto3_list(key)))
            ref_all.append(timed(lambda: boto3_list("", None)))
            with s3_mounted(url, bucket) as (mnt, _):
                history = mnt / "history"
                os.stat(history)  # the mount itself is not measured
                mount_dir.append(timed(lambda: ls(history / directory)))
                mount_key.append(timed(lambda: ls(history / key)))
                mount_again.append(timed(lambda: ls(history / directory)))
                if rep == 0:
                    assert ls(history / directory) == HISTORY_KEYS, "history/d07 does not list every key"
                    assert ls(history / key) == HISTORY_VERSIONS, "history/d07/k0123 does not list every version"
                    latest = sorted(os.listdir(history / key))[-1]
                    assert (history / key / latest).read_bytes() == f"{key} {HISTORY_VERSIONS - 1}".encode()

    med = statistics.median
    ms = lambda times: med(times) * 1000  # noqa: E731
    rows = [
        Row("boto3: ListObjectVersions of one directory (Delimiter /) — reference", ms(ref_dir), None, "—", unit="ms", reference=True),
        Row(f"`ls -l history/{directory}/` ({HISTORY_KEYS} names), first time on a fresh mount", ms(mount_dir),
            ms(mount_dir) / ms(ref_dir), "a listing per directory, not per prefix: ≪ the whole-prefix listing "
            f"({'met' if ms(mount_dir) < ms(ref_all) / 4 else '**not met**'})", unit="ms"),
        Row(f"`ls -l history/{key}/` ({HISTORY_VERSIONS} entries), first time", ms(mount_key), ms(mount_key) / ms(ref_dir),
            "— (informative)", unit="ms"),
        Row(f"`ls -l history/{directory}/` again (cached)", ms(mount_again), ms(mount_again) / ms(ref_dir), "— (informative)", unit="ms"),
        Row(f"boto3: ListObjectVersions of one key, directly", ms(ref_key), ms(ref_key) / ms(ref_dir), "— (informative)", unit="ms"),
        Row(f"boto3: ListObjectVersions of the whole prefix ({len(keys) * HISTORY_VERSIONS:,} versions)", ms(ref_all),
            ms(ref_all) / ms(ref_dir), "— (what a whole-prefix listing would cost)", unit="ms"),
    ]
    setup = (f"{S3_SERVER} on 127.0.0.1; {HISTORY_DIRS} directories × {HISTORY_KEYS} keys × {HISTORY_VERSIONS} versions; "
             f"medians of {ctx.reps} runs")
    notes = ["Correctness: the directory lists every key, the key every version, and the newest entry holds the newest body."]
    return Result(setup, rows, notes)


def _version_of(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _tool_version(cmd: list[str]) -> str:
    """The version number in the first line a tool prints about itself."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    words = (r.stdout or r.stderr).splitlines()[0].split() if (r.stdout or r.stderr) else []
    return next((w.lstrip("vV") for w in words if w.lstrip("vV")[:1].isdigit()), "?")


BENCHES: dict[str, Callable[[Context], Result]] = {
    "read": bench_read,
    "commit": bench_commit,
    "s3": bench_s3,
    "image": bench_image,
    "history": bench_history,
}


# -- output -------------------------------------------------------------------------
def fmt_table(results: dict[str, Result]) -> str:
    lines = [machine_line() + "  ", *(f"{name}: {r.setup}  " for name, r in results.items())]
    lines += [
        "",
        "| measurement | median | ratio to reference | goal |",
        "|---|---:|---:|---|",
    ]
    notes = []
    for name, result in results.items():
        for row in result.rows:
            if row.reference:
                ratio = "1.00 (reference)"
            else:
                ratio = "—" if row.ratio is None else f"{row.ratio:.2f}× {UNIT_RATIO[row.unit]}"
            lines.append(f"| {name}: {row.measurement} | {fmt_value(row.value, row.unit)} | {ratio} | {row.goal} |")
        notes += [f"- {name}: {n}" for n in result.notes]
    legend = (
        "Ratio to reference: × speed = MiB/s over the reference's MiB/s (higher is better); "
        "× time = time over the reference's time (lower is better); × size = bytes over the reference's bytes."
    )
    return "\n".join(lines + ["", legend, ""] + notes) + "\n"


def fmt_value(value: float, unit: str) -> str:
    if unit == "MiB/s":
        return f"{value:,.0f} MiB/s"
    if unit == "ms":
        return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"
    return f"{value:,.1f} {unit}"


def write_readme(table: str) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + table + text[end:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only this benchmark (repeatable); README is then left alone")
    p.add_argument("--reps", type=lambda v: max(1, int(v)), default=5, help="repetitions per measurement (median reported)")
    args = p.parse_args()
    ctx = Context(reps=args.reps)
    names = args.only or list(BENCHES)
    results = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = BENCHES[name](ctx)
    table = fmt_table(results)
    print(table, end="")
    if not args.only:
        write_readme(table)
        print(f"(written to {README.relative_to(Path.cwd()) if README.is_relative_to(Path.cwd()) else README})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
