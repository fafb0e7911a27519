"""The handle a save returns: wait for a background save from sync or async code, or poll it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Generator
from typing import Any

import anyio.to_thread

from . import _portal
from ._exceptions import BackgroundSaveError, PortalError

__all__ = ["SaveHandle"]


class SaveHandle:
    """One save of a :class:`~checkpointio.Checkpoint`; already finished unless ``wait=False``.

    ``handle.done()`` polls; ``handle.result(timeout)`` blocks (sync code); ``await handle`` waits
    without blocking the caller's event loop (asyncio or trio). Both return ``None`` once the
    checkpoint is stored, and raise the save's own error if it failed, or
    ``concurrent.futures.CancelledError`` if it was superseded or cancelled (the store then holds
    what it held before that save).

    A failure retrieved here is not reported again; one nobody retrieved is raised (as
    :class:`~checkpointio.BackgroundSaveError`) by the checkpoint's next ``save()``, ``wait()`` or
    ``close()``, and logged at interpreter exit.
    """

    def __init__(self, uri: str, work: _portal.Background | None = None) -> None:
        self.uri = uri
        self._work = work
        self._seen = work is None

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<SaveHandle {self.uri!r} {state}>"

    def in_this_process(self) -> bool:
        """False in a forked child for a save its parent started (it can never end there)."""
        return self._work is None or self._work.pid == os.getpid()

    def done(self) -> bool:
        """Whether the save has ended (stored, failed or cancelled)."""
        return self._work is None or self._work.outcome.done()

    def succeeded(self) -> bool:
        """Whether the save has ended and stored its checkpoint (does not retrieve a failure)."""
        if self._work is None:
            return True
        return self._work.outcome.done() and self._work.outcome.exception() is None

    @property
    def cancelled(self) -> bool:
        """Whether the save was cancelled (or superseded) before it finished.

        The store then keeps its previous checkpoint, except when the cancellation came while the
        commit itself was on its way (S3's CompleteMultipartUpload sent): the new checkpoint may
        then be stored, whole. Never a mix of the two.
        """
        if self._work is None or not self._work.outcome.done():
            return False
        return isinstance(self._work.outcome.exception(), concurrent.futures.CancelledError)

    def cancel(self) -> None:
        """Ask the save to stop (its upload is aborted); it ends cancelled unless already stored."""
        if self._work is not None:
            self._work.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Block until the save has ended (at most ``timeout`` seconds), without raising its error.

        Returns:
            Whether it has ended.
        """
        if self._work is None or self._work.outcome.done():
            return True
        if _portal.on_loop_thread():
            raise PortalError("waiting for a background save on checkpointio's loop thread would deadlock")
        try:
            self._work.outcome.exception(timeout)
        except concurrent.futures.TimeoutError:
            return False
        except concurrent.futures.CancelledError:  # pragma: no cover - the outcome is never cancelled itself
            pass
        return True

    def result(self, timeout: float | None = None) -> None:
        """Block until the save has ended; raise its error.

        Raises:
            TimeoutError: Still running after ``timeout`` seconds.
            PortalError: Called on checkpointio's loop thread before the save ended (a deadlock).
        """
        if self._work is None:
            return
        if not self._work.outcome.done() and _portal.on_loop_thread():
            raise PortalError("SaveHandle.result() would deadlock on checkpointio's loop thread; await the handle")
        try:
            self._work.outcome.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the background save to {self.uri} is still running") from None
        self._seen = True
        self._work.reported()
        self._work.outcome.result()

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        await self.wait_ended()
        self.result()

    async def wait_ended(self) -> None:
        """Wait until the save has ended, without raising its error or blocking the event loop."""
        if self._work is None or self._work.outcome.done():
            return
        outcome = self._work.outcome
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another backend (trio): a worker thread waits
            await anyio.to_thread.run_sync(outcome.exception, abandon_on_cancel=True)
            return
        ended = asyncio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(ended.set)

        outcome.add_done_callback(wake)
        await ended.wait()

    def unseen_error(self) -> BackgroundSaveError | None:
        """The failure of an ended save that nobody retrieved yet (marking it retrieved)."""
        if self._seen or self._work is None or not self._work.outcome.done():
            return None
        self._seen = True
        self._work.reported()
        error = self._work.outcome.exception()
        if error is None or isinstance(error, concurrent.futures.CancelledError):
            return None
        failure = BackgroundSaveError(
            f"the background save to {self.uri} failed: {type(error).__name__}: {error}", uri=self.uri
        )
        failure.__cause__ = error
        return failure
