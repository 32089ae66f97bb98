"""What ``mount.fuse.versionfs`` does with the arguments mount(8) gives it.

mount(8) runs ``mount.fuse.versionfs SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTS]``.
Options that are mount(8)'s or fstab's own business (``options.IGNORED``:
``_netdev``, ``nofail``, ``noauto``, ``defaults``, …, and ``x-*``) are dropped;
the rest go to ``versionfs mount -o``, which takes every option of the options
table by its name (``state_dir=``, ``cache_size=``, …) and passes any other to FUSE.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple, Sequence

from .options import IGNORED, split_words


class HelperCall(NamedTuple):
    argv: list[str]  # the ``versionfs`` arguments
    fake: bool  # a dry run (``-f``: mount(8)'s "fake")


def mount_argv(argv: Sequence[str]) -> HelperCall:
    """What a mount(8) helper call asks of ``versionfs``."""
    p = argparse.ArgumentParser(prog="mount.fuse.versionfs", add_help=False)
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-s", "-n", "-v", dest="ignored", action="store_true")
    p.add_argument("-f", dest="fake", action="store_true")
    p.add_argument("-N", dest="namespace")
    p.add_argument("-t", dest="type")
    args = p.parse_args(argv)
    kept = [o for o in split_words(args.options) if o not in IGNORED and not o.startswith("x-")]
    command = ["mount", args.source, args.mountpoint]
    if kept:
        command += ["-o", ",".join(kept)]
    return HelperCall(command, args.fake)
