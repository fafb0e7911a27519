"""PyTorch helpers: model + optimizer + step round trips through every store, streamed or in the background."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from checkpointio import Checkpoint, CheckpointError, CorruptCheckpointError

from .conftest import ONE_STORE, StoreCase

pytest.importorskip("torch")

import torch

from checkpointio.torch import load_state, load_state_sync, save_state, save_state_sync


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_importing_checkpointio_does_not_import_torch() -> None:
    code = (
        "import sys, checkpointio; assert 'torch' not in sys.modules and 'lightning' not in sys.modules"
        " and 'checkpointio.dcp' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_state_round_trips_streamed_through_every_store(store: StoreCase) -> None:
    model, optimizer = tiny()
    train_steps(model, optimizer, 3)
    save_state_sync(Checkpoint(store.uri("a")), model, optimizer, step=3, extra={"epoch": 1}, chunk_size=4096)
    restored_model, restored_optimizer = tiny()
    with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        state = load_state_sync(cp, restored_model, restored_optimizer)
    assert state is not None and state["step"] == 3 and state["extra"] == {"epoch": 1}
    assert same_weights(model, restored_model)
    assert restored_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


async def test_background_state_save_keeps_the_weights_at_the_call(store: StoreCase) -> None:
    model, optimizer = tiny()
    train_steps(model, optimizer, 2)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    async with Checkpoint(store.uri("a")) as cp:
        handle = await save_state(cp, model, optimizer, step=2, wait=False)
        train_steps(model, optimizer, 5)  # training goes on while the upload runs
        await handle
    restored, _ = tiny()
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        state = await load_state(cp, restored)
    assert state is not None and state["step"] == 2
    assert all(torch.equal(restored.state_dict()[name], value) for name, value in expected.items())


def test_load_state_without_a_checkpoint_is_none() -> None:
    model, _ = tiny()
    assert load_state_sync(None, model) is None
    with Checkpoint("memory://torch-none/b", src="memory://torch-none/a") as cp:
        assert load_state_sync(cp, model) is None


class _Custom:
    """An object torch.load(weights_only=True) refuses: loading it would run arbitrary code."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_untrusted_objects_are_refused_unless_weights_only_is_turned_off() -> None:
    import pickle

    model = torch.nn.Linear(2, 2)
    with Checkpoint(f"memory://torch-extra-{id(model)}") as cp:
        save_state_sync(cp, model, step=3, extra={"custom": _Custom(7)})
    with Checkpoint(f"memory://reader-{id(model)}", src=cp.dest) as reader, pytest.raises(pickle.UnpicklingError):
        load_state_sync(reader, torch.nn.Linear(2, 2))
    with Checkpoint(f"memory://reader2-{id(model)}", src=cp.dest) as reader:
        restored = torch.nn.Linear(2, 2)
        state = load_state_sync(reader, restored, weights_only=False)
        assert state is not None and state["step"] == 3 and state["extra"]["custom"].value == 7
        assert torch.equal(restored.weight, model.weight)


@ONE_STORE
async def test_the_async_helpers_refuse_a_truth_test_and_name_their_sync_twin(store: StoreCase) -> None:
    model, _ = tiny()
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        with pytest.raises(TypeError, match=r"load_state\(\) returns an awaitable.*call load_state_sync\(\)"):
            if load_state(cp, model):  # the porting trap: always true without the error
                pass
        await save_state(cp, model, step=1)
    async with Checkpoint(store.uri("c"), src=store.uri("b")) as cp:
        state = await load_state(
            cp, torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        )
    assert state is not None and state["step"] == 1


def test_wrong_arguments_are_type_errors_naming_them_before_anything_is_stored() -> None:
    model, optimizer = tiny()
    with Checkpoint("memory://torch-types/a") as cp:
        with pytest.raises(TypeError, match=r"save_state_sync\(\) takes a Checkpoint .*got str"):
            save_state_sync("memory://torch-types/a", model, optimizer)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"load_state_sync\(\) takes a Checkpoint .*got str"):
            load_state_sync("memory://torch-types/a", model)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"model is an optimizer \(Adam\).*swapped"):
            save_state_sync(cp, optimizer, model)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"optimizer is a module \(Sequential\).*swapped"):
            load_state_sync(cp, None, model)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"model .*state_dict.*got OrderedDict: pass the module itself"):
            save_state_sync(cp, model.state_dict(), optimizer)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"step must be a whole number, got str"):
            save_state_sync(cp, model, optimizer, step="3")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"step must be a whole number, got bool"):
            save_state_sync(cp, model, optimizer, step=True)
    assert not cp.prev_exists_sync() and Checkpoint("memory://torch-types/b", src=cp.dest).load_bytes_sync() is None


def test_a_step_of_another_integer_type_is_stored_as_an_int_that_loads_with_weights_only() -> None:
    numpy = pytest.importorskip("numpy")
    model, optimizer = tiny()
    with Checkpoint("memory://torch-step/a") as cp:
        save_state_sync(cp, model, optimizer, step=numpy.int64(7))
    with Checkpoint("memory://torch-step/b", src=cp.dest) as reader:
        state = load_state_sync(reader, *tiny())
    assert state is not None and type(state["step"]) is int and state["step"] == 7


def test_a_checkpoint_without_the_state_asked_for_is_an_error_not_a_silent_fresh_start(tmp_path: Path) -> None:
    """The model (or optimizer) asked for is missing from what was saved: loading nothing into it
    would resume training from the saved step with freshly initialised weights."""
    model, optimizer = tiny()
    with Checkpoint("memory://torch-missing/optimizer-only") as cp:
        save_state_sync(cp, None, optimizer, step=5)
    with Checkpoint("memory://torch-missing/r1", src=cp.dest) as reader:
        with pytest.raises(CheckpointError, match=r"holds no model state \(it holds optimizer, step\)"):
            load_state_sync(reader, *tiny())
        assert load_state_sync(reader, None, tiny()[1]) is not None  # what it holds loads
    with Checkpoint("memory://torch-missing/plain") as cp:  # torch.save(model.state_dict()), not save_state
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        cp.save_sync(buffer.getvalue())
    keys = "0.weight, 0.bias, 2.weight, 2.bias"
    with (
        Checkpoint("memory://torch-missing/r2", src=cp.dest) as reader,
        pytest.raises(CheckpointError, match=rf"holds no model state \(it holds {keys}\)"),
    ):
        load_state_sync(reader, tiny()[0])
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not a torch file")
    with Checkpoint("memory://torch-missing/folder") as cp:
        cp.save_sync(folder)
    with (
        Checkpoint("memory://torch-missing/r3", src=cp.dest) as reader,
        pytest.raises(CheckpointError, match=r"a folder without a \.pt, \.pth or \.ckpt file"),
    ):
        load_state_sync(reader, tiny()[0])


def test_a_checkpoint_that_is_no_torch_file_is_a_corrupt_checkpoint_error() -> None:
    with Checkpoint("memory://torch-foreign/a") as cp:
        cp.save_sync(b"some bytes another program saved")
    with (
        Checkpoint("memory://torch-foreign/b", src=cp.dest) as reader,
        pytest.raises(CorruptCheckpointError, match=r"memory://torch-foreign/a: not a torch.save file"),
    ):
        load_state_sync(reader, tiny()[0])
