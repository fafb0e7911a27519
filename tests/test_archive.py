"""The archive format: valid .tar.gz for other tools, parallel members, stored incompressible blocks."""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import itertools
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointio import CorruptCheckpointError, SourceChangedError, _codec, _tar
from checkpointio._archive import GunzipReader, _GzipMemberWriter, pack_directory, unpack_directory
from checkpointio._codec import (
    MAX_MEMBER_OUTPUT,
    Scratch,
    encode_member,
    encode_pieces,
    inflate_member,
    is_stored_member,
    member_length,
    stored_data,
)

from .conftest import make_tree, pull_of, snapshot


def packed(root: Path, *, level: int = 1, workers: int = 2, block: int = 256 * 1024) -> bytes:
    chunks: list[bytes] = []
    pack_directory(root, chunks.append, block_size=block, level=level, workers=workers)
    return b"".join(chunks)


def unpacked(data: bytes, dest: Path, *, workers: int = 2, step: int = 100_000) -> Path:
    dest.mkdir()
    unpack_directory(
        pull_of(data[i : i + step] for i in range(0, len(data), step)), dest, uri="test://archive", workers=workers
    )
    return dest


@contextlib.contextmanager
def traced() -> Iterator[list[int]]:
    """Measures the peak of Python's allocations inside the block: ``peak[0]`` after it."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_archive_is_a_plain_tar_gz_for_gnu_tar_and_python(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(packed(tree))
    (tmp_path / "gnu").mkdir()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(tmp_path / "gnu")], check=True)
    assert snapshot(tmp_path / "gnu") == snapshot(tree)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp_path / "py", filter="data")
    assert {p.relative_to(tmp_path / "py") for p in (tmp_path / "py").rglob("*")} == {
        p.relative_to(tree) for p in tree.rglob("*")
    }
    assert gzip.decompress(archive.read_bytes())[:100]  # one gzip stream of many members


@pytest.mark.parametrize(("pack_workers", "unpack_workers"), [(1, 1), (1, 3), (3, 1), (2, 2)])
def test_round_trip_with_any_number_of_workers(tmp_path: Path, pack_workers: int, unpack_workers: int) -> None:
    tree = make_tree(tmp_path / "tree")
    data = packed(tree, workers=pack_workers)
    restored = unpacked(data, tmp_path / "out", workers=unpack_workers)
    assert snapshot(restored) == snapshot(tree)


@pytest.mark.parametrize("workers", [2, 3])
def test_alternating_stored_and_deflated_blocks_keep_their_order(tmp_path: Path, workers: int) -> None:
    # Stored blocks are encoded and inflated inline, deflated ones on the threads: the switch
    # back and forth must not reorder anything.
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(12):
        payload = os.urandom(300_000) if i % 3 else b"text that deflates well %d " % i * 12_000
        (tree / f"{i:02d}.bin").write_bytes(payload)
    data = packed(tree, workers=workers, block=128 * 1024)
    kinds = set()
    position = 0
    while position < len(data):
        length = member_length(data[position : position + 32])
        assert length is not None
        kinds.add(is_stored_member(data[position : position + length]))
        position += length
    assert kinds == {True, False}
    restored = unpacked(data, tmp_path / "out", workers=workers)
    assert snapshot(restored) == snapshot(tree)


def test_incompressible_blocks_are_stored_and_text_is_deflated() -> None:
    noise = os.urandom(1024 * 1024)
    text = b"the same words again and again " * 40_000
    stored = encode_member(noise, 1)
    deflated = encode_member(text, 1)
    assert len(noise) < len(stored) < len(noise) * 1.01
    assert len(deflated) < len(text) / 10
    assert member_length(stored) == len(stored) and member_length(deflated) == len(deflated)
    assert inflate_member(stored) == noise and inflate_member(deflated) == text
    assert gzip.decompress(stored + deflated) == noise + text


def test_a_member_with_a_wrong_crc_is_corrupt() -> None:
    member = bytearray(encode_member(b"hello world" * 100, 1))
    member[-8] ^= 0xFF
    with pytest.raises(CorruptCheckpointError, match="CRC32"):
        inflate_member(bytes(member))


def test_a_member_inflating_beyond_the_limit_is_refused() -> None:
    import zlib

    bomb_raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw = bomb_raw.compress(b"\0" * (MAX_MEMBER_OUTPUT + 1)) + bomb_raw.flush()
    header = encode_member(b"", 0)[:20]
    total = len(header) + len(raw) + 8
    member = header[:16] + total.to_bytes(4, "little") + raw + b"\0" * 8
    assert member_length(member) == len(member)
    with pytest.raises(CorruptCheckpointError, match="beyond the limit"):
        inflate_member(member)


def test_a_foreign_gzip_bomb_inflates_in_bounded_steps(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 * 1024 * 1024
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    data = buffer.getvalue()
    assert len(data) < 1024 * 1024  # 64 MiB of zeros in well under 1 MiB
    reader = GunzipReader(pull_of([data]))
    largest = total = 0
    while chunk := reader.read(64 * 1024):
        total += len(chunk)
        largest = max(largest, reader.buffered)
    assert total > 64 * 1024 * 1024  # all of it came through
    assert largest <= 3 * 1024 * 1024  # never the whole 64 MiB in memory


def _with_size_field(header: bytes, size_field: bytes) -> bytes:
    """A ustar header whose size field says ``size_field``, with its checksum made valid again."""
    block = bytearray(header[:512])
    block[124:136] = size_field.ljust(12, b"\0")
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize(
    "entry",
    [
        _with_size_field(_tar.header("neg", _tar.FILE), b"-0000001001"),
        # a pax record can state the size too
        _tar.header("neg", _tar.FILE, size=8 * 1024**3).replace(b"size=8589934592", b"size=-000001001"),
    ],
    ids=["ustar", "pax"],
)
def test_a_negative_size_is_corrupt_and_reads_nothing_ahead(tmp_path: Path, entry: bytes) -> None:
    # Behind the bad entry, 64 MiB of zeros that gzip shrinks to ~64 KiB: a reader asked for a
    # negative number of bytes would inflate all of it into memory.
    zeros = _tar.header("zeros", _tar.FILE, size=64 * 1024 * 1024) + bytes(64 * 1024 * 1024)
    data = gzip.compress(entry + zeros + _tar.end_of_archive(len(entry) + len(zeros)), compresslevel=1)
    with traced() as peak, pytest.raises(CorruptCheckpointError, match=r"bad (number|size)"):
        unpacked(data, tmp_path / "out")
    assert peak[0] < 16 * 1024 * 1024
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", [b"x", b"L"], ids=["pax", "gnu-long-name"])
def test_an_oversized_name_header_is_corrupt_and_not_read_into_memory(tmp_path: Path, kind: bytes) -> None:
    # a pax (or GNU long-name) header is read whole: 64 MiB of zeros would all be held at once
    size = 64 * 1024 * 1024
    block = _tar.header("././@LongLink", _tar.FILE)
    header = _with_size_field(block[:156] + kind + block[157:512], b"%011o" % size)
    data = gzip.compress(header + bytes(size) + _tar.end_of_archive(512 + size), compresslevel=1)
    with traced() as peak, pytest.raises(CorruptCheckpointError, match="more than 1 MiB"):
        unpacked(data, tmp_path / "out")
    assert peak[0] < 16 * 1024 * 1024


@pytest.mark.parametrize("field", ["path", "linkpath"])
def test_a_name_of_many_parts_is_refused_before_its_parts_are_walked(tmp_path: Path, field: str) -> None:
    # 40,000 parts in a 257-byte archive: walking every parent folder took 1.5 GiB
    name = "a/" * 40_000 + "x"
    entry = _tar.header(name, _tar.FILE) if field == "path" else _tar.header("link", _tar.SYMLINK, link=name)
    data = gzip.compress(entry + _tar.end_of_archive(len(entry)), compresslevel=9)
    with traced() as peak, pytest.raises(CorruptCheckpointError, match="over 4095 bytes"):
        unpacked(data, tmp_path / "out")
    assert peak[0] < 16 * 1024 * 1024
    assert list((tmp_path / "out").iterdir()) == []


def _deep_entries(kind: str) -> list[bytes]:
    """60 entries of names or link targets of 2,000 parts (under 4 KiB each, in a ~2 KB archive),
    each in its own folder, so no two share the folders they name."""
    deep = "a/" * 2000
    if kind == "symlink targets":
        return [_tar.header(f"l{i}/s", _tar.SYMLINK, link=deep + "x") for i in range(60)]
    if kind == "zigzag symlink targets":  # down 1,000 folders, then 400 times one more and back
        return [_tar.header(f"l{i}/s", _tar.SYMLINK, link="a/" * 1000 + "b/../" * 400 + "x") for i in range(60)]
    if kind == "folder entries":
        return [_tar.header(f"d{i}/{deep}", _tar.DIRECTORY) for i in range(60)]
    return [_tar.header(f"d{i}/{deep}x", _tar.FILE) for i in range(60)]


@pytest.mark.parametrize("kind", ["symlink targets", "zigzag symlink targets", "file names", "folder entries"])
def test_names_of_thousands_of_parts_cost_memory_for_their_bytes_not_each_prefix(kind: str) -> None:
    # Every folder a name is in, and every folder a link's target walks through, was kept as its
    # own path: 4 MB for each of these names, 218 MiB for the 2 KB archive.
    from checkpointio._archive import check_directory

    entries = _deep_entries(kind)
    tar = b"".join(entries) + _tar.end_of_archive(sum(map(len, entries)))
    data = gzip.compress(tar, compresslevel=9)
    assert len(data) < 3000
    with traced() as peak:
        check_directory(pull_of([data]), uri="test://deep")
    assert peak[0] < 4 * 1024 * 1024


def test_a_tree_of_folders_deeper_than_path_max_from_its_destination_restores(tmp_path: Path) -> None:
    # 15 parts of 250 bytes under a destination of ~770 bytes: 4,500 bytes as one path, more than
    # PATH_MAX; every entry is made relative to the destination, so it fits
    parts = [f"{i:02}" + "p" * 248 for i in range(15)]
    entries = [
        _tar.header("/".join(parts) + "/deep.txt", _tar.FILE, size=4, mode=0o644) + b"deep" + bytes(508),
        _tar.header("/".join(parts[:3]) + "/link", _tar.SYMLINK, link="/".join(parts[3:]) + "/deep.txt"),
    ]
    tar = b"".join(entries) + _tar.end_of_archive(sum(map(len, entries)))
    dest = tmp_path / ("d" * 250) / ("d" * 250) / ("d" * 250)
    dest.parent.mkdir(parents=True)
    unpacked(gzip.compress(tar), dest)
    top = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.readlink("/".join(parts[:3]) + "/link", dir_fd=top) == "/".join(parts[3:]) + "/deep.txt"
        fd = os.open("/".join(parts), os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
        with open(os.open("deep.txt", os.O_RDONLY, dir_fd=fd), "rb") as file:
            assert file.read() == b"deep"
        os.close(fd)
    finally:
        os.close(top)


def test_an_entry_this_file_system_cannot_hold_is_corrupt_not_a_raw_os_error(tmp_path: Path) -> None:
    # One file and more hard links to it than the file system allows: what `verify` cannot know,
    # a restore must still report as the archive's fault (the runtime then falls back to an
    # older attempt), not as an OSError
    limit = os.pathconf(tmp_path, "PC_LINK_MAX")
    if limit > 100_000:
        pytest.skip(f"this file system allows {limit} links to a file")
    entries = [_tar.header("f", _tar.FILE, size=1, mode=0o644) + b"x" + bytes(511)]
    entries += [_tar.header(f"h{i}", _tar.HARD_LINK, link="f") for i in range(limit)]
    tar = b"".join(entries) + _tar.end_of_archive(sum(map(len, entries)))
    with pytest.raises(CorruptCheckpointError, match=f"entry 'h{limit - 1}' cannot be restored on this file system"):
        unpacked(gzip.compress(tar, compresslevel=1), tmp_path / "out")


folder_names = st.lists(st.lists(st.sampled_from(["a", "b", "ab", "a.b", "ba"]), min_size=1, max_size=6), max_size=12)


@given(added=folder_names, asked=folder_names)
@settings(max_examples=300, deadline=None)
def test_the_folder_trie_knows_exactly_the_folders_a_set_of_every_prefix_holds(
    added: list[list[str]], asked: list[list[str]]
) -> None:
    folders, prefixes = _tar._Folders(), {""}
    for parts in added:
        folders.add("/".join(parts))
        prefixes.update("/".join(parts[:end]) for end in range(1, len(parts) + 1))
    for parts in asked + added:
        known = max(len(p) for p in ("/".join(parts[:end]) for end in range(len(parts) + 1)) if p in prefixes)
        assert folders.known("/".join(parts)) == known
        children = {p.rpartition("/")[2] for p in prefixes if p and p.rpartition("/")[0] == "/".join(parts)}
        if "/".join(parts) in prefixes:
            below = folders.below("/".join(parts))
            assert (set(below) if isinstance(below, dict) else {below.partition("/")[0]}) == children


@pytest.mark.parametrize("level", [0, 1, 6])
def test_the_largest_member_we_write_is_read(level: int) -> None:
    member = encode_member(os.urandom(MAX_MEMBER_OUTPUT), level)  # incompressible: stored whole
    assert member_length(member) == len(member)


@pytest.mark.parametrize("stated", [0, 4, 29, 200 * 1024 * 1024])
def test_a_member_stating_an_impossible_length_is_corrupt(tmp_path: Path, stated: int) -> None:
    member = bytearray(encode_member(b"x" * 1000, 1))
    member[16:20] = stated.to_bytes(4, "little")  # the length our header states
    with pytest.raises(CorruptCheckpointError, match="states a length"):
        unpacked(bytes(member) + encode_member(bytes(1000), 1), tmp_path / f"out-{stated}")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0"])
def test_gnu_tar_pax_sparse_files_are_refused_not_restored_wrong(tmp_path: Path, version: str) -> None:
    (tmp_path / "tree").mkdir()
    with open(tmp_path / "tree" / "sparse.bin", "wb") as file:
        file.seek(4 * 1024 * 1024)
        file.write(b"end")
    archive = tmp_path / "a.tar.gz"
    subprocess.run(
        ["tar", "--format=posix", "--sparse", f"--sparse-version={version}", "-czf", str(archive), "-C",
         str(tmp_path / "tree"), "sparse.bin"],
        check=True,
    )  # fmt: skip
    with pytest.raises(CorruptCheckpointError, match="GNU sparse"):
        unpacked(archive.read_bytes(), tmp_path / "out")


def test_mtimes_are_floored_to_their_second_not_rounded(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    cases = {"late": 1_700_000_000_999_999_999, "before-1970": -1_500_000_000, "whole": 1_600_000_000_000_000_000}
    for name, ns in cases.items():
        (tree / name).write_bytes(name.encode())
        os.utime(tree / name, ns=(ns, ns))
    restored = unpacked(packed(tree), tmp_path / "out")
    for name, ns in cases.items():
        assert os.stat(restored / name).st_mtime_ns == (ns // 10**9) * 10**9, name


@pytest.mark.parametrize("mtime", [-100, -1])  # negative: written base-256, first byte 0xFF
def test_gnu_format_files_from_before_1970_restore_with_their_time(tmp_path: Path, mtime: int) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:  # base-256 times
        info = tarfile.TarInfo("old.txt")
        info.size, info.mtime = 3, mtime
        tar.addfile(info, io.BytesIO(b"old"))
    restored = unpacked(buffer.getvalue(), tmp_path / "out")
    assert (restored / "old.txt").read_bytes() == b"old"
    assert os.stat(restored / "old.txt").st_mtime == mtime


@pytest.mark.parametrize(
    ("record", "seconds"),
    [(b"1700000000.999999999", 1_700_000_000), (b"-1.5", -2), (b"-2", -2), (b"-2.000", -2), (b"7", 7)],
)
def test_pax_times_are_read_as_decimals(tmp_path: Path, record: bytes, seconds: int) -> None:
    pax = _tar._pax_record(b"mtime", record)
    entry = (
        _tar._ustar(b"././@PaxHeader", b"x", len(pax), 0o644, 0, b"")
        + pax
        + bytes(-len(pax) % 512)
        + _tar.header("f", _tar.FILE)
    )
    restored = unpacked(gzip.compress(entry + _tar.end_of_archive(len(entry))), tmp_path / "out")
    assert os.stat(restored / "f").st_mtime == seconds


@pytest.mark.parametrize("record", [b"inf", b"nan", b"1e400", b"--1", b"1.2.3", b""])
def test_pax_times_that_are_not_decimals_are_corrupt(tmp_path: Path, record: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="bad time"):
        _tar._pax_time(record)


def test_a_folder_named_many_times_costs_one_entry(tmp_path: Path) -> None:
    entry = _tar.header("d/", _tar.DIRECTORY, mode=0o755)
    count = 50_000  # enough for one record per occurrence to show: ~100 bytes each, 5 MB in all
    data = gzip.compress(entry * count + _tar.end_of_archive(len(entry) * count), compresslevel=9)
    with traced() as peak:
        restored = unpacked(data, tmp_path / "out")
    assert (restored / "d").is_dir()
    assert peak[0] < 4 * 1024 * 1024  # the restore itself peaks near 2 MiB whatever the count


def test_truncated_and_garbled_streams_are_corrupt(tmp_path: Path) -> None:
    data = packed(make_tree(tmp_path / "tree"))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        unpacked(data[: len(data) - 100], tmp_path / "a")
    garbled = bytearray(data)
    garbled[len(garbled) // 2 : len(garbled) // 2 + 64] = os.urandom(64)
    with pytest.raises(CorruptCheckpointError):
        unpacked(bytes(garbled), tmp_path / "b")
    with pytest.raises(CorruptCheckpointError):
        unpacked(os.urandom(10_000), tmp_path / "c")


@pytest.mark.parametrize("writer", ["ours", "gzip"])
@pytest.mark.parametrize(
    ("after", "said"),
    [(b"garbage!" * 8, "trailing data after its end"), (b"ga", "trailing data after its end"), (b"\x1f", "truncated")],
)
def test_bytes_after_the_archive_are_called_trailing_data_not_truncation(
    tmp_path: Path, writer: str, after: bytes, said: str
) -> None:
    tree = make_tree(tmp_path / "tree")
    data = packed(tree) if writer == "ours" else gzip.compress(gzip.decompress(packed(tree)))
    with pytest.raises(CorruptCheckpointError, match=said):
        unpacked(data + after, tmp_path / "out")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_archives_written_by_gnu_tar_restore_identically(tmp_path: Path, fmt: str) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "model" / ("long-" + "n" * 150)).write_bytes(b"long name")
    os.link(tree / "model" / "weights.bin", tree / "hard-link")
    if fmt == "ustar":
        (tree / "model" / ("long-" + "n" * 150)).unlink()  # ustar cannot hold it
    archive = tmp_path / "gnu.tar.gz"
    subprocess.run(["tar", f"--format={fmt}", "-czf", str(archive), "-C", str(tree), "."], check=True)
    restored = unpacked(archive.read_bytes(), tmp_path / "out")
    assert snapshot(restored) == snapshot(tree)
    assert os.stat(restored / "hard-link").st_ino == os.stat(restored / "model" / "weights.bin").st_ino


def test_checking_an_archive_writes_nothing_and_finds_the_same_faults(tmp_path: Path) -> None:
    from checkpointio._archive import check_directory

    data = packed(make_tree(tmp_path / "tree"))
    before = sorted(tmp_path.rglob("*"))
    check_directory(pull_of([data]), uri="test://check")
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(CorruptCheckpointError):
        check_directory(pull_of([data[:-200]]), uri="test://check")


@given(st.binary(min_size=512, max_size=512))
@settings(max_examples=300, deadline=None)
def test_header_checksum_is_the_byte_sum_tar_defines(raw: bytes) -> None:
    from checkpointio._tar import _checksum_ok

    block = bytearray(raw)
    block[148:156] = b"        "
    unsigned = sum(block)
    block[148:156] = b"%06o\0 " % unsigned
    assert _checksum_ok(bytes(block))
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 256  # old writers' variant
    wrong = unsigned + 1
    block[148:156] = b"%06o\0 " % wrong
    assert _checksum_ok(bytes(block)) == (wrong == signed)


@given(
    st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=100),
    st.sampled_from([_tar.FILE, _tar.DIRECTORY, _tar.SYMLINK, _tar.HARD_LINK]),
    st.integers(0, 8**11 - 1),
    st.integers(0, 0o7777),
    st.integers(0, 8**11 - 1),
)
@settings(max_examples=300, deadline=None)
def test_the_header_of_a_short_ascii_name_is_the_ustar_block_every_field_spelled_out(
    name: str, kind: bytes, size: int, mode: int, mtime: int
) -> None:
    built = _tar.header(name, kind, size=size, mode=mode, mtime=mtime)
    assert built == _tar._ustar(name.encode(), kind, size, mode, mtime, b"")
    info = tarfile.TarInfo.frombuf(built, "utf-8", "surrogateescape")
    shown = name.rstrip("/") if kind == _tar.DIRECTORY else name  # as tarfile names folders
    assert (info.name, info.type, info.mode, info.mtime) == (shown, kind, mode, mtime)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_restored_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    tree = make_tree(tmp_path / "tree")
    for name, mode in [("g-exec", 0o750), ("world", 0o664), ("plain", 0o644), ("odd", 0o4711)]:
        (tree / name).write_bytes(name.encode())
        (tree / name).chmod(mode)
    expected = snapshot(tree)
    expected["world"] = ("file", b"world", 0o644, expected["world"][3])  # group/other write dropped
    expected["odd"] = ("file", b"odd", 0o711, expected["odd"][3])  # no set-id bits
    data = packed(tree)
    previous = os.umask(umask)
    try:
        restored = unpacked(data, tmp_path / "out")
    finally:
        os.umask(previous)
    assert snapshot(restored) == expected


@pytest.mark.parametrize("workers", [1, 2])
def test_reads_of_any_size_give_back_the_exact_stream(tmp_path: Path, workers: int) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "noise.bin").write_bytes(os.urandom(700_000))  # stored blocks
    (tree / "text.txt").write_bytes(b"compressible " * 60_000)  # deflated blocks
    data = packed(tree, block=200_000, workers=workers)
    expected = gzip.decompress(data)
    reader = GunzipReader(pull_of(data[i : i + 50_000] for i in range(0, len(data), 50_000)), workers)
    sizes = [512, 1, 70_000, 199_999, 200_001, 65_536, 3, 1_000_000, 512]
    got = []
    try:
        for index in range(10_000):
            chunk = reader.read(sizes[index % len(sizes)])
            if not chunk:
                break
            got.append(bytes(chunk))
    finally:
        reader.close()
    assert b"".join(got) == expected


def test_stored_members_are_read_in_place_and_checked_against_their_crc() -> None:
    block = os.urandom(300_000)  # noise: stored, in several stored deflate blocks
    member = encode_member(block, 1)
    assert is_stored_member(member)
    views = stored_data(member)
    assert views is not None
    assert b"".join(views) == block == inflate_member(member)
    assert all(view.obj is member for view in views)  # views of the member: nothing copied
    flipped = bytearray(member)
    flipped[100] ^= 1  # a byte of the data
    with pytest.raises(CorruptCheckpointError, match="CRC32"):
        stored_data(bytes(flipped))
    assert stored_data(encode_member(b"compressible " * 10_000, 1)) is None  # deflated: inflate it
    # check=False: the caller checks a CRC32 of the member's bytes themselves; the framing is still checked
    unchecked = stored_data(bytes(flipped), check=False)
    expected = bytearray(block)
    expected[100 - 25] ^= 1  # after the gzip header (20 bytes) and the stored block's own (5)
    assert unchecked is not None and b"".join(unchecked) == expected
    garbled = bytearray(member)
    garbled[21] ^= 1  # the first stored block's length: no longer matches its complement
    assert stored_data(bytes(garbled), check=False) is None  # not well formed: inflate_member says why
    short = bytearray(member)
    short[-1] ^= 1  # the length the trailer states
    with pytest.raises(CorruptCheckpointError, match="CRC32"):
        stored_data(bytes(short), check=False)


def test_a_stored_member_is_read_in_place_from_the_blocks_it_arrived_in() -> None:
    block = os.urandom(140_000)  # stored in three deflate blocks
    member = encode_member(block, 1)
    heads = [20, 20 + 5 + 65_535, 20 + 2 * (5 + 65_535)]  # where each stored block's header starts
    # cut inside the gzip header, in and right after each stored block's header, in the data, in the trailer
    cuts = [1, 19, *(at + k for at in heads for k in (0, 2, 5, 6)), 40_000, len(member) - 8, len(member) - 3]
    for cut in cuts:
        pieces = [memoryview(member)[:cut], memoryview(member)[cut:]]
        assert is_stored_member(pieces)
        views = stored_data(pieces)
        assert views is not None and b"".join(views) == block, cut
        assert all(view.obj is member for view in views)  # nothing copied
        if cut < 20:
            continue  # the gzip header: read by whoever cut the member out (member_length)
        flipped = bytearray(member)
        flipped[cut] ^= 1
        halves = [memoryview(bytes(flipped))[:cut], memoryview(bytes(flipped))[cut:]]
        # framing (a header's length, the trailer's) or data (its CRC32): either way not taken as it is
        with contextlib.suppress(CorruptCheckpointError):
            assert stored_data(halves) is None, cut
    # every 64 KiB block cut in many pieces, each view within one piece
    pieces = [memoryview(member)[at : at + 4096] for at in range(0, len(member), 4096)]
    views = stored_data(pieces)
    assert views is not None and b"".join(views) == block


@pytest.mark.parametrize("level", [0, 1, 6])
@pytest.mark.parametrize("kind", ["noise", "text"])
@pytest.mark.parametrize("size", [0, 1, 65_535, 65_536, 131_070, 200_001])
def test_a_member_holds_its_pieces_whatever_they_are_cut_into(level: int, kind: str, size: int) -> None:
    data = os.urandom(size) if kind == "noise" else (b"compressible words %d " * 20_000)[:size]
    whole = encode_member(data, level)
    cuts = [0, 1, 512, 65_535, 65_536, 70_000, 131_071, size]  # pieces across stored blocks' edges
    bounds = sorted({cut for cut in cuts if cut <= size})
    pieces = [memoryview(data)[start:end] for start, end in itertools.pairwise(bounds)]
    for scratch in (None, Scratch(max(size, 1))):
        member = encode_pieces(pieces or [b""], level, scratch)
        assert member_length(member) == len(member)
        assert inflate_member(member) == gzip.decompress(member) == data
        assert is_stored_member(member) == is_stored_member(whole) == (level == 0 or kind == "noise" or size < 2)
        if is_stored_member(member):  # stored blocks of 65,535 bytes, however the data came
            assert member == whole
            views = stored_data(member)
            assert views is not None and b"".join(views) == data


def _segments(block: int) -> list[bytes]:
    """Stretches of a stream, each ended by a cut: noise (stored) and text (deflated) in turn,
    of sizes on either side of a block, of several blocks and of the stored blocks' 65,535 bytes."""
    sizes = [1, block - 1, block, block + 1, 3 * block + 17, 70_000, 0, 2 * block, 5, 65_535, block // 2]
    return [
        os.urandom(size) if index % 2 else (b"text that deflates %d " % index * (size // 20 + 1))[:size]
        for index, size in enumerate(sizes)
    ]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("how", ["whole", "small writes", "read from the file", "mixed"])
def test_members_hold_the_stream_however_it_was_written(tmp_path: Path, workers: int, level: int, how: str) -> None:
    # A block is kept as the pieces written (views where a write crosses its end) and a read that
    # completes a block encoded on the writing thread lands in one buffer reused by the next:
    # each member must hold exactly its block of the stream, whatever the writes and reads were.
    block = 64 * 1024
    segments = _segments(block)
    source = tmp_path / "stream"
    source.write_bytes(b"".join(segments))
    members: list[bytes] = []
    read: list[int] = []
    sink = _GzipMemberWriter(members.append, block, level, workers)
    fd = os.open(source, os.O_RDONLY)
    try:
        for index, segment in enumerate(segments):
            start = os.lseek(fd, 0, os.SEEK_CUR)
            if how == "whole":
                sink.write(segment)
            elif how == "small writes":
                for offset in range(0, len(segment), 7_777):
                    sink.write(segment[offset : offset + 7_777])
            else:
                head = 0 if how == "read from the file" else min(len(segment), 512 + index)
                sink.write(segment[:head])  # a header before the file's data, as tar has
                os.lseek(fd, start + head, os.SEEK_SET)
                sink.write_from(fd, len(segment) - head, read.append, lambda: AssertionError("shrank"))
            os.lseek(fd, start + len(segment), os.SEEK_SET)
            sink.cut()
        sink.finish()
    finally:
        sink.close()
        os.close(fd)
    expected = [segment[offset : offset + block] for segment in segments for offset in range(0, len(segment), block)]
    assert [inflate_member(member) for member in members] == expected
    assert all(member_length(member) == len(member) for member in members)
    assert gzip.decompress(b"".join(members)) == b"".join(segments)
    if how != "whole" and how != "small writes":
        assert sum(read) == sum(map(len, segments)) - (
            0
            if how == "read from the file"
            else sum(min(len(segment), 512 + index) for index, segment in enumerate(segments))
        )
        assert all(0 < count <= block for count in read)  # never more than a block has room for
    if level and workers == 1:
        assert {is_stored_member(member) for member in members} == {True, False}


def packed_then_released(sink: _GzipMemberWriter, text: bytes, source: Path | None, release: threading.Event) -> None:
    """Write ``text`` into ``sink`` (read from ``source``, holding it, if given) and finish; then,
    whatever happened, release the held pool threads and close the sink."""
    try:
        if source is None:
            sink.write(text)
        else:
            with open(source, "rb") as file:
                sink.write_from(file.fileno(), len(text), lambda count: None, lambda: AssertionError("shrank"))
        sink.finish()
    finally:
        release.set()
        sink.close()


def blocks_of(data: bytes, block: int) -> list[bytes]:
    return [data[offset : offset + block] for offset in range(0, len(data), block)]


@pytest.mark.parametrize("how", ["whole", "read from the file"])
def test_the_packing_thread_deflates_while_the_pool_is_behind_and_the_order_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # With two workers the pool has one thread and the packing thread is the other: once the pool
    # holds two blocks it has not finished, the next ones are deflated where they were written
    # (never a third thread deflating beside them), and members still come out in stream order.
    # The pool's thread is held until the packing thread has deflated two blocks itself.
    block = 64 * 1024
    text = b"".join(b"line %d of a log that deflates\n" % number for number in range(60_000))[: 12 * block + 99]
    source = tmp_path / "stream"
    source.write_bytes(text)
    release = threading.Event()
    encoders: dict[int, str] = {}  # who deflated each block
    active = [0, 0]  # now, most at once
    lock = threading.Lock()
    real = _codec.encode_pieces

    def encode(pieces: list[bytes], level: int, scratch: Scratch | None = None) -> bytes:
        here = threading.current_thread() is threading.main_thread()
        with lock:
            encoders[text.index(b"".join(pieces)[:64]) // block] = "here" if here else "pool"
            active[0] += 1
            active[1] = max(active)
        try:
            if not here:
                assert release.wait(timeout=10), "the packing thread never deflated a block while the pool was held"
            elif list(encoders.values()).count("here") == 2:
                release.set()
            return real(pieces, level, scratch)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(_codec, "encode_pieces", encode)
    members: list[bytes] = []
    sink = _GzipMemberWriter(members.append, block, 1, 2)
    packed_then_released(sink, text, None if how == "whole" else source, release)
    assert [inflate_member(member) for member in members] == blocks_of(text, block)
    assert [encoders[number] for number in range(4)] == ["pool", "pool", "here", "here"]
    assert "pool" in [encoders[number] for number in range(4, len(members))]  # once free, it takes blocks again
    assert active[1] <= 2


def test_a_block_read_into_the_reused_buffer_is_deflated_where_it_was_read_even_if_the_pool_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read that completes a block goes into one buffer reused by the next such read, only when
    # that block is deflated on the packing thread. The pool finishing its blocks during that read
    # must not send the block (a view of the buffer) to the pool: the next read would overwrite it.
    block = 64 * 1024
    text = b"".join(b"line %d of a log that deflates\n" % number for number in range(30_000))[: 8 * block]
    source = tmp_path / "stream"
    source.write_bytes(text)
    release = threading.Event()
    handed_over: list[bool] = []
    members: list[bytes] = []
    sink = _GzipMemberWriter(members.append, block, 1, 2)
    real_encode, real_readv = _codec.encode_pieces, os.readv

    def encode(pieces: list[memoryview], level: int, scratch: Scratch | None = None) -> bytes:
        if threading.current_thread() is not threading.main_thread():
            reused = sink._scratch.obj if sink._scratch is not None else None
            handed_over.append(any(getattr(piece, "obj", None) is reused for piece in pieces if reused is not None))
            assert release.wait(timeout=10), "the pool was never released"
        return real_encode(pieces, level, scratch)

    def readv(fd: int, buffers: list[memoryview]) -> int:
        if not release.is_set():  # the first read into the reused buffer: the pool catches up now
            release.set()
            for future, _ in list(sink._pending):
                future.result(timeout=10)
        return real_readv(fd, buffers)

    monkeypatch.setattr(_codec, "encode_pieces", encode)
    monkeypatch.setattr(os, "readv", readv)
    packed_then_released(sink, text, source, release)
    assert [inflate_member(member) for member in members] == blocks_of(text, block)
    assert handed_over and not any(handed_over)


def test_a_large_file_is_copied_once_into_its_members(tmp_path: Path) -> None:
    # Its blocks are read into one buffer reused for each and copied from there into their
    # members: besides the member being made, a block's bytes are held once, not copied through a
    # growing buffer, a block of its own and the deflater's output first (five blocks' worth).
    block = 1024 * 1024
    tree = tmp_path / "tree"
    tree.mkdir()
    weights = os.urandom(4 * block + 1000)  # noise: stored, encoded on the packing thread
    (tree / "weights.f32").write_bytes(weights)
    sizes: list[int] = []
    with traced() as peak:
        pack_directory(tree, lambda member: sizes.append(len(member)), block_size=block, level=1, workers=1)
    assert peak[0] < 2.5 * block
    assert len(sizes) == 5 + 1 + 2  # the file's 5 blocks, the end of the archive, the table and its footer
    assert all(size < block + 200 for size in sizes)


def test_a_file_that_ends_before_its_size_is_read_raises_what_the_caller_gives(tmp_path: Path) -> None:
    source = tmp_path / "short"
    source.write_bytes(os.urandom(100_000))
    sink = _GzipMemberWriter(lambda member: None, 64 * 1024, 1, 1)
    with open(source, "rb") as file, pytest.raises(SourceChangedError, match="short shrank"):
        sink.write_from(file.fileno(), 150_000, lambda count: None, lambda: SourceChangedError(f"{source} shrank"))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_files_on_either_side_of_the_writer_threads_threshold_restore_exactly(tmp_path: Path, workers: int) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    sizes = {"a": _tar._HAND_OFF - 1, "b": _tar._HAND_OFF, "c": 2 * _tar._JOB + 3, "d": 9 * 1024 * 1024 + 1}
    for index, (name, size) in enumerate(sizes.items()):
        path = tree / name
        path.write_bytes(os.urandom(size))
        path.chmod(0o640 if index % 2 else 0o755)
        os.utime(path, (1_500_000_000 + index, 1_500_000_000 + index))
    os.link(tree / "d", tree / "d-link")
    data = packed(tree)
    before = _open_fds()
    restored = unpacked(data, tmp_path / "out", workers=workers)
    assert snapshot(restored) == snapshot(tree)  # bytes, modes and times, set after the last write
    assert (restored / "d").stat().st_ino == (restored / "d-link").stat().st_ino
    assert _open_fds() == before  # every file closed, whichever thread wrote it


@pytest.mark.parametrize("workers", [1, 2])
def test_a_later_entry_replaces_a_large_file_still_being_written(tmp_path: Path, workers: int) -> None:
    first, second = os.urandom(6 * 1024 * 1024), os.urandom(300_000)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for content in (first, second):
            info = tarfile.TarInfo("big")
            info.size, info.mtime = len(content), 1_600_000_000
            tar.addfile(info, io.BytesIO(content))
    restored = unpacked(buffer.getvalue(), tmp_path / "out", workers=workers)
    assert (restored / "big").read_bytes() == second
    assert int((restored / "big").stat().st_mtime) == 1_600_000_000


_FAILING_RESTORE = """
import os, resource, signal, sys, threading
from pathlib import Path
from checkpointio._archive import unpack_directory
data = Path(sys.argv[1]).read_bytes()
dest = Path(sys.argv[2])
dest.mkdir()
top = max(int(name) for name in os.listdir("/proc/self/fd"))
for fd in range(top + 1):  # no free descriptor below ``top``: the next ones opened are above it
    try:
        os.fstat(fd)
    except OSError:
        os.dup2(0, fd)
before = set(os.listdir("/proc/self/fd"))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
if sys.argv[3] == "fsize":  # writes past 2 MiB fail (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, resource.RLIM_INFINITY))
else:  # the destination can be opened (top + 1), a file in it cannot (EMFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
blocks = iter([[data[i : i + 100_000]] for i in range(0, len(data), 100_000)])
try:
    unpack_directory(lambda: next(blocks, []), dest, uri="test://archive", workers=2)
except OSError as error:
    print("errno", error.errno)
print("open", sorted(set(os.listdir("/proc/self/fd")) - before), "threads", threading.active_count())
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc and resource limits")
@pytest.mark.parametrize(
    ("limit", "files", "expected"),
    [("fsize", {"a": 100, "large": 6 * 1024 * 1024}, errno.EFBIG), ("nofile", {"a": 100, "b": 200}, errno.EMFILE)],
    ids=["large-file-write", "small-file-creation"],
)
def test_an_error_in_a_writer_thread_fails_the_restore_and_leaves_nothing_open(
    tmp_path: Path, limit: str, files: dict[str, int], expected: int
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name, size in files.items():
        (tree / name).write_bytes(os.urandom(size))
    archive = tmp_path / "archive"
    archive.write_bytes(packed(tree))
    root = str(Path(_tar.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_RESTORE, str(archive), str(tmp_path / "out"), limit],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["errno", str(expected), "open", "[]", "threads", "1"]


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("workers", [1, 2])
def test_entries_replacing_or_linking_files_still_being_created_restore_as_gnu_tar_does(
    tmp_path: Path, workers: int
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, kind: bytes, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname, info.mtime = kind, len(data), link, 1_600_000_000
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tar.addfile(info, io.BytesIO(data))

        add("d", tarfile.DIRTYPE)
        add("d/x", tarfile.REGTYPE, b"first x")
        add("d/y", tarfile.LNKTYPE, link="d/x")  # a hard link to a file just handed on
        add("d/x", tarfile.REGTYPE, b"second x")  # replaces it; d/y keeps the first
        add("d/z", tarfile.SYMTYPE, link="x")
        add("d/z", tarfile.REGTYPE, b"z replaces a symlink")
        add("d/w", tarfile.REGTYPE, b"a file, then a folder")
        add("d/w", tarfile.DIRTYPE)
        add("d/w/inside", tarfile.REGTYPE, b"in the folder")
        for index in range(200):  # more than one batch, in two folders
            add(f"e{index % 2}/f{index}", tarfile.REGTYPE, os.urandom(index * 37))
    data = buffer.getvalue()
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(["tar", "-x", "-C", str(gnu)], input=data, check=True)
    restored = unpacked(gzip.compress(data, compresslevel=1), tmp_path / "ours", workers=workers)
    assert snapshot(restored) == snapshot(gnu)
    assert (restored / "d" / "y").read_bytes() == b"first x"


def _ustar(entries: list[tuple[str, bytes, bytes, str]]) -> bytes:
    """A tar stream of ``(name, type, data, link)`` entries, mode 0o644, in plain ustar headers."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, kind, data, link in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size, info.mtime = kind, link, len(data), 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("writers", [0, 2])
def test_a_folder_of_plain_files_is_parsed_in_one_loop_and_restored_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writers: int
) -> None:
    """Most files of a folder go through the plain-file loop (not one general call each), and the
    rules hold in it: a later entry replaces an earlier file or symlink, never writes through it."""
    entries = [("d", tarfile.DIRTYPE, b"", "")]
    entries += [(f"d/f{n:03}", tarfile.REGTYPE, b"x" * n, "") for n in range(300)]
    entries += [("d/s", tarfile.SYMTYPE, b"", "f000"), ("d/s", tarfile.REGTYPE, b"over the link", "")]
    entries += [("d/f007", tarfile.REGTYPE, b"replaced", ""), ("./d/g", tarfile.REGTYPE, b"dot-slash", "")]
    general: list[str] = []
    entry = _tar._Extraction.entry

    def counted(self: _tar._Extraction, kind: bytes, name: str, link: str, size: int, mode: int, mtime: int) -> None:
        general.append(name)
        entry(self, kind, name, link, size, mode, mtime)

    monkeypatch.setattr(_tar._Extraction, "entry", counted)
    dest = tmp_path / "out"
    dest.mkdir()
    _tar.extract(io.BytesIO(_ustar(entries)).read, str(dest), writers=writers)
    assert len(general) < 10, general  # the folder, its first file, the replacements
    assert sorted(os.listdir(dest / "d")) == sorted(
        {name[4:] if name.startswith("./") else name[2:] for name, *_ in entries[1:]}
    )
    for n in range(300):
        if n != 7:
            assert (dest / "d" / f"f{n:03}").read_bytes() == b"x" * n
    assert (dest / "d" / "f007").read_bytes() == b"replaced"
    assert not (dest / "d" / "s").is_symlink() and (dest / "d" / "s").read_bytes() == b"over the link"
    assert (dest / "d" / "f000").read_bytes() == b""  # not written through the symlink
    assert (dest / "d" / "g").read_bytes() == b"dot-slash"
    assert os.stat(dest / "d" / "f123").st_mtime == 1_600_000_000
    assert os.stat(dest / "d" / "f123").st_mode & 0o7777 == 0o644


def test_a_save_takes_each_regular_files_stat_from_the_open_file_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk states folders, symlinks and special files; a regular file's size, mode and time
    come from the ``fstat`` of the open file (one system call per file fewer than an ``lstat``
    first). Small, large and hard-linked files still go where they belong."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for number in range(30):
        (tree / "sub" / f"small-{number:02d}").write_bytes(b"%d" % number * 50)
    (tree / "sub" / "large").write_bytes(os.urandom(300 * 1024))  # a gzip member of its own
    os.link(tree / "sub" / "small-05", tree / "linked")  # two names, one inode
    (tree / "link").symlink_to("sub/small-01")
    os.mkfifo(tree / "pipe")  # skipped with a warning
    stated: list[str] = []
    real_stat = os.stat

    def counting_stat(path: str | os.PathLike[str] | int, *args: object, **kwargs: object) -> os.stat_result:
        stated.append(os.fspath(path) if not isinstance(path, int) else str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    data = packed(tree)
    monkeypatch.undo()
    assert sorted(stated) == ["link", "pipe", "sub"]
    restored = unpacked(data, tmp_path / "out")
    (tree / "pipe").unlink()
    assert snapshot(restored) == snapshot(tree)
    assert os.stat(restored / "linked").st_ino == os.stat(restored / "sub" / "small-05").st_ino
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert [(m.name, m.type) for m in archive.getmembers() if m.name in ("linked", "sub/small-05")] == [
            ("linked", tarfile.REGTYPE),
            ("sub/small-05", tarfile.LNKTYPE),
        ]


def test_walking_a_flat_folder_holds_the_stat_of_one_run_not_of_every_file(tmp_path: Path) -> None:
    from checkpointio import _archive

    flat = tmp_path / "flat"
    flat.mkdir()
    count = 20_000
    for number in range(count):
        (flat / f"f{number:05d}").touch()
    tracemalloc.start()
    try:
        seen: list[str] = []
        for entry in _archive.walk_tree(str(flat)):
            if len(seen) < 3:
                seen.append(entry.rel)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == ["f00000", "f00001", "f00002"]
    # the listing (~120 bytes a name) and at most RUN_ENTRIES lstat results; one per file was ~550 bytes more
    assert peak < count * 250
    runs = [len(run.names) for run in _archive.walk_runs(str(flat))]
    assert sum(runs) == count and max(runs) == _archive.RUN_ENTRIES


@pytest.mark.parametrize("change", ["deleted", "now-a-folder", "now-a-symlink", "staging-name"])
def test_the_walk_refuses_an_entry_changed_since_its_folder_was_listed_and_leaves_out_staging_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    from checkpointio import SourceChangedError, _archive

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for name in ("a.bin", "b.bin", "c.bin"):
        (tree / "sub" / name).write_bytes(name.encode())
    (tree / "sub" / ".checkpointio-partial-0123456789abcdef0123456789abcdef").write_bytes(b"a killed restore's")
    real_listing = _archive._listing

    def listing(fd: int, shown: str, uri: str) -> tuple[list[str], list[str], list[bool]]:
        listed = real_listing(fd, shown, uri)
        if shown.endswith("sub") and change != "staging-name":
            changed = tree / "sub" / "b.bin"
            changed.unlink()
            if change == "now-a-folder":
                changed.mkdir()
            elif change == "now-a-symlink":
                changed.symlink_to("a.bin")
        return listed

    monkeypatch.setattr(_archive, "_listing", listing)
    if change == "staging-name":
        walked = [run.prefix + name for run in _archive.walk_runs(str(tree)) for name in run.names]
        assert walked == ["sub", "sub/a.bin", "sub/b.bin", "sub/c.bin"]
        return
    message = {
        "deleted": "sub/b.bin disappeared while",
        "now-a-folder": r"sub/b.bin was replaced while .* \(a file became a folder\)",
        "now-a-symlink": r"sub/b.bin was replaced while .* \(a file became a symlink\)",
    }[change]
    with pytest.raises(SourceChangedError, match=message):
        list(_archive.walk_runs(str(tree)))
