"""The behavioural specification of Checkpoint, run over every store."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from checkpointio import (
    AccessDeniedError,
    Checkpoint,
    CheckpointError,
    CorruptCheckpointError,
    DestinationError,
    Progress,
    SourceNotFoundError,
    StoreError,
    TransferConfig,
    UnsafeArchiveError,
    UnsupportedSourceError,
)
from checkpointio._placement import record_of

from .conftest import ONE_STORE, StoreCase, make_tree, snapshot
from .placing import fail_placing_onto
from .scripts import run_script
from .syscalls import COUNTED, writes_so_far


async def test_load_returns_none_on_first_attempt(store: StoreCase) -> None:
    async with Checkpoint(store.uri("attempt-0")) as cp:
        assert await cp.load() is None
        assert await cp.prev_exists() is False


async def test_load_returns_none_when_previous_attempt_saved_nothing(store: StoreCase) -> None:
    async with Checkpoint(store.uri("attempt-1"), src=store.uri("attempt-0")) as cp:
        assert await cp.load() is None
        assert await cp.prev_exists() is False


async def test_bytes_restore_as_payload_file(store: StoreCase) -> None:
    async with Checkpoint(store.uri("attempt-0")) as first:
        await first.save(b"step=41")
    async with Checkpoint(store.uri("attempt-1"), src=store.uri("attempt-0")) as second:
        assert await second.prev_exists() is True
        restored = await second.load()
        assert restored == second.path / "payload"
        assert restored.read_bytes() == b"step=41"


async def test_empty_bytes_round_trip(store: StoreCase) -> None:
    await Checkpoint(store.uri("a")).save(b"")
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == b""


async def test_load_bytes_returns_the_saved_bytes_without_touching_disk(store: StoreCase, tmp_path: Path) -> None:
    small, large = b"step=41", os.urandom(11 * 1024 * 1024 + 7)  # large: three 5 MiB ranges on S3
    await Checkpoint(store.uri("empty")).save(b"")
    await Checkpoint(store.uri("small")).save(small)
    await Checkpoint(store.uri("large")).save(large, part_size=5 * 1024 * 1024)
    for name, expected in (("empty", b""), ("small", small), ("large", large)):
        workspace = tmp_path / f"ws-{name}"
        cp = Checkpoint(store.uri("next"), src=store.uri(name), workspace=workspace, part_size=5 * 1024 * 1024)
        async with cp:
            data = await cp.load_bytes()
        assert isinstance(data, bytearray) and data == expected
        assert not workspace.exists()


async def test_load_bytes_reads_a_saved_file_and_a_foreign_object(store: StoreCase, tmp_path: Path) -> None:
    source = tmp_path / "state.bin"
    source.write_bytes(os.urandom(6 * 1024 * 1024))
    await Checkpoint(store.uri("file")).save(source)
    store.put_raw("foreign", b"written by another tool")
    async with Checkpoint(store.uri("next"), src=store.uri("file"), part_size=5 * 1024 * 1024) as cp:
        assert await cp.load_bytes() == source.read_bytes()
    async with Checkpoint(store.uri("next"), src=store.uri("foreign")) as cp:
        assert await cp.load_bytes() == b"written by another tool"


async def test_load_bytes_is_none_on_first_attempt_and_refuses_a_directory(store: StoreCase, tmp_path: Path) -> None:
    async with Checkpoint(store.uri("a")) as cp:
        assert await cp.load_bytes() is None
    await Checkpoint(store.uri("dir")).save(make_tree(tmp_path / "tree"))
    async with Checkpoint(store.uri("next"), src=store.uri("dir")) as cp:
        with pytest.raises(CheckpointError, match=r"directory: restore it with load\(\)"):
            await cp.load_bytes()
        assert (await cp.load()) == cp.path  # load() still restores it


@pytest.mark.parametrize("size", [100_000, 11 * 1024 * 1024], ids=["one-range", "several-ranges"])
async def test_load_bytes_of_a_corrupt_checkpoint_raises_then_falls_back_to_an_older_one(
    store: StoreCase, size: int
) -> None:
    older, newer = os.urandom(size), os.urandom(size)
    await Checkpoint(store.uri("older")).save(older, part_size=5 * 1024 * 1024)
    await Checkpoint(store.uri("newer")).save(newer, part_size=5 * 1024 * 1024)
    store.corrupt("newer")
    async with Checkpoint(store.uri("next"), src=store.uri("newer"), part_size=5 * 1024 * 1024) as cp:
        with pytest.raises(CorruptCheckpointError, match="newer"):
            await cp.load_bytes()
    sources = [store.uri("newer"), store.uri("older")]
    async with Checkpoint(store.uri("next"), src=sources, part_size=5 * 1024 * 1024) as cp:
        assert await cp.load_bytes() == older


async def test_file_restores_as_payload_with_same_bytes(store: StoreCase, tmp_path: Path) -> None:
    source = tmp_path / "state.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    await Checkpoint(store.uri("a")).save(source)
    await Checkpoint(store.uri("b")).save(str(source))  # a str path works too
    for name in ("a", "b"):
        async with Checkpoint(store.uri("next"), src=store.uri(name)) as cp:
            restored = await cp.load()
            assert restored == cp.path / "payload"
            assert restored.read_bytes() == source.read_bytes()


async def test_what_a_killed_restore_left_in_the_workspace_is_not_saved_with_it(
    store: StoreCase, tmp_path: Path
) -> None:
    workspace = make_tree(tmp_path / "ws")
    # The user's own entries that merely start like a staging name are saved, at any depth.
    (workspace / "model" / ".checkpointio-partial-x").write_bytes(b"a user's file, deeper: kept")
    (workspace / ".checkpointio-partial-notes.txt").write_bytes(b"a user's file at the top: kept")
    (workspace / f".checkpointio-partial-{'1' * 31}").mkdir()  # not a staging name: kept
    expected = snapshot(workspace)
    for name in (f".checkpointio-partial-{'0' * 32}", f".checkpointio-partial-replaced-{'f' * 32}"):
        left = workspace / name  # as a SIGKILLed restore (or its all-or-none replace) leaves it
        (left / "model").mkdir(parents=True)
        (left / "model" / "weights.bin").write_bytes(b"half of a restore")
    # A file copied across filesystems is staged under such a name too, at the top or deeper.
    (workspace / f".checkpointio-partial-{'2' * 32}").write_bytes(b"half of a copied file")
    (workspace / "model" / f".checkpointio-partial-{'3' * 32}").write_bytes(b"half of a copied file")
    await Checkpoint(store.uri("a")).save(workspace)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == expected


async def test_a_forced_restore_replaces_whatever_the_workspace_holds_under_the_same_names(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    await Checkpoint(store.uri("a")).save(tree)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "model").write_text("a file where the checkpoint has a folder")
    (workspace / "run.sh").mkdir()  # a folder where it has a file
    (workspace / "latest").symlink_to("nowhere")
    (workspace / "notes.txt").write_text("not in the checkpoint: left alone")
    async with Checkpoint(store.uri("b"), src=store.uri("a"), workspace=workspace) as cp:
        assert await cp.load(force=True) == workspace
    (workspace / "notes.txt").unlink()
    assert snapshot(workspace) == snapshot(tree)


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (OSError(28, "No space left on device"), StoreError),
        (PermissionError(13, "Permission denied"), AccessDeniedError),
        (IsADirectoryError(21, "Is a directory"), DestinationError),
    ],
    ids=["ENOSPC", "EACCES", "EISDIR"],
)
async def test_a_restore_that_cannot_be_put_in_place_leaves_the_workspace_as_it_was(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, raised: type[CheckpointError]
) -> None:
    await Checkpoint(store.uri("a")).save(make_tree(tmp_path / "tree"))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "model").write_text("the old model")
    (workspace / "run.sh").write_text("the old script")
    before = snapshot(workspace)
    # A name going into place after others did (names go in sorted order).
    refused = fail_placing_onto(monkeypatch, workspace / "run.sh", error)
    async with Checkpoint(store.uri("b"), src=store.uri("a"), workspace=workspace) as cp:
        with pytest.raises(raised) as caught:
            await cp.load(force=True)
    assert str(caught.value) == (
        f"{store.uri('a')}: could not put the restored checkpoint in place in {workspace}: {error}"
    )
    assert caught.value.__cause__ is error
    monkeypatch.undo()
    assert refused  # it failed where it was meant to
    assert snapshot(workspace) == before  # the old names back, nothing new, no staging left


@pytest.mark.parametrize("where", ["a file", "under a file"])
async def test_a_workspace_that_cannot_be_a_folder_is_a_destination_error(
    store: StoreCase, tmp_path: Path, where: str
) -> None:
    await Checkpoint(store.uri("a")).save(make_tree(tmp_path / "tree"))
    (tmp_path / "file").write_text("mine")
    workspace = tmp_path / "file" if where == "a file" else tmp_path / "file" / "ws"
    fact = "it exists and is not a folder" if where == "a file" else "a part of its path is a file, not a folder"
    async with Checkpoint(store.uri("b"), src=store.uri("a"), workspace=workspace) as cp:
        with pytest.raises(DestinationError) as caught:
            await cp.load()
    assert str(caught.value).startswith(f"cannot restore {store.uri('a')} into the workspace {workspace}: {fact}")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
@pytest.mark.parametrize("workspace", ["ws", "locked/ws"])
def test_a_workspace_that_cannot_be_written_is_an_access_denied_error(tmp_path: Path, workspace: str) -> None:
    # The workspace itself (the restore's staging folder goes in it) or its parent (it is made there).
    Checkpoint(tmp_path / "a").save_sync(make_tree(tmp_path / "tree"))
    locked = tmp_path / workspace.split("/")[0]
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_script(
            f"""
            from checkpointio import AccessDeniedError, Checkpoint
            root = {str(tmp_path)!r}
            cp = Checkpoint(root + "/b", src=root + "/a", workspace=root + "/" + {workspace!r})
            try:
                cp.load_sync()
            except AccessDeniedError as error:
                print(type(error).__name__, error)
            """,
            tmp_path,
            unprivileged=True,
        )
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stderr
    uri = str(tmp_path / "a")
    expected = (
        f"{uri}: could not make a folder to restore into in {tmp_path / workspace}: Permission denied"
        if workspace == "ws"
        else f"cannot restore {uri} into the workspace {tmp_path / workspace}: Permission denied"
    )
    assert result.stdout == f"AccessDeniedError {expected}\n"
    assert list(locked.iterdir()) == []


async def test_directory_restores_as_tree_at_workspace_root(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    await Checkpoint(store.uri("a")).save(tree)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored == cp.path
        assert snapshot(restored) == snapshot(tree)
        assert (restored / "empty" / "deeper").is_dir()
        assert os.readlink(restored / "latest") == "model/weights.bin"
        assert os.stat(restored / "run.sh").st_mode & 0o777 == 0o755
        assert int(os.stat(restored / "model/layers/0.txt").st_mtime) == 1_600_000_000


async def test_empty_directory_round_trip(store: StoreCase, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    await Checkpoint(store.uri("a")).save(tmp_path / "empty")
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored == cp.path and list(restored.iterdir()) == []


async def test_second_load_returns_same_path_without_downloading(store: StoreCase) -> None:
    await Checkpoint(store.uri("a")).save(b"v1")
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        first = await cp.load()
        await Checkpoint(store.uri("a")).save(b"v2 is newer")
        second = await cp.load()
        assert second == first
        assert second is not None and second.read_bytes() == b"v1"


async def test_save_replaces_previous_checkpoint(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("a")).save(make_tree(tmp_path / "tree"))
    await Checkpoint(store.uri("a")).save(b"now bytes")
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored == cp.path / "payload" and restored.read_bytes() == b"now bytes"


async def test_users_own_tar_gz_file_restores_as_that_file(store: StoreCase, tmp_path: Path) -> None:
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(make_tree(tmp_path / "tree"), arcname=".")
    await Checkpoint(store.uri("a")).save(archive)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored == cp.path / "payload"
        assert restored.read_bytes() == archive.read_bytes()


async def test_foreign_tar_gz_without_record_is_recognised_as_directory(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:  # what flyte writes
        for child in sorted(tree.iterdir()):
            tar.add(child, arcname=child.name)
    store.put_raw("flyte", buffer.getvalue())
    async with Checkpoint(store.uri("b"), src=store.uri("flyte")) as cp:
        restored = await cp.load()
        assert restored == cp.path
        assert snapshot(restored) == snapshot(tree)


async def test_foreign_raw_object_restores_as_payload(store: StoreCase) -> None:
    store.put_raw("raw", b"\x1f\x8bnot really gzip")
    async with Checkpoint(store.uri("b"), src=store.uri("raw")) as cp:
        restored = await cp.load()
        assert restored == cp.path / "payload"
        assert restored.read_bytes() == b"\x1f\x8bnot really gzip"


def _put_foreign_in_parts(store: StoreCase, name: str, data: bytes) -> None:
    """Write ``data`` as flyte (through s3fs) does: no checkpointio record and, on S3, a multipart
    upload sent without flexible checksums, so the server keeps no CRC32 of the whole object."""
    if store.s3 is None:
        store.put_raw(name, data)
        return
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=store.s3.endpoint,
        region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required"),
    )
    key = store.uri(name).split("/", 3)[3]
    upload = client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    cut = 5 * 1024 * 1024
    parts = []
    for number, piece in enumerate((data[:cut], data[cut:]), start=1):
        sent = client.upload_part(Bucket=store.bucket, Key=key, UploadId=upload, PartNumber=number, Body=piece)
        parts.append({"PartNumber": number, "ETag": sent["ETag"]})
    client.complete_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})


async def test_a_foreign_object_checked_for_its_length_only_is_named_as_written_by_another_tool(
    store: StoreCase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import checkpointio._engine as engine

    monkeypatch.setattr(engine, "_warned_unchecked", set())  # private: the warning is once per process
    data = os.urandom(5 * 1024 * 1024 + 7)
    _put_foreign_in_parts(store, "flyte", data)
    for _ in range(2):
        async with Checkpoint(store.uri("next"), src=store.uri("flyte")) as cp:
            assert await cp.load_bytes() == data
    warnings = [record.getMessage() for record in caplog.records if "only its length" in record.getMessage()]
    assert warnings == [
        f"{store.uri('flyte')} has no CRC32 to check (an object written by another tool, without "
        "checkpointio's record, to a store that keeps no checksum of its whole content): only its length was checked"
    ]


@ONE_STORE
async def test_missing_source_path_raises_file_not_found_naming_it(store: StoreCase, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match="no-such-dir") as caught:
        await Checkpoint(store.uri("a")).save(missing)
    assert isinstance(caught.value, SourceNotFoundError)
    assert await Checkpoint(store.uri("b")).prev_exists() is False


@ONE_STORE
@pytest.mark.parametrize("bad", [123, None, ["a"], 1.5])
async def test_save_of_unsupported_type_is_a_type_error(store: StoreCase, bad: object) -> None:
    with pytest.raises(TypeError, match=r"bytes, a str path or a pathlib\.Path"):
        await Checkpoint(store.uri("a")).save(bad)  # type: ignore[arg-type]  # the wrong type on purpose


@ONE_STORE
async def test_symlink_pointing_outside_the_tree_is_refused_at_save(store: StoreCase, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok").write_text("x")
    (tree / "escape").symlink_to("../outside")
    with pytest.raises(UnsupportedSourceError, match="escape"):
        await Checkpoint(store.uri("a")).save(tree)
    assert await Checkpoint(store.uri("b"), src=store.uri("a")).prev_exists() is False


@ONE_STORE
@pytest.mark.parametrize(
    ("links", "refused"),
    [
        ({"latest": "checkpoint-10", "model.pt": "latest/model.pt"}, "model.pt"),  # either order of listing
        ({"z-latest": "checkpoint-10", "a-model.pt": "z-latest/model.pt"}, "a-model.pt"),
        ({"checkpoint-10/up": "..", "checkpoint-10/x": "up/.."}, "checkpoint-10/x"),  # climbs out if followed
    ],
)
async def test_a_symlink_through_another_symlink_is_refused_at_save_not_at_restore(
    store: StoreCase, tmp_path: Path, links: dict[str, str], refused: str
) -> None:
    tree = tmp_path / "tree"
    (tree / "checkpoint-10").mkdir(parents=True)
    (tree / "checkpoint-10" / "model.pt").write_bytes(b"weights")
    for name, target in links.items():
        (tree / name).symlink_to(target)
    with pytest.raises(UnsupportedSourceError, match=f"{refused!r} -> .* goes through the symlink"):
        await Checkpoint(store.uri("a")).save(tree)
    assert await Checkpoint(store.uri("b"), src=store.uri("a")).prev_exists() is False


@ONE_STORE
async def test_symlinks_to_symlinks_and_through_real_folders_round_trip(store: StoreCase, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "checkpoint-10").mkdir(parents=True)
    (tree / "checkpoint-10" / "model.pt").write_bytes(b"weights")
    (tree / "latest").symlink_to("checkpoint-10")
    (tree / "model.pt").symlink_to("checkpoint-10/model.pt")  # the real path: fine
    (tree / "newest").symlink_to("latest")  # a symlink to a symlink: fine
    (tree / "checkpoint-10" / "self").symlink_to("../checkpoint-10/model.pt")
    await Checkpoint(store.uri("a")).save(tree)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored is not None and snapshot(restored) == snapshot(tree)
        assert (restored / "newest" / "model.pt").read_bytes() == b"weights"


async def test_corrupt_checkpoint_raises_instead_of_loading(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("dir")).save(make_tree(tmp_path / "tree"))
    await Checkpoint(store.uri("bytes")).save(os.urandom(100_000))
    for name in ("dir", "bytes"):
        store.corrupt(name)
        async with Checkpoint(store.uri("next"), src=store.uri(name)) as cp:
            with pytest.raises(CorruptCheckpointError, match=name):
                await cp.load()
            assert list(cp.path.iterdir()) == []  # nothing half-restored is left behind


async def test_truncated_archive_raises_instead_of_loading(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("dir")).save(make_tree(tmp_path / "tree"))
    data = store.get_raw("dir")
    store.put_raw("dir", data[: len(data) // 2])  # as another tool would leave it: no valid record
    async with Checkpoint(store.uri("next"), src=store.uri("dir")) as cp:
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            await cp.load()
        assert list(cp.path.iterdir()) == []


def _archive_with(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"evil", link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if data is not None and kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


UNSAFE_ARCHIVES = {
    "dot-dot": [_member("ok.txt"), _member("../escaped.txt")],
    "absolute": [_member("/tmp/checkpointio-escaped.txt")],
    "symlink-out": [_member("link", tarfile.SYMTYPE, link="../../etc")],
    "absolute-symlink": [_member("link", tarfile.SYMTYPE, link="/etc/passwd")],
    "hardlink-out": [_member("hard", tarfile.LNKTYPE, link="../../etc/passwd")],
    "device": [_member("dev", tarfile.CHRTYPE)],
    "write-through-link": [_member("link", tarfile.SYMTYPE, link=".."), _member("link/escaped.txt")],
    # d/up -> .. is inside (it is the folder itself), but d/x -> up/.. climbs out through it
    "symlink-through-symlink": [
        _member("d/up", tarfile.SYMTYPE, link=".."),
        _member("d/x", tarfile.SYMTYPE, link="up/.."),
    ],
    # the same, in the other order: b's target only leaves once d/up exists
    "symlink-made-a-way-later": [
        _member("b", tarfile.SYMTYPE, link="d/up/.."),
        _member("d/up", tarfile.SYMTYPE, link=".."),
    ],
    # "a" was a file, then became a symlink: a hard link to "a" must not follow it
    "hardlink-to-a-replaced-file": [
        _member("t"),
        _member("a"),
        _member("a", tarfile.SYMTYPE, link="t"),
        _member("h", tarfile.LNKTYPE, link="a"),
    ],
}


@ONE_STORE
@pytest.mark.parametrize("case", sorted(UNSAFE_ARCHIVES))
async def test_archive_escaping_its_folder_is_refused(store: StoreCase, tmp_path: Path, case: str) -> None:
    store.put_raw("evil", _archive_with(*UNSAFE_ARCHIVES[case]))
    workspace = tmp_path / "ws" / "inner"
    async with Checkpoint(store.uri("next"), src=store.uri("evil"), workspace=workspace) as cp:
        with pytest.raises(UnsafeArchiveError):
            await cp.load()
    assert list(workspace.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "ws").iterdir()) == ["inner"]
    assert not Path("/tmp/checkpointio-escaped.txt").exists()


async def test_cancelled_save_leaves_previous_checkpoint_intact(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("a")).save(b"previous")
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        (big / f"shard-{i}").write_bytes(os.urandom(8 * 1024 * 1024))
    part = 5 * 1024 * 1024
    handed, release = threading.Event(), threading.Event()

    def hold_after_the_first_part(progress: Progress) -> None:
        # From the thread packing the folder: once two parts were handed to the store (the first
        # one whole past any buffering), the packing waits, so the save stays in flight
        # (uploading, never finishing) until cancelled.
        if progress.done > 2 * part and not handed.is_set():
            handed.set()
            release.wait(120)

    cp = Checkpoint(
        store.uri("a"),
        chunk_size=256 * 1024,
        part_size=part,
        multipart_threshold=part,
        on_progress=hold_after_the_first_part,
    )
    ended = False

    async def save() -> None:
        nonlocal ended
        try:
            await cp.save(big)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException:
            ended = True
            handed.set()  # a save that ended without being held: nothing left to wait for
            raise
        ended = True
        handed.set()

    partial = None
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(save)
            try:
                await anyio.to_thread.run_sync(handed.wait)
                # The write in progress shows (an S3 upload is created once its first part is
                # ready): waited for without a time limit, as the save cannot end while held.
                while (partial := await anyio.to_thread.run_sync(store.partial_writes)) == 0 and not ended:
                    await anyio.sleep(0.01)
                scope.cancel()
            finally:
                release.set()
    assert scope.cancelled_caught and not ended
    assert partial is None or partial > 0  # the save was cancelled in flight
    assert not store.partial_writes()
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as reader:
        restored = await reader.load()
        assert restored is not None and restored.read_bytes() == b"previous"


@ONE_STORE
async def test_leaving_the_context_removes_the_workspace(store: StoreCase) -> None:
    await Checkpoint(store.uri("a")).save(b"x")
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        await cp.load()
        workspace = cp.path
        assert workspace.is_dir()
    assert not workspace.exists()


@ONE_STORE
async def test_given_workspace_is_used_and_kept(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("a")).save(b"x")
    with Checkpoint(store.uri("b"), src=store.uri("a"), workspace=tmp_path / "ws") as cp:
        assert await cp.load() == tmp_path / "ws" / "payload"
    assert (tmp_path / "ws" / "payload").read_bytes() == b"x"


def test_sync_twins_round_trip(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    Checkpoint(store.uri("a")).save_sync(tree)
    with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        assert cp.prev_exists_sync()
        restored = cp.load_sync()
        assert restored == cp.path and snapshot(restored) == snapshot(tree)
    Checkpoint(store.uri("c")).save_sync(b"state")
    with Checkpoint(store.uri("d"), src=store.uri("c")) as cp:
        assert cp.load_bytes_sync() == b"state"


async def test_settings_can_be_overridden_for_one_save(store: StoreCase, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "text").write_text("compressible " * 100_000)
    cp = Checkpoint(store.uri("a"))
    await cp.save(tree, compression_level=0)
    stored = len(store.get_raw("a"))
    await cp.save(tree)
    assert len(store.get_raw("a")) < stored / 10  # level 1 by default, level 0 (stored) for that one call
    with pytest.raises(TypeError, match="unknown checkpoint option"):
        await cp.save(tree, compresion_level=0)  # type: ignore[call-arg]  # a misspelt option on purpose


async def test_several_sources_skip_missing_and_fall_back_past_corrupt(store: StoreCase) -> None:
    await Checkpoint(store.uri("attempt-0")).save(b"oldest" * 1000)
    await Checkpoint(store.uri("attempt-1")).save(b"middle" * 1000)
    store.corrupt("attempt-1")
    sources = [
        store.uri("attempt-3"),
        store.uri("attempt-2-saved-nothing"),
        store.uri("attempt-1"),
        store.uri("attempt-0"),
    ]
    async with Checkpoint(store.uri("attempt-4"), src=sources[1:]) as cp:
        assert cp.src == store.uri("attempt-2-saved-nothing") and len(cp.sources) == 3
        assert await cp.prev_exists()
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == b"oldest" * 1000


async def test_when_every_source_is_corrupt_load_raises_instead_of_returning_none(store: StoreCase) -> None:
    await Checkpoint(store.uri("a")).save(b"a" * 1000)
    store.corrupt("a")
    async with Checkpoint(store.uri("b"), src=[store.uri("missing"), store.uri("a")]) as cp:
        with pytest.raises(CorruptCheckpointError):
            await cp.load()


@pytest.mark.skipif(not COUNTED, reason="counts system calls through Linux's /proc/self/io")
@pytest.mark.parametrize("incremental", [False, True], ids=["tar.gz", "incremental"])
async def test_file_data_is_written_at_most_256_kib_per_system_call(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, incremental: bool
) -> None:
    """Saves (into the local store) and restores (of a directory, and of a single file fetched as
    ranges) write file data in system calls of at most 256 KiB: larger ones fill large page-cache
    folios, many times slower on virtual machines that return free memory to their host.

    Checked twice: every call made through ``os`` is recorded with its size, and the kernel's own
    count of write calls covers those made below Python (a buffered file object's).
    """
    tree = tmp_path / "tree"
    (tree / "model").mkdir(parents=True)
    (tree / "model" / "weights.bin").write_bytes(os.urandom(9 * 1024 * 1024 + 5))
    (tree / "config.json").write_bytes(b"{}")
    single = tmp_path / "state.bin"
    single.write_bytes(os.urandom(12 * 1024 * 1024 + 7))
    sizes: list[int] = []

    def recorded(call: Callable[..., int], size: Callable[[Any], int]) -> Callable[..., int]:
        def record(fd: int, data: Any, *rest: Any) -> int:
            sizes.append(size(data))
            return call(fd, data, *rest)

        return record

    for name in ("write", "pwrite"):
        monkeypatch.setattr(os, name, recorded(getattr(os, name), len))
    for name in ("writev", "pwritev"):
        monkeypatch.setattr(os, name, recorded(getattr(os, name), lambda views: sum(map(len, views))))
    config = TransferConfig(part_size=5 * 1024 * 1024)
    steps: list[tuple[int, int]] = []

    async def counted(step: Callable[[], Awaitable[object]]) -> None:
        calls, written = writes_so_far()
        await step()
        after = writes_so_far()
        steps.append((after[0] - calls, after[1] - written))

    async def load_tree() -> None:
        async with Checkpoint(store.uri("next"), src=store.uri("tree"), config=config) as cp:
            restored = await cp.load()
            assert restored is not None and snapshot(restored) == snapshot(tree)

    async def load_file() -> None:
        async with Checkpoint(store.uri("next"), src=store.uri("file"), config=config) as cp:
            restored = await cp.load()
            assert restored is not None and restored.read_bytes() == single.read_bytes()

    await counted(lambda: Checkpoint(store.uri("tree"), incremental=incremental, config=config).save(tree))
    await counted(lambda: Checkpoint(store.uri("file"), config=config).save(single))
    await counted(load_tree)
    await counted(load_file)
    assert sizes, "no write was seen: the recorder is not in the way"
    assert max(sizes) <= 256 * 1024
    for calls, written in steps:
        assert calls >= written // (256 * 1024), steps


async def test_a_load_into_a_folder_holding_your_files_replaces_none_of_them_without_force(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    (tree / "model").mkdir(parents=True)
    (tree / "model" / "weights.pt").write_bytes(b"saved weights")
    (tree / "config.json").write_bytes(b"saved config")
    await Checkpoint(store.uri("dir")).save(tree)
    await Checkpoint(store.uri("bytes")).save(b"saved bytes")
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    (work / "model" / "weights.pt").write_bytes(b"your weights")
    (work / "payload").write_bytes(b"your payload")
    (work / "notes.txt").write_bytes(b"yours")
    before = snapshot(work)
    monkeypatch.chdir(work)
    for src, only, replaced in [
        ("dir", None, "model"),
        ("dir", ["model/weights.pt"], "model/weights.pt"),
        ("bytes", None, "payload"),
    ]:
        async with Checkpoint(store.uri("next"), src=store.uri(src), workspace=".") as cp:
            message = f"restoring into {work} would replace what this checkpoint did not restore there: {replaced};"
            with pytest.raises(DestinationError, match=re.escape(message) + " nothing was changed: pass force=True"):
                await cp.load(only)
        assert snapshot(work) == before, (src, only)
    async with Checkpoint(store.uri("next"), src=store.uri("dir"), workspace=".") as cp:
        assert await cp.load(force=True) == work.absolute()
        assert (work / "model" / "weights.pt").read_bytes() == b"saved weights"
        assert (work / "config.json").read_bytes() == b"saved config"
        assert (work / "notes.txt").read_bytes() == b"yours"  # not in the checkpoint: left alone
        (work / "config.json").write_bytes(b"changed since")
        assert await cp.load(["config.json"]) == work.absolute()  # its own restore: replaced again
        assert (work / "config.json").read_bytes() == b"saved config"
    with Checkpoint(store.uri("next"), src=store.uri("bytes"), workspace=work) as cp:
        with pytest.raises(DestinationError, match=r"would replace .*: payload;"):
            cp.load_sync()
        assert cp.load_sync(force=True) == work / "payload"
        assert (work / "payload").read_bytes() == b"saved bytes"


async def test_a_load_in_a_new_process_restores_over_what_an_earlier_one_restored_in_your_workspace(
    store: StoreCase, tmp_path: Path
) -> None:
    """A retried task in a fresh process loads into the same workspace of yours again: what earlier
    loads restored there is listed in the workspace's record, so it is replaced without force=True;
    your own files are still refused, and the record is never saved with the workspace."""
    first, second = tmp_path / "first", tmp_path / "second"
    for tree, weights in ((first, b"step 1"), (second, b"step 2")):
        (tree / "model").mkdir(parents=True)
        (tree / "model" / "weights.pt").write_bytes(weights)
        (tree / "config.json").write_bytes(b"config of " + weights)
    await Checkpoint(store.uri("one")).save(first)
    await Checkpoint(store.uri("two")).save(second)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_bytes(b"yours")
    async with Checkpoint(store.uri("next"), src=store.uri("one"), workspace=work) as cp:
        await cp.load()
    (work / "model" / "weights.pt").write_bytes(b"trained further, then the process died")
    # A new Checkpoint, as a new process makes: it has no memory of the first one's restore.
    async with Checkpoint(store.uri("next"), src=store.uri("two"), workspace=work) as cp:
        assert await cp.load() == work
    assert snapshot(work) == {**snapshot(second), "notes.txt": snapshot(work)["notes.txt"]}
    assert (work / "notes.txt").read_bytes() == b"yours"
    record = record_of(work)
    assert record == tmp_path / ".work.checkpointio-restored"  # beside the workspace: not in what it holds
    assert json.loads(record.read_bytes()) == ["config.json", "model"]
    await Checkpoint(store.uri("saved")).save(work)
    async with Checkpoint(store.uri("x"), src=store.uri("saved")) as cp:
        entries = await cp.contents()
    assert entries is not None and sorted(entry.path for entry in entries) == [
        "config.json",
        "model",
        "model/weights.pt",
        "notes.txt",
    ]
    (work / "notes.txt").rename(work / "extra.txt")
    await Checkpoint(store.uri("three")).save(b"bytes")
    (work / "payload").write_bytes(b"your payload, never restored here")
    async with Checkpoint(store.uri("next"), src=store.uri("three"), workspace=work) as cp:
        with pytest.raises(
            DestinationError, match="would replace what this checkpoint did not restore there: payload;"
        ):
            await cp.load()
    assert (work / "payload").read_bytes() == b"your payload, never restored here"


async def test_a_retry_restores_over_what_the_failed_attempt_saved_from_your_workspace(
    store: StoreCase, tmp_path: Path
) -> None:
    """The first attempt found nothing to load, trained in a workspace of yours and saved it; its
    retry, a new process, restores the saved files over what the attempt left there: a save of the
    workspace itself records what it took. Entries it did not save are still refused."""
    work = tmp_path / "work"
    work.mkdir()
    async with Checkpoint(store.uri("attempt-0"), workspace=work) as cp:
        assert await cp.load() is None
        (work / "model.pt").write_bytes(b"epoch 1")
        (work / "logs").mkdir()
        (work / "logs" / "train.log").write_bytes(b"epoch 1 done")
        await cp.save(work)
        (work / "model.pt").write_bytes(b"epoch 2, half-written when the process died")
    async with Checkpoint(store.uri("attempt-1"), src=store.uri("attempt-0"), workspace=work) as cp:
        assert await cp.load() == work
    assert (work / "model.pt").read_bytes() == b"epoch 1"
    assert (work / "logs" / "train.log").read_bytes() == b"epoch 1 done"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "model.pt").write_bytes(b"another run's")
    (tree / "notes.txt").write_bytes(b"another run's notes")
    await Checkpoint(store.uri("other")).save(tree)
    (work / "notes.txt").write_bytes(b"yours, never saved from here")
    async with Checkpoint(store.uri("attempt-2"), src=store.uri("other"), workspace=work) as cp:
        with pytest.raises(DestinationError, match=r"did not restore there: notes\.txt;"):
            await cp.load()
    assert (work / "notes.txt").read_bytes() == b"yours, never saved from here"
    assert (work / "model.pt").read_bytes() == b"epoch 1"
