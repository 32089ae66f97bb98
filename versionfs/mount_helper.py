"""What ``mount.fuse.versionfs`` does with the arguments mount(8) gives it.

mount(8) runs ``mount.fuse.versionfs SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTS]``.
Options that are mount(8)'s or fstab's own business (``_netdev``, ``nofail``,
``noauto``, ``auto``, ``user``, ``users``, ``defaults``, ``x-*``) are dropped;
``state_dir=``, ``autocommit=``, ``endpoint_url=``, ``cache_dir=``,
``cache_size=``, ``readahead_memory=`` and ``store_timeout=`` become versionfs flags; everything else goes to FUSE as ``-o``.
"""

from __future__ import annotations

import argparse
from typing import Sequence

IGNORED = frozenset({"_netdev", "nofail", "noauto", "auto", "user", "users", "nouser", "defaults"})
FLAGS = {
    "state_dir": "--state-dir", "autocommit": "--autocommit", "endpoint_url": "--endpoint-url",
    "cache_dir": "--cache-dir", "cache_size": "--cache-size", "readahead_memory": "--readahead-memory",
    "store_timeout": "--store-timeout",
}


def mount_argv(argv: Sequence[str]) -> tuple[list[str], bool]:
    """The ``versionfs`` arguments for a mount(8) helper call, and whether the
    call is a dry run (``-f``: mount(8)'s "fake")."""
    p = argparse.ArgumentParser(prog="mount.fuse.versionfs", add_help=False)
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-s", "-n", "-v", dest="ignored", action="store_true")
    p.add_argument("-f", dest="fake", action="store_true")
    p.add_argument("-N", dest="namespace")
    p.add_argument("-t", dest="type")
    args = p.parse_args(argv)
    flags, fuse = [], []
    for option in (o for group in args.options for o in group.split(",") if o):
        name, _, value = option.partition("=")
        if option in IGNORED or name.startswith("x-"):
            continue
        if name in FLAGS:
            flags += [FLAGS[name], value]
        else:
            fuse.append(option)
    command = ["mount", args.source, args.mountpoint, *flags]
    if fuse:
        command += ["-o", ",".join(fuse)]
    return command, args.fake
