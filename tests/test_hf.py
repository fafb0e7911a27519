"""Hugging Face Trainer: a run killed part-way resumes under @env.task with the same steps and identical weights.

A tiny BERT built from a config (no download) trains on the CPU for a few steps.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from checkpointio import (
    AccessDeniedError,
    BackgroundSaveError,
    Checkpoint,
    DestinationError,
    NoCheckpointError,
    StoreError,
    TaskEnvironment,
    ctx,
)

from .conftest import ProxiedBucket, StoreCase, snapshot
from .scripts import restore_into_read_only, run_script
from .syscalls import COUNTED, writes_so_far

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a tiny model built from a config: nothing to download
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
import transformers

from checkpointio._training import run_of, write_ledger
from checkpointio.hf import CheckpointioTrainerCallback, checkpoint_folders

STEPS = 12


class Data(torch.utils.data.Dataset[dict[str, Any]]):
    """24 token sequences with binary labels, the same every time."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 32, (24, 6), generator=generator)
        self.labels = torch.randint(0, 2, (24,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def tiny_model() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    config.num_labels = 2
    return transformers.BertForSequenceClassification(config)


def make_trainer(output_dir: Path, callbacks: list[Any], *, max_steps: int = STEPS, save_steps: int = 4) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,  # 6 steps per epoch: the data is shuffled anew each epoch
        learning_rate=1e-2,
        seed=0,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        logging_strategy="no",
        disable_tqdm=True,
    )
    return transformers.Trainer(model=tiny_model(), args=args, train_dataset=Data(), callbacks=callbacks)


class CrashAt(transformers.TrainerCallback):
    """Kills the first attempt after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if ctx().attempt == 0 and state.global_step == self.step:
            raise RuntimeError(f"node lost at step {self.step}")


class Listing(transformers.TrainerCallback):
    """Records the checkpoint folders in output_dir after each save (it runs after the saver)."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seen.append(names(checkpoint_folders(args.output_dir)))


def names(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def stored_folders(uri: str, workspace: Path) -> list[str]:
    """The checkpoint folders of the tree stored at ``uri``, oldest step first."""
    with Checkpoint(workspace / "reader", src=uri) as reader:
        restored = reader.load_sync()
        assert restored is not None
        return names(checkpoint_folders(restored))


def weights(trainer: Any) -> dict[str, Any]:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def test_importing_checkpointio_does_not_import_transformers() -> None:
    code = "import sys, checkpointio; assert 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_killed_trainer_run_resumes_with_the_same_steps_and_identical_weights(
    store: StoreCase, tmp_path: Path
) -> None:
    plain = make_trainer(tmp_path / "plain", [])
    plain.train()
    expected_steps, expected_weights = plain.state.global_step, weights(plain)
    resumed: list[str | None] = []
    dests: list[str] = []

    @TaskEnvironment("hf", storage=store.uri("runs")).task(retries=1)
    def train() -> tuple[int, dict[str, Any]]:
        saver = CheckpointioTrainerCallback(keep_last=2)
        trainer = make_trainer(tmp_path / "out", [saver, CrashAt(step=10)])  # saves at 4 and 8, dies at 10
        resumed.append(saver.resume_from_checkpoint)
        dests.append(saver.checkpoint.dest)
        trainer.train(resume_from_checkpoint=saver.resume_from_checkpoint)
        assert names(checkpoint_folders(tmp_path / "out")) == ["checkpoint-8", "checkpoint-12"]
        return trainer.state.global_step, weights(trainer)

    steps, trained = train()
    assert resumed == [None, str(tmp_path / "out" / "checkpoint-8")]
    assert steps == expected_steps == STEPS
    assert trained.keys() == expected_weights.keys()
    assert all(torch.equal(trained[name], value) for name, value in expected_weights.items())
    assert stored_folders(dests[1], tmp_path) == ["checkpoint-8", "checkpoint-12"]


@pytest.mark.parametrize("background", [True, False], ids=["background", "synchronous"])
def test_keep_last_leaves_the_newest_folders_locally_and_in_the_store(background: bool, tmp_path: Path) -> None:
    listing = Listing()
    with Checkpoint(tmp_path / "store" / "run") as cp:
        saver = CheckpointioTrainerCallback(cp, keep_last=2, background=background)
        trainer = make_trainer(tmp_path / "out", [saver, listing], max_steps=10, save_steps=2)
        assert saver.resume_from_checkpoint is None
        trainer.train(resume_from_checkpoint=saver.resume_from_checkpoint)
        assert saver.last is not None and saver.last.done() and saver.last.succeeded()  # on_train_end waited
    expected = [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"], ["checkpoint-4", "checkpoint-6"]]
    expected += [["checkpoint-6", "checkpoint-8"], ["checkpoint-8", "checkpoint-10"]]
    assert listing.seen == expected  # by step: checkpoint-10 is newer than checkpoint-8
    assert stored_folders(cp.dest, tmp_path) == ["checkpoint-8", "checkpoint-10"]


def first_run(tmp_path: Path) -> str:
    """A run that stored checkpoint-2 and checkpoint-4; returns its URI."""
    with Checkpoint(tmp_path / "store" / "attempt-0") as cp:
        trainer = make_trainer(
            tmp_path / "first", [CheckpointioTrainerCallback(cp, keep_last=None)], max_steps=4, save_steps=2
        )
        trainer.train()
    assert stored_folders(cp.dest, tmp_path) == ["checkpoint-2", "checkpoint-4"]
    return cp.dest


def test_the_resumed_folder_stays_until_a_newer_save_is_stored(tmp_path: Path) -> None:
    src = first_run(tmp_path)
    listing = Listing()
    with Checkpoint(tmp_path / "store" / "attempt-1", src=src) as cp:
        saver = CheckpointioTrainerCallback(cp, keep_last=1)
        trainer = make_trainer(tmp_path / "out", [saver, listing], max_steps=8, save_steps=2)
        assert saver.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-4")
        trainer.train(resume_from_checkpoint=saver.resume_from_checkpoint)
    # keep_last=1, yet checkpoint-4 stays beside checkpoint-6 until the save holding checkpoint-6 is stored.
    assert listing.seen == [["checkpoint-4", "checkpoint-6"], ["checkpoint-8"]]
    assert trainer.state.global_step == 8
    assert stored_folders(cp.dest, tmp_path) == ["checkpoint-8"]


def test_a_failed_save_keeps_the_resumed_folder_and_fails_the_next_save(
    proxied_bucket: ProxiedBucket, tmp_path: Path
) -> None:
    src = first_run(tmp_path)
    refused = proxied_bucket.refuse_upload("attempt-1")  # the save holding checkpoint-6
    with Checkpoint(proxied_bucket.uri("attempt-1"), src=src, **proxied_bucket.options) as cp:
        saver = CheckpointioTrainerCallback(cp, keep_last=1)
        trainer = make_trainer(tmp_path / "out", [saver], max_steps=8, save_steps=2)
        with pytest.raises(BackgroundSaveError, match="access denied") as caught:
            trainer.train(resume_from_checkpoint=saver.resume_from_checkpoint)
        assert isinstance(caught.value.__cause__, AccessDeniedError)
        assert trainer.state.global_step == 8  # raised by the save at step 8, which did not start
        # checkpoint-6 was never stored, so the folder the run resumed from is still there.
        assert names(checkpoint_folders(tmp_path / "out")) == ["checkpoint-4", "checkpoint-8"]
    assert refused.hits == 1
    assert proxied_bucket.stored("attempt-1") is None
    assert stored_folders(src, tmp_path) == ["checkpoint-2", "checkpoint-4"]


def test_a_failure_of_the_last_background_save_surfaces_at_train_end(
    proxied_bucket: ProxiedBucket, tmp_path: Path
) -> None:
    refused = proxied_bucket.refuse_upload("run", nth=2)  # the save holding checkpoint-4
    with Checkpoint(proxied_bucket.uri("run"), **proxied_bucket.options) as cp:
        saver = CheckpointioTrainerCallback(cp, keep_last=2)
        trainer = make_trainer(tmp_path / "out", [saver], max_steps=4, save_steps=2)
        with pytest.raises(AccessDeniedError, match="access denied") as caught:
            trainer.train()
        assert "on_train_end" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
        assert trainer.state.global_step == 4
        cp.close()  # retrieved through the handle: not raised again
    assert refused.hits == 1
    assert stored_folders(cp.dest, tmp_path) == ["checkpoint-2"]  # the store keeps the previous save


def test_a_restore_replaces_the_checkpoint_folders_and_picks_the_highest_step(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for step in (9, 10):
        (tree / f"checkpoint-{step}").mkdir(parents=True)
        (tree / f"checkpoint-{step}" / "trainer_state.json").write_text(f"stored {step}")
    Checkpoint(tmp_path / "store" / "attempt-0").save_sync(tree)
    out = tmp_path / "out"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "trainer_state.json").write_text("half-written by the failed attempt")
    (out / "checkpoint-10" / "optimizer.pt").write_text("not stored")
    (out / "checkpoint-12").mkdir()  # written locally by the failed attempt, never stored
    write_ledger(out, {"checkpoint-10": str(tmp_path / "store"), "checkpoint-12": str(tmp_path / "store")})
    (out / "notes.txt").write_text("mine")
    with Checkpoint(tmp_path / "store" / "attempt-1", src=tmp_path / "store" / "attempt-0") as cp:
        saver = CheckpointioTrainerCallback(cp)
        make_trainer(out, [saver])
        assert saver.resume_from_checkpoint == str(out / "checkpoint-10")  # by step: 10 > 9
        assert saver.resume_from_checkpoint == str(out / "checkpoint-10")  # restored once
        assert saver.resumed_from == out / "checkpoint-10"
    assert names(checkpoint_folders(out)) == ["checkpoint-9", "checkpoint-10"]
    assert sorted(path.name for path in (out / "checkpoint-10").iterdir()) == ["trainer_state.json"]
    assert (out / "checkpoint-10" / "trainer_state.json").read_text() == "stored 10"
    assert (out / "notes.txt").read_text() == "mine"


def test_a_first_attempt_starts_clean_and_misuse_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointioTrainerCallback(keep_last=0)
    with pytest.raises(NoCheckpointError, match="no checkpoint: pass checkpoint="):
        _ = CheckpointioTrainerCallback().checkpoint
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)  # a killed first attempt's, never stored
    with Checkpoint(tmp_path / "store" / "a") as cp:
        write_ledger(out, {"checkpoint-3": run_of(cp.dest)})
        saver = CheckpointioTrainerCallback(cp)
        with pytest.raises(RuntimeError, match="build the Trainer"):
            _ = saver.resume_from_checkpoint
        make_trainer(out, [saver])
        assert saver.output_dir == out
        assert saver.resume_from_checkpoint is None
    assert checkpoint_folders(out) == []
    cp_bytes = Checkpoint(tmp_path / "store" / "bytes")
    cp_bytes.save_sync(b"not a folder")
    with Checkpoint(tmp_path / "store" / "b", src=cp_bytes.dest) as cp:
        saver = CheckpointioTrainerCallback(cp)
        make_trainer(out, [saver])
        with pytest.raises(ValueError, match="not as a Trainer output folder"):
            _ = saver.resume_from_checkpoint


def test_a_restore_refuses_checkpoint_folders_another_run_left_and_changes_nothing(tmp_path: Path) -> None:
    others = tmp_path / "others"
    make_trainer(others, [], max_steps=4, save_steps=2).train()  # the Trainer's own, no checkpointio
    assert names(checkpoint_folders(others)) == ["checkpoint-2", "checkpoint-4"]
    src = first_run(tmp_path)
    for start in (None, src):  # a first attempt, and a retry restoring checkpoint-2 and checkpoint-4
        out = tmp_path / "out"
        shutil.copytree(others, out)
        (out / "checkpoint-9").mkdir()  # and one made by hand
        before = snapshot(out)
        with Checkpoint(tmp_path / "store" / "attempt-1", src=start) as cp:
            saver = CheckpointioTrainerCallback(cp)
            make_trainer(out, [saver])
            foreign = "checkpoint-9" if start else "checkpoint-2, checkpoint-4, checkpoint-9"
            with pytest.raises(DestinationError, match=f"this run did not write: {foreign}; nothing was changed"):
                _ = saver.resume_from_checkpoint
        assert snapshot(out) == before
        shutil.rmtree(out)


def test_a_first_attempt_leaves_the_folders_of_a_run_with_a_sibling_checkpoint(tmp_path: Path) -> None:
    """Checkpoint("store/exp1") and Checkpoint("store/exp2") are two runs: the second, starting in
    the same output_dir, refuses the first's folders instead of taking them for its own and
    deleting them."""
    out = tmp_path / "out"
    with Checkpoint(tmp_path / "store" / "exp1") as cp:
        make_trainer(out, [CheckpointioTrainerCallback(cp, background=False)], max_steps=4, save_steps=2).train()
    assert names(checkpoint_folders(out)) == ["checkpoint-2", "checkpoint-4"]
    before = snapshot(out)
    with Checkpoint(tmp_path / "store" / "exp2") as cp:
        saver = CheckpointioTrainerCallback(cp)
        make_trainer(out, [saver])
        with pytest.raises(
            DestinationError, match="this run did not write: checkpoint-2, checkpoint-4; nothing was changed"
        ):
            _ = saver.resume_from_checkpoint
    assert snapshot(out) == before


def test_retention_removes_only_this_runs_checkpoint_folders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_trainer(out, [], max_steps=6, save_steps=3).train()  # the Trainer's own: checkpoint-3, checkpoint-6
    theirs = snapshot(out)
    with Checkpoint(tmp_path / "store" / "attempt-0") as cp:
        saver = CheckpointioTrainerCallback(cp, keep_last=1, background=False)
        make_trainer(out, [saver], max_steps=8, save_steps=4).train()  # resume_from_checkpoint not read
    assert names(checkpoint_folders(out)) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    after = snapshot(out)
    assert {name: after[name] for name in theirs} == theirs  # the Trainer's own folders, untouched


def test_a_folder_the_trainer_was_writing_when_killed_is_this_runs_on_the_retry(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Checkpoint(tmp_path / "store" / "attempt-0") as cp:
        trainer = make_trainer(out, [CheckpointioTrainerCallback(cp, background=False)], max_steps=4, save_steps=2)
        real_save = trainer._save_checkpoint

        def killed_at_step_4(*args: Any, **kwargs: Any) -> Any:
            if trainer.state.global_step == 4:
                (out / "checkpoint-4").mkdir()  # half-written when the process died
                raise KeyboardInterrupt
            return real_save(*args, **kwargs)

        trainer._save_checkpoint = killed_at_step_4
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    assert names(checkpoint_folders(out)) == ["checkpoint-2", "checkpoint-4"]
    with Checkpoint(tmp_path / "store" / "attempt-1", src=cp.dest) as retry:
        saver = CheckpointioTrainerCallback(retry)
        make_trainer(out, [saver], max_steps=4, save_steps=2)
        assert saver.resume_from_checkpoint == str(out / "checkpoint-2")
    assert names(checkpoint_folders(out)) == ["checkpoint-2"]


def stored_run(tmp_path: Path) -> Path:
    """A stored output folder with checkpoint-9 and checkpoint-10; the store's path."""
    tree = tmp_path / "tree"
    for step in (9, 10):
        (tree / f"checkpoint-{step}" / "nested").mkdir(parents=True)
        (tree / f"checkpoint-{step}" / "trainer_state.json").write_text(f"stored {step}")
        (tree / f"checkpoint-{step}" / "nested" / "weights.bin").write_bytes(os.urandom(1000))
    Checkpoint(tmp_path / "store" / "attempt-0").save_sync(tree)
    return tree


def local_run(out: Path) -> None:
    """What a failed attempt left in the output folder: checkpoint folders that are not empty."""
    for step in (9, 10):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(f"local {step}")
        (out / f"checkpoint-{step}" / "optimizer.pt").write_text("not stored")
    (out / "notes.txt").write_text("mine")


def test_a_restore_from_a_workspace_on_another_filesystem_replaces_non_empty_folders(
    tmp_path: Path, other_filesystem: Path
) -> None:
    tree = stored_run(tmp_path)
    out = tmp_path / "out"
    local_run(out)
    workspace = other_filesystem / "ws"  # the workspace on a tmpfs, the output folder on disk: EXDEV
    with Checkpoint(tmp_path / "store" / "attempt-1", src=tmp_path / "store" / "attempt-0", workspace=workspace) as cp:
        saver = CheckpointioTrainerCallback(cp)
        make_trainer(out, [saver])
        assert saver.resume_from_checkpoint == str(out / "checkpoint-10")
        assert list(workspace.iterdir()) == []  # moved, not copied and left
    (out / "notes.txt").unlink()
    assert snapshot(out) == snapshot(tree)
    # the workspace, and beside it the record of what loads restored there (for a retry's load)
    assert sorted(path.name for path in other_filesystem.iterdir()) == [".ws.checkpointio-restored", "ws"]


def test_a_restore_that_fails_part_way_leaves_the_output_folder_as_it_was(
    tmp_path: Path, other_filesystem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the second folder is copied over from another filesystem: every old
    folder is still there, whole, and nothing new or half-copied is."""
    stored_run(tmp_path)
    out = tmp_path / "out"
    local_run(out)
    before = snapshot(out)
    real_copyfile = shutil.copyfile
    copied: list[str] = []

    def copyfile(source: Any, target: Any, **kwargs: Any) -> Any:
        copied.append(os.fspath(source))
        if "checkpoint-9" in copied[-1] and copied[-1].endswith("weights.bin"):
            raise OSError(28, "No space left on device")
        return real_copyfile(source, target, **kwargs)

    with Checkpoint(
        tmp_path / "store" / "attempt-1", src=tmp_path / "store" / "attempt-0", workspace=other_filesystem / "ws"
    ) as cp:
        saver = CheckpointioTrainerCallback(cp)
        make_trainer(out, [saver])
        cp.load_sync()
        monkeypatch.setattr(shutil, "copyfile", copyfile)
        with pytest.raises(
            StoreError, match=rf"could not put the restored checkpoint folders in place in {re.escape(str(out))}"
        ):
            _ = saver.resume_from_checkpoint
        monkeypatch.undo()
        assert cp.path is not None and (cp.path / "checkpoint-9").is_dir()  # the restore is kept
    assert snapshot(out) == before
    assert any("checkpoint-10" in path for path in copied)  # the other folder was copied before


def test_a_file_where_the_output_folder_must_be_is_a_destination_error_and_the_restore_is_kept(
    tmp_path: Path,
) -> None:
    tree = stored_run(tmp_path)
    (tmp_path / "in-the-way").write_text("a file where the output folder's parent must be")
    with Checkpoint(
        tmp_path / "store" / "attempt-1", src=tmp_path / "store" / "attempt-0", workspace=tmp_path / "ws"
    ) as cp:
        saver = CheckpointioTrainerCallback(cp)
        saver.output_dir = tmp_path / "in-the-way" / "out"  # as on_init_end learns it from the Trainer
        with pytest.raises(DestinationError, match="in-the-way/out") as caught:
            _ = saver.resume_from_checkpoint
        assert f"the restored files are still in {tmp_path / 'ws'}" in str(caught.value)
        assert snapshot(tmp_path / "ws") == snapshot(tree)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
def test_an_output_folder_without_write_permission_is_an_access_error_and_the_restore_is_kept(
    tmp_path: Path,
) -> None:
    stored_run(tmp_path)
    out = tmp_path / "out"
    local_run(out)
    before = snapshot(out)
    message, kept = restore_into_read_only(
        out,
        tmp_path,
        f"""
        from checkpointio.hf import CheckpointioTrainerCallback
        saver = CheckpointioTrainerCallback(cp)
        saver.output_dir = Path({str(out)!r})
        saver.resume_from_checkpoint
        """,
    )
    assert f"could not put the restored checkpoint folders in place in {out}: Permission denied" in message
    assert kept == ["checkpoint-10", "checkpoint-9"]
    assert snapshot(out) == before


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
def test_an_output_folder_retention_cannot_list_is_an_access_error_naming_it(tmp_path: Path) -> None:
    # The Trainer can write its checkpoint-<step> folders into a folder it may not read
    # (write and search permission only); retention, which lists them, then fails clearly.
    out = tmp_path / "out"
    (out / "checkpoint-10").mkdir(parents=True)
    out.chmod(0o333)
    try:
        result = run_script(
            f"""
            from types import SimpleNamespace
            from checkpointio import AccessDeniedError, Checkpoint
            from checkpointio.hf import CheckpointioTrainerCallback
            saver = CheckpointioTrainerCallback(Checkpoint({str(tmp_path / "ckpt")!r}), keep_last=1)
            args = SimpleNamespace(output_dir={str(out)!r})
            state = SimpleNamespace(is_world_process_zero=True, global_step=10, best_model_checkpoint=None)
            try:
                saver.on_save(args, state, None)
            except AccessDeniedError as error:
                print(error)
            """,
            tmp_path,
            unprivileged=True,
            HF_HUB_OFFLINE="1",
        )
    finally:
        out.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'ckpt'}: could not list the checkpoint folders in {out}: Permission denied\n"
    assert not (tmp_path / "ckpt").exists()  # nothing saved: the save comes after retention


@pytest.mark.parametrize("pathlib", ["", "import tests.pathlib314"], ids=["pathlib", "pathlib-3.14"])
def test_checkpoint_folders_of_a_folder_it_may_not_list_or_search_is_an_access_error(
    tmp_path: Path, pathlib: str
) -> None:
    # Public, called by users' own resume logic: "none" for a folder it could not list would
    # start the training over; a raw PermissionError would escape the CheckpointError hierarchy.
    unlistable, unsearchable, behind = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out in (unlistable, unsearchable, behind / "out"):
        (out / "checkpoint-3").mkdir(parents=True)
    unlistable.chmod(0o000)  # neither listed nor searched
    unsearchable.chmod(0o644)  # listed, its entries not looked at
    behind.chmod(0o000)  # the output folder's parent: not searched
    try:
        result = run_script(
            f"""
            {pathlib}
            from checkpointio import AccessDeniedError
            from checkpointio.hf import checkpoint_folders
            for out in {[str(unlistable), str(unsearchable), str(behind / "out")]!r}:
                try:
                    print(checkpoint_folders(out))
                except AccessDeniedError as error:
                    print(error.uri, "|", error)
            """,
            tmp_path,
            unprivileged=True,
            HF_HUB_OFFLINE="1",
        )
    finally:
        for folder in (unlistable, unsearchable, behind):
            folder.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{unlistable} | {unlistable}: could not list its checkpoint folders: Permission denied",
        f"{unsearchable} | {unsearchable}: could not list its checkpoint folders: Permission denied "
        f"({unsearchable / 'checkpoint-3'})",
        f"{behind / 'out'} | {behind / 'out'}: could not list its checkpoint folders: Permission denied",
    ]
    assert names(checkpoint_folders(unsearchable)) == ["checkpoint-3"]  # readable again: it lists


@pytest.mark.skipif(not COUNTED, reason="counts system calls through Linux's /proc/self/io")
def test_a_distributed_restore_writes_each_file_at_most_256_kib_per_system_call(tmp_path: Path) -> None:
    """The files of ``output_dir`` a distributed load restores (the model and optimizer, the
    largest) are written in pieces, as every restore's are: see the test of the same name in
    test_checkpoint.py."""
    from checkpointio.hf import _files_planners

    target = tmp_path / "checkpoint-4" / "model.safetensors"
    _, load_files = _files_planners({"model.safetensors": target})
    data = os.urandom(3 * 1024 * 1024 + 5)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="model.safetensors"))
    calls_before, written_before = writes_so_far()
    load_files.load_bytes(item, io.BytesIO(data))
    calls_after, written_after = writes_so_far()
    calls, written = calls_after - calls_before, written_after - written_before
    assert target.read_bytes() == data
    assert written >= len(data) and calls >= len(data) // (256 * 1024), (calls, written)


def test_wrong_settings_are_refused_when_the_callback_is_made() -> None:
    with pytest.raises(TypeError, match=r"checkpoint must be a Checkpoint .*got str: make one with Checkpoint\(uri\)"):
        CheckpointioTrainerCallback("s3://bucket/run")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"keep_last must be an int or None, got float 2.0"):
        CheckpointioTrainerCallback(keep_last=2.0)  # type: ignore[arg-type]
