"""The task runtime of the tutorial: ``TaskEnvironment``, ``@env.task(retries=N)`` and ``ctx()``.

A task call is one *run*; each try of it is an *attempt*, which saves to its own key under the
storage root::

    <storage>/<environment>/<task>/<run id>/attempt-<n>

and restores from the newest earlier attempt of the same run that saved a valid checkpoint. With
an explicit run id (argument or ``CHECKPOINTIO_RUN_ID``), a process started again after a crash,
a ``SIGKILL`` or a reboot continues the same run: attempt numbers carry on after the newest one,
and the newest saved checkpoint is restored.

An attempt's number is claimed before it runs, by creating ``attempt-<n>.claim`` only if absent
(atomic on every store), so two processes running one run id at once never share an attempt's key.
The environment, task and run names each become one key segment, hence refused when they could not
be one (``..``, ``/``, ...): they would share keys with another run, or leave the storage root.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import json
import logging
import math
import numbers
import operator
import os
import re
import secrets
import shlex
import socket
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

import anyio
import anyio.to_thread
from typing_extensions import Unpack

from . import _dcp_layout, _engine, _group, _incremental, _manage, _portal
from ._checkpoint import Checkpoint
from ._config import TransferConfig, TransferOptions
from ._exceptions import (
    BackgroundSaveError,
    CheckpointError,
    DestinationError,
    InvalidNameError,
    NoCheckpointError,
)
from ._location import Location, uri_text
from ._manage import parse_prefix
from ._stores import Kind, Record, Store, open_store

__all__ = ["AttemptFailure", "TaskContext", "TaskEnvironment", "ctx", "default_storage", "env"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Q = ParamSpec("Q")
T = TypeVar("T")


class _TaskDecorator(Protocol):
    def __call__(self, func: Callable[Q, T], /) -> Callable[Q, T]: ...


#: The last segment of an attempt's checkpoint key, or of the marker that claims its number.
_ATTEMPT = re.compile(r"attempt-(\d+)(\.claim)?")


class _Default(enum.Enum):
    """A retention setting left to the storage in force (see :class:`TaskEnvironment`)."""

    DEFAULT = "default"

    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT = _Default.DEFAULT
#: The embedded local store's retention when none is given: it lives in a cache folder nobody
#: watches, and every call without a run id is a new run.
EMBEDDED_KEEP_LAST = 1
EMBEDDED_KEEP_RUNS = 10
#: A run written to more recently than this is never pruned: another process may still be in it.
RUN_IDLE_BEFORE_PRUNING = 24 * 3600.0

_RUN_ID_VARIABLE = "CHECKPOINTIO_RUN_ID"


def _key_segment(value: str, what: str, source: str) -> str:
    """``value``, checked to be usable as one segment of a key on every store.

    Raises:
        InvalidNameError: It is empty, ``.`` or ``..``, or holds ``/``, ``\\`` or NUL: the keys
            would fall into the parent's (with ``..``, every task would share keys) or split.
    """
    if not value:
        problem = "it is empty"
    elif value in (".", ".."):
        problem = "it is a relative path step, which would share keys with other runs and tasks"
    elif "/" in value or "\\" in value:
        problem = "it holds a path separator ('/' or '\\')"
    elif "\0" in value:
        problem = "it holds a NUL character"
    else:
        return value
    raise InvalidNameError(f"{what} {value!r} from {source} cannot name a folder of checkpoints: {problem}")


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
        checkpoint_or_none: This attempt's checkpoint, or ``None`` outside a task or with
            ``retries=0``.
        attempt: 0-based attempt number within the run.
        run_id: The run this attempt belongs to.
        task_name: The task's name.
        rank: This process's rank in its group (``torch.distributed``'s process group, else the
            ``RANK`` variable, else 0); every rank of a run gets the same ``run_id``, ``attempt``
            and checkpoint key.
        world_size: How many processes run the task together (else ``WORLD_SIZE``, else 1).
    """

    checkpoint_or_none: Checkpoint | None = None
    attempt: int | None = None
    run_id: str | None = None
    task_name: str | None = None

    def __bool__(self) -> bool:
        return self.task_name is not None

    @property
    def rank(self) -> int | None:
        """This process's rank in its group; ``None`` outside a task (see the class)."""
        return _group.current().rank if self else None

    @property
    def world_size(self) -> int | None:
        """How many processes run the task together; ``None`` outside a task (see the class)."""
        return _group.current().world_size if self else None

    @property
    def checkpoint(self) -> Checkpoint:
        """This attempt's checkpoint (typed ``Checkpoint``, never ``None``: use it without a check).

        Raises:
            NoCheckpointError: Outside a task, or in a task with ``retries=0``, which has none
                (``checkpoint_or_none`` is ``None`` there).
        """
        if self.checkpoint_or_none is None:
            where = "outside a task" if self.task_name is None else f"in task {self.task_name!r}, which has retries=0"
            if self.task_name is None and threading.current_thread() is not threading.main_thread():
                where += (
                    " (or in a thread that did not inherit the task's context: threading.Thread and "
                    "ThreadPoolExecutor start without it; anyio.to_thread and asyncio.to_thread pass it on, "
                    "and so does contextvars.copy_context().run)"
                )
            raise NoCheckpointError(
                f"ctx().checkpoint used {where}: only an @env.task(retries=N) with N > 0 has one "
                "(ctx().checkpoint_or_none is None here)"
            )
        return self.checkpoint_or_none


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


