"""Logging to stderr: plain for terminals, with syslog priorities for journald.

Under systemd, stderr goes to the journal (``JOURNAL_STREAM`` is set) and a
``<N>`` prefix gives each line its priority. Secrets from the environment never
reach a log line, whatever code produced it. A record logged with
``extra=once(key)`` is said once per key (``_Once``): the one log-once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Hashable

SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        secrets = [os.environ[v] for v in SECRET_VARIABLES if len(os.environ.get(v, "")) >= 8]
        if secrets:
            message = record.getMessage()
            for secret in secrets:
                message = message.replace(secret, "[redacted]")
            record.msg, record.args = message, None
        return True


def once(key: Hashable) -> dict[str, Any]:
    """``log.warning(msg, *args, extra=once(key))``: said the first time per key
    and process only (a name that cannot be shown is looked up again and again)."""
    return {ONCE: key}


ONCE = "versionfs_once"


class _Once(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()  # backends log from several threads

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, ONCE, None)
        if key is None:
            return True
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITIES.get(record.levelno, 6)}>" + super().format(record)


def setup(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    handler.addFilter(_Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for chatty in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.WARNING)
