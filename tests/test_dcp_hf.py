"""The Hugging Face Trainer with 2 processes (DDP over gloo, CPU): every rank's files are stored and restored.

One spawned group runs every scenario (process start-ups are what costs here): an uninterrupted
reference run, then a task whose first attempt fails at step 10 and whose retry resumes from
``checkpoint-8``, once with node-local output folders (each rank its own, as on several nodes)
over a local store, once with one shared output folder over S3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a tiny model built from a config: nothing to download
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpointio import TaskEnvironment, ctx  # noqa: E402
from checkpointio.dcp import StorageReader, latest  # noqa: E402
from checkpointio.hf import CheckpointioTrainerCallback, checkpoint_folders  # noqa: E402

from .test_hf import CrashAt, Data, tiny_model  # noqa: E402
from .torchrun import act_as_torchrun_rank, dcp_info_lines, end_group, run_group  # noqa: E402

#: 24 samples, batches of 4 on each of 2 ranks: 3 steps per epoch.
STEPS = 12


def make_trainer(output_dir: Path, callbacks: list[Any], save_steps: int = 4) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        seed=0,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        dataloader_num_workers=0,
        logging_strategy="no",
        disable_tqdm=True,
    )
    return transformers.Trainer(model=tiny_model(), args=args, train_dataset=Data(), callbacks=callbacks)


def train(output_dir: Path, expected: dict[str, Any], seen: list[dict[str, Any]]) -> bool:
    """One attempt of the task: fails at step 10 the first time; notes what it resumed from."""
    saver = CheckpointioTrainerCallback(keep_last=2)
    trainer = make_trainer(output_dir, [saver, CrashAt(10)])
    resume = saver.resume_from_checkpoint
    restored = Path(resume) if resume is not None else None
    seen.append(
        {
            "attempt": ctx().attempt,
            "resume": None if restored is None else restored.relative_to(output_dir).as_posix(),
            "files": [] if restored is None else sorted(path.name for path in restored.iterdir()),
        }
    )
    trainer.train(resume_from_checkpoint=resume)
    weights = trainer.model.state_dict()
    return all(torch.equal(weights[name], value) for name, value in expected.items())


def _group(rank: int, port: int, storages: dict[str, str], out: str) -> None:
    act_as_torchrun_rank(rank, port, "hf-run")
    work = Path(out)
    report: dict[str, Any] = {}
    lines = dcp_info_lines()
    reference = make_trainer(work / f"reference-{rank}", [], save_steps=1000)
    reference.train()
    expected = {name: value.clone() for name, value in reference.model.state_dict().items()}

    for layout, storage in storages.items():
        # node-local: each rank its own output_dir, as on two nodes; shared: one for both ranks
        output_dir = work / layout / (f"node-{rank}" if layout == "node-local" else "shared") / "out"
        seen: list[dict[str, Any]] = []
        task = TaskEnvironment("hf", storage=storage).task(retries=1)(train)
        report[layout] = {
            "identical": task(output_dir, expected, seen),
            "seen": seen,
            "folders": [path.name for path in checkpoint_folders(output_dir)],
        }
    report["loaded lines"] = [line for line in lines if line.startswith("loaded")]
    (work / f"rank-{rank}.json").write_text(json.dumps(report))
    end_group()  # the group the framework made, ended alike on every rank


def test_every_ranks_files_are_stored_and_a_retried_run_resumes_on_every_node(tmp_path: Path, moto_server: Any) -> None:
    import torch.multiprocessing as mp

    from .conftest import free_port

    bucket = moto_server.new_bucket()
    storages = {"node-local": str(tmp_path / "store"), "shared": f"s3://{bucket}/runs"}
    mp.spawn(_group, args=(free_port(), storages, str(tmp_path)), nprocs=2, join=True)

    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    # each retry's restore says so once, on rank 0
    assert reports[0]["loaded lines"] == [
        f"loaded distributed checkpoint {storage}/hf/train/hf-run/attempt-0" for storage in storages.values()
    ]
    assert reports[1]["loaded lines"] == []
    for rank, report in enumerate(reports):
        for layout in storages:
            run = report[layout]
            assert run["identical"] is True, (rank, layout)  # as if never interrupted
            first, second = run["seen"]
            assert (first["attempt"], first["resume"]) == (0, None)
            assert (second["attempt"], second["resume"]) == (1, "checkpoint-8"), (rank, layout)
            # every file of the checkpoint on every node: the model rank 0 wrote, each rank's RNG state
            assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_0.pth"} <= set(
                second["files"]
            ), (rank, layout, second["files"])
            assert "rng_state_1.pth" in second["files"], (rank, layout, second["files"])
            assert run["folders"] == ["checkpoint-8", "checkpoint-12"]

    for storage in storages.values():  # the retry's checkpoint: one object per rank, both ranks' files
        metadata = StorageReader(f"{storage}/hf/train/hf-run/attempt-1").read_metadata()
        names = set(metadata.state_dict_metadata)
        assert {"checkpoint-12/rng_state_0.pth", "checkpoint-12/rng_state_1.pth"} <= names
        assert {"checkpoint-12/model.safetensors", "checkpoint-8/model.safetensors"} <= names
        objects = {one.object for one in metadata.storage_data.values()}
        assert len({name.rpartition("/")[2] for name in objects}) == 2  # rank-0 and rank-1


def _one_rank_fails(rank: int, port: int, work: str) -> None:
    from types import SimpleNamespace

    from checkpointio import Checkpoint, CheckpointError

    from .torchrun import gloo_group

    root = Path(work)
    out = root / f"node-{rank}" / "out"  # node-local output folders, as on two nodes
    outcome: dict[str, Any] = {}
    with gloo_group(rank, 2, port):
        saver = CheckpointioTrainerCallback(Checkpoint(str(root / "store" / "ck")), background=False)
        saver.output_dir = out
        if rank == 1:  # another run's folder, on rank 1's node only: its restore refuses
            (out / "checkpoint-3").mkdir(parents=True)
        try:
            outcome["restore"] = saver.resume_from_checkpoint
        except CheckpointError as error:
            outcome["restore"] = [type(error).__name__, str(error)]

        # a save whose ledger cannot be written on rank 1 alone: before the Trainer writes
        # checkpoint-4 (on_step_end names it in the ledger), then once it has (on_save)
        args = SimpleNamespace(output_dir=str(out))
        state = SimpleNamespace(global_step=4, is_world_process_zero=rank == 0, best_model_checkpoint=None)
        ledger = out / ".checkpointio-written.json"
        for when in ("step end", "save"):
            if rank == 1:
                ledger.unlink(missing_ok=True)
                ledger.mkdir()
            try:
                if when == "step end":
                    saver.on_step_end(args, state, SimpleNamespace(should_save=True))  # type: ignore[arg-type]
                else:
                    (out / "checkpoint-4").mkdir(parents=True, exist_ok=True)
                    (out / "checkpoint-4" / f"rng_state_{rank}.pth").write_bytes(b"rank %d" % rank)
                    saver.on_save(args, state, SimpleNamespace())  # type: ignore[arg-type]
                outcome[when] = "done"
            except CheckpointError as error:
                outcome[when] = [type(error).__name__, str(error)]
            if rank == 1:
                ledger.rmdir()
    (root / f"rank-{rank}.json").write_text(json.dumps(outcome))


def test_a_step_failing_on_one_rank_fails_on_every_rank_and_none_is_left_waiting(tmp_path: Path) -> None:
    from .conftest import free_port

    run_group(_one_rank_fails, (free_port(), str(tmp_path)))

    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    # the restore: rank 1 refuses its foreign folder; rank 0 raises the same kind of error, naming rank 1
    kind, message = ranks[1]["restore"]
    assert kind == "DestinationError" and "checkpoint-3" in message
    assert ranks[0]["restore"] == ["DestinationError", f"rank 1: {message}"]
    # the save: rank 1 cannot write its ledger; neither rank stores anything, and both say why
    for when in ("step end", "save"):
        kind, message = ranks[1][when]
        assert "ledger" in message, when
        assert ranks[0][when] == [kind, f"rank 1: {message}"], when
    assert latest(str(tmp_path / "store")) is None
