"""The README's main job: a task that fails part-way, is retried, and resumes from its checkpoint.

Runs on the embedded local store (a folder), no server needed:

    python examples/demo.py [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from checkpointio import Checkpoint, latest_checkpoint


class SimulatedCrash(RuntimeError):
    """Stands in for a preempted node, an OOM kill or a flaky dependency."""


def count_to(target: int, cp: Checkpoint, *, crash_at: int | None) -> int:
    """Count to ``target``, saving progress as bytes after every step; resume from the last save."""
    previous = cp.load_sync()
    count = int(previous.read_text()) if previous else 0
    print(f"  attempt starts at {count}" + (" (resumed from its checkpoint)" if previous else " (no checkpoint yet)"))
    while count < target:
        count += 1
        # Fail only after progress since the restore: the tutorial's version fails at the same step on
        # every attempt, before saving, and so can never succeed.
        if crash_at is not None and count == crash_at:
            raise SimulatedCrash(f"simulated crash at step {count}")
        cp.save_sync(str(count).encode())
    return count


def train(epochs: int, cp: Checkpoint, work: Path, *, crash_at: int | None) -> int:
    """Write one file per epoch into a folder and checkpoint the whole folder (a tar.gz stream)."""
    restored = cp.load_sync()
    start = 0
    if restored is not None:
        last = latest_checkpoint(restored, "epoch_*.json")
        if last is not None:
            start = json.loads(last.read_text())["epoch"] + 1
            shutil.copytree(restored, work, dirs_exist_ok=True)
    print(f"  attempt starts at epoch {start}")
    work.mkdir(parents=True, exist_ok=True)
    for epoch in range(start, epochs):
        if crash_at is not None and epoch == crash_at:
            raise SimulatedCrash(f"simulated crash in epoch {epoch}")
        (work / f"epoch_{epoch}.json").write_text(json.dumps({"epoch": epoch, "loss": 1 / (epoch + 1)}))
        cp.save_sync(work)  # only the newest state matters; a failed save never damages the last one
    return epochs


def run_with_retries(name: str, root: Path, retries: int, body) -> int:  # type: ignore[no-untyped-def]
    """Attempt 0, then retries; attempt n saves to its own key and resumes from attempt n-1's."""
    for attempt in range(retries + 1):
        dest = root / name / f"attempt-{attempt}"
        src = root / name / f"attempt-{attempt - 1}" if attempt else None
        with Checkpoint(dest, src=src) as cp:
            try:
                result = body(cp, attempt)
            except SimulatedCrash as crash:
                print(f"  attempt {attempt} failed: {crash}; retrying")
                continue
        print(f"  attempt {attempt} finished: {result}")
        return int(result)
    raise RuntimeError(f"{name}: all {retries + 1} attempts failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="checkpoint folder (default: a new temporary folder)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="checkpointio-demo-"))
    print(f"checkpoints go to {root} (the embedded local store)\n")

    print("1. A counter saved as bytes; the first attempt crashes at step 5:")
    total = run_with_retries(
        "counter", root, 3, lambda cp, attempt: count_to(8, cp, crash_at=5 if attempt == 0 else None)
    )
    assert total == 8

    print("\n2. A folder of per-epoch files saved as a streamed tar.gz; the first attempt crashes in epoch 3:")
    work = Path(tempfile.mkdtemp(prefix="checkpointio-work-"))
    epochs = run_with_retries(
        "training",
        root,
        3,
        lambda cp, attempt: train(5, cp, work / f"attempt-{attempt}", crash_at=3 if attempt == 0 else None),
    )
    assert epochs == 5
    print("\nBoth tasks resumed from their last checkpoint instead of starting over.")


if __name__ == "__main__":
    main()
