"""The handle a save returns: wait for a background save from sync or async code, or poll it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Generator
from typing import Any

import anyio.to_thread

from . import _portal
from ._exceptions import BackgroundSaveError, PortalError

__all__ = ["SaveHandle"]

logger = logging.getLogger(__name__)


class _CancelledFlag:
    """What ``handle.cancelled`` is: call it (``handle.cancelled()``, as on a future).

    Until the next release it also still reads as the bool the former property was
    (``if handle.cancelled:``), with a ``DeprecationWarning``.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bool) -> None:
        self._value = value

    def __call__(self) -> bool:
        return self._value

    def __bool__(self) -> bool:
        warnings.warn(
            "SaveHandle.cancelled is a method, as on a future: call handle.cancelled()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._value

    def __repr__(self) -> str:
        return f"<bound method SaveHandle.cancelled of a save: {self._value}>"


class SaveHandle:
    """One save of a :class:`~checkpointio.Checkpoint`; already finished unless ``wait=False``.

    It behaves like a ``concurrent.futures.Future`` of ``None``: ``done()``, ``running()`` and
    ``cancelled()`` poll; ``result(timeout)`` and ``exception(timeout)`` block (sync code);
    ``add_done_callback(fn)`` calls ``fn(handle)`` when the save ends; ``await handle`` waits
    without blocking the caller's event loop (asyncio or trio). ``result()`` and ``await`` return
    ``None`` once the checkpoint is stored, and raise the save's own error if it failed, or
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

    def running(self) -> bool:
        """Whether the save is still going on (``not done()``)."""
        return not self.done()

    def succeeded(self) -> bool:
        """Whether the save has ended and stored its checkpoint (does not retrieve a failure)."""
        if self._work is None:
            return True
        return self._work.outcome.done() and self._work.outcome.exception() is None

    @property
    def cancelled(self) -> _CancelledFlag:
        """``handle.cancelled()``: whether the save was cancelled (or superseded) before it finished.

        The store then keeps its previous checkpoint, except when the cancellation came while the
        commit itself was on its way (S3's CompleteMultipartUpload sent): the new checkpoint may
        then be stored, whole. Never a mix of the two. (Read without calling, as the property it
        used to be, it still works until the next release, with a ``DeprecationWarning``.)
        """
        if self._work is None or not self._work.outcome.done():
            return _CancelledFlag(False)
        return _CancelledFlag(isinstance(self._work.outcome.exception(), concurrent.futures.CancelledError))

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
            concurrent.futures.CancelledError: The save was cancelled or superseded.
            PortalError: Called on checkpointio's loop thread before the save ended (a deadlock).
        """
        outcome = self._ended("result", timeout)
        if outcome is not None:
            outcome.result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until the save has ended; return its error, or ``None`` if it stored the checkpoint.

        The error counts as retrieved: it is not raised again by the checkpoint's next save.

        Raises:
            TimeoutError: Still running after ``timeout`` seconds.
            concurrent.futures.CancelledError: The save was cancelled or superseded (as a future's
                ``exception()`` does).
            PortalError: Called on checkpointio's loop thread before the save ended (a deadlock).
        """
        outcome = self._ended("exception", timeout)
        if outcome is None:
            return None
        error = outcome.exception()
        if isinstance(error, concurrent.futures.CancelledError):
            raise error
        return error

    def _ended(self, method: str, timeout: float | None) -> concurrent.futures.Future[None] | None:
        """Wait until the save has ended and mark its outcome retrieved; ``None`` for a finished save."""
        if self._work is None:
            return None
        outcome = self._work.outcome
        if not outcome.done() and _portal.on_loop_thread():
            raise PortalError(f"SaveHandle.{method}() would deadlock on checkpointio's loop thread; await the handle")
        try:
            outcome.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the background save to {self.uri} is still running") from None
        self._seen = True
        self._work.reported()
        return outcome

    def add_done_callback(self, fn: Callable[[SaveHandle], object]) -> None:
        """Call ``fn(handle)`` once the save has ended (stored, failed or cancelled).

        As with a future, ``fn`` runs in the thread that ends the save (checkpointio's event-loop
        thread: keep it short and do not call a ``*_sync`` method there), or at once in the
        caller's thread if the save has already ended; an exception it raises is logged and
        ignored. Callbacks run in the order they were added.
        """
        if self._work is None:
            self._call(fn)
            return
        self._work.outcome.add_done_callback(lambda _: self._call(fn))

    def _call(self, fn: Callable[[SaveHandle], object]) -> None:
        try:
            fn(self)
        except Exception:
            logger.exception("a done callback of %r raised", self)

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
