"""File data is written whole, in pieces of at most 256 KiB a system call, from views of any format."""

from __future__ import annotations

import array
import os
from pathlib import Path

import pytest

from checkpointio._writes import PIECE, write_all, write_views


@pytest.mark.parametrize("offset", [None, 7])
def test_views_of_any_format_and_size_are_written_whole_and_in_order(tmp_path: Path, offset: int | None) -> None:
    ints = array.array("i", range(100_000))
    views = [memoryview(ints), memoryview(b"x"), memoryview(b""), memoryview(bytes(PIECE + 1)), memoryview(b"end")]
    expected = b"".join(view.tobytes() for view in views)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_views(fd, views, offset)
        write_views(fd, [memoryview(ints)], None if offset is None else offset + len(expected))
    finally:
        os.close(fd)
    written = path.read_bytes()
    assert written[offset or 0 :] == expected + ints.tobytes()


def test_write_all_writes_a_view_of_any_format_whole(tmp_path: Path) -> None:
    data = array.array("d", (i / 3 for i in range(70_000)))
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_all(fd, memoryview(data))
    finally:
        os.close(fd)
    assert path.read_bytes() == data.tobytes()
