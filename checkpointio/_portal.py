"""The single sync bridge: one process-wide event-loop thread that runs the async core.

``*_sync`` methods hand their coroutine to this thread through anyio's blocking portal and wait.
That works from plain code, from many threads at once, and from inside another running event loop
(that loop blocks; nothing deadlocks, because the work runs on this thread's loop). The thread is
started on first use, started anew in a forked child (the parent's thread does not exist there),
and stopped at interpreter exit. Ctrl-C while waiting cancels the work and waits for its cleanup,
so an interrupted save aborts its upload instead of leaving it behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import ParamSpec, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._exceptions import PortalError

__all__ = ["run_sync"]

P = ParamSpec("P")
T = TypeVar("T")

#: How long an interrupted call waits for its cancelled coroutine to clean up (abort uploads).
CLEANUP_TIMEOUT = 30.0


class _LoopThread:
    def __init__(self) -> None:
        self.manager: AbstractContextManager[BlockingPortal] = start_blocking_portal(name="checkpointio-loop")
        self.portal = self.manager.__enter__()
        self.thread_id = self.portal.call(threading.get_ident)
        self.pid = os.getpid()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.portal.call(self.portal.stop, True)
        self.manager.__exit__(None, None, None)


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


@atexit.register
def _shutdown() -> None:
    global _current
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
