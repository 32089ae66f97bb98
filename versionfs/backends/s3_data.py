"""S3's data plane: requests for content (ranged GETs into preallocated buffers,
HEADs for metadata), each bounded in time as a whole.

Every attempt has short timeouts (``CONNECT_TIMEOUT`` to connect,
``READ_TIMEOUT`` without a byte from the store); a reset, a timeout, a 5xx, a
throttling answer or a body cut short is retried with backoff (full jitter),
while another attempt can still end within the overall bound
(``--store-timeout``, retries and waiting for a free connection included, even
if that attempt hangs for as long as its timeouts allow); then
``StoreUnavailable``, which the daemon
answers with EIO and one log line. Nothing that failed is kept anywhere.
At most ``MAX_GETS`` requests are in flight at once, across all open files.
"""

from __future__ import annotations

import http.client
import logging
import random
import threading
import time
from typing import Any, Callable, TypeVar

from ..errors import AccessDenied, StoreError, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 3.0  # seconds to connect, per attempt
READ_TIMEOUT = 5.0  # seconds without a byte from the store, per attempt
PROBE_TIMEOUT = 2.0  # the mount's first request (tiny), twice: a dead endpoint is said within 10 s
MAX_GETS = 24  # requests in flight at once, all files together
BACKOFF_BASE, BACKOFF_CAP = 0.05, 2.0  # seconds: attempt n waits up to min(cap, base * 2**n)
RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                         "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable"})


class _Retry(Exception):
    """An attempt that may succeed if tried again (its cause in ``__cause__``)."""


class ShortBody(Exception):
    """The store sent fewer (or more) bytes than the range asked for."""


class Requests:
    """Bounded, retried requests on one boto3 client of their own (no retries of
    botocore's: the bound here covers them all)."""

    def __init__(self, endpoint_url: str | None, timeout: float, description: str):
        import boto3
        from botocore.config import Config

        self.timeout, self.description = timeout, description
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT, max_pool_connections=MAX_GETS + 4))
        self._slots = threading.BoundedSemaphore(MAX_GETS)

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def call(self, what: str, attempt: Callable[[], T], deadline: float | None = None) -> T:
        """``attempt()`` until it succeeds, fails for good, or ``deadline`` passes."""
        deadline = deadline if deadline is not None else self.deadline()
        tries = 0
        while True:
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise StoreUnavailable(f"{what}: no answer from the store within {self.timeout:g}s (every connection busy)")
            try:
                return _classified(attempt)
            except _Retry as e:
                tries += 1
                cause = e.__cause__
                log.debug("%s: attempt %d failed: %s: %s", what, tries, type(cause).__name__, cause)
            finally:
                self._slots.release()
            pause = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**tries))
            # Another attempt only if it can end in time even when it hangs as long
            # as the timeouts let it: the bound holds, whatever the store does.
            if time.monotonic() + pause + CONNECT_TIMEOUT + READ_TIMEOUT > deadline:
                # The same words for every read of the object: the daemon says it once.
                log.debug("%s: giving up after %d attempts; last: %s", what, tries, _short(cause))
                raise StoreUnavailable(f"{what}: no answer from the store within {self.timeout:g}s")
            time.sleep(pause)

    def head(self, bucket: str, key: str, version_id: str, **extra: Any) -> dict[str, Any]:
        """HEAD of one object version, bounded and retried as reads are."""
        return self.call(f"s3://{bucket}/{key}", lambda: self.client.head_object(
            Bucket=bucket, Key=key, VersionId=version_id, **extra))

    def get_into(self, bucket: str, key: str, version_id: str, size: int, start: int, into: memoryview,
                 deadline: float | None = None) -> None:
        """Bytes [start, start + len(into)) of one object version, read into ``into``."""
        what = f"s3://{bucket}/{key}"
        deadline = deadline if deadline is not None else self.deadline()
        self.call(what, lambda: self._get_once(bucket, key, version_id, size, start, into, deadline), deadline)

    def _get_once(self, bucket: str, key: str, version_id: str, size: int, start: int, into: memoryview,
                  deadline: float) -> None:
        stop = start + len(into)
        response = self.client.get_object(Bucket=bucket, Key=key, VersionId=version_id, Range=f"bytes={start}-{stop - 1}")
        body = response["Body"]
        # The HTTP response under urllib3: its readinto receives straight into our
        # buffer (urllib3's own readinto reads and then copies), which measured the
        # least CPU and the least GIL held of every way tried (developer-notes/reads.md).
        raw = getattr(body, "_raw_stream", None)
        readinto = getattr(getattr(raw, "_fp", None), "readinto", None) or body.readinto
        whole = False
        try:
            length = response.get("ContentLength")
            skip = 0
            if "ContentRange" not in response and length == size and len(into) != size:
                skip = start  # the server ignored the Range (some do with a VersionId): keep our part
            elif length != len(into):
                raise ShortBody(f"asked for {len(into)} bytes at {start}, the store sends {length}")
            while skip:
                chunk = body.read(min(skip, 1 << 20))
                if not chunk:
                    raise ShortBody("the body ended early")
                skip -= len(chunk)
            done = 0
            while done < len(into):
                n = readinto(into[done:])
                if not n:
                    raise ShortBody(f"asked for {len(into)} bytes at {start}, got {done}")
                done += n
                if done < len(into) and time.monotonic() > deadline:  # a body that trickles in
                    raise StoreUnavailable(f"s3://{bucket}/{key}: no answer from the store within {self.timeout:g}s")
            whole = not skip and length == len(into)
        finally:
            if whole and hasattr(raw, "release_conn"):
                raw.release_conn()  # read to its end: the connection serves the next request
            else:
                body.close()


def _classified(attempt: Callable[[], T]) -> T:
    """Run one attempt; a failure worth retrying becomes ``_Retry``, a lasting one a
    ``StoreError`` (access denied, a version gone), anything else stays as it is."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return attempt()
    except ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500 or status == 429 or code in RETRY_CODES:
            raise _Retry() from e
        if status == 403 or code == "AccessDenied":
            raise AccessDenied(f"access denied: {error.get('Message') or code}") from None
        if status == 404 or code in ("NoSuchKey", "NoSuchVersion"):
            raise StoreError(f"no longer in the store ({code or status})") from None
        raise StoreError(f"{code or status}: {error.get('Message', '')}") from None
    except NoCredentialsError:
        raise AccessDenied("no AWS credentials") from None
    except (BotoCoreError, ShortBody, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise _Retry() from e  # resets, timeouts, bodies cut short
    except OSError as e:  # a socket's error (unreachable network, …)
        raise _Retry() from e


def _short(error: BaseException | None) -> str:
    text = f"{type(error).__name__}: {error}" if error is not None else "?"
    return text if len(text) < 200 else text[:197] + "..."
