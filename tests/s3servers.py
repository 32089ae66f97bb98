"""Real S3-compatible servers for tests: moto_server and ministack, on loopback.

Each server is started as a subprocess bound to 127.0.0.1 on a free port, polled
until it answers HTTP, and always terminated (its whole process group) at the end.
Nothing here talks to anything but 127.0.0.1; ministack is started with every
optional listener / network feature switched off (see ``_ministack_cmd``).

Use it directly::

    with S3Server("moto") as srv:
        s3 = make_client(srv.endpoint_url)
        bucket = make_versioned_bucket(s3)

or register the session-scoped fixtures ``moto_endpoint`` / ``ministack_endpoint``
(each yields the endpoint URL, e.g. ``http://127.0.0.1:40123``) with, in
``tests/conftest.py``::

    pytest_plugins = ["s3servers"]        # tests/ is on sys.path (rootdir-relative)

or ``from s3servers import moto_endpoint, ministack_endpoint  # noqa: F401``.

Why two servers: moto is the reference implementation most projects use, but it
gets some versioning corners wrong; ministack is a second, independent
implementation. ``tests/test_s3servers.py`` records which server gets which
behaviour right (xfail(strict=True) per server), and /tmp/s3-notes.md has the table.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

KINDS = ("moto", "ministack")

# Dummy credentials: set explicitly so that nothing in the environment
# (~/.aws, AWS_PROFILE, instance metadata) is ever consulted.
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

STARTUP_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server is retried if it lost the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _moto_cmd(port: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
    # moto.server:main is the `moto_server` console script: werkzeug dev server, threaded.
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return cmd, {}


def _ministack_cmd(port: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
    # ministack.app:main (the `ministack` console script, also `python -m ministack`)
    # takes no host/port options: everything is environment variables.
    cmd = [sys.executable, "-m", "ministack"]
    env = {
        "GATEWAY_PORT": str(port),  # the one HTTP port (default 4566)
        "BIND_HOST": "127.0.0.1",  # default 0.0.0.0 (all interfaces)
        "MINISTACK_HOST": "localhost",  # virtual-host suffix only; we use path-style
        "SERVICES": "s3",  # only the S3 handler (faster, less surface)
        "IOT_MTLS_ENABLED": "0",  # else it binds an MQTT/TLS listener on 8883
        "SFTP_ENABLED": "0",  # Transfer Family SFTP listener
        "USE_SSL": "0",  # else it also tries to bind 443
        "DOCKER_HOST": "unix:///nonexistent/ministack-no-docker.sock",  # no docker reap / pulls
        "PERSIST_STATE": "0",
        "S3_PERSIST": "0",  # objects in memory only
        "S3_DATA_DIR": str(workdir / "s3-data"),
        "CLOUDTRAIL_RECORDING": "0",
        "LOG_LEVEL": "WARNING",
        "TMPDIR": str(workdir),  # its pid file, ministack-<port>.pid, goes to tempfile.gettempdir()
    }
    return cmd, env


# ministack answers a GET with a VersionId with the whole object, whatever its Range
# (its unversioned GETs honour Range). versionfs always reads by VersionId in ranged
# GETs of 8 MiB, so on the stock server every one of them would carry the whole
# 256 MiB object: 32 times the data, a measure of that defect and nothing else.
# With ``versioned_range_fix`` (the benchmarks use it), the server's versioned GET
# slices the body as its unversioned GET does (and as AWS does); nothing else
# changes, and the benchmark checks it.
MINISTACK_RANGE_FIX = """
import ministack.services.s3 as s3

_get_object = s3._get_object


def get_object(bucket_name, key, headers, query_params=None):
    status, out, body = _get_object(bucket_name, key, headers, query_params)
    rng = headers.get("range", "")
    if status == 200 and rng and s3._qp(query_params or {}, "versionId", "") and "Content-Range" not in out:
        total = len(body)
        parsed = s3._parse_range(rng, total)
        if parsed is not None:
            start, end = parsed
            body = body[start : end + 1]
            out = {k: v for k, v in out.items() if not k.lower().startswith("x-amz-checksum-")}
            out["Content-Length"] = str(len(body))
            out["Content-Range"] = f"bytes {start}-{end}/{total}"
            return 206, out, body
    return status, out, body


s3._get_object = get_object
from ministack.app import main

