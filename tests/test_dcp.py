"""checkpointio.dcp: torch.distributed.checkpoint over every store, committed by one manifest."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from checkpointio import (
    BackgroundSaveError,
    Checkpoint,
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
)
from checkpointio.dcp import StorageReader, StorageWriter, load, save

from .conftest import StoreCase
from .scripts import run_script
from .torchrun import dcp_info_lines, end_group, gloo_group


def state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(64, 33, generator=generator),
        "half": torch.randn(17, 5, generator=generator).to(torch.bfloat16),
        "view": torch.randn(40, generator=generator)[8:24],  # a view: only its elements are stored
        "blob": io.BytesIO(bytes(range(256)) * (seed + 1)),
        "step": seed,
    }


def empty() -> dict[str, Any]:
    return {
        "weight": torch.zeros(64, 33),
        "half": torch.zeros(17, 5, dtype=torch.bfloat16),
        "view": torch.zeros(16),
        "blob": io.BytesIO(),
        "step": -1,
    }


def assert_same(loaded: dict[str, Any], saved: dict[str, Any]) -> None:
    for name in ("weight", "half", "view"):
        assert loaded[name].dtype == saved[name].dtype
        assert torch.equal(loaded[name], saved[name]), name
    assert loaded["blob"].getvalue() == saved["blob"].getvalue()
    assert loaded["step"] == saved["step"]


def data_objects(store: StoreCase, name: str) -> list[str]:
    """The data objects of the checkpoint ``name``: ``<save-id>/rank-<n>``, from the store's listing."""
    prefix = f"{name}.dcp/"
    return sorted(key[len(prefix) :] for key in store.list_names("") if key.startswith(prefix))


def save_ids(store: StoreCase, name: str) -> set[str]:
    return {key.partition("/")[0] for key in data_objects(store, name)}


def committed_save_id(uri: str) -> str:
    """The save id the manifest at ``uri`` names: that of the committed save."""
    meta = StorageReader(uri).read_metadata().storage_meta
    assert meta is not None and meta.save_id is not None
    return meta.save_id


def delete(store: StoreCase, name: str) -> None:
    """Delete one stored object, through the store itself."""
    import anyio

    from checkpointio._config import TransferConfig
    from checkpointio._location import parse_location
    from checkpointio._stores import open_store

    location = parse_location(store.uri(name))

    async def remove() -> bool:
        return await (await open_store(location.scheme, TransferConfig())).delete(location)

    assert anyio.run(remove)


class Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("this object cannot be saved")


def test_round_trip_over_every_store_one_object_per_rank(store: StoreCase) -> None:
    saved = state(1)
    save(saved, store.uri("ckpt"), part_size=5 * 1024 * 1024)
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, saved)
    # One data object for the one rank, plus the manifest: world size + 1 objects.
    names = store.list_names("")
    objects = data_objects(store, "ckpt")
    assert len(objects) == 1 and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{8}/rank-0", objects[0])
    assert sorted(names) == ["ckpt", f"ckpt.dcp/{objects[0]}"]
    assert store.get_raw("ckpt").startswith(b"checkpointio-dcp/1\n")


def test_each_save_and_load_logs_one_info_line(store: StoreCase, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="checkpointio")
    uri = store.uri("ckpt")
    assert load(empty(), uri) is False  # nothing there: nothing loaded, nothing said
    save(state(1), uri)
    save(state(2), uri, wait=False).result()
    assert load(empty(), uri) is True
    with pytest.raises(CheckpointError):  # a load that fails says nothing of having loaded
        load({"not saved": torch.zeros(3)}, uri)
    # torch's own dcp.save with our storage layer: the same line (the commit logs it); its dcp.load
    # gives a storage reader no hook once the whole group read, so it logs none
    import torch.distributed.checkpoint as dcp

    dcp.save(state(3), storage_writer=StorageWriter(uri))
    dcp.load(empty(), storage_reader=StorageReader(uri))
    lines = [record.getMessage() for record in caplog.records if record.name == "checkpointio.dcp"]
    assert [line.split(" (")[0] for line in lines] == [
        f"saved distributed checkpoint {uri}",
        f"saved distributed checkpoint {uri}",
        f"loaded distributed checkpoint {uri}",
        f"saved distributed checkpoint {uri}",
    ]
    assert all(re.search(r" \(world size 1, [0-9.]+ [KMG]?i?B of data in [0-9.]+ s\)$", line) for line in lines), lines
    assert all(record.levelno == logging.INFO for record in caplog.records if record.name == "checkpointio.dcp")


def test_the_storage_layer_plugs_into_dcp_itself(store: StoreCase) -> None:
    import torch.distributed.checkpoint as dcp

    saved = state(2)
    dcp.save(saved, storage_writer=StorageWriter(store.uri("ckpt")))
    loaded = empty()
    dcp.load(loaded, storage_reader=StorageReader(store.uri("ckpt")))
    assert_same(loaded, saved)


