"""botocore's and aiohttp's errors mapped to the ``CheckpointError`` tree, naming the bucket and key."""

from __future__ import annotations

import asyncio

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
_TRANSIENT_READ_ERRORS = (
    ResponseStreamingError,
    ConnectionClosedError,
    ReadTimeoutError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
)


def _translate(error: Exception, location: Location, action: str, owner: str | None = None) -> Exception:
    """Map a botocore/aiohttp error to ours, naming the bucket and key.

    ``owner``: the expected bucket owner sent with the request; S3 answers a request to a bucket
    another account owns with a plain 403, so a denial names it as a possible cause.
    """
    uri = location.uri
    if isinstance(error, CheckpointError):
        return error
    if isinstance(error, ClientError):
        meta = error.response.get("Error", {})
        code = str(meta.get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = meta.get("Message") or code
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"{uri}: cannot {action}: bucket {location.bucket!r} does not exist", uri=uri)
        if code in _ACCESS_CODES or status == 403:
            owned = f", and that account {owner} owns the bucket (expected_bucket_owner)" if owner else ""
            return AccessDeniedError(
                f"{uri}: access denied while trying to {action}: {code}: {message} "
                f"(check the credentials and the bucket policy{owned})",
                uri=uri,
            )
        if code in ("PreconditionFailed", "412") or status == 412:
            return ConcurrentModificationError(f"{uri}: replaced while being read", uri=uri)
        if status is not None and status >= 500:
            return StoreUnavailableError(f"{uri}: the store kept failing to {action}: {code}: {message}", uri=uri)
        return StoreError(f"{uri}: could not {action}: {code}: {message}", uri=uri)
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return AccessDeniedError(f"{uri}: no usable AWS credentials to {action}: {error}", uri=uri)
    if isinstance(error, EndpointConnectionError | ConnectTimeoutError | aiohttp.ClientConnectionError):
        return StoreUnavailableError(f"{uri}: cannot reach the store to {action}: {error}", uri=uri)
    if isinstance(error, _TRANSIENT_READ_ERRORS):
        return StoreUnavailableError(f"{uri}: connection failed while trying to {action}: {error}", uri=uri)
    if isinstance(error, BotoCoreError):
        return StoreError(f"{uri}: could not {action}: {error}", uri=uri)
    return error  # not ours to reinterpret
