"""Awaitables that refuse to be truth-tested: ``if cp.prev_exists():`` in sync code is an error.

An ``async def`` method returns a coroutine, which is always true: code ported from a sync API
(``if cp.prev_exists():``, ``if cp.load():``) would silently take the wrong branch and leave a
coroutine never awaited. The public coroutine methods return a :class:`Pending` instead: a
coroutine in every other respect (``await`` it, pass it to ``asyncio.run``, ``create_task``,
``gather``), whose ``bool()`` closes it and raises a ``TypeError`` naming the sync twin.

Only where that can be the trap: a truth test from the event-loop libraries themselves (asyncio's
task repr tests ``if task._coro:`` from 3.12) or of an awaitable already started is true, as for
any object.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any, ParamSpec, TypeVar

__all__ = ["Pending", "awaitable"]

#: Top-level packages whose truth tests of a coroutine are generic code (``if task._coro:``), never
#: the porting trap: for them a :class:`Pending` is true, like any object.
_LIBRARIES = frozenset({"asyncio", "anyio", "trio", "uvloop", "concurrent", "reprlib", "_pytest", "pytest_asyncio"})

P = ParamSpec("P")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Pending(Coroutine[Any, Any, T_co]):
    """The not yet awaited result of a checkpointio coroutine method (a coroutine: ``await`` it).

    Testing it for truth (``if cp.prev_exists():``) raises ``TypeError``: in async code ``await``
    the call, in sync code call its ``*_sync`` twin. (Once started, or tested by asyncio, anyio or
    trio themselves, it is true, as any object.)
    """

    __slots__ = ("_call", "_coroutine", "_started", "_twin")

    def __init__(self, coroutine: Coroutine[Any, Any, T_co], call: str, twin: str) -> None:
        self._coroutine = coroutine
        self._call = call
        self._twin = twin
        self._started = False

    def __await__(self) -> Generator[Any, Any, T_co]:
        self._started = True
        return self._coroutine.__await__()

    def send(self, value: Any, /) -> Any:
        self._started = True
        return self._coroutine.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None, /) -> Any:
        self._started = True
        if val is None and tb is None:
            return self._coroutine.throw(typ)
        return self._coroutine.throw(typ, val, tb)  # the old three-argument form, as callers give it

    def close(self) -> None:
        self._coroutine.close()

    @property
    def __name__(self) -> str:  # shown by asyncio's task reprs
        return self._call

    def __bool__(self) -> bool:
        if self._started or sys._getframe(1).f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
            return True
        self._coroutine.close()  # never to be awaited now: no "never awaited" warning on top
        raise TypeError(
            f"{self._call}() returns an awaitable, which is always true: write `await {self._call}()` "
            f"in async code, or call {self._twin}() in sync code"
        )

    def __repr__(self) -> str:
        return f"<awaitable {self._call}(): await it, or call {self._twin}() in sync code>"


def awaitable(call: str, twin: str) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Pending[T]]]:
    """Make an ``async def`` function return a :class:`Pending`; ``call`` and ``twin`` name it and
    its sync twin in the error (``"cp.load"``, ``"cp.load_sync"``)."""

    def decorate(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Pending[T]]:
        @functools.wraps(func)
        def start(*args: P.args, **kwargs: P.kwargs) -> Pending[T]:
            return Pending(func(*args, **kwargs), call, twin)

        if sys.version_info >= (3, 12):  # inspect.iscoroutinefunction(cp.load) stays true where it can
            inspect.markcoroutinefunction(start)
        return start

    return decorate