def test_the_documented_recipe_restores_a_model_and_its_optimizers_moments_into_fresh_ones(store: StoreCase) -> None:
    """docs/distributed.md and the README: state built with get_state_dict, applied with
    set_state_dict. A retry starts from a fresh optimizer, whose own state_dict() holds no moments."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def trained(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        for _ in range(steps):
            model(torch.ones(2, 6)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    model, optimizer = trained(3)
    optimizer.param_groups[0]["lr"] = 0.05
    model_state, optimizer_state = get_state_dict(model, optimizer)
    save({"model": model_state, "optimizer": optimizer_state}, store.uri("ckpt"))

    fresh_model, fresh_optimizer = trained(0)
    model_state, optimizer_state = get_state_dict(fresh_model, fresh_optimizer)
    loaded: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    assert load(loaded, store.uri("ckpt")) is True
    set_state_dict(fresh_model, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])

    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.05
    saved_moments, restored_moments = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert sorted(restored_moments) == sorted(saved_moments) and len(saved_moments) == 2
    for index, moments in saved_moments.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored_moments[index][key], moments[key]), (index, key)


def test_tensors_load_into_other_dtypes_strided_targets_and_every_shape(store: StoreCase) -> None:
    """Tensors are stored as their elements: each is read back into its target whatever its
    layout (copied straight in when dtype and shape match, converted by torch otherwise)."""
    generator = torch.Generator().manual_seed(7)
    saved = {
        "f32": torch.randn(6, 4, generator=generator),
        "bf16": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "ints": torch.arange(-20, 20, dtype=torch.int64).reshape(8, 5),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "nothing": torch.zeros(0, 3),
        "transposed": torch.randn(3, 7, generator=generator).t(),  # saved from a non-contiguous view
    }
    save(saved, store.uri("ckpt"))
    loaded = {
        "f32": torch.zeros(6, 4, dtype=torch.float64),  # another dtype: converted as torch's copy_ does
        "bf16": torch.zeros(5, 3, dtype=torch.bfloat16),
        "ints": torch.zeros(8, 5, dtype=torch.int64),
        "flags": torch.zeros(3, dtype=torch.bool),
        "scalar": torch.tensor(0.0, dtype=torch.float64),
        "nothing": torch.zeros(0, 3),
        "transposed": torch.full((3, 7), -1.0).t(),  # a non-contiguous target
    }
    assert load(loaded, store.uri("ckpt")) is True
    assert loaded["f32"].dtype == torch.float64 and torch.equal(loaded["f32"], saved["f32"].double())
    for name in ("bf16", "ints", "flags", "scalar", "nothing", "transposed"):
        assert loaded[name].dtype == saved[name].dtype, name
        assert torch.equal(loaded[name], saved[name]), name


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_tensors_come_back_as_their_values_whatever_their_memory_holds(store: StoreCase) -> None:
    """A lazy conjugate or negative view holds other elements in memory than its values, and a
    quantized tensor holds integers: each is saved and loaded as the values it reads as."""
    conjugated = torch.tensor([1 + 2j, 3 - 4j]).conj()
    negated = torch.tensor([1.0, 2.0])._neg_view()
    quantized = torch.quantize_per_tensor(torch.tensor([0.5, 1.0, -2.0]), 0.1, 0, torch.qint8)
    save({"conj": conjugated, "neg": negated, "q": quantized}, store.uri("ckpt"))
    loaded = {
        "conj": torch.zeros(2, dtype=torch.complex64),
        "neg": torch.zeros(2),
        "q": torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8),
    }
    assert load(loaded, store.uri("ckpt")) is True
    assert loaded["conj"].tolist() == [1 - 2j, 3 + 4j]
    assert loaded["neg"].tolist() == [-1.0, -2.0]
    assert loaded["q"].dequantize().tolist() == quantized.dequantize().tolist()
    into_views = {"conj": torch.zeros(2, dtype=torch.complex64).conj(), "neg": torch.zeros(2)._neg_view()}
    assert load(into_views, store.uri("ckpt")) is True  # targets that are themselves lazy views
    assert into_views["conj"].tolist() == [1 - 2j, 3 + 4j]
    assert into_views["neg"].tolist() == [-1.0, -2.0]


def test_nothing_there_loads_nothing_and_leaves_the_state_alone(store: StoreCase) -> None:
    loaded = empty()
    assert load(loaded, store.uri("none")) is False
    assert_same(loaded, empty())


def test_something_else_at_the_uri_is_a_clear_error(store: StoreCase) -> None:
    store.put_raw("ckpt", b"PK\x03\x04 a torch.save file, not a distributed checkpoint")
    with pytest.raises(CorruptCheckpointError, match="not a distributed checkpoint") as caught:
        load(empty(), store.uri("ckpt"))
    assert caught.value.uri == store.uri("ckpt")
    store.put_raw("ckpt", b"checkpointio-dcp/9\nfrom the future")
    with pytest.raises(CorruptCheckpointError, match="manifest version '9'"):
        load(empty(), store.uri("ckpt"))


@pytest.mark.parametrize("kind", ["dir", "bytes"])
def test_a_distributed_save_replaces_a_checkpoint_of_another_kind_which_a_distributed_load_names(
    store: StoreCase, kind: str, tmp_path: Path
) -> None:
    """A directory or bytes checkpoint at the URI: a distributed load says what is there (reading
    no more than its first bytes), and a distributed save replaces it as any save replaces the
    checkpoint at its URI, leaving one save's data and nothing else."""
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"a file")
    with Checkpoint(store.uri("ckpt")) as cp:
        cp.save_sync(folder if kind == "dir" else b"some bytes")
    words = {"dir": "a directory", "bytes": "a bytes"}[kind]
    with pytest.raises(CorruptCheckpointError, match=f"not a distributed checkpoint: it holds {words} checkpoint"):
        load(empty(), store.uri("ckpt"))

    saved = state(7)
    save(saved, store.uri("ckpt"))
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, saved)
    (name,) = data_objects(store, "ckpt")
    assert sorted(store.list_names("")) == ["ckpt", f"ckpt.dcp/{name}"]


def test_a_distributed_load_reads_only_the_first_bytes_of_a_large_checkpoint_of_another_kind(store: StoreCase) -> None:
    import anyio

    from checkpointio._config import TransferConfig
    from checkpointio._dcp_layout import read_manifest
    from checkpointio._location import parse_location
    from checkpointio._stores import open_store

    from .counting import CountingStore

    with Checkpoint(store.uri("ckpt")) as cp:
        cp.save_sync(os.urandom(4 * 1024 * 1024))
    location = parse_location(store.uri("ckpt"))

    async def read() -> CountingStore:
        counted = CountingStore(await open_store(location.scheme, TransferConfig()))
        with pytest.raises(CorruptCheckpointError, match="it holds a bytes checkpoint"):
            await read_manifest(counted, location, TransferConfig())
        return counted

    counted = anyio.run(read)
    assert counted.received < 1024, counted.requests


def test_the_loads_of_other_kinds_refuse_a_distributed_checkpoint_instead_of_restoring_its_manifest(
    store: StoreCase, tmp_path: Path
) -> None:
    save(state(8), store.uri("ckpt"))
    refused = re.escape(f"{store.uri('ckpt')} holds a distributed checkpoint (torch.distributed.checkpoint): load it")
    with Checkpoint(store.uri("next"), src=store.uri("ckpt")) as cp:
        with pytest.raises(CheckpointError, match=refused):
            cp.load_sync()
        with pytest.raises(CheckpointError, match=refused):
            cp.load_sync(only=["model/*"])
        with pytest.raises(CheckpointError, match=refused):
            cp.load_bytes_sync()
        with pytest.raises(CheckpointError, match=refused):
            cp.contents_sync()
    from checkpointio._cli import main

    assert main(["load", "-q", store.uri("ckpt"), str(tmp_path / "restored")]) == 1
    assert not (tmp_path / "restored").exists()
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True  # still whole, for the load that reads it
    assert_same(loaded, state(8))


