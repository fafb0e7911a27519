"""PyTorch helpers: save and restore model + optimizer + step through a :class:`~checkpointio.Checkpoint`.

Needs the ``torch`` extra (``pip install 'checkpointio[torch]'``); ``import checkpointio`` alone never
imports torch.

Like :class:`~checkpointio.Checkpoint`, the bare names are coroutines and the ``*_sync`` names
their blocking twins: ``await save_state(...)`` in async code, ``save_state_sync(...)`` in sync
code. Example::

    from checkpointio import ctx, env
    from checkpointio.torch import load_state_sync, save_state_sync

    @env.task(retries=3)
    def train() -> None:
        cp = ctx().checkpoint
        state = load_state_sync(cp, model, optimizer)       # None on a first attempt
        start = state["step"] if state else 0
        for step in range(start, 1000):
            ...
            save_state_sync(cp, model, optimizer, step=step + 1, wait=False)

A save that waits (``wait=True``) streams ``torch.save`` output straight into the upload: no
temporary file and no full copy in memory. A background save (``wait=False``) must capture the state at the call
while training goes on updating the tensors, so it serializes into memory first (one copy of the
state's size) and uploads that in the background.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from typing_extensions import Unpack

from ._background import SaveHandle
from ._checkpoint import Checkpoint, latest_checkpoint
from ._config import TransferOptions
from ._exceptions import CheckpointError, CorruptCheckpointError
from ._pending import Pending
from ._placement import placing

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "load_state",
    "load_state_sync",
    "save_state",
    "save_state_sync",
    "state_of",
]


def _torch() -> Any:
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("checkpointio.torch needs PyTorch: pip install 'checkpointio[torch]'") from error
    return torch


def _check_arguments(
    call: str,
    checkpoint: object,
    model: object,
    optimizer: object,
    *,
    step: object = None,
    none_checkpoint: bool = False,
) -> int | None:
    """Refuse arguments of the wrong kind with a ``TypeError`` naming them, before anything is
    read or stored; returns ``step`` as an ``int``.

    Models and optimizers are duck-typed (wrappers that are not ``torch.nn.Module`` or
    ``torch.optim.Optimizer`` subclasses exist): what is refused is what has no ``state_dict()``,
    and a module and an optimizer passed in each other's place.
    """
    if not isinstance(checkpoint, Checkpoint) and not (none_checkpoint and checkpoint is None):
        raise TypeError(
            f"{call}() takes a Checkpoint (such as ctx().checkpoint), got {type(checkpoint).__name__}"
            + ("" if not isinstance(checkpoint, str) else ": make one with Checkpoint(uri)")
        )
    torch = _torch()
    for name, value in (("model", model), ("optimizer", optimizer)):
        if value is None:
            continue
        if name == "model" and isinstance(value, torch.optim.Optimizer):
            raise TypeError(f"{call}(): model is an optimizer ({type(value).__name__}): model and optimizer swapped?")
        if name == "optimizer" and isinstance(value, torch.nn.Module):
            raise TypeError(f"{call}(): optimizer is a module ({type(value).__name__}): model and optimizer swapped?")
        if not callable(getattr(value, "state_dict", None)) or not callable(getattr(value, "load_state_dict", None)):
            itself = "module" if name == "model" else name
            raise TypeError(
                f"{call}(): {name} must have state_dict() and load_state_dict() (a torch.nn.Module or "
                f"torch.optim.Optimizer), got {type(value).__name__}: pass the {itself} itself"
            )
    if step is None:
        return None
    if isinstance(step, bool):
        raise TypeError(f"{call}(): step must be a whole number, got bool")
    try:
        return operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{call}(): step must be a whole number, got {type(step).__name__}") from None


def state_of(
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dictionary :func:`save_state` stores: ``model``, ``optimizer``, ``step``, ``extra``."""
    state: dict[str, Any] = {}
    if model is not None:
        state["model"] = model.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if step is not None:
        state["step"] = step
    if extra is not None:
        state["extra"] = dict(extra)
    return state


def _writer(state: Mapping[str, Any]) -> Any:
    torch = _torch()

    def write(out: BinaryIO) -> None:
        torch.save(state, out)

    return write


async def _save_state(
    call: str,
    checkpoint: Checkpoint,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    wait: bool = True,
    **options: Unpack[TransferOptions],
) -> SaveHandle:
    step = _check_arguments(call, checkpoint, model, optimizer, step=step)
    state = state_of(model, optimizer, step=step, extra=extra)
    if wait:
        await checkpoint._save_written(_writer(state), **options)
        return SaveHandle(checkpoint.dest)
    buffer = io.BytesIO()
    _writer(state)(buffer)
    return await checkpoint.save(buffer.getbuffer(), wait=False, **options)


