"""Background saves (``save(wait=False)``): the one owner of their outcome, registry, exit and fork.

A background save runs on the portal's event-loop thread (:mod:`._portal` only runs coroutines).
This module keeps:

- **the outcome** of each save (:class:`BackgroundSave`): a future completed once the coroutine
  has *ended*, cleanup included (a cancelled upload is aborted by then), unlike the future of
  ``asyncio.run_coroutine_threadsafe``, which reads cancelled the moment it is asked to be;
- **the registry** of saves still owed to somebody: running, or failed with nobody having
  retrieved the error (from the handle, or as :class:`BackgroundSaveError` from the checkpoint);
- **interpreter exit** (stage ``SAVES`` of :mod:`._exit`: before temporary folders go and the
  loop stops): saves still running are waited for, at most :data:`EXIT_TIMEOUT` seconds
  (``CHECKPOINTIO_EXIT_TIMEOUT``), then cancelled (uploads aborted); failures nobody retrieved are
  logged. A save started after that stage (from an ``atexit`` hook that runs after ours) is done
  in the foreground: nobody would wait for it any more;
- **fork**: a child has copies of its parent's saves, which never end there. The registry
  forgets them in the child, a checkpoint's :class:`InFlight` drops them, and waiting for one
  raises :class:`PortalError` instead of hanging.

:class:`SaveHandle` is the caller's small future-like view of one save; :class:`InFlight` is a
checkpoint's slot for the one save it has in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Generator
from typing import Any, ParamSpec

import anyio.to_thread

from . import _exit, _portal
from ._exceptions import BackgroundSaveError, PortalError

__all__ = ["EXIT_TIMEOUT", "BackgroundSave", "InFlight", "SaveHandle", "exit_timeout"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")

#: How long interpreter exit waits for background saves still running, unless
#: ``CHECKPOINTIO_EXIT_TIMEOUT`` says otherwise.
EXIT_TIMEOUT = 600.0


def exit_timeout() -> float:
    """Seconds interpreter exit waits for background saves: ``CHECKPOINTIO_EXIT_TIMEOUT`` or the default."""
    try:
        return float(os.environ.get("CHECKPOINTIO_EXIT_TIMEOUT", EXIT_TIMEOUT))
    except ValueError:
        return EXIT_TIMEOUT


class BackgroundSave:
    """One save running (or run) on the loop thread, and whether its outcome reached anybody.

    Attributes:
        uri: The checkpoint it writes.
        description: What messages call it (``"background save to <uri>"`` unless told).
        outcome: Completed when the save has ended: ``None``, its error, or
            ``concurrent.futures.CancelledError`` once a cancelled save has cleaned up.
    """

    def __init__(self, uri: str, description: str | None = None) -> None:
        self.uri = uri
        self.description = description or f"background save to {uri}"
        self.outcome: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.outcome.set_running_or_notify_cancel()
        self._task: concurrent.futures.Future[None] | None = None
        self._pid = os.getpid()
        self._retrieved = False

    def __repr__(self) -> str:
        return f"<BackgroundSave {self.uri!r} {'done' if self.outcome.done() else 'running'}>"

    @property
    def inherited(self) -> bool:
        """Whether the parent of this forked process started it: it runs there, never ends here."""
        return self._pid != os.getpid()

    def cancel(self) -> None:
        """Ask the save to stop; :attr:`outcome` completes once it has cleaned up."""
        if self._task is not None and not self.inherited:
            self._task.cancel()

    def _unreachable(self, what: str) -> PortalError | None:
        """Why ``what`` cannot wait for this unfinished save here, if it cannot."""
        if self.inherited:
            return PortalError(
                f"{what}: the {self.description} was started by the parent of this forked process "
                f"(pid {self._pid}) and runs there only; waiting for it here would never end"
            )
        if _portal.on_loop_thread():
            return PortalError(f"{what} would deadlock on checkpointio's loop thread; await the handle")
        return None

    def join(self, timeout: float | None, what: str) -> bool:
        """Block until the save has ended, at most ``timeout`` seconds; whether it has.

        Raises:
            PortalError: It has not ended and never could while this caller waits: on the loop
                thread (a deadlock), or in a forked child (it runs in the parent).
        """
        if self.outcome.done():
            return True
        error = self._unreachable(what)
        if error is not None:
            raise error
        try:
            self.outcome.exception(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True

    async def ended(self, what: str) -> None:
        """Wait until the save has ended, without blocking the caller's event loop.

        Raises:
            PortalError: In a forked child, for a save its parent started.
        """
        if self.outcome.done():
            return
        if self.inherited:
            error = self._unreachable(what)
            assert error is not None
            raise error
        outcome = self.outcome
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

    def retrieved(self) -> None:
        """Its outcome reached the caller: nothing is left to report, at exit or by the checkpoint."""
        self._retrieved = True
        with _lock:
            _owed.pop(self, None)

    def unseen_error(self) -> BackgroundSaveError | None:
        """The failure of an ended save that nobody retrieved yet (marking it retrieved)."""
        if self._retrieved or not self.outcome.done():
            return None
        self.retrieved()
        error = self.outcome.exception()
        if error is None or isinstance(error, concurrent.futures.CancelledError):
            return None
        failure = BackgroundSaveError(f"the {self.description} failed: {type(error).__name__}: {error}", uri=self.uri)
        failure.__cause__ = error
        return failure

    def start(self, func: Callable[P, Coroutine[Any, Any, None]], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``func(*args, **kwargs)`` on the loop thread, once; :attr:`outcome` follows it to its
        end, and until that outcome is retrieved the save is owed (drained at exit)."""
        outcome = self.outcome

        async def call() -> None:
            try:
                await func(*args, **kwargs)
            except asyncio.CancelledError:
                outcome.set_exception(concurrent.futures.CancelledError(f"{self.description}: cancelled"))
                raise
            except BaseException as error:
                outcome.set_exception(error)
                if not isinstance(error, Exception):
                    raise
            else:
                outcome.set_result(None)

        def settled(future: concurrent.futures.Future[None]) -> None:
            error = future.exception()
            if error is None or isinstance(error, concurrent.futures.CancelledError):
                self.retrieved()  # success and cancellation are nothing to report

        with _lock:
            _owed[self] = None
        outcome.add_done_callback(settled)
        self._task = _portal.submit(call)


