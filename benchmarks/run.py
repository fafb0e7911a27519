"""Benchmark: checkpointio against baselines measured in the same run (local store for now).

Prints medians and ratios; asserts nothing about time. ``--quick`` finishes in well under a minute.

    python benchmarks/run.py [--quick] [--tensor-mib N] [--small-files N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from checkpointio import Checkpoint


def make_dataset(root: Path, tensor_mib: int, small_files: int, seed: int = 0) -> int:
    """Float-like noise in a few large files plus many small text files; returns total bytes."""
    rng = random.Random(seed)
    total = 0
    tensors = root / "tensors"
    tensors.mkdir(parents=True)
    for i in range(max(1, tensor_mib // 64)):
        data = rng.randbytes(min(64, tensor_mib) * 1024 * 1024)
        (tensors / f"shard_{i}.bin").write_bytes(data)
        total += len(data)
    small = root / "small"
    for i in range(small_files):
        folder = small / f"d{i % 50}"
        folder.mkdir(parents=True, exist_ok=True)
        text = (f"line {i} " * rng.randint(10, 200)).encode()
        (folder / f"f{i}.txt").write_bytes(text)
        total += len(text)
    return total


def flyte_like_save(src: Path, dest: Path) -> None:
    """tarfile level 9 into a temporary archive, then copy it to the store (flyte's Checkpoint)."""
    with tempfile.NamedTemporaryFile(suffix=".tar.gz", delete=False) as tmp:
        with tarfile.open(tmp.name, "w:gz") as tar:
            tar.add(src, arcname=".")
        shutil.copyfile(tmp.name, dest)
    os.unlink(tmp.name)


def flyte_like_load(src: Path, dest: Path) -> None:
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as tmp:
        shutil.copyfile(src, tmp.name)
        with tarfile.open(tmp.name, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    os.unlink(tmp.name)


def timed(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small dataset, one repetition")
    parser.add_argument("--tensor-mib", type=int, default=256)
    parser.add_argument("--small-files", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.tensor_mib, args.small_files, args.repeat = 64, 1000, 1
    with tempfile.TemporaryDirectory(prefix="checkpointio-bench-") as scratch:
        base = Path(scratch)
        size = make_dataset(base / "data", args.tensor_mib, args.small_files)
        store = base / "store"
        store.mkdir()
        restore_root = base / "restore"
        counter = iter(range(1_000_000))

        def ours_save() -> None:
            Checkpoint(store / "ours").save_sync(base / "data")

        def ours_load() -> None:
            with Checkpoint(store / "x", src=store / "ours", workspace=restore_root / f"o{next(counter)}") as cp:
                cp.load_sync()

        def flyte_save() -> None:
            flyte_like_save(base / "data", store / "flyte.tar.gz")

        def flyte_load() -> None:
            flyte_like_load(store / "flyte.tar.gz", restore_root / f"f{next(counter)}")

        results = {
            ("checkpointio", "save"): timed(ours_save, args.repeat),
            ("checkpointio", "load"): timed(ours_load, args.repeat),
            ("flyte-like (tar level 9 via temp file)", "save"): timed(flyte_save, args.repeat),
            ("flyte-like (tar level 9 via temp file)", "load"): timed(flyte_load, args.repeat),
        }
        mib = size / 1024 / 1024
        print(f"dataset: {mib:.0f} MiB, {args.small_files} small files; local store; median of {args.repeat}")
        print(f"{'pipeline':42} {'op':5} {'seconds':>8} {'MiB/s':>8}")
        for (name, op), seconds in results.items():
            print(f"{name:42} {op:5} {seconds:8.2f} {mib / seconds:8.1f}")
        for op in ("save", "load"):
            ratio = results[("flyte-like (tar level 9 via temp file)", op)] / results[("checkpointio", op)]
            print(f"checkpointio {op} is {ratio:.1f}x the flyte-like baseline")


if __name__ == "__main__":
    main()