def test_a_distributed_manifest_that_lost_its_record_is_still_refused_by_the_other_loads(
    store: StoreCase, tmp_path: Path
) -> None:
    """Copied without its metadata (or the local store's sidecar), the manifest is told by its
    first bytes: it is never restored as a file."""
    save(state(9), store.uri("ckpt"))
    store.put_raw("copy", store.get_raw("ckpt"))  # as `cp` without the sidecar, or a copy dropping metadata
    refused = re.escape(f"{store.uri('copy')} holds a distributed checkpoint (torch.distributed.checkpoint)")
    with Checkpoint(store.uri("next"), src=store.uri("copy")) as cp:
        with pytest.raises(CheckpointError, match=refused):
            cp.load_sync()
        with pytest.raises(CheckpointError, match=refused):
            cp.load_bytes_sync()
        assert not any(cp.path.iterdir())  # nothing was presented
    from checkpointio._cli import main

    assert main(["load", "-q", store.uri("copy"), str(tmp_path / "restored")]) == 1
    assert not (tmp_path / "restored").exists()


def test_a_checkpoint_that_does_not_fit_the_state_dict_is_a_clear_error_naming_the_uri(store: StoreCase) -> None:
    save({"weight": torch.ones(3)}, store.uri("ckpt"))
    expected = f"{store.uri('ckpt')}: the checkpoint does not fit the state dict: rank 0: RuntimeError: Missing key"
    with pytest.raises(CheckpointError, match=re.escape(expected)) as caught:
        load({"weight": torch.zeros(3), "bias": torch.zeros(2)}, store.uri("ckpt"))
    assert caught.value.uri == store.uri("ckpt")
    with pytest.raises(
        CheckpointError, match=r"ckpt: the checkpoint does not fit the state dict: rank 0: ValueError: Size"
    ):
        load({"weight": torch.zeros(4)}, store.uri("ckpt"))


def test_a_corrupt_data_object_names_the_object_and_rank(store: StoreCase) -> None:
    """The error names the object and rank, and says that the state dict is partly loaded: tensors
    are received in place, so the damaged item's bytes may already be in its tensor."""
    saved = state(3)
    save(saved, store.uri("ckpt"))
    (name,) = data_objects(store, "ckpt")
    store.corrupt(f"ckpt.dcp/{name}")
    loaded = empty()
    with pytest.raises(ChecksumMismatchError, match=r"saved by rank 0 do not match their CRC32") as caught:
        load(loaded, store.uri("ckpt"))
    assert caught.value.uri == store.uri(f"ckpt.dcp/{name}")
    assert "the state dict is left partly loaded" in str(caught.value)
    assert "load it again from a whole checkpoint before using it" in str(caught.value)
    save(saved, store.uri("ckpt"))  # a whole checkpoint again: the same state dict loads whole
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, saved)


def test_a_failed_save_leaves_the_previous_checkpoint_and_a_new_one_replaces_its_data(store: StoreCase) -> None:
    first = state(4)
    save(first, store.uri("ckpt"))
    (first_id,) = save_ids(store, "ckpt")

    broken = {**state(5), "zz": Unpicklable()}  # fails after the tensors went into the rank's object
    with pytest.raises(CheckpointError, match=r"the distributed save failed: .*this object cannot be saved") as caught:
        save(broken, store.uri("ckpt"), multipart_threshold=0)  # S3: a multipart upload, aborted
    assert caught.value.uri == store.uri("ckpt") and isinstance(caught.value.__cause__, CheckpointException)
    assert save_ids(store, "ckpt") == {first_id}  # the failed save's object was never committed
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, first)

    second = state(6)
    save(second, store.uri("ckpt"))
    (second_id,) = save_ids(store, "ckpt")
    assert second_id > first_id  # exactly one save's data left: the new one
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, second)
    if store.name == "local":  # the old save's emptied folder goes too
        assert sorted(p.name for p in (store.root / "ckpt.dcp").iterdir()) == [second_id]


def test_a_task_retries_a_distributed_save_that_failed(tmp_path: Path) -> None:
    """A rank's failure that is not the store's (an object that cannot be serialized) is a
    CheckpointError: the task runtime retries it, as it retries any Exception."""
    from checkpointio import TaskEnvironment, ctx

    attempts: list[int | None] = []

    @TaskEnvironment("dist", storage=str(tmp_path / "runs")).task(retries=1)
    def train() -> int:
        context = ctx()
        attempts.append(context.attempt)
        extra = {"zz": Unpicklable()} if context.attempt == 0 else {}
        save({**state(11), **extra}, context.checkpoint)
        loaded = empty()
        assert load(loaded, context.checkpoint.dest) is True  # this attempt's save, committed
        assert_same(loaded, state(11))
        return len(attempts)

    assert train() == 2
    assert attempts == [0, 1]


class DiesBeforeCommit(StorageWriter):
    """A coordinator that stops after every rank's data is stored and before the manifest is written."""

    def finish(self, metadata: Any, results: Any) -> None:
        raise RuntimeError("the coordinator died before its commit")


def test_data_stored_without_a_commit_never_replaces_the_previous_checkpoint(store: StoreCase) -> None:
    import torch.distributed.checkpoint as dcp

    first = state(8)
    save(first, store.uri("ckpt"))
    (first_id,) = save_ids(store, "ckpt")
    with pytest.raises(CheckpointException, match="died before its commit"):
        dcp.save(state(9), storage_writer=DiesBeforeCommit(store.uri("ckpt")))
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, first)  # the manifest still points at the first save's data, untouched
    (uncommitted,) = save_ids(store, "ckpt") - {first_id}  # the new data is stored, under its own save id

    third = state(10)
    save(third, store.uri("ckpt"))
    # The replaced save's data is gone; the uncommitted one is not the commit's to judge (it could
    # be a slower save still on its way): gc sweeps it.
    (third_id,) = save_ids(store, "ckpt") - {uncommitted}
    assert first_id not in save_ids(store, "ckpt") and third_id > uncommitted
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, third)


