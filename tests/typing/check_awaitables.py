"""Checked by ``mypy`` (strict), never run: the async methods' awaitables type as the coroutines they replace."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from checkpointio import Checkpoint, SaveHandle, ctx
from checkpointio.torch import load_state, load_state_sync, save_state, save_state_sync


async def awaited(cp: Checkpoint) -> None:
    exists: bool = await cp.prev_exists()
    restored: Path | None = await cp.load()
    data: bytearray | None = await cp.load_bytes()
    task: asyncio.Task[SaveHandle] = asyncio.create_task(cp.save(b"x"))
    handle: SaveHandle = await task
    coroutine: Coroutine[Any, Any, None] = cp.wait()  # still a Coroutine for APIs that want one
    await coroutine
    state: dict[str, Any] | None = await load_state(cp)
    saved: SaveHandle = await save_state(cp, step=1)
    both = await asyncio.gather(cp.prev_exists(), cp.load_bytes())
    first: bool = both[0]
    print(exists, restored, data, handle, state, saved, first)


def sync_twins() -> None:
    cp: Checkpoint = ctx().checkpoint  # never None: no check needed
    exists: bool = cp.prev_exists_sync()
    state: dict[str, Any] | None = load_state_sync(cp)
    handle: SaveHandle = save_state_sync(cp, step=1, wait=False)
    cancelled: bool = handle.cancelled()
    error: BaseException | None = handle.exception(timeout=1)
    handle.add_done_callback(lambda done: print(done.uri))
    print(exists, state, cancelled, error, ctx().checkpoint_or_none)
