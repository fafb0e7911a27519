"""The async variant: ``await cp.load()`` / ``await cp.save()`` inside an ``async def`` task.

python examples/async_task.py [--target 6]
"""

from __future__ import annotations

import argparse
import asyncio

from checkpointio import TaskEnvironment, ctx

env = TaskEnvironment("examples")


@env.task(retries=3)
async def accumulate(target: int) -> int:
    """Sum 1..target, checkpointing the running total and the next number as bytes."""
    context = ctx()
    checkpoint = context.checkpoint  # a Checkpoint: NoCheckpointError here if the task had retries=0
    previous = await checkpoint.load()
    start, total = map(int, previous.read_text().split(",")) if previous else (1, 0)
    if previous:
        print(f"attempt {context.attempt} resumed at {start} with total {total}", flush=True)
    for number in range(start, target + 1):
        await asyncio.sleep(0)  # stands in for real async work
        if context.attempt == 0 and number == target // 2 + 1:
            raise ConnectionError("simulated network failure")
        total += number
        await checkpoint.save(f"{number + 1},{total}".encode())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", type=int, default=6)
    args = parser.parse_args()
    print(f"finished: total {asyncio.run(accumulate(args.target))}", flush=True)


if __name__ == "__main__":
    main()
