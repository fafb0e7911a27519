"""How S3's errors reach the caller: mapped to the CheckpointError tree in one place, chained to the
server's answer; anything the map does not know (and cancellation) raised exactly as it was."""

from __future__ import annotations

import asyncio
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ProfileNotFound, ResponseStreamingError

from checkpointio import (
    AccessDeniedError,
    BucketNotFoundError,
    Checkpoint,
    CheckpointError,
    ConcurrentModificationError,
    MiB,
    StoreError,
    StoreUnavailableError,
)
from checkpointio._config import TransferConfig
from checkpointio._location import parse_location
from checkpointio._stores._s3 import S3Store
from checkpointio._stores._s3._errors import mapped_errors

from .conftest import MotoServer
from .faultproxy import FaultProxy

LOCATION = parse_location("s3://bucket/run/a")


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    return moto_server.new_bucket()


def answer(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"{code}!"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (answer(404, "NoSuchBucket"), BucketNotFoundError),
        (answer(403, "AccessDenied"), AccessDeniedError),
        (answer(400, "ExpiredToken"), AccessDeniedError),
        (answer(412, "PreconditionFailed"), ConcurrentModificationError),
        (answer(503, "SlowDown"), StoreUnavailableError),
        (answer(400, "InvalidArgument"), StoreError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), StoreUnavailableError),
        (ResponseStreamingError(error="cut short"), StoreUnavailableError),
    ],
)
def test_s3_errors_become_the_checkpoint_error_they_mean_chained_to_the_original(
    error: Exception, expected: type[CheckpointError]
) -> None:
    with pytest.raises(CheckpointError) as caught, mapped_errors(LOCATION, "read the checkpoint"):
        raise error
    assert type(caught.value) is expected
    assert caught.value.__cause__ is error
    assert "s3://bucket/run/a" in str(caught.value)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("not ours"),
        StoreError("ours already", uri="s3://bucket/run/a"),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
    ],
    ids=["unknown", "ours", "cancelled", "interrupt"],
)
def test_what_the_s3_error_map_does_not_know_goes_on_untouched(error: BaseException) -> None:
    cause = OSError("the first failure")
    with pytest.raises(type(error)) as caught, mapped_errors(LOCATION, "read the checkpoint"):
        raise error from cause
    assert caught.value is error
    assert error.__cause__ is cause


@pytest.mark.parametrize("operation", ["save", "background save", "load", "load_bytes", "prev_exists", "contents"])
def test_an_s3_client_that_cannot_be_made_is_a_store_error_naming_the_uri(
    bucket: str, operation: str, tmp_path: Path
) -> None:
    """A profile that does not exist fails where botocore makes the client, before any request:
    still an error of the tree naming the checkpoint, botocore's as its cause."""
    uri = f"s3://{bucket}/run/a"
    Checkpoint(uri).save_sync(b"state")
    cp = Checkpoint(f"s3://{bucket}/run/b", src=uri, workspace=tmp_path / "ws", profile="no-such-profile-4711")
    calls: dict[str, Callable[[], object]] = {
        "save": lambda: cp.save_sync(b"next"),
        "background save": lambda: cp.save_sync(b"next", wait=False).result(),
        "load": cp.load_sync,
        "load_bytes": cp.load_bytes_sync,
        "prev_exists": cp.prev_exists_sync,
        "contents": cp.contents_sync,
    }
    with pytest.raises(StoreError) as caught:
        calls[operation]()
    shown = uri if operation not in ("save", "background save") else f"s3://{bucket}/run/b"
    assert str(caught.value).startswith(f"{shown}: could not set up the S3 client: "), caught.value
    assert "no-such-profile-4711" in str(caught.value)
    assert isinstance(caught.value.__cause__, ProfileNotFound)
    assert Checkpoint(f"s3://{bucket}/x", src=uri).load_bytes_sync() == b"state"  # nothing else changed


def test_an_endpoint_from_the_environment_that_is_no_url_is_a_value_error_naming_the_variable(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000")  # the scheme forgotten
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL_S3") as caught:
        Checkpoint(f"s3://{bucket}/run/a").save_sync(b"state")
    assert str(caught.value).startswith(f"s3://{bucket}/run/a: ")
    assert "'127.0.0.1:9000'" in str(caught.value)


async def test_an_unmapped_error_during_a_request_keeps_its_cause_and_traceback(bucket: str) -> None:
    store = S3Store(TransferConfig())
    client = await store._requests.client(parse_location(f"s3://{bucket}/a"))  # this store's requests use it
    cause = OSError("the disk went away")
    bug = RuntimeError("a bug in an event hook")

    def fail(**_: Any) -> None:
        raise bug from cause

    client.meta.events.register("before-send.s3.HeadObject", fail)  # botocore's public hook
    try:
        with pytest.raises(RuntimeError) as caught:
            await store.head(parse_location(f"s3://{bucket}/a"))
    finally:
        client.meta.events.unregister("before-send.s3.HeadObject", fail)
    assert caught.value is bug
    assert bug.__cause__ is cause  # not the error itself
    assert "fail" in [frame.name for frame in traceback.extract_tb(bug.__traceback__)]


async def test_a_failed_part_upload_is_reported_with_the_servers_answer_as_its_cause(
    bucket: str, proxy: FaultProxy
) -> None:
    part_two = lambda method, target: method == "PUT" and "partNumber=2&" in target + "&"  # noqa: E731
    proxy.add(part_two, "403")
    options: dict[str, Any] = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB, "endpoint_url": proxy.endpoint}
    with pytest.raises(
        AccessDeniedError, match=f"s3://{bucket}/big: access denied while trying to upload part 2"
    ) as caught:
        await Checkpoint(f"s3://{bucket}/big", **options).save(os.urandom(12 * MiB))
    cause = caught.value.__cause__
    assert isinstance(cause, ClientError)  # a task group's error keeps its cause
    assert cause.response["Error"]["Code"] == "AccessDenied"
