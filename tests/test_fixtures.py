"""The mount fixtures' own promise: a daemon that answered EIO fails the test."""

from __future__ import annotations

import pytest

from conftest import Mount, Mounter, fail_on_unexpected_eio


def mounter_with_log(tmp_path, text: str) -> Mounter:
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "versionfs.log").write_text(text)
    mounter = Mounter(None)
    mounter.made.append(Mount("src.h5", tmp_path / "mnt", state))
    return mounter


def test_an_unexpected_eio_fails_the_test(tmp_path, request):
    line = "2026-12-02 01:00:00 ERROR versionfs.fs: read failed, answering EIO: KeyError('x')\n"
    with pytest.raises(pytest.fail.Exception, match="answered EIO"):
        fail_on_unexpected_eio(request, mounter_with_log(tmp_path, "INFO mounted\n" + line))
    fail_on_unexpected_eio(request, mounter_with_log(tmp_path / "quiet", "INFO mounted\n"))  # nothing to say


@pytest.mark.eio_expected
def test_a_test_marked_eio_expected_may_see_it(tmp_path, request):
    fail_on_unexpected_eio(request, mounter_with_log(tmp_path, "read failed, answering EIO: x\n"))