class HeldBeforeCommit(StorageWriter):
    """A coordinator whose every rank's data is stored, held before its commit until released."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.holding = threading.Event()
        self.release = threading.Event()

    def finish(self, metadata: Any, results: Any) -> None:
        self.holding.set()
        assert self.release.wait(60)
        super().finish(metadata, results)


class Racer:
    """One save in a thread, held before its commit until released."""

    def __init__(self, uri: str, saved: dict[str, Any]) -> None:
        self.writer = HeldBeforeCommit(uri)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(saved,))
        self.thread.start()
        assert self.writer.holding.wait(60)  # its data is stored, its save id chosen

    def _run(self, saved: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        try:
            dcp.save(saved, storage_writer=self.writer)
        except BaseException as error:  # pragma: no cover - reported by commit()
            self.errors.append(error)

    def commit(self) -> None:
        self.writer.release.set()
        self.thread.join(60)
        assert not self.thread.is_alive() and self.errors == []


@pytest.mark.parametrize("survivor", ["started-first", "started-last"])
def test_two_saves_racing_to_one_uri_leave_the_survivors_data_whole(store: StoreCase, survivor: str) -> None:
    """Two saves overlap; whichever commits last is the checkpoint, and its data is all there."""
    save(state(12), store.uri("ckpt"))  # a previous checkpoint, replaced by the race
    first, last = state(13), state(14)
    started_first = Racer(store.uri("ckpt"), first)
    started_last = Racer(store.uri("ckpt"), last)
    if survivor == "started-first":  # the later save commits first, then the earlier one
        started_last.commit()
        started_first.commit()
        expected = first
    else:
        started_first.commit()
        started_last.commit()
        expected = last

    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, expected)
    live = committed_save_id(store.uri("ckpt"))
    assert save_ids(store, "ckpt") == {live}  # the replaced saves' data is gone, the survivor's whole


class FailsToSave:
    """Copied to CPU memory fine (a background save's staging); fails when DCP serialises it."""

    def __deepcopy__(self, memo: Any) -> FailsToSave:
        return FailsToSave()

    def __reduce__(self) -> Any:
        raise RuntimeError("this object cannot be saved")


def test_a_background_save_commits_a_copy_of_the_state_taken_when_it_returned(store: StoreCase) -> None:
    saved = state(15)
    handle = save(saved, store.uri("ckpt"), wait=False)
    saved["weight"].zero_()  # training goes on: the save has its own copy
    saved["blob"].write(b"changed")
    handle.result(timeout=120)
    assert handle.done() and handle.succeeded() and handle.exception() is None
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, state(15))
    assert len(save_ids(store, "ckpt")) == 1

    import torch.distributed.checkpoint as dcp

    response = dcp.async_save(state(20), storage_writer=StorageWriter(store.uri("ckpt")))
    assert isinstance(response, concurrent.futures.Future)  # an AsyncSaveResponse only when asked for one
    response.result(timeout=120)
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, state(20))


def test_a_background_save_failure_is_never_lost(store: StoreCase) -> None:
    save(state(16), store.uri("ckpt"))
    failing = {**state(17), "zz": FailsToSave()}

    handle = save(failing, store.uri("ckpt"), wait=False)
    error = handle.exception(timeout=120)  # retrieved here: not raised again
    assert isinstance(error, CheckpointError)
    assert (
        str(error)
        == f"{store.uri('ckpt')}: the distributed save failed: rank 0: RuntimeError: this object cannot be saved"
    )
    with pytest.raises(CheckpointError, match="this object cannot be saved"):
        asyncio.run(_awaited(handle))
    save(state(18), store.uri("ckpt"))

    handle = save(failing, store.uri("ckpt"), wait=False)  # nobody looks at this handle
    with pytest.raises(BackgroundSaveError, match="this object cannot be saved") as caught:
        save(state(19), store.uri("ckpt"))  # the next save reports it, and does not save
    assert caught.value.uri == store.uri("ckpt") and isinstance(caught.value.__cause__, CheckpointError)
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True
    assert_same(loaded, state(18))  # the failed saves changed nothing
    assert len(save_ids(store, "ckpt")) == 1  # and left no data behind

    save(failing, store.uri("ckpt"), wait=False)
    with pytest.raises(BackgroundSaveError, match="this object cannot be saved"):
        load(empty(), store.uri("ckpt"))  # a load reports it too
    loaded = empty()
    assert load(loaded, store.uri("ckpt")) is True  # once
    assert_same(loaded, state(18))


async def _awaited(handle: Any) -> None:
    await handle


