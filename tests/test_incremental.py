"""Incremental checkpoints: round trips, deduplication against parents, damage and hostile manifests,
over every store."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointio import (
    Checkpoint,
    CorruptCheckpointError,
    TaskEnvironment,
    UnsafeArchiveError,
    _cdc,
    _engine,
    _incremental,
    _manage,
)
from checkpointio._config import TransferConfig
from checkpointio._exceptions import StoreError
from checkpointio._location import parse_location, parse_prefix
from checkpointio._stores import Kind, open_store

from .conftest import ONE_STORE, StoreCase, make_tree, snapshot
from .scripts import RandomKills
from .test_cli import cli, ok

#: The command line runs in a process of its own (it sets up logging and malloc for its process):
#: over the stores another process can see.
SHARED_STORES = pytest.mark.parametrize("store", ["local", "s3"], indirect=True)

AREA = _incremental.AREA


def full_tree(root: Path) -> Path:
    """``make_tree`` plus what only an incremental checkpoint's own code paths meet: a hard link,
    a name that is not UTF-8, a large compressible file of many chunks, a file of repeated chunks."""
    make_tree(root)
    os.link(root / "run.sh", root / "run-again.sh")
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    (root / "na\u00efve-\u65e5\u672c.txt").write_bytes(b"a name of characters of several bytes")
    rng = random.Random(7)
    words = [bytes(rng.randrange(97, 123) for _ in range(rng.randrange(3, 9))) for _ in range(500)]
    (root / "model" / "text.log").write_bytes(b" ".join(rng.choice(words) for _ in range(150_000)))
    block = os.urandom(600 * 1024)
    (root / "model" / "repeated.bin").write_bytes(block * 3)
    return root


def tree_state(root: Path) -> dict[str, tuple[str, object, int, int]]:
    state = snapshot(root)
    # hard links come back linked
    state["<linked>"] = ("linked", (root / "run.sh").stat().st_ino == (root / "run-again.sh").stat().st_ino, 0, 0)
    return state


def pack_bytes(store: StoreCase, folder: str = "") -> dict[str, int]:
    """The packs the store holds beside the test's checkpoints (in ``folder``, e.g. ``"run/"``;
    name -> size), as the store lists them."""
    location = parse_prefix(store.uri(f"{folder}{AREA}/packs/"))

    async def listing() -> dict[str, int]:
        found = await (await open_store(location.scheme, TransferConfig())).list(location)
        return {info.location.key.rpartition("/")[2]: info.size for info in found}

    return anyio.run(listing)


def uploaded(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(size for name, size in after.items() if name not in before)


def restore(uri: str, workspace: Path) -> Path:
    with Checkpoint(workspace / "unused", src=uri, workspace=workspace) as cp:
        restored = cp.load_sync()
    assert restored == workspace
    return workspace


# -- format, save and full load ---------------------------------------------------------------------


def test_an_incremental_checkpoint_restores_the_tree_it_saved(store: StoreCase, tmp_path: Path) -> None:
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    restored = restore(store.uri("ckpt"), tmp_path / "restored")  # the loader is not told the format
    assert tree_state(restored) == tree_state(tree)
    names = store.list_names("")
    assert "ckpt" in names
    assert any(name.startswith(f"{AREA}/packs/") for name in names)


def test_a_file_shared_by_two_trees_is_stored_once(store: StoreCase, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_bytes(data)
    with Checkpoint(store.uri("a"), incremental=True) as cp:
        cp.save_sync(tmp_path / "a")
    first = pack_bytes(store)
    with Checkpoint(store.uri("b"), src=store.uri("a"), incremental=True) as cp:
        cp.save_sync(tmp_path / "b")
    assert uploaded(first, pack_bytes(store)) == 0
    assert (restore(store.uri("b"), tmp_path / "restored") / "weights.bin").read_bytes() == data


def test_either_format_replaces_the_other_at_one_key(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    for incremental in (False, True, False, True):
        (tree / "which").write_text(str(incremental))
        with Checkpoint(store.uri("ckpt"), incremental=incremental) as cp:
            cp.save_sync(tree)
        restored = restore(store.uri("ckpt"), tmp_path / f"restored-{incremental}-{len(os.listdir(tmp_path))}")
        assert snapshot(restored) == snapshot(tree)


def test_bytes_and_single_files_are_saved_as_usual_when_incremental(store: StoreCase, tmp_path: Path) -> None:
    (tmp_path / "one").write_bytes(b"a single file")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(b"some bytes")
        assert bytes(Checkpoint(store.uri("x"), src=store.uri("ckpt")).load_bytes_sync() or b"") == b"some bytes"
        cp.save_sync(tmp_path / "one")
        assert bytes(Checkpoint(store.uri("x"), src=store.uri("ckpt")).load_bytes_sync() or b"") == b"a single file"
    assert not any(name.startswith(AREA) for name in store.list_names(""))


def test_a_background_incremental_save_stores_the_tree_as_it_was(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    expected = snapshot(tree)
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        handle = cp.save_sync(tree, wait=False)
        (tree / "model" / "weights.bin").unlink()  # replaced after the call: the snapshot keeps it
        (tree / "model" / "weights.bin").write_bytes(b"new")
        cp.wait_sync()
        assert handle.done()
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "restored")) == expected


@SHARED_STORES
def test_the_command_line_saves_incrementally_and_loads_either_format(store: StoreCase, tmp_path: Path) -> None:
    tree = full_tree(tmp_path / "tree")
    ok("-q", "save", "--incremental", str(tree), store.uri("ckpt"))
    assert ok("verify", store.uri("ckpt")).startswith(f"ok {store.uri('ckpt')} (incremental, ")
    ok("-q", "load", store.uri("ckpt"), str(tmp_path / "out"))
    assert tree_state(tmp_path / "out") == tree_state(tree)
    # verify describes it as ls does: its kind, and the bytes it references, not its manifest's
    checked = json.loads(ok("verify", "--json", store.uri("ckpt")))
    listing = json.loads(ok("ls", "--json", store.uri("ckpt").rsplit("/", 1)[0] + "/"))
    listed = next(row for row in listing if row["uri"] == store.uri("ckpt"))
    assert checked == {name: value for name, value in listed.items() if name != "unread"}
    assert checked["kind"] == "incremental" and checked["size"] > checked["exclusive"] > 0


def test_ls_lines_up_its_columns_whatever_the_kinds(tmp_path: Path) -> None:
    tree = full_tree(tmp_path / "tree")
    ok("-q", "save", str(tree), str(tmp_path / "store" / "a"))
    ok("-q", "save", "--incremental", str(tree), str(tmp_path / "store" / "b"))
    lines = ok("ls", str(tmp_path / "store") + "/").splitlines()
    assert [line.split()[0] for line in lines] == ["dir", "incremental"]
    uris = [str(tmp_path / "store" / name) for name in ("a", "b")]
    assert [line.index(uri) for line, uri in zip(lines, uris, strict=True)] == [lines[1].index(uris[1])] * 2


def test_verify_passes_an_intact_checkpoint_whose_folder_cannot_be_described(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from checkpointio._cli import main

    uri = str(tmp_path / "store" / "ckpt")
    ok("-q", "save", "--incremental", str(full_tree(tmp_path / "tree")), uri)
    assert main(["verify", uri]) == 0
    assert capsys.readouterr().out.startswith(f"ok {uri} (incremental, ")

    async def store_gone(*args: object) -> object:  # the folder's other manifests, read to describe it
        raise StoreError("the store went away after the checkpoint was verified", uri=uri)

    monkeypatch.setattr(_incremental, "manifests_beside", store_gone)
    assert main(["verify", uri]) == 0
    assert capsys.readouterr().out.startswith(f"ok {uri} (dir, ")  # the plain row, as ls shows unread ones


def test_a_task_environment_saves_its_attempts_incrementally(tmp_path: Path) -> None:
    env = TaskEnvironment("inc", storage=str(tmp_path / "store"), incremental=True, keep_last=None)
    tree = full_tree(tmp_path / "tree")
    calls: list[int] = []

    @env.task(retries=1)
    def train() -> str:
        from checkpointio import ctx

        cp = ctx().checkpoint
        restored = cp.load_sync()
        calls.append(1)
        if restored is None:
            cp.save_sync(tree)
            raise RuntimeError("fails once")
        assert tree_state(restored) == tree_state(tree)
        cp.save_sync(restored)  # the restored tree again: every chunk is the first attempt's
        return "done"

    assert train() == "done"
    packs = list((tmp_path / "store").rglob(f"{AREA}/packs/*"))
    attempts = list((tmp_path / "store").rglob("attempt-[0-9]"))
    assert len(attempts) == 2
    assert len([pack for pack in packs if not pack.name.startswith(".")]) == 1  # the second attempt added none


# -- deduplication against parents ------------------------------------------------------------------


def test_an_unchanged_tree_uploads_no_pack(store: StoreCase, tmp_path: Path) -> None:
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
        first = pack_bytes(store)
        cp.save_sync(tree)
    assert uploaded(first, pack_bytes(store)) == 0


def test_saves_after_changes_restore_every_file_and_name_only_the_chunks_and_packs_they_use(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = full_tree(tmp_path / "tree")
    (tree / "model" / "z-last.bin").write_bytes(os.urandom(70_000))  # after a symlink, before the next folder
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
        cp.save_sync(tree)  # unchanged: every file taken from the parent, among folders and links
        assert tree_state(restore(store.uri("ckpt"), tmp_path / "unchanged")) == tree_state(tree)
        extra = os.urandom(300_000)
        (tree / "empty" / "extra.bin").write_bytes(extra)  # only this save's packs hold it
        cp.save_sync(tree)
        with_extra = anyio.run(_read, store.uri("ckpt"))
        (tree / "empty" / "extra.bin").unlink()
        (tree / "model" / "text.log").unlink()
        (tree / "private").write_text("changed")
        (tree / "model" / "layers" / "1.txt").write_text("added")
        cp.save_sync(tree)
    manifest = anyio.run(_read, store.uri("ckpt"))
    assert manifest is not None and with_extra is not None
    assert sorted(set(manifest.used)) == list(range(manifest.chunk_count))  # every row used, none twice
    assert sorted(set(manifest.chunk_pack)) == list(range(len(manifest.pack_names)))
    number = with_extra.paths.index("empty/extra.bin")
    extra_packs = {with_extra.pack_names[with_extra.chunk_pack[index]] for index in with_extra.chunks_of(number)}
    assert extra_packs and not extra_packs & set(manifest.packs)  # the packs only it used are no longer named
    assert tree_state(restore(store.uri("ckpt"), tmp_path / "restored")) == tree_state(tree)


def test_an_edit_in_place_and_an_append_upload_only_the_chunks_around_them(store: StoreCase, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    big = tree / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
        first = pack_bytes(store)
        assert sum(first.values()) >= 3 * 1024 * 1024
        with open(big, "r+b") as out:
            out.seek(1024 * 1024)
            out.write(os.urandom(4096))
        cp.save_sync(tree)
        second = pack_bytes(store)
        assert 4096 <= uploaded(first, second) <= 2 * _cdc.MAXIMUM + 4096
        with open(big, "ab") as out:
            out.write(os.urandom(100_000))
        cp.save_sync(tree)
        third = pack_bytes(store)
        assert 100_000 <= uploaded(second, third) <= _cdc.MAXIMUM + 100_000
    assert (restore(store.uri("ckpt"), tmp_path / "restored") / "big.bin").read_bytes() == big.read_bytes()


def test_a_save_deduplicates_against_the_checkpoint_it_restored(store: StoreCase, tmp_path: Path) -> None:
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(store.uri("attempt-0"), incremental=True) as cp:
        cp.save_sync(tree)
    first = pack_bytes(store)
    with Checkpoint(store.uri("attempt-1"), src=store.uri("attempt-0"), incremental=True) as cp:
        restored = cp.load_sync()
        assert restored is not None
        (restored / "new.txt").write_bytes(b"x" * 1000)
        cp.save_sync(restored)  # new inodes: every file read again, every chunk but one already stored
    assert 0 < uploaded(first, pack_bytes(store)) < 2000
    expected = tree_state(tree)
    got = tree_state(restore(store.uri("attempt-1"), tmp_path / "again"))
    assert got.pop("new.txt")[1] == b"x" * 1000
    assert got == expected


def test_the_python_chunker_cuts_where_pyfastcdc_does() -> None:
    pyfastcdc = pytest.importorskip("pyfastcdc")
    data = memoryview(random.Random(3).randbytes(3 * 1024 * 1024 + 123))
    chunker = pyfastcdc.FastCDC(_cdc.AVERAGE, min_size=_cdc.MINIMUM, max_size=_cdc.MAXIMUM)
    expected = [chunk.length for chunk in chunker.cut_buf(data)]
    lengths, rest = [], data
    while rest:
        lengths.append(_cdc._cut_python(rest[: _cdc.MAXIMUM]))
        rest = rest[lengths[-1] :]
    assert lengths == expected
    assert _cdc.cut_points(data, final=True) == expected


def test_cuts_do_not_depend_on_how_the_file_was_read() -> None:
    data = memoryview(random.Random(5).randbytes(2 * 1024 * 1024))
    whole = _cdc.cut_points(data, final=True)
    pieced: list[int] = []
    start = 0
    for end in (700_000, 1_400_000, len(data)):
        lengths = _cdc.cut_points(data[start:end], final=end == len(data))
        pieced += lengths
        start += sum(lengths)
    assert pieced == whole


# -- damage and hostile manifests -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "corrupted", "truncated"])
def test_a_damaged_pack_names_the_files_it_affects_and_nothing_is_restored(
    store: StoreCase, tmp_path: Path, damage: str
) -> None:
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    (pack,) = pack_bytes(store)
    name = f"{AREA}/packs/{pack}"
    if damage == "deleted":
        location = parse_location(store.uri(name))
        anyio.run(_delete, location)
    elif damage == "truncated":  # a restore reads packs without a HEAD: the failed read is explained
        store.put_raw(name, store.get_raw(name)[: pack_bytes(store)[pack] // 2])
    else:
        store.corrupt(name)
    workspace = tmp_path / "restored"
    with pytest.raises(CorruptCheckpointError) as caught:
        restore(store.uri("ckpt"), workspace)
    message = str(caught.value)
    assert pack in message and store.uri("ckpt") in message
    assert "affects" in message and ("model/weights.bin" in message or damage == "corrupted")
    assert ("the manifest records" in message) is (damage == "truncated")
    assert not workspace.exists() or list(workspace.iterdir()) == []
    with pytest.raises(CorruptCheckpointError, match=pack):
        anyio.run(_manage.verify, store.uri("ckpt"), TransferConfig())


async def _delete(location: object) -> None:
    assert isinstance(location, type(parse_location("memory://x")))
    await (await open_store(location.scheme, TransferConfig())).delete(location)


def _write_manifest(store: StoreCase, name: str, manifest: _incremental.Manifest) -> None:
    location = parse_location(store.uri(name))

    async def put() -> None:
        backend = await open_store(location.scheme, TransferConfig())
        await _engine.save_object(
            backend,
            location,
            _incremental.encode(manifest),
            Kind.DIRECTORY,
            TransferConfig(),
            layout=_incremental.LAYOUT,
        )

    anyio.run(put)


def _valid(store: StoreCase, tmp_path: Path) -> _incremental.Manifest:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(os.urandom(100_000))
    (tree / "b").write_bytes(os.urandom(100_000))
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    manifest = anyio.run(_read, store.uri("ckpt"))
    assert manifest is not None
    return manifest


async def _read(uri: str) -> _incremental.Manifest | None:
    location = parse_location(uri)
    return await _incremental.read_manifest(
        await open_store(location.scheme, TransferConfig()), location, TransferConfig()
    )


@pytest.mark.parametrize(
    "path",
    ["../escaped", "/etc/escaped", "a/../../escaped", "", "x\0y", "sub/./x"],
)
@ONE_STORE
def test_a_manifest_naming_a_path_out_of_the_workspace_is_refused(store: StoreCase, tmp_path: Path, path: str) -> None:
    manifest = _valid(store, tmp_path)
    entries = manifest.entries
    entries[0].path = path
    _write_manifest(store, "ckpt", _incremental.Manifest.of(manifest.packs, manifest.chunks, entries))
    with pytest.raises(UnsafeArchiveError):
        restore(store.uri("ckpt"), tmp_path / "restored")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "restored" / "escaped").exists()


@ONE_STORE
def test_a_manifest_with_a_symlink_out_or_through_another_is_refused(store: StoreCase, tmp_path: Path) -> None:
    manifest = _valid(store, tmp_path)
    for links in (
        [("out", "../outside")],
        [("up", "."), ("out", "up/..")],
    ):
        crafted = _incremental.Manifest.of(
            manifest.packs,
            manifest.chunks,
            manifest.entries + [_incremental.Entry(path, "l", 0o777, 0, link=target) for path, target in links],
        )
        _write_manifest(store, "ckpt", crafted)
        with pytest.raises(UnsafeArchiveError):
            restore(store.uri("ckpt"), tmp_path / "restored")


@ONE_STORE
def test_a_manifest_with_overlapping_ranges_or_impossible_counts_is_refused(store: StoreCase, tmp_path: Path) -> None:
    manifest = _valid(store, tmp_path)
    first, second = manifest.chunks[0], manifest.chunks[1]
    overlapping = _incremental.Chunk(
        second.hash, second.pack, first.offset + 1, second.stored, second.size, second.codec
    )
    crafted = [
        _incremental.Manifest.of(manifest.packs, [first, overlapping, *manifest.chunks[2:]], manifest.entries),
        _incremental.Manifest.of({name: 10 for name in manifest.packs}, manifest.chunks, manifest.entries),
    ]
    for bad in crafted:
        _write_manifest(store, "ckpt", bad)
        with pytest.raises(CorruptCheckpointError, match=r"overlapping|outside its pack"):
            restore(store.uri("ckpt"), tmp_path / "restored")
    # a header stating a billion entries is refused before anything is held for them
    good = _incremental.encode(manifest)
    header_end = good.index(b"\n") + 1
    body = zlib.decompress(good[header_end:])
    # the header: packs (u32), chunks (u64), entries (u64), ...
    raw = good[:header_end] + zlib.compress(body[:12] + (10**12).to_bytes(8, "little") + body[20:])
    location = parse_location(store.uri("ckpt"))

    async def put() -> None:
        backend = await open_store(location.scheme, TransferConfig())
        await _engine.save_object(backend, location, raw, Kind.DIRECTORY, TransferConfig(), layout=_incremental.LAYOUT)

    anyio.run(put)
    with pytest.raises(CorruptCheckpointError, match="beyond the limits"):
        restore(store.uri("ckpt"), tmp_path / "restored")
    shutil.rmtree(tmp_path / "restored", ignore_errors=True)


def _small_files(root: Path, count: int, size: int = 4000) -> Path:
    """``count`` small files of text from one vocabulary (alike, as a tree's configs and logs are),
    each different."""
    rng = random.Random(11)
    words = [bytes(rng.randrange(97, 123) for _ in range(rng.randrange(3, 9))) for _ in range(300)]
    (root / "small").mkdir(parents=True)
    for number in range(count):
        text = b" ".join(rng.choice(words) for _ in range(size // 6))[:size]
        (root / "small" / f"{number:04d}.txt").write_bytes(b"file %d\n" % number + text)
    return root


def test_small_files_are_deflated_together_and_restored_as_they_were(store: StoreCase, tmp_path: Path) -> None:
    """Small files share pack blocks, each deflated as one stream: the packs hold less than the
    files deflated one by one would, and every file comes back."""
    tree = _small_files(tmp_path / "tree", 300)
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    files = sorted((tree / "small").iterdir())
    one_by_one = sum(len(zlib.compress(path.read_bytes(), 1)) for path in files)
    assert sum(pack_bytes(store).values()) < one_by_one * 0.7
    manifest = anyio.run(_read, store.uri("ckpt"))
    assert manifest is not None
    assert len(manifest.blocks()) < manifest.chunk_count // 10  # 300 chunks, 1.2 MB: a few blocks
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "restored")) == snapshot(tree)
    workspace = tmp_path / "partial"  # one small file out of a shared block
    with Checkpoint(tmp_path / "unused", src=store.uri("ckpt"), workspace=workspace) as cp:
        assert cp.load_sync(only=["small/0123.txt"]) == workspace
    assert (workspace / "small/0123.txt").read_bytes() == (tree / "small/0123.txt").read_bytes()
    assert [path.name for path in (workspace / "small").iterdir()] == ["0123.txt"]


def test_a_corrupt_block_names_only_files_of_that_block_and_the_others_still_restore(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = _small_files(tmp_path / "tree", 300)
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    manifest = anyio.run(_read, store.uri("ckpt"))
    assert manifest is not None
    ((pack, size),) = pack_bytes(store).items()
    store.corrupt(f"{AREA}/packs/{pack}")  # 16 bytes at the middle of the pack
    middle = size // 2
    hit = {
        offset
        for offset, stored in zip(manifest.offsets, manifest.stored, strict=True)
        if offset < middle + 16 and middle < offset + stored
    }
    in_hit = {
        path
        for number, path in enumerate(manifest.paths)
        if manifest.kinds[number] == ord("f") and manifest.offsets[manifest.chunks_of(number)[0]] in hit
    }
    assert 0 < len(in_hit) < 300
    with pytest.raises(CorruptCheckpointError, match=pack) as caught:
        anyio.run(_manage.verify, store.uri("ckpt"), TransferConfig())
    message = str(caught.value)
    named = set(re.findall(r"small/\d{4}\.txt", message))
    count = int(re.search(r"affects (\d+) file", message).group(1))  # type: ignore[union-attr]
    assert named and named <= in_hit and 0 < count <= len(in_hit)
    intact = next(path for path in sorted(manifest.paths) if path.startswith("small/") and path not in in_hit)
    workspace = tmp_path / "partial"
    with Checkpoint(tmp_path / "unused", src=store.uri("ckpt"), workspace=workspace) as cp:
        assert cp.load_sync(only=[intact]) == workspace
    assert (workspace / intact).read_bytes() == (tree / intact).read_bytes()


@ONE_STORE
def test_a_manifest_stating_impossible_blocks_is_refused(store: StoreCase, tmp_path: Path) -> None:
    """Chunks sharing a block: out of it, overlapping in it, or one block stated two ways."""
    tree = _small_files(tmp_path / "tree", 5)
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    manifest = anyio.run(_read, store.uri("ckpt"))
    assert manifest is not None
    chunks = manifest.chunks
    assert len({(chunk.offset, chunk.stored) for chunk in chunks}) == 1 and len(chunks) == 5  # one block
    assert chunks[0].codec == 1  # deflated
    first, second, *rest = chunks
    assert first.within + first.size <= first.stored  # stored, it would still be in its block

    def with_second(**changes: int) -> _incremental.Manifest:
        changed = dataclasses.replace(second, **changes)  # type: ignore[arg-type]
        return _incremental.Manifest.of(manifest.packs, [first, changed, *rest], manifest.entries)

    stored_block = [dataclasses.replace(chunk, codec=0) for chunk in chunks]
    refused = {
        "overlapping": [
            with_second(within=first.within + 1),  # inside the block, over the first chunk
            with_second(stored=second.stored - 1),  # one block, two lengths
            _incremental.Manifest.of(  # one block, two codecs
                manifest.packs, [dataclasses.replace(first, codec=0), second, *rest], manifest.entries
            ),
            with_second(offset=second.offset - 1),  # another block, over this one
        ],
        "outside its pack or block": [
            with_second(within=_incremental.MAX_BLOCK_BYTES - second.size + 1),  # beyond what a block holds
            _incremental.Manifest.of(manifest.packs, stored_block, manifest.entries),  # beyond a stored block
        ],
        "offsets in blocks holds a value out of range": [with_second(within=2**31)],
    }
    for match, crafted in refused.items():
        for bad in crafted:
            _write_manifest(store, "ckpt", bad)
            with pytest.raises(CorruptCheckpointError, match=match):
                restore(store.uri("ckpt"), tmp_path / "restored")
            with pytest.raises(CorruptCheckpointError, match=match):
                anyio.run(_manage.verify, store.uri("ckpt"), TransferConfig())
    # a chunk placed past what its block inflates to (within the limit): found when read, named
    _write_manifest(store, "ckpt", with_second(within=_incremental.MAX_BLOCK_BYTES - second.size))
    with pytest.raises(
        CorruptCheckpointError, match=r": a chunk lies beyond what its block holds; it affects 1 file: small/0001.txt$"
    ):
        restore(store.uri("ckpt"), tmp_path / "restored")
    assert not (tmp_path / "restored").exists() or list((tmp_path / "restored").iterdir()) == []
    shutil.rmtree(tmp_path / "restored", ignore_errors=True)


def _write_raw(store: StoreCase, name: str, raw: bytes) -> None:
    location = parse_location(store.uri(name))

    async def put() -> None:
        backend = await open_store(location.scheme, TransferConfig())
        await _engine.save_object(backend, location, raw, Kind.DIRECTORY, TransferConfig(), layout=_incremental.LAYOUT)

    anyio.run(put)


@ONE_STORE
def test_a_manifest_announcing_more_than_it_holds_is_refused_before_reading_it(
    store: StoreCase, tmp_path: Path
) -> None:
    manifest = _valid(store, tmp_path)
    good = _incremental.encode(manifest)
    header_end = good.index(b"\n") + 1
    body = zlib.decompress(good[header_end:])
    packs, chunks, entries = len(manifest.packs), manifest.chunk_count, manifest.entry_count
    assert manifest.paths == ["a", "b"] and chunks >= 2
    # where the columns are (see docs/incremental.md, "The manifest format")
    entries_at = 30 + len(manifest.save_id) + 24 * packs + 41 * chunks
    counts_at = entries_at + 27 * entries
    path_lengths_at = counts_at + 4 * entries
    cases = {
        "truncated": body[:-3],
        "holds more than its header states": body + b"\0",
        "more chunks than its size allows": body[:counts_at] + (10**9).to_bytes(4, "little") + body[counts_at + 4 :],
        "truncated ": body[:path_lengths_at] + (2**32 - 1).to_bytes(4, "little") + body[path_lengths_at + 4 :],
        "chunk indices holds a value out of range": body[:-4] + (2**32 - 1).to_bytes(4, "little"),
        "unknown type": body[:entries_at] + b"x" + body[entries_at + 1 :],
    }
    for match, crafted in cases.items():
        _write_raw(store, "ckpt", good[:header_end] + zlib.compress(crafted))
        with pytest.raises(CorruptCheckpointError, match=match.strip()):
            restore(store.uri("ckpt"), tmp_path / "restored")
        assert not (tmp_path / "restored").exists() or not any((tmp_path / "restored").iterdir())
    _write_raw(store, "ckpt", good)
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "restored")) == snapshot(tmp_path / "tree")


def test_a_save_with_two_parents_sharing_chunks_restores_whole(tmp_path: Path) -> None:
    """The key's previous checkpoint and the one restored both reference the same chunks: the new
    manifest names each chunk once (two rows at one place would be refused as overlapping)."""
    store = tmp_path / "store"
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(str(store / "first"), incremental=True) as cp:
        cp.save_sync(tree)
    with Checkpoint(str(store / "second"), incremental=True) as cp:
        cp.save_sync(tree)
    with Checkpoint(str(store / "second"), src=str(store / "first"), incremental=True) as cp:
        restored = cp.load_sync()
        assert restored is not None
        (restored / "new.txt").write_bytes(b"y" * 5000)
        cp.save_sync(restored)
    manifest = anyio.run(_read, str(store / "second"))
    assert manifest is not None
    places = list(zip(manifest.chunk_pack, manifest.offsets, manifest.within, strict=True))
    assert len(places) == len(set(places))
    got = tree_state(restore(str(store / "second"), tmp_path / "again"))
    assert got.pop("new.txt")[1] == b"y" * 5000
    assert got == tree_state(tree)


# -- gc, retention, ls, rm --------------------------------------------------------------------------


def _random_tree(root: Path, seed: int, files: int = 4, size: int = 200_000) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for number in range(files):
        (root / f"f{number}.bin").write_bytes(rng.randbytes(size))
    return root


def _ls_json(prefix: str) -> list[dict[str, object]]:
    import json

    rows: list[dict[str, object]] = json.loads(ok("ls", "--json", prefix))
    return rows


def _gc(prefix: str, *args: str) -> dict[str, Any]:
    import json

    result: dict[str, Any] = json.loads(ok("gc", "--json", prefix, *args))
    return result


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_restored_modes_and_times_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    # Files of one chunk are created with their mode, fchmod-ed only where the umask takes bits
    # away; files of several chunks get theirs once whole. Either way, as a tar.gz restore gives.
    tree = make_tree(tmp_path / "tree")
    modes = [("g-exec", 0o750), ("world", 0o664), ("plain", 0o644), ("odd", 0o4711), ("read-only", 0o444)]
    for name, mode in modes:
        for size in (100, 600_000):  # one chunk; several
            path = tree / f"{name}-{size}"
            path.write_bytes(os.urandom(size))
            path.chmod(mode)
    expected = snapshot(tree)
    for size in (100, 600_000):
        # group and others never write, no set-id bits, the owner always reads and writes
        for name, mode in (("world", 0o644), ("odd", 0o711), ("read-only", 0o644)):
            kind, data, _, mtime = expected[f"{name}-{size}"]
            expected[f"{name}-{size}"] = (kind, data, mode, mtime)
    with Checkpoint(str(tmp_path / "store" / "ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    previous = os.umask(umask)
    try:
        restored = restore(str(tmp_path / "store" / "ckpt"), tmp_path / "restored")
    finally:
        os.umask(previous)
    assert snapshot(restored) == expected


@SHARED_STORES
def test_gc_removes_the_packs_no_manifest_references_once_older_than_the_grace(
    store: StoreCase, tmp_path: Path
) -> None:
    shared = os.urandom(300_000)
    for name, seed in (("a", 1), ("b", 2)):
        tree = _random_tree(tmp_path / name, seed)
        (tree / "shared.bin").write_bytes(shared)
        with Checkpoint(store.uri(name), incremental=True, part_size=5 * 1024 * 1024) as cp:
            cp.save_sync(tree)
    rows = {row["uri"]: row for row in _ls_json(store.uri(""))}
    assert set(rows) == {store.uri("a"), store.uri("b")}  # no pack or lease listed as a checkpoint
    a = rows[store.uri("a")]
    assert a["kind"] == "incremental"
    assert isinstance(a["size"], int) and isinstance(a["exclusive"], int)
    assert 800_000 <= a["exclusive"] < a["size"]  # its own files alone; the shared one is b's too
    before = pack_bytes(store)
    ok("-q", "rm", store.uri("a"))
    assert pack_bytes(store) == before  # rm removes the manifest; the packs wait for gc
    young = _gc(store.uri(""), "--older-than", "1h")
    assert pack_bytes(store) == before and young["incremental_packs"]
    result = _gc(store.uri(""), "--older-than", "0")
    after = pack_bytes(store)
    freed = sum(before.values()) - sum(after.values())
    (area,) = result["incremental_packs"]
    assert area["size"] == freed and freed >= a["exclusive"]
    b_tree = tmp_path / "b"
    assert tree_state_plain(restore(store.uri("b"), tmp_path / "restored")) == tree_state_plain(b_tree)


@SHARED_STORES
def test_ls_counts_as_only_a_checkpoints_the_packs_no_other_uses_which_is_what_rm_and_gc_free(
    store: StoreCase, tmp_path: Path
) -> None:
    # b is saved from a with one file replaced: every pack of a still holds blocks b uses, so
    # removing a frees nothing (gc deletes whole packs); b alone holds the pack of its new file.
    def pair(folder: str) -> tuple[dict[str, object], dict[str, object], int]:
        tree = _random_tree(tmp_path / folder, 3)
        with Checkpoint(store.uri(f"{folder}/a"), incremental=True) as cp:
            cp.save_sync(tree)
        (tree / "f0.bin").write_bytes(os.urandom(200_000))
        with Checkpoint(store.uri(f"{folder}/b"), src=store.uri(f"{folder}/a"), incremental=True) as cp:
            cp.save_sync(tree)
        rows = {row["uri"]: row for row in _ls_json(store.uri(f"{folder}/"))}
        packs = sum(pack_bytes(store, f"{folder}/").values())
        return rows[store.uri(f"{folder}/a")], rows[store.uri(f"{folder}/b")], packs

    a, b, before = pair("one")
    assert isinstance(a["size"], int) and isinstance(b["size"], int) and isinstance(b["exclusive"], int)
    assert a["exclusive"] == 0 < a["size"]
    assert 200_000 <= b["exclusive"] < b["size"]  # the new file's block, stored (random: not deflated)
    ok("-q", "rm", store.uri("one/a"))
    _gc(store.uri("one/"), "--older-than", "0")
    assert sum(pack_bytes(store, "one/").values()) == before > 0  # as ls said: a held nothing on its own

    _, b, before = pair("two")
    assert isinstance(b["exclusive"], int)
    ok("-q", "rm", store.uri("two/b"))
    _gc(store.uri("two/"), "--older-than", "0")
    freed = before - sum(pack_bytes(store, "two/").values())
    assert b["exclusive"] <= freed < b["exclusive"] + 1024  # its pack: the blocks and the pack's first line


def tree_state_plain(root: Path) -> dict[str, tuple[str, object, int, int]]:
    return snapshot(root)


@SHARED_STORES
def test_gc_removes_nothing_while_a_save_holds_a_lease_and_takes_dead_saves_leases(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = _random_tree(tmp_path / "tree", 3)
    with Checkpoint(store.uri("a"), incremental=True) as cp:
        cp.save_sync(tree)
    ok("-q", "rm", store.uri("a"))
    before = pack_bytes(store)
    lease = parse_location(store.uri(f"{AREA}/leases/0000000000000001-deadbeef"))

    async def put_lease() -> None:  # what a save in progress (or one killed) leaves beside the packs
        backend = await open_store(lease.scheme, TransferConfig())
        await _engine.save_object(backend, lease, b"{}", Kind.BYTES, TransferConfig())

    anyio.run(put_lease)
    result = _gc(store.uri(""), "--older-than", "0")
    (area,) = result["incremental_packs"]
    assert area["skipped"] and area["removed"] == []
    assert pack_bytes(store) == before

    async def collect_with_short_leases() -> list[_incremental.AreaReport]:
        await anyio.sleep(0.05)
        return await _manage.collect_incremental(store.uri(""), TransferConfig(), older_than=0, lease_ttl=0.01)

    (report,) = anyio.run(collect_with_short_leases)
    assert report.stale_leases == 1 and report.freed == sum(before.values())
    assert pack_bytes(store) == {}
    assert not any("leases/" in name for name in store.list_names(""))


def test_retention_and_gc_free_the_space_of_deleted_attempts(tmp_path: Path) -> None:
    env = TaskEnvironment("inc", storage=str(tmp_path / "store"), incremental=True, keep_last=1)
    work = tmp_path / "work"

    @env.task(retries=3)
    def train() -> str:
        from checkpointio import ctx

        cp = ctx().checkpoint
        cp.load_sync()
        attempt = len(list(tmp_path.glob("attempt-marker-*")))
        (tmp_path / f"attempt-marker-{attempt}").touch()
        shutil.rmtree(work, ignore_errors=True)
        _random_tree(work, 100 + attempt, files=3, size=300_000)  # all new data each attempt
        cp.save_sync(work)
        if attempt < 2:
            raise RuntimeError("fails")
        return "done"

    def stored_bytes() -> int:
        return sum(path.stat().st_size for path in (tmp_path / "store").rglob("*") if path.is_file())

    assert train() == "done"
    attempts = sorted(path.name for path in (tmp_path / "store").rglob("attempt-[0-9]"))
    assert attempts == ["attempt-2"]
    held = stored_bytes()
    assert held >= 3 * 900_000  # the deleted attempts' packs are younger than the grace period
    ok("-q", "gc", str(tmp_path / "store"), "--older-than", "0")
    left = stored_bytes()
    assert held - left >= 2 * 900_000
    assert 900_000 <= left < 900_000 + 200_000  # the last attempt's packs, manifest and records
    restored = restore(str(next((tmp_path / "store").rglob("attempt-2"))), tmp_path / "restored")
    assert snapshot(restored) == snapshot(work)


def test_pruning_old_runs_removes_their_packs_too(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = TaskEnvironment("inc", storage=str(store), incremental=True, keep_last=None)

    @env.task(retries=1)
    def train() -> None:
        from checkpointio import ctx

        ctx().checkpoint.save_sync(_random_tree(tmp_path / f"tree-{os.urandom(4).hex()}", 9))

    train()
    assert list(store.rglob(f"{AREA}/packs/*"))
    ok("-q", "gc", str(store), "--older-than", "1d", "--runs-older-than", "0")
    assert not [path for path in store.rglob("*") if path.is_file()]


# -- processes killed, gc racing saves --------------------------------------------------------------

_SAVER = """
import sys
from checkpointio import Checkpoint
Checkpoint(sys.argv[1], incremental=True, chunk_size=256 * 1024).save_sync(sys.argv[2])
"""

#: gc with leases taken for dead after 0 s: run only once the savers it follows are dead.
_COLLECTOR = """
import sys
import anyio
from checkpointio import _manage
from checkpointio._config import TransferConfig
from checkpointio._exceptions import StoreError

async def main() -> None:
    await _manage.collect_incremental(sys.argv[1], TransferConfig(), older_than=0, lease_ttl=0)

anyio.run(main)
"""


def _referenced_and_present(folder_uri: str) -> tuple[set[str], set[str]]:
    """The packs the manifests of the folder reference, and the packs present."""
    area = parse_prefix(folder_uri + AREA + "/")

    async def look() -> tuple[set[str], set[str]]:
        store = await open_store(area.scheme, TransferConfig())
        manifests = await _incremental.manifests_beside(store, area, TransferConfig())
        listed = await store.list(parse_prefix(area.uri + "packs/"))
        return (
            {name for manifest in manifests.values() for name in manifest.packs},
            {info.location.key.rpartition("/")[2] for info in listed},
        )

    return anyio.run(look)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_at_random_points_of_incremental_saves_and_of_gc_leaves_old_or_new_and_no_pack_missing(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import subprocess
    import sys
    import time

    if backend == "s3":
        server = request.getfixturevalue("moto_server")
        bucket = server.new_bucket()
        folder = f"s3://{bucket}/run/"
    else:
        folder = str(tmp_path / "store") + "/"
    uri = folder + "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    versions = []
    for name in ("old", "new"):
        tree = make_tree(tmp_path / name)
        (tree / "version").write_text(name)
        (tree / "bulk.bin").write_bytes(random.Random(name).randbytes(6 * 1024 * 1024))
        versions.append(tree)
    expected = {name: snapshot(tree) for name, tree in zip(("old", "new"), versions, strict=True)}

    started = time.monotonic()
    subprocess.run([sys.executable, "-c", _SAVER, uri, str(versions[0])], env=env, check=True)
    duration = time.monotonic() - started
    saves, collections = RandomKills(4712, duration, 0.2, 0.95), RandomKills(4713, duration, 0.0, 0.5)
    outcomes: list[str] = []
    while len(outcomes) < 4 or ("old" not in outcomes and len(outcomes) < 10):
        saves.run([sys.executable, "-c", _SAVER, uri, str(versions[1])], env)
        collections.run([sys.executable, "-c", _COLLECTOR, folder], env)
        referenced, present = _referenced_and_present(folder)
        assert referenced <= present  # no manifest references a pack that is gone
        got = snapshot(restore(uri, tmp_path / f"restored-{len(outcomes)}"))
        assert got in expected.values()  # old or new, whole
        outcomes.append("new" if got == expected["new"] else "old")
        with Checkpoint(uri, incremental=True) as cp:
            cp.save_sync(versions[0])  # back to old
    assert "old" in outcomes
    # gc to its end: only what the checkpoint references is left
    subprocess.run([sys.executable, "-c", _COLLECTOR, folder], env=env, check=True)
    referenced, present = _referenced_and_present(folder)
    assert referenced == present
    assert snapshot(restore(uri, tmp_path / "final")) == expected["old"]
    if backend == "s3":  # a killed process cannot abort its upload: `gc` removes those
        client = server.client()
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


_RACING_SAVER = """
import random, shutil, sys, time
from pathlib import Path
from typing import Any
from checkpointio import Checkpoint
from checkpointio._cli import main

folder, name, seed, rounds, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
rng = random.Random(seed)
work.mkdir(parents=True)
for number in range(6):
    (work / f"f{number}").write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
previous = None
for step in range(rounds):
    for path in rng.sample(sorted(work.iterdir()), 2):  # edits, appends, deletions, new files
        action = rng.randrange(4)
        if action == 0:
            path.write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
        elif action == 1:
            with open(path, "ab") as out:
                out.write(rng.randbytes(50_000))
        elif action == 2:
            path.unlink()
        else:
            (work / f"n{step}-{rng.randrange(1000)}").write_bytes(rng.randbytes(100_000))
    key = f"{folder}{name}-{step}"
    with Checkpoint(key, src=previous, incremental=True) as cp:
        cp.save_sync(work)
    if previous is not None and rng.random() < 0.7:
        assert main(["-q", "rm", previous]) == 0  # its exclusive packs become garbage
    previous = key
    time.sleep(rng.uniform(0, 0.3))
"""

_RACING_COLLECTOR = """
import sys, time
import anyio
from checkpointio import StoreError, _incremental, _manage
from checkpointio._config import TransferConfig
from checkpointio._exceptions import StoreError
from checkpointio._location import Location, parse_prefix
from checkpointio._stores import open_store

folder, seconds = sys.argv[1], float(sys.argv[2])
area = parse_prefix(folder + _incremental.AREA + "/")

async def check() -> None:
    # with no gc running (this process is the only one), every manifest's packs must exist
    store = await open_store(area.scheme, TransferConfig())
    for key, manifest in (await _incremental.manifests_beside(store, area, TransferConfig())).items():
        for name in manifest.packs:
            if await store.head(_incremental.pack_location(area, name)) is None:
                if await store.head(Location(area.scheme, area.bucket, key)) is not None:
                    raise SystemExit(f"{key} references the missing pack {name}")

async def main() -> None:
    deadline = time.monotonic() + seconds
    removed = 0
    while time.monotonic() < deadline:
        try:
            reports = await _manage.collect_incremental(folder, TransferConfig(), older_than=0)
        except StoreError:  # the local store's listing can trip over a lease being written: next pass
            continue
        removed += sum(len(report.removed) for report in reports)
        await check()
    print(removed)

anyio.run(main)
"""


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_gc_racing_saves_in_other_processes_never_leaves_a_manifest_referencing_a_missing_pack(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import subprocess
    import sys

    if backend == "s3":
        server = request.getfixturevalue("moto_server")
        folder = f"s3://{server.new_bucket()}/run/"
    else:
        folder = str(tmp_path / "store") + "/"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    savers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACING_SAVER, folder, name, str(seed), "8", str(tmp_path / name)], env=env
        )
        for seed, name in enumerate(("a", "b"))
    ]
    collector = subprocess.Popen(
        [sys.executable, "-c", _RACING_COLLECTOR, folder, "1000"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        for saver in savers:
            assert saver.wait(timeout=170) == 0
        collecting = collector.poll() is None  # its checks all held so far
    finally:
        collector.terminate()
        errors = collector.communicate()[1]
    assert collecting, errors
    final = subprocess.run(
        [sys.executable, "-c", _RACING_COLLECTOR, folder, "0.1"], env=env, capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr
    referenced, present = _referenced_and_present(folder)
    assert referenced == present  # the property: every referenced pack exists; all garbage collected
    rows = _ls_json(folder)
    assert rows and all(row["kind"] == "incremental" for row in rows)
    for row in rows:
        assert cli("-q", "verify", str(row["uri"])).returncode == 0


@ONE_STORE
def test_unchanged_files_are_not_read_again(store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _random_tree(tmp_path / "tree", 11, files=5, size=50_000)
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
        (tree / "f2.bin").write_bytes(b"changed")
        opened: list[str] = []
        real_open = os.open

        def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if isinstance(path, str) and path.endswith(".bin") and not flags & (os.O_WRONLY | os.O_RDWR):
                opened.append(path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", recording_open)
        cp.save_sync(tree)
        monkeypatch.undo()
    assert opened == ["f2.bin"]  # same size, mtime and inode as in the manifest: taken from it unread
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "restored")) == snapshot(tree)


def test_files_whose_mode_type_or_neighbours_changed_since_the_parent_are_saved_as_they_are_now(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save tells the files unchanged since its parent a run of siblings at a time; whatever
    breaks a run (a file deleted or added between unchanged ones, a mode changed, a folder that is
    now a file and the reverse, a file that became a hard link) is saved as it is now."""
    tree = tmp_path / "tree"
    rng = random.Random(3)
    (tree / "d").mkdir(parents=True)
    for number in range(30):
        (tree / "d" / f"f{number:02d}.bin").write_bytes(rng.randbytes(rng.randrange(1, 40_000)))
    (tree / "was-a-folder").mkdir()
    (tree / "was-a-folder" / "inside.bin").write_bytes(b"inside")
    (tree / "was-a-file").write_bytes(b"a file")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
        first = anyio.run(_read, store.uri("ckpt"))
        (tree / "d" / "f03.bin").chmod(0o600)  # mode only: not read again, saved with its new mode
        (tree / "d" / "f07.bin").unlink()
        (tree / "d" / "f07a.bin").write_bytes(b"added between unchanged files")
        (tree / "d" / "f12.bin").write_bytes(rng.randbytes((tree / "d" / "f12.bin").stat().st_size))
        os.link(tree / "d" / "f20.bin", tree / "d" / "f20z-link.bin")  # f20 now has two links
        shutil.rmtree(tree / "was-a-folder")
        (tree / "was-a-folder").write_bytes(b"now a file")
        (tree / "was-a-file").unlink()
        (tree / "was-a-file").mkdir()
        (tree / "was-a-file" / "inside.bin").write_bytes(b"inside the new folder")
        opened: list[str] = []
        real_open = os.open

        def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if isinstance(path, str) and not flags & (os.O_WRONLY | os.O_RDWR | os.O_DIRECTORY):
                opened.append(path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", recording_open)
        cp.save_sync(tree)
        monkeypatch.undo()
    second = anyio.run(_read, store.uri("ckpt"))
    assert first is not None and second is not None
    # unchanged files (f20 and its new link: same inode, mtime and size) are taken from the parent unread
    assert sorted(name for name in opened if not name.startswith(".")) == [
        "f07a.bin",
        "f12.bin",
        "inside.bin",
        "was-a-folder",
    ]
    number = second.paths.index("d/f03.bin")
    assert second.modes[number] == 0o600
    before = first.paths.index("d/f03.bin")
    assert [second.chunk(index).hash for index in second.chunks_of(number)] == [
        first.chunk(index).hash for index in first.chunks_of(before)
    ]
    assert chr(second.kinds[second.paths.index("d/f20z-link.bin")]) == "h"
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "restored")) == snapshot(tree)