_lock = threading.Lock()
#: Saves of this process still owed to somebody: running, or failed with the error unretrieved.
_owed: dict[BackgroundSave, None] = {}


def _forget_after_fork() -> None:
    """In a forked child: the parent's saves run (and are waited for) in the parent."""
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    _owed.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _drain() -> None:
    """Wait for the saves still running, at most :func:`exit_timeout` seconds; cancel the rest; log
    failures nobody retrieved."""
    timeout = exit_timeout()
    with _lock:
        saves = list(_owed)
    running = [save for save in saves if not save.outcome.done()]
    if running:
        logger.info("waiting up to %.0f s for %d background save(s)", timeout, len(running))
    deadline = time.monotonic() + timeout
    for save in running:
        with contextlib.suppress(BaseException):
            save.outcome.exception(max(0.0, deadline - time.monotonic()))
    for save in saves:
        if not save.outcome.done():
            _lost(f"{save.description} did not finish within {timeout:.0f} s of exit; cancelling it")
            save.cancel()
            with contextlib.suppress(BaseException):
                save.outcome.exception(_portal.CLEANUP_TIMEOUT)
            continue
        error = save.outcome.exception()
        if error is not None and not isinstance(error, concurrent.futures.CancelledError):
            _lost(f"{save.description} failed: {type(error).__name__}: {error}")
        save.retrieved()


