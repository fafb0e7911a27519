"""Interpreter exit, in one stated order rather than the reverse order of imports ``atexit`` gives.

One ``atexit`` hook runs the stages in this order, each stage's hooks in the order registered:

1. :attr:`Stage.SAVES`: background saves still running are waited for (bounded), the rest
   cancelled, failures nobody retrieved logged; they may still need the loop and scratch space;
2. :attr:`Stage.FILES`: this process's temporary folders are removed;
3. :attr:`Stage.LOOP`: the event-loop thread is stopped.

A hook finds its own process's state only: state inherited through ``fork`` is forgotten in the
child by the module that owns it. Work arriving after its stage has run (from an ``atexit`` hook the
application registered before importing checkpointio, which runs after this one) asks
:func:`passed` and is done in the foreground instead. Work that needs a
``concurrent.futures`` executor asks :func:`began`: executors refuse new work in every ``atexit``
hook, whatever its order.
"""

from __future__ import annotations

import atexit
import enum
import logging
import threading
from collections.abc import Callable

__all__ = ["Stage", "began", "on_exit", "passed"]

logger = logging.getLogger(__name__)


class Stage(enum.IntEnum):
    """The steps of interpreter exit, in the order they run."""

    SAVES = 1
    FILES = 2
    LOOP = 3


_hooks: dict[Stage, list[Callable[[], None]]] = {stage: [] for stage in Stage}
#: The stage interpreter exit has reached, once it began.
_reached: Stage | None = None


def on_exit(stage: Stage, hook: Callable[[], None]) -> None:
    """Run ``hook`` at interpreter exit, in ``stage``."""
    _hooks[stage].append(hook)


def passed(stage: Stage) -> bool:
    """Whether interpreter exit has begun ``stage``: its hooks will not run (again) for new work."""
    return _reached is not None and _reached >= stage


def began() -> bool:
    """Whether interpreter exit has begun at all: true in every ``atexit`` hook, whichever runs
    first, since ``threading`` has joined its threads before ``atexit`` and ``concurrent.futures``
    executors refuse new work from then on."""
    return _reached is not None or bool(getattr(threading, "_SHUTTING_DOWN", False))


@atexit.register
def _run() -> None:
    global _reached
    for stage in Stage:
        _reached = stage
        for hook in _hooks[stage]:
            try:
                hook()
            except Exception:  # one failed step must not keep the later ones from running
                logger.exception("exit step %s failed", getattr(hook, "__qualname__", hook))
