"""Save: one PUT for small objects; otherwise a multipart upload fed as a stream.

Parts are cut from the producer and uploaded concurrently while it keeps going, each with a CRC32
(or Content-MD5) the server verifies, the whole object's CRC32 sent with CompleteMultipartUpload.
The object appears only when Complete succeeds; on any error or cancellation the upload is aborted.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from ... import _codec
from ..._concurrency import one_error
from ..._exceptions import SourceChangedError
from ..._location import Location
from ..._planning import check_object_size, part_size_for_known_size, part_size_for_stream
from .._base import Body, ObjectInfo, Record
from ._client import _Requests
from ._errors import answered

logger = logging.getLogger(__name__)

#: How long an abort may take once a save failed or was cancelled.
_ABORT_TIMEOUT = 60.0


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _crc32_b64(crc: int) -> str:
    return _b64(crc.to_bytes(4, "big"))


Pieces = list[bytes | memoryview]


def _cut(pieces: Pieces, size: int) -> tuple[Pieces, Pieces]:
    """Split a list of byte pieces after ``size`` bytes, slicing (not copying) the piece that straddles."""
    taken: Pieces = []
    held = 0
    for index, piece in enumerate(pieces):
        if held + len(piece) > size:
            view = memoryview(piece)
            cut = size - held
            if cut:
                taken.append(view[:cut])
            return taken, [view[cut:], *pieces[index + 1 :]]
        taken.append(piece)
        held += len(piece)
    return taken, []


async def _gather(stream: AsyncIterator[bytes], pieces: Pieces, held: int, size: int) -> tuple[int, bool]:
    """Append chunks of ``stream`` to ``pieces`` (which hold ``held`` bytes) until they hold at
    least ``size`` bytes or the stream ends; the bytes they hold then, and whether it ended."""
    while held < size:
        try:
            chunk = await anext(stream)
        except StopAsyncIteration:
            return held, True
        pieces.append(chunk)
        held += len(chunk)
    return held, False


async def put(requests: _Requests, location: Location, body: Body, record: Record) -> ObjectInfo:
    config = requests.config
    if body.size is not None:
        check_object_size(body.size, location.uri)
        part_size = part_size_for_known_size(body.size, config.part_size)
    else:
        part_size = config.part_size
    stream = aiter(body)
    # Chunks are gathered as a list and joined in a worker thread: growing one buffer on the
    # event loop would copy every byte there, two or three times.
    first: Pieces = []
    held, ended = await _gather(stream, first, 0, max(part_size, config.multipart_threshold))
    if ended and held < config.multipart_threshold:
        return await _put_single(requests, location, first, record.completed(body.digest))
    return await _put_multipart(requests, location, body, stream, first, record, part_size)


def request_body(
    requests: _Requests, pieces: Pieces, crc: int | None = None, reuse: io.BytesIO | None = None
) -> tuple[io.BytesIO, int, dict[str, str]]:
    """Worker thread: one request's body, its size and the checksum header the server verifies.

    The body is a file object, not bytes: aiohttp then writes it in 64 KiB pieces as the
    socket drains, where bytes would be copied whole into the transport's buffer (and shifted
    down after every send) on the event loop. It is allocated once at its exact size (growing
    it write by write fragments the heap and raises peak RSS) and filled piece by piece, so the
    GIL is released between pieces (one whole-part copy would hold it, and the event loop with
    it); aiohttp then finds a buffer of its own, with nothing to copy.
    botocore seeks back to resend it on a retry. ``reuse``, the body of a part whose upload
    finished, is overwritten when it has the same size.
    """
    size = sum(len(piece) for piece in pieces)
    fits = False
    if reuse is not None:
        with reuse.getbuffer() as view:  # an export: released before the buffer is written
            fits = view.nbytes == size
    if reuse is not None and fits:
        body = reuse
        body.seek(0)
    else:
        body = io.BytesIO()
        if size:  # one allocation of the exact size: no chain of reallocations as it fills
            body.seek(size - 1)
            body.write(b"\0")
            body.seek(0)
    running = 0
    digest = None if requests.config.flexible_checksums else hashlib.md5()
    pieces.reverse()
    while pieces:  # each piece is let go once copied: a part is not held twice while it is built
        piece = pieces.pop()
        body.write(piece)
        if digest is not None:
            digest.update(piece)
        elif crc is None:
            running = _codec.crc32(piece, running)
        del piece
    body.seek(0)
    if digest is not None:
        return body, size, {"ContentMD5": _b64(digest.digest())}
    return body, size, {"ChecksumCRC32": _crc32_b64(running if crc is None else crc)}


async def _put_single(requests: _Requests, location: Location, pieces: Pieces, record: Record) -> ObjectInfo:
    client = await requests.client(location)
    body, size, headers = await anyio.to_thread.run_sync(request_body, requests, pieces, record.crc32)
    with requests.mapped_errors(location, "upload the checkpoint"):
        response = await client.put_object(
            Bucket=location.bucket,
            Key=location.key,
            Body=body,
            Metadata=record.to_metadata(),
            **headers,
            **requests.options(client, "PutObject"),
        )
    return ObjectInfo(location, size, response["ETag"], record)


async def _put_multipart(
    requests: _Requests,
    location: Location,
    body: Body,
    stream: AsyncIterator[bytes],
    first: Pieces,
    record: Record,
    part_size: int,
) -> ObjectInfo:
    """Create the upload, upload its parts, check the source, complete; abort on any error or cancellation."""
    if body.size is not None and body.crc32_up_front is not None:
        # The metadata is set now, before any part: read the source once more for its CRC32,
        # so the object carries one a load can check on any server (many keep no CRC32 of a
        # multipart object's whole content; then it would be checked for its length only).
        crc = await anyio.to_thread.run_sync(body.crc32_up_front)
        record = dataclasses.replace(record, size=body.size, crc32=crc)
    upload = await _Multipart.create(requests, location, record)
    try:
        await anyio.lowlevel.checkpoint()  # a cancellation that arrived while the creation was shielded
        total = await upload.upload_parts(body, stream, first, part_size)
        if record.crc32 is not None and (body.digest.crc32, body.digest.length) != (record.crc32, record.size):
            raise SourceChangedError(
                f"{location.uri}: the source changed while it was saved (read again, it no longer has "
                f"the size and CRC32 recorded when the upload started); the previous checkpoint stays",
                uri=location.uri,
            )
        etag = await upload.complete(body.digest.crc32)
    except BaseException:
        await upload.abort()
        raise
    return ObjectInfo(location, total, etag, record.completed(body.digest))


class _Multipart:
    """One multipart upload: the parts the server acknowledged, and the bodies of sent parts for reuse."""

    def __init__(self, requests: _Requests, client: Any, location: Location, upload_id: str) -> None:
        self._requests = requests
        self._client = client
        self._location = location
        self._upload_id = upload_id
        self._where = {"Bucket": location.bucket, "Key": location.key, "UploadId": upload_id}
        self._parts: dict[int, dict[str, Any]] = {}
        self._slots = anyio.Semaphore(requests.config.max_concurrency)
        # Bodies of parts already sent, refilled for the next parts: a transfer allocates at most
        # max_concurrency of them, not one per part, whose freed buffers would spread over the
        # worker threads' malloc arenas and make peak RSS drift from run to run.
        self._spare: list[io.BytesIO] = []

    @classmethod
    async def create(cls, requests: _Requests, location: Location, record: Record) -> _Multipart:
        client = await requests.client(location)
        flexible = requests.config.flexible_checksums
        extra = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"} if flexible else {}
        with requests.mapped_errors(location, "start the upload"):
            # Shielded: cancelled after the server created the upload but before we learnt its id,
            # it could never be aborted. The id is ours the moment it exists.
            with anyio.CancelScope(shield=True):
                created = await client.create_multipart_upload(
                    Bucket=location.bucket,
                    Key=location.key,
                    Metadata=record.to_metadata(),
                    **extra,
                    **requests.options(client, "CreateMultipartUpload"),
                )
        return cls(requests, client, location, created["UploadId"])

    async def upload_parts(self, body: Body, stream: AsyncIterator[bytes], first: Pieces, part_size: int) -> int:
        """Cut ``first`` and then the rest of ``stream`` into parts and upload them, at most
        max_concurrency at a time, while the stream goes on; the number of bytes uploaded."""
        pieces = first
        held = sum(len(piece) for piece in pieces)
        number = 0
        total = 0
        with one_error():
            async with anyio.create_task_group() as group:
                ended = False
                while not ended or pieces:
                    size = part_size if body.size is not None else part_size_for_stream(number, part_size)
                    if not ended:
                        held, ended = await _gather(stream, pieces, held, size)
                    if not pieces:
                        break
                    part, pieces = _cut(pieces, size)
                    length = min(size, held)
                    held -= length
                    number += 1
                    total += length
                    check_object_size(total, self._location.uri)
                    await self._slots.acquire()  # released by _upload_part
                    group.start_soon(self._upload_part, number, part)
        return total

    async def _upload_part(self, number: int, pieces: Pieces) -> None:
        client = self._client
        try:
            with self._requests.mapped_errors(self._location, f"upload part {number}"):
                reuse = self._spare.pop() if self._spare else None
                body, _, headers = await anyio.to_thread.run_sync(request_body, self._requests, pieces, None, reuse)
                response = await client.upload_part(
                    **self._where,
                    PartNumber=number,
                    Body=body,
                    **headers,
                    **self._requests.options(client, "UploadPart"),
                )
            part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
            if "ChecksumCRC32" in headers:
                part["ChecksumCRC32"] = headers["ChecksumCRC32"]
            self._parts[number] = part
            self._spare.append(body)  # sent and acknowledged: nothing reads it any more
        finally:
            self._slots.release()

    async def complete(self, crc32: int) -> str:
        """Complete the upload with the parts in order (and the whole object's CRC32); its ETag."""
        client = self._client
        complete: dict[str, Any] = {"MultipartUpload": {"Parts": [self._parts[n] for n in sorted(self._parts)]}}
        if self._requests.config.flexible_checksums:
            complete.update(ChecksumCRC32=_crc32_b64(crc32), ChecksumType="FULL_OBJECT")
        with self._requests.mapped_errors(self._location, "complete the upload"):
            response = await client.complete_multipart_upload(
                **self._where, **complete, **self._requests.options(client, "CompleteMultipartUpload")
            )
        etag: str = response["ETag"]
        return etag

    async def abort(self) -> None:
        """Abort, shielded and within _ABORT_TIMEOUT, and repeat until no part is listed (S3 may
        keep parts uploaded during an abort); a failure is logged, the caller's error goes on."""
        client, location, upload_id = self._client, self._location, self._upload_id
        with anyio.CancelScope(shield=True), anyio.move_on_after(_ABORT_TIMEOUT):
            for attempt in range(3):
                try:
                    await client.abort_multipart_upload(
                        **self._where, **self._requests.options(client, "AbortMultipartUpload")
                    )
                    listed = await client.list_parts(**self._where, **self._requests.options(client, "ListParts"))
                    if not listed.get("Parts"):
                        return
                except Exception as error:
                    if answered(error, codes=("NoSuchUpload",)):
                        return
                    logger.warning("aborting upload %s of %s failed: %s", upload_id, location.uri, error)
                await anyio.sleep(0.2 * 2**attempt)
            logger.error("could not abort upload %s of %s; `checkpointio gc` can remove it", upload_id, location.uri)
