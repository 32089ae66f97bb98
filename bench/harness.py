"""The bench harness: rows and tables, timing, cache dropping, mounts (versionfs,
rclone, s3fs), the S3 server, and the README writer. Each benchmark group is
a module ``bench_<group>.py`` with one ``run(ctx) -> Result``; ``run.py`` runs them."""


import contextlib
import datetime as dt
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "data"  # git-ignored; big inputs are made once and kept
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results -->", "<!-- /results -->"
MiB = 1 << 20
READ_BUFFER = 1 * MiB  # like cp
S3_SERVER = "ministack"  # of tests/s3servers.py; see bench/README.md for why not moto
RCLONE_REMOTE = "vfsbench"  # configured by RCLONE_CONFIG_VFSBENCH_* variables only
MOUNT_TIMEOUT = 30.0  # seconds for rclone / s3fs to show their mount


UNIT_RATIO = {"MiB/s": "speed", "ms": "time", "MiB": "size", "bytes": "size", "requests": "count"}  # what a row's ratio compares


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



# -- S3 --------------------------------------------------------------------------------


@contextlib.contextmanager
def s3_server() -> Iterator["object"]:
    """A ``tests/s3servers.py`` server on 127.0.0.1 (ministack, with ranged GETs of a
    version: see ``s3servers.MINISTACK_RANGE_FIX``); always stopped."""
    tests = str(BENCH_DIR.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import s3servers

    with s3servers.S3Server(S3_SERVER, versioned_range_fix=True) as srv:
        yield srv


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
def s3_mounted(url: str, bucket: str, *extra: str) -> Iterator[tuple[Path, Path]]:
    """A versionfs mount of s3://``bucket`` with a fresh, throw-away cache and state
    directory: (mount point, cache directory); always unmounted."""
    tmp = Path(tempfile.mkdtemp(prefix="versionfs-bench-s3-"))
    mnt, cache, state = tmp / "mnt", tmp / "cache", tmp / "state"
    mnt.mkdir()
    env = s3_env(tmp)
    try:
        r = versionfs("mount", f"s3://{bucket}", str(mnt), "--endpoint-url", url, "--cache-dir", str(cache),
                      "--state-dir", str(state), *extra, check=False, env=env)
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