def test_a_background_save_failure_nobody_retrieved_is_logged_at_exit(tmp_path: Any) -> None:
    result = run_script(
        "from checkpointio.dcp import save\n"
        "from tests.test_dcp import FailsToSave\n"
        f"save({{'zz': FailsToSave()}}, {str(tmp_path / 'ckpt')!r}, wait=False)\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "distributed save to" in result.stderr and "this object cannot be saved" in result.stderr, result.stderr


def test_a_background_save_started_by_an_atexit_hook_is_stored_whatever_the_import_order(tmp_path: Any) -> None:
    # atexit runs hooks in the reverse order of registration: a hook registered before checkpointio
    # was imported runs after checkpointio's exit step has waited for the background saves, one
    # registered after runs before it. A save(wait=False) from either must be committed before the
    # process ends.
    result = run_script(
        "import atexit\n"
        "def last_words(name, seed):\n"
        "    from checkpointio.dcp import save\n"
        "    from tests.test_dcp import state\n"
        f"    handle = save(state(seed), {str(tmp_path)!r} + '/' + name, wait=False)\n"
        "    print(name, 'done when save returned:', handle.done())\n"
        "atexit.register(last_words, 'before', 21)\n"
        "import checkpointio.dcp\n"
        "atexit.register(last_words, 'after', 22)\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "after done when save returned: True",
        "before done when save returned: True",
    ], result.stderr
    for name, seed in (("before", 21), ("after", 22)):
        loaded = empty()
        assert load(loaded, str(tmp_path / name)) is True
        assert_same(loaded, state(seed))


class RemovedOnceHeaded:
    """A store (delegating to a real one) that deletes ``victim`` just after answering a HEAD for
    it, once: another process removing the checkpoint while it is being read."""

    def __init__(self, store: Any, victim: Any) -> None:
        self.store, self.victim, self.struck = store, victim, False

    async def head(self, location: Any) -> Any:
        info = await self.store.head(location)
        if location == self.victim and info is not None and not self.struck:
            self.struck = True
            await self.store.delete(location)
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_checkpoint_removed_while_listed_is_left_out_and_the_newest_committed_one_found(store: StoreCase) -> None:
    import anyio

    from checkpointio import _dcp_layout
    from checkpointio._config import TransferConfig
    from checkpointio._location import parse_location
    from checkpointio._stores import open_store
    from checkpointio.dcp import latest, remove

    prefix = store.uri("run")
    assert latest(prefix) is None  # nothing there yet
    save(state(1), f"{prefix}/older")
    save(state(2), f"{prefix}/newer")
    assert latest(prefix) == f"{prefix}/newer"
    location = parse_location(f"{prefix}/newer")

    async def summary_while_removed() -> Any:
        racing = RemovedOnceHeaded(await open_store(location.scheme, TransferConfig()), location)
        return await _dcp_layout.read_summary(racing, location, TransferConfig())

    assert anyio.run(summary_while_removed) is None  # gone: not a distributed checkpoint any more
    assert latest(prefix) == f"{prefix}/older"  # its data left, uncommitted: never chosen
    assert remove(f"{prefix}/older") is True and remove(f"{prefix}/older") is False
    assert latest(prefix) is None


class SlowToSave:
    """Pickles only after a pause: keeps a background save in flight for a moment."""

    def __reduce__(self) -> Any:
        import time

        time.sleep(1.0)
        return (SlowToSave, ())


def test_a_forked_child_never_waits_for_its_parents_background_save(tmp_path: Any) -> None:
    result = run_script(
        "import os, signal\n"
        "from checkpointio.dcp import load, save\n"
        "from tests.test_dcp import SlowToSave\n"
        f"handle = save({{'slow': SlowToSave()}}, {str(tmp_path / 'ckpt')!r}, wait=False)\n"
        "print('in flight at fork:', not handle.done())\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    signal.alarm(30)  # a hang fails the test instead of stalling it\n"
        f"    os._exit(0 if load({{'step': 0}}, {str(tmp_path / 'other')!r}) is False else 1)\n"
        "_, status = os.waitpid(child, 0)\n"
        "print('child exit:', os.waitstatus_to_exitcode(status))\n"
        "print('saved by the parent:', handle.result(timeout=120) is None)\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["in flight at fork: True", "child exit: 0", "saved by the parent: True"]


def test_an_explicit_checkpoint_id_replaces_a_checkpoints_sources(store: StoreCase) -> None:
    import torch.distributed.checkpoint as dcp

    save(state(1), store.uri("a"))
    save(state(2), store.uri("b"))
    reader = StorageReader(Checkpoint(store.uri("next"), src=store.uri("a")))
    loaded = empty()
    dcp.load(loaded, checkpoint_id=store.uri("b"), storage_reader=reader)
    assert_same(loaded, state(2))


def test_a_checkpoint_saves_to_its_dest_and_loads_its_newest_whole_source(store: StoreCase) -> None:
    import torch.distributed.checkpoint as dcp

    save(state(21), store.uri("attempt-0"))
    save(state(22), store.uri("attempt-1"))
    (broken,) = data_objects(store, "attempt-1")
    delete(store, f"attempt-1.dcp/{broken}")  # its data object is gone: the older source is used
    store.put_raw("attempt-2", b"checkpointio-dcp/1\ngarbled")  # a garbled manifest: skipped too
    sources = [store.uri("attempt-3"), store.uri("attempt-2"), store.uri("attempt-1"), store.uri("attempt-0")]
    cp = Checkpoint(store.uri("attempt-4"), src=sources, part_size=5 * 1024 * 1024)

    loaded = empty()
    assert load(loaded, cp) is True
    assert_same(loaded, state(21))
    loaded = empty()
    dcp.load(loaded, storage_reader=StorageReader(cp))
    assert_same(loaded, state(21))

    save(state(23), cp)  # to its dest
    assert store.get_raw("attempt-4").startswith(b"checkpointio-dcp/1\n")
    loaded = empty()
    assert load(loaded, Checkpoint(store.uri("attempt-5"), src=[store.uri("attempt-4"), *sources])) is True
    assert_same(loaded, state(23))
    assert load(empty(), store.uri("attempt-5")) is False

    with pytest.raises(CorruptCheckpointError, match=r"attempt-2: the distributed checkpoint's manifest is garbled"):
        load(empty(), Checkpoint(store.uri("attempt-5"), src=sources[:3]))  # nothing whole: the newest error
    first = Checkpoint(store.uri("attempt-0"))
    assert load(empty(), first) is False  # no source at all: a first attempt
    with pytest.raises(CheckpointNotFoundError, match="no distributed checkpoint in any of its sources"):
        StorageReader(first).read_metadata()


def test_pruning_a_task_run_removes_its_distributed_attempts_data(store: StoreCase) -> None:
    import anyio

    from checkpointio import TransferConfig, _manage
    from checkpointio._location import parse_location, parse_prefix
    from checkpointio._stores import open_store

    save(state(24), store.uri("runs/env/task/run-1/attempt-0"))
    store.put_raw("runs/env/task/run-1/notes.txt", b"not the run's")

    async def prune() -> list[str]:
        prefix = parse_prefix(store.uri("runs/"))
        opened = await open_store(prefix.scheme, TransferConfig())
        (run,) = await _manage.find_runs(opened, prefix)
        await _manage.delete_run(opened, run)
        return sorted(location.uri for location in run.objects)

    (name,) = data_objects(store, "runs/env/task/run-1/attempt-0")
    attempt = parse_location(store.uri("runs/env/task/run-1/attempt-0")).uri
    assert anyio.run(prune) == [attempt, f"{attempt}.dcp/{name}"]
    assert store.list_names("runs") == ["env/task/run-1/notes.txt"]


def test_a_load_reads_only_the_items_it_needs(store: StoreCase) -> None:
    saved = state(7)
    save(saved, store.uri("ckpt"))
    (name,) = data_objects(store, "ckpt")
    slices = StorageReader(store.uri("ckpt")).read_metadata().storage_data
    (weight,) = (one for index, one in slices.items() if index.fqn == "weight")
    data = bytearray(store.get_raw(f"ckpt.dcp/{name}"))
    middle = weight.offset + weight.length // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    store.put_raw(f"ckpt.dcp/{name}", bytes(data))  # only the weight's bytes are damaged

    partial: dict[str, Any] = {"half": torch.zeros(17, 5, dtype=torch.bfloat16), "step": -1}
    assert load(partial, store.uri("ckpt")) is True  # never reads the weight's range
    assert torch.equal(partial["half"], saved["half"]) and partial["step"] == 7
    with pytest.raises(ChecksumMismatchError, match="rank 0"):
        load(empty(), store.uri("ckpt"))


def full_state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(11)
    return {
        "weight": torch.randn(10, 7, generator=generator),
        "moments": torch.randn(6, 3, generator=generator).to(torch.bfloat16),
        "bias": torch.randn(7, generator=generator),
        "step": 5,
    }


def _two_ranks(rank: int, world_size: int, port: int, uris: list[str], agree: str) -> None:
    """One process of the gloo group: :func:`_two_rank_scenarios`, its mesh and tensors freed
    before the group ends; the INFO lines of ``checkpointio.dcp`` it logged go to
    ``<agree>-log-<rank>.json``."""
    lines = dcp_info_lines()
    with gloo_group(rank, world_size, port):
        _two_rank_scenarios(rank, world_size, uris, agree)
    Path(f"{agree}-log-{rank}.json").write_text(json.dumps(lines))


def _two_rank_scenarios(rank: int, world_size: int, uris: list[str], agree: str) -> None:
    """Save sharded at world size 2 (the last URI with wait=False), load it back at 2 (each rank
    gets its own shards), for every URI; then load a ``Checkpoint`` whose sources the ranks see
    differently (several scenarios per process start)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = full_state()
    for uri in uris:
        sharded = {
            "weight": distribute_tensor(full["weight"], mesh, [Shard(0)]),
            "moments": distribute_tensor(full["moments"], mesh, [Shard(0)]),
            "bias": full["bias"],
            "step": full["step"],
        }
        assert load(sharded, uri) is False  # nothing there yet, on every rank
        handle = save(sharded, uri, wait=uri != uris[-1])  # the last one in the background
        handle.result(timeout=120)
        target: dict[str, Any] = {
            "weight": distribute_tensor(torch.zeros(10, 7), mesh, [Shard(0)]),
            "moments": distribute_tensor(torch.zeros(6, 3, dtype=torch.bfloat16), mesh, [Shard(0)]),
            "bias": torch.zeros(7),
            "step": -1,
        }
        assert load(target, uri) is True
        assert torch.equal(target["weight"].to_local(), sharded["weight"].to_local())
        assert torch.equal(target["moments"].full_tensor(), full["moments"])
        assert torch.equal(target["bias"], full["bias"]) and target["step"] == 5
    # Rank 1 sees a newer source than rank 0 does (as when it appears between their reads):
    # every rank restores the one rank 0 chose, never a mix of steps.
    save({"bias": full["bias"], "step": 9}, f"{agree}/newer")
    save({"bias": full["bias"], "step": 7}, f"{agree}/older")
    sources = [f"{agree}/older"] if rank == 0 else [f"{agree}/newer", f"{agree}/older"]
    restored = {"bias": torch.zeros(7), "step": -1}
    assert load(restored, Checkpoint(f"{agree}/next", src=sources)) is True
    assert restored["step"] == 7, f"rank {rank} restored step {restored['step']}"


def test_world_size_two_saves_one_object_per_rank_and_reshards_to_one(tmp_path: Any, moto_server: Any) -> None:
    import torch.multiprocessing as mp

    from .conftest import free_port

    bucket = moto_server.new_bucket()
    uris = [str(tmp_path / "ckpt"), f"s3://{bucket}/run/ckpt"]
    agree = tmp_path.parent / f"{tmp_path.name}-agree"
    mp.spawn(_two_ranks, args=(2, free_port(), uris, str(agree)), nprocs=2, join=True)

    local = StoreCase("local", tmp_path)
    (save_id,) = save_ids(local, "ckpt")
    from .test_cli import ok

    (row,) = json.loads(ok("ls", str(tmp_path), "--json"))  # one checkpoint, saved by 2 ranks
    assert (row["kind"], row["world_size"], row["uri"]) == ("distributed", 2, str(tmp_path / "ckpt"))
    assert data_objects(local, "ckpt") == [f"{save_id}/rank-0", f"{save_id}/rank-1"]  # world size + 1 objects
    listed = moto_server.client().list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]
    assert len(listed) == 3 and sorted(one["Key"].rpartition("/")[2] for one in listed)[:2] == ["ckpt", "rank-0"]
    # One line per save and load of the group, by its coordinator (rank 0) alone.
    done = [
        line for uri in uris for line in (f"saved distributed checkpoint {uri}", f"loaded distributed checkpoint {uri}")
    ]
    assert json.loads(Path(f"{agree}-log-0.json").read_text()) == [
        *done,
        f"saved distributed checkpoint {agree}/newer",
        f"saved distributed checkpoint {agree}/older",
        f"loaded distributed checkpoint {agree}/older",  # the source the group restored
    ]
    assert json.loads(Path(f"{agree}-log-1.json").read_text()) == []
    full = full_state()
    for uri in uris:  # resharding: saved at world size 2, loaded in one process
        loaded: dict[str, Any] = {
            "weight": torch.zeros(10, 7),
            "moments": torch.zeros(6, 3, dtype=torch.bfloat16),
            "bias": torch.zeros(7),
            "step": -1,
        }
        assert load(loaded, uri) is True
        for name in ("weight", "moments", "bias"):
            assert torch.equal(loaded[name], full[name]), (uri, name)
        assert loaded["step"] == 5


class KillsOneRank(DefaultSavePlanner):
    """Kills rank ``rank`` with SIGKILL as it resolves its item number ``after`` (its earlier items
    are in its object's upload by then), after leaving ``marker`` to say so."""

    def __init__(self, rank: int, after: int, marker: str) -> None:
        super().__init__()
        self.kill_rank, self.after, self.marker, self.resolved = rank, after, marker, 0

    def resolve_data(self, write_item: Any) -> Any:
        import signal

        import torch.distributed as dist

        if dist.get_rank() == self.kill_rank and self.resolved == self.after:
            Path(self.marker).write_text(str(self.resolved))
            os.kill(os.getpid(), signal.SIGKILL)
        self.resolved += 1
        return super().resolve_data(write_item)


def big_state(step: int) -> dict[str, Any]:
    """Two tensors of 13 MB: each rank's half of either is more than one 5 MiB part."""
    generator = torch.Generator().manual_seed(step)
    return {
        "weight": torch.randn(4096, 800, generator=generator),
        "moments": torch.randn(4096, 800, generator=generator),
        "step": step,
    }


def _killed_mid_save(rank: int, world_size: int, port: int, uri: str, marker: str) -> None:
    """A 2-rank group saves a checkpoint, then saves again and rank 1 is SIGKILLed half-way."""
    import datetime

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world_size,))
    options: dict[str, Any] = {"multipart_threshold": 0, "part_size": 5 * 1024 * 1024}

    def sharded(step: int) -> dict[str, Any]:
        full = big_state(step)
        return {
            "weight": distribute_tensor(full["weight"], mesh, [Shard(0)]),
            "moments": distribute_tensor(full["moments"], mesh, [Shard(0)]),
            "step": step,
        }

    save(sharded(1), uri, **options)
    dist.barrier()
    dcp.save(sharded(2), storage_writer=StorageWriter(uri, **options), planner=KillsOneRank(1, 1, marker))


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_and_gc_sweeps_what_it_left(
    tmp_path: Any, moto_server: Any
) -> None:
    import torch.multiprocessing as mp

    from .conftest import free_port
    from .test_cli import ok

    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/run/ckpt"
    marker = tmp_path / "killed"
    from torch.multiprocessing.spawn import ProcessException

    with pytest.raises(ProcessException):  # rank 1 killed; rank 0 fails (or is stopped) with it
        mp.spawn(_killed_mid_save, args=(2, free_port(), uri, str(marker)), nprocs=2, join=True)
    assert marker.read_text() == "1"  # rank 1 died as it came to its second item

    store = StoreCase("s3", tmp_path, moto_server, bucket, "run")
    committed = committed_save_id(uri)
    client = moto_server.client()
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    left = {name for name in data_objects(store, "ckpt") if not name.startswith(committed)}
    assert uploads or left  # the killed save left something behind: rank 1's upload, rank 0's object
    (row,) = json.loads(ok("ls", f"s3://{bucket}/run/", "--json"))  # the new save is invisible
    assert (row["kind"], row["world_size"]) == ("distributed", 2)

    loaded: dict[str, Any] = {name: torch.zeros(4096, 800) for name in ("weight", "moments")} | {"step": -1}
    assert load(loaded, uri) is True  # the previous checkpoint, resharded to one process
    expected = big_state(1)
    assert all(torch.equal(loaded[name], expected[name]) for name in ("weight", "moments"))
    assert loaded["step"] == 1

    cleaned = json.loads(ok("gc", f"s3://{bucket}/run/", "--older-than", "0", "--json"))
    assert len(cleaned["unfinished_saves"]) == len(uploads)
    assert {one["save_id"] for one in cleaned["distributed_saves"]} == {name.partition("/")[0] for name in left}
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert data_objects(store, "ckpt") == [f"{committed}/rank-0", f"{committed}/rank-1"]

    store.corrupt(f"ckpt.dcp/{committed}/rank-1")  # a damaged data object: named, with its rank
    with pytest.raises(ChecksumMismatchError, match="saved by rank 1 do not match their CRC32") as caught:
        load(loaded, uri)
    assert caught.value.uri == f"{uri}.dcp/{committed}/rank-1"


def _task_group(rank: int, world_size: int, port: int, storage: str, out: str, kill: bool) -> None:
    """One process of a 2-rank group calling a task with retries (the process group initialized
    first). ``kill``: the first group, whose task fails once (retried in-process) and, after the
    retry saved step 2, rank 1 is SIGKILLed; else the restarted group, resuming the same run."""
    import signal

    import torch.distributed as dist

    from checkpointio import TaskEnvironment, ctx

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="job-7")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    seen: list[dict[str, Any]] = []

    @TaskEnvironment("dist", storage=storage).task(retries=2)
    def train() -> int:
        context = ctx()
        model: dict[str, Any] = {"weight": torch.zeros(6, 4), "step": 0}
        resumed = load(model, context.checkpoint)
        seen.append(
            {
                "rank": context.rank,
                "world_size": context.world_size,
                "attempt": context.attempt,
                "run_id": context.run_id,
                "resumed": resumed,
                "step": model["step"],
            }
        )
        step = int(model["step"]) + 1
        save({"weight": torch.full((6, 4), float(step)), "step": step}, context.checkpoint)
        Path(out, f"rank-{rank}.json").write_text(json.dumps(seen))
        if kill and step == 1:
            raise RuntimeError("a failure every rank sees: retried in this process")
        if kill:
            dist.barrier()  # step 2 is committed on both ranks
            if rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.barrier()  # rank 0 waits here until the group is torn down
        return step

    assert train() == 3  # only the restarted group gets here
    end_group()


