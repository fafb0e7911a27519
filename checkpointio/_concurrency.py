"""Task-group plumbing shared by the engine and the stores: one error out of an exception group."""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["PLUMBING", "Aborted", "one_error"]


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
