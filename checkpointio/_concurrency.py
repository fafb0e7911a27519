"""Concurrency plumbing shared by the engine and the stores: one error out of an exception group,
thread locks that survive a fork, what a forked child must never free, and the hand-off of a
stream of items from a worker thread to the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Generic, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["PLUMBING", "Aborted", "ForkSafeLock", "Handoff", "keep_forever", "one_error"]

T = TypeVar("T")


class Aborted(Exception):
    """The other side of a pipeline failed; this side stops quietly and lets that error speak."""


#: Exceptions that only say "the other side went away": never the error to report.
PLUMBING = (
    Aborted,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    concurrent.futures.CancelledError,
)


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@contextmanager
def one_error() -> Iterator[None]:
    """Turn a task group's exception group into the one error that caused it."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        cancel = anyio.get_cancelled_exc_class()
        for exc in leaves:
            if not isinstance(exc, PLUMBING) and not isinstance(exc, cancel):
                raise exc from exc.__cause__  # its own cause kept; the group is not shown as context
        for exc in leaves:
            if isinstance(exc, cancel):
                raise exc from None
        raise


class ForkSafeLock:
    """A thread lock that a forked child finds released.

    A fork copies a lock another thread holds as held, and nothing in the child ever releases it:
    every later ``with`` on it there waits forever (a DataLoader worker forked while a load makes
    its S3 sessions). The child gets a fresh lock instead; what the lock guarded is as the fork
    left it, which is why it must guard only short, self-contained updates.
    """

    __slots__ = ("__weakref__", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _fork_safe.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._lock.release()


_fork_safe: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _renew_after_fork() -> None:
    for lock in list(_fork_safe):
        lock._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_after_fork)


def keep_forever(obj: object) -> None:
    """Never free ``obj``, not even as the interpreter finalizes: a reference nobody gives back.

    For what a forked child inherits from its parent's threads (a loop thread's portal, S3 clients
    and their connections): freed at the child's exit, each would run its clean-up against threads
    that are the parent's (a traceback, a join of a thread that is not there) or report itself
    unclosed, and closing it in the child is no better: its sockets are the parent's too.
    """
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    except (ImportError, AttributeError):  # pragma: no cover - no CPython C API (PyPy)
        pass


class Handoff(Generic[T]):
    """Items passed from one worker thread to one task on the event loop, at most ``depth`` of
    them waiting: the bytes of a save on their way from the archive thread to the store.

    anyio's memory object stream, fed from a thread, costs a round trip through the event loop
    per item (``from_thread.run(send.send, item)`` waits until the loop has run the send), and
    the thread waits for it whether or not the receiving task is ready: for the ~370 gzip members
    of a 50,000-file tree that was 0.2 s of the archive thread's time (benchmarks/README.md, issue
    19). Here the thread waits only while ``depth`` items are waiting already, and the loop is
    woken only when the task is waiting for an item.

    The thread calls :meth:`send`; the task iterates (``async for``), and calls :meth:`stop` when
    it receives no more (in a ``finally``), which makes a thread waiting to send, or sending
    later, raise :class:`Aborted`. :meth:`end`, called on the event loop once the thread has sent
    everything, ends the iteration after the items waiting. Create it on the event loop.
    """

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._depth = depth
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._ended = False
        self._stopped = False
        self._waiting: anyio.Event | None = None  # the task's, while it waits for an item
        self._wake = _waker()

    def send(self, item: T) -> None:
        """Worker thread: add ``item``, once fewer than ``depth`` are waiting.

        Raises:
            Aborted: The receiving task stopped (it failed, finished or was cancelled).
        """
        with self._lock:
            while len(self._items) >= self._depth and not self._stopped:
                self._room.wait()
            if self._stopped:
                raise Aborted("the receiving side stopped")
            self._items.append(item)
            waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._wake(waiting.set)

    def end(self) -> None:
        """Event loop: nothing more will be sent; the iteration ends after the items waiting."""
        with self._lock:
            self._ended = True
            waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.set()

    def stop(self) -> None:
        """Event loop: the task receives no more; the items waiting are dropped."""
        with self._lock:
            self._stopped = True
            self._items.clear()
            self._room.notify_all()

    def __aiter__(self) -> Handoff[T]:
        return self

    async def __anext__(self) -> T:
        await anyio.lowlevel.checkpoint()  # a cancellation point, and other tasks run between items
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    self._room.notify()
                    return item
                if self._ended or self._stopped:
                    raise StopAsyncIteration
                self._waiting = waiting = anyio.Event()
            await waiting.wait()


def _waker() -> Callable[[Callable[[], object]], object]:
    """How a worker thread has the current event loop call a function, without waiting for it
    where the loop is asyncio's (any other backend: through anyio's portal, which waits)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another backend (trio)
        return anyio.from_thread.run_sync
    return loop.call_soon_threadsafe
