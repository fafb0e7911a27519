"""Making a spawned process one rank of a group, as ``torchrun`` would start it."""

from __future__ import annotations

import os


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
