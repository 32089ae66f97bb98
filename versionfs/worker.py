"""Where blocking backend work runs: off the trio loop, as the backend declares
(``Backend.execution``, a ``base.Execution``).

Two lanes. Metadata calls (versions, trees, histories, images, sizes, commits)
run one at a time on one thread when the backend says ``serial`` (h5py), or
several at once otherwise (S3: boto3 clients are thread-safe). ``read`` calls
run on a lane of their own, up to ``Execution.reads`` at once, beside the
metadata lane: a long image build or a listing that waits on a dead store never
holds up a read, and a stuck read never holds up a listing, a lookup or the
control socket. Callers batch their work (a whole window of blocks, a whole
tree) so that a FUSE request rarely needs a thread hop at all.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import outcome
import trio

from .backends.base import Execution

T = TypeVar("T")
METADATA_THREADS = 8  # concurrent metadata calls of a backend that is not serial


class Worker:
    def __init__(self, name: str = "versionfs-worker"):
        self._serial_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.execution = Execution(serial=True, reads=1)
        self._metadata = trio.CapacityLimiter(METADATA_THREADS)
        self._reads = trio.CapacityLimiter(1)

    def adopt(self, execution: Execution) -> None:
        """Run calls as a backend declares (called once it is open)."""
        self.execution = execution
        self._reads = trio.CapacityLimiter(max(1, execution.reads))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a metadata call ``fn(*args)`` and return (or raise) its result."""
        if self.execution.serial:
            return await self._on_serial_thread(fn, *args)
        return await self._on_thread(self._metadata, fn, *args)

    async def run_or_leave(self, fn: Callable[..., T], *args: Any) -> T:
        """``run``, but a cancelled caller stops waiting: the call still runs to
        its end on its thread (so ``fn`` must be fine unobserved: a cache fill)."""
        if self.execution.serial:
            return await self.run(fn, *args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._metadata, abandon_on_cancel=True)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a data read ``fn(*args)`` on the read lane."""
        return await self._on_thread(self._reads, fn, *args)

    @staticmethod
    async def _on_thread(limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: Any) -> T:
        # Not abandoned on cancel: once started the call runs to its end, and
        # waiting for it keeps backend state consistent even if the request
        # that wanted it was interrupted.
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)

    async def _on_serial_thread(self, fn: Callable[..., T], *args: Any) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: outcome.Outcome | None = None

        def job() -> None:
            nonlocal result
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._serial_pool.submit(job)
        with trio.CancelScope(shield=True):  # see _on_thread
            await done.wait()
        assert result is not None
        return result.unwrap()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking variant for code outside the trio loop (start-up, shut-down)."""
        return self._serial_pool.submit(fn, *args).result()

    def close(self) -> None:
        self._serial_pool.shutdown(wait=True)
