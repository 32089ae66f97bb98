"""Model-based test: random file operations applied to staging/ and to a plain
local directory must leave identical trees, after every step and after a remount."""

from __future__ import annotations

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
    max_examples=20, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class LongStagingModel(StagingModel):
    pass


TestLongStagingModel = pytest.mark.timeout(3600)(pytest.mark.slow(LongStagingModel.TestCase))
TestLongStagingModel.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
