"""Transfer settings: one frozen value, validated once, overridable per checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from typing_extensions import TypedDict, Unpack

__all__ = ["MiB", "TransferConfig", "TransferOptions"]

MiB = 1024 * 1024
GiB = 1024 * MiB

#: ``server_side_encryption`` values: S3's (botocore's ``ServerSideEncryption``) for a bucket.
ServerSideEncryption = Literal["AES256", "aws:kms", "aws:kms:dsse"]
#: ``storage_class`` values: botocore's ``StorageClass`` whose objects can be read at once (GLACIER
#: and DEEP_ARCHIVE need a restore first, so a load would fail; FSx, Snow and backup classes are
#: for other services' buckets).
StorageClass = Literal[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "EXPRESS_ONEZONE",
    "OUTPOSTS",
]
_ENCRYPTIONS: tuple[str, ...] = typing.get_args(ServerSideEncryption)
_STORAGE_CLASSES: tuple[str, ...] = typing.get_args(StorageClass)
_ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
#: S3's limits for an object's tags.
_MAX_TAGS, _MAX_TAG_KEY, _MAX_TAG_VALUE = 10, 128, 256


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
        server_side_encryption: How S3 encrypts a saved object: ``"AES256"`` (SSE-S3),
            ``"aws:kms"`` (SSE-KMS) or ``"aws:kms:dsse"``; ``None`` leaves it to the bucket's
            default encryption. boto3's ``ServerSideEncryption``.
        sse_kms_key_id: The KMS key (id, ARN or alias) for ``"aws:kms"`` / ``"aws:kms:dsse"``;
            ``None`` takes the bucket's or the account's default key. boto3's ``SSEKMSKeyId``.
        bucket_key_enabled: With ``"aws:kms"``, use (or not) an S3 Bucket Key, which cuts KMS
            requests; ``None`` follows the bucket's setting. boto3's ``BucketKeyEnabled``.
        storage_class: Storage class of saved objects (``"STANDARD_IA"``, ``"INTELLIGENT_TIERING"``,
            ...); ``None`` is the bucket's default (STANDARD). GLACIER and DEEP_ARCHIVE are refused:
            their objects cannot be loaded without a restore. boto3's ``StorageClass``.
        tags: Object tags of saved objects, ``{"key": "value"}`` (up to 10; needs the
            ``s3:PutObjectTagging`` permission). boto3's ``Tagging``, as a mapping.
        expected_bucket_owner: The 12-digit AWS account id that must own the bucket; every request
            carries it, and S3 refuses (access denied) one to a bucket owned by another account.
            boto3's ``ExpectedBucketOwner``.
        requester_pays: Agree to pay for the requests and transfer on a Requester Pays bucket
            (every request says ``RequestPayer=requester``). boto3's ``RequestPayer``.

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
    server_side_encryption: ServerSideEncryption | None = None
    sse_kms_key_id: str | None = None
    bucket_key_enabled: bool | None = None
    storage_class: StorageClass | None = None
    tags: Mapping[str, str] | None = field(default=None, hash=False)  # a dict: the settings stay hashable
    expected_bucket_owner: str | None = None
    requester_pays: bool = False

    def __post_init__(self) -> None:
        self._check_choices()
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
        self._check_request_options()

    def _check_choices(self) -> None:
        """Before the type check: a string S3 does not take is a value error, with the reason."""
        if isinstance(self.server_side_encryption, str) and self.server_side_encryption not in _ENCRYPTIONS:
            raise ValueError(
                f"server_side_encryption must be one of {', '.join(_ENCRYPTIONS)}, got {self.server_side_encryption!r}"
            )
        if self.storage_class in _ARCHIVE_CLASSES:
            raise ValueError(
                f"storage_class {self.storage_class!r} is refused: such objects cannot be loaded until they are "
                "restored; move older checkpoints there with a lifecycle rule instead"
            )
        if isinstance(self.storage_class, str) and self.storage_class not in _STORAGE_CLASSES:
            raise ValueError(f"storage_class must be one of {', '.join(_STORAGE_CLASSES)}, got {self.storage_class!r}")

    def _check_request_options(self) -> None:
        """The S3 request options (their types already checked): values S3 accepts, and
        combinations that mean something."""
        kms = self.server_side_encryption in ("aws:kms", "aws:kms:dsse")
        if self.sse_kms_key_id is not None:
            if not self.sse_kms_key_id:
                raise ValueError("sse_kms_key_id must be a key id, ARN or alias, got ''")
            if not kms:
                raise ValueError(
                    "sse_kms_key_id needs server_side_encryption='aws:kms' (or 'aws:kms:dsse'), "
                    f"got server_side_encryption={self.server_side_encryption!r}"
                )
        if self.bucket_key_enabled is not None and self.server_side_encryption != "aws:kms":
            raise ValueError(
                "bucket_key_enabled applies to server_side_encryption='aws:kms' only, "
                f"got server_side_encryption={self.server_side_encryption!r}"
            )
        if self.expected_bucket_owner is not None and not re.fullmatch(r"\d{12}", self.expected_bucket_owner):
            raise ValueError(
                f"expected_bucket_owner must be a 12-digit AWS account id, got {self.expected_bucket_owner!r}"
            )
        if self.tags is not None:
            _check_tags(self.tags)
            # A copy: a dict the caller changes later does not change the settings.
            object.__setattr__(self, "tags", dict(self.tags))

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
    server_side_encryption: ServerSideEncryption | None
    sse_kms_key_id: str | None
    bucket_key_enabled: bool | None
    storage_class: StorageClass | None
    tags: Mapping[str, str] | None
    expected_bucket_owner: str | None
    requester_pays: bool


def _check_tags(tags: Mapping[str, str]) -> None:
    """S3's limits for an object's tags."""
    if len(tags) > _MAX_TAGS:
        raise ValueError(f"tags: S3 allows at most {_MAX_TAGS} per object, got {len(tags)}")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"option 'tags': keys and values must be str, got {key!r}: {value!r}")
        if not 1 <= len(key) <= _MAX_TAG_KEY or len(value) > _MAX_TAG_VALUE:
            raise ValueError(
                f"tags: a key must be 1 to {_MAX_TAG_KEY} characters and a value at most {_MAX_TAG_VALUE}, "
                f"got {key!r}: {value!r}"
            )
        if key.lower().startswith("aws:"):
            raise ValueError(f"tags: keys starting with 'aws:' are reserved for AWS, got {key!r}")


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