def save_state(
    checkpoint: Checkpoint,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    wait: bool = True,
    **options: Unpack[TransferOptions],
) -> Pending[SaveHandle]:
    """Save model, optimizer, step and ``extra`` as one ``torch.save`` file checkpoint (await it).

    With ``wait=True`` the ``torch.save`` output streams into the upload (no temporary file); with
    ``wait=False`` it is serialized into memory at the call and uploaded in the background.
    ``**options`` are transfer settings for this save. :func:`save_state_sync` is the blocking twin.
    """
    return Pending(
        _save_state("save_state", checkpoint, model, optimizer, step=step, extra=extra, wait=wait, **options),
        "save_state",
        "save_state_sync",
    )


def save_state_sync(
    checkpoint: Checkpoint,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    wait: bool = True,
    **options: Unpack[TransferOptions],
) -> SaveHandle:
    """Blocking twin of :func:`save_state`."""
    from . import _portal

    return _portal.run_sync(
        _save_state, "save_state_sync", checkpoint, model, optimizer, step=step, extra=extra, wait=wait, **options
    )


def _read(
    checkpoint: Checkpoint, restored: Path | None, map_location: Any, weights_only: bool
) -> dict[str, Any] | None:
    if restored is None:
        return None
    where = checkpoint._restored_from.uri if checkpoint._restored_from is not None else str(restored)
    if restored.is_dir():  # a folder checkpoint: its newest .pt / .pth / .ckpt file
        found = [latest_checkpoint(restored, f"**/*.{suffix}") for suffix in ("pt", "pth", "ckpt")]
        candidates = [path for path in found if path is not None]
        if not candidates:
            raise CheckpointError(
                f"{where} holds a folder without a .pt, .pth or .ckpt file: nothing for load_state to "
                "read (restore it with Checkpoint.load())",
                uri=where,
            )
        with placing("compare the times of the checkpoint files in", restored, str(restored)):
            restored = max(candidates, key=lambda path: path.stat().st_mtime_ns)
    try:
        state = _torch().load(restored, map_location=map_location, weights_only=weights_only)
    except Exception as error:
        with open(restored, "rb") as file:
            head = file.read(4)
        if head.startswith((b"PK\x03\x04", b"\x80")):  # a torch.save file (zip, or the legacy pickle)
            raise
        raise CorruptCheckpointError(f"{where}: not a torch.save file ({error})", uri=where) from error
    if not isinstance(state, dict):
        raise TypeError(f"{restored}: expected a state dictionary, found {type(state).__name__}")
    return state


def _apply(
    checkpoint: Checkpoint,
    state: dict[str, Any] | None,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, Any] | None:
    """Load ``state`` into ``model`` and ``optimizer``; the state of either, when asked for, must be
    there: loading nothing into it would resume from the saved step with fresh weights."""
    if state is None:
        return None
    for name, value in (("model", model), ("optimizer", optimizer)):
        if value is not None and name not in state:
            where = checkpoint._restored_from.uri if checkpoint._restored_from is not None else checkpoint.dest
            held = ", ".join(str(key) for key in list(state)[:8]) + (", ..." if len(state) > 8 else "")
            raise CheckpointError(
                f"{where} holds no {name} state (it holds {held or 'nothing'}): saved by save_state() "
                f"without {name}=, or by another program",
                uri=where,
            )
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


async def _load_state(
    call: str,
    checkpoint: Checkpoint | None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict[str, Any] | None:
    _check_arguments(call, checkpoint, model, optimizer, none_checkpoint=True)
    if checkpoint is None:
        return None
    import anyio.to_thread

    restored = await checkpoint.load()
    state = await anyio.to_thread.run_sync(_read, checkpoint, restored, map_location, weights_only)
    return _apply(checkpoint, state, model, optimizer)


def load_state(
    checkpoint: Checkpoint | None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> Pending[dict[str, Any] | None]:
    """Restore the previous attempt's state into ``model`` / ``optimizer``; return it (or ``None``); await it.

    ``checkpoint`` may be ``None`` (``ctx().checkpoint_or_none`` with ``retries=0``): nothing to restore.
    Files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
    containers only, so a checkpoint cannot run code when it is loaded. An ``extra`` holding other
    objects (a NumPy array, a custom class) then fails to load with ``pickle.UnpicklingError``;
    pass ``weights_only=False`` only for checkpoints you trust, or register the types with
    ``torch.serialization.add_safe_globals``.

    :func:`load_state_sync` is the blocking twin.
    """
    return Pending(
        _load_state("load_state", checkpoint, model, optimizer, map_location=map_location, weights_only=weights_only),
        "load_state",
        "load_state_sync",
    )


def load_state_sync(
    checkpoint: Checkpoint | None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict[str, Any] | None:
    """Blocking twin of :func:`load_state`."""
    _check_arguments("load_state_sync", checkpoint, model, optimizer, none_checkpoint=True)
    if checkpoint is None:
        return None
    state = _read(checkpoint, checkpoint.load_sync(), map_location, weights_only)
    return _apply(checkpoint, state, model, optimizer)
