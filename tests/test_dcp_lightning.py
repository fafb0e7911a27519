"""Lightning's sharded checkpoints (ModelParallelStrategy: FSDP2) through checkpointio.dcp, 2 ranks on CPU.

One spawned group runs every scenario (process start-ups are what costs here): an uninterrupted
reference fit, then for a local folder, an ``s3://`` prefix and a task's ``ctx().checkpoint``, a
fit that fails part-way and a fresh Trainer, model and strategy resuming from what every rank
stored. The parent checks what the stores hold and loads the last checkpoint in one process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("lightning.pytorch")

import lightning.pytorch as L
import torch

from checkpointio import TaskEnvironment, ctx
from checkpointio.dcp import latest, load
from checkpointio.lightning import CheckpointioModelParallelStrategy

from .lightning_parts import Tiny, loader
from .torchrun import act_as_torchrun_rank, dcp_info_lines, end_group, run_group

EPOCHS = 3
#: 24 samples, batches of 4, split between 2 ranks: 3 steps per epoch.
STEPS_PER_EPOCH = 3
CRASH_AT = 7  # in the third epoch, after the second epoch's checkpoint (step 6)


class Sharded(Tiny):
    """:class:`Tiny` with each linear layer, and the whole, sharded over the data-parallel ranks."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        assert self.device_mesh is not None  # ModelParallelStrategy sets it before configure_model
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class CrashAt(L.Callback):
    """Fails the fit on every rank at ``step`` (a node lost: the whole group stops)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"node lost at step {self.step}")


def fit(strategy: Any, callbacks: list[Any], ckpt_path: str | None, root: Path) -> tuple[Any, Sharded]:
    model = Sharded()
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(one, L.callbacks.ModelCheckpoint) for one in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model


def local_shards(model: Sharded) -> dict[str, Any]:
    return {name: value.to_local().clone() for name, value in model.net.state_dict().items()}


def strategy_for(target: Any) -> CheckpointioModelParallelStrategy:
    return CheckpointioModelParallelStrategy(
        target, data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"
    )


def _group(rank: int, port: int, roots: dict[str, str], out: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    act_as_torchrun_rank(rank, port, "lightning-run")  # Lightning then starts no processes of its own
    work = Path(out)
    report: dict[str, Any] = {}
    lines = dcp_info_lines()
    stock = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    reference_trainer, reference = fit(stock, [], None, work / "reference")
    expected = local_shards(reference)
    if rank == 0:
        full = {name: value.full_tensor() for name, value in reference.net.state_dict().items()}
    else:
        [value.full_tensor() for value in reference.net.state_dict().values()]  # a collective: every rank
    if rank == 0:
        torch.save(full, work / "reference.pt")

    for name, root in roots.items():
        local = work / name  # where ModelCheckpoint believes the files go: nothing is written there
        first = strategy_for(root)
        report[f"{name} first ckpt_path"] = first.ckpt_path
        saver = ModelCheckpoint(dirpath=local, filename="{epoch}-{step}", save_top_k=1, every_n_epochs=1)
        with pytest.raises(RuntimeError, match="node lost at step 7"):
            fit(first, [saver, CrashAt(CRASH_AT)], first.ckpt_path, work / name)
        again = strategy_for(root)  # a restart: new strategy, Trainer and model
        resume_from = again.ckpt_path
        report[f"{name} resumed from"] = resume_from
        saver = ModelCheckpoint(dirpath=local, filename="{epoch}-{step}", save_top_k=1, every_n_epochs=1)
        trainer, model = fit(again, [saver], resume_from, work / name)
        report[f"{name} steps"] = trainer.global_step
        shards = local_shards(model)
        report[f"{name} identical"] = all(torch.equal(shards[key], expected[key]) for key in expected)
        report[f"{name} latest"] = latest(root)
        report[f"{name} local files"] = sorted(os.listdir(local)) if local.exists() else []

    # A task: the strategy saves to ctx().checkpoint; the retry resumes from the failed attempt's.
    attempts: list[tuple[int | None, str | None]] = []

    @TaskEnvironment("sharded", storage=roots["local"] + "-tasks").task(retries=1)
    def train() -> tuple[int, bool]:
        strategy = strategy_for(None)
        attempts.append((ctx().attempt, strategy.ckpt_path))
        callbacks: list[Any] = [ModelCheckpoint(dirpath=work / "task", save_top_k=1, every_n_epochs=1)]
        if ctx().attempt == 0:
            callbacks.append(CrashAt(CRASH_AT))
        trainer, model = fit(strategy, callbacks, strategy.ckpt_path, work / "task")
        shards = local_shards(model)
        return trainer.global_step, all(torch.equal(shards[key], expected[key]) for key in expected)

    report["task"] = train()
    report["task attempts"] = attempts
    report["loaded lines"] = [line for line in lines if line.startswith("loaded")]
    report["reference steps"] = reference_trainer.global_step
    (work / f"rank-{rank}.json").write_text(json.dumps(report))
    end_group()  # the group the framework made, ended alike on every rank


def test_sharded_lightning_checkpoints_are_stored_by_every_rank_and_a_restarted_fit_resumes(
    tmp_path: Path, moto_server: Any
) -> None:
    import torch.multiprocessing as mp

    from .conftest import free_port
    from .test_cli import ok

    bucket = moto_server.new_bucket()
    roots = {"local": str(tmp_path / "store"), "s3": f"s3://{bucket}/run/checkpoints"}
    mp.spawn(_group, args=(free_port(), roots, str(tmp_path)), nprocs=2, join=True)

    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["reference steps"] == EPOCHS * STEPS_PER_EPOCH
        for name, root in roots.items():
            assert report[f"{name} first ckpt_path"] is None  # nothing to resume from at first
            # the second epoch's checkpoint (the first was removed by save_top_k=1)
            assert report[f"{name} resumed from"] == f"{root}/epoch=1-step=6.ckpt"
            assert report[f"{name} steps"] == EPOCHS * STEPS_PER_EPOCH
            assert report[f"{name} identical"] is True  # every rank's shards as if never interrupted
            assert report[f"{name} latest"] == f"{root}/epoch=2-step=9.ckpt"
            assert report[f"{name} local files"] == []  # nothing went to the local dirpath
        assert report["task"] == [EPOCHS * STEPS_PER_EPOCH, True]
        (first, second) = report["task attempts"]
        assert first == [0, None] and second[0] == 1 and second[1].endswith("attempt-0"), report["task attempts"]
    # One line per resume (model, optimizer and Lightning's state loaded through one reader), by rank 0
    task_resume = reports[0]["task attempts"][1][1]
    assert reports[0]["loaded lines"] == [
        *(f"loaded distributed checkpoint {root}/epoch=1-step=6.ckpt" for root in roots.values()),
        f"loaded distributed checkpoint {task_resume}",
    ]
    assert reports[1]["loaded lines"] == []

    for root in roots.values():  # one checkpoint left under each root, saved by both ranks
        (row,) = json.loads(ok("ls", root + "/", "--json"))
        assert (row["uri"], row["kind"], row["world_size"]) == (f"{root}/epoch=2-step=9.ckpt", "distributed", 2)
        ok("verify", row["uri"])

    # Resharding: the 2-rank checkpoint loads in one process into the plain (unsharded) model.
    expected = torch.load(tmp_path / "reference.pt", weights_only=True)
    for root in roots.values():
        plain = {"state_dict": {f"net.{key}": torch.zeros_like(value) for key, value in expected.items()}}
        assert load(plain, f"{root}/epoch=2-step=9.ckpt") is True
        for key, value in expected.items():
            assert torch.equal(plain["state_dict"][f"net.{key}"], value), key


def _ledger_fails_on_rank_0(rank: int, port: int, out: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from checkpointio import Checkpoint, CheckpointError
    from checkpointio.lightning import CheckpointioCallback

    act_as_torchrun_rank(rank, port, "ledger-run")
    work = Path(out)
    dirpath = work / f"node-{rank}"  # node-local folders, as on two nodes
    if rank == 0:  # rank 0's ledger cannot be read: its first epoch's save fails there alone
        (dirpath / ".checkpointio-written.json").mkdir(parents=True)
    saver = CheckpointioCallback(Checkpoint(str(work / "store" / "ck")), dirpath=dirpath, background=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
        callbacks=[saver],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
    )
    outcome: list[str] = []
    try:
        trainer.fit(Tiny(), loader())
    except CheckpointError as error:
        outcome = [type(error).__name__, str(error)]
    (work / f"rank-{rank}.json").write_text(json.dumps(outcome))
    end_group()


def test_a_callback_save_failing_on_one_rank_fails_on_every_rank_and_none_is_left_waiting(tmp_path: Path) -> None:
    from .conftest import free_port

    run_group(_ledger_fails_on_rank_0, (free_port(), str(tmp_path)))

    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    kind, message = ranks[0]
    assert "ledger" in message and ".checkpointio-written.json" in message
    assert ranks[1] == [kind, f"rank 0: {message}"]
    assert not list((tmp_path / "node-0").glob("*.ckpt"))  # the epoch's file was not written
    assert not (tmp_path / "store").exists()  # nor anything stored


class UnpicklableOnRankZero(Sharded):
    """Adds to Lightning's state, on rank 0 only, something ``torch.save`` cannot pickle."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.global_rank == 0:
            checkpoint["callback of rank 0"] = lambda: None


def _state_fails_on_rank_0(rank: int, port: int, out: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from checkpointio import CheckpointError

    act_as_torchrun_rank(rank, port, "unpicklable-run")
    work = Path(out)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy=strategy_for(str(work / "store")),
        callbacks=[ModelCheckpoint(dirpath=work / "local", save_top_k=1, every_n_epochs=1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
    )
    outcome: list[str] = []
    try:
        trainer.fit(UnpicklableOnRankZero(), loader())
    except Exception as error:
        outcome = [type(error).__name__, str(error), str(isinstance(error, CheckpointError))]
    (work / f"rank-{rank}.json").write_text(json.dumps(outcome))
    end_group()


def test_lightning_state_that_fails_to_pickle_on_rank_0_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    from .conftest import free_port

    run_group(_state_fails_on_rank_0, (free_port(), str(tmp_path)))

    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    _, message, _ = ranks[0]
    assert "pickle" in message.lower() or "local object" in message, ranks[0]
    assert ranks[1] == ["CheckpointError", f"rank 0: {message}", "True"]  # not left in dcp.save's collectives
    assert latest(str(tmp_path / "store")) is None  # nothing committed
