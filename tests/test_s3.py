"""S3-specific behaviour against a real endpoint (moto in server mode) and a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from botocore.loaders import Loader

from checkpointio import (
    AccessDeniedError,
    BucketNotFoundError,
    Checkpoint,
    ChecksumMismatchError,
    ConcurrentModificationError,
    CorruptCheckpointError,
    MiB,
    ObjectTooLargeError,
    SourceChangedError,
    StoreError,
    StoreUnavailableError,
    TaskEnvironment,
    TransferOptions,
    _manage,
)
from checkpointio._config import TransferConfig
from checkpointio._location import parse_location
from checkpointio._placement import remove_tree
from checkpointio._stores import open_store
from checkpointio._stores._s3 import S3Store
from checkpointio._stores._s3 import _download as s3_download
from checkpointio._stores._s3 import _loader as s3_loader
from checkpointio._stores._s3 import _receivers as s3_receivers
from checkpointio._stores._s3._client import _clients
from checkpointio._stores._s3._loader import _DataLoader, prepared_session

from .conftest import MotoServer, ProxiedBucket, free_port, make_tree, snapshot, start_moto, stop
from .faultproxy import FaultProxy, Match
from .scripts import run_script

SMALL_PARTS: TransferOptions = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB, "max_attempts": 4}


def is_part_upload(method: str, target: str) -> bool:
    return method == "PUT" and "partNumber=" in target


def is_part(number: int) -> Match:
    return lambda method, target: is_part_upload(method, target) and f"partNumber={number}&" in target + "&"


def is_ranged_get(proxy: FaultProxy) -> Match:
    return lambda method, target: method == "GET" and "uploadId" not in target and "list-type" not in target


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    return moto_server.new_bucket()


def uploads_left(moto_server: MotoServer, bucket: str) -> list[object]:
    return list(moto_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


async def test_large_bytes_go_up_in_several_parts_and_come_back_by_ranges(
    moto_server: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    data = os.urandom(12 * MiB + 5)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/run/a", **options).save(data)
    head = moto_server.client().head_object(Bucket=bucket, Key="run/a")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 2 MiB
    parts = [entry for entry in proxy.log if is_part_upload(entry["method"], entry["target"])]
    assert len(parts) == 3
    assert all("x-amz-checksum-crc32" in entry["headers"] for entry in parts)
    # the signed CRC32 header protects the body: no SHA-256 over every payload byte
    assert {entry["headers"]["x-amz-content-sha256"] for entry in parts} == {"UNSIGNED-PAYLOAD"}
    info = await S3Store(TransferConfig()).head(parse_location(f"s3://{bucket}/run/a"))
    assert info is not None and info.server_crc32 == zlib.crc32(data)  # the whole-object CRC32 we sent
    async with Checkpoint(f"s3://{bucket}/run/b", src=f"s3://{bucket}/run/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data
    ranged = [entry for entry in proxy.log if "range" in entry["headers"]]
    assert sorted(entry["headers"]["range"] for entry in ranged) == sorted(
        [f"bytes=0-{5 * MiB - 1}", f"bytes={5 * MiB}-{10 * MiB - 1}", f"bytes={10 * MiB}-{12 * MiB + 4}"]
    )
    assert all(entry["headers"].get("if-match") == head["ETag"] for entry in ranged)


async def test_directory_archive_streams_as_multipart_upload(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    for i in range(3):
        (tree / f"noise-{i}.bin").write_bytes(os.urandom(4 * MiB))
    await Checkpoint(f"s3://{bucket}/dir", **SMALL_PARTS).save(tree)
    head = moto_server.client().head_object(Bucket=bucket, Key="dir")
    assert "-" in head["ETag"]
    assert head["Metadata"]["checkpointio-kind"] == "dir"
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/dir", **SMALL_PARTS) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == snapshot(tree)


async def test_parts_and_ranges_are_transferred_concurrently(bucket: str, proxy: FaultProxy) -> None:
    data = os.urandom(30 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_concurrency": 4}
    proxy.delay, proxy.slow = 0.3, is_part_upload
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    assert proxy.max_in_flight >= 2
    proxy.max_in_flight, proxy.slow = 0, lambda method, target: method == "GET"
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data
    assert proxy.max_in_flight >= 2


async def test_content_md5_per_part_when_flexible_checksums_are_off(bucket: str, proxy: FaultProxy) -> None:
    data = os.urandom(11 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "flexible_checksums": False}
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    parts = [entry for entry in proxy.log if is_part_upload(entry["method"], entry["target"])]
    assert len(parts) == 3 and all("content-md5" in entry["headers"] for entry in parts)
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data


@pytest.mark.parametrize("flexible_checksums", [True, False], ids=["crc32", "content-md5"])
async def test_part_buffers_refilled_for_later_parts_carry_only_their_own_bytes(
    bucket: str, proxy: FaultProxy, flexible_checksums: bool
) -> None:
    # One part in flight: every part after the first is built in the buffer of the one before.
    data = os.urandom(4 * 5 * MiB + 3)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_concurrency": 1}
    saving: TransferOptions = {**options, "flexible_checksums": flexible_checksums}
    await Checkpoint(f"s3://{bucket}/a", **saving).save(data)
    parts = [entry for entry in proxy.log if is_part_upload(entry["method"], entry["target"])]
    assert len(parts) == 5  # each accepted once: its checksum header matched the bytes sent
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        assert await cp.load_bytes() == data


@pytest.mark.parametrize("fault", ["503", "500", "reset_request"])
async def test_a_transient_failure_of_one_part_is_retried_alone(
    moto_server: MotoServer, bucket: str, proxy: FaultProxy, fault: str
) -> None:
    data = os.urandom(12 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    proxy.add(is_part(2), fault, times=2)
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    part_two = [entry["action"] for entry in proxy.log if is_part(2)(entry["method"], entry["target"])]
    assert part_two == [fault, fault, "relay"]
    others = [entry for entry in proxy.log if is_part_upload(entry["method"], entry["target"])]
    assert len(others) == 5  # parts 1 and 3 went up once each
    assert uploads_left(moto_server, bucket) == []
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data


async def test_a_range_dropped_half_way_is_fetched_again(bucket: str, proxy: FaultProxy) -> None:
    data = os.urandom(12 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    proxy.add(lambda method, target: method == "GET", "reset_response", times=2)
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data
    assert [entry["action"] for entry in proxy.log].count("reset_response") == 2


@pytest.mark.parametrize("kind", ["directory", "file"])
async def test_a_range_cut_short_resumes_where_it_stopped(
    bucket: str, proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "big.bin").write_bytes(os.urandom(11 * MiB))
    source = tree if kind == "directory" else tree / "big.bin"
    options: TransferOptions = {**SMALL_PARTS, "compression_level": 0, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/a", **options).save(source)
    proxy.add(lambda method, target: method == "GET", "truncate", times=1)
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None
        if kind == "directory":
            assert snapshot(restored) == snapshot(tree)
        else:
            assert restored.read_bytes() == source.read_bytes()
    gets = [entry for entry in proxy.log if entry["method"] == "GET"]
    cut = next(entry for entry in gets if entry["action"] == "truncate")
    first, last = map(int, str(cut["headers"]["range"]).removeprefix("bytes=").split("-"))
    retry = gets[gets.index(cut) + 1 :]
    starts = [
        int(str(e["headers"]["range"]).removeprefix("bytes=").split("-")[0])
        for e in retry
        if str(e["headers"]["range"]).endswith(f"-{last}")
    ]
    assert len(starts) == 1 and first < starts[0] <= first + (last - first + 1) // 2  # resumed, not started over
    assert len(gets) == 4  # three ranges, one of them in two requests


@pytest.mark.parametrize("fault", ["chunked", "no_length"])
async def test_a_body_framed_without_its_length_is_asked_again_of_aiohttp(
    bucket: str, proxy: FaultProxy, fault: str
) -> None:
    """checkpointio's own reader takes bodies framed by a Content-Length; a server that sends one
    chunked, or ended by closing the connection, is asked again, and every byte still comes back."""
    data = os.urandom(12 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    proxy.add(lambda method, target: method == "GET", fault, times=2)
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        assert await cp.load_bytes() == data
    gets = [entry for entry in proxy.log if entry["method"] == "GET"]
    assert [entry["action"] for entry in gets].count(fault) == 2
    assert len(gets) == 3 + 2  # three ranges, two of them asked twice
    assert not any(entry["action"] == "relay" and "range" not in entry["headers"] for entry in gets)


async def test_a_kept_connection_the_server_closed_is_replaced_without_a_retry(
    bucket: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A server may close an idle connection it said it would keep: the next GET goes on a new
    one, without counting as a failed attempt (nothing is logged as retried)."""
    data = os.urandom(26 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_attempts": 1}
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    proxy.keep_alive = True
    proxy.add(lambda method, target: method == "GET", "close_after", times=3)
    caplog.set_level("INFO", logger="checkpointio")
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        assert await cp.load_bytes() == data
    assert [entry["action"] for entry in proxy.log if entry["method"] == "GET"].count("close_after") == 3
    assert not [record for record in caplog.records if "retrying" in record.getMessage()]


async def test_a_load_reuses_its_connections(bucket: str, proxy: FaultProxy) -> None:
    """Ranges received one after the other on one receiving thread go over one kept connection."""
    data = os.urandom(31 * MiB)
    await Checkpoint(f"s3://{bucket}/a", **SMALL_PARTS).save(data)
    options: TransferOptions = {
        **SMALL_PARTS,
        "endpoint_url": proxy.endpoint,
        "max_concurrency": 1,
        "receive_workers": 1,
    }
    proxy.keep_alive = True
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        assert await cp.load_bytes() == data
    gets = [entry for entry in proxy.log if entry["method"] == "GET"]
    assert len(gets) == 7
    assert proxy.connections <= 2  # the HEAD's (aiohttp's pool) and the GETs' (ours)


async def test_a_server_ignoring_range_requests_is_a_clear_error(bucket: str, proxy: FaultProxy) -> None:
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_attempts": 1}
    await Checkpoint(f"s3://{bucket}/a", **options).save(os.urandom(11 * MiB))
    proxy.add(lambda method, target: method == "GET", "drop_range", times=100)
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        with pytest.raises(StoreError, match="ranged GETs"):
            await cp.load()
        assert not cp.path.exists() or list(cp.path.iterdir()) == []


async def test_the_range_whose_turn_it_is_is_delivered_as_its_bytes_arrive(bucket: str, proxy: FaultProxy) -> None:
    data = os.urandom(12 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/w", **options).save(data)
    store = S3Store(TransferConfig(**options))
    info = await store.head(parse_location(f"s3://{bucket}/w"))
    assert info is not None
    proxy.add(is_ranged_get(proxy), "pause", times=100)  # every range: half now, half later
    chunks: list[bytes] = []
    first = anyio.Event()

    async def sink(blocks: list[bytes]) -> None:
        chunks.extend(blocks)
        first.set()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(store.get, info, sink)
            with anyio.fail_after(30):
                await first.wait()  # no range is complete yet: only streaming delivers anything
            assert 0 < sum(map(len, chunks)) <= 5 * MiB // 2
            proxy.resume.set()
    finally:
        proxy.resume.set()  # never leave the proxy's threads waiting
    assert b"".join(chunks) == data


async def test_an_ordered_read_taken_by_a_thread_streams_the_range_whose_turn_it_is(
    bucket: str, proxy: FaultProxy
) -> None:
    data = os.urandom(12 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/w", **options).save(data)
    store = S3Store(TransferConfig(**options))
    info = await store.head(parse_location(f"s3://{bucket}/w"))
    assert info is not None
    proxy.add(is_ranged_get(proxy), "pause", times=100)  # every range: half now, half later
    read = store.ordered(info)
    taken: list[bytes] = []
    crcs: list[tuple[int, int | None]] = []  # after each take: bytes taken, the read's CRC32 of them
    first = threading.Event()

    def take_all() -> None:  # as the archive reader does, in a thread of its own
        while blocks := read.take():
            taken.extend(blocks)
            crcs.append((sum(map(len, taken)), read.crc32()))
            first.set()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(read.run)
            group.start_soon(anyio.to_thread.run_sync, take_all)
            assert await anyio.to_thread.run_sync(first.wait, 30)  # no range is complete yet...
            assert 0 < sum(map(len, list(taken))) <= 5 * MiB // 2  # ...the first streams on as it arrives
            proxy.resume.set()
    finally:
        proxy.resume.set()  # never leave the proxy's threads waiting
    assert b"".join(taken) == data
    # the receivers' CRC32s, combined in order, cover exactly what was taken, mid-range too
    assert read.checksums and len(crcs) > 3
    assert crcs == [(length, zlib.crc32(data[:length])) for length, _ in crcs]


async def test_an_ordered_read_taken_by_a_thread_holds_only_the_ranges_in_flight(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import checkpointio._stores._s3._download as s3

    data = os.urandom(31 * MiB)  # seven ranges of 5 MiB, two in flight at a time
    options: TransferOptions = {**SMALL_PARTS, "max_concurrency": 2}
    await Checkpoint(f"s3://{bucket}/w", **options).save(data)
    store = S3Store(TransferConfig(**options))
    info = await store.head(parse_location(f"s3://{bucket}/w"))
    assert info is not None
    read = store.ordered(info)
    most = [0]  # ranges made and not yet taken whole, this one included

    class Counted(s3._InOrderRange):
        def __init__(self, order: s3._InOrder, index: int) -> None:
            super().__init__(order, index)
            most[0] = max(most[0], len(order._ranges) + 1)  # private: the buffers the bound is about

    monkeypatch.setattr(s3, "_InOrderRange", Counted)
    taken: list[bytes] = []

    def take_all() -> None:
        time.sleep(0.5)  # a slow reader: the ranges ahead wait for it, no more of them are fetched
        while blocks := read.take():
            taken.extend(blocks)

    async with anyio.create_task_group() as group:
        group.start_soon(read.run)
        group.start_soon(anyio.to_thread.run_sync, take_all)
    assert b"".join(taken) == data
    assert most[0] == 2  # in flight (2), never more however slow the reader


async def test_an_ordered_read_holds_about_two_parts_however_slow_its_reader(bucket: str) -> None:
    data = os.urandom(40 * MiB)  # eight ranges of 5 MiB, all in flight at once
    options: TransferOptions = {**SMALL_PARTS, "max_concurrency": 8, "receive_workers": 2}
    await Checkpoint(f"s3://{bucket}/w", **options).save(data)
    store = S3Store(TransferConfig(**options))
    info = await store.head(parse_location(f"s3://{bucket}/w"))
    assert info is not None
    read = store.ordered(info)
    assert isinstance(read, s3_download._InOrder)
    held_when_settled: list[int] = []

    def settled() -> bool:  # private: the ranges and the paused ones are what the bound is about
        with read._cond:
            ranges = read._ranges
            first = ranges.get(0)
            later = [one for index, one in ranges.items() if index > 0]
            still = [one for one in later if not one.done]
            if first is None or not first.done or len(later) < 7 or len(still) != len(read._waiting):
                return False  # the first range (never paused) or a later one is still being received
            held_when_settled.append(first.held + sum(one.held for one in later))
            return True

    def take_all() -> list[bytes]:
        deadline = time.monotonic() + 60
        while not settled():  # a reader that takes nothing until every range stopped reading or ended
            assert time.monotonic() < deadline, "the ranges never settled"
            time.sleep(0.01)
        taken: list[bytes] = []
        while blocks := read.take():
            taken.extend(blocks)
        return taken

    async with anyio.create_task_group() as group:
        group.start_soon(read.run)
        taken = await anyio.to_thread.run_sync(take_all)
    assert b"".join(taken) == data
    # The ranges after the first stopped reading once 2 parts were held, the first one's included
    # (each may overshoot by the block that crossed the line; the first, never paused, may
    # complete after they stopped), instead of holding all 40 MiB.
    assert 2 * 5 * MiB <= held_when_settled[0] <= 3 * 5 * MiB + 7 * MiB // 2
    assert tasks_left_on_receivers() == 0


async def test_an_ordered_read_whose_fetch_fails_stops_its_taker(bucket: str, proxy: FaultProxy) -> None:
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_attempts": 1}
    await Checkpoint(f"s3://{bucket}/w", **options).save(os.urandom(12 * MiB))
    store = S3Store(TransferConfig(**options))
    info = await store.head(parse_location(f"s3://{bucket}/w"))
    assert info is not None
    proxy.add(is_ranged_get(proxy), "reset_response", times=1)  # one range cut half-way, not retried
    read = store.ordered(info)
    outcome: list[BaseException] = []

    def take_all() -> None:
        try:
            while read.take():
                pass
        except BaseException as error:
            outcome.append(error)

    taker = threading.Thread(target=take_all)
    taker.start()
    with pytest.raises(StoreError, match=f"s3://{bucket}/w"):
        await read.run()
    await anyio.to_thread.run_sync(taker.join, 30)
    assert [type(error).__name__ for error in outcome] == ["Aborted"]  # not an end: the taker stops
    assert tasks_left_on_receivers() == 0


async def test_a_part_that_keeps_failing_aborts_the_upload_and_keeps_the_previous(
    moto_server: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_attempts": 2}
    await Checkpoint(f"s3://{bucket}/a", **options).save(b"previous")
    proxy.add(is_part(2), "500", times=100)
    with pytest.raises(StoreUnavailableError, match=f"s3://{bucket}/a"):
        await Checkpoint(f"s3://{bucket}/a", **options).save(os.urandom(12 * MiB))
    assert uploads_left(moto_server, bucket) == []
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == b"previous"


async def test_an_object_replaced_between_head_and_get_is_detected(moto_server: MotoServer, bucket: str) -> None:
    await Checkpoint(f"s3://{bucket}/a", **SMALL_PARTS).save(os.urandom(11 * MiB))
    store = S3Store(TransferConfig(**SMALL_PARTS))
    info = await store.head(parse_location(f"s3://{bucket}/a"))
    assert info is not None
    moto_server.client().put_object(Bucket=bucket, Key="a", Body=b"someone else's")
    received: list[bytes] = []

    async def sink(blocks: list[bytes]) -> None:
        received.extend(blocks)

    with pytest.raises(ConcurrentModificationError, match="replaced while being read"):
        await store.get(info, sink)


async def test_missing_bucket_is_named_in_a_clear_error(moto_server: MotoServer) -> None:
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-4711"):
        await Checkpoint("s3://no-such-bucket-4711/a").save(b"x")
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-4711"):
        await Checkpoint("s3://no-such-bucket-4711/b", src="s3://no-such-bucket-4711/a").load()


async def test_a_bucket_these_credentials_may_not_head_still_gives_a_first_attempt(
    bucket: str, proxy: FaultProxy
) -> None:
    # object-only permissions: HEAD of the missing key is a 404, HEAD of the bucket a 403
    proxy.add(lambda method, target: method == "HEAD" and target.rstrip("/") == f"/{bucket}", "403", times=2)
    cp = Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", endpoint_url=proxy.endpoint, max_attempts=1)
    assert await cp.load() is None
    assert not await cp.prev_exists()
    assert any(entry["action"] == "403" for entry in proxy.log)


async def test_a_listing_whose_head_fails_raises_that_store_error(
    moto_server: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    from checkpointio._manage import list_checkpoints

    for name in ("a", "b", "c"):
        moto_server.client().put_object(Bucket=bucket, Key=f"run/{name}", Body=b"foreign")  # no record: HEADed
    proxy.add(lambda method, target: method == "HEAD" and target.endswith("/run/b"), "500", times=10)
    with pytest.raises(StoreError, match="run/b"):
        await list_checkpoints(f"s3://{bucket}/run/", TransferConfig(endpoint_url=proxy.endpoint, max_attempts=1))


def test_an_interrupted_call_waits_longer_than_an_abort_may_take() -> None:
    from checkpointio._portal import CLEANUP_TIMEOUT
    from checkpointio._stores._s3._upload import _ABORT_TIMEOUT

    assert CLEANUP_TIMEOUT > _ABORT_TIMEOUT  # else Ctrl-C could return with the upload still open


async def test_unreachable_endpoint_is_a_store_unavailable_error_not_a_first_attempt() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    cp = Checkpoint("s3://bucket/b", src="s3://bucket/a", endpoint_url=endpoint, max_attempts=2, connect_timeout=2)
    with pytest.raises(StoreUnavailableError, match="s3://bucket/a"):
        await cp.load()
    with pytest.raises(StoreUnavailableError, match="s3://bucket/b"):
        await cp.save(b"x")


async def test_bad_credentials_are_access_denied(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    guarded = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        cp = Checkpoint("s3://guarded/b", src="s3://guarded/a", endpoint_url=guarded.endpoint, max_attempts=1)
        with pytest.raises(AccessDeniedError, match="s3://guarded/b"):
            await cp.save(b"x")
        with pytest.raises(AccessDeniedError, match="s3://guarded/a"):
            await cp.load()
    finally:
        stop(guarded.process)


async def test_object_over_5_tib_is_refused_before_any_upload(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    huge = tmp_path / "sparse"
    with open(huge, "wb") as file:
        file.truncate(5 * 1024 * 1024 * MiB + 1)  # sparse: takes no disk space
    with pytest.raises(ObjectTooLargeError, match="5 TiB"):
        await Checkpoint(f"s3://{bucket}/huge").save(huge)
    assert uploads_left(moto_server, bucket) == []


def test_the_quicker_botocore_loader_reads_the_same_models_and_knows_every_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # private: a fresh loader (clients made by earlier tests changed the shared one's models as
    # botocore does, e.g. request URIs stripped of the bucket)
    monkeypatch.setattr(s3_loader, "_loaders", {})
    stock = Loader()
    loader = prepared_session(None).get_component("data_loader")
    assert isinstance(loader, _DataLoader)  # the session uses it (not botocore's own, left on error)
    for type_name in ("service-2", "endpoint-rule-set-1"):
        assert loader.load_service_model("s3", type_name) == stock.load_service_model("s3", type_name)
    assert loader.load_data("endpoints") == stock.load_data("endpoints")
    services = loader.list_available_services("service-2")
    assert "s3" in services and "sts" in services  # STS: the credential chain's assumed roles need it
    assert "no-such-service" not in services and "../s3" not in services and "" not in services
    assert list(services) == stock.list_available_services("service-2")
    assert loader.load_service_model("sts", "service-2") == stock.load_service_model("sts", "service-2")


async def test_botocore_start_up_work_is_all_done_before_the_client_is_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import botocore

    listed: list[str] = []
    listdir = os.listdir

    def listing(path: str) -> list[str]:
        listed.append(os.path.normpath(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", listing)
    monkeypatch.setattr(s3_loader, "_loaders", {})  # private: a fresh process's loader, nothing parsed yet
    session = await anyio.to_thread.run_sync(prepared_session, None)
    loader = session.get_component("data_loader")
    files = loader.file_loader
    parsed: list[str] = []

    class Watched:
        def exists(self, path: str) -> bool:
            return bool(files.exists(path))

        def load_file(self, path: str) -> object:
            data = files.load_file(path)
            if data is not None:
                parsed.append(path)
            return data

    loader.file_loader = Watched()
    async with session.create_client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1"):
        pass
    assert parsed == []  # every file a client reads was parsed in the worker thread, none on the loop
    # botocore asked whether S3 is a service by `in`: the ~400 service folders were never listed
    assert os.path.normpath(os.path.join(os.path.dirname(botocore.__file__), "data")) not in listed


async def test_one_client_is_reused_per_event_loop(bucket: str) -> None:
    for i in range(5):
        await Checkpoint(f"s3://{bucket}/k{i}").save(b"x")
        await Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/k{i}").prev_exists()
    assert len(_clients._by_loop[asyncio.get_running_loop()]) == 1


def test_loops_closed_without_shutting_down_their_generators_do_not_keep_their_clients(bucket: str) -> None:
    import gc

    loops = []
    # Nothing can close a client on a loop that is closed: aiohttp warns of each such session when
    # it is collected. Collected here, so the warnings come from the test that causes them.
    with pytest.warns(ResourceWarning, match="Unclosed client session"):
        for i in range(4):
            loop = asyncio.new_event_loop()  # an older pattern: no asyncio.run, no shutdown_asyncgens()
            loop.run_until_complete(Checkpoint(f"s3://{bucket}/k{i}").save(b"x"))
            loop.close()
            loops.append(loop)
        gc.collect()
        assert [loop in _clients._by_loop for loop in loops] == [False, False, False, True]  # the last until a next
        # The next loop forgets the last; its own client is closed with it (asyncio.run shuts down generators).
        asyncio.run(Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/k0").prev_exists())
        gc.collect()
    assert [loop in _clients._by_loop for loop in loops] == [False, False, False, False]


# -- single files restored range by range, each written at its offset as it arrives ------------


async def test_a_large_file_is_written_range_by_range_and_checked_against_its_crc32(
    moto_server: MotoServer, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(17 * MiB + 3))
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/w", **options).save(source)
    proxy.add(is_ranged_get(proxy), "reset_response", times=1)  # one range fails and is fetched again
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **options) as cp:
        restored = await cp.load()
        assert restored == cp.path / "payload"
        assert restored.read_bytes() == source.read_bytes()
        assert sorted(p.name for p in cp.path.iterdir()) == ["payload"]  # no staging file left


async def test_a_large_file_with_a_corrupt_range_is_refused_and_not_presented(bucket: str, proxy: FaultProxy) -> None:
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/w", **options).save(os.urandom(12 * MiB))
    proxy.add(is_ranged_get(proxy), "flip", times=1)  # same length, one byte off: only the CRC32 tells
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **options) as cp:
        with pytest.raises(ChecksumMismatchError, match="CRC32"):
            await cp.load()
        assert not cp.path.exists() or list(cp.path.iterdir()) == []
    assert [entry["action"] for entry in proxy.log].count("flip") == 1


@pytest.mark.parametrize("combine", [True, False], ids=["crc32-on-receivers", "crc32-in-reader"])
@pytest.mark.parametrize("whole_object_crc", [True, False])
async def test_a_directory_with_a_corrupt_range_is_refused_and_not_presented(
    bucket: str,
    proxy: FaultProxy,
    tmp_path: Path,
    whole_object_crc: bool,
    combine: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from checkpointio import _codec

    # without crc32_combine (stdlib zlib) the ranges' CRC32s cannot be joined: the reader takes it
    monkeypatch.setattr(_codec, "CAN_COMBINE", combine and _codec.CAN_COMBINE)
    tree = tmp_path / "tree"
    tree.mkdir()
    weights = os.urandom(12 * MiB)  # noise: every gzip member holds its data stored, not deflated
    (tree / "weights.bin").write_bytes(weights)
    # without flexible checksums the server keeps no CRC32 of a directory (a stream saved in parts)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "flexible_checksums": whole_object_crc}
    await Checkpoint(f"s3://{bucket}/w", **options).save(tree)
    proxy.add(is_ranged_get(proxy), "flip", times=1)  # same length, one byte of a member's data off
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **options) as cp:
        if whole_object_crc:  # the object's CRC32, taken on the receiving threads, refuses it
            with pytest.raises(ChecksumMismatchError, match="CRC32 of the stored bytes"):
                await cp.load()
        else:  # nothing covers the whole object: the member's own CRC32 does
            with pytest.raises(CorruptCheckpointError, match="gzip member fails its CRC32 check"):
                await cp.load()
        assert not cp.path.exists() or list(cp.path.iterdir()) == []
        restored = await cp.load()  # the flip was once: read again, it is whole
        assert restored is not None and (restored / "weights.bin").read_bytes() == weights
    assert [entry["action"] for entry in proxy.log].count("flip") == 1


@pytest.mark.parametrize("whole_object_crc", [True, False])
async def test_a_load_takes_one_crc32_of_its_bytes_whichever_checksum_covers_them(
    bucket: str, tmp_path: Path, whole_object_crc: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from checkpointio import _codec

    tree = tmp_path / "tree"
    tree.mkdir()
    weights = os.urandom(12 * MiB)  # noise: stored, not deflated; its members' CRC32s are of these bytes
    (tree / "weights.bin").write_bytes(weights)
    stream = os.urandom(11 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "flexible_checksums": whole_object_crc}
    await Checkpoint(f"s3://{bucket}/tree", **options).save(tree)
    await Checkpoint(f"s3://{bucket}/stream", **options).save(io.BytesIO(stream))  # size unknown up front
    taken = 0
    crc32 = _codec.crc32

    def counted(data: bytes | bytearray | memoryview, value: int = 0) -> int:
        nonlocal taken
        taken += memoryview(data).nbytes
        return crc32(data, value)

    monkeypatch.setattr(_codec, "crc32", counted)
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/tree", **options) as cp:
        restored = await cp.load()
        assert restored is not None and (restored / "weights.bin").read_bytes() == weights
    info = await S3Store(TransferConfig(**options)).head(parse_location(f"s3://{bucket}/tree"))
    assert info is not None
    archive = info.size
    # The server's CRC32 of the whole archive, or else its members' own: one of them, not both
    # (and a few small records of the archive's own).
    assert len(weights) <= taken < archive + MiB // 16
    taken = 0
    async with Checkpoint(f"s3://{bucket}/y", src=f"s3://{bucket}/stream", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == stream
    # A stream saved in parts has a CRC32 to check only where the server keeps one.
    assert taken == (len(stream) if whole_object_crc else 0)


async def test_multipart_bytes_and_files_carry_their_crc32_where_the_server_keeps_none(
    bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    # no flexible checksums: the server keeps no CRC32 of the whole object, only our record can
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "flexible_checksums": False}
    data = os.urandom(12 * MiB + 3)
    (tmp_path / "state.bin").write_bytes(data)
    await Checkpoint(f"s3://{bucket}/bytes", **options).save(data)
    await Checkpoint(f"s3://{bucket}/file", **options).save(tmp_path / "state.bin")
    store = S3Store(TransferConfig(**options))
    for name in ("bytes", "file"):
        info = await store.head(parse_location(f"s3://{bucket}/{name}"))
        assert info is not None and info.etag.strip('"').endswith("-3") and info.server_crc32 is None
        assert info.record is not None and (info.record.size, info.record.crc32) == (len(data), zlib.crc32(data))
        proxy.add(is_ranged_get(proxy), "flip", times=1)  # same length, one byte off: only the CRC32 tells
        async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/{name}", **options) as cp:
            with pytest.raises(ChecksumMismatchError, match="saved checksum"):
                await cp.load()
            assert await cp.load_bytes() == data  # the flip was once: read again, it is whole


async def test_a_load_that_could_check_only_the_length_says_so_once(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import checkpointio._engine as engine

    monkeypatch.setattr(engine, "_warned_unchecked", set())  # private: the warning is once per process
    options: TransferOptions = {**SMALL_PARTS, "flexible_checksums": False}
    data = os.urandom(11 * MiB)
    await Checkpoint(f"s3://{bucket}/stream", **options).save(io.BytesIO(data))  # size unknown up front
    tree = make_tree(tmp_path / "tree")
    (tree / "weights").write_bytes(os.urandom(6 * MiB))  # an archive of two parts, checked by gzip's CRC32s
    await Checkpoint(f"s3://{bucket}/tree", **options).save(tree)
    for name in ("tree", "stream", "stream"):
        async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/{name}", **options) as cp:
            restored = await cp.load()
            assert restored is not None
            if name == "stream":
                assert restored.read_bytes() == data
    warnings = [record.getMessage() for record in caplog.records if "only its length" in record.getMessage()]
    assert warnings == [
        f"s3://{bucket}/stream has no CRC32 to check (a stream saved in parts to a "
        "server that keeps no checksum of the whole object): only its length was checked"
    ]


async def test_a_source_that_differs_from_its_crc32_read_up_front_is_not_stored(
    moto_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import checkpointio._engine as engine

    await Checkpoint(f"s3://{bucket}/w", **SMALL_PARTS).save(b"previous")
    # as if the file was rewritten between the read for its CRC32 and the upload's own read
    # Private: a source changing between the CRC32 pass and the upload is a race no test can time.
    monkeypatch.setattr(engine, "_crc32_up_front", lambda source: lambda: 12345)
    with pytest.raises(SourceChangedError, match="changed while it was saved"):
        await Checkpoint(f"s3://{bucket}/w", **SMALL_PARTS).save(os.urandom(11 * MiB))
    assert uploads_left(moto_server, bucket) == []
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **SMALL_PARTS) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == b"previous"


async def test_a_large_file_replaced_while_its_ranges_are_fetched_is_detected(
    moto_server: MotoServer, bucket: str
) -> None:
    await Checkpoint(f"s3://{bucket}/w", **SMALL_PARTS).save(os.urandom(11 * MiB))
    store = S3Store(TransferConfig(**SMALL_PARTS))
    info = await store.head(parse_location(f"s3://{bucket}/w"))
    assert info is not None
    moto_server.client().put_object(Bucket=bucket, Key="w", Body=b"someone else's")
    offsets: list[int] = []

    def sink(offset: int, blocks: list[bytes]) -> None:
        offsets.append(offset)

    with pytest.raises(ConcurrentModificationError, match="replaced while being read"):
        await store.get_ranges(info, sink)
    assert offsets == []


async def test_cancelling_a_ranged_restore_leaves_no_partial_file(bucket: str, proxy: FaultProxy) -> None:
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/w", **options).save(os.urandom(16 * MiB))
    proxy.stall_seconds = 5
    proxy.add(lambda method, target: method == "GET", "stall", times=100)
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **options) as cp:
        with anyio.move_on_after(1.5) as scope:
            await cp.load()
        assert scope.cancelled_caught
        assert not cp.path.exists() or list(cp.path.iterdir()) == []
    assert tasks_left_on_receivers() == 0  # the stalled ranges were cancelled and waited for


async def test_cancelling_load_bytes_mid_download_then_loading_again_gets_every_byte(
    bucket: str, proxy: FaultProxy
) -> None:
    data = os.urandom(16 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/w", **options).save(data)
    proxy.stall_seconds = 5
    proxy.add(lambda method, target: method == "GET", "stall", times=2)  # two ranges hang
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **options) as cp:
        with anyio.move_on_after(1.5) as scope:
            await cp.load_bytes()
        assert scope.cancelled_caught
        assert await cp.load_bytes() == data  # the next attempt starts afresh


# -- request options: encryption, storage class, tags, expected bucket owner, requester pays ------


#: What S3 operation a request the proxy relayed is, from its method and target (path-style).
def operation_of(method: str, target: str) -> str:
    path, _, query = target.partition("?")
    on_bucket = path.strip("/").count("/") == 0
    if method == "HEAD":
        return "HeadBucket" if on_bucket else "HeadObject"
    if method == "GET":
        if "uploadId=" in query:
            return "ListParts"
        if "uploads" in query.split("&"):
            return "ListMultipartUploads"
        if "list-type=2" in query:
            return "ListObjectsV2"
        return "GetObject"
    if method == "PUT":
        return "UploadPart" if "partNumber=" in query else "PutObject"
    if method == "POST":
        return "CompleteMultipartUpload" if "uploadId=" in query else "CreateMultipartUpload"
    return "AbortMultipartUpload" if "uploadId=" in query else "DeleteObject"


async def test_saved_objects_carry_the_encryption_storage_class_and_tags_asked_for(
    moto_server: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    import boto3

    kms = boto3.client("kms", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    key = kms.create_key()["KeyMetadata"]["Arn"]
    tags = {"team": "ml research", "run": "7/a:b@c+d=e"}
    options: TransferOptions = {
        **SMALL_PARTS,
        "endpoint_url": proxy.endpoint,
        "server_side_encryption": "aws:kms",
        "sse_kms_key_id": key,
        "bucket_key_enabled": True,
        "storage_class": "STANDARD_IA",
        "tags": tags,
    }
    client = moto_server.client()
    for name, data in (("small", b"step=41"), ("large", os.urandom(11 * MiB + 5))):  # one PUT; three parts
        await Checkpoint(f"s3://{bucket}/{name}", **options).save(data)
        head = client.head_object(Bucket=bucket, Key=name)
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"], head["StorageClass"]) == (
            "aws:kms",
            key,
            "STANDARD_IA",
        )
        stored = client.get_object_tagging(Bucket=bucket, Key=name)["TagSet"]
        assert {tag["Key"]: tag["Value"] for tag in stored} == tags
        # still checked against its CRC32 on the way back: one byte off on the wire is refused
        proxy.add(is_ranged_get(proxy), "flip", times=1)
        async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/{name}", **options) as cp:
            with pytest.raises(ChecksumMismatchError, match="CRC32"):
                await cp.load_bytes()
            assert await cp.load_bytes() == data
    # the marker a task's attempt claims its number with is an object too
    task_env = TaskEnvironment("tests", storage=f"s3://{bucket}/tasks", run_id="r", **options)

    @task_env.task(retries=1)
    async def job() -> None:
        raise RuntimeError("saved nothing")

    with pytest.raises(RuntimeError):
        await job()
    claim = client.head_object(Bucket=bucket, Key="tasks/tests/job/r/attempt-0.claim")
    assert (claim["ServerSideEncryption"], claim["StorageClass"]) == ("aws:kms", "STANDARD_IA")
    # moto keeps the bucket key flag of a single PUT only: on the wire, all creating requests carry it
    assert client.head_object(Bucket=bucket, Key="small")["BucketKeyEnabled"] is True
    sent: dict[str, list[dict[str, str]]] = {}
    for entry in proxy.log:
        sent.setdefault(operation_of(str(entry["method"]), str(entry["target"])), []).append(entry["headers"])
    assert len(sent["PutObject"]) == 3 and len(sent["CreateMultipartUpload"]) == 1  # small; 2 claims; large
    for headers in sent["PutObject"] + sent["CreateMultipartUpload"]:
        assert headers["x-amz-server-side-encryption"] == "aws:kms"
        assert headers["x-amz-server-side-encryption-aws-kms-key-id"] == key
        assert headers["x-amz-server-side-encryption-bucket-key-enabled"] == "true"
        assert headers["x-amz-storage-class"] == "STANDARD_IA"
        assert headers["x-amz-tagging"] == "team=ml%20research&run=7%2Fa%3Ab%40c%2Bd%3De"
    # the others take none of them (S3 refuses encryption headers on a part)
    for operation in ("UploadPart", "CompleteMultipartUpload", "HeadObject", "GetObject"):
        assert sent[operation]
        for headers in sent[operation]:
            assert not [
                name for name in headers if "server-side" in name or name in ("x-amz-storage-class", "x-amz-tagging")
            ]


async def test_every_request_carries_the_expected_bucket_owner_and_agrees_to_pay(
    moto_server: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    # moto checks neither header, so what is checked is that each request sends them
    from checkpointio._manage import collect_garbage, list_checkpoints, remove

    owner = "123456789012"
    options: TransferOptions = {
        **SMALL_PARTS,
        "endpoint_url": proxy.endpoint,
        "expected_bucket_owner": owner,
        "requester_pays": True,
    }
    config = TransferConfig(**options)
    data = os.urandom(11 * MiB)
    await Checkpoint(f"s3://{bucket}/run/small", **options).save(b"small")
    await Checkpoint(f"s3://{bucket}/run/large", **options).save(data)
    for name in ("small", "large", "missing"):
        async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/run/{name}", **options) as cp:
            assert await cp.load_bytes() == {"small": b"small", "large": data, "missing": None}[name]
    assert [info.location.key for info in await list_checkpoints(f"s3://{bucket}/run/", config)] == [
        "run/large",
        "run/small",
    ]
    await remove(f"s3://{bucket}/run/small", config)
    task_env = TaskEnvironment("tests", storage=f"s3://{bucket}/tasks", **options)

    @task_env.task(retries=1)
    async def job() -> int:
        return 7

    assert await job() == 7  # its attempt's claim: a conditional PUT
    assert sum(".claim" in str(entry["target"]) and entry["method"] == "PUT" for entry in proxy.log) == 1
    proxy.add(is_part(2), "403")  # a save that fails is aborted, and the abort checked with ListParts
    with pytest.raises(AccessDeniedError, match=f"account {owner} owns the bucket"):
        await Checkpoint(f"s3://{bucket}/run/failed", **options).save(data)
    moto_server.client().create_multipart_upload(Bucket=bucket, Key="run/abandoned")
    assert len(await collect_garbage(f"s3://{bucket}/run/", config, older_than=0)) == 1
    assert uploads_left(moto_server, bucket) == []

    seen = set()
    for entry in proxy.log:
        operation = operation_of(str(entry["method"]), str(entry["target"]))
        headers: dict[str, str] = entry["headers"]
        seen.add(operation)
        assert headers.get("x-amz-expected-bucket-owner") == owner, operation
        # botocore's model: HeadBucket is the one request that takes no RequestPayer
        assert headers.get("x-amz-request-payer") == (None if operation == "HeadBucket" else "requester"), operation
    assert seen == {
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
        "AbortMultipartUpload",
        "ListParts",
        "HeadObject",
        "HeadBucket",
        "GetObject",
        "ListObjectsV2",
        "DeleteObject",
        "ListMultipartUploads",
    }


async def test_a_bucket_another_account_owns_is_refused_naming_the_expected_owner(
    bucket: str, proxy: FaultProxy
) -> None:
    # What S3 answers when ExpectedBucketOwner does not match (moto does not check it): 403 AccessDenied.
    proxy.add(lambda method, target: True, "403", times=100)
    options: TransferOptions = {
        "endpoint_url": proxy.endpoint,
        "max_attempts": 1,
        "expected_bucket_owner": "111122223333",
    }
    message = (
        rf"s3://{bucket}/w: access denied while trying to (upload the checkpoint|read the checkpoint's metadata): "
        # a HEAD's answer has no body: botocore names it by its status
        r"(AccessDenied: Access Denied|403: Forbidden) \(check the credentials and the bucket policy, and that account "
        r"111122223333 owns the bucket \(expected_bucket_owner\)\)"
    )
    with pytest.raises(AccessDeniedError, match=message):
        await Checkpoint(f"s3://{bucket}/w", **options).save(b"x")
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **options) as cp:
        with pytest.raises(AccessDeniedError, match=message):
            await cp.load_bytes()


def test_the_request_options_accepted_are_values_botocore_knows() -> None:
    import botocore.session

    from checkpointio import _config

    model = botocore.session.get_session().get_service_model("s3")
    assert "aws:kms" in _config._ENCRYPTIONS and "STANDARD_IA" in _config._STORAGE_CLASSES
    assert set(_config._ENCRYPTIONS) <= set(model.shape_for("ServerSideEncryption").enum)
    assert set(_config._STORAGE_CLASSES) | set(_config._ARCHIVE_CLASSES) <= set(model.shape_for("StorageClass").enum)
    assert model.shape_for("RequestPayer").enum == ["requester"]


# -- loads received on several threads, each with its own event loop and client ----------------

#: Five ranges of 5 MiB for 21 MiB, four in flight, on three receiving threads.
ON_THREADS: TransferOptions = {**SMALL_PARTS, "max_concurrency": 4, "receive_workers": 3}


def receiving_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "checkpointio-receiver"]


def tasks_left_on_receivers() -> int:
    """Tasks still running on the receiving threads' loops (none once a load returned or raised)."""

    async def others() -> int:
        return len(asyncio.all_tasks()) - 1  # itself not counted

    return sum(asyncio.run_coroutine_threadsafe(others(), r.loop).result(10) for r in s3_receivers._running)


@pytest.mark.parametrize(
    ("asked", "uvloop_importable", "expected"),
    [("", True, "asyncio"), ("UVLoop", True, "uvloop"), ("asyncio", True, "asyncio"), ("", False, "asyncio")],
    ids=["default", "asked-for-uvloop", "asked-for-asyncio", "uvloop-missing"],
)
def test_receivers_run_asyncio_or_uvloop_when_asked_and_every_byte_comes_back(
    bucket: str, tmp_path: Path, asked: str, uvloop_importable: bool, expected: str
) -> None:
    if expected == "uvloop":
        pytest.importorskip("uvloop")
    make_tree(tmp_path / "tree")
    result = run_script(
        f"""
        import asyncio, sys
        if not {uvloop_importable!r}:
            sys.modules["uvloop"] = None  # import uvloop: ImportError
        from checkpointio import Checkpoint
        from checkpointio._stores._s3 import _receivers
        uri = "s3://{bucket}/ckpt"
        Checkpoint(uri).save_sync("tree")
        with Checkpoint("unused", src=uri, workspace="restored", receive_workers=2) as cp:
            cp.load_sync()
            print(sorted({{type(r.loop).__module__.split(".")[0] for r in _receivers._running}}))
            print(asyncio.get_event_loop_policy().__module__.split(".")[0])  # the process's: untouched
        """,
        tmp_path,
        CHECKPOINTIO_RECEIVE_LOOP=asked,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"['{expected}']", "asyncio"]
    assert snapshot(tmp_path / "restored") == snapshot(tmp_path / "tree")


@pytest.mark.parametrize("bodies", ["checkpointio", "aiohttp", "misspelt"])
def test_who_receives_object_bodies_is_a_setting_and_every_byte_comes_back_either_way(
    bucket: str, tmp_path: Path, bodies: str
) -> None:
    """Object bodies are read by checkpointio's own HTTP reader unless CHECKPOINTIO_HTTP_BODIES=aiohttp
    asks for aiobotocore's session; either way the tree comes back whole; a typo is refused."""
    make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "big.bin").write_bytes(os.urandom(7 * MiB))
    result = run_script(
        f"""
        from checkpointio import Checkpoint
        from tests.bodycount import received
        uri = "s3://{bucket}/ckpt"
        try:
            Checkpoint(uri, part_size=5 * 2**20).save_sync("tree")
            with Checkpoint("unused", src=uri, workspace="restored", part_size=5 * 2**20) as cp:
                cp.load_sync()
        except ValueError as error:
            print(error)
        print(sum(received))
        """,
        tmp_path,
        CHECKPOINTIO_HTTP_BODIES="asyncio" if bodies == "misspelt" else bodies,
    )
    assert result.returncode == 0, result.stderr
    if bodies == "misspelt":
        refusal = "CHECKPOINTIO_HTTP_BODIES must be 'checkpointio' or 'aiohttp', not 'asyncio'"
        assert result.stdout.split("\n")[0] == refusal
        return
    blocks = int(result.stdout.split()[-1])
    assert blocks >= 14 if bodies == "checkpointio" else blocks == 0  # 7 MiB and more, in 512 KiB blocks
    assert snapshot(tmp_path / "restored") == snapshot(tmp_path / "tree")


def test_object_bodies_over_https_are_verified_with_botocores_ca_bundle(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """Over HTTPS, checkpointio's reader checks the server's certificate as botocore would: against
    AWS_CA_BUNDLE here (a CA made by the test); without it, the same server is refused."""
    pytest.importorskip("cryptography")
    from .tlsfront import TLSFront, make_certificates

    ca, certificate, key = make_certificates(tmp_path)
    front = TLSFront(("127.0.0.1", int(moto_server.endpoint.rsplit(":", 1)[1])), certificate, key)
    data = os.urandom(11 * MiB)
    (tmp_path / "data.bin").write_bytes(data)
    try:
        code = f"""
            from checkpointio import Checkpoint, CheckpointError
            from tests.bodycount import received
            Checkpoint("s3://{bucket}/ckpt", part_size=5 * 2**20).save_sync(open("data.bin", "rb").read())
            try:
                cp = Checkpoint("unused", src="s3://{bucket}/ckpt", endpoint_url="{front.endpoint}", max_attempts=1)
                print(cp.load_bytes_sync() == open("data.bin", "rb").read(), sum(received) >= 22)
            except CheckpointError as error:
                print(type(error).__name__, "CERTIFICATE_VERIFY_FAILED" in repr(error.__cause__))
            """
        trusted = run_script(code, tmp_path, AWS_CA_BUNDLE=str(ca))
        refused = run_script(code, tmp_path)
    finally:
        front.close()
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.split() == ["True", "True"]  # every byte, through checkpointio's reader (11 MiB)
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.split() == ["StoreError", "True"]


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ("asycnio", "CHECKPOINTIO_RECEIVE_LOOP must be 'asyncio' or 'uvloop', not 'asycnio'"),
        ("uvloop", "CHECKPOINTIO_RECEIVE_LOOP=uvloop needs the uvloop package, which is not installed"),
    ],
    ids=["misspelt", "uvloop-missing"],
)
def test_a_receiving_loop_that_cannot_be_had_is_refused_naming_the_variable(
    bucket: str, tmp_path: Path, asked: str, message: str
) -> None:
    result = run_script(
        f"""
        import sys
        sys.modules["uvloop"] = None  # import uvloop: ImportError
        from checkpointio import Checkpoint
        Checkpoint("s3://{bucket}/ckpt").save_sync(b"data")
        try:
            Checkpoint("unused", src="s3://{bucket}/ckpt").load_bytes_sync()
        except ValueError as error:
            print(error)
        """,
        tmp_path,
        CHECKPOINTIO_RECEIVE_LOOP=asked,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == message


def test_a_child_forked_while_another_thread_held_checkpointios_locks_saves_and_loads(
    bucket: str, tmp_path: Path
) -> None:
    # A fork copies a lock held by another thread as held, and nobody in the child releases it:
    # e.g. DataLoader workers forked while a background load's receivers make their sessions.
    result = run_script(
        f"""
        import os, signal, threading
        from checkpointio import Checkpoint
        from checkpointio import _allocator
        from checkpointio._stores import _memory
        from checkpointio._stores._s3 import _client, _loader
        uri = "s3://{bucket}/ckpt"
        Checkpoint(uri).save_sync(b"saved by the parent")
        locks = [_loader._preloading, _loader._loaders_lock, _client._clients._guard, _memory._lock, _allocator._lock]
        held, release = threading.Event(), threading.Event()

        def hold():
            for lock in locks:
                lock.acquire()
            held.set()
            release.wait()
            for lock in locks:
                lock.release()

        threading.Thread(target=hold).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hang fails the test instead of stalling the suite
            Checkpoint("memory://child").save_sync(b"in memory")
            print(bytes(Checkpoint("unused", src="memory://child").load_bytes_sync() or b""))
            Checkpoint(uri + "-child").save_sync(b"saved by the child")
            print(bytes(Checkpoint("unused", src=uri).load_bytes_sync() or b""))
            print(bytes(Checkpoint("unused", src=uri + "-child").load_bytes_sync() or b""), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        release.set()
        print("child status", status)
        """,
        tmp_path,
        CHECKPOINTIO_TUNE_MALLOC="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "b'in memory'",
        "b'saved by the parent'",
        "b'saved by the child'",
        "child status 0",
    ]


async def test_a_load_is_received_on_several_threads_and_every_byte_comes_back(bucket: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "weights.bin").write_bytes(os.urandom(21 * MiB + 3))
    data = os.urandom(21 * MiB + 5)
    options: TransferOptions = {**ON_THREADS, "compression_level": 0}
    await Checkpoint(f"s3://{bucket}/tree", **options).save(tree)
    await Checkpoint(f"s3://{bucket}/file", **options).save(tree / "weights.bin")
    await Checkpoint(f"s3://{bucket}/bytes", **options).save(data)
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/tree", **options) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == snapshot(tree)
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/file", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == (tree / "weights.bin").read_bytes()
        assert await cp.load_bytes() == (tree / "weights.bin").read_bytes()
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/bytes", **options) as cp:
        assert await cp.load_bytes() == data
    # The ranges are written at their offsets on the threads that received them, three here
    store = S3Store(TransferConfig(**options))
    info = await store.head(parse_location(f"s3://{bucket}/bytes"))
    assert info is not None
    pieces: dict[int, bytes] = {}
    writers: set[int] = set()

    def sink(offset: int, blocks: list[bytes]) -> None:
        pieces[offset] = b"".join(blocks)
        writers.add(threading.get_ident())

    await store.get_ranges(info, sink)
    assert b"".join(pieces[offset] for offset in sorted(pieces)) == data
    assert writers == {thread.ident for thread in receiving_threads()[:3]} and len(writers) == 3
    ordered: list[bytes] = []

    async def in_order(blocks: list[bytes]) -> None:
        ordered.extend(blocks)

    await store.get(info, in_order)  # delivered in order on the caller's loop
    assert b"".join(ordered) == data


async def test_a_directory_load_is_taken_by_its_reader_from_the_receiving_threads_not_through_the_loop(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "weights.bin").write_bytes(os.urandom(21 * MiB + 3))
    options: TransferOptions = {**ON_THREADS, "compression_level": 0}
    await Checkpoint(f"s3://{bucket}/tree", **options).save(tree)
    callers: list[str] = []
    run = anyio.from_thread.run

    def noting_the_caller(func: Any, *args: Any) -> Any:
        callers.append(threading.current_thread().name)
        return run(func, *args)

    monkeypatch.setattr(anyio.from_thread, "run", noting_the_caller)
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/tree", **options) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == snapshot(tree)
        entries = await cp.contents()
        assert entries is not None and "weights.bin" in {entry.path for entry in entries}
    assert (await _manage.verify(f"s3://{bucket}/tree", TransferConfig(**options))).size > 21 * MiB  # ls --verify
    # Five ranges, each in pieces of chunk_size: none waited for the event loop to hand it over
    assert "checkpointio-reader" not in callers


@pytest.mark.parametrize("kind", ["directory", "file", "bytes"])
async def test_a_range_failing_half_way_fails_the_load_presents_nothing_and_leaves_nothing_running(
    bucket: str, proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "weights.bin").write_bytes(os.urandom(21 * MiB))
    options: TransferOptions = {**ON_THREADS, "compression_level": 0, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/a", **options).save(tree if kind == "directory" else tree / "weights.bin")
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/a", **options) as cp:
        assert await cp.load_bytes() if kind == "bytes" else await cp.load()  # the receivers are running
        threads = receiving_threads()
        if cp.path.exists():
            remove_tree(cp.path)
    proxy.add(is_ranged_get(proxy), "reset_response", times=1)  # one range cut half-way, not retried
    once: TransferOptions = {**options, "max_attempts": 1}
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/a", **once) as cp:
        with pytest.raises(StoreError, match=f"s3://{bucket}/a") as failure:
            await (cp.load_bytes() if kind == "bytes" else cp.load())
        assert "download the checkpoint" in str(failure.value)
        assert not cp.path.exists() or list(cp.path.iterdir()) == []  # nothing presented, nothing staged
    assert [entry["action"] for entry in proxy.log].count("reset_response") == 1
    assert tasks_left_on_receivers() == 0  # every range stopped before the load raised
    assert receiving_threads() == threads  # the same threads, none added or left over
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None
        if kind == "directory":
            assert snapshot(restored) == snapshot(tree)
        else:
            assert restored.read_bytes() == (tree / "weights.bin").read_bytes()


def clients_on_receivers(read_timeout: float) -> list[int]:
    """How many clients made with this ``read_timeout`` each receiving thread holds, once the work
    started on its loop (:meth:`Receiver.start_soon`) has ended."""

    async def settled() -> int:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)
        return sum(1 for key in _clients._by_loop.get(asyncio.get_running_loop(), {}) if read_timeout in key)

    return [asyncio.run_coroutine_threadsafe(settled(), r.loop).result(30) for r in s3_receivers._running]


def clients_here(read_timeout: float) -> int:
    """How many clients made with this ``read_timeout`` the running loop holds."""
    return sum(1 for key in _clients._by_loop.get(asyncio.get_running_loop(), {}) if read_timeout in key)


async def test_a_load_asks_for_the_metadata_on_a_receiver_while_the_others_make_their_clients(
    bucket: str, tmp_path: Path
) -> None:
    # A setting no other test uses: clients made for it can only come from this test's loads.
    options: TransferOptions = {**ON_THREADS, "read_timeout": 61.25}
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/none", **options) as cp:
        assert await cp.load() is None  # nothing there (a first attempt): no range was read...
    assert clients_on_receivers(61.25)[:3] == [1, 1, 1]  # ...yet the three receivers are ready for one
    assert clients_here(61.25) == 0  # and the HEAD was asked on one of them, not on this loop
    data = os.urandom(21 * MiB + 1)
    tree = make_tree(tmp_path / "tree")
    saving: TransferOptions = {**ON_THREADS, "read_timeout": 62.5}  # the saves' clients are another key
    await Checkpoint(f"s3://{bucket}/w", **saving).save(data)
    await Checkpoint(f"s3://{bucket}/t", **saving).save(tree)
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/w", **options) as cp:
        assert await cp.load_bytes() == data
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/t", **options) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == snapshot(tree)
    assert clients_on_receivers(61.25)[:3] == [1, 1, 1]  # the loads used those clients, made no others
    assert clients_here(61.25) == 0  # a load needs no client on the caller's loop at all


async def test_distributed_and_incremental_loads_ask_for_metadata_on_the_receivers_too(
    bucket: str, tmp_path: Path
) -> None:
    # The HEADs of an incremental checkpoint's manifest and packs, and of a distributed one's data
    # objects, go where those objects' reads go: no client is made on the caller's loop (the
    # test's for the incremental load; checkpointio's own loop thread for the blocking DCP load).
    pytest.importorskip("torch")
    import torch

    from checkpointio import _portal, dcp

    options: TransferOptions = {**ON_THREADS, "read_timeout": 63.75}  # no other test's clients
    saving: TransferOptions = {**ON_THREADS, "read_timeout": 64.5}
    tree = make_tree(tmp_path / "tree")
    await Checkpoint(f"s3://{bucket}/inc", incremental=True, **saving).save(tree)
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/inc", incremental=True, **options) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == snapshot(tree)
    assert clients_here(63.75) == 0

    state: dict[str, Any] = {"weight": torch.arange(4000.0).reshape(40, 100), "step": 3}

    def blocking_dcp() -> dict[str, Any]:
        dcp.save(state, f"s3://{bucket}/dist", **saving)
        loaded: dict[str, Any] = {"weight": torch.zeros(40, 100), "step": -1}
        assert dcp.load(loaded, f"s3://{bucket}/dist", **options) is True
        return loaded

    loaded = await anyio.to_thread.run_sync(blocking_dcp)
    assert torch.equal(loaded["weight"], state["weight"]) and loaded["step"] == 3

    async def on_the_portal_loop() -> int:
        return clients_here(63.75)

    portal = _portal._loop_thread().loop
    assert asyncio.run_coroutine_threadsafe(on_the_portal_loop(), portal).result(30) == 0
    assert clients_on_receivers(63.75)[:3] == [1, 1, 1]  # the loads' requests went to the receivers


async def test_a_range_read_into_buffers_cut_short_resumes_where_it_stopped(bucket: str, proxy: FaultProxy) -> None:
    """``read_range_into`` (a DCP load's reads): a response cut short is asked again from the
    first byte not received, and every buffer ends up whole with the CRC32 of its bytes."""
    data = os.urandom(9 * MiB + 3)
    options: TransferOptions = {**ON_THREADS, "endpoint_url": proxy.endpoint}
    await Checkpoint(f"s3://{bucket}/r", **options).save(data)
    store = S3Store(TransferConfig(**options))
    info = await store.head(parse_location(f"s3://{bucket}/r"))
    assert info is not None
    proxy.add(lambda method, target: method == "GET", "truncate", times=1)
    buffers = [bytearray(3 * MiB), bytearray(5 * MiB + 2)]
    crc32s = await store.read_range_into(info, MiB, [memoryview(buffer) for buffer in buffers])
    assert bytes(buffers[0]) == data[MiB : 4 * MiB] and bytes(buffers[1]) == data[4 * MiB : 9 * MiB + 2]
    assert list(crc32s) == [zlib.crc32(data[MiB : 4 * MiB]), zlib.crc32(data[4 * MiB : 9 * MiB + 2])]
    ranges = [str(entry["headers"]["range"]) for entry in proxy.log if entry["method"] == "GET"]
    assert ranges[0] == f"bytes={MiB}-{9 * MiB + 1}" and len(ranges) == 2
    resumed = int(ranges[1].removeprefix("bytes=").split("-")[0])
    assert MiB < resumed < 9 * MiB + 1 and ranges[1].endswith(f"-{9 * MiB + 1}")  # resumed, not started over


async def test_range_reads_are_received_on_the_receiving_threads_in_turn_and_come_back_whole(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(21 * MiB + 7)
    await Checkpoint(f"s3://{bucket}/r", **ON_THREADS).save(data)
    store = S3Store(TransferConfig(**ON_THREADS))
    info = await store.head(parse_location(f"s3://{bucket}/r"))
    assert info is not None
    receivers_of_blocks: set[int] = set()
    add = s3_download._Received.add

    async def noting_the_thread(self: s3_download._Received, block: bytes) -> None:
        receivers_of_blocks.add(threading.get_ident())
        await add(self, block)

    monkeypatch.setattr(s3_download._Received, "add", noting_the_thread)
    spans = [(0, 5 * MiB), (5 * MiB, 5 * MiB), (10 * MiB + 1, 6 * MiB), (16 * MiB + 1, 5 * MiB + 6), (3, 1)]
    got = await asyncio.gather(*(store.read_range(info, offset, length) for offset, length in spans))
    assert got == [data[offset : offset + length] for offset, length in spans]
    # five reads on three receivers in turn: each receiver took some, the caller's loop none
    assert receivers_of_blocks == {thread.ident for thread in receiving_threads()[:3]}


async def test_a_single_file_load_cancelled_once_its_ranges_are_in_leaves_no_staging_file_and_no_descriptor(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from checkpointio import _engine

    await Checkpoint(f"s3://{bucket}/f", **SMALL_PARTS).save(os.urandom(12 * MiB))
    fetch = _engine._fetch_ranges
    scopes: list[anyio.CancelScope] = []

    async def then_cancelled(*args: Any) -> Any:
        check = await fetch(*args)
        scopes[0].cancel()  # a cancellation arriving once every range is in, before the file is placed
        return check

    monkeypatch.setattr(_engine, "_fetch_ranges", then_cancelled)
    workspace = tmp_path / "ws"

    def descriptors_into_it() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(workspace)):
                    found.append(fd)
        return found

    with anyio.CancelScope() as scope:
        scopes.append(scope)
        async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/f", workspace=workspace, **SMALL_PARTS) as cp:
            await cp.load()
    assert scope.cancelled_caught
    assert descriptors_into_it() == []
    assert not workspace.exists() or list(workspace.iterdir()) == []  # no staging file, nothing placed


async def test_a_sink_failing_on_one_range_stops_every_range_and_is_not_called_again(bucket: str) -> None:
    await Checkpoint(f"s3://{bucket}/w", **ON_THREADS).save(os.urandom(21 * MiB))
    store = S3Store(TransferConfig(**ON_THREADS))
    info = await store.head(parse_location(f"s3://{bucket}/w"))
    assert info is not None
    calls: list[int] = []

    def sink(offset: int, blocks: list[bytes]) -> None:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await store.get_ranges(info, sink)
    made = len(calls)
    assert tasks_left_on_receivers() == 0
    await anyio.sleep(0.5)
    assert len(calls) == made  # no range went on writing after the error was raised


def test_listing_a_folder_prefix_lists_that_folder_not_every_name_starting_like_it(
    proxied_bucket: ProxiedBucket,
) -> None:
    """``runs/7`` names the folder ``runs/7/`` once it holds anything: the listing asks S3 for that
    folder (and the object ``runs/7`` itself), never for the keys of ``runs/70``, ``runs/7-old``...
    that would only be filtered out (on a big bucket, most of the requests); so do the listings of
    unfinished uploads."""
    client, bucket = proxied_bucket.moto.client(), proxied_bucket.bucket
    wanted = ["runs/7", "runs/7/a", "runs/7/b/c"]
    others = ["runs/7-old", "runs/7.dcp/x", *(f"runs/70/{i:02}" for i in range(20)), "runs/8"]
    for key in wanted + others:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    uploads = {
        key: client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"] for key in ("runs/7/d", "runs/70/u")
    }
    store = S3Store(TransferConfig(endpoint_url=proxied_bucket.proxy.endpoint))
    prefix = parse_location("s3://" + bucket + "/runs/7")

    async def listing() -> tuple[list[str], list[str]]:
        found = await store.list(prefix)
        pending = await store.pending(prefix)
        return [info.location.key for info in found], [write.location.key for write in pending]

    try:
        found, pending = anyio.run(listing)
    finally:
        for key, upload in uploads.items():
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
    assert found == wanted
    assert pending == ["runs/7/d"]
    assert proxied_bucket.proxy.listed, "the proxy saw no listing"
    listed = proxied_bucket.proxy.listed
    assert not [key for key in listed if key in others], listed
    # The uploads of the key itself are listed one a page from its name on: the next key's ends it.
    assert [key for key in listed if key not in {*wanted, "runs/7/d"}] in ([], ["runs/70/u"]), listed
    # A name that is no folder is the start of names, as before: every key starting with it.
    starting = parse_location("s3://" + bucket + "/runs/7-")
    assert [info.location.key for info in anyio.run(store.list, starting)] == ["runs/7-old"]


async def test_each_load_asks_for_each_objects_metadata_once(bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    """A load HEADs every object it reads once: an incremental checkpoint's manifest (once to tell
    it is one, not again to read it; its packs, which the manifest describes, not at all), a
    distributed one's manifest and data objects, a plain archive read in part through its table."""
    pytest.importorskip("torch")
    import torch

    from checkpointio import dcp

    via: TransferOptions = {**ON_THREADS, "endpoint_url": proxy.endpoint}
    tree = make_tree(tmp_path / "tree")
    await Checkpoint(f"s3://{bucket}/inc", incremental=True, **ON_THREADS).save(tree)
    await Checkpoint(f"s3://{bucket}/plain", **ON_THREADS).save(tree)
    state: dict[str, Any] = {"weight": torch.arange(4000.0).reshape(40, 100), "step": 3}
    await anyio.to_thread.run_sync(lambda: dcp.save(state, f"s3://{bucket}/dist", **ON_THREADS))

    def heads() -> dict[str, int]:
        counted: dict[str, int] = {}
        for entry in proxy.log:
            if entry["method"] == "HEAD":
                key = str(entry["target"]).partition("?")[0]
                counted[key] = counted.get(key, 0) + 1
        proxy.log.clear()
        return counted

    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/inc", incremental=True, **via) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == snapshot(tree)
        loaded = heads()
        assert loaded == {f"/{bucket}/inc": 1}  # the manifest; its packs are read without a HEAD
        picked = await cp.load(only=["run.sh"])
        assert picked is not None and (picked / "run.sh").read_bytes() == (tree / "run.sh").read_bytes()
        assert heads() == {f"/{bucket}/inc": 1}
        entries = await cp.contents()
        assert entries is not None and "run.sh" in {entry.path for entry in entries}
        assert heads() == {f"/{bucket}/inc": 1}  # its manifest is its table of contents
    async with Checkpoint(f"s3://{bucket}/y", src=f"s3://{bucket}/plain", **via) as cp:
        picked = await cp.load(only=["run.sh"])
        assert picked is not None and (picked / "run.sh").read_bytes() == (tree / "run.sh").read_bytes()
        assert heads() == {f"/{bucket}/plain": 1}  # read through its table of contents

    def blocking_dcp() -> dict[str, Any]:
        loaded: dict[str, Any] = {"weight": torch.zeros(40, 100), "step": -1}
        assert dcp.load(loaded, f"s3://{bucket}/dist", **via) is True
        return loaded

    loaded_state = await anyio.to_thread.run_sync(blocking_dcp)
    assert torch.equal(loaded_state["weight"], state["weight"]) and loaded_state["step"] == 3
    dist = heads()
    assert dist[f"/{bucket}/dist"] == 1 and max(dist.values()) == 1 and len(dist) == 2  # the manifest, rank 0's data


async def test_many_heads_asked_at_once_are_spread_over_the_receivers(bucket: str, tmp_path: Path) -> None:
    # Verifying an incremental checkpoint HEADs each of its packs at once: they go to the receiving
    # threads in turn, as the packs' ranges do, not all to the first one (a load HEADs none: it
    # reads them straight away). Each receiver's own client tells (botocore's before-call event)
    # on which thread each HEAD was sent.
    from checkpointio import _incremental

    options: TransferOptions = {**ON_THREADS, "read_timeout": 65.25}  # no other test's clients
    root = tmp_path / "tree"
    root.mkdir()
    for number in range(8):
        (root / f"f{number}").write_bytes(os.urandom(300 * 1024))
    location = parse_location(f"s3://{bucket}/inc")
    manifest = (
        await _incremental.save(
            await open_store("s3", TransferConfig()), location, root, TransferConfig(), pack_size=256 * 1024
        )
    ).manifest
    assert len(manifest.pack_names) >= 6
    async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/none", **options) as cp:
        assert await cp.load() is None  # the receivers' clients are made (none is made on a HEAD later)
    sent_on: list[str] = []

    def note(**_: Any) -> None:
        sent_on.append(threading.current_thread().name + str(threading.get_ident()))

    async def hook(register: bool) -> int:
        clients = [c for key, (c, _) in _clients._by_loop.get(asyncio.get_running_loop(), {}).items() if 65.25 in key]
        for client in clients:
            (client.meta.events.register if register else client.meta.events.unregister)(
                "before-call.s3.HeadObject", note
            )
        return len(clients)

    loops = [receiver.loop for receiver in s3_receivers._running[:3]]
    assert [asyncio.run_coroutine_threadsafe(hook(True), loop).result(30) for loop in loops] == [1, 1, 1]
    try:
        async with Checkpoint(f"s3://{bucket}/x", src=f"s3://{bucket}/inc", **options) as cp:
            restored = await cp.load()
            assert restored is not None and snapshot(restored) == snapshot(root)
        assert len(sent_on) == 1  # the manifest's
        sent_on.clear()
        await _manage.verify(f"s3://{bucket}/inc", TransferConfig(**options))
    finally:
        for loop in loops:
            asyncio.run_coroutine_threadsafe(hook(False), loop).result(30)
    assert len(sent_on) == len(manifest.pack_names) + 1  # the manifest, then each pack once
    assert all(name.startswith("checkpointio-receiver") for name in sent_on)
    assert len(set(sent_on[1:])) > 1  # the packs' HEADs were sent from more than one receiver
