"""botocore's and aiohttp's errors mapped to the ``CheckpointError`` tree, in one place.

Every request runs inside :func:`mapped_errors`: what it knows becomes the most specific
``CheckpointError`` naming the bucket and key, chained to the original; anything else (our own
errors, a bug, cancellation) goes on exactly as it was raised::

    ClientError NoSuchBucket / 404 on HEAD bucket -> BucketNotFoundError
    ClientError 403, bad or missing credentials   -> AccessDeniedError
    ClientError 412 PreconditionFailed            -> ConcurrentModificationError
    ClientError NoSuchKey (a read after a HEAD)   -> ConcurrentModificationError
    ClientError 5xx, unreachable, dropped         -> StoreUnavailableError
    any other ClientError or BotoCoreError        -> StoreError
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from ..._exceptions import (
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointError,
    ConcurrentModificationError,
    StoreError,
    StoreUnavailableError,
)
from ..._location import Location

_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
    "403",
}
#: Errors of a response body cut short: a ranged GET resumes after them on its own.
TRANSIENT_READ_ERRORS = (
    ResponseStreamingError,
    ConnectionClosedError,
    ReadTimeoutError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
)


def status(error: ClientError) -> int | None:
    """The HTTP status of the server's answer."""
    value = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(value) if value is not None else None


def code(error: ClientError) -> str:
    """S3's error code (``NoSuchKey``, ...); the status as text when the answer had no body (HEAD)."""
    return str(error.response.get("Error", {}).get("Code", ""))


def answered(error: BaseException, statuses: tuple[int, ...] = (), codes: tuple[str, ...] = ()) -> bool:
    """Whether ``error`` is the server's answer with one of ``statuses`` or one of ``codes``."""
    return isinstance(error, ClientError) and (status(error) in statuses or code(error) in codes)


@contextmanager
def mapped_errors(location: Location, action: str, owner: str | None = None) -> Iterator[None]:
    """Raise what the block raises as the ``CheckpointError`` it means, chained with ``from``;
    re-raise anything not botocore's or aiohttp's to map (and cancellation) untouched.

    ``action`` completes "could not ...". ``owner``: the expected bucket owner sent with the
    request; S3 answers a request to a bucket another account owns with a plain 403, so a denial
    names it as a possible cause.
    """
    try:
        yield
    except Exception as error:
        mapped = _mapped(error, location, action, owner)
        if mapped is None:
            raise
        raise mapped from error


def _mapped(error: Exception, location: Location, action: str, owner: str | None) -> CheckpointError | None:
    uri = location.uri
    if isinstance(error, CheckpointError):
        return None
    if isinstance(error, ClientError):
        error_code = code(error)
        error_status = status(error)
        message = error.response.get("Error", {}).get("Message") or error_code
        if error_code == "NoSuchBucket":
            return BucketNotFoundError(f"{uri}: cannot {action}: bucket {location.bucket!r} does not exist", uri=uri)
        if error_code in _ACCESS_CODES or error_status == 403:
            owned = f", and that account {owner} owns the bucket (expected_bucket_owner)" if owner else ""
            return AccessDeniedError(
                f"{uri}: access denied while trying to {action}: {error_code}: {message} "
                f"(check the credentials and the bucket policy{owned})",
                uri=uri,
            )
        if error_code in ("PreconditionFailed", "412") or error_status == 412:
            return ConcurrentModificationError(f"{uri}: replaced while being read", uri=uri)
        if error_code == "NoSuchKey":  # a read of an object described a moment ago, as the local store says it
            return ConcurrentModificationError(f"{uri}: removed while being read", uri=uri)
        if error_status is not None and error_status >= 500:
            return StoreUnavailableError(f"{uri}: the store kept failing to {action}: {error_code}: {message}", uri=uri)
        return StoreError(f"{uri}: could not {action}: {error_code}: {message}", uri=uri)
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return AccessDeniedError(f"{uri}: no usable AWS credentials to {action}: {error}", uri=uri)
    if isinstance(error, EndpointConnectionError | ConnectTimeoutError | aiohttp.ClientConnectionError):
        return StoreUnavailableError(f"{uri}: cannot reach the store to {action}: {error}", uri=uri)
    if isinstance(error, TRANSIENT_READ_ERRORS):
        return StoreUnavailableError(f"{uri}: connection failed while trying to {action}: {error}", uri=uri)
    if isinstance(error, BotoCoreError):
        return StoreError(f"{uri}: could not {action}: {error}", uri=uri)
    return None  # not ours to reinterpret
