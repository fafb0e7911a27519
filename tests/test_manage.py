"""Progress reports, streamed sources, verify, restore to a path and garbage collection, over every store."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

from checkpointio import (
    Checkpoint,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DestinationError,
    Progress,
    UnsafeArchiveError,
)
from checkpointio._config import TransferConfig
from checkpointio._location import parse_location
from checkpointio._manage import collect_garbage, list_checkpoints, restore, verify
from checkpointio._stores import open_store

from .conftest import ONE_STORE, StoreCase, make_tree, snapshot
from .placing import fail_placing_onto

CONFIG = TransferConfig()


class Recorder:
    """An ``on_progress`` callback that keeps every event and the threads it was called from."""

    def __init__(self) -> None:
        self.events: list[Progress] = []
        self.threads: set[int] = set()

    def __call__(self, event: Progress) -> None:
        self.events.append(event)
        self.threads.add(threading.get_ident())


async def test_save_and_load_report_progress_ending_in_one_finished_event(store: StoreCase) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    saving, loading = Recorder(), Recorder()
    await Checkpoint(store.uri("a"), chunk_size=1024 * 1024).save(data, on_progress=saving)
    async with Checkpoint(store.uri("b"), src=store.uri("a"), on_progress=loading) as cp:
        restored = await cp.load()
        assert restored is not None and restored.read_bytes() == data
    # a save reports each 1 MiB part it hands over; a load reports as bytes arrive, and how many
    # arrive in one hand-over depends on timing (all of them, on a slow machine): one report at least
    for recorder, operation, least in ((saving, "save", 4), (loading, "load", 2)):
        events = recorder.events
        assert [event.operation for event in events] == [operation] * len(events)
        assert len(events) >= least and [event.finished for event in events] == [False] * (len(events) - 1) + [True]
        assert all(event.total == len(data) for event in events)
        assert [event.done for event in events] == sorted(event.done for event in events)
        assert events[-1].done == len(data)
        assert threading.get_ident() not in recorder.threads  # never called on the event loop's thread


async def test_a_directory_save_reports_an_unknown_total_until_it_finished(store: StoreCase, tmp_path: Path) -> None:
    recorder = Recorder()
    await Checkpoint(store.uri("a"), on_progress=recorder).save(make_tree(tmp_path / "tree"))
    assert all(event.total is None for event in recorder.events[:-1])
    last = recorder.events[-1]
    assert last.finished and last.total == last.done > 0


async def test_a_directory_save_reports_its_files_bytes_against_their_total_then_committing(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    os.link(tree / "model" / "weights.bin", tree / "same-weights.bin")  # read once, counted once
    files = sum(path.stat().st_size for path in tree.rglob("*") if path.is_file() and not path.is_symlink())
    files -= (tree / "same-weights.bin").stat().st_size
    recorder = Recorder()
    await Checkpoint(store.uri("a"), on_progress=recorder).save(tree)
    events = recorder.events
    assert all(event.source_total == files for event in events)  # from the first report on
    sources = [event.source_done for event in events if event.source_done is not None]
    assert len(sources) == len(events) and sources == sorted(sources) and sources[-1] == files
    # the bytes handed over stop before the save completes: then one report says it is committing
    assert [event.committing for event in events] == [False] * (len(events) - 2) + [True, True]
    assert events[-2].done == events[-1].done == events[-1].total and not events[-2].finished and events[-1].finished


async def test_a_file_save_reports_its_source_as_the_bytes_sent(store: StoreCase, tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    recorder = Recorder()
    await Checkpoint(store.uri("a"), chunk_size=1024 * 1024).save(tmp_path / "data", on_progress=recorder)
    events = recorder.events
    assert all(event.source_done == event.done and event.source_total == event.total for event in events)
    assert [event.committing for event in events[-2:]] == [True, True] and events[-1].done == 2 * 1024 * 1024 + 3


async def test_a_binary_stream_is_saved_as_bytes(store: StoreCase) -> None:
    data = os.urandom(2 * 1024 * 1024 + 1)
    await Checkpoint(store.uri("a")).save(io.BytesIO(data))
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        restored = await cp.load()
        assert restored == cp.path / "payload" and restored.read_bytes() == data


async def test_a_text_stream_is_refused() -> None:
    with pytest.raises(TypeError, match="binary file object"):
        await Checkpoint("memory://text").save(io.StringIO("text"))  # type: ignore[arg-type]  # the wrong type on purpose


async def test_verify_reads_a_directory_to_its_end_and_writes_nothing(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("a")).save(make_tree(tmp_path / "tree"))
    before = set(Path.cwd().iterdir())
    recorder = Recorder()
    info = await verify(store.uri("a"), CONFIG, recorder)
    assert info.record is not None and info.record.kind.value == "dir"
    assert recorder.events[-1].operation == "verify" and recorder.events[-1].done == info.size
    assert set(Path.cwd().iterdir()) == before


async def test_verify_raises_the_errors_a_load_would(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("bytes")).save(os.urandom(100_000))
    store.corrupt("bytes")
    with pytest.raises(ChecksumMismatchError, match="CRC32"):
        await verify(store.uri("bytes"), CONFIG)
    await Checkpoint(store.uri("dir")).save(make_tree(tmp_path / "tree"))
    store.corrupt("dir")
    with pytest.raises(CorruptCheckpointError):
        await verify(store.uri("dir"), CONFIG)
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint"):
        await verify(store.uri("missing"), CONFIG)


@ONE_STORE
async def test_verify_refuses_an_unsafe_foreign_archive(store: StoreCase) -> None:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape")
        tar.addfile(info, io.BytesIO(b""))
    store.put_raw("evil", buffer.getvalue())
    with pytest.raises(UnsafeArchiveError):
        await verify(store.uri("evil"), CONFIG)


async def test_restore_puts_a_tree_or_a_file_in_place_only_when_whole(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    await Checkpoint(store.uri("dir")).save(tree)
    await Checkpoint(store.uri("bytes")).save(b"payload")
    restored = await restore(store.uri("dir"), tmp_path / "out" / "tree", CONFIG)
    assert restored.is_directory and snapshot(tmp_path / "out" / "tree") == snapshot(tree)
    restored = await restore(store.uri("bytes"), tmp_path / "out" / "file", CONFIG)
    assert not restored.is_directory and (tmp_path / "out" / "file").read_bytes() == b"payload"
    with pytest.raises(FileExistsError):
        await restore(store.uri("bytes"), tmp_path / "out" / "file", CONFIG)
    with pytest.raises(DestinationError, match="not empty"):  # a file never replaces a folder's contents
        await restore(store.uri("bytes"), tmp_path / "out" / "tree", CONFIG, overwrite=True)
    assert snapshot(tmp_path / "out" / "tree") == snapshot(tree)
    (tmp_path / "out" / "file").write_bytes(b"older")
    await restore(store.uri("bytes"), tmp_path / "out" / "file", CONFIG, overwrite=True)
    assert (tmp_path / "out" / "file").read_bytes() == b"payload"
    await restore(store.uri("dir"), tmp_path / "out" / "file", CONFIG, overwrite=True)
    assert snapshot(tmp_path / "out" / "file") == snapshot(tree)
    store.corrupt("dir")
    with pytest.raises(CorruptCheckpointError):
        await restore(store.uri("dir"), tmp_path / "out" / "broken", CONFIG)
    with pytest.raises(CheckpointNotFoundError):
        await restore(store.uri("missing"), tmp_path / "out" / "missing", CONFIG)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["file", "tree"]  # no staging left


async def test_restore_over_an_existing_dest_keeps_it_until_the_new_one_is_in_place(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = make_tree(tmp_path / "new")
    (new / "only-in-new").write_bytes(b"new")
    await Checkpoint(store.uri("new")).save(new)
    old = make_tree(tmp_path / "out" / "dest")
    expected = snapshot(old)
    fail_placing_onto(monkeypatch, old, OSError(28, "No space left on device"))  # the new one going into place
    with pytest.raises(OSError, match="No space"):
        await restore(store.uri("new"), old, CONFIG, overwrite=True)
    assert snapshot(old) == expected
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["dest"]
    monkeypatch.undo()
    await restore(store.uri("new"), old, CONFIG, overwrite=True)
    assert snapshot(old) == snapshot(new)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["dest"]


async def test_keys_with_url_delimiters_are_distinct_checkpoints(store: StoreCase) -> None:
    names = ["exp#1/ck", "exp#2/ck", "exp", "step?x=1", "step", "a%20b", "a b"]
    for name in names:
        await Checkpoint(store.uri(f"odd/{name}")).save(name.encode())
    for name in names:
        async with Checkpoint(store.uri("reader"), src=store.uri(f"odd/{name}")) as cp:
            restored = await cp.load()
            assert restored is not None and restored.read_bytes() == name.encode()
    listed = await list_checkpoints(store.uri("odd/"), CONFIG)
    assert sorted(info.location.uri for info in listed) == sorted(store.uri(f"odd/{name}") for name in names)


async def test_listing_carries_kind_size_and_time(store: StoreCase, tmp_path: Path) -> None:
    await Checkpoint(store.uri("run/a")).save(b"abc")
    await Checkpoint(store.uri("run/b")).save(make_tree(tmp_path / "tree"))
    infos = await list_checkpoints(store.uri("run/"), CONFIG)
    assert [info.location.uri for info in infos] == [store.uri("run/a"), store.uri("run/b")]
    assert [info.record.kind.value if info.record else None for info in infos] == ["bytes", "dir"]
    assert infos[0].size == 3 and all(info.modified is not None for info in infos)


def _leave_unfinished_save(store: StoreCase, name: str, age: float) -> bool:
    """Leave what a killed save leaves; False where the store cannot hold one (memory)."""
    if store.s3 is not None:
        client = store.s3.client()
        key = f"{store.prefix}/{name}"
        upload = client.create_multipart_upload(Bucket=store.bucket, Key=key)
        client.upload_part(Bucket=store.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 100)
        return True
    if store.name == "local":
        path = store.root / f".{name}.partial-0123456789abcdef"  # as a save names it
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        os.utime(path, (time.time() - age, time.time() - age))
        return True
    return False


async def test_gc_aborts_only_unfinished_saves_older_than_the_cutoff(store: StoreCase) -> None:
    await Checkpoint(store.uri("done")).save(b"complete")
    if not _leave_unfinished_save(store, "killed", age=7200):
        assert await collect_garbage(store.uri(""), CONFIG, older_than=0) == []
        return
    prefix = store.uri("")
    if store.s3 is None:  # moto stamps every upload with one fixed date in 2010, so only locally
        assert await collect_garbage(prefix, CONFIG, older_than=86400) == []  # 2 h old: kept
    listed = await collect_garbage(prefix, CONFIG, older_than=0, dry_run=True)
    assert [write.location.uri for write in listed] == [store.uri("killed")]
    assert store.partial_writes() == 1
    aborted = await collect_garbage(prefix, CONFIG, older_than=0)
    assert [write.location.uri for write in aborted] == [store.uri("killed")]
    assert store.partial_writes() == 0
    location = parse_location(store.uri("done"))
    assert await (await open_store(location.scheme, CONFIG)).head(location) is not None  # the finished one stays


def test_progress_is_reported_by_the_sync_twins_too(tmp_path: Path) -> None:
    recorder = Recorder()
    Checkpoint(tmp_path / "a").save_sync(b"x" * 10, on_progress=recorder)
    assert recorder.events[-1] == Progress(
        "save", str(tmp_path / "a"), 10, 10, finished=True, source_done=10, source_total=10, committing=True
    )
