"""One worker thread for all blocking backend work.

h5py serialises every call behind one global lock anyway, and one thread keeps
backend objects (open files, dataset handles) single-threaded. Callers batch
their work (a whole block, a whole tree) so that a FUSE request rarely needs a
thread hop at all.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import outcome
import trio

T = TypeVar("T")


class Worker:
    def __init__(self, name: str = "versionfs-worker"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and return (or raise) its result."""
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

        self._pool.submit(job)
        # Once submitted the job runs to its end; waiting for it keeps backend
        # state consistent even if the request that wanted it was interrupted.
        with trio.CancelScope(shield=True):
            await done.wait()
        assert result is not None
        return result.unwrap()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking variant for code outside the trio loop (start-up, shut-down)."""
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
