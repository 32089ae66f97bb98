"""Model-based tests: random file operations applied to staging/ and to a plain
local directory must leave identical trees, after every step and after a remount.

``FastStagingModel`` drives the FUSE handlers without a kernel (``fastfs``), so
it runs thousands of examples in the fast tier; ``StagingModel`` does the same
through a real mount (few examples here, many in the slow tier)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conftest import force_unmount, run_versionfs
from fastfs import FastFS, Loop, local_tree
from helpers import make_versions
from test_staging_tools import tree

NAMES = st.sampled_from(["a", "b", "c.npy", "x.npy", "sub", "deep", "z.npy"])
BASE_PATHS = st.sampled_from(["x.npy", "sub", "sub/deep", "sub/deep/z.npy"])  # what the version has
DIRS = st.sampled_from(["", "sub", "sub/deep", "new"])
DATA = st.binary(max_size=3000)


def outcome(fn):
    """What an operation did: None, or the errno it failed with."""
    try:
        fn()
        return None
    except OSError as e:
        return e.errno


class StagingModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="vfs-model-"))

        def v1(g):
            g.create_dataset("x", data=np.arange(300, dtype="i2"), chunks=(64,))
            deep = g.create_group("sub").create_group("deep")
            deep.create_dataset("z", data=np.ones(20))

        self.source = make_versions(self.tmp / "m.h5", v1)
        self.state = self.tmp / "state"
        self.mnt = self.tmp / "mnt"
        self.mnt.mkdir()
        self._mount()
        self.ref = self.tmp / "ref"
        shutil.copytree(self.mnt / "staging", self.ref)

    def _mount(self):
        result = run_versionfs("mount", str(self.source), str(self.mnt), "--state-dir", str(self.state))
        assert result.returncode == 0, result.stderr
        self.pid = int(os.getxattr(self.mnt, "user.versionfs.pid"))

    def teardown(self):
        force_unmount(self.mnt, getattr(self, "pid", None))
        shutil.rmtree(self.tmp, ignore_errors=True)

    def both(self, fn):
        got = outcome(lambda: fn(self.mnt / "staging"))
        expected = outcome(lambda: fn(self.ref))
        assert got == expected, (got, expected)

    @rule(d=DIRS, name=NAMES, data=DATA)
    def write(self, d, name, data):
        self.both(lambda base: (base / d / name).write_bytes(data))

    @rule(d=DIRS, name=NAMES, data=DATA, offset=st.integers(0, 5000))
    def write_at(self, d, name, data, offset):
        def op(base):
            fd = os.open(base / d / name, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(op)

    @rule(d=DIRS, name=NAMES, data=DATA)
    def append(self, d, name, data):
        self.both(lambda base: open(base / d / name, "ab").write(data))

    @rule(d=DIRS, name=NAMES, size=st.integers(0, 5000))
    def truncate(self, d, name, size):
        self.both(lambda base: os.truncate(base / d / name, size))

    @rule(d=DIRS, name=NAMES)
    def unlink(self, d, name):
        self.both(lambda base: os.unlink(base / d / name))

    @rule(d=DIRS, name=NAMES)
    def mkdir(self, d, name):
        self.both(lambda base: os.mkdir(base / d / name))

    @rule(d=DIRS, name=NAMES)
    def rmdir(self, d, name):
        self.both(lambda base: os.rmdir(base / d / name))

    @rule(d=DIRS)
    def rm_rf(self, d):
        if d:
            self.both(lambda base: shutil.rmtree(base / d))

    @rule(d1=DIRS, n1=NAMES, d2=DIRS, n2=NAMES)
    def rename(self, d1, n1, d2, n2):
        self.both(lambda base: os.rename(base / d1 / n1, base / d2 / n2))

    @rule(path=BASE_PATHS, d=DIRS, name=NAMES)
    def rename_from_base(self, path, d, name):
        self.both(lambda base: os.rename(base / path, base / d / name))

    @rule(path=BASE_PATHS)
    def remove_from_base(self, path):
        self.both(lambda base: shutil.rmtree(base / path) if (base / path).is_dir() else os.unlink(base / path))

    @rule(d=DIRS, name=NAMES, mtime=st.integers(0, 2**31))
    def utime(self, d, name, mtime):
        self.both(lambda base: os.utime(base / d / name, (mtime, mtime)))

    @rule()
    def remount(self):
        result = run_versionfs("umount", str(self.mnt))
        assert result.returncode == 0, result.stderr
        self._mount()

    @invariant()
    def same_tree(self):
        if hasattr(self, "ref"):
            assert tree(self.mnt / "staging") == tree(self.ref)


TestStagingModel = StagingModel.TestCase
TestStagingModel.settings = settings(
    max_examples=5, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class LongStagingModel(StagingModel):
    pass


TestLongStagingModel = pytest.mark.timeout(3600)(pytest.mark.slow(LongStagingModel.TestCase))
TestLongStagingModel.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- without a kernel: thousands of examples ----------------------------------------------
def _v1(g):
    g.create_dataset("x", data=np.arange(300, dtype="i2"), chunks=(64,))
    deep = g.create_group("sub").create_group("deep")
    deep.create_dataset("z", data=np.ones(20))


class _Shared:
    """One source, one loop and one FastFS for every example (staging is
    discarded between examples; a remount rule opens the spool again)."""

    fast: FastFS | None = None
    tmp: Path | None = None

    @classmethod
    def get(cls) -> tuple[FastFS, Path]:
        if cls.fast is None:
            cls.tmp = Path(tempfile.mkdtemp(prefix="vfs-fastmodel-"))
            source = make_versions(cls.tmp / "m.h5", _v1)
            cls.fast = FastFS(str(source), str(cls.tmp / "state"), Loop())
            atexit.register(cls.close)
            cls.template = cls.tmp / "template"
            cls.template.mkdir()
            for path, content in (("x.npy", cls.fast.read_bytes("latest/x.npy")),
                                  ("sub/deep/z.npy", cls.fast.read_bytes("latest/sub/deep/z.npy"))):
                (cls.template / path).parent.mkdir(parents=True, exist_ok=True)
                (cls.template / path).write_bytes(content)
        return cls.fast, cls.tmp

    @classmethod
    def close(cls) -> None:
        try:
            cls.fast.close()
        except RuntimeError:  # at exit the worker's pool may be shut down already
            cls.fast.overlay.store.close()
            cls.fast.backend.close()
        cls.fast.loop.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)


FAST_NAMES = st.sampled_from(["a", "b", "c.npy", "x.npy", "sub", "deep", "z.npy", "l"])
LINK_TARGETS = st.sampled_from(["a", "x.npy", "sub/deep", "nowhere", "deep/../a", "l"])  # never out of the tree


class FastStagingModel(RuleBasedStateMachine):
    """StagingModel's operations (and symlinks, chmod, unlink of open files)
    through the FUSE handlers, compared with a local directory."""

    @initialize()
    def setup(self):
        self.fs, tmp = _Shared.get()
        self.fs.discard()
        self.ref = Path(tempfile.mkdtemp(prefix="ref-", dir=tmp))
        os.rmdir(self.ref)
        shutil.copytree(_Shared.template, self.ref)
        self.open_files = []  # (fh, local fd)

    def teardown(self):
        for fh, fd in getattr(self, "open_files", []):
            self.fs.close_fh(fh)
            os.close(fd)
        if hasattr(self, "ref"):
            shutil.rmtree(self.ref, ignore_errors=True)

    def both(self, staged, local):
        got = outcome(lambda: staged(lambda p: f"staging/{p.strip('/')}".rstrip("/")))
        expected = outcome(lambda: local(lambda p: str(self.ref / p.strip("/"))))
        assert got == expected, (got, expected)

    @rule(d=DIRS, name=FAST_NAMES, data=DATA)
    def write(self, d, name, data):
        self.both(lambda p: self.fs.write_bytes(p(f"{d}/{name}"), data), lambda p: Path(p(f"{d}/{name}")).write_bytes(data))

    @rule(d=DIRS, name=FAST_NAMES, data=DATA, offset=st.integers(0, 5000))
    def write_at(self, d, name, data, offset):
        def local(p):
            fd = os.open(p(f"{d}/{name}"), os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(lambda p: self.fs.write_bytes(p(f"{d}/{name}"), data, offset), local)

    @rule(d=DIRS, name=FAST_NAMES, data=DATA)
    def append(self, d, name, data):
        self.both(lambda p: self.fs.write_bytes(p(f"{d}/{name}"), data, append=True),
                  lambda p: open(p(f"{d}/{name}"), "ab").write(data))

    @rule(d=DIRS, name=FAST_NAMES, size=st.integers(0, 5000))
    def truncate(self, d, name, size):
        self.both(lambda p: self.fs.truncate(p(f"{d}/{name}"), size), lambda p: os.truncate(p(f"{d}/{name}"), size))

    @rule(d=DIRS, name=FAST_NAMES)
    def unlink(self, d, name):
        self.both(lambda p: self.fs.unlink(p(f"{d}/{name}")), lambda p: os.unlink(p(f"{d}/{name}")))

    @rule(d=DIRS, name=FAST_NAMES)
    def mkdir(self, d, name):
        self.both(lambda p: self.fs.mkdir(p(f"{d}/{name}"), 0o755), lambda p: os.mkdir(p(f"{d}/{name}"), 0o755))

    @rule(d=DIRS, name=FAST_NAMES)
    def rmdir(self, d, name):
        self.both(lambda p: self.fs.rmdir(p(f"{d}/{name}")), lambda p: os.rmdir(p(f"{d}/{name}")))

    @rule(d=DIRS)
    def rm_rf(self, d):
        if d:
            self.both(lambda p: self.fs.rmtree(p(d)), lambda p: shutil.rmtree(p(d)))

    @rule(d1=DIRS, n1=FAST_NAMES, d2=DIRS, n2=FAST_NAMES)
    def rename(self, d1, n1, d2, n2):
        def local(p):
            src, dst = p(f"{d1}/{n1}"), p(f"{d2}/{n2}")
            os.rename(src, dst)
        self.both(lambda p: self.fs.rename(p(f"{d1}/{n1}"), p(f"{d2}/{n2}")), local)

    @rule(path=BASE_PATHS, d=DIRS, name=FAST_NAMES)
    def rename_from_base(self, path, d, name):
        self.both(lambda p: self.fs.rename(p(path), p(f"{d}/{name}")), lambda p: os.rename(p(path), p(f"{d}/{name}")))

    @rule(d=DIRS, name=FAST_NAMES, to=LINK_TARGETS)
    def symlink(self, d, name, to):
        self.both(lambda p: self.fs.symlink(to, p(f"{d}/{name}")), lambda p: os.symlink(to, p(f"{d}/{name}")))

    @rule(d=DIRS, name=FAST_NAMES, mode=st.sampled_from([0, 0o600, 0o755, 0o4755, 0o2711, 0o1777]))
    def chmod(self, d, name, mode):
        self.both(lambda p: self.fs.setattr(p(f"{d}/{name}"), mode=mode), lambda p: os.chmod(p(f"{d}/{name}"), mode))

    @rule(d=DIRS, name=FAST_NAMES, data=DATA)
    def open_then_unlink(self, d, name, data):
        """A file unlinked while open keeps its content for its descriptor."""
        path = f"{d}/{name}".strip("/")
        try:
            fd = os.open(self.ref / path, os.O_RDWR)
        except OSError as e:
            with pytest.raises(OSError) as got:
                self.fs.open(f"staging/{path}".replace("//", "/"), os.O_RDWR)
            assert got.value.errno == e.errno
            return
        fh = self.fs.open(f"staging/{path}".replace("//", "/"), os.O_RDWR)
        self.open_files.append((fh, fd))
        self.both(lambda p: self.fs.unlink(p(path)), lambda p: os.unlink(p(path)))
        os.pwrite(fd, data, 3)
        self.fs.write(fh, 3, data)
        assert self.fs.read(fh, 0, 10000) == os.pread(fd, 10000, 0)

    @rule()
    def close_open_files(self):
        for fh, fd in self.open_files:
            assert self.fs.read(fh, 0, 10000) == os.pread(fd, 10000, 0)
            self.fs.close_fh(fh)
            os.close(fd)
        self.open_files = []

    @rule()
    def remount(self):
        if not self.open_files:
            self.fs.remount()

    @invariant()
    def same_tree(self):
        if hasattr(self, "ref"):
            assert self.fs.tree("staging") == local_tree(str(self.ref))


TestFastStagingModel = FastStagingModel.TestCase
TestFastStagingModel.settings = settings(
    max_examples=int(os.environ.get("FAST_MODEL_EXAMPLES", 1000)), stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