def test_a_partial_restore_fetches_only_the_chunks_of_the_files_it_picks(store: StoreCase, tmp_path: Path) -> None:
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    pack = next(iter(pack_bytes(store)))
    workspace = tmp_path / "partial"
    with Checkpoint(tmp_path / "unused", src=store.uri("ckpt"), workspace=workspace) as cp:
        assert cp.load_sync(only=["model/layers/*", "run.sh"]) == workspace  # run.sh: the second link
    got = sorted(str(path.relative_to(workspace)) for path in workspace.rglob("*"))
    # the picked files, the folders holding them and the file the picked hard link is to
    assert got == ["model", "model/layers", "model/layers/0.txt", "run-again.sh", "run.sh"]
    assert (workspace / "model/layers/0.txt").read_bytes() == (tree / "model/layers/0.txt").read_bytes()
    assert (workspace / "run.sh").stat().st_ino == (workspace / "run-again.sh").stat().st_ino
    listed: list[object] = []
    assert anyio.run(_manage.list_contents, store.uri("ckpt"), TransferConfig(), listed.append) is True
    rows = {row.path: row for row in listed}  # type: ignore[attr-defined]
    assert set(rows) == {path.relative_to(tree).as_posix() for path in tree.rglob("*")}
    assert rows["model/weights.bin"].size == (tree / "model/weights.bin").stat().st_size  # type: ignore[attr-defined]
    store.corrupt(f"{AREA}/packs/{pack}")  # a partial restore checks what it fetches as a full one does
    with (
        pytest.raises(CorruptCheckpointError),
        Checkpoint(tmp_path / "unused", src=store.uri("ckpt"), workspace=tmp_path / "again") as cp,
    ):
        cp.load_sync(only=["model/weights.bin"])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=2 * n))))
