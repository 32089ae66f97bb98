"""Which mounts there are, and which versionfs mount a path is in (from
/proc/self/mountinfo: no request to any file system). Light on purpose: the
CLI's daemon commands import it before anything else."""

from __future__ import annotations

import os
import re

from .errors import UserError

FSTYPE = "fuse.versionfs"
# What a mount's root tells about it (the daemon publishes them; commands read them).
XATTR_PID = "user.versionfs.pid"
XATTR_SOURCE = "user.versionfs.source"
XATTR_ENDPOINT = "user.versionfs.endpoint"


def mounts() -> list[tuple[str, str]]:
    """(mount point, file-system type) of every mount, in mount order."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
                out.append((mnt, fields[fields.index("-") + 1]))
    except OSError:
        pass
    return out


def mount_fstype(path: str) -> str | None:
    """The file-system type mounted exactly at ``path``."""
    path = os.path.realpath(path)
    return next((fstype for mnt, fstype in reversed(mounts()) if mnt == path), None)


def versionfs_mount_of(path: str) -> str | None:
    """The root of the versionfs mount that ``path`` is in (or is), if any; also
    for a path that does not exist (``latest/deleted.npy``)."""
    path = os.path.realpath(path)
    best = ("", None)
    for mnt, fstype in mounts():  # the deepest one; of two on one path, the later (the one seen)
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype)
    return best[0] if best[1] == FSTYPE else None


def mount_root(path: str) -> str:
    """The mount a path is in, for the commands that talk to its daemon."""
    mountpoint = versionfs_mount_of(path)
    if mountpoint is None:
        raise UserError(f"{path}: not in a versionfs mount")
    return mountpoint
