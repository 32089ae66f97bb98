"""Every error class versionfs raises on purpose, their exit codes, and the one
classification of failures into an errno and a log level (``classify``).

Backends translate their libraries' failures into the ``StoreError`` family
(so nothing here imports boto3 or h5py); ``fs.py`` and staging answer the
kernel with ``classify(e).errno`` and log at ``classify(e).level``.
"""

from __future__ import annotations

import errno as _errno
import logging
import sqlite3
from dataclasses import dataclass

EXIT_OK, EXIT_ERROR, EXIT_CONFLICT = 0, 1, 3


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback (exit 1)."""

    exit_code = EXIT_ERROR


class SourceError(UserError):
    """The source (an HDF5 file, an S3 prefix) cannot be used as asked."""


class ConflictError(UserError):
    """Someone else changed what a commit was about to change (exit code 3)."""

    exit_code = EXIT_CONFLICT


class CommitRefused(UserError):
    """The commit cannot be made as asked; staging is kept as it is."""


class CommitError(UserError):
    """Staged content the format cannot take; the message names the path."""


class Conflict(ConflictError):
    """Paths changed in staging and also in the latest version since staging's base."""

    def __init__(self, base: str, latest: str, paths: list[str]):
        lines = "\n".join(f"  {p}" for p in paths)
        super().__init__(
            f"conflict: changed in staging and also in {latest} since staging's base {base}:\n{lines}\n"
            "staging is kept; discard it or undo those paths, then commit again"
        )
        self.paths = paths


class ControlError(UserError):
    """A control request the daemon refused, or could not be asked."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class FileBusy(Exception):
    """Another process holds the file's lock."""


class SpoolBusy(UserError):
    """Another mount holds this source's staging (spool.py's one-mount lock)."""


class JournalRefused(SourceError):
    """A leftover commit journal that does not belong to the file as it is now:
    nothing is rolled back (journal.py)."""


class FsError(Exception):
    """A file-system answer other than success: carries the errno to return."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


def enoent(message: str = "") -> FsError:
    return FsError(_errno.ENOENT, message)


class StoreError(Exception):
    """A failure of the store behind a backend that is not a bug of versionfs:
    said once at WARNING, answered with ``errno``."""

    errno = _errno.EIO


class StoreUnavailable(StoreError):
    """The store did not answer in time, or kept failing, after every retry."""


class AccessDenied(StoreError):
    """The store refuses the credentials for this object."""

    errno = _errno.EACCES


class DamagedData(StoreError):
    """Stored bytes that cannot be decoded (a damaged chunk)."""


def exit_code(error: BaseException) -> int:
    """The exit code a failure ends a command with: a UserError's own, else 1."""
    return error.exit_code if isinstance(error, UserError) else EXIT_ERROR


@dataclass(frozen=True)
class Failure:
    """How one failure is answered and logged."""

    errno: int
    level: int  # a logging level
    bug: bool  # unexpected: logged with its traceback


def classify(error: BaseException) -> Failure:
    """The errno and log level of a failure (the one place that decides them)."""
    if isinstance(error, FsError):
        return Failure(error.errno, logging.DEBUG, False)
    if isinstance(error, StoreError):
        return Failure(error.errno, logging.WARNING, False)
    if isinstance(error, sqlite3.OperationalError) and "full" in str(error):
        return Failure(_errno.ENOSPC, logging.WARNING, False)
    if isinstance(error, OSError) and error.errno:  # a system call's answer (ENOSPC, EDQUOT, …)
        return Failure(error.errno, logging.WARNING, False)
    return Failure(_errno.EIO, logging.ERROR, True)