def test_compacting_a_manifest_keeps_exactly_the_chunk_rows_and_packs_its_files_use(
    case: tuple[int, list[int]],
) -> None:
    from array import array

    from checkpointio._incremental._save import _compact

    count, used = case
    manifest = _incremental.Manifest()
    manifest.pack_names = ["p0", "p1", "p2"]
    manifest.packs = dict.fromkeys(manifest.pack_names, 1000)
    for row in range(count):
        manifest.hashes += bytes([row]) * 16
        manifest.chunk_pack.append(row % 3)
        manifest.offsets.append(row)
        manifest.stored.append(row + 1)
        manifest.sizes.append(row + 2)
        manifest.codecs.append(row % 2)
        manifest.within.append(row % 5)
    manifest.used = array("I", used)
    _compact(manifest)
    kept = sorted(set(used))
    assert manifest.chunk_count == len(kept)
    assert [manifest.chunk(row) for row in range(manifest.chunk_count)] == [
        _incremental.Chunk(bytes([row]) * 16, f"p{row % 3}", row, row + 1, row + 2, row % 2, row % 5) for row in kept
    ]
    assert [manifest.hashes[row * 16] for row in manifest.used] == used  # each file's chunks, in order
    assert sorted(manifest.packs) == sorted({f"p{row % 3}" for row in kept}) == sorted(manifest.pack_names)