_exit.on_exit(_exit.Stage.SAVES, _drain)


def _lost(message: str) -> None:
    """A background save lost at exit, where no exception can tell anybody any more: logged, and
    also a ``RuntimeWarning`` (which Python prints by default) unless the application configured
    logging to show or hide it, as the package logger's ``NullHandler`` would swallow it."""
    logger.error("%s", message)
    if not _configured(logger, logging.ERROR):
        warnings.warn(f"checkpointio: {message}", RuntimeWarning, stacklevel=1)


def _configured(log: logging.Logger, level: int) -> bool:
    """Whether the application decided what becomes of ``log``'s records of ``level``: it set a
    level that drops them, or a handler other than a ``NullHandler`` receives them."""
    if not log.isEnabledFor(level):
        return True
    current: logging.Logger | None = log
    while current is not None:
        if any(not isinstance(handler, logging.NullHandler) and level >= handler.level for handler in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


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
    ``close()``, and logged at interpreter exit. In a process forked while the save ran, the save
    is the parent's: waiting for it there raises :class:`~checkpointio.PortalError`.
    """

    def __init__(self, uri: str, save: BackgroundSave | None = None) -> None:
        self.uri = uri
        self._save = save

    def __repr__(self) -> str:
        return f"<SaveHandle {self.uri!r} {'done' if self.done() else 'running'}>"

    def in_this_process(self) -> bool:
        """False in a forked child for a save its parent started (it can never end there)."""
        return self._save is None or not self._save.inherited

    def done(self) -> bool:
        """Whether the save has ended (stored, failed or cancelled)."""
        return self._save is None or self._save.outcome.done()

    def running(self) -> bool:
        """Whether the save is still going on (``not done()``)."""
        return not self.done()

    def succeeded(self) -> bool:
        """Whether the save has ended and stored its checkpoint (does not retrieve a failure)."""
        return self._save is None or (self._save.outcome.done() and self._save.outcome.exception() is None)

    def cancelled(self) -> bool:
        """Whether the save was cancelled (or superseded) before it finished.

        The store then keeps its previous checkpoint, except when the cancellation came while the
        commit itself was on its way (S3's CompleteMultipartUpload sent): the new checkpoint may
        then be stored, whole. Never a mix of the two.
        """
        if self._save is None or not self._save.outcome.done():
            return False
        return isinstance(self._save.outcome.exception(), concurrent.futures.CancelledError)

    def cancel(self) -> None:
        """Ask the save to stop (its upload is aborted); it ends cancelled unless already stored."""
        if self._save is not None:
            self._save.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Block until the save has ended (at most ``timeout`` seconds), without raising its error.

        Returns:
            Whether it has ended.

        Raises:
            PortalError: Called where it would never end: on checkpointio's loop thread, or in a
                forked child for its parent's save.
        """
        return self._save is None or self._save.join(timeout, "SaveHandle.join()")

    def result(self, timeout: float | None = None) -> None:
        """Block until the save has ended; raise its error.

        Raises:
            TimeoutError: Still running after ``timeout`` seconds.
            concurrent.futures.CancelledError: The save was cancelled or superseded.
            PortalError: Called where it would never end: on checkpointio's loop thread, or in a
                forked child for its parent's save.
        """
        outcome = self._ended("SaveHandle.result()", timeout)
        if outcome is not None:
            outcome.result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until the save has ended; return its error, or ``None`` if it stored the checkpoint.

        The error counts as retrieved: it is not raised again by the checkpoint's next save.

        Raises:
            TimeoutError: Still running after ``timeout`` seconds.
            concurrent.futures.CancelledError: The save was cancelled or superseded (as a future's
                ``exception()`` does).
            PortalError: Called where it would never end: on checkpointio's loop thread, or in a
                forked child for its parent's save.
        """
        outcome = self._ended("SaveHandle.exception()", timeout)
        if outcome is None:
            return None
        error = outcome.exception()
        if isinstance(error, concurrent.futures.CancelledError):
            raise error
        return error

    def _ended(self, what: str, timeout: float | None) -> concurrent.futures.Future[None] | None:
        """Wait until the save has ended and mark its outcome retrieved; ``None`` for a finished save."""
        if self._save is None:
            return None
        if not self._save.join(timeout, what):
            raise TimeoutError(f"the background save to {self.uri} is still running")
        self._save.retrieved()
        return self._save.outcome

    def add_done_callback(self, fn: Callable[[SaveHandle], object]) -> None:
        """Call ``fn(handle)`` once the save has ended (stored, failed or cancelled).

        As with a future, ``fn`` runs in the thread that ends the save (checkpointio's event-loop
        thread: keep it short and do not call a ``*_sync`` method there), or at once in the
        caller's thread if the save has already ended; an exception it raises is logged and
        ignored. Callbacks run in the order they were added.
        """
        if self._save is None:
            self._call(fn)
            return
        self._save.outcome.add_done_callback(lambda _: self._call(fn))

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
        if self._save is not None:
            await self._save.ended("awaiting a SaveHandle")

    def unseen_error(self) -> BackgroundSaveError | None:
        """The failure of an ended save that nobody retrieved yet (marking it retrieved)."""
        return self._save.unseen_error() if self._save is not None else None


class InFlight:
    """A checkpoint's background save in flight: at most one at a time, its failure never lost.

    A save started in a forked child's parent is dropped on every access: it is the parent's.
    """

    def __init__(self) -> None:
        self._save: SaveHandle | None = None

    @property
    def handle(self) -> SaveHandle | None:
        """The save in flight, until a later save, :meth:`wait_for_it` or :meth:`close` settled it."""
        if self._save is not None and not self._save.in_this_process():
            self._save = None
        return self._save

    async def start(
        self, func: Callable[P, Coroutine[Any, Any, None]], uri: str, /, *args: P.args, **kwargs: P.kwargs
    ) -> SaveHandle:
        """Start ``func(*args, **kwargs)`` in the background; after interpreter exit drained the
        background saves, run it here instead (nobody would wait for it), and return it finished.
        Call :meth:`wait_for_it` first."""
        if _exit.passed(_exit.Stage.SAVES):
            await func(*args, **kwargs)
            return SaveHandle(uri)
        save = BackgroundSave(uri)
        save.start(func, *args, **kwargs)
        self._save = SaveHandle(uri, save)
        return self._save

    def adopt(self, handle: SaveHandle) -> None:
        """Take ``handle``, a save started elsewhere on this checkpoint's behalf (a distributed
        save's), as the save in flight: waited for and its failure raised as this checkpoint's own.
        Call :meth:`wait_for_it` first."""
        self._save = handle

    async def wait_for_it(self, supersede: bool) -> None:
        """Wait for (``supersede``: cancel) the save in flight; raise its error nobody retrieved.

        Raises:
            BackgroundSaveError: It failed and nobody retrieved the error from its handle.
        """
        while (previous := self.handle) is not None:
            if supersede:
                previous.cancel()
            await previous.wait_ended()
            if self._save is previous:
                self._save = None
            error = previous.unseen_error()
            if error is not None:
                raise error

    def close(self, timeout: float | None) -> BackgroundSaveError | None:
        """Block until the save in flight has ended, cancelling it after ``timeout`` seconds; its
        error nobody retrieved, to raise once the checkpoint has closed."""
        handle = self.handle
        if handle is None:
            return None
        # Still in flight while waited for: interrupted here (Ctrl-C), the caller can cancel it.
        if not handle.join(timeout):
            logger.error("%s still running after %s s; cancelling it", handle, timeout)
            handle.cancel()
            handle.join(_portal.CLEANUP_TIMEOUT)
        if self._save is handle:
            self._save = None
        return handle.unseen_error()
