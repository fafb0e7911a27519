"""Lightning: a run killed part-way resumes under @env.task with the same steps and identical weights."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from checkpointio import Checkpoint, DestinationError, StoreError, TaskEnvironment, ctx

from .conftest import StoreCase, snapshot
from .placing import fail_placing_onto
from .scripts import restore_into_read_only

pytest.importorskip("torch")
pytest.importorskip("lightning.pytorch")

import lightning.pytorch as L
import torch

from checkpointio.lightning import CheckpointioCallback, CheckpointioIO

from .lightning_parts import Tiny, loader

EPOCHS = 4


class CrashAt(L.Callback):
    """Kills the first attempt part-way through an epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if ctx().attempt == 0 and trainer.global_step == self.step:
            raise RuntimeError(f"node lost at step {self.step}")


def trainer(callbacks: list[Any], **kwargs: Any) -> Any:
    settings: dict[str, Any] = {
        "max_epochs": EPOCHS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
    }
    return L.Trainer(callbacks=callbacks, **{**settings, **kwargs})


def uninterrupted() -> tuple[int, dict[str, Any]]:
    model = Tiny()
    run = trainer([])
    run.fit(model, loader())
    return run.global_step, model.state_dict()


def test_a_killed_lightning_run_resumes_with_the_same_steps_and_identical_weights(store: StoreCase) -> None:
    expected_steps, expected_weights = uninterrupted()
    resumed: list[str | None] = []

    @TaskEnvironment("lightning", storage=store.uri("runs")).task(retries=1)
    def train() -> tuple[int, dict[str, Any]]:
        saver = CheckpointioCallback(keep_last=2)
        model = Tiny()
        run = trainer([saver, CrashAt(step=15)])  # 6 steps per epoch: dies in the third epoch
        ckpt_path = saver.ckpt_path
        resumed.append(ckpt_path)
        run.fit(model, loader(), ckpt_path=ckpt_path)
        kept = sorted(path.name for path in saver.dirpath.glob("*.ckpt"))
        assert kept == ["epoch=2-step=18.ckpt", "epoch=3-step=24.ckpt"]
        return run.global_step, model.state_dict()

    steps, weights = train()
    assert resumed[0] is None and resumed[1] is not None and resumed[1].endswith("epoch=1-step=12.ckpt")
    assert steps == expected_steps == EPOCHS * 6
    assert all(torch.equal(weights[name], value) for name, value in expected_weights.items())


