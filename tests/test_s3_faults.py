"""Store errors during a commit: transient ones are retried, a persistent one
fails the commit saying what was written, and staging keeps everything.

A small HTTP proxy on 127.0.0.1 sits between the daemon and the S3 server and
answers chosen requests with 503 SlowDown instead of forwarding them."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from conftest import run_versionfs
from s3servers import make_client, make_versioned_bucket

SLOW_DOWN = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'


class FaultProxy(ThreadingHTTPServer):
    """Forwards to ``target``; ``should_fail(method, path)`` picks requests to refuse."""

    daemon_threads = True

    def __init__(self, target: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.target = urlparse(target)
        self.should_fail = lambda method, path: False
        self.refused: list[tuple[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _any(self):
        server: FaultProxy = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if server.should_fail(self.command, self.path):
            server.refused.append((self.command, self.path))
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        conn = http.client.HTTPConnection(server.target.hostname, server.target.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


@pytest.fixture
def proxy(moto_endpoint):
    server = FaultProxy(moto_endpoint)
    yield server
    server.shutdown()


def test_transient_errors_are_retried(proxy, mount):
    s3 = make_client(proxy.url)
    bucket = make_versioned_bucket(s3)
    m = mount(f"s3://{bucket}", "--endpoint-url", proxy.url)
    (m.path / "staging/a.txt").write_bytes(b"a")
    refusals = {"left": 3}

    def flaky(method, path):
        if method == "PUT" and path.endswith("/a.txt") and refusals["left"]:
            refusals["left"] -= 1
            return True
        return False

    proxy.should_fail = flaky
    result = run_versionfs("commit", str(m.path))
    assert result.returncode == 0, result.stderr
    assert len(proxy.refused) == 3
    assert s3.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"a"


def test_a_failing_commit_says_what_it_wrote_and_keeps_staging(proxy, mount, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # give up quickly on the broken key
    s3 = make_client(proxy.url)
    bucket = make_versioned_bucket(s3)
    m = mount(f"s3://{bucket}", "--endpoint-url", proxy.url)
    for name in ("a.txt", "b.txt", "c.txt"):
        (m.path / "staging" / name).write_bytes(name.encode())
    proxy.should_fail = lambda method, path: method == "PUT" and path.endswith("/b.txt")  # for ever
    result = run_versionfs("commit", str(m.path))
    assert result.returncode == 1
    assert "a.txt" in result.stderr and "already written (1)" in result.stderr and "b.txt" not in result.stderr.split("written")[-1]
    # What was written is in the latest version already; the rest is still staged.
    assert sorted(run_versionfs("status", str(m.path)).stdout.split()) in (
        ["A", "A", "A", "a.txt", "b.txt", "c.txt"], ["A", "A", "b.txt", "c.txt"])
    proxy.should_fail = lambda method, path: False  # the store is back
    result = run_versionfs("commit", str(m.path))
    assert result.returncode == 0, result.stderr
    assert [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in ("a.txt", "b.txt", "c.txt")] == [b"a.txt", b"b.txt", b"c.txt"]
    assert len(s3.list_object_versions(Bucket=bucket, Prefix="a.txt")["Versions"]) == 1  # not written twice
