"""The process group a task runs in: this process's rank, the world size, and one value agreed by all.

Read from ``torch.distributed`` when a process group is initialized (only if torch is imported
already: checkpointio never imports it), else from the ``RANK`` / ``WORLD_SIZE`` variables that
``torchrun`` and most launchers set, else a group of one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from . import _exceptions
from ._exceptions import CheckpointError

__all__ = ["Group", "current", "elastic_run_id", "fail_together", "on_agree", "raise_together"]

T = TypeVar("T")

#: What ``torchrun``'s static rendezvous calls a run without ``--rdzv-id``: the same for every job,
#: so no run id at all.
_NO_ELASTIC_ID = "none"


#: Called before every agreement: a module whose background work runs collectives of its own on
#: the process group (``checkpointio.dcp``'s saves) waits for it here, as two threads' collectives
#: on one group interleave, and deadlock, on every rank.
_before_agreeing: list[Callable[[], None]] = []


def on_agree(wait: Callable[[], None]) -> None:
    """Call ``wait`` (which must block until this process runs no collective in the background)
    before each :meth:`Group.agree` of several processes."""
    _before_agreeing.append(wait)


def _distributed() -> Any | None:
    """``torch.distributed`` if torch is imported and a process group is initialized."""
    module = sys.modules.get("torch.distributed")
    if module is None or not module.is_available() or not module.is_initialized():
        return None
    return module


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CheckpointError(f"{name}={value!r} is not a number") from None


@dataclass(frozen=True)
class Group:
    """This process's place in its group.

    Attributes:
        rank: 0 for the process that decides (claims attempts, picks run ids).
        world_size: How many processes run the task together.
        connected: Whether a ``torch.distributed`` process group joins them (values can be broadcast).
    """

    rank: int
    world_size: int
    connected: bool

    def agree(self, value: T | None) -> T:
        """Rank 0's ``value``, on every rank (each passes its own; only rank 0's counts).

        Raises:
            CheckpointError: Several processes and no process group to broadcast over.
        """
        if self.world_size == 1:
            assert value is not None
            return value
        distributed = _distributed()
        if distributed is None:
            raise CheckpointError(
                f"rank {self.rank} of {self.world_size} (RANK / WORLD_SIZE): the ranks of a task must agree on its "
                "attempt, which rank 0 broadcasts; initialize the process group "
                "(torch.distributed.init_process_group) before calling the task"
            )
        for wait in _before_agreeing:
            wait()
        box = [value if self.rank == 0 else None]
        distributed.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]


def current() -> Group:
    """The group of the calling process: the process group's, else ``RANK`` / ``WORLD_SIZE``, else one."""
    distributed = _distributed()
    if distributed is not None:
        return Group(distributed.get_rank(), distributed.get_world_size(), True)
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world_size is None or world_size < 1:
        return Group(0, 1, False)
    return Group(rank or 0, world_size, False)


def elastic_run_id() -> str | None:
    """The run id ``torchrun`` gives every process of one job (``TORCHELASTIC_RUN_ID``), if a real one."""
    value = os.environ.get("TORCHELASTIC_RUN_ID")
    return value if value and value != _NO_ELASTIC_ID else None


def fail_together(step: Callable[[], T], uri: str, *, ranks: int | None = None) -> T:
    """``step()`` on this process; in a process group, then a collective telling every rank
    whether it failed on any. Called by every rank of the group.

    A rank that raised alone would leave the others waiting in the group's next collective until
    its timeout (or, in a task that retries, ranks running different collectives). Where ``step``
    failed its own error is raised; on the other ranks an error of the same kind naming the first
    rank that failed (a :class:`CheckpointError` when it is not checkpointio's). ``ranks``: the
    caller's own count of the processes running it together (a framework's world size), when it
    may be 1 inside a larger process group: then ``step()`` alone, no collective.
    """
    distributed = _distributed()
    if distributed is None or distributed.get_world_size() == 1 or ranks == 1:
        return step()
    failure: Exception | None = None
    result: T | None = None
    try:
        result = step()
    except Exception as error:
        failure = error
    raise_together(failure, uri)
    return cast(T, result)


def raise_together(failure: Exception | None, uri: str) -> None:
    """Tell every rank of the process group whether a step failed on any, and raise there if it
    did, as :func:`fail_together` does (``failure``: this rank's error, or ``None``). Called by
    every rank; without a process group of several, raises ``failure`` if any.
    """
    distributed = _distributed()
    if distributed is None or distributed.get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    for wait in _before_agreeing:  # background collectives on the group finish first
        wait()
    outcomes: list[tuple[str, str] | None] = [None] * distributed.get_world_size()
    try:
        distributed.all_gather_object(outcomes, None if failure is None else (type(failure).__name__, str(failure)))
    except Exception as collective:
        if failure is not None:
            raise failure from collective
        raise
    if failure is not None:
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            kind, message = outcome
            same = getattr(_exceptions, kind, None)
            error_type = same if isinstance(same, type) and issubclass(same, CheckpointError) else CheckpointError
            raise error_type(f"rank {rank}: {message}", uri=uri)
