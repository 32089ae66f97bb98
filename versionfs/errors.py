"""Errors that carry their own meaning to the user or the kernel."""

from __future__ import annotations

import errno as _errno


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


class SourceError(UserError):
    """The source (an HDF5 file, an S3 prefix) cannot be used as asked."""


class ConflictError(UserError):
    """Someone else changed what a commit was about to change (exit code 3)."""

    exit_code = 3


class FsError(Exception):
    """A file-system answer other than success: carries the errno to return."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


def enoent(message: str = "") -> FsError:
    return FsError(_errno.ENOENT, message)
