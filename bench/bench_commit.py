"""Commits of small changes to a big dataset, and CLI start-up."""


import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from versionfs.control import request as control_request

from bench_read import BIG_CHUNK, BIG_ELEMENTS, BIG_H5PATH, BIG_VERSION, ensure_big_file  # the same input
from harness import (Context, MiB, Result, Row, daemon_pid, drop_caches, mib_s, mounted, proc_io, read_npy_header,
    scratch_dir, timed, timed_versionfs)

# The commit benchmark's change to that dataset: one element in every 100th chunk (1%).
COMMIT_STRIDE = 100
COMMIT_NAME = "v2"
CLI_RUNS = 3  # unchanged commits and `--version` runs per repetition


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


def run(ctx: Context) -> Result:
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


