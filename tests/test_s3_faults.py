"""Store errors during a commit: transient ones are retried, a persistent one
fails the commit saying exactly what was written, and staging keeps everything.

A small HTTP proxy on 127.0.0.1 sits between the daemon and the S3 server and
answers chosen requests with 503 SlowDown instead of forwarding them, or (an
answer lost on the way back) after forwarding them."""

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
    """Forwards to ``target``; ``should_fail(method, path)`` picks requests to refuse:
    True refuses them, "after" forwards them and then answers 503 all the same."""

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
        verdict = server.should_fail(self.command, self.path)
        if verdict == "after":
            server.refused.append((self.command, self.path))
            self._forward(body)  # the store does it; its answer is lost
        if verdict:
            if verdict is True:
                server.refused.append((self.command, self.path))
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        status, reason, headers, data = self._forward(body)
        self.send_response(status, reason)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes):
        server: FaultProxy = self.server
        conn = http.client.HTTPConnection(server.target.hostname, server.target.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        return answer.status, answer.reason, answer.getheaders(), data

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


def written_keys(stderr: str) -> set[str]:
    """The keys a failed commit says it wrote."""
    if "nothing was written" in stderr:
        return set()
    return set(stderr.strip().split("already written (", 1)[1].split(": ", 1)[1].split(", "))


def keys_in_store(s3, bucket) -> set[str]:
    return {v["Key"] for v in s3.list_object_versions(Bucket=bucket).get("Versions", [])}


@pytest.mark.parametrize("fault", ["refused", "answer lost", "both"])
def test_a_failing_commit_says_exactly_what_it_wrote_and_keeps_staging(proxy, mount, monkeypatch, fault):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # give up quickly on the broken keys
    s3 = make_client(proxy.url)
    bucket = make_versioned_bucket(s3)
    m = mount(f"s3://{bucket}", "--endpoint-url", proxy.url)
    names = [f"{c}.txt" for c in "abcdefgh"]
    for name in names:
        (m.path / "staging" / name).write_bytes(name.encode())
    refused = {"refused": {"b.txt"}, "answer lost": set(), "both": {"b.txt", "f.txt"}}[fault]
    lost = {"refused": set(), "answer lost": {"c.txt"}, "both": {"c.txt", "e.txt"}}[fault]

    def broken(method, path):  # for ever
        key = path.split("?")[0].rsplit("/", 1)[-1]
        if method == "PUT" and key in refused:
            return True
        return "after" if method == "PUT" and key in lost else False

    proxy.should_fail = broken
    result = run_versionfs("commit", str(m.path))
    in_store = keys_in_store(s3, bucket)
    assert lost <= in_store and not refused & in_store
    if refused:
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
        assert written_keys(result.stderr) == in_store  # exactly what is in the store
    else:
        assert result.returncode == 0, result.stderr  # every lost answer hid a write that happened
    # What was written is in the latest version already; the rest is still staged.
    status = run_versionfs("status", str(m.path)).stdout.split()
    assert set(status) - {"A"} <= set(names)
    proxy.should_fail = lambda method, path: False  # the store is back
    result = run_versionfs("commit", str(m.path))
    assert result.returncode == 0, result.stderr
    assert [s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in names] == [n.encode() for n in names]
    for key in names:  # none written twice
        assert len(s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]) == 1, key
