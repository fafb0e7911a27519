"""The task runtime of the tutorial: ``TaskEnvironment``, ``@env.task(retries=N)`` and ``ctx()``.

A task call is one *run*; each try of it is an *attempt*, which saves to its own key under the
storage root::

    <storage>/<environment>/<task>/<run id>/attempt-<n>

and restores from the newest earlier attempt of the same run that saved a valid checkpoint. With
an explicit run id (argument or ``CHECKPOINTIO_RUN_ID``), a process started again after a crash,
a ``SIGKILL`` or a reboot continues the same run: attempt numbers carry on after the newest saved
one, and that checkpoint is restored.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar, overload

import anyio
import anyio.to_thread
from typing_extensions import Unpack

from . import _portal
from ._checkpoint import Checkpoint
from ._config import TransferConfig, TransferOptions
from ._exceptions import BackgroundSaveError
from ._location import Location, parse_location
from ._stores import open_store

__all__ = ["AttemptFailure", "TaskContext", "TaskEnvironment", "ctx", "default_storage", "env"]

logger = logging.getLogger("checkpointio")

P = ParamSpec("P")
R = TypeVar("R")
Q = ParamSpec("Q")
T = TypeVar("T")


class _TaskDecorator(Protocol):
    def __call__(self, func: Callable[Q, T], /) -> Callable[Q, T]: ...


_ATTEMPT = re.compile(r"attempt-(\d+)$")


def default_storage() -> str:
    """The storage root in force: ``CHECKPOINTIO_STORAGE``, else the embedded local folder.

    The embedded folder is ``$XDG_CACHE_HOME/checkpointio`` (``~/.cache/checkpointio``).
    """
    configured = os.environ.get("CHECKPOINTIO_STORAGE")
    if configured:
        return configured
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(cache, "checkpointio")


@dataclass(frozen=True)
class TaskContext:
    """What a running task knows about itself; ``ctx()`` outside a task is falsy, fields ``None``.

    Attributes:
        checkpoint: This attempt's checkpoint, or ``None`` outside a task or with ``retries=0``.
        attempt: 0-based attempt number within the run.
        run_id: The run this attempt belongs to.
        task_name: The task's name.
    """

    checkpoint: Checkpoint | None = None
    attempt: int | None = None
    run_id: str | None = None
    task_name: str | None = None

    def __bool__(self) -> bool:
        return self.task_name is not None


_NO_TASK = TaskContext()
_current: ContextVar[TaskContext] = ContextVar("checkpointio_task", default=_NO_TASK)


def ctx() -> TaskContext:
    """The context of the task running here (also in threads it starts with ``to_thread``)."""
    return _current.get()


@dataclass(frozen=True)
class AttemptFailure:
    """One failed attempt, as attached to the error a task finally raises (``error.attempts``)."""

    attempt: int
    error: BaseException


def _new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)


@dataclass
class _Run:
    """One call of a task: where its attempts live and which of them saved something."""

    root: Location
    run_id: str
    config: TransferConfig
    keep_last: int | None
    saved: list[int] = field(default_factory=list)

    def attempt_location(self, attempt: int) -> Location:
        return self.root.child(f"attempt-{attempt}")

    async def discover(self) -> None:
        """List the attempts of this run that saved a checkpoint (after a restart: the old ones)."""
        store = await open_store(self.root.scheme, self.config)
        found = await store.list(self.root.child("attempt-"))
        numbers = (_ATTEMPT.search(info.location.key) for info in found)
        self.saved = sorted({int(match.group(1)) for match in numbers if match})

    def first_attempt(self) -> int:
        return self.saved[-1] + 1 if self.saved else 0

    def checkpoint(self, attempt: int) -> Checkpoint:
        earlier = [self.attempt_location(n).uri for n in sorted(self.saved, reverse=True) if n < attempt]
        return Checkpoint(self.attempt_location(attempt).uri, src=earlier or None, config=self.config)

    async def clean_up(self) -> None:
        """After a successful run: keep the newest ``keep_last`` attempts' checkpoints."""
        if self.keep_last is None:
            return
        await self.discover()
        store = await open_store(self.root.scheme, self.config)
        for attempt in self.saved[: -self.keep_last] if self.keep_last else self.saved:
            await store.delete(self.attempt_location(attempt))


