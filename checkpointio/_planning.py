"""Pure arithmetic of multipart transfers: part sizes within S3's limits, download ranges."""

from __future__ import annotations

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
#: A stream of unknown size doubles its part size every this many parts, so 10,000 parts
#: reach S3's 5 TiB object limit from any part size of at least 5 MiB.
PARTS_PER_DOUBLING = 1_000


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

    Parts need not be equal on S3, so the size doubles every ``PARTS_PER_DOUBLING`` parts: small
    checkpoints keep small parts (fast, concurrent) and huge ones still fit in 10,000 parts.
    """
    return min(MAX_PART_SIZE, part_size << (index // PARTS_PER_DOUBLING))


def ranges(size: int, range_size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes into ``(start, end_inclusive)`` ranges of ``range_size`` bytes."""
    return [(start, min(start + range_size, size) - 1) for start in range(0, size, range_size)]
