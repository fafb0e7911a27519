"""S3 and S3-compatible stores through aiobotocore: the only importer of (aio)botocore.

Save: one PUT for small objects; otherwise a multipart upload fed as a stream, parts cut from the
producer and uploaded concurrently while it keeps going, each with a CRC32 (or Content-MD5) the
server verifies, the whole object's CRC32 sent with CompleteMultipartUpload. The object appears only
when Complete succeeds; on any error or cancellation the upload is aborted.

Load: HEAD for size, ETag and checksum, then concurrent ranged GETs pinned to that ETag
(``If-Match``), delivered in order, the range whose turn it is as its bytes arrive. A range that
fails half-way is resumed where it stopped, on its own.

One client (and connection pool) per event loop and settings; it is closed when its loop shuts
down its async generators (``asyncio.run`` and anyio do), through the generator that holds it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import random
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import anyio
import anyio.lowlevel
import anyio.to_thread
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    DataNotFoundError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.loaders import JSONFileLoader, Loader

from .. import _codec
from .._concurrency import one_error
from .._config import TransferConfig
from .._exceptions import (
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointError,
    ConcurrentModificationError,
    SourceChangedError,
    StoreError,
    StoreUnavailableError,
)
from .._location import Location
from .._planning import check_object_size, part_size_for_known_size, part_size_for_stream, ranges
from ._base import Blocks, Body, ObjectInfo, PendingWrite, RangeSink, Record, Sink

__all__ = ["S3Store"]

logger = logging.getLogger(__name__)

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
#: How long an abort may take once a save failed or was cancelled.
_ABORT_TIMEOUT = 60.0


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _crc32_b64(crc: int) -> str:
    return _b64(crc.to_bytes(4, "big"))


def endpoint_for(config: TransferConfig) -> str | None:
    """The endpoint in force: the setting, else botocore's environment variables."""
    return config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


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


