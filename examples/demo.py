"""The README's main job: tasks that fail part-way, are retried and resume from their checkpoints,
then a process killed outright (SIGKILL) that resumes when it is started again.

Runs on the embedded local store (no server):

    python examples/demo.py [--root DIR]

``--root`` overrides the storage root (default: ``CHECKPOINTIO_STORAGE``, else
``~/.cache/checkpointio``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from checkpointio import default_storage

HERE = Path(__file__).resolve().parent


def run_example(script: str, *args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, str(HERE / script), *args], env=env, check=True, stderr=subprocess.STDOUT)


def killed_and_restarted(env: dict[str, str]) -> None:
    """Start the counter slowly, SIGKILL it after three saves, start it again with the same run id."""
    run_id = f"demo-{secrets.token_hex(3)}"
    run_env = {**env, "CHECKPOINTIO_RUN_ID": run_id}
    command = [sys.executable, str(HERE / "persistent_counter.py"), "--target", "6", "--crash-at", "0"]
    print(f"   starting run {run_id} (one step every 0.2 s)", flush=True)
    with subprocess.Popen(
        [*command, "--step-seconds", "0.2"], env=run_env, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(f"   | {line.rstrip()}", flush=True)
            if line.startswith("saved step 3"):
                process.send_signal(signal.SIGKILL)  # no cleanup, no exception: the process is gone
                break
        process.wait()
    print(f"   process killed with SIGKILL (exit status {process.returncode}); starting it again", flush=True)
    result = subprocess.run(command, env=run_env, stdout=subprocess.PIPE, text=True, check=True)
    for line in result.stdout.splitlines():
        print(f"   | {line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="storage root (a folder or s3://bucket/prefix)")
    args = parser.parse_args()
    if args.root:
        os.environ["CHECKPOINTIO_STORAGE"] = args.root
    os.environ.pop("CHECKPOINTIO_RUN_ID", None)  # parts 1-3 are new runs each time
    env = dict(os.environ)
    print(f"Checkpoints are stored under {default_storage()}\n", flush=True)

    print("1. A counter saved as bytes; attempt 0 fails at step 5, attempt 1 resumes:", flush=True)
    run_example("persistent_counter.py", "--target", "8", env=env)
    print("\n2. A folder of per-epoch files saved as a streamed tar.gz; attempt 0 fails in epoch 3:", flush=True)
    run_example("directory_checkpoint.py", "--epochs", "5", env=env)
    print("\n3. An async task; attempt 0 loses its network half-way:", flush=True)
    run_example("async_task.py", "--target", "6", env=env)
    print("\n4. A process killed outright, then started again with the same run id:", flush=True)
    killed_and_restarted(env)
    print("\nEvery task resumed from its last checkpoint instead of starting over.", flush=True)


if __name__ == "__main__":
    main()
