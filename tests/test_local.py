"""The local store's own layout: one-rename commits, names it cannot record, the files it recognises
as its own (records, unfinished saves) and the layout earlier versions wrote."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tarfile
import time
import zlib
from pathlib import Path

import anyio
import pytest

from checkpointio import Checkpoint, ChecksumMismatchError, StoreError
from checkpointio._config import TransferConfig
from checkpointio._location import parse_location
from checkpointio._manage import collect_garbage, list_checkpoints, remove
from checkpointio._stores import Kind, ObjectInfo, Record, open_store

CONFIG = TransferConfig()


async def head(path: Path) -> ObjectInfo | None:
    location = parse_location(str(path))
    return await (await open_store(location.scheme, CONFIG)).head(location)


def tar_gz(name: str, content: bytes) -> bytes:
    """A plain .tar.gz: saved as *bytes*, only its record says so (its content looks like a folder)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["n" * 242, "n" * 255, "检" * 81], ids=["242", "255", "cjk-243"])
async def test_a_name_too_long_for_its_record_is_refused_before_anything_moves(tmp_path: Path, name: str) -> None:
    # The file fits, its record (.<name>.checkpointio) cannot: the save must not replace the file,
    # even one told it may (force: the file has no record, it is another tool's).
    path = tmp_path / name
    path.write_bytes(b"previous, written by another tool")
    with pytest.raises(StoreError, match=rf"the name is {len(name.encode())} bytes; .* up to 241 bytes") as caught:
        await Checkpoint(path).save(b"new bytes", force=True)
    assert str(path) in str(caught.value) and caught.value.uri == str(path)
    assert path.read_bytes() == b"previous, written by another tool"
    assert sorted(os.listdir(tmp_path)) == [name]  # nothing written beside it either
    async with Checkpoint(tmp_path / "reader", src=path) as cp:
        assert await cp.load_bytes() == b"previous, written by another tool"
    with pytest.raises(StoreError, match="up to 241 bytes"):
        await Checkpoint(tmp_path / "fresh" / name).save(b"new bytes")
    assert not (tmp_path / "fresh").exists()


# A save of bytes in a child process that SIGKILLs itself at the KILL_AT-th point of the commit:
# before and after each rename, the mtime stamp and the folder fsync.
KILLED_COMMIT = """
import os, signal, sys
import checkpointio._stores._local as local
from checkpointio import Checkpoint

uri, payload, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
points = 0

def point():
    global points
    points += 1
    if points == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def around(call):
    def wrapper(*args, **kwargs):
        point()
        result = call(*args, **kwargs)
        point()
        return result
    return wrapper

os.replace = around(os.replace)
os.rename = around(os.rename)
os.utime = around(os.utime)
local._fsync_dir = around(local._fsync_dir)
with open(payload, "rb") as source:
    Checkpoint(uri).save_sync(source.read())
print("points", points)
"""


@pytest.mark.parametrize("name", ["ck", "n" * 241], ids=["short", "241"])
async def test_a_process_killed_at_any_point_of_a_commit_leaves_old_or_new_with_its_own_record(
    tmp_path: Path, name: str
) -> None:
    store = tmp_path / "store"
    path = store / name
    old, new = tar_gz("old", b"old " * 1000), tar_gz("new", os.urandom(3000))
    (tmp_path / "new.bin").write_bytes(new)
    expected = {
        old: Record(Kind.BYTES, len(old), zlib.crc32(old)),
        new: Record(Kind.BYTES, len(new), zlib.crc32(new)),
    }
    outcomes: list[str] = []
    for kill_at in range(1, 40):
        await Checkpoint(path).save(old)
        with anyio.fail_after(120):
            result = await anyio.run_process(
                [sys.executable, "-c", KILLED_COMMIT, str(path), str(tmp_path / "new.bin"), str(kill_at)], check=False
            )
        info = await head(path)
        assert info is not None
        data = path.read_bytes()
        assert data in expected
        assert info.record == expected[data], f"killed at point {kill_at}: the bytes and the record disagree"
        async with Checkpoint(tmp_path / "reader", src=path) as cp:
            assert await cp.load_bytes() == data  # as bytes (its record), not as the folder it looks like
        # What the killed save left is found by `gc` of the checkpoint itself, even under a cut name.
        left = {str(store / entry) for entry in os.listdir(store)} - {str(path), str(store / f".{name}.checkpointio")}
        collected = await collect_garbage(str(path), CONFIG, older_than=0)
        assert {write.ident for write in collected} == left
        assert {write.location.uri for write in collected} <= {str(path)}
        assert sorted(os.listdir(store)) == sorted([name, f".{name}.checkpointio"])
        if result.returncode == 0:  # no point left to kill at: the save ran to its end
            assert result.stdout.startswith(b"points ") and data == new
            break
        assert result.returncode == -signal.SIGKILL, result.stderr.decode()
        outcomes.append("new" if data == new else "old")
    else:
        pytest.fail("the save never ran to its end")
    assert "old" in outcomes and "new" in outcomes  # the kills landed on both sides of the commit


