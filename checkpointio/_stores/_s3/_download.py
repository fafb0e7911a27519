"""Load: concurrent ranged GETs pinned to the ETag (``If-Match``), received on several threads.

A whole-object load spreads its ranges over the receiving threads (:mod:`._receivers`), each with
its own event loop and client: :func:`ordered` gives them in order to a thread that takes
them as they arrive (the range whose turn it is streaming on), :func:`get` to a sink on the
caller's loop the same way, :func:`get_ranges` hands each to the sink at its offset on the thread that
received it. A range that fails half-way is resumed where it stopped, on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
from botocore.exceptions import ClientError, ResponseStreamingError

from ... import _codec
from ..._concurrency import Aborted, one_error
from ..._config import TransferConfig, receiving_workers
from ..._exceptions import ConcurrentModificationError, CorruptCheckpointError, StoreError
from ..._location import Location
from ..._planning import ranges
from .._base import Blocks, Filling, ObjectInfo, RangeSink, Sink
from ._client import _Requests
from ._errors import TRANSIENT_READ_ERRORS, answered
from ._head import head
from ._receivers import Receiving, receivers

logger = logging.getLogger(__name__)


class _Receiving(Protocol):
    """Where a range's bytes go as they arrive: ``length`` says how many came (a range that fails
    half-way resumes from there); :meth:`finish` is called once the last one did."""

    length: int

    async def add(self, block: bytes) -> None: ...

    def finish(self) -> None: ...


class _Received:
    """The blocks of one range as the connection hands them over (:func:`read_range`: one range
    read into memory), without copying them."""

    def __init__(self) -> None:
        self.blocks: Blocks = []
        self.length = 0

    async def add(self, block: bytes) -> None:
        self.blocks.append(block)
        self.length += len(block)

    def finish(self) -> None:
        pass


class _Filled:
    """A range written into the caller's buffers block by block as the connection hands them over
    (:func:`read_range_into`), each block's CRC32 taken as it is written; nothing is held."""

    def __init__(self, filling: Filling) -> None:
        self._filling = filling

    @property
    def length(self) -> int:
        return self._filling.length

    async def add(self, block: bytes) -> None:
        self._filling.write(block)

    def finish(self) -> None:
        pass


async def _read_into(body: Any, received: _Receiving, limit: int) -> None:
    """Append a response body to ``received`` block by block; more than ``limit`` bytes is an error."""
    content: Any = getattr(getattr(body, "raw_stream", None), "content", None)
    read = content.readany if hasattr(content, "readany") else body.read  # the latter: another HTTP backend
    while block := await read():
        if received.length + len(block) > limit:
            raise ResponseStreamingError(error=f"the server sent more than the {limit} bytes asked for")
        await received.add(block)


def _receivers_for(config: TransferConfig, count: int) -> Sequence[Receiving]:
    """The receiving threads for a load of ``count`` ranges: ``receive_workers`` (default: the
    cores this process may use), never more than ranges in flight at once."""
    return receivers(min(receiving_workers(config), config.max_concurrency, count))


async def head_for_reads(requests: _Requests, location: Location, *, one_of_many: bool = False) -> ObjectInfo | None:
    """The object's HEAD (:func:`._head.head`), asked on the first receiving thread of a load about to
    read it, while the other receivers make their clients.

    ``one_of_many``: one of many HEADs asked at once (a distributed load's data objects, an
    incremental load's packs): asked on the receiver whose turn it is, as :func:`read_range`
    takes them, so they are spread over the receivers instead of all waiting on the first.

    So a load makes no client on the caller's loop at all: the receiver that asks gets its client
    made and its connection opened for the load's first range (range 0 is its own), and the
    others' threads, sessions and clients are made meanwhile instead of after the answer, when
    the ranges are due. A receiver keeps its client for the process, so this costs nothing the
    load would not pay; a load that finds nothing to read has started threads the next one uses.
    """
    config = requests.config
    pool = _receivers_for(config, config.max_concurrency)
    if one_of_many:
        return await pool[requests.next_turn() % len(pool)].run(head, requests, location)
    for receiver in pool[1:]:
        receiver.start_soon(requests.client, location)
    return await pool[0].run(head, requests, location)


