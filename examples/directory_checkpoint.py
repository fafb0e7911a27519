"""Tutorial step 4: checkpoint a whole folder and resume from its newest file.

Each epoch writes ``epoch_<n>.json`` into a folder and saves the folder (streamed as tar.gz, no
temporary archive). A retry restores the folder and finds where to resume with
``latest_checkpoint`` (ties in mtime broken by a natural sort: ``epoch_10`` after ``epoch_9``).
Unlike the tutorial's version it really resumes at the next epoch instead of looping from 0.

    python examples/directory_checkpoint.py [--epochs 5] [--crash-in 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from checkpointio import TaskEnvironment, ctx, latest_checkpoint

env = TaskEnvironment("examples")


@env.task(retries=2)
def train(epochs: int, crash_in: int | None = 3) -> dict[str, float]:
    """A stand-in training loop whose state is a folder of per-epoch files."""
    context = ctx()
    checkpoint = context.checkpoint  # a Checkpoint: NoCheckpointError here if the task had retries=0
    work = Path(tempfile.mkdtemp(prefix="checkpointio-train-"))
    try:
        start = 0
        restored = checkpoint.load_sync()  # the restored folder's root, or None
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--crash-in", type=int, default=3)
    args = parser.parse_args()
    print(f"finished: {train(args.epochs, args.crash_in)}", flush=True)


if __name__ == "__main__":
    main()
