"""Concurrency plumbing shared by the engine and the stores: one error out of an exception group,
thread locks that survive a fork, and what a forked child must never free."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import anyio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["PLUMBING", "Aborted", "ForkSafeLock", "keep_forever", "one_error"]


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
