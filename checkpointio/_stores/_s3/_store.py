"""The S3 store: head, list, delete, conditional create and unfinished uploads; put and get are
in :mod:`._upload` and :mod:`._download`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from botocore.exceptions import ClientError

from ..._config import TransferConfig
from ..._exceptions import AccessDeniedError
from ..._location import Location
from .._base import Body, ObjectInfo, OrderedRead, PendingWrite, RangeSink, Record, Sink, under
from ._client import _Requests
from ._download import get, get_ranges, head_for_reads, ordered, read_range, read_range_into
from ._errors import answered
from ._head import head
from ._upload import put, request_body

logger = logging.getLogger(__name__)


class S3Store:
    """Checkpoints as objects in S3 or an S3-compatible store."""

    def __init__(self, config: TransferConfig) -> None:
        self._requests = _Requests(config)

    # -- head / delete / list / unfinished uploads ---------------------------------------------

    async def head(self, location: Location) -> ObjectInfo | None:
        return await head(self._requests, location)

    async def delete(self, location: Location, *, force: bool = False) -> bool:
        client = await self._requests.client(location)
        try:
            existed = await self.head(location) is not None
        except AccessDeniedError:  # may delete, not read (no s3:GetObject): a listing of the key tells
            with self._requests.mapped_errors(location, "list the checkpoint"):
                existed = bool(await self._objects(location.bucket, location.key, exact=True))
        with self._requests.mapped_errors(location, "delete the checkpoint"):
            await client.delete_object(
                Bucket=location.bucket, Key=location.key, **self._requests.options(client, "DeleteObject")
            )
        return existed

    async def pending(self, prefix: Location) -> list[PendingWrite]:
        await self._requests.client(prefix)  # made here, so that an error making it names the prefix asked for
        with self._requests.mapped_errors(prefix, "list incomplete uploads"):
            if _may_name_a_folder(prefix.key):
                inside = await self._uploads(prefix.bucket, prefix.key + "/")
                if inside:  # the folder: never the uploads of runs/70/..., runs/7-old...
                    found = await self._uploads(prefix.bucket, prefix.key, exact=True) + inside
                    return sorted(found, key=lambda write: (write.started or 0.0, write.location.key))
            found = await self._uploads(prefix.bucket, prefix.key)
        found = under(prefix.key, found, lambda write: write.location.key)
        return sorted(found, key=lambda write: (write.started or 0.0, write.location.key))

    async def _uploads(self, bucket: str, prefix: str, *, exact: bool = False) -> list[PendingWrite]:
        """The unfinished uploads of keys starting with ``prefix`` (``exact``: of the key ``prefix``
        itself, listed first as S3 lists by key: one a page, stopping at the first other key)."""
        client = await self._requests.client(Location("s3", bucket, prefix))
        found: list[PendingWrite] = []
        paginator = client.get_paginator("list_multipart_uploads")
        options = self._requests.options(client, "ListMultipartUploads")
        pages = {"PageSize": 1} if exact else {}  # one key's uploads are few: no other key's sent
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=pages, **options):
            for upload in page.get("Uploads", []):
                if exact and upload["Key"] != prefix:
                    return found
                initiated = upload.get("Initiated")
                found.append(
                    PendingWrite(
                        Location("s3", bucket, upload["Key"]),
                        upload["UploadId"],
                        initiated.timestamp() if initiated is not None else None,
                    )
                )
        return found

    async def discard(self, write: PendingWrite) -> bool:
        location = write.location
        client = await self._requests.client(location)
        with self._requests.mapped_errors(location, f"abort upload {write.ident}"):
            try:
                await client.abort_multipart_upload(
                    Bucket=location.bucket,
                    Key=location.key,
                    UploadId=write.ident,
                    **self._requests.options(client, "AbortMultipartUpload"),
                )
            except ClientError as error:
                if answered(error, codes=("NoSuchUpload",)):
                    return False
                raise
        return True

    async def _objects(self, bucket: str, prefix: str, *, exact: bool = False) -> list[ObjectInfo]:
        """The objects whose key starts with ``prefix``, in key order (``exact``: the object
        ``prefix`` itself, if any: the first key S3 lists from it, so one key asked for).

        A listing is all it takes, never a HEAD: a principal allowed only ``s3:ListBucket`` lists.
        """
        client = await self._requests.client(Location("s3", bucket, prefix))
        found: list[ObjectInfo] = []
        paginator = client.get_paginator("list_objects_v2")
        pages = {"MaxItems": 1, "PageSize": 1} if exact else {}
        async for page in paginator.paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig=pages, **self._requests.options(client, "ListObjectsV2")
        ):
            for item in page.get("Contents", []):
                if exact and item["Key"] != prefix:
                    return found
                found.append(
                    ObjectInfo(
                        Location("s3", bucket, item["Key"]),
                        int(item["Size"]),
                        item["ETag"],
                        modified=item["LastModified"].timestamp(),
                    )
                )
        return sorted(found, key=lambda info: info.location.key)

    async def list(self, prefix: Location) -> list[ObjectInfo]:
        await self._requests.client(prefix)  # made here, so that an error making it names the prefix asked for
        with self._requests.mapped_errors(prefix, "list checkpoints"):
            if _may_name_a_folder(prefix.key):
                inside = await self._objects(prefix.bucket, prefix.key + "/")
                if inside:  # the folder (as ``under`` has it): never list runs/70/..., runs/7-old...
                    return await self._objects(prefix.bucket, prefix.key, exact=True) + inside
            found = await self._objects(prefix.bucket, prefix.key)
        return under(prefix.key, found, lambda info: info.location.key)

    async def create(self, location: Location, data: bytes, record: Record) -> bool:
        """A PUT with ``If-None-Match: *``, which S3 applies atomically: 412 means the key exists, 409
        that a concurrent conditional write to it is in progress (it, not this one, takes the key).

        A server that ignores the header (some S3-compatible ones) overwrites instead: the claim
        then holds only as well as a plain PUT.
        """
        client = await self._requests.client(location)
        body, _size, headers = request_body(self._requests, [data])
        with self._requests.mapped_errors(location, "create the object"):
            try:
                await client.put_object(
                    Bucket=location.bucket,
                    Key=location.key,
                    Body=body,
                    IfNoneMatch="*",
                    Metadata=record.to_metadata(),
                    **headers,
                    **self._requests.options(client, "PutObject"),
                )
            except ClientError as error:
                if answered(error, (409, 412), ("PreconditionFailed", "ConditionalRequestConflict")):
                    return False
                raise
        return True

    # -- put / get: see _upload and _download ---------------------------------------------------

    async def put(self, location: Location, body: Body, record: Record, *, force: bool = False) -> ObjectInfo:
        return await put(self._requests, location, body, record)

    async def get(self, info: ObjectInfo, sink: Sink) -> None:
        await get(self._requests, info, sink)

    async def head_for_reads(self, location: Location, *, one_of_many: bool = False) -> ObjectInfo | None:
        return await head_for_reads(self._requests, location, one_of_many=one_of_many)

    async def get_ranges(self, info: ObjectInfo, sink: RangeSink) -> None:
        await get_ranges(self._requests, info, sink)

    def ordered(self, info: ObjectInfo) -> OrderedRead:
        return ordered(self._requests, info)

    async def read_range(self, info: ObjectInfo, offset: int, length: int) -> bytes:
        return await read_range(self._requests, info, offset, length)

    async def read_range_into(self, info: ObjectInfo, offset: int, buffers: Sequence[memoryview]) -> Sequence[int]:
        return await read_range_into(self._requests, info, offset, buffers)


def _may_name_a_folder(key: str) -> bool:
    """Whether the prefix ``key`` names the folder ``key/`` when that holds anything (see
    ``_base.under``): a prefix ending in ``/``, or the whole bucket, is listed as it is."""
    return bool(key) and not key.endswith("/")