def test_the_checkpoint_io_plugin_stores_lightnings_files(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for background in (True, False):
        cp = Checkpoint(tmp_path / f"store-{background}")
        plugin = CheckpointioIO(cp, background=background)
        files = tmp_path / f"files-{background}"
        saver = ModelCheckpoint(dirpath=files, save_top_k=-1, every_n_epochs=1)
        trainer([saver], plugins=[plugin], enable_checkpointing=True).fit(Tiny(), loader())
        cp.close()
        with Checkpoint(tmp_path / "reader", src=cp.dest) as reader:
            restored = reader.load_sync()
            assert restored is not None
            names = sorted(path.name for path in restored.glob("*.ckpt"))
        assert names == sorted(path.name for path in files.glob("*.ckpt")) and len(names) == EPOCHS


def stored_and_local(tmp_path: Path) -> tuple[Path, Path]:
    """A stored folder of .ckpt files, and a dirpath a failed attempt left with the same names
    (a subfolder that is not empty among them) and one of its own; (stored tree, dirpath)."""
    tree = tmp_path / "tree"
    (tree / "fold-1").mkdir(parents=True)
    (tree / "epoch=0-step=6.ckpt").write_bytes(b"stored epoch 0")
    (tree / "epoch=1-step=12.ckpt").write_bytes(b"stored epoch 1")
    (tree / "fold-1" / "epoch=1-step=12.ckpt").write_bytes(b"stored fold 1")
    Checkpoint(tmp_path / "store" / "attempt-0").save_sync(tree)
    dirpath = tmp_path / "ckpts"
    (dirpath / "fold-1").mkdir(parents=True)
    (dirpath / "epoch=0-step=6.ckpt").write_bytes(b"local epoch 0")
    (dirpath / "epoch=1-step=12.ckpt").write_bytes(b"local epoch 1")
    (dirpath / "fold-1" / "epoch=0-step=6.ckpt").write_bytes(b"local fold 1")
    (dirpath / "notes.txt").write_text("mine")
    return tree, dirpath


def test_a_restore_from_a_workspace_on_another_filesystem_replaces_non_empty_folders(
    tmp_path: Path, other_filesystem: Path
) -> None:
    tree, dirpath = stored_and_local(tmp_path)
    workspace = other_filesystem / "ws"  # the workspace on a tmpfs, dirpath on disk: EXDEV
    with Checkpoint(tmp_path / "store" / "attempt-1", src=tmp_path / "store" / "attempt-0", workspace=workspace) as cp:
        saver = CheckpointioCallback(cp, dirpath=dirpath)
        assert saver.ckpt_path is not None and Path(saver.ckpt_path).parent in (dirpath, dirpath / "fold-1")
        assert list(workspace.iterdir()) == []  # moved, not copied and left
    assert (dirpath / "notes.txt").read_text() == "mine"  # not in the checkpoint: left alone
    (dirpath / "notes.txt").unlink()
    assert snapshot(dirpath) == snapshot(tree)  # fold-1 replaced whole, not merged
    # the workspace, and beside it the record of what loads restored there (for a retry's load)
    assert sorted(path.name for path in other_filesystem.iterdir()) == [".ws.checkpointio-restored", "ws"]


def test_a_restore_that_fails_part_way_leaves_dirpath_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second entry cannot be renamed into place (one filesystem): the first goes back too."""
    _, dirpath = stored_and_local(tmp_path)
    before = snapshot(dirpath)
    with Checkpoint(
        tmp_path / "store" / "attempt-1", src=tmp_path / "store" / "attempt-0", workspace=tmp_path / "ws"
    ) as cp:
        saver = CheckpointioCallback(cp, dirpath=dirpath)
        cp.load_sync()
        refused = fail_placing_onto(
            monkeypatch, dirpath / "epoch=1-step=12.ckpt", OSError(28, "No space left on device")
        )
        with pytest.raises(
            StoreError, match=rf"could not put the restored files in place in {re.escape(str(dirpath))}: No space"
        ):
            _ = saver.ckpt_path
        monkeypatch.undo()
        assert refused
        assert cp.path is not None and (cp.path / "epoch=1-step=12.ckpt").read_bytes() == b"stored epoch 1"
    assert snapshot(dirpath) == before


def test_a_file_where_dirpath_must_be_is_a_destination_error_and_the_restore_is_kept(tmp_path: Path) -> None:
    stored_and_local(tmp_path)
    (tmp_path / "in-the-way").write_text("a file where dirpath's parent folder must be")
    with Checkpoint(
        tmp_path / "store" / "attempt-1", src=tmp_path / "store" / "attempt-0", workspace=tmp_path / "ws"
    ) as cp:
        saver = CheckpointioCallback(cp, dirpath=tmp_path / "in-the-way" / "ckpts")
        with pytest.raises(DestinationError, match="in-the-way/ckpts") as caught:
            _ = saver.ckpt_path
        assert f"the restored files are still in {tmp_path / 'ws'}" in str(caught.value)
        assert (tmp_path / "ws" / "epoch=1-step=12.ckpt").read_bytes() == b"stored epoch 1"
        with pytest.raises(DestinationError, match=r"could not create the checkpoint folder .*in-the-way/ckpts"):
            saver.on_train_epoch_end(SimpleNamespace(sanity_checking=False, world_size=1), None)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
def test_a_dirpath_without_write_permission_is_an_access_error_and_the_restore_is_kept(tmp_path: Path) -> None:
    _, dirpath = stored_and_local(tmp_path)
    before = snapshot(dirpath)
    message, kept = restore_into_read_only(
        dirpath,
        tmp_path,
        f"""
        from checkpointio.lightning import CheckpointioCallback
        CheckpointioCallback(cp, dirpath={str(dirpath)!r}).ckpt_path
        """,
    )
    assert f"could not put the restored files in place in {dirpath}: Permission denied" in message
    assert kept == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt", "fold-1"]
    assert snapshot(dirpath) == before


def test_retention_removes_only_the_files_the_callback_writes(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpts"
    (dirpath / "base").mkdir(parents=True)
    mine = {
        "pretrained.ckpt": b"the user's starting weights",
        "base/best.ckpt": b"the user's best run",
        "notes.txt": b"mine",
    }
    for name, data in mine.items():
        (dirpath / name).write_bytes(data)
    with Checkpoint(tmp_path / "store" / "attempt-0") as cp:
        saver = CheckpointioCallback(cp, dirpath=dirpath, keep_last=1, background=False)
        trainer([saver], max_epochs=3).fit(Tiny(), loader())
    for name, data in mine.items():
        assert (dirpath / name).read_bytes() == data
    assert sorted(path.name for path in dirpath.glob("epoch=*.ckpt")) == ["epoch=2-step=18.ckpt"]


def test_two_runs_with_sibling_checkpoints_leave_each_others_files_in_a_shared_folder(tmp_path: Path) -> None:
    """Checkpoint("store/exp1") and Checkpoint("store/exp2") are two runs, not attempts of one: the
    second's retention removes none of the first's files and writes none over them."""
    dirpath = tmp_path / "ckpts"
    with Checkpoint(tmp_path / "store" / "exp1") as cp:
        trainer([CheckpointioCallback(cp, dirpath=dirpath, keep_last=None, background=False)], max_epochs=2).fit(
            Tiny(), loader()
        )
    first = {path.name: path.read_bytes() for path in dirpath.glob("*.ckpt")}
    assert sorted(first) == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt"]
    with Checkpoint(tmp_path / "store" / "exp2") as cp:
        trainer([CheckpointioCallback(cp, dirpath=dirpath, keep_last=1, background=False)], max_epochs=2).fit(
            Tiny(), loader()
        )
    for name, data in first.items():
        assert (dirpath / name).read_bytes() == data
    assert len(list(dirpath.glob("*.ckpt"))) == 3  # run 2 kept its last, under a name of its own


def test_a_ledger_naming_a_path_outside_the_folder_is_ignored(tmp_path: Path) -> None:
    """The ledger comes back from the store with the folder: a name in it that leads out of the
    folder is not one of the callback's files, and retention never removes it."""
    from checkpointio._training import run_of, write_ledger

    dirpath = tmp_path / "ckpts"
    dirpath.mkdir()
    victim = tmp_path / "victim.ckpt"
    victim.write_bytes(b"outside dirpath")
    dest = tmp_path / "store" / "attempt-0"
    write_ledger(dirpath, {"../victim.ckpt": run_of(str(dest))})
    with Checkpoint(dest) as cp:
        trainer([CheckpointioCallback(cp, dirpath=dirpath, keep_last=1, background=False)], max_epochs=2).fit(
            Tiny(), loader()
        )
    assert victim.read_bytes() == b"outside dirpath"


def test_wrong_settings_are_refused_when_the_callback_or_plugin_is_made() -> None:
    with pytest.raises(TypeError, match=r"checkpoint must be a Checkpoint .*got str: make one with Checkpoint\(uri\)"):
        CheckpointioCallback("s3://bucket/run")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"checkpoint must be a Checkpoint .*got str"):
        CheckpointioIO("checkpoints/")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"keep_last must be an int or None, got str '2'"):
        CheckpointioCallback(keep_last="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        CheckpointioCallback(keep_last=0)


def test_retention_leaves_the_files_a_model_checkpoint_writes_in_the_same_folder(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    written: dict[str, bytes] = {}

    class Recording(ModelCheckpoint):
        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            written[Path(filepath).name] = Path(filepath).read_bytes()

    dirpath = tmp_path / "ckpts"
    with Checkpoint(tmp_path / "store" / "attempt-0") as cp:
        saver = CheckpointioCallback(cp, dirpath=dirpath, keep_last=1, background=False)
        # Every third step, keeping every file: names like the callback's, and the same name as its
        # file at the end of each epoch, written first.
        lightnings = Recording(dirpath=dirpath, every_n_train_steps=3, save_top_k=-1)
        trainer([saver, lightnings], max_epochs=3, enable_checkpointing=True).fit(Tiny(), loader())
    steps = range(3, 19, 3)  # 6 steps an epoch: step 6 is the last of epoch 0
    assert sorted(written) == sorted(f"epoch={(step - 1) // 6}-step={step}.ckpt" for step in steps)
    for name, data in written.items():  # each still the file ModelCheckpoint wrote, never replaced
        assert (dirpath / name).read_bytes() == data
    ckpts = sorted(path.name for path in dirpath.glob("*.ckpt"))
    assert ckpts == sorted([*written, "epoch=2-step=18-v1.ckpt"])  # the callback's newest, under a free name


def test_retention_after_a_restart_removes_the_earlier_attempts_files_and_no_one_elses(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpts"
    with Checkpoint(tmp_path / "store" / "attempt-0") as cp:
        saver = CheckpointioCallback(cp, dirpath=dirpath, keep_last=None, background=False)
        trainer([saver], max_epochs=2).fit(Tiny(), loader())
    shutil.rmtree(dirpath)  # a fresh machine: only the store remembers
    dirpath.mkdir()
    (dirpath / "epoch=7-step=0.ckpt").write_bytes(b"another tool's file, named like the callback's")
    src = tmp_path / "store" / "attempt-0"
    with Checkpoint(tmp_path / "store" / "attempt-1", src=src) as cp:
        saver = CheckpointioCallback(cp, dirpath=dirpath, keep_last=1, background=False)
        trainer([saver], max_epochs=4).fit(Tiny(), loader(), ckpt_path=saver.ckpt_path)
    assert sorted(path.name for path in dirpath.glob("*.ckpt")) == ["epoch=3-step=24.ckpt", "epoch=7-step=0.ckpt"]
    assert (dirpath / "epoch=7-step=0.ckpt").read_bytes() == b"another tool's file, named like the callback's"