def test_compacting_a_manifest_of_a_million_chunks_holds_little_beyond_its_columns() -> None:
    import tracemalloc
    from array import array

    from checkpointio._incremental._save import _compact

    count = 1_000_000
    manifest = _incremental.Manifest()
    manifest.pack_names, manifest.packs = ["p0"], {"p0": 10**12}
    manifest.hashes = bytearray(16 * count)
    manifest.chunk_pack = array("I", bytes(4 * count))
    manifest.offsets = array("Q", range(count))
    manifest.stored = array("I", [1]) * count
    manifest.sizes = array("I", [1]) * count
    manifest.codecs = bytearray(count)
    manifest.used = array("I", (row for row in range(count) if row % 100_000))  # 10 rows no file uses
    tracemalloc.start()
    try:
        _compact(manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest.chunk_count == count - 10 and manifest.offsets[:2].tolist() == [1, 2]
    columns = (
        len(manifest.hashes)
        + len(manifest.codecs)
        + sum(
            len(column) * column.itemsize
            for column in (manifest.chunk_pack, manifest.offsets, manifest.stored, manifest.sizes, manifest.used)
        )
    )
    # beyond the new columns (~41 MB, what compacting makes): a row number a chunk (4 MB) and one
    # column's copy in passing; a set of every row number held ~58 MB more
    assert peak - columns < 16 * 1024 * 1024


@pytest.mark.parametrize("level", [0, 1, 6])
def test_small_chunks_share_a_block_deflated_when_that_pays_and_known_ones_are_not_kept(level: int) -> None:
    from checkpointio._incremental import _chunks, _manifest

    text = b"the same few words, again and again; " * 300
    noise = random.Random(5).randbytes(9000)
    known = random.Random(6).randbytes(5000)
    tiny = b"ab"
    large = random.Random(7).randbytes(_cdc.MINIMUM + 1)
    pieces = [text, noise, known, tiny, large, text]
    placed, blocks = _chunks.encode_all(pieces, level, {}, {_chunks.hash_of(known): 0})
    assert [digest for digest, _, _ in placed] == [_chunks.hash_of(piece) for piece in pieces]
    # the small new pieces in one block, in order; the known one in none; the large one alone;
    # the repeated one where it is already
    small = len(text) + len(noise)
    assert [(block, within) for _, block, within in placed] == [
        (0, 0),
        (0, len(text)),
        (-1, 0),
        (0, small),
        (1, 0),
        (0, 0),
    ]
    assert len(blocks) == 2
    (grouped, grouped_codec), (alone, alone_codec) = blocks
    assert grouped_codec == (_manifest.DEFLATED if level else _manifest.STORED)
    assert (zlib.decompress(grouped, -15) if level else grouped) == text + noise + tiny
    assert (alone, alone_codec) == (large, _manifest.STORED)  # incompressible: stored
    # a reader inflates a block only as far as the chunks it wants
    assert bytes(_chunks.decode_block(grouped_codec, memoryview(grouped), len(text))) == text
    whole = small + len(tiny)
    assert bytes(_chunks.decode_block(grouped_codec, memoryview(grouped), whole + 100)) == text + noise + tiny
    with pytest.raises(ValueError, match="does not inflate"):
        _chunks.decode_block(_manifest.DEFLATED, memoryview(b"\xff" * 100), whole)


def test_small_chunks_beyond_a_block_start_another() -> None:
    from checkpointio._incremental import _chunks

    pieces = [random.Random(seed).randbytes(30_000) for seed in range(20)]  # 600,000 bytes
    placed, blocks = _chunks.encode_all(pieces, 1, {}, {})
    per_block = _chunks.BLOCK_BYTES // 30_000
    assert [(block, within) for _, block, within in placed] == [
        (number // per_block, number % per_block * 30_000) for number in range(20)
    ]
    assert [data for data, _ in blocks] == [
        b"".join(pieces[start : start + per_block]) for start in range(0, 20, per_block)
    ]


def test_the_lookups_a_save_builds_of_its_parent_hold_little_more_than_its_path_index() -> None:
    """A save of a tree of 1,000,000 files reads a parent of as many entries: what it builds to
    tell the unchanged files stays a path index and a few 8-byte columns (a tuple a file was
    ~280 bytes a file)."""
    import tracemalloc
    from array import array

    from checkpointio._incremental._save import _Parents

    count = 100_000
    manifest = _incremental.Manifest()
    paths = [f"layer-{number // 1000:03d}/shard-{number % 1000:04d}.bin" for number in range(count)]
    manifest.paths = paths
    manifest.kinds = bytearray(b"f" * count)
    manifest.modes = array("H", [0o644]) * count
    manifest.mtimes = array("q", range(1_700_000_000_000_000_000, 1_700_000_000_000_000_000 + count))
    manifest.file_sizes = array("Q", [200_000]) * count
    manifest.inodes = array("Q", range(10**6, 10**6 + count))
    tracemalloc.start()
    try:
        parents = _Parents([manifest])
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert parents.find(paths[12_345]) == 12_345 and parents.find("layer-000/absent") is None
    assert held < 130 * count  # the path index (~100 bytes a path) and four 8-byte columns


# -- saves in one process: the manifest written is the next save's parent --------------------------


def _collect_garbage(store: StoreCase) -> None:
    """Remove every pack no manifest of the store's folder references, however young."""
    anyio.run(lambda: _manage.collect_incremental(store.uri(""), TransferConfig(), older_than=0))


def _manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URIs whose manifests saves read from the store (as parents), in order, from now on."""
    reads: list[str] = []
    real = _incremental.read_manifest

    async def recording(store: Any, location: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(location.uri)
        return await real(store, location, *args, **kwargs)

    monkeypatch.setattr("checkpointio._incremental._save.read_manifest", recording)
    return reads


@pytest.mark.parametrize("src", [None, "ckpt"], ids=["no-src", "src-is-dest"])
def test_a_second_save_in_one_checkpoint_reuses_the_manifest_it_wrote_without_reading_it(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: str | None
) -> None:
    # src=dest (resume in place): dest is the one parent, whichever way it is named
    from checkpointio._incremental._save import _Lookups

    tree = full_tree(tmp_path / "tree")
    reads = _manifest_reads(monkeypatch)
    with Checkpoint(store.uri("ckpt"), src=src and store.uri(src), incremental=True) as cp:
        cp.save_sync(tree)
        assert reads == [store.uri("ckpt")]  # nothing there yet: looked for once
        kept = cp._written
        assert kept is not None
        stored = anyio.run(lambda: _read(store.uri("ckpt")))
        assert stored is not None
        # what is kept is what the store holds: the same bytes, the same lookups
        assert _incremental.encode(kept.manifest) == _incremental.encode(stored)
        rebuilt = _Lookups(stored)
        assert (kept.lookups.numbers, kept.lookups.missing) == (rebuilt.numbers, rebuilt.missing)
        assert [kept.lookups.mtimes, kept.lookups.sizes, kept.lookups.inodes, kept.lookups.modes] == [
            rebuilt.mtimes,
            rebuilt.sizes,
            rebuilt.inodes,
            rebuilt.modes,
        ]
        (tree / "model" / "layers" / "0.txt").write_text("layer zero, edited\n")
        (tree / "zero-bytes").unlink()
        (tree / "new.txt").write_text("new\n")
        before = pack_bytes(store)
        cp.save_sync(tree)
        assert reads == [store.uri("ckpt")]  # the second save read no manifest
        assert 0 < uploaded(before, pack_bytes(store)) < 4096  # and still deduplicated against it
    assert tree_state(restore(store.uri("ckpt"), tmp_path / "restored")) == tree_state(tree)


def test_a_save_reads_the_manifest_again_once_another_save_replaced_it(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process saved at the key since (and gc removed the packs only the first
    checkpoint used): the next save of this checkpoint must not take the manifest it kept."""
    mine = _random_tree(tmp_path / "mine", 1, files=6, size=100_000)
    theirs = _random_tree(tmp_path / "theirs", 2, files=3, size=100_000)
    reads = _manifest_reads(monkeypatch)
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(mine)
        with Checkpoint(store.uri("ckpt"), incremental=True) as other:
            other.save_sync(theirs)
        _collect_garbage(store)  # mine's packs: referenced by no manifest now
        (mine / "f0.bin").write_bytes(b"edited")
        del reads[:]
        cp.save_sync(mine)
        assert reads == [store.uri("ckpt")]
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "restored")) == snapshot(mine)