class _InOrder:
    """An ordered read whose blocks a thread takes straight from the receiving threads
    (:meth:`take`), with no hop through the caller's loop; :func:`ordered` makes one.

    The caller's loop only hands the ranges out (range *i* to receiver *i* mod *n*, at most
    ``max_concurrency`` held, slots taken in order) and hears of each range delivered whole, to
    start the next. The taking thread is woken from a receiving thread only when the range whose
    turn it is has ``step`` bytes ready, or ended: one wake per ``step``, whoever received them.
    """

    def __init__(self, requests: _Requests, info: ObjectInfo) -> None:
        config = requests.config
        self._requests = requests
        self._info = info
        self._spans = ranges(info.size, config.part_size)
        self._count = max(1, len(self._spans))
        self._step = config.chunk_size
        # Bytes held (received, not yet taken) past which the ranges after the one whose turn it
        # is stop reading: the rest waits in the kernel's socket buffers and the server's (TCP's
        # flow control), which costs this process no memory (fewer pages touched: fewer page
        # faults), and the bandwidth goes to the range being taken, which never waits.
        self._ahead = _AHEAD_PARTS * config.part_size
        # Paused ranges read again once the taker brought what is held down by a part, not at
        # each step it takes: a burst of reading per part instead of a wake-up per step.
        self._resume_at = self._ahead - config.part_size
        self._held = 0  # held by every range, under the lock
        self._woken_at = 0  # the turn when the paused ranges were last woken
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []  # ranges paused
        self._cond = threading.Condition()
        self._ranges: dict[int, _InOrderRange] = {}  # made when fetched, dropped once taken whole
        self._turn = 0  # the range being taken
        self._ended = False  # run() returned or raised: nothing more arrives
        self._delivered: Callable[[], None] | None = None  # on the caller's loop, per range taken whole
        # The receivers take each range's CRC32, where there is a checksum to check it against.
        self.checksums = _codec.CAN_COMBINE and info.checkable
        # In the taking thread: the CRC32 and length of the ranges taken whole, and of what was
        # taken of the range whose turn it is (all it had received by then).
        self._whole_crc = self._whole_length = 0
        self._part_crc = self._part_length = 0

    async def run(self) -> None:
        """Fetch every range on the receiving threads; return once all were received, or raise
        (once every range stopped). Either way :meth:`take` then hears of no more."""
        config = self._requests.config
        pool = _receivers_for(config, self._count)
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(config.max_concurrency)

        def delivered() -> None:  # in the taking thread
            loop.call_soon_threadsafe(slots.release)

        self._delivered = delivered

        async def fetch(index: int, received: _InOrderRange) -> None:
            span = self._spans[index] if len(self._spans) > 1 else None
            await pool[index % len(pool)].run(_receive_range, self._requests, self._info, span, received)

        try:
            with one_error():
                async with anyio.create_task_group() as group:
                    for index in range(self._count):
                        await slots.acquire()
                        with self._cond:
                            received = self._ranges[index] = _InOrderRange(self, index)
                        group.start_soon(fetch, index, received)
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _wake_paused(self) -> None:
        """Under the lock: let the ranges paused for :attr:`_ahead` go on reading, once what is
        held was taken down to :attr:`_resume_at` or the turn moved on (perhaps to one of them;
        each checks again)."""
        if self._waiting and (self._held <= self._resume_at or self._turn != self._woken_at):
            self._woken_at = self._turn
            waiting, self._waiting = self._waiting, []
            for loop, paused in waiting:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    loop.call_soon_threadsafe(_release, paused)

    def take(self) -> Blocks:
        """In the taking thread: the next blocks in order, waiting for ``step`` bytes of them or
        their range's end; ``[]`` once every range was taken. Raises :class:`Aborted` once
        :meth:`run` ended without them (failed or cancelled: its error is the one to report)."""
        taken: Blocks = []
        with self._cond:
            while True:
                one = self._ranges.get(self._turn)
                if one is not None and (one.held >= self._step or (one.done and one.held)):
                    taken += one.blocks
                    self._held -= one.held
                    one.blocks, one.held = [], 0
                    self._part_crc, self._part_length = one.crc, one.length  # every block it holds taken
                if one is not None and one.done and not one.held:
                    del self._ranges[self._turn]  # delivered whole: its slot goes to the next range
                    self._turn += 1
                    if self.checksums:
                        self._whole_crc = _codec.crc32_combine(self._whole_crc, one.crc, one.length)
                        self._whole_length += one.length
                        self._part_crc = self._part_length = 0
                    if self._delivered is not None:
                        with contextlib.suppress(RuntimeError):  # the caller's loop is gone: run() was cancelled
                            self._delivered()
                    if not taken and self._turn < self._count:
                        continue  # the next range may hold blocks already (one range's at a time: its
                        # slot is only given back once taken, so memory stays bounded as before)
                if taken or self._turn >= self._count:
                    self._wake_paused()
                    return taken
                if self._ended:  # run() ended before this range arrived: it failed
                    raise Aborted
                self._wake_paused()  # the range whose turn it is now may be one of them
                self._cond.wait()

    def crc32(self) -> int | None:
        """In the taking thread: the CRC32 of every byte :meth:`take` gave so far, from the
        receivers' CRC32s; ``None`` when they take none (:attr:`checksums` false)."""
        if not self.checksums:
            return None
        return _codec.crc32_combine(self._whole_crc, self._part_crc, self._part_length)


