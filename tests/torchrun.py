"""Making a spawned process one rank of a group, as ``torchrun`` would start it, and ending its
part in the group the same way on every rank."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any


def act_as_torchrun_rank(rank: int, port: int, run_id: str, world_size: int = 2) -> None:
    """Set the environment ``torchrun`` gives rank ``rank`` of a one-node group of ``world_size``
    (rendezvous on 127.0.0.1:``port``): the frameworks then start no processes of their own."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        TORCHELASTIC_RUN_ID=run_id,
    )


def end_group(*, every_rank_got_here: bool = True) -> None:
    """End this process's part in its ``torch.distributed`` groups (whoever made them: the test, a
    Lightning strategy, the HF Trainer), the last thing a spawned rank does.

    ``every_rank_got_here``: a barrier first, so no rank tears its groups down while another is
    still in a collective or talking to rank 0's store (gloo ends a process with ``std::terminate``
    when that happens). Then every group is destroyed, and what still refers to them (a device
    mesh, DTensors) is collected now, while the interpreter is whole, instead of at its
    finalization, when gloo's threads may no longer be joined. A rank that failed skips the
    barrier: the others may never reach it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if every_rank_got_here:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int, **options: Any) -> Iterator[None]:
    """This process as rank ``rank`` of a gloo group of ``world_size`` (rendezvous on
    127.0.0.1:``port``; ``options`` for ``init_process_group``), ended by :func:`end_group` on the
    way out, whether the body returned or raised."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **options)
    try:
        yield
    except BaseException:
        end_group(every_rank_got_here=False)
        raise
    end_group()


def dcp_info_lines() -> list[str]:
    """From now on, the INFO lines ``checkpointio.dcp`` logs in this process, each up to its
    figures (``saved distributed checkpoint URI``), as they come: the list is filled in place."""
    import logging

    lines: list[str] = []

    class Noted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.INFO:
                lines.append(record.getMessage().split(" (")[0])

    logger = logging.getLogger("checkpointio.dcp")
    logger.addHandler(Noted())
    logger.setLevel(logging.INFO)
    return lines


def run_group(target: Any, args: tuple[Any, ...], nprocs: int = 2, seconds: float = 150) -> None:
    """Run ``target(rank, *args)`` in ``nprocs`` spawned processes and wait for them; fail the test
    (the processes killed) if they are still running after ``seconds``: a guard against a rank
    left waiting in a collective hanging the suite, not a measurement."""
    import time

    import pytest
    import torch.multiprocessing as mp

    group = mp.start_processes(target, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not group.join(timeout=5):
        if time.monotonic() > deadline:
            for process in group.processes:
                process.kill()
                process.join()
            pytest.fail(f"a rank was still running after {seconds:.0f} s: left waiting in a collective")