class _Received:
    """The blocks of one range as the connection hands them over, for a reader taking them in order.

    aiohttp's ``readany`` gives its buffers without copying; nothing is joined on the event loop.
    With a ``limit``, :meth:`add` waits while more than that many bytes are waiting to be taken:
    the connection then stops reading, and TCP's flow control holds the rest at the server.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.blocks: Blocks = []
        self.length = 0
        self.done = False
        self._arrived = anyio.Event()
        self._limit = limit
        self._held = 0
        self._taken = anyio.Event()

    async def add(self, block: bytes) -> None:
        self.blocks.append(block)
        self.length += len(block)
        self._held += len(block)
        self._arrived.set()
        while self._limit is not None and self._held > self._limit:
            self._taken = anyio.Event()
            await self._taken.wait()

    def finish(self) -> None:
        self.done = True
        self._arrived.set()

    async def take(self) -> Blocks:
        """The blocks received since the last call, waiting for some; ``[]`` once the range is done."""
        while not self.blocks and not self.done:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        blocks, self.blocks = self.blocks, []
        self._held = 0
        self._taken.set()
        return blocks


async def _read_into(body: Any, received: _Received, limit: int) -> None:
    """Append a response body to ``received`` block by block; more than ``limit`` bytes is an error."""
    content: Any = getattr(getattr(body, "raw_stream", None), "content", None)
    read = content.readany if hasattr(content, "readany") else body.read  # the latter: another HTTP backend
    while block := await read():
        if received.length + len(block) > limit:
            raise ResponseStreamingError(error=f"the server sent more than the {limit} bytes asked for")
        await received.add(block)


class _Clients:
    """One aiobotocore client per (event loop, settings), closed with its loop."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    async def get(self, config: TransferConfig) -> Any:
        loop = asyncio.get_running_loop()
        self._forget_closed_loops()
        clients = self._by_loop.setdefault(loop, {})
        endpoint = endpoint_for(config)
        key = (
            endpoint,
            config.region_name,
            config.profile,
            config.addressing_style,
            config.max_attempts,
            config.connect_timeout,
            config.read_timeout,
            config.max_concurrency,
        )
        entry = clients.get(key)
        if entry is not None:
            return entry[0]
        lock = self._locks.setdefault(loop, asyncio.Lock())
        async with lock:
            entry = clients.get(key)
            if entry is None:
                keeper = self._keep(config, endpoint, clients, key)
                client = await keeper.__anext__()
                entry = clients[key] = (client, keeper)
        return entry[0]

    def _forget_closed_loops(self) -> None:
        """Drop the clients of loops closed without ``shutdown_asyncgens()`` (``asyncio.run``
        calls it; ``new_event_loop() ... close()`` does not): each holds its loop, so the weak
        keys never went, and a process making loop after loop kept ~8 MB per loop."""
        for loop in [loop for loop in self._by_loop if loop.is_closed()]:
            self._by_loop.pop(loop, None)
            self._locks.pop(loop, None)

    @staticmethod
    async def _keep(
        config: TransferConfig, endpoint: str | None, clients: dict[tuple[Any, ...], Any], key: tuple[Any, ...]
    ) -> AsyncIterator[Any]:
        addressing = config.addressing_style or ("path" if endpoint else "auto")
        botocore_config = Config(
            # total_max_attempts: the first try included, as max_attempts is documented (botocore reads
            # its own max_attempts as the number of retries, one more attempt than asked for)
            retries={"total_max_attempts": config.max_attempts, "mode": "standard"},
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_pool_connections=config.max_concurrency * 2,
            # Every body we send carries a CRC32 or Content-MD5 header the server verifies, and the
            # header is signed: SHA-256 over every payload byte (botocore's default on plain HTTP)
            # would cost a core's worth of hashing and buy no more integrity.
            s3={"addressing_style": addressing, "payload_signing_enabled": False},
            # We send the checksums we compute ourselves, as headers, which S3-compatible servers
            # accept; botocore's own defaults (aws-chunked trailers) break several of them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = await anyio.to_thread.run_sync(_prepared_session, config.profile)
        # Over plain HTTP there is no certificate to verify; saying so spares the first request
        # building a TLS context from the CA bundle (~30 ms of a cold start, in a thread).
        plain_http = endpoint is not None and endpoint.lower().startswith("http://")
        try:
            async with session.create_client(
                "s3",
                endpoint_url=endpoint,
                region_name=config.region_name,
                config=botocore_config,
                **({"verify": False} if plain_http else {}),
            ) as client:
                _report_retries(client, config.max_attempts)
                yield client  # held here until the loop shuts down its async generators
        finally:
            clients.pop(key, None)


_clients = _Clients()

#: Where a request's context keeps why its last attempt failed, for the line of the next one.
_FAILURE = "checkpointio_failure"


def _report_retries(client: Any, max_attempts: int) -> None:
    """Log at INFO each request botocore retries, with the attempt and why: an unreachable
    endpoint otherwise retries in silence for up to ~20 s with the default five attempts."""

    def remember(request_dict: dict[str, Any], caught_exception: Exception | None = None, **kwargs: Any) -> None:
        response = kwargs.get("response")
        if caught_exception is not None:
            reason = f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None and response[0].status_code >= 300:
            error = response[1].get("Error", {}) if isinstance(response[1], dict) else {}
            reason = f"HTTP {response[0].status_code} {error.get('Code', '')}".rstrip()
        else:
            return
        request_dict.get("context", {})[_FAILURE] = reason

    def announce(request: Any, operation_name: str, **_: Any) -> None:
        attempt = request.context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            target = request.url.split("?", 1)[0]
            failure = request.context.get(_FAILURE, "an error")
            logger.info(
                "retrying %s %s (attempt %d of %d) after %s", operation_name, target, attempt, max_attempts, failure
            )

    client.meta.events.register("needs-retry.s3", remember)
    client.meta.events.register("request-created.s3", announce)


class _Services(Sequence[str]):
    """The services a loader knows, as botocore asks for them: mostly ``"s3" in services``.

    botocore answers that by listing ~400 service folders, twice (~15 ms of a cold start); here
    ``in`` looks in the one folder asked about, and the whole list is made only if iterated.
    """

    def __init__(self, loader: Loader, type_name: str) -> None:
        self._loader = loader
        self._type_name = type_name
        self._all: list[str] | None = None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            return False
        try:
            return bool(self._loader.list_api_versions(name, self._type_name))
        except DataNotFoundError:
            return False

    def _everything(self) -> list[str]:
        if self._all is None:
            self._all = Loader.list_available_services(self._loader, self._type_name)
        return self._all

    def __getitem__(self, index: Any) -> Any:
        return self._everything()[index]

    def __len__(self) -> int:
        return len(self._everything())


class _PlainJSONFileLoader(JSONFileLoader):  # type: ignore[misc]  # botocore has no type hints
    """botocore's model files parsed into plain dicts (ordered, as every dict) instead of
    ``OrderedDict``: 2-3x faster to parse (S3's model and the endpoint data: ~13 ms less)."""

    def load_file(self, file_path: str) -> Any:
        for extension, opener in ((".json", open), (".json.gz", gzip.open)):
            full_path = file_path + extension
            if os.path.isfile(full_path):
                with opener(full_path, "rb") as file:
                    return json.loads(file.read().decode("utf-8"))
        return super().load_file(file_path)  # a format this botocore added since


class _DataLoader(Loader):  # type: ignore[misc]  # botocore has no type hints
    """botocore's data loader, quicker to start: see :class:`_Services` and :class:`_PlainJSONFileLoader`."""

    def list_available_services(self, type_name: str) -> Any:
        return _Services(self, type_name)


def _data_loader(session: AioSession) -> Loader:
    """What botocore's ``create_loader`` builds, with the faster parts (``AWS_DATA_PATH`` honoured)."""
    data_path = session.get_config_variable("data_path")
    paths = None
    if data_path:
        paths = [os.path.expanduser(os.path.expandvars(path)) for path in data_path.split(os.pathsep)]
    return _DataLoader(extra_search_paths=paths, file_loader=_PlainJSONFileLoader())


def _prepared_session(profile: str | None) -> AioSession:
    """A session with S3's service model and endpoint rules already parsed.

    Creating a client parses ~60 ms of botocore JSON; done here, in a worker thread, the client
    itself is then created on the event loop in a few milliseconds instead of stalling it.
    """
    session = AioSession(profile=profile)
    try:
        session.register_component("data_loader", _data_loader(session))
        loader = session.get_component("data_loader")
        loader.load_service_model("s3", "service-2")
        loader.load_service_model("s3", "endpoint-rule-set-1")
        loader.load_data("partitions")
        loader.load_data("sdk-default-configuration")
        session._get_internal_component("endpoint_resolver")
    except Exception as error:  # pragma: no cover - botocore internals moved: merely slower
        logger.debug("could not preload botocore data: %s", error)
    return session


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


def _request_options(config: TransferConfig) -> dict[str, Any]:
    """The settings' S3 request parameters, by botocore's names (what boto3's ``ExtraArgs`` take)."""
    options: dict[str, Any] = {}
    if config.server_side_encryption is not None:
        options["ServerSideEncryption"] = config.server_side_encryption
    if config.sse_kms_key_id is not None:
        options["SSEKMSKeyId"] = config.sse_kms_key_id
    if config.bucket_key_enabled is not None:
        options["BucketKeyEnabled"] = config.bucket_key_enabled
    if config.storage_class is not None:
        options["StorageClass"] = config.storage_class
    if config.tags:
        options["Tagging"] = urlencode(config.tags, quote_via=quote, safe="")  # S3: a URL query string
    if config.expected_bucket_owner is not None:
        options["ExpectedBucketOwner"] = config.expected_bucket_owner
    if config.requester_pays:
        options["RequestPayer"] = "requester"
    return options


#: The input parameters of each S3 operation, as botocore's service model lists them.
_accepted: dict[str, frozenset[str]] = {}


class S3Store:
    """Checkpoints as objects in S3 or an S3-compatible store."""

    def __init__(self, config: TransferConfig) -> None:
        self._config = config
        self._options = _request_options(config)

    async def _client(self) -> Any:
        return await _clients.get(self._config)

    def _for(self, client: Any, operation: str) -> dict[str, Any]:
        """The request options ``operation`` takes, by botocore's model of its input.

        So each goes to every request that takes it and to no other: the owner to every one
        (HeadBucket included), the payer to all but HeadBucket, encryption, storage class and
        tags to PutObject and CreateMultipartUpload only.
        """
        if not self._options:
            return {}
        accepted = _accepted.get(operation)
        if accepted is None:
            shape = client.meta.service_model.operation_model(operation).input_shape
            accepted = _accepted[operation] = frozenset(shape.members)
        return {name: value for name, value in self._options.items() if name in accepted}

    def _error(self, error: Exception, location: Location, action: str) -> Exception:
        return _translate(error, location, action, self._config.expected_bucket_owner)

    # -- head / delete / list / unfinished uploads ---------------------------------------------

    async def head(self, location: Location) -> ObjectInfo | None:
        client = await self._client()
        try:
            response = await client.head_object(
                Bucket=location.bucket, Key=location.key, ChecksumMode="ENABLED", **self._for(client, "HeadObject")
            )
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                await self._check_bucket(client, location)
                return None
            raise self._error(error, location, "read the checkpoint's metadata") from error
        except Exception as error:
            raise self._error(error, location, "read the checkpoint's metadata") from error
        server_crc = None
        checksum = response.get("ChecksumCRC32")
        # A composite (per-part) checksum ends in "-N" and says nothing about the whole content.
        if checksum and "-" not in checksum and response.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            server_crc = int.from_bytes(base64.b64decode(checksum), "big")
        modified = response.get("LastModified")
        return ObjectInfo(
            location,
            int(response["ContentLength"]),
            response["ETag"],
            Record.from_metadata(response.get("Metadata", {})),
            server_crc32=server_crc,
            modified=modified.timestamp() if modified is not None else None,
        )

    async def _check_bucket(self, client: Any, location: Location) -> None:
        """A 404 on HEAD does not say whether the key or the bucket is missing: ask.

        Only a 404 means the bucket is missing. A 403 means it exists and these credentials may
        not look at the bucket itself (object-only permissions, as with GCS interop's
        ``objectAdmin`` role): the key is what is missing, and a first attempt must see "no
        checkpoint", not an access error.
        """
        try:
            await client.head_bucket(Bucket=location.bucket, **self._for(client, "HeadBucket"))
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise BucketNotFoundError(
                    f"{location.uri}: bucket {location.bucket!r} does not exist", uri=location.uri
                ) from error
            if status == 403:
                logger.debug("no permission to HEAD bucket %r; %s is missing", location.bucket, location)
                return
            raise self._error(error, location, "check the bucket") from error

    async def delete(self, location: Location) -> bool:
        client = await self._client()
        existed = await self.head(location) is not None
        try:
            await client.delete_object(Bucket=location.bucket, Key=location.key, **self._for(client, "DeleteObject"))
        except Exception as error:
            raise self._error(error, location, "delete the checkpoint") from error
        return existed

    async def pending(self, prefix: Location) -> list[PendingWrite]:
        client = await self._client()
        found: list[PendingWrite] = []
        try:
            paginator = client.get_paginator("list_multipart_uploads")
            options = self._for(client, "ListMultipartUploads")
            async for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key, **options):
                for upload in page.get("Uploads", []):
                    initiated = upload.get("Initiated")
                    found.append(
                        PendingWrite(
                            Location("s3", prefix.bucket, upload["Key"]),
                            upload["UploadId"],
                            initiated.timestamp() if initiated is not None else None,
                        )
                    )
        except Exception as error:
            raise self._error(error, prefix, "list incomplete uploads") from error
        return sorted(found, key=lambda write: (write.started or 0.0, write.location.key))

    async def discard(self, write: PendingWrite) -> bool:
        client = await self._client()
        location = write.location
        try:
            await client.abort_multipart_upload(
                Bucket=location.bucket,
                Key=location.key,
                UploadId=write.ident,
                **self._for(client, "AbortMultipartUpload"),
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "NoSuchUpload":
                return False
            raise self._error(error, location, f"abort upload {write.ident}") from error
        except Exception as error:
            raise self._error(error, location, f"abort upload {write.ident}") from error
        return True

    async def list(self, prefix: Location) -> list[ObjectInfo]:
        client = await self._client()
        found: list[ObjectInfo] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(
                Bucket=prefix.bucket, Prefix=prefix.key, **self._for(client, "ListObjectsV2")
            ):
                for item in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            Location("s3", prefix.bucket, item["Key"]),
                            int(item["Size"]),
                            item["ETag"],
                            modified=item["LastModified"].timestamp(),
                        )
                    )
        except Exception as error:
            raise self._error(error, prefix, "list checkpoints") from error
        return sorted(found, key=lambda info: info.location.key)

    async def create(self, location: Location, data: bytes, record: Record) -> bool:
        """A PUT with ``If-None-Match: *``, which S3 applies atomically: 412 means the key exists, 409
        that a concurrent conditional write to it is in progress (it, not this one, takes the key).

        A server that ignores the header (some S3-compatible ones) overwrites instead: the claim
        then holds only as well as a plain PUT.
        """
        client = await self._client()
        body, _size, headers = self._request_body([data])
        try:
            await client.put_object(
                Bucket=location.bucket,
                Key=location.key,
                Body=body,
                IfNoneMatch="*",
                Metadata=record.to_metadata(),
                **headers,
                **self._for(client, "PutObject"),
            )
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.response.get("Error", {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._error(error, location, "create the object") from error
        except Exception as error:
            raise self._error(error, location, "create the object") from error
        return True

    # -- put -------------------------------------------------------------------------------------

    async def put(self, location: Location, body: Body, record: Record) -> ObjectInfo:
        config = self._config
        if body.size is not None:
            check_object_size(body.size, location.uri)
            part_size = part_size_for_known_size(body.size, config.part_size)
        else:
            part_size = config.part_size
        stream = aiter(body)
        # Chunks are gathered as a list and joined in a worker thread: growing one buffer on the
        # event loop would copy every byte there, two or three times.
        first: Pieces = []
        held = 0
        ended = False
        while held < max(part_size, config.multipart_threshold):
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                ended = True
                break
            first.append(chunk)
            held += len(chunk)
        if ended and held < config.multipart_threshold:
            return await self._put_single(location, first, record.completed(body.digest))
        return await self._put_multipart(location, body, stream, first, record, part_size)

    def _request_body(
        self, pieces: Pieces, crc: int | None = None, reuse: io.BytesIO | None = None
    ) -> tuple[io.BytesIO, int, dict[str, str]]:
        """Worker thread: one request's body, its size and the checksum header the server verifies.

        The body is a file object, not bytes: aiohttp then writes it in 64 KiB pieces as the
        socket drains, where bytes would be copied whole into the transport's buffer (and shifted
        down after every send) on the event loop. It is allocated once at its exact size (growing
        it write by write fragmented the heap: +20% peak RSS over a 1 GiB tree) and filled piece by
        piece, so the GIL is released between pieces (one 16 MiB copy would hold it, and the event
        loop with it, for ~10 ms); aiohttp then finds a buffer of its own, with nothing to copy.
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
        digest = None if self._config.flexible_checksums else hashlib.md5()
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

    async def _put_single(self, location: Location, pieces: Pieces, record: Record) -> ObjectInfo:
        client = await self._client()
        body, size, headers = await anyio.to_thread.run_sync(self._request_body, pieces, record.crc32)
        try:
            response = await client.put_object(
                Bucket=location.bucket,
                Key=location.key,
                Body=body,
                Metadata=record.to_metadata(),
                **headers,
                **self._for(client, "PutObject"),
            )
        except Exception as error:
            raise self._error(error, location, "upload the checkpoint") from error
        return ObjectInfo(location, size, response["ETag"], record)

    async def _put_multipart(
        self,
        location: Location,
        body: Body,
        stream: AsyncIterator[bytes],
        first: Pieces,
        record: Record,
        part_size: int,
    ) -> ObjectInfo:
        config = self._config
        client = await self._client()
        if body.size is not None and body.crc32_up_front is not None:
            # The metadata is set now, before any part: read the source once more for its CRC32,
            # so the object carries one a load can check on any server (many keep no CRC32 of a
            # multipart object's whole content; then it would be checked for its length only).
            crc = await anyio.to_thread.run_sync(body.crc32_up_front)
            record = dataclasses.replace(record, size=body.size, crc32=crc)
        extra = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"} if config.flexible_checksums else {}
        try:
            # Shielded: cancelled after the server created the upload but before we learnt its id,
            # it could never be aborted. The id is ours the moment it exists.
            with anyio.CancelScope(shield=True):
                created = await client.create_multipart_upload(
                    Bucket=location.bucket,
                    Key=location.key,
                    Metadata=record.to_metadata(),
                    **extra,
                    **self._for(client, "CreateMultipartUpload"),
                )
        except Exception as error:
            raise self._error(error, location, "start the upload") from error
        upload_id = created["UploadId"]
        parts: dict[int, dict[str, Any]] = {}
        slots = anyio.Semaphore(config.max_concurrency)
        # Bodies of parts already sent, refilled for the next parts: a transfer allocates at most
        # max_concurrency of them, instead of a new 16 MiB buffer per part, which left freed
        # buffers spread over the worker threads' malloc arenas (peak RSS up to +80 MiB).
        spare: list[io.BytesIO] = []

        async def upload_part(number: int, pieces: Pieces) -> None:
            try:
                reuse = spare.pop() if spare else None
                body, _, headers = await anyio.to_thread.run_sync(self._request_body, pieces, None, reuse)
                response = await client.upload_part(
                    Bucket=location.bucket,
                    Key=location.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    **headers,
                    **self._for(client, "UploadPart"),
                )
                part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
                if "ChecksumCRC32" in headers:
                    part["ChecksumCRC32"] = headers["ChecksumCRC32"]
                parts[number] = part
                spare.append(body)  # sent and acknowledged: nothing reads it any more
            except Exception as error:
                raise self._error(error, location, f"upload part {number}") from error
            finally:
                slots.release()

        try:
            await anyio.lowlevel.checkpoint()  # a cancellation that arrived during the shield
            pieces = first
            held = sum(len(piece) for piece in pieces)
            number = 0
            total = 0
            with one_error():
                async with anyio.create_task_group() as group:
                    ended = False
                    while not ended or pieces:
                        size = part_size if body.size is not None else part_size_for_stream(number, part_size)
                        while not ended and held < size:
                            try:
                                chunk = await anext(stream)
                            except StopAsyncIteration:
                                ended = True
                                break
                            pieces.append(chunk)
                            held += len(chunk)
                        if not pieces:
                            break
                        part, pieces = _cut(pieces, size)
                        length = min(size, held)
                        held -= length
                        number += 1
                        total += length
                        check_object_size(total, location.uri)
                        await slots.acquire()  # at most max_concurrency parts in flight
                        group.start_soon(upload_part, number, part)
            if record.crc32 is not None and (body.digest.crc32, body.digest.length) != (record.crc32, record.size):
                raise SourceChangedError(
                    f"{location.uri}: the source changed while it was saved (read again, it no longer has "
                    f"the size and CRC32 recorded when the upload started); the previous checkpoint stays",
                    uri=location.uri,
                )
            complete: dict[str, Any] = {"MultipartUpload": {"Parts": [parts[n] for n in sorted(parts)]}}
            if config.flexible_checksums:
                complete.update(ChecksumCRC32=_crc32_b64(body.digest.crc32), ChecksumType="FULL_OBJECT")
            try:
                response = await client.complete_multipart_upload(
                    Bucket=location.bucket,
                    Key=location.key,
                    UploadId=upload_id,
                    **complete,
                    **self._for(client, "CompleteMultipartUpload"),
                )
            except Exception as error:
                raise self._error(error, location, "complete the upload") from error
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_ABORT_TIMEOUT):
                await self._abort(client, location, upload_id)
            raise
        return ObjectInfo(location, total, response["ETag"], record.completed(body.digest))

    async def _abort(self, client: Any, location: Location, upload_id: str) -> None:
        """Abort, and repeat until no part is listed (S3 may keep parts uploaded during an abort)."""
        for attempt in range(3):
            try:
                where = {"Bucket": location.bucket, "Key": location.key, "UploadId": upload_id}
                await client.abort_multipart_upload(**where, **self._for(client, "AbortMultipartUpload"))
                listed = await client.list_parts(**where, **self._for(client, "ListParts"))
                if not listed.get("Parts"):
                    return
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return
                logger.warning("aborting upload %s of %s failed: %s", upload_id, location.uri, error)
            except Exception as error:
                logger.warning("aborting upload %s of %s failed: %s", upload_id, location.uri, error)
            await anyio.sleep(0.2 * 2**attempt)
        logger.error("could not abort upload %s of %s; `checkpointio gc` can remove it", upload_id, location.uri)

    # -- get -------------------------------------------------------------------------------------

    async def get(self, info: ObjectInfo, sink: Sink) -> None:
        # Ranges are fetched concurrently; the one whose turn it is streams on as its blocks arrive
        # (the first bytes reach the sink as soon as the server sends them, not after a whole
        # range). A range holds its slot until delivered, so at most max_concurrency ranges are
        # held; slots are taken in order, so the range being delivered always has one.
        config = self._config
        client = await self._client()
        spans = ranges(info.size, config.part_size)
        count = max(1, len(spans))
        # Made when their range starts or is due, dropped once delivered: at most max_concurrency
        # + 1 at a time (one per range up front was ~2 KB each: 130 MB for a 1 TiB archive).
        received: dict[int, _Received] = {}
        slots = anyio.Semaphore(config.max_concurrency)

        def range_buffer(index: int) -> _Received:
            one = received.get(index)
            if one is None:
                one = received[index] = _Received()
            return one

        async def fetch(index: int) -> None:
            await self._get_range(client, info, spans[index] if len(spans) > 1 else None, range_buffer(index))

        async def deliver() -> None:
            gather = _Gather(config.chunk_size, sink)  # as received: joining them is the consumer's call
            for index in range(count):
                one = range_buffer(index)
                while blocks := await one.take():
                    await gather.add(blocks)
                del received[index]
                slots.release()
            await gather.flush()

        with one_error():
            async with anyio.create_task_group() as group:
                group.start_soon(deliver)
                for index in range(count):
                    await slots.acquire()
                    group.start_soon(fetch, index)

    async def get_ranges(self, info: ObjectInfo, sink: RangeSink) -> None:
        config = self._config
        client = await self._client()
        spans = ranges(info.size, config.part_size) or [(0, -1)]  # an empty object: one plain GET
        slots = anyio.Semaphore(config.max_concurrency)

        async def fetch(span: tuple[int, int]) -> None:
            # Each range is handed on in pieces of about chunk_size as its bytes arrive, at their
            # offsets: writing overlaps receiving, and memory is freed (and reused) piece by piece.
            position = span[0]

            async def at_position(blocks: Blocks) -> None:
                nonlocal position
                length = sum(map(len, blocks))
                await sink(position, blocks)
                position += length

            try:
                # Bounded: a range waits for its bytes to be written instead of piling up in memory
                # (each range has its own connection and its own offset, so none waits for another).
                received = _Received(limit=2 * config.chunk_size)
                gather = _Gather(config.chunk_size, at_position)
                async with anyio.create_task_group() as group:
                    group.start_soon(self._get_range, client, info, span if len(spans) > 1 else None, received)
                    while blocks := await received.take():
                        await gather.add(blocks)
                    await gather.flush()
            finally:
                slots.release()  # at most max_concurrency ranges held, fetched or being written

        with one_error():
            async with anyio.create_task_group() as group:
                for span in spans:
                    await slots.acquire()
                    group.start_soon(fetch, span)

    async def _get_range(
        self, client: Any, info: ObjectInfo, span: tuple[int, int] | None, received: _Received
    ) -> None:
        """GET one range (or the whole object) into ``received``, pinned to the ETag.

        A read that fails half-way is resumed where it stopped, by this range alone.
        """
        location = info.location
        first, last = span if span is not None else (0, info.size - 1)
        expected = last - first + 1
        attempts = self._config.max_attempts
        for attempt in range(attempts):
            if attempt and received.length == expected:  # the error came after the last byte
                break
            kwargs: dict[str, Any] = {
                "Bucket": location.bucket,
                "Key": location.key,
                "IfMatch": info.etag,
                **self._for(client, "GetObject"),
            }
            start = first + received.length
            if span is not None or received.length:
                kwargs["Range"] = f"bytes={start}-{last}"
            try:
                response = await client.get_object(**kwargs)
                async with response["Body"] as body:
                    if "Range" in kwargs and response.get("ContentRange") != f"bytes {start}-{last}/{info.size}":
                        raise StoreError(
                            f"{location.uri}: asked the server for bytes {start}-{last}, it sent "
                            f"{response.get('ContentRange') or 'the whole object'} (does it support ranged GETs?)",
                            uri=location.uri,
                        )
                    await _read_into(body, received, expected)
                if received.length != expected:
                    raise ResponseStreamingError(error=f"got {received.length} of {expected} bytes")
                break
            except ClientError as error:
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    raise ConcurrentModificationError(
                        f"{location.uri}: removed while being read", uri=location.uri
                    ) from error
                raise self._error(error, location, "download the checkpoint") from error
            except _TRANSIENT_READ_ERRORS as error:
                if attempt + 1 >= attempts:
                    raise self._error(error, location, "download the checkpoint") from error
                logger.info("retrying a range of %s after: %s", location.uri, error)
                await anyio.sleep(min(20.0, random.uniform(0, 0.1 * 2**attempt)))
            except CheckpointError:
                raise
            except Exception as error:
                raise self._error(error, location, "download the checkpoint") from error
        received.finish()

    async def read_range(self, info: ObjectInfo, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        received = _Received()
        await self._get_range(await self._client(), info, (offset, offset + length - 1), received)
        blocks = received.blocks
        return blocks[0] if len(blocks) == 1 else b"".join(blocks)


class _Gather:
    """Hands blocks on in groups of about ``step`` bytes (fewer, larger hand-overs)."""

    def __init__(self, step: int, sink: Sink) -> None:
        self._step = step
        self._sink = sink
        self._group: Blocks = []
        self._held = 0

    async def add(self, blocks: Blocks) -> None:
        for block in blocks:
            self._group.append(block)
            self._held += len(block)
            if self._held >= self._step:
                await self.flush()

    async def flush(self) -> None:
        if self._group:
            group, self._group, self._held = self._group, [], 0
            await self._sink(group)
