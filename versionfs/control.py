"""The control channel: how ``versionfs commit|status|discard|rollback`` reach
the daemon of a mount.

A Unix socket in a private runtime directory (mode 0700, owned by the mounting
user); its path is published as the ``user.versionfs.control`` xattr of the
mount's root. The daemon also checks the peer's uid (SO_PEERCRED): only the
mounting user and root may use it. One JSON request per connection, one JSON
answer: ``{"ok": true, "result": …}`` or ``{"ok": false, "error": …, "exit": N}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .errors import ControlError, UserError, exit_code

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)
XATTR_CONTROL = "user.versionfs.control"
MAX_REQUEST = 1 << 20

Handler = Callable[..., Awaitable[Any]]


def socket_path(mountpoint: str) -> str:
    """A short, private path (sun_path has 108 bytes) for a mount point's socket."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if uid == 0 else "/tmp")
    directory = os.path.join(base, f"versionfs-{uid}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if st.st_uid != uid or st.st_mode & 0o077:
        raise UserError(f"{directory}: must be a directory of yours with mode 0700")
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(directory, f"{digest}.sock")


async def serve(path: str, handlers: dict[str, Handler], task_status: Any = None) -> None:
    """Answer requests on ``path`` until cancelled (the daemon's side: trio is
    imported here, not at the top, so that the CLI starts fast)."""
    import trio

    if os.path.exists(path):
        os.unlink(path)  # a previous daemon's, left by a crash
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    if task_status is not None:
        task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_answer, conn, handlers)
    finally:
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _peer_uid(conn: "trio.socket.SocketType") -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _answer(conn: "trio.socket.SocketType", handlers: dict[str, Handler]) -> None:
    import inspect

    import trio

    stream = trio.SocketStream(conn)
    send, receive = trio.open_memory_channel[dict](float("inf"))
    token = trio.lowlevel.current_trio_token()

    def post(message: dict) -> None:
        try:
            send.send_nowait(message)
        except trio.ClosedResourceError:
            pass  # a report that came after the answer

    def progress(done: int, total: int) -> None:
        """Callable from any thread (the worker reports from inside a commit)."""
        token.run_sync_soon(post, {"progress": [done, total]})

    async def run() -> None:
        try:
            if _peer_uid(conn) not in (0, os.getuid()):
                raise ControlError("permission denied: only the user who mounted it (or root) may control this mount")
            request = json.loads(await _read_line(stream))
            handler = handlers.get(request.get("op"))
            if handler is None:
                raise ControlError(f"unknown request {request.get('op')!r}")
            args = request.get("args", {})
            if "progress" in inspect.signature(handler).parameters:
                args["progress"] = progress
            answer = {"ok": True, "result": await handler(**args)}
        except UserError as e:
            answer = {"ok": False, "error": str(e), "exit": exit_code(e)}
        except Exception as e:  # noqa: BLE001 - the daemon outlives any request
            log.exception("control request failed")
            answer = {"ok": False, "error": f"internal error in the daemon: {e} (the traceback is in its log)", "exit": 1}
        # After every progress report already on its way from the worker.
        token.run_sync_soon(post, answer)
        token.run_sync_soon(send.close)

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(run)
        async for message in receive:
            try:
                await stream.send_all(json.dumps(message).encode() + b"\n")
            except trio.BrokenResourceError:
                pass  # the client went away; the request still runs to its end


async def _read_line(stream: "trio.SocketStream") -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ControlError("request too large")
    return data


def request(mountpoint: str, op: str, on_progress: Callable[[int, int], None] | None = None, **args: Any) -> Any:
    """Send one request to the daemon of ``mountpoint``; its result, or ControlError.
    Progress reports on the way go to ``on_progress(done, total)``."""
    try:
        path = os.fsdecode(os.getxattr(mountpoint, XATTR_CONTROL))
    except OSError:
        raise ControlError(f"{mountpoint}: not a versionfs mount") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            raise ControlError(f"{mountpoint}: the daemon does not answer ({e.strerror})") from None
        sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        with sock.makefile("rb") as answers:
            while True:
                line = answers.readline()
                if not line:
                    raise ControlError(f"{mountpoint}: the daemon closed the connection")
                answer = json.loads(line)
                if "progress" not in answer:
                    break
                if on_progress is not None:
                    on_progress(*answer["progress"])
    if not answer["ok"]:
        raise ControlError(answer["error"], answer.get("exit", 1))
    return answer["result"]
