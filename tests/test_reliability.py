"""The promise, tried systematically: a checkpoint that save() reported stored comes back bit for
bit, a save that did not complete is never seen, and no bad input or fault corrupts, loses or leaks
anything. Each test is a row of the table in docs/guarantees.md."""

from __future__ import annotations

import asyncio
import errno
import gzip
import io
import os
import random
import resource
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpointio._archive as archive
import checkpointio._tar as untar
from checkpointio import (
    Checkpoint,
    CheckpointError,
    CorruptCheckpointError,
    MiB,
    Progress,
    SourceChangedError,
    SourceUnreadableError,
    StoreError,
    StoreUnavailableError,
    TransferOptions,
    UnsafeArchiveError,
    UnsupportedSourceError,
)

from .conftest import ONE_STORE, MotoServer, StoreCase, make_tree, pull_of, snapshot
from .faultproxy import FaultProxy
from .scripts import RandomKills

SMALL_PARTS: TransferOptions = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB}


def uploads_left(moto_server: MotoServer, bucket: str) -> list[object]:
    return list(moto_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def run_python(code: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180, **kwargs
    )


# -- network faults (S3 through the fault proxy) ---------------------------------------------------


async def test_stalled_part_upload_times_out_and_is_retried(moto_server: MotoServer, proxy: FaultProxy) -> None:
    bucket = moto_server.new_bucket()
    proxy.stall_seconds = 8
    proxy.add(lambda m, t: m == "PUT" and "partNumber=2" in t, "stall")
    data = os.urandom(12 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "read_timeout": 1.5}
    with anyio.fail_after(60):  # bounded: a stalled connection is a timeout, not a hang
        await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    assert [e["action"] for e in proxy.log if "partNumber=2" in str(e["target"])][:2] == ["stall", "relay"]
    async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data
    assert uploads_left(moto_server, bucket) == []


async def test_stalled_range_download_times_out_and_is_fetched_again(
    moto_server: MotoServer, proxy: FaultProxy
) -> None:
    bucket = moto_server.new_bucket()
    data = os.urandom(11 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "read_timeout": 1.5}
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    proxy.stall_seconds = 8
    proxy.add(lambda m, t: m == "GET", "stall")
    with anyio.fail_after(60):
        async with Checkpoint(f"s3://{bucket}/b", src=f"s3://{bucket}/a", **options) as cp:
            restored = await cp.load()
            assert restored is not None and restored.read_bytes() == data


async def test_a_throttling_burst_is_absorbed_by_retries(moto_server: MotoServer, proxy: FaultProxy) -> None:
    bucket = moto_server.new_bucket()
    proxy.add(lambda m, t: m == "PUT" and "partNumber=" in t, "503", times=6)
    data = os.urandom(16 * MiB)
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_attempts": 8}
    await Checkpoint(f"s3://{bucket}/a", **options).save(data)
    assert [e["action"] for e in proxy.log].count("503") == 6
    assert moto_server.client().get_object(Bucket=bucket, Key="a")["Body"].read() == data


async def test_a_failing_complete_aborts_the_upload_and_keeps_the_previous(
    moto_server: MotoServer, proxy: FaultProxy
) -> None:
    bucket = moto_server.new_bucket()
    options: TransferOptions = {**SMALL_PARTS, "endpoint_url": proxy.endpoint, "max_attempts": 2}
    await Checkpoint(f"s3://{bucket}/a", **options).save(b"previous")
    proxy.add(lambda m, t: m == "POST" and "uploadId=" in t, "500", times=100)  # CompleteMultipartUpload
    with pytest.raises(StoreUnavailableError, match="complete the upload"):
        await Checkpoint(f"s3://{bucket}/a", **options).save(os.urandom(11 * MiB))
    assert uploads_left(moto_server, bucket) == []
    assert moto_server.client().get_object(Bucket=bucket, Key="a")["Body"].read() == b"previous"


async def test_asyncio_task_cancel_mid_upload_aborts_and_the_loop_stays_usable(moto_server: MotoServer) -> None:
    bucket = moto_server.new_bucket()
    await Checkpoint(f"s3://{bucket}/a").save(b"previous")
    task = asyncio.create_task(Checkpoint(f"s3://{bucket}/a", **SMALL_PARTS).save(os.urandom(40 * MiB)))
    with anyio.fail_after(60):
        while not uploads_left(moto_server, bucket):
            await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert uploads_left(moto_server, bucket) == []
    await Checkpoint(f"s3://{bucket}/b").save(b"the loop still works")
    assert moto_server.client().get_object(Bucket=bucket, Key="a")["Body"].read() == b"previous"


# -- process death --------------------------------------------------------------------------------

KILLED_SAVER = """
import sys
from checkpointio import Checkpoint
Checkpoint(sys.argv[1], compression_level=9, chunk_size=256 * 1024).save_sync(sys.argv[2])
"""


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_at_random_points_of_a_save_leaves_old_or_new_never_a_mix(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "s3":
        server: MotoServer = request.getfixturevalue("moto_server")
        bucket = server.new_bucket()
        uri = f"s3://{bucket}/ckpt"
    else:
        uri = str(tmp_path / "store" / "ckpt")
    versions = []
    for name in ("old", "new"):
        tree = make_tree(tmp_path / name)
        (tree / "version").write_text(name)
        (tree / "bulk.txt").write_bytes(b"".join(f"{name} line {i}\n".encode() for i in range(800_000)))
        versions.append(tree)
    expected = {name: snapshot(tree) for name, tree in zip(("old", "new"), versions, strict=True)}
    started = time.monotonic()  # one whole save in a child process: the kills land inside it
    subprocess.run([sys.executable, "-c", KILLED_SAVER, uri, str(versions[0])], check=True)
    duration = time.monotonic() - started
    kills = RandomKills(4711, duration, 0.3, 0.97)
    outcomes: list[str] = []
    while len(outcomes) < 5 or ("old" not in outcomes and len(outcomes) < 12):
        kills.run([sys.executable, "-c", KILLED_SAVER, uri, str(versions[1])])
        with Checkpoint(str(tmp_path / "unused"), src=uri) as cp:
            restored = cp.load_sync()
            assert restored is not None
            got = snapshot(restored)
        assert got in expected.values()  # old or new, whole; never a mix or a truncated tree
        outcomes.append("new" if got == expected["new"] else "old")
        Checkpoint(uri).save_sync(versions[0])  # back to old for the next round
    assert "old" in outcomes
    if backend == "s3":  # a killed process cannot abort its upload: `gc` removes those
        client = server.client()
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


# -- restore target faults ------------------------------------------------------------------------


def test_disk_full_during_restore_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(4 * MiB))
    Checkpoint(tmp_path / "ckpt").save_sync(tree)
    Checkpoint(tmp_path / "bytes").save_sync(os.urandom(4 * MiB))
    # Simulated: RLIMIT_FSIZE caps file size at 1 MiB, as a full disk would refuse the writes.
    result = run_python(
        f"""
        import resource, signal, os
        from checkpointio import Checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))
        for name in ("ckpt", "bytes"):
            ws = {str(tmp_path)!r} + "/ws-" + name
            try:
                Checkpoint({str(tmp_path)!r} + "/x", src={str(tmp_path)!r} + "/" + name, workspace=ws).load_sync()
                print("no error")
            except OSError as error:
                print(name, "error", error.errno, "left", sorted(os.listdir(ws)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ckpt error 27 left []" in result.stdout  # EFBIG, nothing half-restored
    assert "bytes error 27 left []" in result.stdout
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # only the child


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_permission_denied_on_the_workspace_is_a_clear_error(tmp_path: Path) -> None:
    Checkpoint(tmp_path / "ckpt").save_sync(b"x")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    os.chown(workspace, 65534, 65534)  # someone else's read-only folder
    workspace.chmod(0o500)
    code = f"""
from checkpointio import Checkpoint
try:
    Checkpoint({str(tmp_path / "x")!r}, src={str(tmp_path / "ckpt")!r}, workspace={str(workspace)!r}).load_sync()
except PermissionError as error:
    print("denied:", error)
"""
    # Without the capability to override file permissions, even root is refused (as a user would be).
    result = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "denied:" in result.stdout, result.stdout + result.stderr
    assert list(workspace.iterdir()) == []


async def test_workspace_deleted_mid_restore_is_an_error_not_a_partial_tree(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path / "tree")
    for i in range(20):
        (tree / "model" / f"shard-{i}").write_bytes(os.urandom(256 * 1024))
    await Checkpoint(store.uri("a")).save(tree)
    workspace = tmp_path / "ws"
    # Private: the only way to act at a chosen point inside an extraction (the 10th entry).
    original = untar._Extraction.entry
    calls = [0]

    def delete_workspace_half_way(self: untar._Extraction, *args: Any) -> None:
        calls[0] += 1
        if calls[0] == 10:
            shutil.rmtree(workspace)
        original(self, *args)

    monkeypatch.setattr(untar._Extraction, "entry", delete_workspace_half_way)
    async with Checkpoint(store.uri("b"), src=store.uri("a"), workspace=workspace) as cp:
        with pytest.raises((CheckpointError, OSError)):
            await cp.load()
    assert not workspace.exists() or list(workspace.iterdir()) == []


# -- sources that change while they are saved -----------------------------------------------------
def _before_reading(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` between a save's listing of a file and its opening of it (the private points
    where that happens: one for small files in bulk, one for any other file)."""
    for point in ("_add_files", "_add_file"):
        original = getattr(archive, point)

        def before(*args: Any, original: Callable[..., None] = original) -> None:
            action()
            original(*args)

        monkeypatch.setattr(archive, point, before)


def _after_its_size_was_taken(monkeypatch: pytest.MonkeyPatch, path: Path, action: Callable[[], None]) -> None:
    """Run ``action`` once, right after the save opened ``path``'s file and took its size (its
    ``fstat``), before it reads it."""
    watched = path.stat()
    real_fstat = os.fstat
    done: list[bool] = []

    def fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if not done and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (watched.st_dev, watched.st_ino):
            done.append(True)
            action()
        return st

    monkeypatch.setattr(os, "fstat", fstat)


@pytest.mark.parametrize("size", [100_000, 2 * 1024 * 1024 + 1], ids=["read-at-once", "read-in-pieces"])
async def test_a_file_shrinking_while_saved_fails_the_save_and_keeps_the_previous(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "log").write_bytes(b"x" * size)
    await Checkpoint(store.uri("a")).save(b"previous")

    def shrink() -> None:
        os.truncate(tree / "log", 10)  # another process rotates the log right after we looked

    _after_its_size_was_taken(monkeypatch, tree / "log", shrink)
    with pytest.raises(SourceChangedError, match="log"):
        await Checkpoint(store.uri("a")).save(tree)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == b"previous"


@pytest.mark.parametrize("swap", ["symlink-out", "folder"])
async def test_a_file_swapped_after_it_was_listed_fails_the_save(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "weights").write_bytes(b"w" * 1000)
    (tmp_path / "secret").write_bytes(b"not part of the tree" * 100)  # as long as what was listed
    await Checkpoint(store.uri("a")).save(b"previous")

    def swap_after_stat() -> None:
        if swap == "symlink-out":  # its bytes would come from outside the tree
            (tree / "weights").unlink()
            (tree / "weights").symlink_to(tmp_path / "secret")
        else:
            (tree / "weights").unlink()
            (tree / "weights").mkdir()

    _before_reading(monkeypatch, swap_after_stat)
    with pytest.raises(SourceChangedError, match="weights"):
        await Checkpoint(store.uri("a")).save(tree)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        assert await cp.load_bytes() == b"previous"


@pytest.mark.parametrize("when", ["before it is opened", "once it is open"])
@pytest.mark.parametrize("size", [1000, 300 * 1024], ids=["small", "large"])
async def test_a_file_renamed_over_while_saved_is_stored_whole_as_the_file_opened(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str, size: int
) -> None:
    """What a program writing its files safely (a temporary name, then a rename) does while a
    save runs: the save stores one of the two files whole, never one cut to the other's size."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "weights").write_bytes(b"w" * size)

    def rename_over() -> None:
        (tmp_path / "new").write_bytes(b"n" * (2 * size))
        os.replace(tmp_path / "new", tree / "weights")

    if when == "before it is opened":
        _before_reading(monkeypatch, rename_over)
    else:
        _after_its_size_was_taken(monkeypatch, tree / "weights", rename_over)
    await Checkpoint(store.uri("a")).save(tree)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored is not None
        expected = b"n" * (2 * size) if when == "before it is opened" else b"w" * size
        assert (restored / "weights").read_bytes() == expected


async def test_a_file_growing_while_saved_is_stored_as_it_was_when_opened(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "log").write_bytes(b"first part\n")

    def grow() -> None:
        with open(tree / "log", "ab") as log:
            log.write(b"appended later\n")

    _after_its_size_was_taken(monkeypatch, tree / "log", grow)
    await Checkpoint(store.uri("a")).save(tree)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored is not None and (restored / "log").read_bytes() == b"first part\n"


async def test_a_local_save_that_fails_on_the_disk_is_a_store_error_and_keeps_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await Checkpoint(tmp_path / "ck").save(b"previous")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        await Checkpoint(tmp_path / "ck").save(b"x" * 3 * MiB)
    monkeypatch.undo()
    async with Checkpoint(tmp_path / "b", src=tmp_path / "ck") as cp:
        assert await cp.load_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".ck.checkpointio", "ck"]


@pytest.mark.parametrize("name", ["n" * 200, "n" * 230, "检" * 80, "n" * 241], ids=["200", "230", "cjk-240", "241"])
async def test_long_checkpoint_names_save_and_load_on_the_local_store(tmp_path: Path, name: str) -> None:
    # the name and its sidecar (.<name>.checkpointio, 14 bytes more) fit in 255 bytes: so must the
    # temporary names the save writes first
    data = os.urandom(100_000)
    await Checkpoint(tmp_path / name).save(data)
    async with Checkpoint(tmp_path / "reader", src=tmp_path / name) as cp:
        assert await cp.load_bytes() == data
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([name, f".{name}.checkpointio"])


async def test_a_folder_fsync_refused_after_the_commit_does_not_fail_a_stored_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # CIFS and some FUSE filesystems refuse to fsync a folder
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await Checkpoint(tmp_path / "ck").save(b"new")  # stored: reporting a failure would be wrong
    async with Checkpoint(tmp_path / "b", src=tmp_path / "ck") as cp:
        assert await cp.load_bytes() == b"new"
    assert any("could not fsync" in record.getMessage() for record in caplog.records)


async def test_a_single_file_is_saved_with_the_size_it_had_when_save_was_called(
    store: StoreCase, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    data = os.urandom(3 * 1024 * 1024 + 5)  # several chunks: the first event comes before the end
    path.write_bytes(data)

    def grow(event: Progress) -> None:
        if not event.finished and path.stat().st_size == len(data):
            with open(path, "ab") as log:
                log.write(b"appended while it was saved\n")

    await Checkpoint(store.uri("a"), on_progress=grow).save(path)
    assert path.stat().st_size > len(data)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        assert await cp.load_bytes() == data


async def test_a_single_file_shrinking_while_saved_fails_the_save_and_keeps_the_previous(
    store: StoreCase, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    await Checkpoint(store.uri("a")).save(b"previous")

    def rotate(event: Progress) -> None:
        if not event.finished:
            os.truncate(path, 10)

    with pytest.raises(SourceChangedError, match="shrank"):
        await Checkpoint(store.uri("a"), on_progress=rotate).save(path)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        assert await cp.load_bytes() == b"previous"


async def test_a_file_deleted_while_saved_fails_the_save(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "tmpfile").write_bytes(b"x")

    def delete_after_stat() -> None:
        (tree / "tmpfile").unlink()

    _before_reading(monkeypatch, delete_after_stat)
    with pytest.raises(SourceChangedError, match="tmpfile"):
        await Checkpoint(store.uri("a")).save(tree)
    assert store.partial_writes() in (0, None)


@pytest.mark.parametrize("change", ["deleted", "shrunk", "fifo", "symlink", "folder"])
async def test_a_small_file_changed_amid_its_folder_fails_the_save_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """Small files are read in bulk, a folder's run at a time: one changed between the listing and
    its reading (gone, or no longer a regular file before it is opened; shrunk after its size was
    taken), among many read fine before and after it, is found and named. A file become a pipe
    fails the save instead of blocking it on the pipe forever."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for number in range(40):
        (tree / f"file-{number:02d}").write_bytes(b"%d\n" % number * 100)
    target = tree / "file-17"

    def change_one() -> None:
        if change == "shrunk":
            os.truncate(target, 10)
            return
        target.unlink()
        if change == "fifo":
            os.mkfifo(target)
        elif change == "symlink":
            target.symlink_to(tree / "file-03")
        elif change == "folder":
            target.mkdir()

    if change == "shrunk":
        _after_its_size_was_taken(monkeypatch, target, change_one)
    else:
        _before_reading(monkeypatch, change_one)
    await Checkpoint(tmp_path / "ck").save(b"previous")
    with pytest.raises(SourceChangedError, match="file-17"):
        await Checkpoint(tmp_path / "ck").save(tree)
    async with Checkpoint(tmp_path / "next", src=tmp_path / "ck") as cp:
        assert await cp.load_bytes() == b"previous"


def _swapper(tree: Path, outside: Path, moved: Path) -> Callable[[], None]:
    """Swap ``tree/sub`` for a symlink to ``outside`` (the folder itself goes to ``moved``), once."""
    done: list[bool] = []

    def swap() -> None:
        if not done:
            done.append(True)
            os.rename(tree / "sub", moved)
            (tree / "sub").symlink_to(outside)

    return swap


def _tree_with_a_folder_and_a_secret_outside(tmp_path: Path) -> tuple[Path, Path]:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(b"a" * 2000)
    (tree / "sub" / "a.bin").write_bytes(b"s" * 2000)
    (tree / "sub" / "id_rsa").write_bytes(b"the tree's own file")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.bin").write_bytes(b"o" * 2000)
    (outside / "id_rsa").write_bytes(b"-----BEGIN PRIVATE KEY----- not part of the tree")
    return tree, outside


@pytest.mark.parametrize("moment", ["once-listed", "once-its-header-is-written", "while-it-is-read"])
async def test_a_folder_swapped_for_a_symlink_out_of_the_tree_while_saved_never_brings_outside_files_in(
    store: StoreCase, tmp_path: Path, moment: str
) -> None:
    tree, outside = _tree_with_a_folder_and_a_secret_outside(tmp_path)
    swap = _swapper(tree, outside, tmp_path / "moved")
    await Checkpoint(store.uri("a")).save(b"previous")
    # One 512-byte tar block per chunk, each reported as it is written: reports 1-5 are a.bin's
    # header and data (the listing said "sub" is a folder), 6 is sub/'s header, 7-11 sub/a.bin's
    # (the folder was opened and its entries are being read).
    reports = [0]
    at = {"once-listed": 1, "once-its-header-is-written": 6, "while-it-is-read": 8}[moment]

    def on_progress(event: Progress) -> None:
        reports[0] += 1
        if reports[0] == at:
            swap()

    cp = Checkpoint(store.uri("a"), on_progress=on_progress, chunk_size=512, compression_workers=1)
    if moment != "while-it-is-read":
        with pytest.raises(SourceChangedError, match="sub"):
            await cp.save(tree)
        async with Checkpoint(store.uri("b"), src=store.uri("a")) as reader:
            assert await reader.load_bytes() == b"previous"
        return
    await cp.save(tree)  # the folder read is the one listed: stored as it was
    assert (tree / "sub").is_symlink()  # the swap happened during the save
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as reader:
        restored = await reader.load()
        assert restored is not None
        assert (restored / "sub" / "id_rsa").read_bytes() == b"the tree's own file"
        assert (restored / "sub" / "a.bin").read_bytes() == b"s" * 2000


@pytest.mark.parametrize("moment", ["before-it-is-read", "while-it-is-read"])
async def test_a_folder_swapped_for_a_symlink_out_of_the_tree_during_a_background_snapshot_is_never_followed(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    tree, outside = _tree_with_a_folder_and_a_secret_outside(tmp_path)
    swap = _swapper(tree, outside, tmp_path / "moved")
    await Checkpoint(store.uri("a")).save(b"previous")
    # The snapshot hard-links each file: swap right after it linked a.bin (top: "sub" was listed
    # but not read yet) or the first file of sub (the folder is being read).
    real_link = os.link
    folder = "snapshot" if moment == "before-it-is-read" else "sub"

    def link(*args: Any, **kwargs: Any) -> None:
        real_link(*args, **kwargs)
        if Path(args[1]).parent.name == folder:
            swap()

    monkeypatch.setattr(os, "link", link)
    async with Checkpoint(store.uri("a")) as cp:
        if moment == "before-it-is-read":
            with pytest.raises(SourceChangedError, match="sub"):
                await cp.save(tree, wait=False)
        else:
            await (await cp.save(tree, wait=False))
    assert (tree / "sub").is_symlink()  # the swap happened during the snapshot
    monkeypatch.undo()
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as reader:
        if moment == "before-it-is-read":
            assert await reader.load_bytes() == b"previous"
            return
        restored = await reader.load()
        assert restored is not None
        assert (restored / "sub" / "id_rsa").read_bytes() == b"the tree's own file"
        assert (restored / "sub" / "a.bin").read_bytes() == b"s" * 2000


def _members(archive_path: Path) -> list[str]:
    with tarfile.open(archive_path, "r:gz") as tar:
        return sorted(member.name for member in tar.getmembers())


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "background"])
@pytest.mark.parametrize("key", ["self.ckpt", "checkpoints/run.ckpt"], ids=["at-its-top", "in-a-new-subfolder"])
async def test_a_folder_saved_to_a_local_key_inside_it_leaves_out_the_checkpoint_and_does_not_grow(
    tmp_path: Path, wait: bool, key: str
) -> None:
    tree = make_tree(tmp_path / "tree")
    dest = tree / key
    names: list[list[str]] = []
    trees: list[dict[str, tuple[str, object, int, int]]] = []
    for _ in range(3):
        async with Checkpoint(dest) as cp:
            await (await cp.save(tree, wait=wait))
        names.append(_members(dest))
        async with Checkpoint(tmp_path / "reader", src=dest) as reader:
            restored = await reader.load()
            assert restored is not None
            trees.append(snapshot(restored))
    assert names[0] == names[1] == names[2]
    assert trees[0] == trees[1] == trees[2]
    assert not [name for name in names[0] if ".ckpt" in name]  # nor its record, nor temporary files
    assert trees[0] == {rel: entry for rel, entry in snapshot(tree).items() if ".ckpt" not in rel}


async def test_a_background_save_with_its_temporary_folder_inside_the_tree_keeps_its_scratch_out(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "tmp").mkdir()  # TMPDIR=$PWD/tmp, where /tmp is small
    monkeypatch.setattr(tempfile, "tempdir", str(tree / "tmp"))
    expected = snapshot(tree)
    async with Checkpoint(store.uri("a")) as cp:
        await (await cp.save(tree, wait=False))
    assert snapshot(tree) == expected  # and the scratch is gone
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as reader:
        restored = await reader.load()
        assert restored is not None
        assert snapshot(restored) == expected


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "background"])
async def test_a_named_pipe_given_to_save_is_refused_as_what_it_is(
    store: StoreCase, tmp_path: Path, wait: bool
) -> None:
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with Checkpoint(store.uri("a")) as cp:
        with pytest.raises(UnsupportedSourceError, match="named pipe") as caught:
            await cp.save(fifo, wait=wait)
    assert str(fifo) in str(caught.value) and ".checkpointio-partial" not in str(caught.value)
    assert await Checkpoint(store.uri("a")).prev_exists() is False


