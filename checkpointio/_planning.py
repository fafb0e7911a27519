"""Pure arithmetic of multipart transfers: part sizes within S3's limits, download ranges."""

from __future__ import annotations

import functools

from ._config import MiB
from ._exceptions import ObjectTooLargeError

__all__ = [
    "MAX_OBJECT_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "check_object_size",
    "part_size_for_known_size",
    "part_size_for_stream",
    "ranges",
]

MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_OBJECT_SIZE = 5 * 1024 * 1024 * MiB
#: Times a stream's part size may double: x1024 takes even 5 MiB parts to S3's 5 GiB maximum.
_DOUBLINGS = 10


def check_object_size(size: int, uri: str) -> None:
    """Refuse, before any byte moves, an object larger than S3 accepts."""
    if size > MAX_OBJECT_SIZE:
        raise ObjectTooLargeError(
            f"{uri}: {size} bytes is over S3's object limit of {MAX_OBJECT_SIZE} bytes (5 TiB)", uri=uri
        )


def part_size_for_known_size(size: int, part_size: int) -> int:
    """The part size for an object of known size: ``part_size`` grown to fit in 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    if needed <= part_size:
        return part_size
    return min(MAX_PART_SIZE, -(-needed // MiB) * MiB)


def part_size_for_stream(index: int, part_size: int) -> int:
    """The size of part ``index`` (0-based) of a stream whose total size is not known in advance.

    Parts need not be equal on S3. The first parts keep ``part_size`` (and memory in flight what
    the settings say) for as long as the rest, doubling, can still reach S3's 5 TiB limit within
    10,000 parts: 112 GiB of 16 MiB parts, 23 GiB of 5 MiB ones (see :func:`_stream_schedule`).
    """
    keep, step = _stream_schedule(part_size)
    if index < keep:
        return part_size
    return min(MAX_PART_SIZE, part_size << min(_DOUBLINGS, (index - keep) // step + 1))


@functools.cache
def _stream_schedule(part_size: int) -> tuple[int, int]:
    """``(keep, step)``: parts from ``keep`` on double every ``step`` parts (``_DOUBLINGS`` times
    at most). ``keep`` is the largest multiple of 100 whose schedule reaches 5 TiB."""
    for keep in range(9_000, -1, -100):
        step = (MAX_PARTS - keep) // _DOUBLINGS
        total, grown, index = keep * part_size, 0, keep
        while index < MAX_PARTS:
            grown += 1
            count = MAX_PARTS - index if grown == _DOUBLINGS else step
            total += count * min(MAX_PART_SIZE, part_size << grown)
            index += count
        if total >= MAX_OBJECT_SIZE:
            return keep, step
    raise AssertionError("unreachable: 10,000 parts of 5 GiB hold 5 TiB")  # pragma: no cover


def ranges(size: int, range_size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes into ``(start, end_inclusive)`` ranges of ``range_size`` bytes."""
    return [(start, min(start + range_size, size) - 1) for start in range(0, size, range_size)]