async def test_a_checkpoint_in_the_earlier_local_layout_still_loads(tmp_path: Path) -> None:
    # What versions before the one-rename commit left on disk: the file, and a sidecar holding one
    # {"of": [size, mtime_ns], "record": {...}} entry.
    data = tar_gz("model", b"weights" * 100)
    path = tmp_path / "ck"
    path.write_bytes(data)
    st = path.stat()
    record = Record(Kind.BYTES, len(data), zlib.crc32(data))
    sidecar = tmp_path / ".ck.checkpointio"
    sidecar.write_text(json.dumps({"of": [st.st_size, st.st_mtime_ns], "record": record.to_metadata()}))
    info = await head(path)
    assert info is not None and info.record == record
    async with Checkpoint(tmp_path / "reader", src=path) as cp:
        assert await cp.load_bytes() == data  # bytes, as recorded: not restored as the folder it holds
    # its record's CRC32 is checked
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    async with Checkpoint(tmp_path / "reader2", src=path) as cp:
        with pytest.raises(ChecksumMismatchError):
            await cp.load_bytes()
    # and a new save over it replaces both
    await Checkpoint(path).save(b"newer")
    async with Checkpoint(tmp_path / "reader3", src=path) as cp:
        assert await cp.load_bytes() == b"newer"
    assert sorted(os.listdir(tmp_path)) == [".ck.checkpointio", "ck"]


async def test_gc_ls_and_rm_leave_user_files_named_like_the_stores_own(tmp_path: Path) -> None:
    store = tmp_path / "store"
    await Checkpoint(store / "notes").save(b"a checkpoint")
    user_files = {
        ".notes.partial-draft.txt": b"the user's draft",
        "sub/.report.partial-2024.pdf": b"%PDF report",
        ".x.partial-0123abcd": b"not our token length",
        ".notes.checkpointio.bak": b"a backup",
        ".plan.checkpointio": b"the user's plan, not a record",
    }
    for relative, content in user_files.items():
        (store / relative).parent.mkdir(parents=True, exist_ok=True)
        (store / relative).write_bytes(content)
    # what killed saves leave: this version's names (16 hex) and earlier versions' (32 hex)
    leftovers = [store / ".killed.partial-0123456789abcdef", store / ".killed.partial-0123456789abcdef.checkpointio"]
    leftovers.append(store / "sub" / f".old.partial-{'ab' * 16}")
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    an_hour_ago = time.time() - 3600
    for path in [store / relative for relative in user_files] + leftovers:
        os.utime(path, (an_hour_ago, an_hour_ago))

    collected = await collect_garbage(str(store), CONFIG, older_than=0)
    assert sorted(write.ident for write in collected) == sorted(map(str, leftovers))
    assert sorted(write.location.uri for write in collected) == sorted(
        [str(store / "killed"), str(store / "killed"), str(store / "sub" / "old")]
    )
    for relative, content in user_files.items():
        assert (store / relative).read_bytes() == content

    listed = [info.location.key for info in await list_checkpoints(str(store), CONFIG)]
    assert listed == sorted([str(store / "notes")] + [str(store / relative) for relative in user_files])

    (store / "plan").write_bytes(b"a file beside the user's .plan.checkpointio")
    await remove(str(store / "plan"), CONFIG, force=True)  # a user's file: only with force (rm --force)
    assert (store / ".plan.checkpointio").read_bytes() == b"the user's plan, not a record"
    await remove(str(store / "notes"), CONFIG)
    assert not (store / ".notes.checkpointio").exists()  # its own record goes with it
    assert (store / ".notes.checkpointio.bak").read_bytes() == b"a backup"


