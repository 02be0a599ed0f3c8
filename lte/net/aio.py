"""An asyncio event loop in a background thread, for calling hivemind's async P2P API from synchronous code.

hivemind's P2P objects are bound to the loop they were created in, and the host program (training loop,
coordinator) is synchronous; one private loop per service keeps both sides simple.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Extra time given to a coroutine's own timeout before the calling thread gives up on it.
_GRACE_S = 5.0


class LoopThread:
    """Runs coroutines on one event loop owned by a daemon thread."""

    def __init__(self, name: str = "lte-net-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result.

        `timeout` is a backstop for coroutines that enforce their own timeout; on expiry the coroutine is
        cancelled and `TimeoutError` raised.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(None if timeout is None else timeout + _GRACE_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"timed out after {timeout} s") from None

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop (e.g. streams being served), then stop and close it."""
        if self.loop.is_closed():
            return

        async def cancel_others() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            if others:
                await asyncio.wait(others, timeout=timeout)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cancel_others(), self.loop).result(timeout + 1)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
