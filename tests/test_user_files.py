"""No user file is replaced or deleted through the Python API: a local file that checkpointio did
not write (no record of it beside it) is refused before anything is read or written, unless the
caller says ``force=True``; a checkpoint checkpointio wrote is replaced as before."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from checkpointio import Checkpoint, DestinationError, TaskEnvironment, TransferConfig, ctx
from checkpointio._engine import save as engine_save
from checkpointio._location import parse_location
from checkpointio._manage import prune_runs, remove
from checkpointio._stores import open_store

from .conftest import StoreCase, age_keeping_records, make_tree, snapshot

USER_BYTES = b"print('the user's training script')\n"


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too), by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


async def _save_bytes(cp: Checkpoint, tmp_path: Path) -> None:
    await cp.save(b"new state")


async def _save_file(cp: Checkpoint, tmp_path: Path) -> None:
    source = tmp_path / "source" / "model.bin"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(b"weights")
    await cp.save(source)


async def _save_folder(cp: Checkpoint, tmp_path: Path) -> None:
    await cp.save(make_tree(tmp_path / "source"))


async def _save_in_the_background(cp: Checkpoint, tmp_path: Path) -> None:
    await cp.save(make_tree(tmp_path / "source"), wait=False)  # refused in the call, not on the handle


async def _save_incrementally(cp: Checkpoint, tmp_path: Path) -> None:
    incremental = Checkpoint(cp.dest, incremental=True)
    await incremental.save(make_tree(tmp_path / "source"))


async def _save_through_the_engine(cp: Checkpoint, tmp_path: Path) -> None:
    # What the integrations (torch, Lightning, Hugging Face, tasks) reach in the end: the store refuses.
    location = parse_location(cp.dest)
    await engine_save(await open_store("file", TransferConfig()), location, b"state", TransferConfig())


SAVES: dict[str, Callable[[Checkpoint, Path], Awaitable[None]]] = {
    "bytes": _save_bytes,
    "file": _save_file,
    "folder": _save_folder,
    "background": _save_in_the_background,
    "incremental": _save_incrementally,
    "store": _save_through_the_engine,
}


@pytest.mark.parametrize("how", SAVES)
async def test_a_save_refuses_a_file_checkpointio_did_not_write(tmp_path: Path, how: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = work / "train.py"
    script.write_bytes(USER_BYTES)
    cp = Checkpoint(script)
    with pytest.raises(DestinationError, match="is a file checkpointio did not write") as caught:
        await SAVES[how](cp, tmp_path)
    message = str(caught.value)
    assert str(script) in message and "nothing was written" in message and "force=True" in message
    assert caught.value.uri == str(script)
    assert _tree(work) == {"train.py": USER_BYTES}  # no record, no temporary file, no packs beside it
    cp.close()


async def test_force_replaces_such_a_file_and_the_checkpoint_then_is_ours(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_bytes(USER_BYTES)
    async with Checkpoint(script) as cp:
        await cp.save(b"first", force=True)
        await cp.save(b"second")  # checkpointio wrote it now: replaced without force
    async with Checkpoint(tmp_path / "next", src=script) as cp:
        assert await cp.load_bytes() == b"second"


async def test_force_must_be_a_bool(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_bytes(USER_BYTES)
    with pytest.raises(TypeError, match="force must be True or False"):
        await Checkpoint(script).save(b"x", force="yes")  # type: ignore[arg-type]
    assert script.read_bytes() == USER_BYTES


async def test_a_background_save_to_a_folder_is_refused_in_the_call(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "mine")
    before = snapshot(folder)
    with pytest.raises(DestinationError, match="is a directory"):
        await Checkpoint(folder).save(b"x", wait=False)
    assert snapshot(folder) == before


@pytest.mark.parametrize("how", ["bytes", "folder", "background", "incremental"])
async def test_a_checkpoint_checkpointio_wrote_is_replaced_without_force(store: StoreCase, how: str) -> None:
    uri = store.uri("runs/ckpt")
    async with Checkpoint(uri) as cp:
        await cp.save(b"old")
        if how == "bytes":
            await cp.save(b"new")
        elif how == "folder":
            await cp.save(make_tree(store.root.parent / "src"))
        elif how == "background":
            (await cp.save(b"new", wait=False)).result()
        else:
            await Checkpoint(uri, incremental=True).save(make_tree(store.root.parent / "src"))
    async with Checkpoint(store.uri("runs/next"), src=uri) as cp:
        restored = await cp.load()
        assert restored is not None
        if how in ("bytes", "background"):
            assert restored.read_bytes() == b"new"
        else:
            assert snapshot(restored) == snapshot(store.root.parent / "src")


async def test_a_checkpoint_whose_times_changed_is_still_checkpointios_to_replace_and_remove(tmp_path: Path) -> None:
    """`touch`, or a copy with its record by a `cp` that does not keep times: a loop saving to one
    URI goes on, and rm and retention still remove it; only a file with no record is the user's."""
    ckpt = tmp_path / "latest"
    async with Checkpoint(ckpt) as cp:
        await cp.save(b"step 1")
        os.utime(ckpt, (time.time() - 3600, time.time() - 3600))  # the record no longer matches
        await cp.save(b"step 2")
    async with Checkpoint(tmp_path / "next", src=ckpt) as cp:
        assert await cp.load_bytes() == b"step 2"
    os.utime(ckpt, (time.time() - 7200, time.time() - 7200))
    await remove(str(ckpt), TransferConfig())
    assert _tree(tmp_path) == {}