class TaskEnvironment:
    """Groups tasks that share storage and settings.

    Args:
        name: Names the folder of this environment's runs under the storage root.
        storage: Storage root URI (``s3://bucket/prefix``, a path, ...). ``None`` reads
            ``CHECKPOINTIO_STORAGE`` at call time, else the embedded local folder.
        run_id: Makes every call continue this run (else ``CHECKPOINTIO_RUN_ID``, else a new run
            per call).
        keep_last: After a run succeeds, delete all but its newest ``keep_last`` attempts'
            checkpoints (``0`` deletes them all). ``None`` keeps everything.
        backoff: Seconds to wait before each retry, doubling each time.
        config / **options: Transfer settings for the checkpoints (see ``TransferConfig``).
    """

    def __init__(
        self,
        name: str = "default",
        *,
        storage: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        keep_last: int | None = None,
        backoff: float = 0.0,
        config: TransferConfig | None = None,
        **options: Unpack[TransferOptions],
    ) -> None:
        if not name or "/" in name:
            raise ValueError(f"an environment name must be non-empty and without '/', got {name!r}")
        if keep_last is not None and keep_last < 0:
            raise ValueError("keep_last must not be negative")
        self.name = name
        self.storage = os.fspath(storage) if storage is not None else None
        self.run_id = run_id
        self.keep_last = keep_last
        self.backoff = backoff
        self.config = (config or TransferConfig()).with_options(**options)

    def __repr__(self) -> str:
        return f"TaskEnvironment({self.name!r}, storage={self.storage!r})"

    def _start(self, task_name: str, run_id: str | None) -> _Run:
        storage = parse_location(self.storage or default_storage())
        run = run_id or self.run_id or os.environ.get("CHECKPOINTIO_RUN_ID") or _new_run_id()
        if "/" in run or not run:
            raise ValueError(f"a run id must be non-empty and without '/', got {run!r}")
        root = storage.child(self.name).child(task_name).child(run)
        return _Run(root, run, self.config, self.keep_last)

    @overload
    def task(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    @overload
    def task(
        self,
        *,
        retries: int = 0,
        backoff: float | None = None,
        name: str | None = None,
        run_id: str | None = None,
    ) -> _TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        retries: int = 0,
        backoff: float | None = None,
        name: str | None = None,
        run_id: str | None = None,
    ) -> Any:
        """Make ``fn`` (``def`` or ``async def``) a task retried up to ``retries`` times.

        Each attempt runs with ``ctx()`` set; with ``retries > 0`` its ``ctx().checkpoint`` saves
        to the attempt's own key and loads the newest earlier valid checkpoint of the run. Only
        ``Exception`` is retried, never ``KeyboardInterrupt``, ``SystemExit`` or cancellation. When
        every attempt failed, the last error is raised with ``error.attempts`` (a list of
        :class:`AttemptFailure`) attached.
        """
        if retries < 0:
            raise ValueError("retries must not be negative")

        def decorate(func: Callable[Q, T]) -> Callable[Q, T]:
            return _make_task(self, func, retries, self.backoff if backoff is None else backoff, name, run_id)

        return decorate(fn) if fn is not None else decorate


def _failed(error: BaseException, failures: list[AttemptFailure]) -> None:
    error.attempts = list(failures)  # type: ignore[attr-defined]
    summary = "; ".join(f"attempt {f.attempt}: {type(f.error).__name__}: {f.error}" for f in failures)
    if hasattr(error, "add_note"):
        error.add_note(f"checkpointio: all {len(failures)} attempts failed ({summary})")


def _close_after_failure(checkpoint: Checkpoint, error: Exception) -> None:
    """Close a failed attempt's checkpoint: wait for its background save, so the next attempt sees it.

    A background failure is logged and noted on the attempt's error, which stays the one reported.
    """
    try:
        checkpoint.close()
    except BackgroundSaveError as failure:
        logger.warning("checkpointio: %s", failure)
        if hasattr(error, "add_note"):
            error.add_note(f"checkpointio: also, {failure}")


