"""Transfer settings: one frozen value, validated once, overridable per checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any

from typing_extensions import TypedDict, Unpack

__all__ = ["MiB", "TransferConfig", "TransferOptions"]

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True, kw_only=True)
class TransferConfig:
    """How checkpoints move between the machine and the store.

    Memory: a save holds at most ``part_size * (max_concurrency + 1)`` bytes of parts in flight
    plus ``pipeline_depth * chunk_size`` bytes between the archive thread and the uploader, and
    briefly a second copy of the one part being assembled; a directory load the same for ranges
    (those after the one being extracted wait whole), a single file about ``3 * chunk_size`` per
    range (a range waits for its bytes to be written before reading more). With the
    defaults that is 16 MiB * 9 + 4 MiB = 148 MiB of data (a whole process peaked at ~250 MiB in
    the benchmark, the interpreter and libraries included), for as long as parts keep
    ``part_size``: up to 156 GiB for a file or bytes and 112 GiB for a directory archive or other
    stream, past which S3's 10,000-part limit makes them grow.

    Attributes:
        part_size: Size of one multipart part and one ranged GET. Grown automatically so that no
            object needs more than 10,000 parts. 5 MiB to 5 GiB (S3's limits for a part).
        max_concurrency: Parts or ranges in flight at once per transfer; also sizes the S3
            connection pool.
        multipart_threshold: Objects below this go up in one PUT: those of known size, and
            streams (a directory archive, stdin) that end before reaching it. At most 5 GiB (S3's
            largest single PUT).
        chunk_size: Size of the blocks passed between the archive thread and the store, and of
            each independently compressed gzip member of a directory archive.
        pipeline_depth: Chunks buffered between producer and consumer (back-pressure).
        compression_level: gzip level for directory archives, 0 (store) to 9. Levels 1-3 use
            ISA-L's fast deflate where the ``isal`` wheel is installed; blocks that deflating
            would shrink by less than 10% (float weights, compressed files) are stored whatever
            the level.
        compression_workers: Threads that deflate (save) or inflate (load) archive blocks at once.
        max_attempts: Attempts per S3 request (first try included) on throttling and transient
            errors, with botocore's jittered exponential backoff.
        connect_timeout: Seconds to wait for a connection to the store.
        read_timeout: Seconds to wait for data on an open connection.
        endpoint_url: S3 endpoint (MinIO, Ceph, R2, a test server). ``None`` reads
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` as botocore does, else AWS.
        region_name: S3 region; ``None`` takes the AWS configuration chain's.
        profile: Named AWS profile; ``None`` takes the default chain.
        addressing_style: ``"path"``, ``"virtual"`` or ``"auto"``; ``None`` means path-style when
            an endpoint is set (what most S3-compatible servers need) and auto otherwise.
        flexible_checksums: Send CRC32 checksums (per part and whole object) that S3 verifies.
            Turn off for servers that reject them; parts then carry Content-MD5 instead.

    Raises:
        TypeError: A field of the wrong type, named in the message (an ``int`` is accepted for a
            ``float``, a ``bool`` is not an ``int``).
        ValueError: A field out of its range, named in the message.
    """

    part_size: int = 16 * MiB
    max_concurrency: int = 8
    multipart_threshold: int = 16 * MiB
    chunk_size: int = 1 * MiB
    pipeline_depth: int = 4
    compression_level: int = 1
    compression_workers: int = 2
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    endpoint_url: str | None = None
    region_name: str | None = None
    profile: str | None = None
    addressing_style: str | None = None
    flexible_checksums: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        if not 5 * MiB <= self.part_size <= 5 * GiB:
            raise ValueError(f"part_size must be 5 MiB to 5 GiB (S3's limits for a part), got {self.part_size}")
        if not 0 <= self.multipart_threshold <= 5 * GiB:
            raise ValueError(
                f"multipart_threshold must be 0 to 5 GiB (S3's largest single PUT), got {self.multipart_threshold}"
            )
        if self.chunk_size > 64 * MiB:
            raise ValueError(f"chunk_size must be at most 64 MiB, got {self.chunk_size}")
        for name in ("max_concurrency", "chunk_size", "pipeline_depth", "max_attempts", "compression_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.compression_level <= 9:
            raise ValueError(f"compression_level must be 0..9, got {self.compression_level}")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ValueError(f"addressing_style must be path, virtual or auto, got {self.addressing_style!r}")

    def with_options(self, **options: Unpack[TransferOptions]) -> TransferConfig:
        """Return a copy with some fields replaced.

        Raises:
            TypeError: An unknown option, or a value of the wrong type (the message names it).
            ValueError: A value out of its range.
        """
        if not options:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown checkpoint option(s) {unknown}; valid: {sorted(known)}")
        return dataclasses.replace(self, **options)


class TransferOptions(TypedDict, total=False):
    """:class:`TransferConfig`'s fields as keyword options, each optional.

    What ``Checkpoint(dest, **options)``, ``save(data, **options)``, ``TaskEnvironment(**options)``
    and the torch helpers accept, so a type checker catches a misspelt option
    (``part_sise=...``) or a value of the wrong type (``part_size="16MiB"``). Code forwarding
    options types them the same way: ``def run(**options: Unpack[TransferOptions])``. A test keeps
    the keys and types equal to ``TransferConfig``'s fields.
    """

    part_size: int
    max_concurrency: int
    multipart_threshold: int
    chunk_size: int
    pipeline_depth: int
    compression_level: int
    compression_workers: int
    max_attempts: int
    connect_timeout: float
    read_timeout: float
    endpoint_url: str | None
    region_name: str | None
    profile: str | None
    addressing_style: str | None
    flexible_checksums: bool


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TransferConfig)


def _matches(value: object, expected: Any) -> bool:
    """Whether ``value`` is of the annotated type ``expected`` (the forms the fields use)."""
    origin = typing.get_origin(expected)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, option) for option in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is Any:
        return True
    if expected is type(None):
        return value is None
    if expected is float:  # an int is a float wherever a float is expected (PEP 484), a bool is not
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(origin, type):  # a generic (Mapping[str, str], tuple[...]): its container type
        return isinstance(value, origin)
    return not isinstance(expected, type) or isinstance(value, expected)


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if expected is type(None):
        return "None"
    if isinstance(expected, type):
        return expected.__name__
    return str(expected).replace("typing.", "")


def _check_types(config: TransferConfig) -> None:
    """Raise a ``TypeError`` naming the first field whose value is not of its declared type."""
    for name, expected in _field_types().items():
        value = getattr(config, name)
        if not _matches(value, expected):
            hint = ""
            if isinstance(value, str) and expected is int and name.endswith(("_size", "_threshold")):
                hint = " (a number of bytes, e.g. 16 * MiB)"
            raise TypeError(
                f"option {name!r} must be {_describe(expected)}, got {type(value).__name__} {value!r}{hint}"
            )