async def test_remove_refuses_a_file_checkpointio_did_not_write(tmp_path: Path) -> None:
    # What checkpointio.dcp.remove and `checkpointio rm` call.
    script = tmp_path / "train.py"
    script.write_bytes(USER_BYTES)
    with pytest.raises(DestinationError, match="is a file checkpointio did not write") as caught:
        await remove(str(script), TransferConfig())
    assert str(script) in str(caught.value) and "nothing was removed" in str(caught.value)
    assert _tree(tmp_path) == {"train.py": USER_BYTES}
    await remove(str(script), TransferConfig(), force=True)  # rm --force
    assert not script.exists()


def test_retention_keeps_a_user_file_named_like_an_attempt(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    run = storage / "e" / "job" / "r"
    run.mkdir(parents=True)
    (run / "attempt-0").write_bytes(b"the user's notes, named like an attempt")

    @TaskEnvironment("e", storage=str(storage), run_id="r", keep_last=0).task(retries=1)
    def job() -> int:
        context = ctx()
        context.checkpoint.save_sync(f"attempt {context.attempt}".encode())
        if context.attempt == 1:
            raise RuntimeError("fails once")
        assert context.attempt is not None
        return context.attempt

    # Attempt 1 (0 is taken by the user's file) fails, attempt 2 succeeds; then keep_last=0 removes
    # every attempt's checkpoint, and keeps the user's file (with a warning) instead of failing the run.
    assert job() == 2
    assert _tree(run) == {"attempt-0": b"the user's notes, named like an attempt"}


async def test_pruning_runs_keeps_a_user_file_named_like_an_attempt(tmp_path: Path) -> None:
    storage = tmp_path / "runs"

    @TaskEnvironment("e", storage=str(storage), run_id="old").task(retries=1)
    def job() -> None:
        ctx().checkpoint.save_sync(b"progress")

    job()
    run = storage / "e" / "job" / "old"
    (run / "attempt-7").write_bytes(b"mine")
    when = time.time() - 3 * 86400
    for path in run.iterdir():
        age_keeping_records(path, when)
    pruned = await prune_runs(str(storage), TransferConfig(), older_than=86400)
    assert [found.location.key for found in pruned] == [str(run)]
    assert _tree(run) == {"attempt-7": b"mine"}
    assert os.listdir(storage / "e" / "job") == ["old"]