def _close_after_interrupt(checkpoint: Checkpoint) -> None:
    """Ctrl-C or cancellation: give a background save a short while, then abort it."""
    try:
        checkpoint.close(timeout=_portal.CLEANUP_TIMEOUT)
    except BackgroundSaveError as failure:
        logger.warning("checkpointio: %s", failure)


def _make_task(
    environment: TaskEnvironment,
    func: Callable[P, R],
    retries: int,
    backoff: float,
    name: str | None,
    run_id: str | None,
) -> Callable[P, R]:
    task_name = name or func.__name__

    def begin(run: _Run, attempt: int) -> tuple[Checkpoint | None, Any]:
        checkpoint = run.checkpoint(attempt) if retries > 0 else None
        token = _current.set(TaskContext(checkpoint, attempt, run.run_id, task_name))
        return checkpoint, token

    def give_up_or_wait(error: Exception, attempt: int, first: int, failures: list[AttemptFailure]) -> float:
        failures.append(AttemptFailure(attempt, error))
        if attempt - first >= retries:
            _failed(error, failures)
            raise error
        delay = float(backoff * 2.0 ** (attempt - first))
        logger.warning("checkpointio: %s attempt %d failed (%s); retrying", task_name, attempt, error)
        return delay

    if inspect.iscoroutinefunction(func):
        async_func: Callable[P, Awaitable[Any]] = func

        @functools.wraps(func)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            run = environment._start(task_name, run_id)
            if retries > 0:
                await run.discover()
            first = run.first_attempt()
            failures: list[AttemptFailure] = []
            for attempt in range(first, first + retries + 1):
                checkpoint, token = begin(run, attempt)
                try:
                    try:
                        result = await async_func(*args, **kwargs)
                    finally:
                        _current.reset(token)
                    if checkpoint is not None:  # waits for a background save; its failure fails the attempt
                        await anyio.to_thread.run_sync(checkpoint.close)
                except Exception as error:
                    if checkpoint is not None:
                        await anyio.to_thread.run_sync(_close_after_failure, checkpoint, error)
                    delay = give_up_or_wait(error, attempt, first, failures)
                    if checkpoint is not None:
                        await run.discover()  # what this attempt saved is the next one's to restore
                    await anyio.sleep(delay)
                    continue
                except BaseException:
                    if checkpoint is not None:
                        with anyio.CancelScope(shield=True):
                            await anyio.to_thread.run_sync(_close_after_interrupt, checkpoint)
                    raise
                await run.clean_up()
                return result
            raise AssertionError("unreachable")  # pragma: no cover

        return run_async  # type: ignore[return-value]

    @functools.wraps(func)
    def run_sync(*args: P.args, **kwargs: P.kwargs) -> R:
        run = environment._start(task_name, run_id)
        if retries > 0:
            _portal.run_sync(run.discover)
        first = run.first_attempt()
        failures: list[AttemptFailure] = []
        for attempt in range(first, first + retries + 1):
            checkpoint, token = begin(run, attempt)
            try:
                try:
                    result = func(*args, **kwargs)
                finally:
                    _current.reset(token)
                if checkpoint is not None:  # waits for a background save; its failure fails the attempt
                    checkpoint.close()
            except Exception as error:
                if checkpoint is not None:
                    _close_after_failure(checkpoint, error)
                delay = give_up_or_wait(error, attempt, first, failures)
                if checkpoint is not None:
                    _portal.run_sync(run.discover)  # what this attempt saved is the next one's to restore
                time.sleep(delay)
                continue
            except BaseException:
                if checkpoint is not None:
                    _close_after_interrupt(checkpoint)
                raise
            _portal.run_sync(run.clean_up)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    return run_sync


#: The ready default environment: ``from checkpointio import env`` as in the tutorial.
env = TaskEnvironment("default")
