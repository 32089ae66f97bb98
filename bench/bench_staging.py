"""staging/ as a file system: many small files, and a small edit of a big one."""


import os
import statistics
import subprocess
from pathlib import Path

from bench_read import BIG_ELEMENTS, ensure_big_file  # the same 512 MiB dataset
from harness import Context, Result, Row, mounted, scratch_dir, timed, versionfs

DIRS, FILES_PER_DIR, FILE_BYTES = 80, 100, 1024
EDIT_BYTES = 24


def make_tree(root: Path) -> None:
    """80 directories of 100 files of 1 KiB (different bytes each)."""
    for d in range(DIRS):
        directory = root / f"d{d:02d}"
        directory.mkdir(parents=True)
        for f in range(FILES_PER_DIR):
            (directory / f"f{f:03d}.dat").write_bytes(os.urandom(FILE_BYTES))


def rsync(src: Path, dst: Path) -> None:
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)


def rm_rf(path: Path) -> None:
    subprocess.run(["rm", "-rf", str(path)], check=True)


def edit(path: Path) -> None:
    with open(path, "r+b", buffering=0) as f:
        f.seek(128 + 8 * (BIG_ELEMENTS // 2))  # the middle of the data, past the header
        assert f.write(b"\x01" * EDIT_BYTES) == EDIT_BYTES


def run(ctx: Context) -> Result:
    """rsync -a of 8,000 small files into staging/ and rm -rf of them, against the
    same into a local directory; and a 24-byte edit of a 512 MiB staged .npy."""
    n = DIRS * FILES_PER_DIR
    local_rsync, local_rm, staged_rsync, staged_rm = [], [], [], []
    first_edit, again_edit = [], []
    with scratch_dir() as tmp:
        src = tmp / "src"
        make_tree(src)
        empty = tmp / "empty.h5"
        versionfs("init", str(empty))
        for _ in range(ctx.reps):
            local = tmp / "local"
            local_rsync.append(timed(lambda: rsync(src, local)))
            local_rm.append(timed(lambda: rm_rf(local)))
        with mounted(empty) as mnt:
            for _ in range(ctx.reps):
                target = mnt / "staging/tree"
                staged_rsync.append(timed(lambda: rsync(src, target)))
                staged_rm.append(timed(lambda: rm_rf(target)))
                versionfs("discard", str(mnt))
        big = ensure_big_file()
        for _ in range(ctx.reps):
            with mounted(big) as mnt:
                staged = mnt / "staging/big.npy"
                os.stat(staged)  # the lookup is not the edit's cost
                first_edit.append(timed(lambda: edit(staged)))
                again_edit.append(timed(lambda: edit(staged)))
                blobs = list((mnt.parent / "state").rglob("blobs/*"))  # mounted(): its state beside the mount
                allocated = sum(p.stat().st_blocks * 512 for p in blobs)
    med = statistics.median
    ms = lambda xs: med(xs) * 1000  # noqa: E731
    rows = [
        Row(f"`rsync -a` of {n:,} files of 1 KiB ({DIRS} dirs × {FILES_PER_DIR}) into a local directory — reference",
            ms(local_rsync), None, "—", "ms", reference=True),
        Row("`rsync -a` of the same into `staging/`", ms(staged_rsync), med(staged_rsync) / med(local_rsync), "≤ 5×", "ms"),
        Row("`rm -rf` of them, local directory — reference", ms(local_rm), None, "—", "ms", reference=True),
        Row("`rm -rf` of them in `staging/`", ms(staged_rm), med(staged_rm) / med(local_rm), "— (informative)", "ms"),
        Row(f"open `r+b`, write {EDIT_BYTES} bytes, close: `staging/big.npy` (512 MiB, of the base: sparse copy-up)",
            ms(first_edit), None, f"≤ 50 ms ({'met' if ms(first_edit) <= 50 else 'not met'})", "ms"),
        Row("… the same again (the file is staged now)", ms(again_edit), None, "— (informative)", "ms"),
        Row("spool space that edit took (allocated blocks)", allocated / (1 << 20), None, "one chunk row + header", "MiB"),
    ]
    return Result(
        setup=f"staging/: rsync -a of {n:,} files of {FILE_BYTES} B, rm -rf of them, and a {EDIT_BYTES}-byte edit of "
              "the 512 MiB dataset of `read` (2 MiB chunks); medians of the repetitions",
        rows=rows,
    )
