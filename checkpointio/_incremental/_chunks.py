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
from ._manifest import DEFLATED, HASH_BYTES, STORED, Hash

#: Bytes of a file read at once while cutting it into chunks.
READ_STEP = 8 * 1024 * 1024


def hash_of(data: bytes | memoryview) -> Hash:
    """A chunk's name: its BLAKE3 hash, truncated to ``HASH_BYTES``."""
    return blake3.blake3(data).digest(HASH_BYTES)


#: A save deflates chunks of at most ``_cdc.MINIMUM`` bytes (whole small files, a file's last
#: piece) together, in blocks of up to this many bytes: one deflate call (and one GIL hand-back)
#: per block rather than per chunk, and a stream the size of a few deflate windows rather than
#: one file. Larger chunks are a block each. Small enough that restoring one small file fetches
#: and inflates little (at most this much, and only up to the chunk).
BLOCK_BYTES = 256 * 1024

#: What :func:`encode_all` gives for each piece: its hash, the block holding it (an index in the
#: blocks it gives, or -1 when a parent or an earlier batch holds it) and its offset there.
Placed = tuple[Hash, int, int]
#: A block as its pack holds it: its bytes and its codec.
Block = tuple[bytes, int]


def encode_all(
    pieces: list[bytes], level: int, known: Container[Hash], also: Container[Hash]
) -> tuple[list[Placed], list[Block]]:
    """Each piece's hash and where it is in the blocks given for it (none when ``known`` or
    ``also`` has it already, or an earlier piece of the list has the same hash), and those
    blocks: each deflated (``DEFLATED``) when that saves enough, else ``STORED``. Pieces of at
    most ``_cdc.MINIMUM`` bytes share blocks of up to :data:`BLOCK_BYTES`, in their order; larger
    ones are a block each. Runs on worker threads (BLAKE3 and deflate let go of the GIL), with
    no Python call per piece beyond its hash."""
    deflate = _codec.raw_deflate_function(level) if level > 0 else None
    keep = 1 - _codec.STORE_BELOW_SAVING
    blake = blake3.blake3
    placed: list[Placed] = []
    add = placed.append
    blocks: list[Block] = []
    seen: dict[Hash, tuple[int, int]] = {}
    group: list[bytes] = []  # the small pieces of the block being filled
    group_length = 0
    group_at = -1
    small = _cdc.MINIMUM

    def block(data: bytes, at: int) -> None:
        if deflate is not None and len(data) >= 64 and len(deflated := deflate(data, level, -15)) < len(data) * keep:
            blocks[at] = (deflated, DEFLATED)
        else:
            blocks[at] = (data, STORED)

    for data in pieces:
        digest = blake(data).digest(HASH_BYTES)
        if digest in known or digest in also:
            add((digest, -1, 0))
        elif (where := seen.get(digest)) is not None:
            add((digest, *where))
        elif len(data) > small:
            seen[digest] = where = (len(blocks), 0)
            add((digest, *where))
            blocks.append((b"", STORED))
            block(data, where[0])
        else:
            if group_length + len(data) > BLOCK_BYTES:
                block(b"".join(group), group_at)
                group, group_length = [], 0
            if not group:  # the group's place, filled once it is full
                group_at = len(blocks)
                blocks.append((b"", STORED))
            seen[digest] = where = (group_at, group_length)
            add((digest, *where))
            group.append(data)
            group_length += len(data)
    if group:
        block(b"".join(group), group_at)
    return placed, blocks


def decode_block(codec: int, stored: memoryview, length: int) -> bytes | memoryview:
    """The first ``length`` bytes a pack block holds (fewer when it holds fewer: the caller
    checks each chunk's range), from its bytes ``stored``: inflated (never beyond ``length``: a
    hostile block cannot make a reader hold more), or a view of ``stored`` (no copy: valid while
    the caller holds what it views).

    Raises:
        ValueError: It does not inflate.
    """
    if codec != DEFLATED:
        return stored[:length]
    inflater = _codec.raw_inflater()
    try:
        data: bytes = inflater.decompress(stored, length)
    except _codec.InflateError as error:
        raise ValueError(f"is in a block that does not inflate: {error}") from None
    return data


def check(chunk_hash: Hash, data: bytes | memoryview) -> None:
    """Raises:
    ValueError: ``data`` is not the chunk of that hash."""
    if hash_of(data) != chunk_hash:
        raise ValueError("fails its BLAKE3 check")


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
