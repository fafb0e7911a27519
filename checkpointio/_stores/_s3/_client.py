"""One aiobotocore client per event loop and settings, and the request options each operation takes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import weakref
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote, urlencode

import anyio
import anyio.to_thread
from aiobotocore.config import AioConfig

from ..._concurrency import ForkSafeLock, keep_forever
from ..._config import TransferConfig, is_endpoint
from ..._location import Location
from ._errors import mapped_errors
from ._http import BodySession
from ._loader import prepared_session
from ._receivers import on_receiver

logger = logging.getLogger(__name__)


def endpoint_for(config: TransferConfig) -> str | None:
    """The endpoint in force: the setting, else botocore's environment variables."""
    return config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class _Clients:
    """One aiobotocore client per (event loop, settings), closed with its loop.

    Several loops use it at once (the caller's and the receiving threads', :mod:`._receivers`):
    its dictionaries are changed under a thread lock, never held across an ``await``.
    """

    def __init__(self) -> None:
        self._guard = ForkSafeLock()  # a forked child finds it released
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    async def get(self, config: TransferConfig) -> Any:
        loop = asyncio.get_running_loop()
        with self._guard:
            self._forget_closed_loops()
            clients = self._by_loop.setdefault(loop, {})
            lock = self._locks.setdefault(loop, asyncio.Lock())
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
        async with lock:
            entry = clients.get(key)
            if entry is None:
                keeper = self._keep(config, endpoint, clients, key)
                client = await keeper.__anext__()
                entry = clients[key] = (client, keeper)
        return entry[0]

    def _forget_closed_loops(self) -> None:
        """Drop the clients of loops closed without ``shutdown_asyncgens()`` (``asyncio.run``
        calls it; ``new_event_loop() ... close()`` does not): each holds its loop, so its weak key
        never goes, and a process making loop after loop would keep every client it ever made."""
        for loop in [loop for loop in self._by_loop if loop.is_closed()]:
            self._by_loop.pop(loop, None)
            self._locks.pop(loop, None)

    @staticmethod
    async def _keep(
        config: TransferConfig, endpoint: str | None, clients: dict[tuple[Any, ...], Any], key: tuple[Any, ...]
    ) -> AsyncIterator[Any]:
        addressing = config.addressing_style or ("path" if endpoint else "auto")
        botocore_config = AioConfig(
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
            **_http_session(),
        )
        if on_receiver():
            # A receiving thread is ours, not a caller's loop: it makes its session itself rather
            # than start and wake a worker thread for it. Ranges of other loads on this receiver
            # wait meanwhile: for botocore's models once per process (~30 ms of CPU, or until
            # another thread parsing them is done), then ~6 ms per new settings.
            session = prepared_session(config.profile)
        else:
            session = await anyio.to_thread.run_sync(prepared_session, config.profile)
        # Over plain HTTP there is no certificate to verify; saying so spares the first request
        # building a TLS context from the CA bundle, a cold-start cost (in a thread).
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

    def forget_after_fork(self) -> None:
        """In a forked child: every client here is the parent's (its connections are the parent's
        sockets), whichever loop holds it; the next :meth:`get` makes one anew. The inherited ones
        are neither closed nor freed (:func:`keep_forever`)."""
        keep_forever(list(self._by_loop.values()))
        self._by_loop = weakref.WeakKeyDictionary()
        self._locks = weakref.WeakKeyDictionary()


_clients = _Clients()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_clients.forget_after_fork)

#: Where a request's context keeps why its last attempt failed, for the line of the next one.
_FAILURE = "checkpointio_failure"


#: The environment variable that picks who receives object bodies: ``checkpointio`` (the default,
#: :mod:`._http`) or ``aiohttp`` (aiobotocore's own session, for every request).
HTTP_BODIES = "CHECKPOINTIO_HTTP_BODIES"


def _http_session() -> dict[str, Any]:
    """The ``http_session_cls`` the settings ask for (:data:`HTTP_BODIES`); none for aiohttp's own.

    Raises:
        ValueError: a value that names neither (a typo must not pass for a choice).
    """
    asked = os.environ.get(HTTP_BODIES, "").strip().lower()
    if asked in ("", "checkpointio"):
        return {"http_session_cls": BodySession}
    if asked == "aiohttp":
        return {}
    raise ValueError(f"{HTTP_BODIES} must be 'checkpointio' or 'aiohttp', not {asked!r}")


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


class _Requests:
    """What every request of one store needs: its settings, this loop's client, the request options
    each operation takes, and how its errors read."""

    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        self._options = _request_options(config)
        self._turns = itertools.count()

    def next_turn(self) -> int:
        """0, 1, 2, ...: which receiving thread takes the next single range read (thread-safe)."""
        return next(self._turns)

    async def client(self, location: Location) -> Any:
        """This loop's client for these settings, made on first use.

        Making it can fail before any request (a profile that does not exist, an endpoint
        botocore refuses): that is an error naming ``location``, as a request's would be.
        """
        endpoint = endpoint_for(self.config)
        if self.config.endpoint_url is None and endpoint is not None and not is_endpoint(endpoint):
            variable = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
            raise ValueError(
                f"{location.uri}: {variable}={endpoint!r} is not an http:// or https:// URL with a host "
                "(e.g. http://127.0.0.1:9000), so there is no S3 endpoint to send requests to"
            )
        with self.mapped_errors(location, "set up the S3 client"):
            return await _clients.get(self.config)

    def options(self, client: Any, operation: str) -> dict[str, Any]:
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

    def mapped_errors(self, location: Location, action: str) -> AbstractContextManager[None]:
        """:func:`._errors.mapped_errors`, a denial naming the expected bucket owner if one is set."""
        return mapped_errors(location, action, self.config.expected_bucket_owner)
