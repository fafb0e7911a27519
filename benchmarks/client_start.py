"""How long creating checkpointio's S3 client takes, with and without its botocore start-up work.

Each variant runs in fresh interpreters, imports done before the clock starts, interleaved so that
a slow phase of the machine hits every variant; the figures are medians over ``--repeat``
processes. "On the event loop" is how long the loop is blocked, "until the client exists" the
whole time. No request is sent.

    python benchmarks/client_start.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import asyncio, json, sys, time
import anyio.to_thread
from aiobotocore.session import AioSession
from botocore.config import Config
from checkpointio._stores._s3 import _loader

variant = sys.argv[1]

def preloaded(profile):
    session = AioSession(profile=profile)
    _loader.preload(session)
    return session

async def main():
    start = time.perf_counter()
    if variant == "botocore as it is":
        session = AioSession()
    else:
        make = {"botocore, preloaded in a thread": preloaded, "checkpointio's": _loader.prepared_session}[variant]
        session = await anyio.to_thread.run_sync(make, None)
    on_loop_from = start if variant == "botocore as it is" else time.perf_counter()
    config = Config(s3={"addressing_style": "path"})
    async with session.create_client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                                     config=config, verify=False):
        created = time.perf_counter()
    print(json.dumps({"on_loop": created - on_loop_from, "total": created - start}))

asyncio.run(main())
"""

VARIANTS = ("botocore as it is", "botocore, preloaded in a thread", "checkpointio's")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    samples: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeat):
        for variant in VARIANTS:
            command = [sys.executable, "-c", _CHILD, variant]
            done = subprocess.run(command, check=True, capture_output=True, cwd=REPO, text=True)
            samples[variant].append(json.loads(done.stdout))
    print("| session | on the event loop | until the client exists |")
    print("|---|---|---|")
    for variant in VARIANTS:
        on_loop = statistics.median(sample["on_loop"] for sample in samples[variant]) * 1000
        total = statistics.median(sample["total"] for sample in samples[variant]) * 1000
        print(f"| {variant} | {on_loop:.0f} ms | {total:.0f} ms |")


if __name__ == "__main__":
    main()