class _InOrderRange:
    """One range of an :class:`_InOrder` read, as its receiving thread adds its blocks."""

    def __init__(self, order: _InOrder, index: int) -> None:
        self.length = 0  # received; written by the receiving thread only (a range resumes from it)
        self.crc = 0  # CRC32 of the bytes received, likewise; read with ``length`` under the lock
        self.blocks: Blocks = []  # the rest under the order's lock
        self.held = 0
        self.done = False
        self._order = order
        self._index = index

    async def add(self, block: bytes) -> None:  # on a receiving thread
        order = self._order
        crc = _codec.crc32(block, self.crc) if order.checksums else 0  # outside the lock: the taker goes on
        paused: asyncio.Future[None] | None = None
        with order._cond:
            self.blocks.append(block)
            self.held += len(block)
            order._held += len(block)
            self.length += len(block)
            self.crc = crc
            if order._turn == self._index:
                if self.held >= order._step:
                    order._cond.notify()
            elif order._held > order._ahead:
                # Not this range's turn and enough is held: stop reading until the taker catches up.
                # The range whose turn it is never waits, so the taker always gets its bytes.
                loop = asyncio.get_running_loop()
                paused = loop.create_future()
                order._waiting.append((loop, paused))
        while paused is not None:
            await paused
            paused = None
            with order._cond:
                if order._turn != self._index and order._held > order._ahead:
                    loop = asyncio.get_running_loop()
                    paused = loop.create_future()
                    order._waiting.append((loop, paused))

    def finish(self) -> None:  # on a receiving thread
        order = self._order
        with order._cond:
            self.done = True
            if order._turn == self._index:
                order._cond.notify()


#: How many ``part_size`` of received bytes an ordered read holds before the ranges after the one
#: being taken stop reading (each may overshoot by the block that crossed the line).
_AHEAD_PARTS = 2


def _release(paused: asyncio.Future[None]) -> None:
    if not paused.done():  # not cancelled meanwhile
        paused.set_result(None)


def ordered(requests: _Requests, info: ObjectInfo) -> _InOrder:
    return _InOrder(requests, info)


async def get(requests: _Requests, info: ObjectInfo, sink: Sink) -> None:
    # An ordered read (the engine takes one itself, in its reader: :func:`ordered`) whose blocks
    # a worker thread takes and hands to the sink on the caller's loop, waiting for each.
    read = _InOrder(requests, info)

    async def hand_on(blocks: Blocks) -> None:
        await sink(blocks)

    def deliver() -> None:
        while blocks := read.take():
            anyio.from_thread.run(hand_on, blocks)

    with one_error():
        async with anyio.create_task_group() as group:
            group.start_soon(read.run)
            group.start_soon(anyio.to_thread.run_sync, deliver)


