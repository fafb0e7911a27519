"""HEAD of an object into an :class:`ObjectInfo`, on whichever event loop asks (the caller's, or a
receiving thread's for a load: :func:`._download.head`)."""

from __future__ import annotations

import base64
import dataclasses
import logging
from typing import Any

from botocore.exceptions import ClientError

from ..._exceptions import BucketNotFoundError
from ..._location import Location
from .._base import ObjectInfo, Record
from ._client import _Requests
from ._errors import answered

logger = logging.getLogger(__name__)


async def head(requests: _Requests, location: Location) -> ObjectInfo | None:
    """The object's metadata with this loop's client; ``None`` if there is none."""
    client = await requests.client(location)
    with requests.mapped_errors(location, "read the checkpoint's metadata"):
        try:
            response = await client.head_object(
                Bucket=location.bucket,
                Key=location.key,
                ChecksumMode="ENABLED",
                **requests.options(client, "HeadObject"),
            )
        except ClientError as error:
            if not answered(error, (404,), ("404", "NoSuchKey")):
                raise
            response = None
    if response is None:
        await _check_bucket(requests, client, location)
        return None
    server_crc = None
    checksum = response.get("ChecksumCRC32")
    # A composite (per-part) checksum ends in "-N" and says nothing about the whole content.
    if checksum and "-" not in checksum and response.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        server_crc = int.from_bytes(base64.b64decode(checksum), "big")
    modified = response.get("LastModified")
    size = int(response["ContentLength"])
    record = Record.from_metadata(response.get("Metadata", {}))
    if record is not None and (record.size is None or record.crc32 is None):
        # A stream saved in parts (a directory archive): its metadata was set when the upload
        # started, before its size and CRC32 were known, and S3 cannot change an object's
        # metadata without copying the whole object. The server knows both since it completed
        # the upload: its length, and the whole-object CRC32 it checked against ours then
        # (where it offers one; else the record has no CRC32, as one of an older save).
        record = dataclasses.replace(
            record,
            size=size if record.size is None else record.size,
            crc32=server_crc if record.crc32 is None else record.crc32,
        )
    return ObjectInfo(
        location,
        size,
        response["ETag"],
        record,
        server_crc32=server_crc,
        modified=modified.timestamp() if modified is not None else None,
    )


async def _check_bucket(requests: _Requests, client: Any, location: Location) -> None:
    """A 404 on HEAD does not say whether the key or the bucket is missing: ask.

    Only a 404 means the bucket is missing. A 403 means it exists and these credentials may
    not look at the bucket itself (object-only permissions, as with GCS interop's
    ``objectAdmin`` role): the key is what is missing, and a first attempt must see "no
    checkpoint", not an access error.
    """
    with requests.mapped_errors(location, "check the bucket"):
        try:
            await client.head_bucket(Bucket=location.bucket, **requests.options(client, "HeadBucket"))
        except ClientError as error:
            if answered(error, (404,)):
                raise BucketNotFoundError(
                    f"{location.uri}: bucket {location.bucket!r} does not exist", uri=location.uri
                ) from error
            if not answered(error, (403,)):
                raise
            logger.debug("no permission to HEAD bucket %r; %s is missing", location.bucket, location)
