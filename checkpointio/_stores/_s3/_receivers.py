"""Receiving threads: event loops of their own that carry a load's ranged GETs.

One event loop receives at most about a core's worth of bytes (the kernel's ``recv`` and each
block's CRC32, all on its one thread; :mod:`._http` reads the bodies). A load therefore spreads
its ranges over several *receivers*: each is a thread running its own event loop (asyncio's, or uvloop's when asked:
:func:`new_loop`), with its own aiobotocore client and connection pool (:mod:`._client` keeps one
per loop), started on first use and kept for the life of the process, so a client is made once
per receiver, not once per load.

:meth:`Receiver.run` runs a coroutine on a receiver and waits for it from the caller's loop. It
returns or raises only once that coroutine has ended: when the caller is cancelled, the coroutine
is cancelled and waited for, so nothing it does (a write at an offset, a block handed on) happens
after the caller moved on. The threads are stopped at interpreter exit (with the event-loop thread,
:mod:`..._exit`) and forgotten in a forked child, as :mod:`..._portal` does with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import anyio

from ... import _exit

__all__ = ["Receiver", "Receiving", "receivers", "on_receiver"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: How long stopping a receiver at exit waits for its loop to close its client.
_STOP_TIMEOUT = 10.0

#: ``receiving`` is set on the receivers' own threads.
_local = threading.local()

#: The environment variable that picks the receivers' event loops: ``asyncio`` (the default) or
#: ``uvloop`` (where it is installed).
RECEIVE_LOOP = "CHECKPOINTIO_RECEIVE_LOOP"


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop for a receiving thread: asyncio's own, or uvloop's when asked.

    uvloop reads the socket in C, into fewer and larger blocks; on the 2-core machine the
    benchmarks run on, it did not make loads faster (benchmarks/README.md, *Receiving on uvloop*),
    so it is an opt-in for machines where the receiving loops are what a load waits for. The
    receivers' loops are checkpointio's own threads: the caller's loop, and the event-loop policy
    of the process, stay as they are; ``asyncio`` means asyncio's own loop, whatever policy the
    process set.

    Raises:
        ValueError: :data:`RECEIVE_LOOP` names neither loop (a typo must not pass for a choice), or
            asks for uvloop where it is not installed.
    """
    asked = os.environ.get(RECEIVE_LOOP, "").strip().lower()
    if asked not in ("", "uvloop", "asyncio"):
        raise ValueError(f"{RECEIVE_LOOP} must be 'asyncio' or 'uvloop', not {asked!r}")
    if asked == "uvloop":
        try:
            import uvloop
        except ImportError as error:
            raise ValueError(f"{RECEIVE_LOOP}=uvloop needs the uvloop package, which is not installed") from error
        return uvloop.new_event_loop()
    if sys.platform == "win32":  # pragma: no cover - its default (proactor) loop
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop()


def on_receiver() -> bool:
    """Whether the calling thread is a receiver's (ours, not the caller's event loop)."""
    return getattr(_local, "receiving", False)


class Receiving(Protocol):
    """Where a load's ranges are received: a receiving thread, or the caller's own loop."""

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, object]], *args: Any) -> None: ...

    async def run(self, func: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T: ...


class _CallersLoop:
    """Receives on the caller's loop: once interpreter exit stopped the receiving threads, a late
    load (from an ``atexit`` hook) starts none that nobody would stop."""

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, object]], *args: Any) -> None:
        """Nothing to make ahead: the caller's loop makes its client when it first asks."""

    async def run(self, func: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return await func(*args)


class Receiver:
    """A thread running an asyncio event loop of its own, named ``checkpointio-receiver``."""

    def __init__(self) -> None:
        self.loop = new_loop()
        self._started: set[asyncio.Task[Any]] = set()  # by start_soon: kept until done (asyncio holds weak references)
        self.thread = threading.Thread(target=self._serve, name="checkpointio-receiver", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        _local.receiving = True
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Stopped (interpreter exit): cancel what still runs, then close the clients kept in
            # async generators (:class:`._client._Clients`) and the loop.
            with contextlib.suppress(Exception):
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(_STOP_TIMEOUT)

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, object]], *args: Any) -> None:
        """Start ``func(*args)`` on this receiver's loop and return at once, from any thread.

        For work done ahead of need (a client made while another receiver asks for the metadata):
        nobody waits for it, so its failure is only logged (at debug level); the call that needs
        the result meets the same failure again and reports it.
        """

        def done(task: asyncio.Task[Any]) -> None:
            self._started.discard(task)
            if not task.cancelled() and task.exception() is not None:
                logger.debug("work started ahead on a receiving thread failed: %r", task.exception())

        def start() -> None:
            task = self.loop.create_task(func(*args))
            self._started.add(task)
            task.add_done_callback(done)

        with contextlib.suppress(RuntimeError):  # the loop is closed (interpreter exit): nothing to get ready for
            self.loop.call_soon_threadsafe(start)

    async def run(self, func: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """``await func(*args)`` on this receiver's loop, waited for from the caller's loop.

        Returns its result or raises its exception once it has ended. If the caller is cancelled,
        so is the coroutine, and the cancellation goes on only once it has ended.
        """
        caller = asyncio.get_running_loop()
        ended = anyio.Event()
        task: asyncio.Task[T] | None = None

        def finished(_: object) -> None:  # on this receiver's loop
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody waits
                caller.call_soon_threadsafe(ended.set)

        def start() -> None:  # on this receiver's loop
            nonlocal task
            task = self.loop.create_task(func(*args))
            task.add_done_callback(finished)

        def cancel() -> None:  # on this receiver's loop, after start(): call_soon_threadsafe keeps order
            if task is not None:
                task.cancel()

        self.loop.call_soon_threadsafe(start)
        try:
            await ended.wait()
        except BaseException:
            self.loop.call_soon_threadsafe(cancel)
            with anyio.CancelScope(shield=True):
                await ended.wait()
            raise
        assert task is not None  # ended is set by the task's own callback
        return task.result()  # its exception, or CancelledError if it was cancelled from elsewhere


_lock = threading.Lock()
_running: list[Receiver] = []
#: Receivers inherited from a parent process: their threads are not in this one; never touched.
_orphans: list[Receiver] = []


def receivers(count: int) -> Sequence[Receiving]:
    """``count`` receivers (at least one), started as needed; the same ones call after call. Once
    interpreter exit stopped them, the caller's own loop instead."""
    count = max(1, count)
    with _lock:
        if _exit.passed(_exit.Stage.LOOP):
            return [_CallersLoop()]
        while len(_running) < count:
            _running.append(Receiver())
        return _running[:count]


def _forget_after_fork() -> None:
    global _lock
    _orphans.extend(_running)
    _running.clear()
    _lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _stop() -> None:
    """At interpreter exit, with the event-loop thread: stop the receivers (closing their clients)."""
    with _lock:
        stopping = list(_running)
        _running.clear()
    for receiver in stopping:
        receiver.stop()


_exit.on_exit(_exit.Stage.LOOP, _stop)