async def test_a_save_never_overwrites_a_user_file_where_its_record_would_go(tmp_path: Path) -> None:
    (tmp_path / ".plan.checkpointio").write_bytes(b"the user's plan")
    with pytest.raises(StoreError, match=r"\.plan\.checkpointio is where .* holds something else"):
        await Checkpoint(tmp_path / "plan").save(b"x")
    assert sorted(os.listdir(tmp_path)) == [".plan.checkpointio"]
    assert (tmp_path / ".plan.checkpointio").read_bytes() == b"the user's plan"
    for own in (".a.checkpointio", ".a.partial-0123456789abcdef"):
        with pytest.raises(StoreError, match="a name the local store uses for its own files"):
            await Checkpoint(tmp_path / own).save(b"x")


@pytest.mark.parametrize("length", [217, 241])
async def test_gc_of_a_long_named_checkpoint_finds_what_its_killed_save_left(tmp_path: Path, length: int) -> None:
    path = tmp_path / ("n" * length)
    await Checkpoint(path).save(b"complete")
    other = tmp_path / "short"
    await Checkpoint(other).save(b"other")
    (tmp_path / "payload").write_bytes(b"half")
    # killed just before its first rename: both temporary files (data, record) are left, cut names
    with anyio.fail_after(120):
        killed = await anyio.run_process(
            [sys.executable, "-c", KILLED_COMMIT, str(path), str(tmp_path / "payload"), "3"], check=False
        )
    assert killed.returncode == -signal.SIGKILL
    (tmp_path / "payload").unlink()
    kept = {path.name, f".{path.name}.checkpointio", "short", ".short.checkpointio"}
    left = sorted(str(tmp_path / name) for name in set(os.listdir(tmp_path)) - kept)
    assert len(left) == 2
    for leftover in left:
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))

    assert await collect_garbage(str(other), CONFIG, older_than=0) == []
    found = await collect_garbage(str(path), CONFIG, older_than=0, dry_run=True)
    assert sorted(write.ident for write in found) == left
    assert [write.location.uri for write in found] == [str(path), str(path)]
    done = await collect_garbage(str(path), CONFIG, older_than=0)
    assert sorted(write.ident for write in done) == left
    assert set(os.listdir(tmp_path)) == kept
    async with Checkpoint(tmp_path / "reader", src=path) as cp:
        assert await cp.load_bytes() == b"complete"


def test_the_file_at_a_local_path_is_the_plain_archive(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("hello")
    Checkpoint(tmp_path / "ck").save_sync(tree)
    with tarfile.open(tmp_path / "ck", "r:gz") as archive:  # as other tools read it
        member = archive.extractfile("sub/f.txt")
        assert member is not None and member.read() == b"hello"
    doc = json.loads((tmp_path / ".ck.checkpointio").read_text())
    st = (tmp_path / "ck").stat()
    assert doc["of"] == [st.st_size, st.st_mtime_ns] and doc["record"]["checkpointio-kind"] == "dir"


def test_an_object_being_written_is_never_written_after_it_was_closed(tmp_path: Path) -> None:
    """A worker thread left running by a cancelled save finds the file closed: it does not write
    to whatever the process opened since under the same descriptor number."""
    from checkpointio._stores._local import _Output

    out = _Output(tmp_path / "object")
    out.open()
    out.write(b"first")
    out.close()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT, 0o600)  # may take the same number
    try:
        with pytest.raises(OSError):
            out.write(b"late")
        with pytest.raises(OSError):
            out.open()
    finally:
        os.close(other)
    assert (tmp_path / "object").read_bytes() == b"first"
    assert (tmp_path / "other").read_bytes() == b""