def _claim_marker(run_id: str, attempt: int) -> tuple[bytes, Record]:
    """What a claim holds: who took the attempt number and when, for a person reading the store; as
    a bytes checkpoint of ours (its record), which ``ls`` shows and ``rm --recursive`` removes."""
    data = json.dumps(
        {"run_id": run_id, "attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    ).encode()
    return data, Record(Kind.BYTES, len(data), zlib.crc32(data))


#: The claims (their URIs) of task calls running in this process: a claim naming this process's
#: pid is a live call's only if it is here (another call of the same run may run concurrently).
_live_claims: set[str] = set()
_live_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    """Whether a process of that pid runs on this host (one we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return True  # not a pid we can ask about: assume it runs
    return True


def _claim_is_dead(marker: object, uri: str) -> bool:
    """Whether the claim ``marker`` (at ``uri``) was made by a process known to have ended: one of
    this host whose pid no longer runs, or this process's (the same pid after a restart in a
    container) when no call running here holds it. A claim from another host, or one that does not
    say, is never taken for dead: its process may still be running an attempt."""
    if not isinstance(marker, dict) or marker.get("host") != socket.gethostname():
        return False
    pid = marker.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    if pid == os.getpid():
        with _live_lock:
            return uri not in _live_claims
    return not _pid_alive(pid)


@dataclass
class _Run:
    """One call of a task: where its attempts live, which of them saved something or are claimed."""

    root: Location
    run_id: str
    config: TransferConfig
    keep_last: int | None
    keep_runs: int | None
    #: How to continue this run in a new process, for the log and the final error.
    resume_hint: str
    saved: list[int] = field(default_factory=list)
    claimed: list[int] = field(default_factory=list)
    #: Save directories as incremental checkpoints (the attempts of a run share their packs).
    incremental: bool = False
    #: The numbers this call claimed; their markers go once the run has succeeded.
    mine: list[int] = field(default_factory=list)

    def attempt_location(self, attempt: int) -> Location:
        return self.root.child(f"attempt-{attempt}")

    def claim_location(self, attempt: int) -> Location:
        return self.root.child(f"attempt-{attempt}.claim")

    async def open(self) -> None:
        """Before the first attempt: prune the task's old runs (where asked), list this run's attempts.
        In a group, what fails on one rank raises on every rank."""

        async def prepare() -> None:
            if self.keep_runs is not None and _group.current().rank == 0:
                await _prune_runs(self.root, self.keep_runs, self.config)
            await self.discover()

        await _on_every_rank(prepare, self.root.uri)

    async def discover(self) -> None:
        """List the attempts of this run that saved a checkpoint, and the numbers claimed (by any
        process: after a restart, the old ones; with a second process on this run, its own)."""
        store = await open_store(self.root.scheme, self.config)
        saved: set[int] = set()
        claimed: set[int] = set()
        for info in await store.list(self.root.child("attempt-")):
            match = _ATTEMPT.fullmatch(info.location.key.rpartition("/")[2])
            if match:
                (claimed if match.group(2) else saved).add(int(match.group(1)))
        self.saved, self.claimed = sorted(saved), sorted(claimed)

    async def claim(self, after: int) -> int:
        """Claim the lowest free attempt number above ``after`` and every attempt seen so far.

        The marker is created only if absent, atomically on every store: two processes running
        this run at once each get their own number, never one key for both. In a group of several
        processes (ranks), rank 0 claims and broadcasts the number, so all save to one key.
        """
        group = _group.current()
        if group.world_size == 1:
            return await self._claim(after)
        outcome: int | str | None = None
        if group.rank == 0:
            try:
                outcome = await self._claim(after)
            except Exception as error:  # every rank must hear of it, or the others wait forever
                outcome = f"{type(error).__name__}: {error}"
        agreed = cast("int | str", await anyio.to_thread.run_sync(group.agree, outcome))
        if isinstance(agreed, str):
            raise CheckpointError(f"rank 0 could not claim an attempt of run {self.run_id}: {agreed}")
        if group.rank != 0:
            self.claimed.append(agreed)
        return agreed

    async def _claim(self, after: int) -> int:
        store = await open_store(self.root.scheme, self.config)
        attempt = max([after, *self.saved, *self.claimed]) + 1
        while not await store.create(self.claim_location(attempt), *_claim_marker(self.run_id, attempt)):
            attempt += 1
        self.claimed.append(attempt)
        self.mine.append(attempt)
        with _live_lock:
            _live_claims.add(self.claim_location(attempt).uri)
        return attempt

    def ended(self) -> None:
        """This call ended (succeeded, failed or was interrupted): its claims are no live call's."""
        with _live_lock:
            _live_claims.difference_update(self.claim_location(attempt).uri for attempt in self.mine)

    def checkpoint(self, attempt: int) -> Checkpoint:
        earlier = [self.attempt_location(n).uri for n in sorted(self.saved, reverse=True) if n < attempt]
        return Checkpoint(
            self.attempt_location(attempt).uri, src=earlier or None, config=self.config, incremental=self.incremental
        )

    async def clean_up(self) -> None:
        """After a successful run: keep the newest ``keep_last`` attempts' checkpoints, and drop this
        call's claims (a kept checkpoint holds its number by itself). In a group, rank 0 does it."""
        if _group.current().rank != 0:
            return
        store = await open_store(self.root.scheme, self.config)
        if self.keep_last is not None:
            await self.discover()
            dropped = self.saved[: -self.keep_last] if self.keep_last else self.saved
            for attempt in dropped:
                try:
                    await _delete_attempt(store, self.attempt_location(attempt), self.config)
                except DestinationError as error:  # a user's file of an attempt's name: not ours to delete
                    logger.warning("kept %s: %s", self.attempt_location(attempt).uri, error)
            if dropped:
                await _collect_packs(store, self.attempt_location(0), self.config)
        for attempt in self.mine:
            await store.delete(self.claim_location(attempt))
        self.ended()
        await self._drop_dead_claims(store)

    async def _drop_dead_claims(self, store: Store) -> None:
        """After a success: delete the claims of attempts whose process has ended (a killed or
        failed earlier call of this run). A claim that may be a running process's stays, so that
        no later process takes its number. Housekeeping: a failure is logged, the task goes on."""
        try:
            await self.discover()
            for attempt in self.claimed:
                location = self.claim_location(attempt)
                data = await _engine.load_bytes(store, location, self.config, None)
                try:
                    marker = json.loads(bytes(data)) if data is not None else None
                except ValueError:
                    continue
                if _claim_is_dead(marker, location.uri):
                    await store.delete(location)
        except Exception as error:
            logger.warning("%s: could not remove the claims of ended attempts: %s", self.root.uri, error)


async def _delete_attempt(store: Store, location: Location, config: TransferConfig) -> None:
    """Delete an attempt's checkpoint; a distributed one with its data."""
    await _dcp_layout.remove_checkpoint(store, location, config)


#: Retention removes the packs of incremental attempts it deleted once they are this old (and no
#: save is in progress in the run, see ``_incremental.collect_area``); ``checkpointio gc`` takes
#: the younger ones later.
RETENTION_GRACE = 2 * _incremental.LEASE_TTL


async def _collect_packs(store: Store, attempt: Location, config: TransferConfig) -> None:
    """After retention deleted attempts: remove the packs no remaining incremental attempt of the
    run references. Housekeeping: a failure is logged, and the task goes on."""
    area = _incremental.area_of(attempt)
    try:
        if not await store.list(_incremental.pack_location(area, "")):
            return  # no incremental attempt ever saved in this run
        report = await _incremental.collect_area(store, area, config, older_than=RETENTION_GRACE)
    except (CheckpointError, OSError) as error:
        logger.warning("could not remove the unreferenced packs of %s: %s", area.uri, error)
        return
    if report.removed:
        logger.info("removed %d unreferenced pack(s) of %s (%s)", len(report.removed), area.uri, report.freed)


async def _on_every_rank(step: Callable[[], Awaitable[None]], uri: str) -> None:
    """``step()`` here; in a group of several processes, a failure on any rank raises on every
    rank: one rank raising alone (a store it could not list) would leave the others waiting in the
    attempt's claim, a collective."""
    failure: Exception | None = None
    try:
        await step()
    except Exception as error:
        failure = error
    if failure is not None or _group.current().connected:  # alone and fine: nothing to tell
        await anyio.to_thread.run_sync(_group.raise_together, failure, uri)  # a collective: off the loop


async def _prune_runs(run_root: Location, keep: int, config: TransferConfig) -> None:
    """Delete the task's runs beyond its ``keep`` most recently written (the run at ``run_root``
    counts and is never deleted), sparing any run written within ``RUN_IDLE_BEFORE_PRUNING``.

    Only what the runtime writes goes (attempts, claims, unfinished saves). Housekeeping: a failure
    is logged, and the task goes on.
    """
    task_key = run_root.key.rpartition("/")[0]
    task_prefix = Location(run_root.scheme, run_root.bucket, task_key + "/")
    try:
        store = await open_store(run_root.scheme, config)
        runs = await _manage.find_runs(store, task_prefix)  # oldest first; a tie: by id, as new ids start with the time
        others = [run for run in runs if run.location.key.rpartition("/")[0] == task_key and run.location != run_root]
        cutoff = time.time() - RUN_IDLE_BEFORE_PRUNING
        newest_first = others[::-1]
        pruned = [
            run
            for run in newest_first[max(keep - 1, 0) :]
            if run.last_written is not None and run.last_written <= cutoff
        ]
        for run in pruned:
            await _manage.delete_run(store, run)
    except (CheckpointError, OSError) as error:
        logger.warning("could not prune the old runs under %s: %s", task_prefix.uri, error)
        return
    if pruned:
        names = [run.location.key.rpartition("/")[2] for run in pruned]
        logger.info("pruned %d old run(s) under %s (keep_runs=%d): %s", len(pruned), task_prefix.uri, keep, names)


class TaskEnvironment:
    """Groups tasks that share storage and settings.

    Args:
        name: Names the folder of this environment's runs under the storage root.
        storage: Storage root URI (``s3://bucket/prefix``, ``s3://bucket``, a path, ...). ``None``
            reads ``CHECKPOINTIO_STORAGE`` at call time, else the embedded local folder.
        run_id: Makes every call continue this run (else ``CHECKPOINTIO_RUN_ID``, else a new run
            per call).
        keep_last: After a run succeeds, delete all but its newest ``keep_last`` attempts'
            checkpoints (``0`` deletes them all). ``None`` keeps everything. By default
            ``EMBEDDED_KEEP_LAST`` (1) on the embedded local folder, ``None`` on storage that
            was given (argument or ``CHECKPOINTIO_STORAGE``).
        keep_runs: When a task is called, delete its runs beyond the ``keep_runs`` most recently
            written (the run starting counts and stays), sparing runs written to within
            ``RUN_IDLE_BEFORE_PRUNING`` (a day): another process may still be in them. ``None``
            keeps every run. By default ``EMBEDDED_KEEP_RUNS`` (10) on the embedded local folder,
            ``None`` on storage that was given.
        backoff: Seconds to wait before each retry, doubling each time.
        incremental: Save directories as incremental checkpoints (docs/incremental.md): each
            attempt uploads only the chunks its predecessors did not store.
        config / **options: Transfer settings for the checkpoints (see ``TransferConfig``).

    Raises:
        InvalidNameError: ``name`` or ``run_id`` cannot be one segment of a key (``..``, ``a/b``).
        ValueError: ``storage`` is not a storage root URI; a retention count is out of range.
    """

    def __init__(
        self,
        name: str = "default",
        *,
        storage: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        keep_last: int | _Default | None = _DEFAULT,
        keep_runs: int | _Default | None = _DEFAULT,
        backoff: float = 0.0,
        incremental: bool = False,
        config: TransferConfig | None = None,
        **options: Unpack[TransferOptions],
    ) -> None:
        self.incremental = incremental
        self.name = _key_segment(name, "environment name", "TaskEnvironment(name=...)")
        if keep_last is not None and keep_last is not _DEFAULT:
            keep_last = _whole(keep_last, "keep_last", "an int or None")
        if keep_runs is not None and keep_runs is not _DEFAULT:
            keep_runs = _whole(keep_runs, "keep_runs", "an int or None")
        if isinstance(keep_last, int) and keep_last < 0:
            raise ValueError(f"keep_last must not be negative, got {keep_last}")
        if isinstance(keep_runs, int) and keep_runs < 1:
            raise ValueError(f"keep_runs must be at least 1 (the run in progress is always kept), got {keep_runs}")
        self.storage = uri_text(storage) if storage is not None else None
        if self.storage is not None:
            parse_prefix(self.storage)  # a malformed root fails here, not in every task
        self.run_id = _key_segment(run_id, "run id", "TaskEnvironment(run_id=...)") if run_id is not None else None
        self.keep_last = keep_last
        self.keep_runs = keep_runs
        self.backoff = _checked_backoff(backoff)
        self.config = (config or TransferConfig()).with_options(**options)

    def __repr__(self) -> str:
        return f"TaskEnvironment({self.name!r}, storage={self.storage!r})"

    def _start(self, task_name: str, run_id: str | None) -> _Run:
        embedded = self.storage is None and not os.environ.get("CHECKPOINTIO_STORAGE")
        storage = parse_prefix(self.storage or default_storage())
        explicit = run_id if run_id is not None else self.run_id
        if explicit is not None:
            where = "task(run_id=...)" if run_id is not None else "TaskEnvironment(run_id=...)"
            run, hint = explicit, f"run id {explicit!r} is set in {where}: calling the task again resumes it"
        else:
            configured = os.environ.get(_RUN_ID_VARIABLE)
            elastic = _group.elastic_run_id()
            if configured:
                run = _key_segment(configured, "run id", _RUN_ID_VARIABLE)
            elif elastic:  # torchrun's job id: the same on every rank, and again after a restart
                run = _key_segment(elastic, "run id", "TORCHELASTIC_RUN_ID")
            else:  # rank 0's new id on every rank (without a process group, claim() says what is missing)
                group = _group.current()
                run = group.agree(_new_run_id()) if group.connected else _new_run_id()
            hint = f"resume with {_RUN_ID_VARIABLE}={shlex.quote(run)}"
        keep_last = (EMBEDDED_KEEP_LAST if embedded else None) if self.keep_last is _DEFAULT else self.keep_last
        keep_runs = (EMBEDDED_KEEP_RUNS if embedded else None) if self.keep_runs is _DEFAULT else self.keep_runs
        root = storage.child(self.name).child(task_name).child(run)
        return _Run(root, run, self.config, keep_last, keep_runs, hint, incremental=self.incremental)

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

        Raises:
            InvalidNameError: ``name`` or ``run_id`` cannot be one segment of a key.
        """
        retries = _whole(retries, "retries", "an int")
        if retries < 0:
            raise ValueError("retries must not be negative")
        if backoff is not None:
            backoff = _checked_backoff(backoff)
        if name is not None:
            _key_segment(name, "task name", "task(name=...)")
        if run_id is not None:
            _key_segment(run_id, "run id", "task(run_id=...)")

        def decorate(func: Callable[Q, T]) -> Callable[Q, T]:
            return _make_task(self, func, retries, self.backoff if backoff is None else backoff, name, run_id)

        return decorate(fn) if fn is not None else decorate


def _whole(value: Any, setting: str, expected: str) -> int:
    """``value`` as an ``int`` if it is a whole number of any integer type (numpy's too), else a
    ``TypeError`` naming ``setting``: a bool, a float or a str is a mistake, not a count."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{setting} must be {expected}, got {type(value).__name__} {value!r}") from None


def _checked_backoff(backoff: float) -> float:
    """``backoff`` if it is a wait the retry loop can make: checked here, not at the first retry,
    where a bad one would end the run with the sleep's error instead of retrying it."""
    if not isinstance(backoff, numbers.Real) or isinstance(backoff, bool):
        raise TypeError(f"backoff must be a number of seconds, got {type(backoff).__name__} {backoff!r}")
    if not 0 <= backoff < math.inf:  # NaN too: it compares false with everything
        raise ValueError(f"backoff must be a finite number of seconds >= 0, got {backoff!r}")
    return float(backoff)


def _failed(error: BaseException, failures: list[AttemptFailure], resume_hint: str | None) -> None:
    error.attempts = list(failures)  # type: ignore[attr-defined]
    summary = "; ".join(f"attempt {f.attempt}: {type(f.error).__name__}: {f.error}" for f in failures)
    if hasattr(error, "add_note"):
        failed = f"all {len(failures)} attempts" if len(failures) != 1 else "its one attempt"
        error.add_note(f"checkpointio: {failed} failed ({summary})")
        if resume_hint is not None:
            error.add_note(f"checkpointio: {resume_hint}")


class _Attempts:
    """The retry policy of one task call, written once for the ``def`` and the ``async def`` driver.

    For each attempt a driver calls :meth:`claim`, runs the function inside :meth:`entered`
    (``ctx()`` set), then :meth:`close` (waits for the attempt's background save, whose failure
    fails the attempt). After an ``Exception``: :meth:`close_failed`, then :meth:`retry_delay`, which
    raises the error when no attempt is left, then :meth:`rediscover` and a sleep of that delay.
    After anything else (Ctrl-C, cancellation): :meth:`interrupted`, and the exception goes on.
    After a success: :meth:`succeeded`.

    Coroutine methods touch the store and do nothing when the task stores no checkpoint
    (``retries=0``); the others may block on a background save and do nothing without a checkpoint.
    """

    def __init__(self, run: _Run, task_name: str, retries: int, backoff: float) -> None:
        self.run = run
        self.task_name = task_name
        self.retries = retries
        self.backoff = backoff
        #: With no retry there is nothing to restore: no checkpoint, no storage touched.
        self.stores = retries > 0
        #: The attempt running, or the last one; without a store the only one is 0 and claims nothing.
        self.attempt = -1 if self.stores else 0
        self.checkpoint: Checkpoint | None = None
        self.failures: list[AttemptFailure] = []

    async def open(self) -> None:
        """Before the first attempt: prune old runs where asked, list this run's attempts."""
        if self.stores:
            await self.run.open()

    async def claim(self) -> None:
        """Begin the next attempt: claim its number and make its checkpoint."""
        if not self.stores:
            return
        self.attempt = await self.run.claim(self.attempt)
        self.checkpoint = self.run.checkpoint(self.attempt)
        logger.info(
            "task %s: attempt %d of run %s saves to %s (%s)",
            self.task_name,
            self.attempt,
            self.run.run_id,
            self.run.attempt_location(self.attempt).uri,
            self.run.resume_hint,
        )

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """``ctx()`` is this attempt's while the function runs."""
        token = _current.set(TaskContext(self.checkpoint, self.attempt, self.run.run_id, self.task_name))
        try:
            yield
        finally:
            _current.reset(token)

    def close(self) -> None:
        """The function returned: wait for the attempt's background save; its failure fails the attempt."""
        if self.checkpoint is not None:
            self.checkpoint.close()

    def close_failed(self, error: Exception) -> None:
        """The attempt failed: wait for its background save, so the next attempt sees it.

        A background failure is logged and noted on the attempt's error, which stays the one reported.
        """
        if self.checkpoint is None:
            return
        try:
            self.checkpoint.close()
        except BackgroundSaveError as failure:
            logger.warning("%s", failure)
            if hasattr(error, "add_note"):
                error.add_note(f"checkpointio: also, {failure}")

    def retry_delay(self, error: Exception) -> float:
        """Record the failed attempt; the seconds to wait before the next one.

        Raises:
            Exception: ``error``, with ``error.attempts`` and notes attached, when no attempt is left.
        """
        self.failures.append(AttemptFailure(self.attempt, error))
        if len(self.failures) > self.retries:
            self.run.ended()
            _failed(error, self.failures, self.run.resume_hint if self.stores else None)
            raise error
        delay = float(self.backoff * 2.0 ** (len(self.failures) - 1))
        failure = f"{type(error).__name__}: {error}"
        name, attempt = self.task_name, self.attempt
        logger.warning("task %s: attempt %d failed (%s); retrying in %.3g s", name, attempt, failure, delay)
        logger.debug("task %s: attempt %d failed with", name, attempt, exc_info=error)
        return delay

    async def rediscover(self) -> None:
        """Before a retry: what the failed attempt saved is the next one's to restore."""
        if self.stores:
            await _on_every_rank(self.run.discover, self.run.root.uri)

    def interrupted(self) -> None:
        """Ctrl-C or cancellation: give a background save a short while, then abort it."""
        self.run.ended()
        if self.checkpoint is None:
            return
        try:
            self.checkpoint.close(timeout=_portal.CLEANUP_TIMEOUT)
        except BackgroundSaveError as failure:
            logger.warning("%s", failure)

    async def succeeded(self) -> None:
        """After a successful attempt: apply retention, drop this call's claims."""
        if self.stores:
            await self.run.clean_up()


def _make_task(
    environment: TaskEnvironment,
    func: Callable[P, R],
    retries: int,
    backoff: float,
    name: str | None,
    run_id: str | None,
) -> Callable[P, R]:
    task_name = name if name is not None else _key_segment(func.__name__, "task name", "the function's name")

    def start() -> _Attempts:
        return _Attempts(environment._start(task_name, run_id), task_name, retries, backoff)

    if inspect.iscoroutinefunction(func):
        async_func: Callable[P, Awaitable[Any]] = func

        @functools.wraps(func)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            attempts = start()

            async def off_the_loop(step: Callable[..., None], *step_args: Any) -> None:
                if attempts.checkpoint is not None:  # only a checkpoint's waits block
                    await anyio.to_thread.run_sync(step, *step_args)

            await attempts.open()
            while True:
                await attempts.claim()
                try:
                    with attempts.entered():
                        result = await async_func(*args, **kwargs)
                    await off_the_loop(attempts.close)
                except Exception as error:
                    await off_the_loop(attempts.close_failed, error)
                    delay = attempts.retry_delay(error)
                    await attempts.rediscover()
                    await anyio.sleep(delay)
                    continue
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await off_the_loop(attempts.interrupted)
                    raise
                await attempts.succeeded()
                return result

        return run_async  # type: ignore[return-value]

    @functools.wraps(func)
    def run_sync(*args: P.args, **kwargs: P.kwargs) -> R:
        attempts = start()

        def on_the_portal(step: Callable[[], Awaitable[None]]) -> None:
            if attempts.stores:  # only the store is touched by coroutine steps
                _portal.run_sync(step)

        on_the_portal(attempts.open)
        while True:
            on_the_portal(attempts.claim)
            try:
                with attempts.entered():
                    result = func(*args, **kwargs)
                attempts.close()
            except Exception as error:
                attempts.close_failed(error)
                delay = attempts.retry_delay(error)
                on_the_portal(attempts.rediscover)
                time.sleep(delay)
                continue
            except BaseException:
                attempts.interrupted()
                raise
            on_the_portal(attempts.succeeded)
            return result

    return run_sync


#: The ready default environment: ``from checkpointio import env`` as in the tutorial.
env = TaskEnvironment("default")