def test_the_ranks_of_a_task_agree_on_run_and_attempt_and_a_killed_group_resumes(tmp_path: Any) -> None:
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from .conftest import free_port

    storage = str(tmp_path / "store")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    with pytest.raises(ProcessException):  # rank 1 SIGKILLed after step 2 was committed
        mp.spawn(_task_group, args=(2, free_port(), storage, str(first), True), nprocs=2, join=True)
    mp.spawn(_task_group, args=(2, free_port(), storage, str(second), False), nprocs=2, join=True)

    runs = {rank: json.loads((first / f"rank-{rank}.json").read_text()) for rank in (0, 1)}
    again = {rank: json.loads((second / f"rank-{rank}.json").read_text()) for rank in (0, 1)}
    for rank in (0, 1):
        assert [(one["rank"], one["world_size"], one["run_id"]) for one in runs[rank] + again[rank]] == [
            (rank, 2, "job-7")
        ] * 3
        # attempt 0 starts fresh, attempt 1 resumes step 1 in-process, the restarted group's attempt
        # resumes step 2 (the killed attempt's last commit)
        assert [(one["resumed"], one["step"]) for one in runs[rank] + again[rank]] == [(False, 0), (True, 1), (True, 2)]
    attempts = [[one["attempt"] for one in runs[rank] + again[rank]] for rank in (0, 1)]
    assert attempts[0] == attempts[1] and attempts[0][:2] == [0, 1] and attempts[0][2] > 1  # agreed, never reused