main()
"""


_COMMANDS = {"moto": _moto_cmd, "ministack": _ministack_cmd}
# A path that answers 200 once the server is fully up.
_READY_PATH = {"moto": "/moto-api/", "ministack": "/_ministack/ready"}
_RESET_PATH = {"moto": "/moto-api/reset", "ministack": "/_ministack/reset"}

# Never use an HTTP proxy from the environment for loopback polling.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class S3ServerError(RuntimeError):
    pass


class S3Server:
    """One S3-compatible server subprocess on 127.0.0.1:<free port>.

    ``start()`` returns the endpoint URL once the server answers; ``stop()`` (also
    on ``__exit__`` and at garbage collection of a failed start) terminates the
    whole process group: SIGTERM, then SIGKILL after ``stop_timeout`` seconds.
    """

    def __init__(self, kind: str, *, startup_timeout: float = STARTUP_TIMEOUT, stop_timeout: float = 5.0,
                 versioned_range_fix: bool = False):
        if kind not in _COMMANDS:
            raise ValueError(f"unknown S3 server kind {kind!r}; expected one of {KINDS}")
        if versioned_range_fix and kind != "ministack":
            raise ValueError("versioned_range_fix is a fix of ministack's")
        self.kind = kind
        self.versioned_range_fix = versioned_range_fix  # ministack only: see MINISTACK_RANGE_FIX
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.endpoint_url: str | None = None
        self.startup_seconds: float | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None

    # -- lifecycle -----------------------------------------------------------------
    def start(self, attempts: int = 3) -> str:
        if self.proc is not None:
            raise S3ServerError(f"{self.kind} server already started")
        self._workdir = Path(tempfile.mkdtemp(prefix=f"versionfs-{self.kind}-"))
        last_error: Exception | None = None
        try:
            for _ in range(attempts):
                try:
                    return self._start_once()
                except _PortLost as e:  # another process took the port between probe and bind
                    last_error = e
                    self._kill()
        except BaseException:  # start-up failure, timeout, Ctrl-C: leave nothing behind
            self.stop()
            raise
        self.stop()
        raise S3ServerError(f"{self.kind} server did not start: {last_error}")

    def _start_once(self) -> str:
        assert self._workdir is not None
        port = free_port()
        cmd, extra_env = _COMMANDS[self.kind](port, self._workdir)
        if self.versioned_range_fix:
            assert cmd[1:] == ["-m", "ministack"], cmd  # what the fix replaces
            cmd = [cmd[0], "-c", MINISTACK_RANGE_FIX]
        env = dict(os.environ)
        # The servers must not see proxy settings or real AWS settings.
        for var in list(env):
            if var.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy") or var.startswith("AWS_"):
                del env[var]
        env.update(extra_env)
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
        self._log_path = self._workdir / f"{self.kind}-{port}.log"
        t0 = time.monotonic()
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                env=env,
                start_new_session=True,  # own process group: stop() kills it and its children
            )
        self.port = port
        url = f"http://127.0.0.1:{port}"
        deadline = t0 + self.startup_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                log_text = self.log
                if "already in use" in log_text:  # moto: "Address already in use"; ministack: "... is already in use"
                    raise _PortLost(f"port {port} taken")
                raise S3ServerError(f"{self.kind} server exited with {rc} during start-up:\n{log_text[-4000:]}")
            if _answers(url + _READY_PATH[self.kind]):
                break
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"{self.kind} server did not answer on {url} within {self.startup_timeout}s:\n{self.log[-4000:]}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - t0
        self.endpoint_url = url
        return url

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True: the process group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=self.stop_timeout)
        # Children of the leader that ignored SIGTERM (none are expected) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def stop(self) -> None:
        self._kill()
        self.endpoint_url = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; never leave a server behind
        with contextlib.suppress(Exception):
            self._kill()

    # -- helpers -------------------------------------------------------------------
    @property
    def log(self) -> str:
        try:
            return self._log_path.read_text(errors="replace") if self._log_path else ""
        except OSError:
            return ""

    def reset(self) -> None:
        """Drop all state (buckets, objects) without restarting."""
        if self.endpoint_url is None:
            raise S3ServerError("server not running")
        req = urllib.request.Request(self.endpoint_url + _RESET_PATH[self.kind], data=b"", method="POST")
        with _opener.open(req, timeout=10) as r:
            r.read()


class _PortLost(Exception):
    pass


def _answers(url: str) -> bool:
    try:
        with _opener.open(url, timeout=1) as r:
            r.read()
            return r.status == 200
    except urllib.error.HTTPError:
        return False
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def s3_server(kind: str, **kw: Any) -> Iterator[str]:
    """Start a ``kind`` ("moto" | "ministack") server; yield its endpoint URL; stop it."""
    with S3Server(kind, **kw) as srv:
        assert srv.endpoint_url is not None
        yield srv.endpoint_url


# -- boto3 helpers -------------------------------------------------------------------
def make_client(endpoint_url: str, **config: Any):
    """A boto3 S3 client for a test server: dummy credentials, us-east-1, path-style.

    Extra keyword arguments go to ``botocore.config.Config`` (they override the
    defaults below). Environment proxies are ignored (``proxies={}``); retries are
    off so a server error shows up as the error, not as a slow retry loop.
    """
    from botocore.config import Config

    cfg: dict[str, Any] = dict(
        region_name=REGION,
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        proxies={},
    )
    cfg.update(config)
    return _session().client("s3", endpoint_url=endpoint_url, config=Config(**cfg))


@functools.lru_cache(maxsize=None)
def _session():
    """One boto3 session for all test clients: its loader caches the service model
    (a new session per client costs ~0.4 s)."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def unique_bucket_name(prefix: str = "vfs") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def make_bucket(client, name: str | None = None) -> str:
    """Create a bucket (versioning never enabled: objects get VersionId "null")."""
    name = name or unique_bucket_name()
    client.create_bucket(Bucket=name)  # us-east-1: no CreateBucketConfiguration
    return name


def make_versioned_bucket(client, name: str | None = None) -> str:
    """Create a bucket and set its versioning to Enabled (checked)."""
    name = make_bucket(client, name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    status = client.get_bucket_versioning(Bucket=name).get("Status")
    if status != "Enabled":
        raise S3ServerError(f"versioning on {name} is {status!r} after enabling it")
    return name


# -- pytest fixtures (session-scoped) -------------------------------------------------
@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL (http://127.0.0.1:PORT) of a moto_server, one per test session."""
    with s3_server("moto") as url:
        yield url


@pytest.fixture(scope="session")
def ministack_endpoint() -> Iterator[str]:
    """Endpoint URL (http://127.0.0.1:PORT) of a ministack S3 server, one per test session."""
    with s3_server("ministack") as url:
        yield url
