"""The table of contents of directory archives, partial restores (``only=``) and ``ls --contents``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from checkpointio import (
    Checkpoint,
    CheckpointError,
    CorruptCheckpointError,
    Entry,
    StoreError,
    UnsafeArchiveError,
    _codec,
    _engine,
    _incremental,
    _toc,
)
from checkpointio._archive import RUN_ENTRIES, pack_directory, unpack_directory
from checkpointio._cli import main
from checkpointio._config import TransferConfig
from checkpointio._location import Location, parse_location
from checkpointio._partial import fetch_table
from checkpointio._selection import Selection, roots
from checkpointio._stores import ObjectInfo, open_store

from .conftest import ONE_STORE, StoreCase, make_tree, pull_of, snapshot
from .counting import CountingStore

CONFIG = TransferConfig()
REPO = Path(__file__).resolve().parent.parent
#: The last commit whose archives carry no table of contents: its reader must restore ours.
BEFORE_TABLES = "2973467"


def packed(root: Path, *, block: int = 256 * 1024, workers: int = 2) -> bytes:
    chunks: list[bytes] = []
    pack_directory(root, chunks.append, block_size=block, level=1, workers=workers)
    return b"".join(chunks)


def table_of(data: bytes) -> list[_toc.TocEntry]:
    footer = _toc.parse_footer(data[-4096:], len(data), "test://archive")
    assert footer is not None
    return list(_toc.read_table(data[footer.offset : footer.offset + footer.length], footer, "test://archive"))


def mixed_tree(root: Path) -> Path:
    """make_tree plus a hard link, a file large enough for members of its own, a non-ASCII name."""
    make_tree(root)
    os.link(root / "run.sh", root / "model" / "run-again.sh")
    (root / "model" / "big.pt").write_bytes(os.urandom(700_000))
    (root / "naïve.json").write_text('{"a": 1}')
    return root


def small_files_tree(root: Path) -> Path:
    """A folder of many small files, as a save adds them in bulk, with everything that is not one
    of them in between: empty files, hard links, symlinks, a folder, a large file, names needing a
    pax header (long, not ASCII), more files than a run of the walk and more bytes than a batch."""
    files = root / "files"
    files.mkdir(parents=True)
    for number in range(RUN_ENTRIES + 80):
        size = (number * 7919) % 9000 if number % 13 else 0
        (files / f"f{number:05d}").write_bytes(bytes([number % 251]) * size)
    (files / ("long-" * 30 + "name")).write_bytes(b"a long name\n" * 50)
    (files / "naïve-ünïcode").write_bytes(b"not ascii")
    os.link(files / "f00001", files / "f00001-linked")
    os.link(files / "f00001", root / "linked-from-outside")
    (files / "f00500-big").write_bytes(os.urandom(300_000))
    (files / "f00600-sub").mkdir()
    (files / "f00600-sub" / "inner").write_bytes(b"inner")
    (files / "f00700-link").symlink_to("f00002")
    (files / "f00800").chmod(0o600)
    os.utime(files / "f00900", (1_500_000_000, 1_500_000_000))
    return root


TREES = {"mixed": mixed_tree, "small-files": small_files_tree}


# -- the format: still a plain .tar.gz -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("kind", TREES)
def test_an_archive_with_a_table_restores_exactly_with_gnu_tar_tarfile_and_the_previous_reader(
    tmp_path: Path, kind: str
) -> None:
    tree = TREES[kind](tmp_path / "tree")
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(packed(tree))
    assert table_of(archive.read_bytes())  # it has one
    expected = snapshot(tree)

    gnu = tmp_path / "gnu"
    gnu.mkdir()
    done = subprocess.run(["tar", "-xzf", str(archive), "-C", str(gnu)], capture_output=True)
    assert (done.returncode, done.stderr) == (0, b"")
    assert snapshot(gnu) == expected

    # tarfile by name and by file object, as the flyte tutorial opens it ("r:*") and as r:gz;
    # warnings are errors in this suite, so none is raised either.
    opened: list[tuple[Literal["r:gz", "r:*"], Literal["data", "fully_trusted"]]] = [
        ("r:gz", "data"),
        ("r:*", "data"),
        ("r:*", "fully_trusted"),
    ]
    for mode, extraction_filter in opened:
        out = tmp_path / f"py-{mode[-1]}-{extraction_filter}"
        with tarfile.open(archive, mode) as tar:
            tar.extractall(out, filter=extraction_filter)
        assert snapshot(out) == expected, mode
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes()), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == sorted(expected)

    ours = tmp_path / "ours"
    ours.mkdir()
    unpack_directory(pull_of([archive.read_bytes()]), ours, uri="test://a", workers=2)
    assert snapshot(ours) == expected


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs the git history")
@pytest.mark.parametrize("kind", TREES)
def test_the_reader_of_the_version_before_tables_restores_exactly_the_tree(tmp_path: Path, kind: str) -> None:
    old = tmp_path / "old"
    old.mkdir()
    exported = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_TABLES, "checkpointio"], capture_output=True)
    if exported.returncode:
        pytest.skip(f"commit {BEFORE_TABLES} is not in this checkout's history")
    with tarfile.open(fileobj=io.BytesIO(exported.stdout)) as tar:
        tar.extractall(old, filter="data")
    tree = TREES[kind](tmp_path / "tree")
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(packed(tree))
    script = (
        "import sys; from pathlib import Path; import checkpointio._archive as a; "
        "assert a.__file__.startswith(sys.argv[1]), a.__file__; data = Path(sys.argv[2]).read_bytes(); "
        "chunks = iter([data[i:i + 65536] for i in range(0, len(data), 65536)]); "
        "Path(sys.argv[3]).mkdir(); "
        "a.unpack_directory(lambda: [c] if (c := next(chunks, None)) is not None else [], Path(sys.argv[3]), "
        "uri='old', workers=2)"
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(old)}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, str(old), str(archive), str(out)],
        capture_output=True,
        env=env,
        cwd=tmp_path,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert snapshot(out) == snapshot(tree)


@pytest.mark.parametrize(
    ("kind", "block"), [("mixed", 256 * 1024), ("small-files", 256 * 1024), ("small-files", 16 * 1024)]
)
def test_the_table_lists_every_entry_where_its_header_is(tmp_path: Path, kind: str, block: int) -> None:
    tree = TREES[kind](tmp_path / "tree")
    data = packed(tree, block=block)
    entries = table_of(data)
    kinds = {entry.path: entry.kind for entry in entries}
    if kind == "mixed":
        assert kinds["model"] == "dir" and kinds["latest"] == "symlink" and kinds["model/big.pt"] == "file"
        assert {kinds["model/run-again.sh"], kinds["run.sh"]} == {"file", "hardlink"}
    else:
        assert kinds["files/f00600-sub"] == "dir" and kinds["files/f00700-link"] == "symlink"
        assert [kinds["files/f00001"], kinds["files/f00001-linked"], kinds["linked-from-outside"]] == [
            "file",
            "hardlink",
            "hardlink",
        ]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the table lists the archive's entries, in order
            assert [entry.path for entry in entries] == [member.name.rstrip("/") for member in tar.getmembers()]
    on_disk = {path.relative_to(tree).as_posix() for path in tree.rglob("*")}
    assert set(kinds) == on_disk
    for entry in entries:
        st = (tree / entry.path).lstat()
        assert (entry.mode, entry.mtime) == (st.st_mode & 0o7777, int(st.st_mtime))
        if entry.kind == "file":
            assert entry.size == st.st_size
        # the range holds whole members; the entry's header is at ``skip`` in their data
        members, position = [], entry.offset
        while position < entry.offset + entry.span:
            length = _codec.member_length(data[position : position + 32])
            assert length is not None
            members.append(_codec.inflate_member(data[position : position + length]))
            position += length
        assert position == entry.offset + entry.span
        inflated = b"".join(members)
        assert len(inflated) >= entry.skip + entry.length
        with tarfile.open(fileobj=io.BytesIO(inflated[entry.skip : entry.skip + entry.length])) as tar:
            (member,) = tar.getmembers()
            assert member.name.rstrip("/") == entry.path


def test_large_files_take_members_of_their_own(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for index in range(4):
        (tree / f"small-{index}").write_bytes(os.urandom(1000))
        (tree / f"layer-{index}.pt").write_bytes(os.urandom(300_000))
    entries = {entry.path: entry for entry in table_of(packed(tree, block=256 * 1024))}
    for index in range(4):
        layer = entries[f"layer-{index}.pt"]
        assert layer.skip == 0  # its header starts a member
        assert layer.span < 300_000 + 2 * 1024  # its members hold the file and little else


# -- selections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "selected"),
    [
        ("model/*.pt", "model/a.pt", True),
        ("model/*.pt", "model/sub/a.pt", False),  # * stays within one part
        ("*.json", "a/config.json", False),
        ("**/*.json", "config.json", True),  # ** matches no part too
        ("**/*.json", "a/b/config.json", True),
        ("model/**", "model/x/y", True),
        ("model/**", "model", True),  # a trailing ** matches no part too: the folder itself
        ("model/**/**", "model", True),
        ("model/**", "models", False),
        ("a/**/b", "a/b", True),
        ("model", "model/x/y", True),  # a folder selects what it holds
        ("mod", "model/x", False),
        ("l[0-2].pt", "l1.pt", True),
        ("l[!0-2].pt", "l3.pt", True),
        ("l[!0-2].pt", "l1.pt", False),
        ("l?.pt", "l12.pt", False),
        ("./config.json/", "config.json", True),
        ("Config.json", "config.json", False),
    ],
)
def test_glob_patterns_match_paths_part_by_part(pattern: str, path: str, selected: bool) -> None:
    assert Selection([pattern]).matches(path) is selected


@pytest.mark.parametrize("patterns", [[], [""], ["/etc/passwd"], ["../x"], ["a/../../x"], "model/*.pt"])
def test_patterns_outside_the_tree_or_none_are_refused(patterns: Any) -> None:
    with pytest.raises(ValueError, match="only="):
        Selection(patterns)


@pytest.mark.parametrize(
    ("patterns", "shown"),
    [([1], "int 1"), (["a.txt", None], "NoneType None"), ([Path("a.txt")], "PosixPath PosixPath('a.txt')")],
)
def test_patterns_that_are_not_str_are_a_type_error_naming_them(patterns: Any, shown: str) -> None:
    with pytest.raises(TypeError) as caught:
        Selection(patterns)
    assert str(caught.value) == f"only= patterns must be str globs such as 'model/*.pt', got {shown}"
    with pytest.raises(TypeError, match="only= takes a list of str glob patterns, got bytes"):
        Selection(b"model")  # type: ignore[arg-type]  # a wrong type on purpose


@ONE_STORE
def test_only_takes_any_iterable_of_patterns_once(store: StoreCase, tmp_path: Path) -> None:
    """A generator is read once: each source tried must see the same patterns."""
    tree = mixed_tree(tmp_path / "tree")
    Checkpoint(store.uri("ck")).save_sync(tree)
    with Checkpoint(store.uri("next"), src=[store.uri("missing"), store.uri("ck")]) as cp:
        root = cp.load_sync(only=(pattern for pattern in ["naïve.json"]))  # type: ignore[arg-type]  # not a Sequence
        assert root is not None
        assert sorted(path.name for path in root.iterdir()) == ["naïve.json"]
        assert (root / "naïve.json").read_bytes() == (tree / "naïve.json").read_bytes()


def test_roots_are_the_paths_no_other_one_holds() -> None:
    assert roots(["a", "a-b", "a/b", "a/b/c", "b/c", "b/d"]) == ["a", "a-b", "b/c", "b/d"]


# -- partial restores over every store -------------------------------------------------------------


def counted_store(case: StoreCase, name: str) -> tuple[CountingStore, Location]:
    location = parse_location(case.uri(name))
    return CountingStore(anyio.run(open_store, location.scheme, CONFIG)), location


def load_only(case: StoreCase, name: str, workspace: Path, patterns: list[str]) -> CountingStore:
    store, location = counted_store(case, name)
    restored = anyio.run(lambda: _engine.load(store, location, workspace, CONFIG, only=Selection(patterns)))
    assert restored == workspace
    return store


def picked(expected: dict[str, Any], *paths: str) -> dict[str, Any]:
    return {path: value for path, value in expected.items() if path in paths}


def test_only_restores_the_matching_entries_and_their_folders(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    expected = snapshot(tree)
    Checkpoint(store.uri("ck")).save_sync(tree)
    with Checkpoint(store.uri("next"), src=store.uri("ck")) as cp:
        root = cp.load_sync(only=["model/*.pt", "naïve.json", "empty", "latest"])
        assert root == cp.path
        got = snapshot(cp.path)
    wanted = ["model/big.pt", "naïve.json", "empty", "empty/deeper", "latest"]
    assert {k: v for k, v in got.items() if k != "model"} == picked(expected, *wanted)
    assert got["model"][0] == "dir"  # made to hold the file, not restored with the archive's mode


def test_only_through_the_async_api_and_twice_into_one_workspace(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    expected = snapshot(tree)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "mine.txt").write_text("the user's own file")

    async def run() -> None:
        await Checkpoint(store.uri("ck")).save(tree)
        cp = Checkpoint(store.uri("next"), src=store.uri("ck"), workspace=workspace)
        await cp.load(only=["model/layers/0.txt"])
        (workspace / "model" / "layers" / "0.txt").write_text("changed")
        await cp.load(only=["model/layers/*", "run.sh"])

    anyio.run(run)
    got = snapshot(workspace)
    assert got.pop("mine.txt")[1] == b"the user's own file"  # left alone
    assert picked(got, "model/layers/0.txt", "run.sh") == picked(expected, "model/layers/0.txt", "run.sh")


def test_a_selected_hard_link_brings_the_file_it_links_to(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    Checkpoint(store.uri("ck")).save_sync(tree)
    link = next(entry for entry in table_of(store.get_raw("ck")) if entry.kind == "hardlink")
    workspace = tmp_path / "ws"
    load_only(store, "ck", workspace, [link.path])
    assert (workspace / link.path).read_bytes() == (tree / link.path).read_bytes()
    assert (workspace / link.path).stat().st_ino == (workspace / link.link).stat().st_ino


def test_one_file_of_a_large_checkpoint_costs_three_requests_and_about_its_size(
    store: StoreCase, tmp_path: Path
) -> None:
    # The 1 GiB target in small: 1 MiB files of random data (stored, not deflated) in 1 MiB members.
    tree = tmp_path / "tree"
    (tree / "layers").mkdir(parents=True)
    for index in range(24):
        (tree / "layers" / f"{index:02d}.pt").write_bytes(os.urandom(1024 * 1024))
    (tree / "config.json").write_text("{}")
    Checkpoint(store.uri("ck")).save_sync(tree)
    size = len(store.get_raw("ck"))
    workspace = tmp_path / "ws"
    counted = load_only(store, "ck", workspace, ["layers/13.pt"])
    assert snapshot(workspace) == picked(snapshot(tree), "layers", "layers/13.pt") | {
        "layers": snapshot(workspace)["layers"]
    }
    assert counted.requests[0] == "head" and len(counted.requests) <= 4, counted.requests
    footer = _toc.parse_footer(store.get_raw("ck")[-4096:], size, "x")
    assert footer is not None
    assert counted.received <= 2 * 1024 * 1024 + footer.length, counted.requests


def test_an_archive_without_a_table_is_streamed_keeping_the_matches(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tree, arcname=".")
    store.put_raw("foreign.tar.gz", buffer.getvalue())
    workspace = tmp_path / "ws"
    counted = load_only(store, "foreign.tar.gz", workspace, ["model/layers", "run.sh"])
    assert counted.requests[0] == "head" and "get" in counted.requests
    got = snapshot(workspace)
    expected = snapshot(tree)
    assert picked(got, "model/layers", "model/layers/0.txt", "model/run-again.sh") == picked(
        expected, "model/layers", "model/layers/0.txt", "model/run-again.sh"
    )
    # the hard link's file came with it (tarfile stored model/run-again.sh first, the link run.sh second)
    assert set(got) - {"model"} == {"model/layers", "model/layers/0.txt", "model/run-again.sh", "run.sh"}


def linked_archive() -> bytes:
    """Another tool's archive (no table): three files, each with a hard link in a folder of its own
    after it, and a link to a link (``chain/c`` -> ``links/b0`` -> ``data/a0``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for index in range(3):
            info = tarfile.TarInfo(f"data/a{index}")
            payload = f"payload {index}".encode() * 1000
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for index in range(3):
            link = tarfile.TarInfo(f"links/b{index}")
            link.type, link.linkname = tarfile.LNKTYPE, f"data/a{index}"
            tar.addfile(link)
        chained = tarfile.TarInfo("chain/c")
        chained.type, chained.linkname = tarfile.LNKTYPE, "links/b0"
        tar.addfile(chained)
    return buffer.getvalue()


def test_hard_links_to_files_not_picked_cost_one_more_pass_at_most(store: StoreCase, tmp_path: Path) -> None:
    data = linked_archive()
    store.put_raw("links.tar.gz", data)
    workspace = tmp_path / "ws"
    counted = load_only(store, "links.tar.gz", workspace, ["links", "chain"])
    assert counted.requests.count("get") == 2, counted.requests  # one pass found what the links need
    assert counted.received == 3 * len(data)  # the suffix read for a table (here all of it), two passes
    got = {path.relative_to(workspace).as_posix() for path in workspace.rglob("*") if path.is_file()}
    assert got == {"data/a0", "data/a1", "data/a2", "links/b0", "links/b1", "links/b2", "chain/c"}
    assert (workspace / "chain" / "c").read_bytes() == b"payload 0" * 1000
    assert (workspace / "chain" / "c").stat().st_ino == (workspace / "data" / "a0").stat().st_ino
    # a link to a link not picked brings both
    alone = tmp_path / "alone"
    counted = load_only(store, "links.tar.gz", alone, ["chain"])
    assert counted.requests.count("get") == 2, counted.requests
    got = {path.relative_to(alone).as_posix() for path in alone.rglob("*") if path.is_file()}
    assert got == {"data/a0", "links/b0", "chain/c"}
    assert (alone / "chain" / "c").stat().st_ino == (alone / "data" / "a0").stat().st_ino


@ONE_STORE
def test_a_pattern_matching_nothing_fails_and_restores_nothing(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    Checkpoint(store.uri("ck")).save_sync(tree)
    with Checkpoint(store.uri("next"), src=store.uri("ck")) as cp:
        with pytest.raises(CheckpointError, match=r"no entry matches 'modle/\*'"):
            cp.load_sync(only=["model/big.pt", "modle/*"])
        assert list(cp.path.iterdir()) == []


@ONE_STORE
def test_only_on_a_bytes_checkpoint_is_refused(store: StoreCase, tmp_path: Path) -> None:
    Checkpoint(store.uri("ck")).save_sync(b"state")
    with (
        Checkpoint(store.uri("next"), src=store.uri("ck")) as cp,
        pytest.raises(CheckpointError, match="not a directory: only= picks entries"),
    ):
        cp.load_sync(only=["*"])


@ONE_STORE
def test_a_foreign_archive_entry_outside_the_workspace_is_refused(store: StoreCase, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("ok.txt", "../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
    store.put_raw("evil.tar.gz", buffer.getvalue())
    workspace = tmp_path / "deep" / "ws"
    with pytest.raises(UnsafeArchiveError, match="outside"):
        load_only(store, "evil.tar.gz", workspace, ["**"])
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert list(workspace.iterdir()) == []


# -- ls --contents ------------------------------------------------------------------------------


def listed(case: StoreCase, name: str) -> tuple[CountingStore, list[Entry], bool | None]:
    store, location = counted_store(case, name)
    rows: list[Entry] = []
    table = anyio.run(lambda: _engine.list_contents(store, location, CONFIG, rows.append))
    return store, rows, table


def test_listing_reads_the_table_in_two_requests(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    Checkpoint(store.uri("ck")).save_sync(tree)
    counted, rows, table = listed(store, "ck")
    assert table is True
    assert len(counted.requests) == 2, counted.requests  # HEAD and one suffix read
    by_path = {row.path: row for row in rows}
    assert set(by_path) == {path.relative_to(tree).as_posix() for path in tree.rglob("*")}
    st = (tree / "model" / "big.pt").stat()
    assert by_path["model/big.pt"][1:4] == ("file", st.st_size, int(st.st_mtime))


def test_a_table_larger_than_the_suffix_read_takes_one_more(tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    data = packed(tree)
    location = parse_location(f"memory://{tmp_path.name}/big-table")
    from checkpointio._stores import _memory

    _memory.write_raw(location, data)
    store = CountingStore(anyio.run(open_store, "memory", CONFIG))

    async def read() -> tuple[_toc.Footer, bytes] | None:
        info = await store.head(location)
        assert info is not None
        return await fetch_table(store, info, tail=_toc.FOOTER_SIZE + 10)

    found = anyio.run(read)
    assert found is not None
    footer, table = found
    assert len(store.requests) == 3
    assert [entry.path for entry in _toc.read_table(table, footer, "x")] == [entry.path for entry in table_of(data)]


@ONE_STORE
def test_listing_an_archive_without_a_table_streams_it(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tree, arcname=".")
    store.put_raw("foreign.tar.gz", buffer.getvalue())
    counted, rows, table = listed(store, "foreign.tar.gz")
    assert table is False and "get" in counted.requests
    assert {row.path for row in rows} == {path.relative_to(tree).as_posix() for path in tree.rglob("*")}


def test_contents_lists_every_format_through_the_api(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    expected = {path.relative_to(tree).as_posix(): path for path in tree.rglob("*")}
    Checkpoint(store.uri("plain")).save_sync(tree)
    Checkpoint(store.uri("incremental"), incremental=True).save_sync(tree)
    foreign = io.BytesIO()
    with tarfile.open(fileobj=foreign, mode="w:gz") as tar:
        tar.add(tree, arcname=".")
    store.put_raw("foreign.tar.gz", foreign.getvalue())
    for name in ("plain", "incremental", "foreign.tar.gz"):
        with Checkpoint(store.uri("next"), src=[store.uri("missing"), store.uri(name)]) as cp:
            entries = cp.contents_sync()
            assert entries is not None
            assert all(isinstance(entry, Entry) for entry in entries)
            by_path = {entry.path: entry for entry in entries}
            assert set(by_path) == set(expected), name
            big = expected["model/big.pt"].stat()
            assert by_path["model/big.pt"][:4] == ("model/big.pt", "file", big.st_size, int(big.st_mtime)), name
            assert by_path["model/big.pt"].mode == big.st_mode & 0o7777
            assert (by_path["latest"].kind, by_path["latest"].link) == ("symlink", "model/weights.bin"), name
            assert by_path["model"].kind == "dir" and by_path["model"].size == 0
            assert {by_path["run.sh"].kind, by_path["model/run-again.sh"].kind} == {"file", "hardlink"}, name
            assert list(cp.path.iterdir()) == []  # nothing restored

    async def listed_async() -> list[Entry] | None:
        async with Checkpoint(store.uri("next"), src=store.uri("plain")) as cp:
            return await cp.contents()

    assert sorted(entry.path for entry in anyio.run(listed_async) or []) == sorted(expected)


@ONE_STORE
def test_contents_of_nothing_bytes_and_a_corrupt_source(store: StoreCase, tmp_path: Path) -> None:
    assert Checkpoint(store.uri("next"), src=store.uri("missing")).contents_sync() is None
    assert Checkpoint(store.uri("first")).contents_sync() is None
    Checkpoint(store.uri("bytes")).save_sync(b"state")
    with pytest.raises(CheckpointError, match="not a directory: a listing of contents lists the entries"):
        Checkpoint(store.uri("next"), src=store.uri("bytes")).contents_sync()
    tree = mixed_tree(tmp_path / "tree")
    Checkpoint(store.uri("good")).save_sync(tree)
    rows = rows_of(store.get_raw("good"))
    rows[-1][0] = "../escaped"
    store.put_raw("bad", with_table(store.get_raw("good"), rows))
    with pytest.raises(CorruptCheckpointError, match="not a path inside the tree"):
        Checkpoint(store.uri("next"), src=store.uri("bad")).contents_sync()
    # as load() does, a corrupt newer source is skipped for an older one
    entries = Checkpoint(store.uri("next"), src=[store.uri("bad"), store.uri("good")]).contents_sync()
    assert entries is not None and len(entries) == len(list(tree.rglob("*")))


# -- the command line ---------------------------------------------------------------------------


@ONE_STORE
def test_the_command_line_loads_only_and_lists_contents(
    store: StoreCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = mixed_tree(tmp_path / "tree")
    uri = store.uri("ck")
    Checkpoint(uri).save_sync(tree)
    dest = tmp_path / "dest"
    assert main(["-q", "load", uri, str(dest), "--only", "model/*.pt", "--only", "run.sh"]) == 0
    restored = {path.relative_to(dest).as_posix() for path in dest.rglob("*")}
    assert restored == {"model", "model/big.pt", "model/run-again.sh", "run.sh"}  # the link's file too
    capsys.readouterr()
    assert main(["ls", "--contents", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    size = (tree / "model" / "big.pt").stat().st_size
    assert any(line.split()[:2] == ["file", str(size)] and line.endswith(" model/big.pt") for line in lines)
    assert len(lines) == len(list(tree.rglob("*")))
    assert main(["ls", "--contents", "--json", uri]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"path": "latest", "kind": "symlink", "link": "model/weights.bin"}.items() <= next(
        row for row in rows if row["path"] == "latest"
    ).items()
    assert main(["load", uri, str(tmp_path / "none"), "--only", "nothing"]) == 1
    assert "no entry matches 'nothing'" in capsys.readouterr().err


@ONE_STORE
def test_listing_without_a_table_says_so(store: StoreCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(make_tree(tmp_path / "tree"), arcname=".")
    store.put_raw("foreign.tar.gz", buffer.getvalue())
    assert main(["ls", "--contents", store.uri("foreign.tar.gz")]) == 0
    assert "has no table of contents" in capsys.readouterr().err


def unsafe_foreign_archive(name: str) -> bytes:
    """Another tool's archive (no table) holding ``ok.txt`` and then ``name``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in ("ok.txt", name):
            info = tarfile.TarInfo(entry)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
    return buffer.getvalue()


def test_listing_an_archive_without_a_table_applies_the_extraction_rules(
    store: StoreCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("../evil.txt", "/etc/evil.txt", "a/../../evil.txt"):
        store.put_raw("evil.tar.gz", unsafe_foreign_archive(name))
        uri = store.uri("evil.tar.gz")
        for json_flag in ([], ["--json"]):
            assert main(["ls", "--contents", *json_flag, uri]) == 4, name
            out, err = capsys.readouterr()
            assert out == "", name  # not even ok.txt: nothing is listed unless all of it is safe
            assert f"{uri}: unsafe archive entry refused: entry {name!r}" in err, err
        with pytest.raises(UnsafeArchiveError, match="unsafe archive entry refused"):
            listed(store, "evil.tar.gz")


@ONE_STORE
def test_listing_a_corrupt_table_prints_nothing(
    store: StoreCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = packed(mixed_tree(tmp_path / "tree"))
    rows = rows_of(data)
    rows[-1][0] = "../escaped"  # the last row: every other one is well formed
    store.put_raw("bad", with_table(data, rows))
    assert main(["ls", "--contents", store.uri("bad")]) == 4
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{store.uri('bad')}: the table of contents is corrupt" in err and "'../escaped'" in err
    seen: list[Entry] = []
    counted, location = counted_store(store, "bad")
    with pytest.raises(CorruptCheckpointError, match="not a path inside the tree"):
        anyio.run(lambda: _engine.list_contents(counted, location, CONFIG, seen.append))
    assert seen == []


# -- hostile tables -------------------------------------------------------------------------------


def with_table(data: bytes, rows: list[list[Any]], *, entries: int | None = None, shift: int = 0) -> bytes:
    """``data`` with its table replaced by ``rows`` (well-formed members, matching CRC32s): only
    what the rows say is wrong. ``entries`` and ``shift`` falsify the footer's count and offset."""
    footer = _toc.parse_footer(data[-4096:], len(data), "x")
    assert footer is not None
    lines = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    table = _codec.encode_member(lines, 1)
    body = data[: footer.offset]
    packed_footer = _toc._FOOTER.pack(
        b"CKIO-TOC",
        1,
        0,
        footer.offset + shift,
        len(table),
        len(lines),
        len(rows) if entries is None else entries,
        _codec.crc32(table),
    )
    return body + table + _codec.encode_member(packed_footer, 0)


def rows_of(data: bytes) -> list[list[Any]]:
    return [list(entry) for entry in table_of(data)]


def hostile_cases(data: bytes) -> dict[str, bytes]:
    rows = rows_of(data)
    big = next(index for index, row in enumerate(rows) if row[0] == "model/big.pt")
    small = next(index for index, row in enumerate(rows) if row[0] == "run.sh")
    out = {}
    escaping = [list(row) for row in rows]
    escaping[big][0] = "../escaped.pt"
    out["a path out of the workspace"] = with_table(data, escaping)
    absolute = [list(row) for row in rows]
    absolute[big][0] = "/tmp/absolute.pt"
    out["an absolute path"] = with_table(data, absolute)
    overlapping = [list(row) for row in rows]
    overlapping.insert(big + 1, [*overlapping[big][:6], *overlapping[big][6:9], overlapping[big][9]])
    overlapping[big + 1][0] = "model/big-again.pt"
    out["overlapping ranges"] = with_table(data, overlapping)
    lying = [list(row) for index, row in enumerate(rows) if index != big]
    moved = next(row for row in lying if row[0] == "naïve.json")
    moved[6:10] = rows[big][6:10]  # naïve.json said to be where big.pt's header is
    lying.sort(key=lambda row: (row[6], row[8]))
    del small
    out["a range holding another entry"] = with_table(data, lying)
    out["a huge count"] = with_table(data, rows, entries=10**15)
    out["a footer pointing past the end"] = with_table(data, rows, shift=4096)
    good = with_table(data, rows)
    footer = _toc.parse_footer(good[-4096:], len(good), "x")
    assert footer is not None
    flipped = bytearray(good)
    flipped[footer.offset + 30] ^= 0xFF
    out["a table failing its CRC32"] = bytes(flipped)
    return out


def test_hostile_tables_are_refused_by_partial_restores_and_listings(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    data = packed(tree)
    for why, hostile in hostile_cases(data).items():
        name = why.replace(" ", "-")
        store.put_raw(name, hostile)
        workspace = tmp_path / "ws" / name
        with pytest.raises(CorruptCheckpointError, match="table of contents"):
            load_only(store, name, workspace, ["**"])
        assert not os.path.lexists(tmp_path / "ws" / "escaped.pt")
        assert list(workspace.iterdir()) == [], why
        if why == "a range holding another entry":  # only the data read shows it: a listing reads none
            assert {row.path for row in listed(store, name)[1]} == {
                path.relative_to(tree).as_posix() for path in tree.rglob("*")
            } - {"model/big.pt"}
        else:
            with pytest.raises(CorruptCheckpointError, match="table of contents"):
                listed(store, name)
        # verify reads the archive and checks that the table lists what it holds
        with pytest.raises(CorruptCheckpointError, match="CRC32" if "CRC32" in why else "table of contents"):
            anyio.run(_engine.verify, counted_store(store, name)[0], parse_location(store.uri(name)), CONFIG)
        # a full restore never uses the table: the tree comes back whole, nothing else with it
        # (its members are still read and checked: a damaged one fails the restore)
        full = tmp_path / "full" / name
        restore = partial(_engine.load, counted_store(store, name)[0], parse_location(store.uri(name)), full, CONFIG)
        if "CRC32" in why:
            with pytest.raises(CorruptCheckpointError, match="CRC32"):
                anyio.run(restore)
        else:
            assert anyio.run(restore) == full
            assert snapshot(full) == snapshot(tree), why


def test_a_table_claiming_more_than_the_bound_is_refused_before_it_is_fetched() -> None:
    # an object of 512 MiB and a bit whose footer claims a table filling it: only the footer is read
    footer = _codec.encode_member(_toc._FOOTER.pack(b"CKIO-TOC", 1, 0, 0, _toc.MAX_TABLE + 1, 2**40, 10, 0), 0)
    with pytest.raises(CorruptCheckpointError, match="points outside"):
        _toc.parse_footer(footer, _toc.MAX_TABLE + 1 + _toc.FOOTER_SIZE, "x")


@dataclass
class FailingData(CountingStore):
    """Fails every ranged read after the first (the table's): the data reads."""

    async def read_range(self, info: ObjectInfo, offset: int, length: int) -> bytes:
        if any(request.startswith("range") for request in self.requests):
            raise StoreError(f"{info.location.uri}: the connection dropped", uri=info.location.uri)
        return await super().read_range(info, offset, length)


@ONE_STORE
def test_a_store_failing_during_a_partial_restore_is_the_error_reported(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    Checkpoint(store.uri("ck")).save_sync(tree)
    location = parse_location(store.uri("ck"))
    failing = FailingData(anyio.run(open_store, location.scheme, CONFIG))
    workspace = tmp_path / "ws"
    with pytest.raises(StoreError, match="the connection dropped"):
        anyio.run(lambda: _engine.load(failing, location, workspace, CONFIG, only=Selection(["model/big.pt"])))
    assert list(workspace.iterdir()) == []


def test_table_members_stay_small_whatever_the_archive_block_size() -> None:
    # A reader refuses a member inflating past _codec.MAX_MEMBER_OUTPUT: the table's members are
    # capped on their own, not by the archive's block size (up to 64 MiB), so any table reads back.
    writer = _toc.TableWriter(block_size=64 * 1024 * 1024, level=1)
    name = "d/" + "n" * 2000
    entries = 12_000  # ~25 MiB of rows
    for index in range(entries):
        writer.add(f"{name}{index}", "file", 0o644, 0, 0, "", index * 512, (index + 1) * 512)
    writer.member(entries * 64, entries * 512 + 1024)
    *members, footer_member = writer.finish()
    assert len(members) > 1
    assert all(len(_codec.inflate_member(member)) <= 4 * 1024 * 1024 + 64 * 1024 for member in members)
    table = b"".join(members)
    footer = _toc.parse_footer(
        bytes(entries * 64) + table + footer_member, entries * 64 + len(table) + len(footer_member), "x"
    )
    assert footer is not None
    assert sum(1 for _ in _toc.read_table(table, footer, "x")) == entries


def test_a_table_of_tiny_rows_is_read_in_bounded_memory() -> None:
    # 4 MiB of two-byte rows: refused at the first one, without holding millions of lines
    lines = b"ab\n" * (4 * 1024 * 1024 // 3)
    table = _codec.encode_member(lines, 1)
    footer = _toc.Footer(1024, len(table), len(lines), len(lines) // 3, _codec.crc32(table))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="not JSON"):
            list(_toc.read_table(table, footer, "x"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(lines)  # the member inflated (and joined to a carried line), no list of rows


def test_an_mtime_out_of_any_calendar_is_listed_or_refused_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "far.txt").write_bytes(b"far")
    data = packed(tree)
    rows = rows_of(data)
    store = tmp_path / "store"
    store.mkdir()
    rows[-1][3] = 10**15  # year ~31.7 million: tar can store it, no calendar shows it
    (store / "far").write_bytes(with_table(data, rows))
    assert main(["ls", "--contents", str(store / "far")]) == 0
    assert capsys.readouterr().out.split() == ["file", "3", f"@{10**15}", "far.txt"]
    rows[-1][3] = 2**64  # beyond what tar stores
    (store / "hostile").write_bytes(with_table(data, rows))
    assert main(["ls", "--contents", str(store / "hostile")]) == 4
    assert "impossible mode, size or mtime" in capsys.readouterr().err


@ONE_STORE
def test_verify_checks_the_table_against_the_archive(store: StoreCase, tmp_path: Path) -> None:
    tree = mixed_tree(tmp_path / "tree")
    Checkpoint(store.uri("ck")).save_sync(tree)
    assert main(["-q", "verify", store.uri("ck")]) == 0
    data = store.get_raw("ck")
    rows = rows_of(data)
    big = next(row for row in rows if row[0] == "model/big.pt")
    big[4] -= 1  # a size the archive does not hold (a well-formed row): only reading the archive shows it
    store.put_raw("lying", with_table(data, rows))
    assert main(["-q", "verify", store.uri("lying")]) == 4


# -- memory of partial restores -------------------------------------------------------------------


def repeated_folder_archive(count: int) -> bytes:
    """An archive of ``count`` entries, each the folder ``d`` again (as ``tar -r`` appends), with a
    table: a restore picking them all writes almost nothing, so its memory is the planning's."""
    header = tarfile.TarInfo("d")
    header.type, header.mode, header.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    stream = header.tobuf(format=tarfile.USTAR_FORMAT) * count + bytes(1024)
    writer = _toc.TableWriter(block_size=256 * 1024, level=1)
    for index in range(count):
        writer.add("d", "dir", 0o755, 1_700_000_000, 0, "", index * 512, (index + 1) * 512)
    members = []
    for start in range(0, len(stream), 256 * 1024):
        chunk = stream[start : start + 256 * 1024]
        members.append(_codec.encode_member(chunk, 1))
        writer.member(len(members[-1]), len(chunk))
    return b"".join(members + writer.finish())


def peak_of_load(case: StoreCase, name: str, workspace: Path, patterns: list[str]) -> int:
    """The most memory Python held while ``only=patterns`` was restored (after the store's own
    set-up, so a first S3 client does not count)."""
    store, location = counted_store(case, name)
    assert anyio.run(store.head, location) is not None
    tracemalloc.start()
    try:
        anyio.run(lambda: _engine.load(store, location, workspace, CONFIG, only=Selection(patterns)))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@ONE_STORE
def test_a_partial_restore_of_many_entries_holds_none_of_them(store: StoreCase, tmp_path: Path) -> None:
    # 25,000 entries picked: held as rows they take ~10 MiB more; walked, a few table members in all
    # (~2.5 MiB, whatever the count: 150,000 held took 55 MiB).
    count = 25_000
    store.put_raw("many", repeated_folder_archive(count))
    assert len(table_of(store.get_raw("many"))) == count
    workspace = tmp_path / "ws"
    peak = peak_of_load(store, "many", workspace, ["**"])
    assert [path.name for path in workspace.iterdir()] == ["d"]
    assert peak < 5 * 1024 * 1024, peak


@ONE_STORE
def test_the_bytes_between_two_picked_entries_are_not_held(store: StoreCase, tmp_path: Path) -> None:
    # 64 MiB of zeros deflate to ~64 KiB: fetched with its neighbours as one range, inflated member
    # by member and dropped, never all held.
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("first")
    with open(tree / "b.bin", "wb") as zeros:
        zeros.truncate(64 * 1024 * 1024)
    (tree / "c.txt").write_text("last")
    Checkpoint(store.uri("ck")).save_sync(tree)
    workspace = tmp_path / "ws"
    peak = peak_of_load(store, "ck", workspace, ["a.txt", "c.txt"])
    assert {path.name: path.read_text() for path in workspace.iterdir()} == {"a.txt": "first", "c.txt": "last"}
    assert peak < 16 * 1024 * 1024, peak


@ONE_STORE
def test_a_run_of_entries_longer_than_a_fetch_group_restores_whole(store: StoreCase, tmp_path: Path) -> None:
    # 1,500 small files share members: the run is cut into groups inside a member, fetched twice.
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for index in range(1500):
        (tree / "many" / f"{index:04d}.txt").write_text(f"file {index}")
    Checkpoint(store.uri("ck")).save_sync(tree)
    assert len({entry.offset for entry in table_of(store.get_raw("ck"))}) < 100
    workspace = tmp_path / "ws"
    load_only(store, "ck", workspace, ["many"])
    assert snapshot(workspace) == snapshot(tree)


def incremental_layers(store: StoreCase, tree: Path, pack_size: int) -> None:
    """Issue 21's 1 GiB tree in small, saved incrementally: 24 files of 1 MiB of random data (their
    chunks stored, not deflated) and a few small files (whose chunks share blocks), in packs of
    ``pack_size``, so that the checkpoint has several packs."""
    (tree / "layers").mkdir(parents=True)
    for index in range(24):
        (tree / "layers" / f"{index:02d}.pt").write_bytes(os.urandom(1024 * 1024))
    for index in range(8):
        (tree / f"notes-{index}.txt").write_bytes(os.urandom(3000))
    location = parse_location(store.uri("ck"))
    opened = anyio.run(open_store, location.scheme, CONFIG)
    anyio.run(lambda: _incremental.save(opened, location, tree, CONFIG, pack_size=pack_size))


def test_one_file_of_a_large_incremental_checkpoint_costs_three_requests_and_about_its_size(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    incremental_layers(store, tree, 4 * 1024 * 1024)
    manifest = anyio.run(_incremental.read_manifest, *counted_store(store, "ck"), CONFIG)
    assert manifest is not None and len(manifest.packs) >= 6
    number = manifest.paths.index("layers/13.pt")
    assert len(manifest.chunks_of(number)) >= 4  # fetched one by one, they would take 4 requests more
    workspace = tmp_path / "ws"
    counted = load_only(store, "ck", workspace, ["layers/13.pt"])
    assert snapshot(workspace) == picked(snapshot(tree), "layers/13.pt") | {"layers": snapshot(workspace)["layers"]}
    # the manifest's HEAD and GET, then one ranged GET of the file's chunks in the one pack holding
    # them (next to each other: one range, not one per chunk; no HEAD of the pack, nor of the others)
    assert {manifest.chunk_pack[index] for index in manifest.chunks_of(number)} == {3}
    assert [request.split()[0] for request in counted.requests] == ["head", "get", "range"], counted.requests
    manifest_size = len(store.get_raw("ck"))
    assert 1024 * 1024 + manifest_size <= counted.received <= 2 * 1024 * 1024 + manifest_size, counted.requests


def test_one_file_split_across_two_packs_costs_one_ranged_get_more(store: StoreCase, tmp_path: Path) -> None:
    # A pack is cut where the block that fills it ends, not where a file does: any file may end in
    # the next pack. Here the first file saved, of 1.5 MiB, fills the first pack of 1 MiB (cut
    # within 512 KiB of it, the most a chunk holds) and ends in the second.
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.pt").write_bytes(os.urandom(1536 * 1024))
    for name in ("b.pt", "c.pt", "d.pt"):
        (tree / name).write_bytes(os.urandom(1024 * 1024))
    location = parse_location(store.uri("ck"))
    opened = anyio.run(open_store, location.scheme, CONFIG)
    anyio.run(lambda: _incremental.save(opened, location, tree, CONFIG, pack_size=1024 * 1024))
    manifest = anyio.run(_incremental.read_manifest, opened, location, CONFIG)
    assert manifest is not None and len(manifest.packs) >= 4
    assert {manifest.chunk_pack[index] for index in manifest.chunks_of(manifest.paths.index("a.pt"))} == {0, 1}
    counted = load_only(store, "ck", tmp_path / "ws", ["a.pt"])
    assert snapshot(tmp_path / "ws") == picked(snapshot(tree), "a.pt")
    # the manifest's HEAD and GET, then a ranged GET in each of the two packs
    assert [request.split()[0] for request in counted.requests] == ["head", "get", "range", "range"], counted.requests
    manifest_size = len(store.get_raw("ck"))
    assert 1536 * 1024 + manifest_size <= counted.received <= 2 * 1024 * 1024 + manifest_size, counted.requests


def test_listing_an_incremental_checkpoint_reads_its_manifest_in_two_requests(store: StoreCase, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    incremental_layers(store, tree, 4 * 1024 * 1024)
    counted, rows, table = listed(store, "ck")
    assert table is True
    assert counted.requests == ["head", "get"]  # the manifest's HEAD and GET; no pack is read
    assert counted.received == len(store.get_raw("ck")) < 64 * 1024
    by_path = {row.path: row for row in rows}
    assert set(by_path) == {path.relative_to(tree).as_posix() for path in tree.rglob("*")}
    st = (tree / "layers" / "13.pt").stat()
    assert by_path["layers/13.pt"][1:4] == ("file", st.st_size, int(st.st_mtime))
    assert by_path["layers"][1] == "dir" and by_path["notes-7.txt"][1:3] == ("file", 3000)