def test_the_documented_example_runs(tmp_path: Any) -> None:
    from .test_docs import python_blocks

    (block,) = (one.code for one in python_blocks() if "from checkpointio.dcp import StorageReader" in one.code)
    assert '"s3://my-bucket/run-7/step-100"' in block
    block = block.replace('"s3://my-bucket/run-7/step-100"', repr(str(tmp_path / "step-100")))
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    exec(block, {"model": model, "optimizer": optimizer, "step": 1})  # first run: nothing to load, saves
    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    fresh(torch.ones(2, 4)).sum().backward()  # Adam's state exists only after a step
    fresh_optimizer.step()
    exec(block, {"model": fresh, "optimizer": fresh_optimizer, "step": 0})  # loads what the first run saved
    assert all(torch.equal(fresh.state_dict()[name], value) for name, value in saved.items())
    assert torch.equal(
        fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )


@pytest.mark.parametrize("uri", ["s3://bucket/runs/7/", "memory://runs/7/"])
def test_a_folder_like_uri_is_refused_as_a_checkpoint_id_as_checkpoint_refuses_it(uri: str) -> None:
    """A key ending in ``/`` names a folder, not one checkpoint: refused before any request, with
    the message ``Checkpoint`` gives, whichever way the URI reaches the storage layer."""
    with pytest.raises(ValueError, match=r"ends with '/'") as expected:
        Checkpoint(uri)
    for start in (lambda: save({"w": torch.ones(2)}, uri), lambda: load({"w": torch.zeros(2)}, uri)):
        with pytest.raises(ValueError) as caught:
            start()
        assert str(caught.value) == str(expected.value)
    for layer in (StorageWriter, StorageReader):
        with pytest.raises(ValueError, match=r"ends with '/'"):
            layer(uri)
        with pytest.raises(ValueError, match=r"ends with '/'"):
            layer("memory://runs/7/ok").reset(uri)
        assert layer.validate_checkpoint_id(uri) is False
        assert layer.validate_checkpoint_id(uri.rstrip("/")) is True