def test_a_save_after_one_that_failed_takes_nothing_from_the_failed_one(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that failed after uploading its packs left the previous checkpoint; gc removed
    those packs; the next save of the same checkpoint stores the tree whole."""
    tree = _random_tree(tmp_path / "tree", 3, files=4, size=100_000)
    kept = snapshot(tree)
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
        real = _engine.save_object

        async def failing(target: Any, location: Any, *args: Any, **kwargs: Any) -> Any:
            if location.uri == store.uri("ckpt"):
                raise StoreError(f"{location.uri}: refused", uri=location.uri)
            return await real(target, location, *args, **kwargs)

        for number in range(4):
            (tree / f"f{number}.bin").write_bytes(os.urandom(120_000))
        monkeypatch.setattr(_engine, "save_object", failing)
        with pytest.raises(StoreError, match="refused"):
            cp.save_sync(tree)
        monkeypatch.undo()
        assert snapshot(restore(store.uri("ckpt"), tmp_path / "previous")) == kept
        _collect_garbage(store)  # the failed save's packs
        cp.save_sync(tree)
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "restored")) == snapshot(tree)


def test_a_save_after_restoring_another_checkpoint_keeps_both_parents_right(store: StoreCase, tmp_path: Path) -> None:
    """This checkpoint saved (and kept its manifest), then restored another one into its
    workspace and saved that: each save stores the tree it was given."""
    other_tree = _random_tree(tmp_path / "other", 4, files=4, size=100_000)
    with Checkpoint(store.uri("other"), incremental=True) as other:
        other.save_sync(other_tree)
    mine = _random_tree(tmp_path / "mine", 5, files=4, size=100_000)
    with Checkpoint(store.uri("ckpt"), src=store.uri("other"), incremental=True) as cp:
        cp.save_sync(mine)
        restored = cp.load_sync()
        assert restored is not None and snapshot(restored) == snapshot(other_tree)
        (restored / "f1.bin").write_bytes(b"edited after the restore")
        cp.save_sync(restored)
        assert snapshot(restore(store.uri("ckpt"), tmp_path / "first")) == snapshot(restored)
        (restored / "f2.bin").unlink()
        cp.save_sync(restored)
        assert snapshot(restore(store.uri("ckpt"), tmp_path / "second")) == snapshot(restored)
        cp.save_sync(mine)
    assert snapshot(restore(store.uri("ckpt"), tmp_path / "third")) == snapshot(mine)


def test_the_per_entry_work_of_incremental_saves_and_loads_runs_off_the_event_loop(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work that grows with the number of entries or chunks (decoding and encoding manifests,
    building a parent's lookups and chunk index, copying its columns, compacting, comparing)
    runs in worker threads: on the event loop it blocks every other task for as long as it takes
    (~10 ms for 50,000 entries, ~200 ms for 1,000,000). Each such function records whether it
    ran on a thread with a running event loop."""
    import asyncio

    from checkpointio._incremental import _manifest, _restore, _save

    ran: dict[str, list[bool]] = {}

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def watch(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            ran.setdefault(name, []).append(on_loop())
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    for owner, name in (
        (_restore, "_spans"),
        (_restore, "_Writer"),
        (_restore, "_select"),
        (_restore, "_wanted"),
        (_incremental, "usage"),
        (_save, "_Lookups"),
        (_save, "_Parents"),
        (_save, "_Packer"),
        (_save, "_compact"),
        (_save, "encode"),
        (_manifest, "decode"),
        (_save._Packer, "_index_parents"),
        (_save._Packer, "_run"),
    ):
        watch(owner, name)
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
        (tree / "model" / "layers" / "0.txt").write_text("edited\n")
        cp.save_sync(tree)  # the kept manifest as its parent
    with Checkpoint(store.uri("next"), src=store.uri("ckpt"), incremental=True) as cp:
        restored = cp.load_sync()
        assert restored is not None
        (restored / "run.sh").write_text("#!/bin/sh\necho edited\n")
        cp.save_sync(restored)  # two parents read from the store
        assert tree_state(restore(store.uri("next"), tmp_path / "restored")) == tree_state(restored)
        expected = tree_state(restored)
    with Checkpoint(tmp_path / "unused", src=store.uri("next"), workspace=tmp_path / "part") as cp:
        assert cp.load_sync(only=["model/layers/*"]) is not None
    part = snapshot(tmp_path / "part")
    assert set(part) == {"model", "model/layers", "model/layers/0.txt"}
    assert part["model/layers/0.txt"] == expected["model/layers/0.txt"]

    async def listing_and_verifying() -> set[str]:
        config = TransferConfig()
        infos = await _manage.list_checkpoints(store.uri(""), config)
        await _manage.verify(store.uri("next"), config)
        return {found.manifest.location.uri for found in (await _manage.incremental_among(infos, config)).values()}

    assert anyio.run(listing_and_verifying) == {store.uri("ckpt"), store.uri("next")}
    assert set(ran) == {
        "_spans",
        "_Writer",
        "_select",
        "_wanted",
        "usage",
        "_Lookups",
        "_Parents",
        "_Packer",
        "_compact",
        "encode",
        "decode",
        "_index_parents",
        "_run",
    }  # each ran (the test would pass vacuously otherwise) ...
    assert {name: calls for name, calls in ran.items() if any(calls)} == {}  # ... never on an event loop


def test_a_background_save_tells_unchanged_files_a_run_at_a_time_as_a_foreground_one(
    store: StoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background save works from a snapshot whose files are hard links of the tree's (a link
    count of 2): its unchanged files are still told by the comparison of whole runs, not one at
    a time as hard links; only the changed file and the real hard links go one at a time."""
    from checkpointio._incremental import _save

    tree = _random_tree(tmp_path / "tree", 6, files=8, size=20_000)
    os.link(tree / "f0.bin", tree / "f0-again.bin")
    one_at_a_time: list[str] = []
    real = _save._Packer._entry

    def recording(self: Any, fd: int, rel: str, *args: Any) -> None:
        one_at_a_time.append(rel)
        real(self, fd, rel, *args)

    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree, wait=False)
        cp.wait_sync()
        (tree / "f5.bin").write_bytes(b"changed")
        monkeypatch.setattr(_save._Packer, "_entry", recording)
        cp.save_sync(tree, wait=False)
        cp.wait_sync()
        monkeypatch.undo()
    assert sorted(one_at_a_time) == ["f0-again.bin", "f0.bin", "f5.bin"]
    restored = restore(store.uri("ckpt"), tmp_path / "restored")
    assert tree_state_plain(restored) == tree_state_plain(tree)
    assert (restored / "f0.bin").stat().st_ino == (restored / "f0-again.bin").stat().st_ino


def test_a_background_save_keeps_hard_links_whose_names_the_caller_removed_after_the_call(
    store: StoreCase, tmp_path: Path
) -> None:
    """Once the caller's names of a hard-linked pair are gone, the snapshot's two names have the
    link count of a lone linked file: the pair is still stored as one file and a hard link, by a
    first save and by a save whose parent holds the pair (the same inode, time and size)."""
    tree = _random_tree(tmp_path / "tree", 7, files=3, size=20_000)
    expected = snapshot(tree)
    data, times = (tree / "f0.bin").read_bytes(), (tree / "f0.bin").stat()
    for key, parent in (("alone", False), ("again", True)):
        with Checkpoint(store.uri(key), incremental=True) as cp:
            os.link(tree / "f0.bin", tree / "f0-again.bin")
            if parent:
                cp.save_sync(tree)
            cp.save_sync(tree, wait=False)
            (tree / "f0.bin").unlink()  # the caller may change the tree right after the call
            (tree / "f0-again.bin").unlink()
            cp.wait_sync()
        (tree / "f0.bin").write_bytes(data)
        os.utime(tree / "f0.bin", ns=(times.st_atime_ns, times.st_mtime_ns))
        restored = restore(store.uri(key), tmp_path / f"restored-{key}")
        assert (restored / "f0.bin").stat().st_ino == (restored / "f0-again.bin").stat().st_ino
        assert (restored / "f0-again.bin").read_bytes() == data
        (restored / "f0-again.bin").unlink()
        assert snapshot(restored) == expected


@pytest.mark.parametrize(
    "names",
    [
        ["a", "a/b.txt", "a/c.txt"],
        ["a", "a/na\u00efve.txt", "a/\u65e5\u672c.bin", "a/z.txt"],
        ["a", os.fsdecode(b"a/caf\xe9"), "a/plain"],
        ["a", os.fsdecode(b"a/caf\xe9"), "a/\u65e5.txt"],
    ],
)
def test_a_manifest_keeps_every_path_through_encoding_and_decoding(names: list[str]) -> None:
    """Paths are encoded a block at a time (one join when each character is one byte): names of
    characters of several bytes and undecodable bytes come back as they were."""
    entries = [_incremental.Entry(names[0], "d", 0o755, 1)] + [
        _incremental.Entry(name, "f", 0o644, 2, 0, 7 + number) for number, name in enumerate(names[1:])
    ]
    manifest = _incremental.Manifest.of({}, [], entries, save_id="s", created=1.0)
    decoded = _incremental.decode(_incremental.encode(manifest), "memory://x/m")
    assert decoded.paths == names
    assert [entry.inode for entry in decoded.entries] == [entry.inode for entry in entries]


def test_a_manifest_that_lost_its_record_is_a_clear_error_not_a_file_restored(store: StoreCase, tmp_path: Path) -> None:
    tree = full_tree(tmp_path / "tree")
    with Checkpoint(store.uri("ckpt"), incremental=True) as cp:
        cp.save_sync(tree)
    store.put_raw("copy", store.get_raw("ckpt"))  # copied without its metadata or sidecar
    with Checkpoint(store.uri("next"), src=store.uri("copy")) as cp:
        with pytest.raises(CorruptCheckpointError, match="incremental checkpoint's manifest without the record"):
            cp.load_sync()
        with pytest.raises(CorruptCheckpointError, match="incremental checkpoint's manifest without the record"):
            cp.load_bytes_sync()
        assert not any(cp.path.iterdir())
