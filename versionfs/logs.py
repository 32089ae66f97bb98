"""Logging to stderr: plain for terminals, with syslog priorities for journald.

Under systemd, stderr goes to the journal (``JOURNAL_STREAM`` is set) and a
``<N>`` prefix gives each line its priority. Secrets from the environment never
reach a log line, whatever code produced it.
"""

from __future__ import annotations

import logging
import os
import sys

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


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITIES.get(record.levelno, 6)}>" + super().format(record)


def setup(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for chatty in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.WARNING)
