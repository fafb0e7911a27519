"""Load: concurrent ranged GETs pinned to the ETag (``If-Match``), delivered in order.

The range whose turn it is is handed on as its bytes arrive. A range that fails half-way is resumed
where it stopped, on its own.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import anyio
from botocore.exceptions import ClientError, ResponseStreamingError

from ..._concurrency import one_error
from ..._exceptions import ConcurrentModificationError, CorruptCheckpointError, StoreError
from ..._planning import ranges
from .._base import Blocks, ObjectInfo, RangeSink, Sink
from ._client import _Requests
from ._errors import TRANSIENT_READ_ERRORS, answered

logger = logging.getLogger(__name__)


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


async def get(requests: _Requests, info: ObjectInfo, sink: Sink) -> None:
    # Ranges are fetched concurrently; the one whose turn it is streams on as its blocks arrive
    # (the first bytes reach the sink as soon as the server sends them, not after a whole
    # range). A range holds its slot until delivered, so at most max_concurrency ranges are
    # held; slots are taken in order, so the range being delivered always has one.
    config = requests.config
    client = await requests.client()
    spans = ranges(info.size, config.part_size)
    count = max(1, len(spans))
    # Made when their range starts or is due, dropped once delivered: at most max_concurrency
    # + 1 at a time, so memory does not grow with the object's number of ranges.
    received: dict[int, _Received] = {}
    slots = anyio.Semaphore(config.max_concurrency)

    def range_buffer(index: int) -> _Received:
        one = received.get(index)
        if one is None:
            one = received[index] = _Received()
        return one

    async def fetch(index: int) -> None:
        await _get_range(requests, client, info, spans[index] if len(spans) > 1 else None, range_buffer(index))

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


async def get_ranges(requests: _Requests, info: ObjectInfo, sink: RangeSink) -> None:
    config = requests.config
    client = await requests.client()
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
                group.start_soon(_get_range, requests, client, info, span if len(spans) > 1 else None, received)
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
    requests: _Requests, client: Any, info: ObjectInfo, span: tuple[int, int] | None, received: _Received
) -> None:
    """GET one range (or the whole object) into ``received``, pinned to the ETag; errors mapped."""
    with requests.mapped_errors(info.location, "download the checkpoint"):
        await _get_range_resuming(requests, client, info, span, received)


async def _get_range_resuming(
    requests: _Requests, client: Any, info: ObjectInfo, span: tuple[int, int] | None, received: _Received
) -> None:
    """:func:`_get_range`: a read that fails half-way is resumed where it stopped, by this range alone."""
    location = info.location
    first, last = span if span is not None else (0, info.size - 1)
    expected = last - first + 1
    attempts = requests.config.max_attempts
    for attempt in range(attempts):
        if attempt and received.length == expected:  # the error came after the last byte
            break
        kwargs: dict[str, Any] = {
            "Bucket": location.bucket,
            "Key": location.key,
            "IfMatch": info.etag,
            **requests.options(client, "GetObject"),
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
            if answered(error, (404,)):
                raise ConcurrentModificationError(
                    f"{location.uri}: removed while being read", uri=location.uri
                ) from error
            raise
        except TRANSIENT_READ_ERRORS as error:
            if attempt + 1 >= attempts:
                raise
            logger.info("retrying a range of %s after: %s", location.uri, error)
            await anyio.sleep(min(20.0, random.uniform(0, 0.1 * 2**attempt)))
    received.finish()


async def read_range(requests: _Requests, info: ObjectInfo, offset: int, length: int) -> bytes:
    if offset < 0 or length < 0 or offset + length > info.size:
        uri = info.location.uri
        raise CorruptCheckpointError(
            f"{uri}: bytes {offset}..{offset + length} asked for, the object holds {info.size}", uri=uri
        )
    if length == 0:
        return b""
    received = _Received()
    await _get_range(requests, await requests.client(), info, (offset, offset + length - 1), received)
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
