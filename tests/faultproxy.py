"""A loopback TCP proxy that misbehaves on demand, between the daemon and an S3
server: the network faults a store's users meet, made in the test.

Modes (``proxy.mode``, changed at any time; they apply to connections already
open too):

- ``pass``: bytes go through unchanged;
- ``blackhole``: nothing goes through in either direction (as when packets are
  dropped): new connections are accepted but never answered, data is held back;
  back to ``pass``, held data flows again (as TCP's retransmits would deliver it);
- ``delay``: every piece of the answer waits ``proxy.delay`` seconds first;
- ``refuse``: new connections are reset at once.

``proxy.cut(n)`` cuts the next ``n`` answers mid-body: part of a piece of body
is sent, then the connection is closed. ``proxy.requests`` lists the request
lines seen ("GET /bucket/key?…").
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlparse


class FaultProxy:
    def __init__(self, target: str):
        parsed = urlparse(target)
        self.target = (parsed.hostname, parsed.port)
        self.mode = "pass"
        self.delay = 0.0
        self.requests: list[str] = []
        self.cuts_done = 0
        self._cuts_left = 0
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, n: int = 1) -> None:
        with self._lock:
            self._cuts_left += n

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        except OSError:
            pass
        self._listener.close()
        for s in list(self._sockets):
            _close(s)

    # -- plumbing ------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                conn.close()
                continue
            threading.Thread(target=self._connect, args=(conn,), daemon=True).start()

    def _connect(self, conn: socket.socket) -> None:
        while self.mode == "blackhole" and not self._closed:  # a SYN that got no answer, as it were
            time.sleep(0.05)
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _close(conn)
            return
        upstream.settimeout(None)
        self._sockets += [conn, upstream]
        threading.Thread(target=self._pump, args=(conn, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, conn, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                while self.mode == "blackhole" and not self._closed:
                    time.sleep(0.05)
                if not answers and data[:1].isupper():
                    self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                if answers and self.mode == "delay":
                    time.sleep(self.delay)
                if answers and not data.startswith(b"HTTP/") and self._take_cut():
                    dst.sendall(data[: len(data) // 2])
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _take_cut(self) -> bool:
        with self._lock:
            if self._cuts_left <= 0:
                return False
            self._cuts_left -= 1
            self.cuts_done += 1
            return True


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