def test_a_load_into_a_tensor_saved_for_backward_is_seen_by_autograd(store: StoreCase) -> None:
    """Loading writes into the state dict's tensors in place: autograd must see that as it sees
    ``copy_`` (a backward through a graph that saved the old values raises, instead of computing
    gradients from the loaded ones), whether the bytes are copied straight in or converted."""
    save({"same": torch.full((4,), 3.0), "other": torch.full((4,), 3.0)}, store.uri("ckpt"))
    same = torch.ones(4, requires_grad=True)
    other = torch.ones(4, dtype=torch.float64, requires_grad=True)  # another dtype: converted by copy_
    losses = {"same": (same * same).sum(), "other": (other * other).sum()}  # each saves its tensor for backward
    assert load({"same": same, "other": other}, store.uri("ckpt")) is True
    assert same.tolist() == [3.0] * 4 and other.tolist() == [3.0] * 4
    for name, loss in losses.items():
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.backward(loss)
        assert same.grad is None and other.grad is None, name


def test_a_load_receives_tensors_straight_into_the_state_dict_holding_no_copy_of_their_bytes(store: StoreCase) -> None:
    """Items whose target takes their bytes as they are (same dtype and shape, contiguous) are
    written into the target's memory as they arrive, their CRC32 taken meanwhile: the load holds no
    copy of them (the range of this 16 MiB tensor would otherwise be held whole), and the values
    that come back are the saved ones, in the state dict's own tensors. Items beside them in the
    same range that need converting still come back converted."""
    import tracemalloc

    generator = torch.Generator().manual_seed(5)
    saved: dict[str, Any] = {
        "big": torch.randn(4 * 1024 * 1024, generator=generator),  # 16 MiB
        "small": torch.randn(7, 3, generator=generator),
        "converted": torch.randn(9, generator=generator),
        "blob": io.BytesIO(b"x" * 1000),
    }
    save(saved, store.uri("ckpt"))
    loaded: dict[str, Any] = {
        "big": torch.zeros(4 * 1024 * 1024),
        "small": torch.zeros(7, 3),
        "converted": torch.zeros(9, dtype=torch.float64),
        "blob": io.BytesIO(),
    }
    memory = {name: loaded[name].data_ptr() for name in ("big", "small", "converted")}
    tracemalloc.start()
    try:
        assert load(loaded, store.uri("ckpt")) is True
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(loaded["big"], saved["big"]) and torch.equal(loaded["small"], saved["small"])
    assert loaded["converted"].dtype == torch.float64 and torch.equal(loaded["converted"], saved["converted"].double())
    assert loaded["blob"].getvalue() == b"x" * 1000
    assert {name: loaded[name].data_ptr() for name in memory} == memory
    assert peak < 4 * 1024 * 1024, f"the load held {peak} bytes at its peak"


def _task_saving_in_the_background(rank: int, port: int, storage: str, out: str) -> None:
    """One rank of 2 calling a task whose attempt 0 fails with a ``wait=False`` save in flight."""
    from checkpointio import TaskEnvironment, ctx

    with gloo_group(rank, 2, port):
        env = TaskEnvironment("dcp-background", storage=storage, run_id="run-1")

        @env.task(retries=1)
        def train() -> int:
            model: dict[str, Any] = {"weight": torch.zeros(6, 4), "step": 0}
            load(model, ctx().checkpoint)
            if ctx().attempt == 0:
                save({"weight": torch.full((6, 4), 5.0), "step": 5}, ctx().checkpoint, wait=False)
                raise RuntimeError("a failure while the save is in flight")
            assert torch.equal(model["weight"], torch.full((6, 4), 5.0))
            return int(model["step"])

        Path(out, f"rank-{rank}").write_text(str(train()))


def test_a_task_retried_while_a_distributed_background_save_runs_waits_for_it_on_every_rank(tmp_path: Any) -> None:
    """The retry's agreement on the next attempt is a collective: run while the save's own
    collectives were, every rank hung. The attempt's end now waits for the save, so the retry
    resumes from it."""
    import torch.multiprocessing as mp

    from .conftest import free_port

    mp.spawn(_task_saving_in_the_background, args=(free_port(), str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in (0, 1)] == ["5", "5"]


def test_a_tasks_attempt_ends_once_its_distributed_background_save_is_stored_and_fails_with_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from checkpointio import TaskEnvironment, ctx

    committing = StorageWriter.finish

    def late(self: StorageWriter, metadata: Any, results: Any) -> None:
        time.sleep(0.5)  # the commit comes late: an attempt that did not wait would miss it
        committing(self, metadata, results)

    monkeypatch.setattr(StorageWriter, "finish", late)
    env = TaskEnvironment("dcp-background", storage=str(tmp_path / "store"))
    seen: list[tuple[int | None, bool, int]] = []

    @env.task(retries=2)
    def train() -> int:
        model: dict[str, Any] = {"weight": torch.zeros(3), "step": 0}
        seen.append((ctx().attempt, load(model, ctx().checkpoint), int(model["step"])))
        if ctx().attempt == 0:  # fails while its save is in flight: the retry resumes from it
            save({"weight": torch.ones(3), "step": 5}, ctx().checkpoint, wait=False)
            raise RuntimeError("a failure while the save is in flight")
        if ctx().attempt == 1:  # returns, but its save fails: retried like any failure
            save({"weight": torch.ones(3), "step": 6, "zz": FailsToSave()}, ctx().checkpoint, wait=False)
        return int(model["step"])

    assert train() == 5
    assert seen == [(0, False, 0), (1, True, 5), (2, True, 5)]


def _one_rank_cannot_list(rank: int, port: int, storages: list[str], out: str) -> None:
    from checkpointio import CheckpointError, TaskEnvironment

    from .torchrun import act_as_torchrun_rank

    act_as_torchrun_rank(rank, port, "listing-run")
    outcome: Any = None
    with gloo_group(rank, 2, port):
        # each rank its own storage, as two nodes configured differently: rank 1's bucket is missing
        env = TaskEnvironment("listing", storage=storages[rank])

        @env.task(retries=1)
        def step() -> int:
            return 1

        try:
            outcome = step()
        except CheckpointError as error:
            outcome = [type(error).__name__, str(error)]
    Path(out, f"rank-{rank}.json").write_text(json.dumps(outcome))


def test_a_task_whose_store_one_rank_cannot_list_fails_on_every_rank(tmp_path: Any, moto_server: Any) -> None:
    from .conftest import free_port
    from .torchrun import run_group

    storages = [f"s3://{moto_server.new_bucket()}/runs", f"s3://missing-{uuid.uuid4().hex[:12]}/runs"]
    run_group(_one_rank_cannot_list, (free_port(), storages, str(tmp_path)))

    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    kind, message = ranks[1]
    assert kind == "BucketNotFoundError" and "missing-" in message
    assert ranks[0] == [kind, f"rank 1: {message}"]  # rank 0 neither claimed nor ran the task
    assert not list(moto_server.client().list_objects_v2(Bucket=storages[0][5:].split("/")[0]).get("Contents", []))
