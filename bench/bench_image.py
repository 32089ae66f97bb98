"""Open and h5dump -H of a version's .h5 image, against a plain copy."""


import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from harness import (DATA_DIR, Context, MiB, Result, Row, daemon_pid, drop_caches, mib_s, mounted, proc_counters,
    read_sequentially, timed)

# The image benchmark: a 1 GiB version (4 datasets of 256 MiB random float64, 256 KiB
# chunks: 4096 chunks whose places the image's metadata must record) and a plain copy.
IMAGE_FILE = DATA_DIR / "image.h5"
IMAGE_PLAIN = DATA_DIR / "image_plain.h5"
IMAGE_DATASETS = 4
IMAGE_ELEMENTS = 32 * MiB  # float64 per dataset: 256 MiB
IMAGE_CHUNK = 1 << 15  # 256 KiB chunks


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


def same_but_max_dims(header: str) -> str:
    """An h5dump header without the datasets' maximum dimensions: an image's unfiltered
    datasets have fixed ones (doc/SEMANTICS.md § Images: X.h5), the library's are unlimited."""
    return re.sub(r"\) / \( [^)]*\)", ")", header)


def run(ctx: Context) -> Result:
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
                out = same_but_max_dims(h5dump_header(image).replace(str(image), "X"))
                assert out == same_but_max_dims(h5dump_header(plain).replace(str(plain), "X")), \
                    "h5dump -H differs from the plain copy's"
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


