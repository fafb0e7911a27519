"""Transfer settings: one frozen value, validated once, overridable per checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import ipaddress
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from typing_extensions import TypedDict, Unpack

from . import _cores

__all__ = ["MiB", "TransferConfig", "TransferOptions", "codec_workers", "field_help", "receiving_workers"]

MiB = 1024 * 1024
GiB = 1024 * MiB

#: The most ``compression_workers`` chosen for the cores present: one archive thread feeds them
#: (a save) or is fed by them (a load), and each holds blocks in memory.
MAX_DEFAULT_WORKERS = 8

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


def _about(text: str, *, unset: str | None = None) -> dict[str, str]:
    """A field's documentation, kept in its metadata: ``help`` says what it is (plain text, whole
    sentences); ``unset`` what its default ``None`` means. Read by the CLI's ``--help`` and
    appended to the class docstring."""
    return {"help": text} if unset is None else {"help": text, "unset": unset}


@dataclass(frozen=True, kw_only=True)
class TransferConfig:
    """How checkpoints move between the machine and the store.

    Memory: a save holds at most ``part_size * (max_concurrency + 1)`` bytes of parts in flight
    plus ``pipeline_depth * chunk_size`` bytes between the archive thread and the uploader, a
    directory's blocks being deflated (``2 * compression_workers * chunk_size``, and as much again
    for their deflated copies), and briefly a second copy of the one part being assembled; a
    directory load at most the range being extracted plus ``2 * part_size`` received ahead of it
    (the ranges after it stop reading there; TCP holds the rest), a single file about
    ``3 * chunk_size`` per range (a range waits for its bytes to be written before reading more);
    on a load each connection also holds up to 1.5 MiB in the blocks its reader fills and queues.
    With the defaults that is 16 MiB * 9 + 4 MiB = 148 MiB of data, and 4 MiB more per
    compression worker for a directory (a whole process peaked at ~250 MiB in the 2-core
    benchmark, the interpreter and libraries included), for as long as parts keep ``part_size``:
    up to 156 GiB for a file or bytes and 112 GiB for a directory archive or other stream, past
    which S3's 10,000-part limit makes them grow.

    Each field is documented next to its declaration (its ``metadata["help"]``, listed under
    *Attributes* below); ``checkpointio COMMAND --help`` shows the same text for its flag.

    Raises:
        TypeError: A field of the wrong type, named in the message (an ``int`` is accepted for a
            ``float``, a ``bool`` is not an ``int``).
        ValueError: A field out of its range, named in the message.
    """

    part_size: int = field(
        default=16 * MiB,
        metadata=_about(
            "Size of one multipart part and one ranged GET. Grown automatically so that no object needs more "
            "than 10,000 parts. 5 MiB to 5 GiB (S3's limits for a part)."
        ),
    )
    max_concurrency: int = field(
        default=8,
        metadata=_about("Parts or ranges in flight at once per transfer; also sizes the S3 connection pool."),
    )
    multipart_threshold: int = field(
        default=16 * MiB,
        metadata=_about(
            "Objects below this go up in one PUT: those of known size, and streams (a directory archive, stdin) "
            "that end before reaching it. At most 5 GiB (S3's largest single PUT)."
        ),
    )
    chunk_size: int = field(
        default=1 * MiB,
        metadata=_about(
            "Size of the blocks passed between the archive thread and the store, and of each independently "
            "compressed gzip member of a directory archive."
        ),
    )
    pipeline_depth: int = field(
        default=4, metadata=_about("Chunks buffered between producer and consumer (back-pressure).")
    )
    compression_level: int = field(
        default=1,
        metadata=_about(
            "gzip level for directory archives, 0 (store) to 9. Levels 1-3 use ISA-L's fast deflate where the "
            "isal wheel is installed; blocks that deflating would shrink by less than 10% (float weights, "
            "compressed files) are stored whatever the level."
        ),
    )
    compression_workers: int | None = field(
        default=None,
        metadata=_about(
            "Threads that deflate (save) or inflate (load) archive blocks at once; a directory load also "
            "writes its files on as many threads (1: all on one).",
            unset=f"the number of cores this process may use, at most {MAX_DEFAULT_WORKERS}",
        ),
    )
    receive_workers: int | None = field(
        default=None,
        metadata=_about(
            "Threads that receive a load's ranged GETs from S3, each with its own event loop and connection "
            "pool; a single file is written at its offsets on the same threads, and the ranges of a distributed "
            "or partial load are received on them in turn. At most max_concurrency are used.",
            unset="the number of cores this process may use",
        ),
    )
    max_attempts: int = field(
        default=5,
        metadata=_about(
            "Attempts per S3 request (first try included) on throttling and transient errors, with botocore's "
            "jittered exponential backoff."
        ),
    )
    connect_timeout: float = field(default=10.0, metadata=_about("Seconds to wait for a connection to the store."))
    read_timeout: float = field(default=60.0, metadata=_about("Seconds to wait for data on an open connection."))
    endpoint_url: str | None = field(
        default=None,
        metadata=_about(
            "S3 endpoint (MinIO, Ceph, R2, a test server).",
            unset="AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, as botocore reads them, else AWS",
        ),
    )
    region_name: str | None = field(default=None, metadata=_about("S3 region.", unset="the AWS configuration's"))
    profile: str | None = field(default=None, metadata=_about("Named AWS profile.", unset="the AWS configuration's"))
    addressing_style: str | None = field(
        default=None,
        metadata=_about(
            '"path", "virtual" or "auto".',
            unset="path-style when an endpoint is set, as most S3-compatible servers need; else auto",
        ),
    )
    flexible_checksums: bool = field(
        default=True,
        metadata=_about(
            "Send CRC32 checksums (per part and whole object) that S3 verifies. Turn off for servers that "
            "reject them; parts then carry Content-MD5 instead."
        ),
    )
    server_side_encryption: ServerSideEncryption | None = field(
        default=None,
        metadata=_about(
            'How S3 encrypts a saved object: "AES256" (SSE-S3), "aws:kms" (SSE-KMS) or "aws:kms:dsse". '
            "boto3's ServerSideEncryption.",
            unset="the bucket's default encryption",
        ),
    )
    sse_kms_key_id: str | None = field(
        default=None,
        metadata=_about(
            'The KMS key (id, ARN or alias) for "aws:kms" / "aws:kms:dsse". boto3\'s SSEKMSKeyId.',
            unset="the bucket's or the account's default key",
        ),
    )
    bucket_key_enabled: bool | None = field(
        default=None,
        metadata=_about(
            'With "aws:kms", use (or not) an S3 Bucket Key, which cuts KMS requests. boto3\'s BucketKeyEnabled.',
            unset="the bucket's setting",
        ),
    )
    storage_class: StorageClass | None = field(
        default=None,
        metadata=_about(
            'Storage class of saved objects ("STANDARD_IA", "INTELLIGENT_TIERING", ...). GLACIER and '
            "DEEP_ARCHIVE are refused: their objects cannot be loaded without a restore. boto3's StorageClass.",
            unset="the bucket's default, STANDARD",
        ),
    )
    tags: Mapping[str, str] | None = field(
        default=None,
        hash=False,  # a dict: the settings stay hashable
        metadata=_about(
            'Object tags of saved objects, {"key": "value"} (up to 10; needs the s3:PutObjectTagging '
            "permission). boto3's Tagging, as a mapping.",
            unset="no tags",
        ),
    )
    expected_bucket_owner: str | None = field(
        default=None,
        metadata=_about(
            "The 12-digit AWS account id that must own the bucket; every request carries it, and S3 refuses "
            "(access denied) one to a bucket owned by another account. boto3's ExpectedBucketOwner.",
            unset="any owner",
        ),
    )
    requester_pays: bool = field(
        default=False,
        metadata=_about(
            "Agree to pay for the requests and transfer on a Requester Pays bucket (every request says "
            "RequestPayer=requester). boto3's RequestPayer."
        ),
    )

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
        for name in ("max_concurrency", "chunk_size", "pipeline_depth", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("compression_workers", "receive_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.compression_level <= 9:
            raise ValueError(f"compression_level must be 0..9, got {self.compression_level}")
        for name in ("connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:  # NaN too: it compares false with everything
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ValueError(f"addressing_style must be path, virtual or auto, got {self.addressing_style!r}")
        if self.endpoint_url is not None and not is_endpoint(self.endpoint_url):
            raise ValueError(
                "endpoint_url must be an http:// or https:// URL with a host (and a numeric port, if any), "
                f"e.g. http://127.0.0.1:9000, got {self.endpoint_url!r}"
            )
        if self.region_name is not None and not _REGION.fullmatch(self.region_name):
            raise ValueError(f"region_name must be a region name such as us-east-1, got {self.region_name!r}")
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


#: A host name as botocore accepts it in an endpoint: dot-separated labels of letters, digits and
#: inner hyphens (an IPv4 address is one).
_HOST = re.compile(r"((?!-)[A-Za-z\d-]{1,63}(?<!-)\.)*((?!-)[A-Za-z\d-]{1,63}(?<!-))")
#: A region name as botocore's ``validate_region_name`` accepts it (made when a client is
#: created), but for the empty name, which is no region: ``None`` says that.
_REGION = re.compile(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")


def is_endpoint(url: str) -> bool:
    """Whether ``url`` is an S3 endpoint botocore can send requests to: ``http`` or ``https``, a
    host name or address (an IPv6 one in brackets), a numeric port if any (botocore's own checks,
    made only when the client is created (``host:9000``) or at the first request (``ftp://host``,
    ``http://host:port``))."""
    if any(char in url for char in "\t\r\n"):  # urlsplit would drop them, and botocore refuses them
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    host = parts.hostname
    if parts.scheme.lower() not in ("http", "https") or not host:
        return False
    if parts.netloc.rpartition("@")[2].startswith("["):
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return False
        return True
    return len(host) <= 255 and _HOST.fullmatch(host.removesuffix(".")) is not None


def codec_workers(config: TransferConfig) -> int:
    """The threads that deflate or inflate a transfer's archive blocks: ``compression_workers``,
    else one per core this process may use (its CPU affinity and cgroup CPU quota), at most
    :data:`MAX_DEFAULT_WORKERS`."""
    if config.compression_workers is not None:
        return config.compression_workers
    return min(MAX_DEFAULT_WORKERS, _cores.available())


def receiving_workers(config: TransferConfig) -> int:
    """The threads that receive a load's ranges: ``receive_workers``, else one per core this
    process may use (the caller caps them at the ranges in flight)."""
    return config.receive_workers if config.receive_workers is not None else _cores.available()


def field_help(name: str) -> tuple[str, str | None]:
    """A :class:`TransferConfig` field's help text, and what its default ``None`` means (``None``
    for a field whose default is a value).

    Raises:
        KeyError: No such field.
    """
    for setting in dataclasses.fields(TransferConfig):
        if setting.name == name:
            return setting.metadata["help"], setting.metadata.get("unset")
    raise KeyError(name)


def _attributes_section() -> str:
    """The Google-style *Attributes* section of TransferConfig's docstring, from its fields' help."""
    lines = ["Attributes:"]
    for setting in dataclasses.fields(TransferConfig):
        text, unset = field_help(setting.name)
        if unset is not None:
            text += f" None (the default): {unset}."
        lines += textwrap.wrap(
            f"{setting.name}: {text}", width=100, initial_indent="    ", subsequent_indent="        "
        )
    return "\n".join(lines)


def _with_attributes(doc: str) -> str:
    """``doc`` cleaned of its indentation (Python 3.13 strips it itself, older versions do not, so
    the section's indentation matches the rest whatever the version), the *Attributes* section
    put before its *Raises*."""
    summary, raises, rest = inspect.cleandoc(doc).partition("\nRaises:")
    return f"{summary.rstrip()}\n\n{_attributes_section()}\n{raises}{rest}\n"


TransferConfig.__doc__ = _with_attributes(TransferConfig.__doc__ or "")


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
    compression_workers: int | None
    receive_workers: int | None
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
