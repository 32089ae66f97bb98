"""Read-only everywhere, and no failure ever ends the daemon."""

from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest

from helpers import damaged_file, make_versions


@pytest.fixture(scope="module")
def ro(tmp_path_factory, module_mount):
    def step(g):
        g.create_dataset("x", data=np.arange(100))
        g.create_group("grp").create_dataset("y", data=np.arange(3))

    return module_mount(make_versions(tmp_path_factory.mktemp("ro") / "ro.h5", step))


def _errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


@pytest.mark.parametrize("where", ["", "latest", "versions", "versions/v1", "latest/grp", "@-1", "@0/grp",
                                   "history", "history/x.npy"])
def test_every_change_is_erofs(ro, where):
    d = ro.path / where
    file = next((p for p in d.iterdir() if p.is_file()), None) if where not in ("", "versions") else None
    attempts = {
        "create": lambda: os.open(d / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        "mkdir": lambda: os.mkdir(d / "newdir"),
        "symlink": lambda: os.symlink("x", d / "link"),
        "mknod": lambda: os.mkfifo(d / "fifo"),
        "chmod dir": lambda: os.chmod(d, 0o777),
        "utime dir": lambda: os.utime(d, (0, 0)),
        "setxattr dir": lambda: os.setxattr(d, "user.x", b"1"),
    }
    if file is not None:
        attempts |= {
            "open for write": lambda: os.open(file, os.O_WRONLY),
            "open rw": lambda: os.open(file, os.O_RDWR),
            "open append": lambda: os.open(file, os.O_WRONLY | os.O_APPEND),
            "open trunc": lambda: os.open(file, os.O_RDONLY | os.O_TRUNC),
            "truncate": lambda: os.truncate(file, 0),
            "unlink": lambda: os.unlink(file),
            "rename": lambda: os.rename(file, d / "moved"),
            "link": lambda: os.link(file, d / "hard"),
            "chmod": lambda: os.chmod(file, 0o777),
            "utime": lambda: os.utime(file, (0, 0)),
            "setxattr": lambda: os.setxattr(file, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(file, "user.x"),
        }
    subdirs = [p for p in d.iterdir() if p.is_dir()]
    if subdirs:
        attempts["rmdir"] = lambda: os.rmdir(subdirs[0])
    for what, attempt in attempts.items():
        assert _errno_of(attempt) == errno.EROFS, what


def test_names_too_long_and_missing(ro):
    assert _errno_of(os.stat, ro.path / "latest" / ("n" * 256)) == errno.ENAMETOOLONG
    assert _errno_of(os.stat, ro.path / "latest/nothing.npy") == errno.ENOENT
    assert _errno_of(os.stat, ro.path / "versions/nope") == errno.ENOENT
    assert _errno_of(os.listdir, ro.path / "latest/x.npy") == errno.ENOTDIR
    assert _errno_of(os.stat, ro.path / "history/nothing.npy") == errno.ENOENT
    assert _errno_of(os.stat, ro.path / "history" / ("n" * 256)) == errno.ENAMETOOLONG
    assert _errno_of(os.stat, ro.path / "history/x.npy/0000_nope") == errno.ENOENT
    assert _errno_of(os.readlink, ro.path / "history/x.npy/0000_nope") == errno.ENOENT
    assert _errno_of(os.readlink, ro.path / "latest.h5") == errno.EINVAL  # not a link
    assert _errno_of(os.stat, ro.path / "versions/nope.h5") == errno.ENOENT
    assert os.statvfs(ro.path).f_namemax == 255


def test_a_damaged_chunk_is_eio_logged_once_and_the_daemon_lives_on(tmp_path, mount):
    m = mount(damaged_file(tmp_path / "damaged.h5", chunk=2**18, damaged=3))
    for _ in range(3):
        assert _errno_of(lambda: (m.path / "latest/z.npy").read_bytes()) == errno.EIO
    assert np.load(m.path / "latest/ok.npy").tolist() == list(range(10))
    with open(m.path / "latest/z.npy", "rb") as f:  # undamaged chunks still read
        f.seek(128)
        assert np.frombuffer(f.read(2**18 * 8), "f8").tolist() == list(range(2**18))
    # The store's condition, not a bug: one warning naming the dataset, no traceback.
    assert m.log.count("damaged chunk") == 1 and "/z" in m.log, m.log
    assert "answering EIO" not in m.log and "Traceback" not in m.log
    assert subprocess.run(["ls", str(m.path / "versions")], capture_output=True).returncode == 0
