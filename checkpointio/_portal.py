"""The single sync bridge: one process-wide event-loop thread that runs the async core.

``*_sync`` methods hand their coroutine to this thread through anyio's blocking portal and wait.
That works from plain code, from many threads at once, and from inside another running event loop
(that loop blocks; nothing deadlocks, because the work runs on this thread's loop). The thread is
started on first use, started anew in a forked child (the parent's thread does not exist there),
and stopped at interpreter exit. Ctrl-C while waiting cancels the work and waits for its cleanup,
so an interrupted save aborts its upload instead of leaving it behind.

Background work (``save(wait=False)``) is started on the same thread with :func:`start_soon`, which
returns at once. At interpreter exit the loop waits for it, at most :data:`EXIT_TIMEOUT` seconds
(``CHECKPOINTIO_EXIT_TIMEOUT``), before stopping: a clean exit does not drop the last checkpoint.
Work still running then is cancelled (its upload aborted); failures nobody retrieved are logged.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager
from typing import Any, ParamSpec, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._exceptions import PortalError

__all__ = ["Background", "exit_timeout", "on_loop_thread", "run_sync", "start_soon"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: How long an interrupted call waits for its cancelled coroutine to clean up (abort uploads):
#: longer than an S3 abort may take (60 s), so Ctrl-C does not return while one is still going.
#: A second Ctrl-C stops the wait.
CLEANUP_TIMEOUT = 75.0
#: How long interpreter exit waits for background saves still running, unless
#: ``CHECKPOINTIO_EXIT_TIMEOUT`` says otherwise.
EXIT_TIMEOUT = 600.0


def exit_timeout() -> float:
    """Seconds interpreter exit waits for background work: ``CHECKPOINTIO_EXIT_TIMEOUT`` or the default."""
    try:
        return float(os.environ.get("CHECKPOINTIO_EXIT_TIMEOUT", EXIT_TIMEOUT))
    except ValueError:
        return EXIT_TIMEOUT


class _LoopThread:
    def __init__(self) -> None:
        self.manager: AbstractContextManager[BlockingPortal] = start_blocking_portal(name="checkpointio-loop")
        self.portal = self.manager.__enter__()
        self.thread_id = self.portal.call(threading.get_ident)
        self.loop: asyncio.AbstractEventLoop = self.portal.call(_running_loop)
        self.pid = os.getpid()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.portal.call(self.portal.stop, True)
        self.manager.__exit__(None, None, None)


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


_lock = threading.Lock()
_current: _LoopThread | None = None
#: Loop threads inherited from a parent process. They are kept, never finalized: finalizing the
#: portal's context manager would join a thread that does not exist in the child, forever.
_orphans: list[_LoopThread] = []


def _loop_thread() -> _LoopThread:
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = _LoopThread()
        return _current


def _forget_after_fork() -> None:
    global _current, _lock
    if _current is not None:
        _orphans.append(_current)  # the thread was not copied into the child; never touch its portal
    _current = None
    _lock = threading.Lock()  # another thread may have held it at the fork
    _background.clear()  # the parent's work runs in the parent, not here


class Background:
    """Work started on the loop thread without waiting: a future set only once the work has ended.

    Unlike the future of ``asyncio.run_coroutine_threadsafe``, :attr:`outcome` is not marked
    cancelled the moment cancellation is requested: it completes when the coroutine has finished
    its cleanup (an aborted upload is gone), with ``concurrent.futures.CancelledError`` if it was
    cancelled.

    Until :meth:`reported` is called, a failure counts as unseen and interpreter exit logs it.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._task: concurrent.futures.Future[None] | None = None
        self.pid = os.getpid()

    def cancel(self) -> None:
        """Ask the work to stop; :attr:`outcome` completes once it has cleaned up."""
        if self._task is not None:
            self._task.cancel()

    def reported(self) -> None:
        """Its outcome reached the caller: nothing left to report at exit."""
        with _lock:
            _background.pop(self, None)


#: Background work that is running or whose failure nobody has retrieved yet.
_background: dict[Background, None] = {}


def start_soon(
    func: Callable[P, Coroutine[Any, Any, T]], description: str, /, *args: P.args, **kwargs: P.kwargs
) -> Background:
    """Start ``func(*args, **kwargs)`` on the loop thread and return at once (also from that thread)."""
    loop = _loop_thread()
    work = Background(description)
    outcome = work.outcome
    outcome.set_running_or_notify_cancel()

    async def call() -> None:
        try:
            result = await func(*args, **kwargs)
        except asyncio.CancelledError:
            outcome.set_exception(concurrent.futures.CancelledError(f"{description}: cancelled"))
            raise
        except BaseException as error:
            outcome.set_exception(error)
            if not isinstance(error, Exception):
                raise
        else:
            outcome.set_result(result)

    def settled(future: concurrent.futures.Future[Any]) -> None:
        if future.exception() is None or isinstance(future.exception(), concurrent.futures.CancelledError):
            work.reported()  # success and cancellation are nothing to report

    with _lock:
        _background[work] = None
    outcome.add_done_callback(settled)
    work._task = asyncio.run_coroutine_threadsafe(call(), loop.loop)
    return work


def on_loop_thread() -> bool:
    """Whether the caller runs on the loop thread (where blocking on it would deadlock)."""
    current = _current
    return current is not None and current.pid == os.getpid() and threading.get_ident() == current.thread_id


def _drain(timeout: float) -> None:
    """Wait for background work, at most ``timeout`` seconds; cancel the rest; log unseen failures."""
    with _lock:
        works = [work for work in _background if work.pid == os.getpid()]
    if not works:
        return
    running = [work for work in works if not work.outcome.done()]
    if running:
        logger.info("waiting up to %.0f s for %d background save(s)", timeout, len(running))
    deadline = time.monotonic() + timeout
    for work in running:
        with contextlib.suppress(BaseException):
            work.outcome.exception(max(0.0, deadline - time.monotonic()))
    for work in works:
        if not work.outcome.done():
            _lost(f"{work.description} did not finish within {timeout:.0f} s of exit; cancelling it")
            work.cancel()
            with contextlib.suppress(BaseException):
                work.outcome.exception(CLEANUP_TIMEOUT)
            continue
        error = work.outcome.exception()
        if error is not None and not isinstance(error, concurrent.futures.CancelledError):
            _lost(f"{work.description} failed: {type(error).__name__}: {error}")
        work.reported()


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


@atexit.register
def _shutdown() -> None:
    global _current
    current = _current
    if current is not None and current.pid == os.getpid():
        _drain(exit_timeout())
    with _lock:
        current, _current = _current, None
    if current is not None and current.pid == os.getpid():
        current.stop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def run_sync(func: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``func(*args, **kwargs)`` on the loop thread and return its result.

    Raises:
        PortalError: Called from the loop thread itself, where waiting would deadlock.
    """
    loop = _loop_thread()
    if threading.get_ident() == loop.thread_id:
        raise PortalError(
            "a *_sync method was called from checkpointio's own event-loop thread, where it would "
            "deadlock; await the async method instead"
        )
    finished = threading.Event()

    async def call() -> T:
        try:
            return await func(*args, **kwargs)
        finally:
            finished.set()

    future = loop.portal.start_task_soon(call)
    try:
        return future.result()
    except BaseException:
        if not future.done():  # interrupted while waiting (Ctrl-C): cancel, let cleanup finish
            future.cancel()
            finished.wait(CLEANUP_TIMEOUT)
        raise