def _unreadable(path: Path) -> bool:
    """Make ``path`` unreadable; whether that holds for this process (root reads anything)."""
    path.chmod(0)
    try:
        os.listdir(path)
    except PermissionError:
        return True
    path.chmod(0o755)
    return False


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "background"])
async def test_an_unreadable_folder_fails_the_save_naming_the_users_path(
    store: StoreCase, tmp_path: Path, wait: bool
) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "model" / "locked").mkdir()
    if not _unreadable(tree / "model" / "locked"):
        pytest.skip("this process may read any folder (root with CAP_DAC_OVERRIDE)")
    try:
        async with Checkpoint(store.uri("a")) as cp:
            with pytest.raises(SourceUnreadableError) as caught:
                await (await cp.save(tree, wait=wait))
    finally:
        (tree / "model" / "locked").chmod(0o755)
    message = str(caught.value)
    assert str(tree / "model" / "locked") in message and ".checkpointio-partial" not in message
    assert await Checkpoint(store.uri("a")).prev_exists() is False


@ONE_STORE
@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
async def test_a_workspace_that_is_a_file_is_a_clear_error(store: StoreCase, tmp_path: Path, where: str) -> None:
    await Checkpoint(store.uri("a")).save(b"data")
    (tmp_path / "notes.txt").write_text("a user's file")
    workspace = tmp_path / "notes.txt" if where == "a-file" else tmp_path / "notes.txt" / "ws"
    with pytest.raises(CheckpointError, match=r"not a folder|is a file") as caught:
        await Checkpoint(store.uri("b"), src=store.uri("a"), workspace=workspace).load()
    assert str(workspace) in str(caught.value)
    assert (tmp_path / "notes.txt").read_text() == "a user's file"


