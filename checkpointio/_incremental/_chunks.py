"""Chunks: how a file is cut (by content, :mod:`.._cdc`), how a chunk is named (its hash) and held
in a pack (deflated, or stored when that does not pay), and how it is read back and checked.

Chunks are named by BLAKE3 (128 bits): 1.5 GB/s per core here, faster than deflate and the disk,
and collision resistant, which naming data by its hash needs (a restore trusts the name; xxh3
is twice as fast but an engineered collision would restore the wrong bytes silently).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator

import blake3

from .. import _archive, _cdc, _codec
from ._manifest import DEFLATED, HASH_BYTES, STORED, Chunk, Hash

#: Bytes of a file read at once while cutting it into chunks.
READ_STEP = 8 * 1024 * 1024


def hash_of(data: bytes | memoryview) -> Hash:
    """A chunk's name: its BLAKE3 hash, truncated to ``HASH_BYTES``."""
    return blake3.blake3(data).digest(HASH_BYTES)


def encode_all(
    pieces: list[bytes], level: int, known: Container[Hash], also: Container[Hash]
) -> list[tuple[Hash, bytes | None, int]]:
    """Each piece's hash, and what its pack holds for it (``None`` when ``known`` or ``also`` has it
    already) and how (``STORED``, or ``DEFLATED`` when that saves enough). Runs on worker threads
    (BLAKE3 and deflate let go of the GIL), one loop with no Python call per piece beyond the hash
    and the deflate: a save's pieces are mostly files below the minimum chunk, ~7 KiB each, and
    the Python around each one weighed as much as its hash."""
    deflate = _codec.raw_deflate_function(level) if level > 0 else None
    keep = 1 - _codec.STORE_BELOW_SAVING
    blake = blake3.blake3
    encoded: list[tuple[Hash, bytes | None, int]] = []
    add = encoded.append
    for data in pieces:
        digest = blake(data).digest(HASH_BYTES)
        if digest in known or digest in also:
            add((digest, None, STORED))
        elif deflate is not None and len(data) >= 64 and len(deflated := deflate(data, level, -15)) < len(data) * keep:
            add((digest, deflated, DEFLATED))
        else:
            add((digest, data, STORED))
    return encoded


def decode(chunk: Chunk, stored: memoryview) -> bytes | memoryview:
    """A chunk's bytes from what its pack holds, checked against its hash: a stored chunk is
    ``stored`` itself (no copy: valid while the caller holds what it views).

    Raises:
        ValueError: They do not inflate, or not to the chunk's size and hash.
    """
    data: bytes | memoryview
    if chunk.codec == DEFLATED:
        inflater = _codec.raw_inflater()
        try:
            data = inflater.decompress(stored, chunk.size)
        except _codec.InflateError as error:
            raise ValueError(f"does not inflate: {error}") from None
        if len(data) != chunk.size or inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("inflates to another size")
    else:
        data = stored
    if hash_of(data) != chunk.hash:
        raise ValueError("fails its BLAKE3 check")
    return data


def pieces(fd: int, size: int, full: str, uri: str, on_read: Callable[[int], None]) -> Iterator[bytes]:
    """The chunks of the ``size`` bytes of the open file ``fd``, cut by content, as bytes;
    ``on_read`` is told of every block read."""
    buffer = bytearray()
    data = _archive.file_data(fd, size, full, uri, READ_STEP)
    done = False
    while not done:
        block = next(data, None)
        if block is None:
            done = True
        else:
            buffer += block
            on_read(len(block))
            if len(buffer) < READ_STEP and len(buffer) < size:
                continue
        view = memoryview(buffer)
        start = 0
        try:
            for length in _cdc.cut_points(view, final=done):
                yield bytes(view[start : start + length])
                start += length
        finally:
            view.release()
        del buffer[:start]
        if block is None:
            break