async def get_ranges(requests: _Requests, info: ObjectInfo, sink: RangeSink) -> None:
    # Each range is received on a receiving thread and handed to the sink there, at its offset, in
    # pieces of about chunk_size as its bytes arrive: receiving and writing overlap on as many
    # threads as there are receivers, and nothing passes through the caller's loop.
    config = requests.config
    spans = ranges(info.size, config.part_size) or [(0, -1)]  # an empty object: one plain GET
    pool = _receivers_for(config, len(spans))
    slots = anyio.Semaphore(config.max_concurrency)

    async def fetch(index: int) -> None:
        span = spans[index]
        try:
            written = _Written(span[0], config.chunk_size, sink)
            await pool[index % len(pool)].run(_receive_range, requests, info, span if len(spans) > 1 else None, written)
        finally:
            slots.release()  # at most max_concurrency ranges held, fetched or being written

    with one_error():
        async with anyio.create_task_group() as group:
            for index in range(len(spans)):
                await slots.acquire()
                group.start_soon(fetch, index)


class _Written:
    """A range handed to a ``RangeSink`` at its offsets, in pieces of about ``step`` bytes, on the
    receiving thread: while a piece is written the connection is not read (TCP holds the rest)."""

    def __init__(self, offset: int, step: int, sink: RangeSink) -> None:
        self.length = 0
        self._position = offset
        self._step = step
        self._sink = sink
        self._blocks: Blocks = []
        self._held = 0

    async def add(self, block: bytes) -> None:
        self._blocks.append(block)
        self._held += len(block)
        self.length += len(block)
        if self._held >= self._step:
            self._flush()

    def finish(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._blocks:
            blocks, position = self._blocks, self._position
            self._blocks, self._position, self._held = [], position + self._held, 0
            self._sink(position, blocks)


async def _receive_range(
    requests: _Requests, info: ObjectInfo, span: tuple[int, int] | None, received: _Receiving
) -> None:
    """On a receiving thread: GET one range (or the whole object) into ``received`` with this
    thread's client."""
    await _get_range(requests, await requests.client(info.location), info, span, received)


async def _get_range(
    requests: _Requests, client: Any, info: ObjectInfo, span: tuple[int, int] | None, received: _Receiving
) -> None:
    """GET one range (or the whole object) into ``received``, pinned to the ETag (where
    ``info.pinned``); errors mapped."""
    with requests.mapped_errors(info.location, "download the checkpoint"):
        await _get_range_resuming(requests, client, info, span, received)


async def _get_range_resuming(
    requests: _Requests, client: Any, info: ObjectInfo, span: tuple[int, int] | None, received: _Receiving
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
            **({"IfMatch": info.etag} if info.pinned else {}),
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
    # On a receiving thread, the receivers taken in turn: concurrent reads (a DCP load's ranges,
    # a partial restore's) are received on several threads, and none of their bytes passes
    # through the caller's loop.
    if offset < 0 or length < 0 or offset + length > info.size:
        uri = info.location.uri
        raise CorruptCheckpointError(
            f"{uri}: bytes {offset}..{offset + length} asked for, the object holds {info.size}", uri=uri
        )
    if length == 0:
        return b""
    config = requests.config
    pool = _receivers_for(config, config.max_concurrency)
    receiver = pool[requests.next_turn() % len(pool)]
    return await receiver.run(_receive_joined, requests, info, (offset, offset + length - 1))


async def read_range_into(
    requests: _Requests, info: ObjectInfo, offset: int, buffers: Sequence[memoryview]
) -> Sequence[int]:
    # As read_range, on a receiving thread taken in turn; each block is written where it belongs
    # as it arrives (a range resumed half-way goes on writing where it stopped).
    filling = Filling(buffers)
    length = filling.size
    if offset < 0 or offset + length > info.size:
        uri = info.location.uri
        raise CorruptCheckpointError(
            f"{uri}: bytes {offset}..{offset + length} asked for, the object holds {info.size}", uri=uri
        )
    if length:
        config = requests.config
        pool = _receivers_for(config, config.max_concurrency)
        receiver = pool[requests.next_turn() % len(pool)]
        await receiver.run(_receive_range, requests, info, (offset, offset + length - 1), _Filled(filling))
    return filling.crc32s


async def _receive_joined(requests: _Requests, info: ObjectInfo, span: tuple[int, int]) -> bytes:
    """On a receiving thread: one range, in memory as one ``bytes``."""
    received = _Received()
    await _receive_range(requests, info, span, received)
    blocks = received.blocks
    if len(blocks) == 1 and type(blocks[0]) is bytes:
        return blocks[0]
    # bytes.join copies without the GIL from 1 MiB up: the other receivers go on meanwhile (this
    # one's other ranges wait for the copy, a few milliseconds per part_size).
    return b"".join(blocks)