# -- awkward names and shapes ---------------------------------------------------------------------


@ONE_STORE
async def test_non_utf8_long_and_deep_names_sparse_and_empty_files_round_trip(store: StoreCase, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    deep = tree / "/".join(f"level{i:02d}" for i in range(30))
    deep.mkdir(parents=True)
    (deep / ("long-name-" + "x" * 200)).write_bytes(b"deep and long")
    with open(os.path.join(os.fsencode(tree), b"caf\xe9-latin1.txt"), "wb") as f:  # not valid UTF-8
        f.write(b"non-utf8 name")
    (tree / "ünïcødé ☃.txt").write_text("unicode name")
    (tree / "empty-file").write_bytes(b"")
    (tree / "empty-dir").mkdir()
    with open(tree / "sparse", "wb") as f:
        f.truncate(32 * MiB)
        f.seek(16 * MiB)
        f.write(b"middle")
    await Checkpoint(store.uri("a")).save(tree)
    assert len(store.get_raw("a")) < MiB  # zeros deflate to almost nothing
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored is not None
        assert snapshot(restored) == snapshot(tree)
        assert os.path.exists(os.path.join(os.fsencode(restored), b"caf\xe9-latin1.txt"))


@pytest.mark.parametrize("entries", [10_000, pytest.param(100_000, marks=pytest.mark.slow)])
async def test_trees_with_many_entries_round_trip(entries: int, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(entries):
        folder = tree / f"d{i % 100:03d}"
        if i < 100:
            folder.mkdir(parents=True)
        (folder / f"f{i}").write_bytes(str(i).encode())
    await Checkpoint(tmp_path / "ckpt").save(tree)
    async with Checkpoint(tmp_path / "x", src=tmp_path / "ckpt") as cp:
        restored = await cp.load()
        assert restored is not None
        assert sum(1 for _ in restored.rglob("f*")) == entries
        assert (restored / "d042" / f"f{entries - 58}").read_bytes() == str(entries - 58).encode()


# -- bad archives ---------------------------------------------------------------------------------


@ONE_STORE
async def test_a_huge_declared_size_is_truncation_not_a_memory_blow_up(store: StoreCase, tmp_path: Path) -> None:
    header = tarfile.TarInfo("huge")
    header.size = 1 << 40  # 1 TiB declared, a few bytes present
    store.put_raw("huge", gzip_of(header.tobuf(tarfile.PAX_FORMAT) + b"tiny"))
    async with Checkpoint(store.uri("x"), src=store.uri("huge")) as cp:
        with pytest.raises(CorruptCheckpointError, match=r"truncated|corrupt"):
            await cp.load()
        assert list(cp.path.iterdir()) == []


def gzip_of(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _valid_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in [("a.txt", b"alpha" * 50), ("dir/b.bin", bytes(range(256)) * 4), ("dir/c", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("dir/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "b.bin"
        tar.addfile(link)
    return buffer.getvalue()


VALID = _valid_archive()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, len(VALID)),
)
def test_fuzzed_archives_give_a_clear_error_or_a_tree_inside_the_workspace(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    data = data[: max(cut, 1)]
    dest = tmp_path_factory.mktemp("fuzz")
    try:
        archive.unpack_directory(pull_of([bytes(data)]), dest, uri="fuzz://x", workers=1)
    except CheckpointError:
        return
    _assert_inside(dest)


def _assert_inside(dest: Path) -> None:
    """Every path extracted into ``dest``, and every symlink's target, stays inside ``dest``."""
    root = os.path.realpath(dest)
    for path in dest.rglob("*"):
        assert os.path.realpath(path.parent).startswith(root)
        if path.is_symlink():
            target = os.path.realpath(path)
            assert target.startswith(root), f"{path} -> {target}"


def _extract_or_refuse(tar: bytes, dest: Path) -> None:
    """Check, then extract, the gzip of ``tar``: the same :class:`CheckpointError` from both, or a
    tree inside ``dest`` (any other exception fails the test)."""
    data = gzip.compress(tar, compresslevel=1)
    outcomes: list[type[CheckpointError] | None] = []
    for target in (None, dest):  # `verify` first (writes nothing), then a real restore
        try:
            archive.unpack_directory(pull_of([data]), target, uri="fuzz://x", workers=1)
            outcomes.append(None)
        except CheckpointError as error:
            outcomes.append(type(error))
    assert outcomes[0] == outcomes[1], "verify and restore disagree"
    _assert_inside(dest)


def _tar_of(tar_format: int) -> bytes:
    """An uncompressed tar of files, a folder, a symlink, a hard link and a long name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in [("a.txt", b"alpha" * 50), ("dir/b.bin", bytes(range(256)) * 2), ("d/" + "n" * 120, b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind, target in [("dir/link", tarfile.SYMTYPE, "b.bin"), ("hard", tarfile.LNKTYPE, "a.txt")]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


TARS = [_tar_of(tarfile.GNU_FORMAT), _tar_of(tarfile.PAX_FORMAT)]
#: The offsets of the header blocks (ustar, pax and GNU long-name headers) of each of TARS.
HEADERS = [[at for at in range(0, len(tar), 512) if untar.is_header(tar[at : at + 512])] for tar in TARS]
FIELDS = {  # ustar header fields: (start, end)
    "name": (0, 100),
    "mode": (100, 108),
    "size": (124, 136),
    "mtime": (136, 148),
    "checksum": (148, 156),
    "typeflag": (156, 157),
    "linkname": (157, 257),
    "magic": (257, 265),
    "prefix": (345, 500),
}
TOKENS = [  # values that mean something to a tar reader, for names, links, numbers and types
    *(b"../x", b"/etc/passwd", b"..", b".", b"", b"a/../../b", b"dir", b"dir/", b"dir/b.bin", b"a.txt", b"a.txt/x"),
    *(b"hard", b"dir/link", b"dir/link/x", b"dir/link/..", b"../../..", b"x\0y", b"n" * 100, b"\xff\xfe"),
    *(b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"S", b"\0"),
    *(b"7777777", b"77777777777", b"99999999999", b"-1", b" +1", b"1_0", b"00000001000", b"00000000001"),
    *(b"\x80" + bytes(10) + b"\x01", b"\x80" + b"\xff" * 11, b"\xff" * 12, b"\x80\x00\x00\x00\x00\x01\x00\x00"),
    *(b"ustar\x0000", b"ustar  \0", b"ustar\0"),
]
tar_edits = st.lists(
    st.one_of(
        st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.integers(0, 511), st.integers(0, 255)),
        st.tuples(
            st.just("field"),
            st.integers(0, 1 << 16),
            st.sampled_from(sorted(FIELDS)),
            st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=12)),
        ),
        st.tuples(st.just("anywhere"), st.integers(0, 1 << 16), st.integers(0, 4095), st.integers(0, 255)),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(range(len(TARS))),
    edits=tar_edits,
    fix_checksums=st.sampled_from([True, True, True, False]),  # mostly: a broken checksum stops everything
    cut=st.one_of(st.none(), st.integers(0, 8192)),
)
def test_fuzzed_tar_streams_give_a_clear_error_or_a_tree_inside_the_workspace(
    tmp_path_factory: pytest.TempPathFactory,
    which: int,
    edits: list[tuple[str, int, int | str, int | bytes]],
    fix_checksums: bool,
    cut: int | None,
) -> None:
    """Like the test above, on the tar stream itself: edits land in (mostly) headers whose checksums
    are then made right again, so they reach the parser instead of failing the gzip CRC."""
    tar, headers = bytearray(TARS[which]), HEADERS[which]
    edited = set()
    for kind, choice, where, value in edits:
        if kind == "anywhere":  # data blocks, pax records, the end-of-archive marker
            assert isinstance(where, int) and isinstance(value, int)
            tar[where % len(tar)] = value
            edited.update({where % len(tar) // 512 * 512} & set(headers))
            continue
        at = headers[choice % len(headers)]
        edited.add(at)
        if kind == "byte":
            assert isinstance(where, int) and isinstance(value, int)
            tar[at + where] = value
        else:
            assert isinstance(where, str) and isinstance(value, bytes)
            start, end = FIELDS[where]
            tar[at + start : at + end] = value[: end - start].ljust(end - start, b"\0")
    for at in sorted(edited) if fix_checksums else ():
        block = tar[at : at + 512]
        block[148:156] = b" " * 8
        tar[at + 148 : at + 156] = b"%06o\0 " % sum(block)
    if cut is not None:
        del tar[cut:]
    _extract_or_refuse(bytes(tar), tmp_path_factory.mktemp("fuzz"))


Entry = tuple[tarfile.TarInfo, bytes]


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attributes: object) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    for attribute, value in attributes.items():
        setattr(info, attribute, value)
    return info, data


def _tar_of_entries(entries: list[Entry], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _check_and_extract(tar: bytes, dest: Path, error: type[CheckpointError] | None) -> None:
    """`verify`, then restore, the gzip of ``tar``: both raise exactly ``error``, or both succeed."""
    data = gzip.compress(tar, compresslevel=1)
    for target in (None, dest):
        if error is None:
            archive.unpack_directory(pull_of([data]), target, uri="x://y", workers=1)
            continue
        with pytest.raises(error) as raised:
            archive.unpack_directory(pull_of([data]), target, uri="x://y", workers=1)
        assert raised.type is error, raised.value
    _assert_inside(dest)


@pytest.mark.parametrize(
    ("pax_headers", "error"),
    [
        ({"mtime": "inf"}, CorruptCheckpointError),  # int(float()) raised OverflowError
        ({"mtime": "-inf"}, CorruptCheckpointError),
        ({"mtime": "nan"}, CorruptCheckpointError),  # ValueError
        ({"mtime": "1e400"}, CorruptCheckpointError),  # OverflowError: float() reads it as infinity
        ({"mtime": "-1e30"}, CorruptCheckpointError),  # OverflowError from os.utime
        ({"mtime": "1e19"}, CorruptCheckpointError),
        ({"mtime": "soon"}, CorruptCheckpointError),  # ValueError
        ({"mtime": "-1.5"}, None),  # a valid time before 1970
        ({"size": "99999999999999999999"}, CorruptCheckpointError),
        ({"size": "-1"}, CorruptCheckpointError),
        ({"path": "../x"}, UnsafeArchiveError),
        ({"path": "/etc/x"}, UnsafeArchiveError),
        ({"path": "a\0b"}, CorruptCheckpointError),  # ValueError (embedded null byte) from os.open
        ({"linkpath": "/etc"}, UnsafeArchiveError),
        ({"linkpath": "../.."}, UnsafeArchiveError),
        ({"linkpath": "t\0u"}, CorruptCheckpointError),  # ValueError from os.symlink
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else repr(value),
)
def test_hostile_pax_headers_are_refused_with_a_clear_error(
    tmp_path: Path, pax_headers: dict[str, str], error: type[CheckpointError] | None
) -> None:
    if "linkpath" in pax_headers:
        entry = _entry("s", tarfile.SYMTYPE, linkname="t", pax_headers=pax_headers)
    else:
        entry = _entry("f", data=b"x", pax_headers=pax_headers)
    (tmp_path / "dest").mkdir()
    _check_and_extract(_tar_of_entries([entry]), tmp_path / "dest", error)


@pytest.mark.parametrize(
    ("entries", "error"),
    [  # before: FileExistsError, NotADirectoryError, FileNotFoundError and OverflowError from os calls
        pytest.param([_entry("d", tarfile.DIRTYPE), _entry("d")], CorruptCheckpointError, id="file over folder"),
        pytest.param([_entry("d/f"), _entry("d", data=b"x")], CorruptCheckpointError, id="file over parent"),
        pytest.param(
            [_entry("d", tarfile.DIRTYPE), _entry("d", tarfile.SYMTYPE, linkname=".")],
            CorruptCheckpointError,
            id="symlink over folder",
        ),
        pytest.param(
            [_entry("f"), _entry("d", tarfile.DIRTYPE), _entry("d", tarfile.LNKTYPE, linkname="f")],
            CorruptCheckpointError,
            id="hard link over folder",
        ),
        pytest.param([_entry("f"), _entry("f/g")], CorruptCheckpointError, id="path through a file"),
        pytest.param([_entry("f"), _entry("f/g/h", tarfile.DIRTYPE)], CorruptCheckpointError, id="folder in a file"),
        pytest.param([_entry("s", tarfile.SYMTYPE, linkname="")], CorruptCheckpointError, id="empty symlink target"),
        pytest.param([_entry("f", mtime=2**80)], CorruptCheckpointError, id="base-256 mtime out of range"),
        pytest.param(
            [_entry("f", data=b"kept"), _entry("f", tarfile.LNKTYPE, linkname="f")], None, id="hard link to itself"
        ),
    ],
)
def test_crafted_entry_sequences_are_refused_with_a_clear_error(
    tmp_path: Path, entries: list[Entry], error: type[CheckpointError] | None
) -> None:
    (tmp_path / "dest").mkdir()
    _check_and_extract(_tar_of_entries(entries, tarfile.GNU_FORMAT), tmp_path / "dest", error)
    if error is None:
        assert (tmp_path / "dest" / "f").read_bytes() == b"kept"


# -- property-based round trips -------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=20).filter(
    lambda n: n not in (".", "..")
)
trees = st.recursive(
    st.binary(max_size=2000),
    lambda children: st.dictionaries(names, children, max_size=4),
    max_leaves=12,
)


def write_tree(root: Path, spec: dict[str, object]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, child in spec.items():
        if isinstance(child, dict):
            write_tree(root / name, child)
        else:
            assert isinstance(child, bytes)
            (root / name).write_bytes(child)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.dictionaries(names, trees, max_size=5), payload=st.binary(max_size=5000))
def test_random_trees_and_payloads_round_trip_identically(
    store: StoreCase, tmp_path_factory: pytest.TempPathFactory, spec: dict[str, object], payload: bytes
) -> None:
    base = tmp_path_factory.mktemp("prop")
    write_tree(base / "tree", spec)
    key = os.urandom(4).hex()
    Checkpoint(store.uri(f"{key}-tree")).save_sync(base / "tree")
    Checkpoint(store.uri(f"{key}-bytes")).save_sync(payload)
    with Checkpoint(store.uri("x"), src=store.uri(f"{key}-tree")) as cp:
        restored = cp.load_sync()
        assert restored is not None and snapshot(restored) == snapshot(base / "tree")
    with Checkpoint(store.uri("x"), src=store.uri(f"{key}-bytes")) as cp:
        restored = cp.load_sync()
        assert restored is not None and restored.read_bytes() == payload


# -- concurrency and load -------------------------------------------------------------------------


async def test_64_concurrent_saves_and_loads_on_one_loop(store: StoreCase, caplog: pytest.LogCaptureFixture) -> None:
    payloads = {i: os.urandom(random.Random(i).randint(1, 300_000)) for i in range(64)}

    async def round_trip(i: int) -> None:
        await Checkpoint(store.uri(f"k{i}")).save(payloads[i])
        async with Checkpoint(store.uri("x"), src=store.uri(f"k{i}")) as cp:
            restored = await cp.load()
            assert restored is not None and restored.read_bytes() == payloads[i]

    async with anyio.create_task_group() as group:
        for i in range(64):
            group.start_soon(round_trip, i)
    assert "pool" not in caplog.text.lower()


def test_many_threads_through_the_sync_twins(store: StoreCase, tmp_path: Path) -> None:
    errors: list[BaseException] = []
    tree = make_tree(tmp_path / "tree")

    def worker(i: int) -> None:
        try:
            Checkpoint(store.uri(f"t{i}")).save_sync(tree if i % 2 else f"payload {i}".encode())
            with Checkpoint(store.uri("x"), src=store.uri(f"t{i}")) as cp:
                restored = cp.load_sync()
                assert restored is not None
                if i % 2:
                    assert snapshot(restored) == snapshot(tree)
                else:
                    assert restored.read_bytes() == f"payload {i}".encode()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


async def test_two_writers_racing_on_one_key_leave_one_complete_checkpoint(store: StoreCase, tmp_path: Path) -> None:
    first, second = make_tree(tmp_path / "one"), make_tree(tmp_path / "two")
    (second / "model" / "weights.bin").write_bytes(os.urandom(3 * MiB))
    for _ in range(3):
        async with anyio.create_task_group() as group:
            group.start_soon(Checkpoint(store.uri("shared"), **SMALL_PARTS).save, first)
            group.start_soon(Checkpoint(store.uri("shared"), **SMALL_PARTS).save, second)
        async with Checkpoint(store.uri("x"), src=store.uri("shared")) as cp:
            restored = await cp.load()
            assert restored is not None
            assert snapshot(restored) in (snapshot(first), snapshot(second))
