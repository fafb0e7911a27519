"""The single sync bridge: one process-wide event-loop thread that runs the async core.

``*_sync`` methods hand their coroutine to this thread through anyio's blocking portal and wait
(:func:`run_sync`); :func:`submit` starts one there and returns at once. That works from plain code,
from many threads at once, and from inside another running event loop (that loop blocks; nothing
deadlocks, because the work runs on this thread's loop). The thread is started on first use,
started anew in a forked child (the parent's thread does not exist there), and stopped at
interpreter exit, in the last stage of :mod:`._exit` (a call after that runs in the foreground on
a loop of its own: nothing would stop a new thread). Ctrl-C while waiting cancels the work and
waits for its cleanup, so an interrupted save aborts its upload instead of leaving it behind.

This module only runs coroutines: what a background save owes its caller (its outcome, waiting
for it at exit) is :mod:`._background`'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager
from typing import Any, ParamSpec, TypeVar

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import _exit
from ._concurrency import keep_forever
from ._exceptions import PortalError

__all__ = ["CLEANUP_TIMEOUT", "on_loop_thread", "run_sync", "submit"]

P = ParamSpec("P")
T = TypeVar("T")

#: How long an interrupted call waits for its cancelled coroutine to clean up (abort uploads):
#: longer than an S3 abort may take (60 s), so Ctrl-C does not return while one is still going.
#: A second Ctrl-C stops the wait.
CLEANUP_TIMEOUT = 75.0


class _LoopThread:
    def __init__(self) -> None:
        self.manager: AbstractContextManager[BlockingPortal] = start_blocking_portal(name="checkpointio-loop")
        self.portal = self.manager.__enter__()
        self.thread_id = self.portal.call(threading.get_ident)
        self.loop: asyncio.AbstractEventLoop = self.portal.call(_running_loop)

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
    """The loop thread, started on first use; never after interpreter exit stopped it (nothing
    would stop a new one, and its teardown would fail noisily as the interpreter finalizes)."""
    global _current
    with _lock:
        if _current is None:
            if _exit.passed(_exit.Stage.LOOP):
                raise PortalError("checkpointio's event-loop thread was stopped at interpreter exit")
            _current = _LoopThread()
        return _current


def _forget_after_fork() -> None:
    """In a forked child: the parent's loop thread was not copied; the next call starts one."""
    global _current, _lock
    if _current is not None:
        _orphans.append(_current)  # never touch its portal: its thread is the parent's
        keep_forever(_current.manager)  # freed, it would stop the portal: the parent's loop
    _current = None
    _lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _stop() -> None:
    """At interpreter exit, after background saves were drained: stop the loop thread."""
    global _current
    with _lock:
        current, _current = _current, None
    if current is not None:
        current.stop()


_exit.on_exit(_exit.Stage.LOOP, _stop)


def on_loop_thread() -> bool:
    """Whether the caller runs on the loop thread (where blocking on it would deadlock)."""
    current = _current
    return current is not None and threading.get_ident() == current.thread_id


def submit(
    func: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
) -> concurrent.futures.Future[T]:
    """Start ``func(*args, **kwargs)`` on the loop thread and return at once (also from that thread).

    The future is that of ``asyncio.run_coroutine_threadsafe``: cancelling it cancels the coroutine.
    """
    return asyncio.run_coroutine_threadsafe(func(*args, **kwargs), _loop_thread().loop)


class _Call:
    """One :func:`run_sync` call's work on the loop thread, as its caller can stop it from the moment
    it is scheduled: a Ctrl-C may land anywhere in the caller, also before it waits on the result."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: The caller was interrupted: work not started yet must not start.
        self.stopped = False
        #: The scope the work runs in, once it started.
        self.scope: anyio.CancelScope | None = None
        #: Set once the work has ended, its cleanup done.
        self.finished = threading.Event()

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the work and wait for its cleanup (at most ``CLEANUP_TIMEOUT``); work that has
        not started never will."""
        with self.lock:
            self.stopped = True
            scope = self.scope
        if scope is not None:
            loop.call_soon_threadsafe(scope.cancel)
            self.finished.wait(CLEANUP_TIMEOUT)


def run_sync(func: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``func(*args, **kwargs)`` on the loop thread and return its result.

    Interrupted (Ctrl-C) at any point, even before it started waiting, it cancels the work and
    waits for its cleanup (an aborted upload, a removed temporary file) before raising.

    Called after interpreter exit stopped the loop thread (from an ``atexit`` hook registered
    before checkpointio's), it runs the work in the foreground on an event loop of its own,
    closed before it returns.

    Raises:
        PortalError: Called from the loop thread itself, where waiting would deadlock.
    """
    if _exit.passed(_exit.Stage.LOOP):
        return _run_here(functools.partial(func, *args, **kwargs))
    loop = _loop_thread()
    if threading.get_ident() == loop.thread_id:
        raise PortalError(
            "a *_sync method was called from checkpointio's own event-loop thread, where it would "
            "deadlock; await the async method instead"
        )
    call = _Call()

    async def work() -> T:
        with anyio.CancelScope() as scope:
            with call.lock:
                if call.stopped:
                    raise PortalError("interrupted before it started")  # nobody waits for this result
                call.scope = scope
            try:
                return await func(*args, **kwargs)
            finally:
                call.finished.set()
        raise PortalError("cancelled by its interrupted caller")  # nobody waits for this result

    future: concurrent.futures.Future[T] | None = None
    try:
        future = loop.portal.start_task_soon(work)
        return future.result()
    except BaseException:
        if future is None or not future.done():  # interrupted (Ctrl-C), wherever it landed
            call.stop(loop.loop)
        raise


def _run_here(func: Callable[[], Awaitable[T]]) -> T:
    """Run ``func`` on a short-lived event loop in this thread; in a short-lived thread of its own
    when this thread already runs one (an ``atexit`` hook calling ``asyncio.run``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(func)
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome.set_result(anyio.run(func))
        except BaseException as error:  # handed to the caller, re-raised there
            outcome.set_exception(error)

    thread = threading.Thread(target=run, name="checkpointio-at-exit")
    thread.start()
    thread.join()
    return outcome.result()
