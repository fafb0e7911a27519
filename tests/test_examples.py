"""The examples run as documented, each in a fresh process on the local store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, storage: Path, *args: str) -> str:
    env = {**os.environ, "CHECKPOINTIO_STORAGE": str(storage)}
    env.pop("CHECKPOINTIO_RUN_ID", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_persistent_counter_fails_once_then_resumes_from_4(tmp_path: Path) -> None:
    out = run("persistent_counter.py", tmp_path)
    assert "attempt 1 resumed from 4" in out and "finished: counted to 8" in out


def test_directory_checkpoint_resumes_at_the_next_epoch(tmp_path: Path) -> None:
    out = run("directory_checkpoint.py", tmp_path)
    assert "attempt 1 resumed at epoch 3 from epoch_2.json" in out
    assert "finished: {'epoch': 4, 'loss': 0.2}" in out


def test_async_task_resumes_with_its_running_total(tmp_path: Path) -> None:
    out = run("async_task.py", tmp_path)
    assert "attempt 1 resumed at 4 with total 6" in out and "finished: total 21" in out


@pytest.mark.timeout(300)
def test_demo_shows_retries_and_a_resume_after_sigkill(tmp_path: Path) -> None:
    out = run("demo.py", tmp_path, "--root", str(tmp_path / "store"))
    assert "attempt 1 resumed from 4" in out
    assert "process killed with SIGKILL (exit status -9)" in out
    assert "attempt 1 resumed from 3" in out
    assert "Every task resumed from its last checkpoint" in out


def test_torch_example_resumes_at_the_epoch_after_its_last_background_save(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = run("torch_state.py", tmp_path)
    assert "attempt 1 resumed at epoch 3" in out and "finished: loss" in out


def test_lightning_example_resumes_from_its_last_epoch_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    out = run("lightning_resume.py", tmp_path)
    assert "attempt 0 starts from None" in out
    assert "attempt 1 starts from" in out and "epoch=1-step=12.ckpt" in out
    assert "finished after 24 steps" in out


def test_hf_example_resumes_from_its_last_saved_trainer_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = run("hf_resume.py", tmp_path)
    assert "attempt 0 starts from None" in out
    assert "attempt 1 starts from" in out and "checkpoint-8" in out
    assert "finished after 12 steps" in out
