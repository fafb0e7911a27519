"""The Store protocol (``checkpointio._stores._base.Store``) as a specification, run over every store.

Each test states one promise of the protocol and checks it on the memory, local and S3 (moto)
stores alike, through the store's own methods only: what the engine relies on, whatever the store.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable

import anyio
import pytest

from checkpointio import ConcurrentModificationError, CorruptCheckpointError
from checkpointio._config import TransferConfig
from checkpointio._location import Location, parse_location, parse_prefix
from checkpointio._stores import Blocks, Body, Kind, ObjectInfo, RangedStore, Record, Store, open_store

from .conftest import StoreCase

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

MiB = 1024 * 1024
#: Small parts: a 12 MiB object is a multipart upload of three parts on S3.
CONFIG = TransferConfig(part_size=5 * MiB, multipart_threshold=5 * MiB, chunk_size=256 * 1024)
RECORD = Record(Kind.BYTES)


async def opened(store: StoreCase) -> Store:
    return await open_store(parse_location(store.uri("x")).scheme, CONFIG)


def where(store: StoreCase, name: str) -> Location:
    return parse_location(store.uri(name))


class Failed(Exception):
    """The source of a save failing part-way."""


async def put(
    target: Store,
    location: Location,
    data: bytes,
    *,
    step: int = MiB,
    fail_after: int | None = None,
    sized: bool = True,
) -> ObjectInfo:
    """Save ``data`` as the engine does: a producer task streams the chunks (keeping their CRC32)
    while the store consumes them; ``fail_after`` chunks, the producer raises instead. Not
    ``sized``: as a directory archive, whose size and CRC32 are known only at its end."""
    send, receive = anyio.create_memory_object_stream[bytes](4)
    body = Body(receive, len(data), crc32_up_front=lambda: zlib.crc32(data)) if sized else Body(receive, None)
    stored: list[ObjectInfo] = []

    async def produce() -> None:
        async with send:
            for index, start in enumerate(range(0, len(data), step)):
                if index == fail_after:
                    raise Failed("the source failed")
                chunk = data[start : start + step]
                body.digest.crc32 = zlib.crc32(chunk, body.digest.crc32)
                body.digest.length += len(chunk)
                await send.send(chunk)

    async def consume() -> None:
        stored.append(await target.put(location, body, RECORD))

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            group.start_soon(consume)
    except BaseExceptionGroup as group_error:
        failed = group_error.subgroup(Failed)
        if failed is not None:
            raise failed.exceptions[0] from None
        raise
    finally:
        receive.close()
    return stored[0]


async def get(target: Store, info: ObjectInfo) -> bytes:
    received: Blocks = []

    async def sink(blocks: Blocks) -> None:
        received.extend(blocks)

    await target.get(info, sink)
    return b"".join(received)


def payload(size: int, seed: int = 0) -> bytes:
    """Bytes whose every MiB differs, so a misplaced range shows."""
    return b"".join(bytes([(seed + start // MiB) % 251]) * min(MiB, size - start) for start in range(0, size, MiB))


def names(items: Iterable[ObjectInfo], store: StoreCase) -> list[str]:
    base = where(store, "").key.rstrip("/") + "/"
    return [info.location.key.removeprefix(base) for info in items]


async def test_head_of_nothing_is_none(store: StoreCase) -> None:
    assert await (await opened(store)).head(where(store, "missing")) is None


@pytest.mark.parametrize("size", [0, 1, 3 * MiB + 7, 12 * MiB + 1])  # empty, small, one PUT, multipart on S3
async def test_put_stores_the_bytes_and_the_record_that_head_and_get_return(store: StoreCase, size: int) -> None:
    target, location = await opened(store), where(store, "obj")
    data = payload(size)
    info = await put(target, location, data)
    assert (info.location, info.size) == (location, size)
    assert info.record == Record(Kind.BYTES, size, zlib.crc32(data))
    head = await target.head(location)
    assert head is not None
    assert (head.location, head.size, head.etag, head.record) == (location, size, info.etag, info.record)
    assert await get(target, head) == data
    assert store.get_raw("obj") == data  # what other tools read at the location: exactly the bytes


@pytest.mark.parametrize("size", [3 * MiB + 7, 12 * MiB + 1])  # one PUT, multipart on S3
async def test_a_stream_of_unknown_size_is_stored_with_the_record_head_returns(store: StoreCase, size: int) -> None:
    target, location = await opened(store), where(store, "obj")
    data = payload(size, seed=5)
    info = await put(target, location, data, sized=False)
    assert info.record == Record(Kind.BYTES, size, zlib.crc32(data))
    head = await target.head(location)
    assert head is not None
    assert (head.size, head.etag, head.record) == (size, info.etag, info.record)
    assert await get(target, head) == data


async def test_put_replaces_the_object_with_a_new_generation(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    first = await put(target, location, b"first")
    second = await put(target, location, b"second!")
    assert second.etag != first.etag
    head = await target.head(location)
    assert head is not None and (head.etag, head.size) == (second.etag, 7)
    assert await get(target, head) == b"second!"


@pytest.mark.parametrize("size", [2 * MiB, 12 * MiB])
async def test_a_put_that_fails_part_way_leaves_the_previous_object_and_nothing_pending(
    store: StoreCase, size: int
) -> None:
    target, location = await opened(store), where(store, "obj")
    before = await put(target, location, b"previous")
    with pytest.raises(Failed):
        await put(target, location, payload(size, seed=1), fail_after=size // MiB - 1)
    head = await target.head(location)
    assert head is not None and head.etag == before.etag
    assert await get(target, head) == b"previous"
    assert await target.pending(where(store, "")) == []


async def test_a_cancelled_put_leaves_the_previous_object_and_nothing_pending(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    before = await put(target, location, b"previous")
    send, receive = anyio.create_memory_object_stream[bytes](1)
    body = Body(receive, 12 * MiB)
    with anyio.move_on_after(60) as scope:
        async with anyio.create_task_group() as group:

            async def consume() -> None:
                await target.put(location, body, RECORD)

            group.start_soon(consume)
            for chunk in (payload(MiB), payload(MiB, seed=2), payload(MiB, seed=3)):
                await send.send(chunk)
            scope.cancel()  # mid-stream: the store is waiting for more
    assert scope.cancelled_caught
    send.close()
    receive.close()
    head = await target.head(location)
    assert head is not None and head.etag == before.etag
    assert await target.pending(where(store, "")) == []


async def test_get_refuses_an_object_replaced_since_its_head(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    old = await put(target, location, b"old")
    await put(target, location, b"new")
    with pytest.raises(ConcurrentModificationError, match="obj"):
        await get(target, old)


async def test_get_refuses_an_object_removed_since_its_head(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    info = await put(target, location, b"soon gone")
    assert await target.delete(location)
    with pytest.raises(ConcurrentModificationError, match="obj"):
        await get(target, info)


async def test_delete_removes_the_object_and_says_whether_there_was_one(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    assert await target.delete(location) is False
    await put(target, location, b"x")
    assert await target.delete(location) is True
    assert await target.head(location) is None
    assert await target.delete(location) is False


async def test_list_gives_the_objects_under_a_prefix_sorted_by_key(store: StoreCase) -> None:
    target = await opened(store)
    for name in ("run/b2", "run/a/2", "run/a/1", "run/b1", "run/c", "runs/x", "other/x"):
        await put(target, where(store, name), name.encode())
    infos = await target.list(where(store, "run/"))
    assert names(infos, store) == ["run/a/1", "run/a/2", "run/b1", "run/b2", "run/c"]
    for info, name in zip(infos, names(infos, store), strict=True):  # S3 lists no metadata: no record there
        assert info.size == len(name)
        assert info.record in (None, Record(Kind.BYTES, len(name), zlib.crc32(name.encode())))
    assert names(await target.list(where(store, "run/b")), store) == ["run/b1", "run/b2"]  # a key prefix
    assert await target.list(where(store, "nothing-here")) == []


async def test_a_prefix_naming_a_folder_lists_that_folder_any_other_the_names_starting_with_it(
    store: StoreCase,
) -> None:
    target = await opened(store)
    for name in ("run/a", "run/b/1", "run-2/x", "runs"):
        await put(target, where(store, name), name.encode())
    assert names(await target.list(where(store, "run")), store) == ["run/a", "run/b/1"]  # never run-2/
    assert names(await target.list(where(store, "run-")), store) == ["run-2/x"]
    assert names(await target.list(where(store, "ru")), store) == ["run-2/x", "run/a", "run/b/1", "runs"]
    assert names(await target.list(where(store, "run/b")), store) == ["run/b/1"]
    assert await target.list(parse_prefix(store.uri("run-") + "/")) == []  # "/": only a folder of that name
    assert names(await target.list(parse_prefix(store.uri("run") + "/")), store) == ["run/a", "run/b/1"]
    if store.abandon_save("run/obj") and store.abandon_save("run-2/obj"):
        try:
            (inside,) = await target.pending(where(store, "run"))
            assert inside.location == where(store, "run/obj")
            assert len(await target.pending(where(store, "run-"))) == 1
            assert await target.pending(parse_prefix(store.uri("run-") + "/")) == []
        finally:
            for write in await target.pending(where(store, "")):
                await target.discard(write)


async def test_create_stores_only_where_nothing_is(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "claim")
    assert await target.create(location, b"mine", RECORD) is True
    assert await target.create(location, b"theirs", RECORD) is False
    head = await target.head(location)
    assert head is not None and head.record is not None and head.record.kind is Kind.BYTES
    assert await get(target, head) == b"mine"


async def test_of_racing_creates_exactly_one_wins(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "claim")
    won: list[int] = []

    async def claim(index: int) -> None:
        if await target.create(location, str(index).encode(), RECORD):
            won.append(index)

    async with anyio.create_task_group() as group:
        for index in range(8):
            group.start_soon(claim, index)
    assert len(won) == 1
    head = await target.head(location)
    assert head is not None and await get(target, head) == str(won[0]).encode()


async def test_read_range_returns_the_slice_and_refuses_beyond_the_end(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    data = payload(3 * MiB)
    info = await put(target, location, data)
    assert await target.read_range(info, MiB - 3, 6) == data[MiB - 3 : MiB + 3]
    assert await target.read_range(info, len(data) - 1, 1) == data[-1:]
    for offset, length in ((len(data) - 1, 2), (len(data), 1), (-1, 1), (0, -1)):
        with pytest.raises(CorruptCheckpointError, match="obj"):
            await target.read_range(info, offset, length)
    await put(target, location, b"replaced")
    with pytest.raises(ConcurrentModificationError, match="obj"):
        await target.read_range(info, 0, 1)


async def test_read_range_into_fills_the_buffers_in_order_with_each_ones_crc32(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    data = payload(5 * MiB + 7)
    info = await put(target, location, data)
    # Buffers as a caller hands them over: empty ones, one crossing many received blocks, a
    # tensor's memory (cast to bytes, as checkpointio.dcp passes it), one byte.
    floats = memoryview(bytearray(4 * 1000)).cast("f")
    views = [memoryview(bytearray(size)) for size in (0, 3 * MiB + 1, 0, 1)]
    views += [floats.cast("B"), memoryview(bytearray(1))]
    offset = MiB - 3
    crc32s = await target.read_range_into(info, offset, views)
    expected: list[bytes] = []
    position = offset
    for view in views:
        expected.append(data[position : position + len(view)])
        position += len(view)
    got = [bytes(view) for view in views]
    assert got == expected
    assert crc32s == [zlib.crc32(piece) for piece in expected]
    assert await target.read_range_into(info, len(data), [memoryview(bytearray())]) == [0]  # nothing, at the end
    refused: list[tuple[int, tuple[int, ...]]] = [(len(data) - 1, (2,)), (len(data) - 10, (8, 3)), (len(data), (1,))]
    for offset, sizes in [*refused, (-1, (1,))]:
        # Refused before anything is written: the buffers (a caller's tensors) keep what they held.
        untouched = [bytearray(b"\xaa" * size) for size in sizes]
        with pytest.raises(CorruptCheckpointError, match="obj"):
            await target.read_range_into(info, offset, [memoryview(buffer) for buffer in untouched])
        assert all(buffer == b"\xaa" * len(buffer) for buffer in untouched), (offset, sizes)
    await put(target, location, b"replaced")
    with pytest.raises(ConcurrentModificationError, match="obj"):
        await target.read_range_into(info, 0, [memoryview(bytearray(1))])


async def test_a_ranged_store_delivers_every_byte_once(store: StoreCase) -> None:
    target, location = await opened(store), where(store, "obj")
    if not isinstance(target, RangedStore):
        pytest.skip(f"the {store.name} store is not a RangedStore")
    data = payload(12 * MiB + 5)
    info = await put(target, location, data)
    out = bytearray(len(data))
    seen = bytearray(len(data))

    def sink(offset: int, blocks: Blocks) -> None:  # on the store's receiving threads, several at once
        for block in blocks:
            out[offset : offset + len(block)] = block
            seen[offset : offset + len(block)] = bytes(b + 1 for b in seen[offset : offset + len(block)])
            offset += len(block)

    await target.get_ranges(info, sink)
    assert out == data
    assert seen == b"\1" * len(data)


async def test_pending_lists_an_abandoned_save_until_it_is_discarded(store: StoreCase) -> None:
    target = await opened(store)
    if not store.abandon_save("obj"):
        assert await target.pending(where(store, "")) == []  # a save here is one assignment: never half-done
        return
    await put(target, where(store, "other"), b"a finished save is not pending")
    (write,) = await target.pending(where(store, ""))
    assert write.location == where(store, "obj")
    assert await target.pending(where(store, "elsewhere")) == []
    assert await target.discard(write) is True
    assert await target.pending(where(store, "")) == []
    assert await target.discard(write) is False
