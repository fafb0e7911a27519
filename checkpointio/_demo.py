"""The README's main job, shipped in the package so ``checkpointio demo`` works wherever it is installed.

Tasks fail part-way, are retried and resume from their checkpoints; then a process killed outright
(SIGKILL) resumes when it is started again with the same run id. Each task runs in its own process
(``python -m checkpointio._demo TASK ...``), on the embedded local store unless a root is given.
The tasks are the ones of ``examples/`` (persistent_counter, directory_checkpoint, async_task).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ._checkpoint import latest_checkpoint
from ._runtime import TaskEnvironment, ctx, default_storage

__all__ = ["main", "run"]

env = TaskEnvironment("examples")


@env.task(retries=5)
def persistent_counter(target: int, crash_at: int | None = 5, step_seconds: float = 0.0) -> int:
    """Count to ``target``, saving after every step; attempt 0 fails at ``crash_at``."""
    context = ctx()
    checkpoint = context.checkpoint  # a Checkpoint: NoCheckpointError here if the task had retries=0
    previous = checkpoint.load_sync()
    count = int(previous.read_text()) if previous else 0
    if previous:
        print(f"attempt {context.attempt} resumed from {count}", flush=True)
    else:
        print(f"attempt {context.attempt} starts from 0", flush=True)
    while count < target:
        count += 1
        time.sleep(step_seconds)  # stands in for real work
        if context.attempt == 0 and count == crash_at:
            raise RuntimeError(f"simulated failure at step {count}")
        checkpoint.save_sync(str(count).encode())
        print(f"saved step {count}", flush=True)
    return count


@env.task(retries=2)
def train(epochs: int, crash_in: int | None = 3) -> dict[str, float]:
    """A stand-in training loop whose state is a folder of per-epoch files."""
    context = ctx()
    checkpoint = context.checkpoint  # a Checkpoint: NoCheckpointError here if the task had retries=0
    work = Path(tempfile.mkdtemp(prefix="checkpointio-train-"))
    try:
        start = 0
        restored = checkpoint.load_sync()
        last = latest_checkpoint(restored, "epoch_*.json")
        if restored is not None and last is not None:
            shutil.copytree(restored, work, dirs_exist_ok=True)
            start = json.loads(last.read_text())["epoch"] + 1
            print(f"attempt {context.attempt} resumed at epoch {start} from {last.name}", flush=True)
        state: dict[str, float] = {}
        for epoch in range(start, epochs):
            if context.attempt == 0 and epoch == crash_in:
                raise RuntimeError(f"simulated failure in epoch {epoch}")
            state = {"epoch": epoch, "loss": round(1.0 / (epoch + 1), 4)}
            (work / f"epoch_{epoch}.json").write_text(json.dumps(state))
            checkpoint.save_sync(work)
            print(f"saved epoch {epoch}", flush=True)
        return state
    finally:
        shutil.rmtree(work, ignore_errors=True)


@env.task(retries=3)
async def accumulate(target: int) -> int:
    """Sum 1..target, checkpointing the running total; attempt 0 loses its network half-way."""
    context = ctx()
    checkpoint = context.checkpoint  # a Checkpoint: NoCheckpointError here if the task had retries=0
    previous = await checkpoint.load()
    start, total = map(int, previous.read_text().split(",")) if previous else (1, 0)
    if previous:
        print(f"attempt {context.attempt} resumed at {start} with total {total}", flush=True)
    for number in range(start, target + 1):
        await asyncio.sleep(0)
        if context.attempt == 0 and number == target // 2 + 1:
            raise ConnectionError("simulated network failure")
        total += number
        await checkpoint.save(f"{number + 1},{total}".encode())
    return total


def _task(*args: str, environ: dict[str, str]) -> None:
    command = [sys.executable, "-m", "checkpointio._demo", *args]
    subprocess.run(command, env=environ, check=True, stderr=subprocess.STDOUT)


def _killed_and_restarted(environ: dict[str, str]) -> None:
    """Start the counter slowly, SIGKILL it after three saves, start it again with the same run id."""
    run_id = f"demo-{secrets.token_hex(3)}"
    run_environ = {**environ, "CHECKPOINTIO_RUN_ID": run_id}
    command = [sys.executable, "-m", "checkpointio._demo", "counter", "--target", "6", "--crash-at", "0"]
    print(f"   starting run {run_id} (one step every 0.2 s)", flush=True)
    with subprocess.Popen(
        [*command, "--step-seconds", "0.2"], env=run_environ, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(f"   | {line.rstrip()}", flush=True)
            if line.startswith("saved step 3"):
                process.send_signal(signal.SIGKILL)  # no cleanup, no exception: the process is gone
                break
        process.wait()
    print(f"   process killed with SIGKILL (exit status {process.returncode}); starting it again", flush=True)
    result = subprocess.run(command, env=run_environ, stdout=subprocess.PIPE, text=True, check=True)
    for line in result.stdout.splitlines():
        print(f"   | {line}", flush=True)


def run(root: str | None = None) -> None:
    """The whole demo; ``root`` overrides the storage root (else ``CHECKPOINTIO_STORAGE``, else the cache)."""
    environ = dict(os.environ)
    if root:
        environ["CHECKPOINTIO_STORAGE"] = root
    environ.pop("CHECKPOINTIO_RUN_ID", None)  # parts 1-3 are new runs each time
    storage = environ.get("CHECKPOINTIO_STORAGE") or default_storage()
    print(f"Checkpoints are stored under {storage}\n", flush=True)
    print("1. A counter saved as bytes; attempt 0 fails at step 5, attempt 1 resumes:", flush=True)
    _task("counter", "--target", "8", environ=environ)
    print("\n2. A folder of per-epoch files saved as a streamed tar.gz; attempt 0 fails in epoch 3:", flush=True)
    _task("train", "--epochs", "5", environ=environ)
    print("\n3. An async task; attempt 0 loses its network half-way:", flush=True)
    _task("accumulate", "--target", "6", environ=environ)
    print("\n4. A process killed outright, then started again with the same run id:", flush=True)
    _killed_and_restarted(environ)
    print("\nEvery task resumed from its last checkpoint instead of starting over.", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one demo task in this process (what :func:`run` starts as subprocesses)."""
    parser = argparse.ArgumentParser(prog="python -m checkpointio._demo")
    tasks = parser.add_subparsers(dest="task", required=True)
    counter = tasks.add_parser("counter")
    counter.add_argument("--target", type=int, default=8)
    counter.add_argument("--crash-at", type=int, default=5, help="step at which attempt 0 fails (0: never)")
    counter.add_argument("--step-seconds", type=float, default=0.0)
    training = tasks.add_parser("train")
    training.add_argument("--epochs", type=int, default=5)
    training.add_argument("--crash-in", type=int, default=3)
    summing = tasks.add_parser("accumulate")
    summing.add_argument("--target", type=int, default=6)
    args = parser.parse_args(argv)
    if args.task == "counter":
        print(f"finished: counted to {persistent_counter(args.target, args.crash_at or None, args.step_seconds)}")
    elif args.task == "train":
        print(f"finished: {train(args.epochs, args.crash_in)}", flush=True)
    else:
        print(f"finished: total {asyncio.run(accumulate(args.target))}", flush=True)


if __name__ == "__main__":
    main()
