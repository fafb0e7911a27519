"""The tutorial's "Complete Example", made to work: a counter that crashes once and resumes.

The tutorial fails at the absolute step 5 *before* saving, on every attempt, so it can never
succeed. Here only the first attempt crashes, and the retry resumes from the last saved step.

    python examples/persistent_counter.py [--target 8] [--crash-at 5] [--step-seconds 0]

With ``CHECKPOINTIO_RUN_ID`` set, a process killed outright (SIGKILL) and started again continues
the same run from its last save.
"""

from __future__ import annotations

import argparse
import time

from checkpointio import TaskEnvironment, ctx

env = TaskEnvironment("examples")


@env.task(retries=5)
def persistent_counter(target: int, crash_at: int | None = 5, step_seconds: float = 0.0) -> int:
    """Count to ``target``, saving after every step."""
    context = ctx()
    checkpoint = context.checkpoint  # with retries=0 a NoCheckpointError (the tutorial silently returned 0)
    previous = checkpoint.load_sync()
    count = int(previous.read_text()) if previous else 0
    if previous:
        print(f"attempt {context.attempt} resumed from {count}", flush=True)
    else:
        print(f"attempt {context.attempt} starts from 0", flush=True)
    while count < target:
        count += 1
        time.sleep(step_seconds)  # stands in for real work
        if context.attempt == 0 and count == crash_at:  # fail on the first attempt only
            raise RuntimeError(f"simulated failure at step {count}")
        checkpoint.save_sync(str(count).encode())
        print(f"saved step {count}", flush=True)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, default=8)
    parser.add_argument("--crash-at", type=int, default=5, help="step at which attempt 0 fails (0: never)")
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args()
    result = persistent_counter(args.target, args.crash_at or None, args.step_seconds)
    print(f"finished: counted to {result}", flush=True)


if __name__ == "__main__":
    main()
