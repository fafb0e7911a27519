"""Checked by ``mypy`` (strict, see pyproject's ``files``), never run: options a user gets wrong fail.

Each line marked ``type: ignore[code]`` must produce exactly that error: with ``warn_unused_ignores``
(part of ``strict``), an ignore that is no longer needed -- the options were typed ``Any`` again, or
a check went missing -- fails the type check.
"""

from __future__ import annotations

from typing_extensions import Unpack

from checkpointio import Checkpoint, MiB, TaskEnvironment, TransferConfig, TransferOptions


def misspelt_or_mistyped_options(cp: Checkpoint) -> None:
    Checkpoint("x", part_sise=1)  # type: ignore[call-arg]
    Checkpoint("x", part_size="16MiB")  # type: ignore[arg-type]
    cp.save_sync(b"x", compression_levl=0)  # type: ignore[call-arg]
    cp.save_sync(b"x", flexible_checksums="no")  # type: ignore[arg-type]
    TaskEnvironment("e", max_concurrency=2.5)  # type: ignore[arg-type]
    TransferConfig().with_options(endpoint_url=9000)  # type: ignore[arg-type]


async def misspelt_options_of_an_async_save(cp: Checkpoint) -> None:
    await cp.save(b"x", part_size="16MiB")  # type: ignore[arg-type]
    await cp.save(b"x", chunksize=MiB)  # type: ignore[call-arg]


def correct_options(cp: Checkpoint, **options: Unpack[TransferOptions]) -> TransferConfig:
    """Valid uses type-check: an int where a float is expected, forwarded options."""
    Checkpoint("x", part_size=16 * MiB, connect_timeout=5, endpoint_url=None)
    cp.save_sync(b"x", **options)
    return TransferConfig(**options).with_options(region_name="eu-west-1")
