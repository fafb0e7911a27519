"""Deflate, inflate and CRC32: the fastest backend installed, and the gzip member format.

ISA-L (the ``isal`` package) deflates 10-25x faster than zlib at level 1 with the same ratio, and
computes CRC32 at several GB/s; stdlib ``zlib`` is the fallback where its wheel is missing.
Levels 1-3 use ISA-L's levels 1-3; 4-9 use zlib (slower, a little smaller); 0 stores.

A directory archive is a series of gzip members, one per block, each independent. checkpointio's
members carry their own length in a gzip extra field (subfield ``CK``, as BGZF does with ``BC``), so
a reader can cut the stream into members without inflating it, and inflate several at once. Any
gzip reader still reads the stream as one ordinary ``.tar.gz``.
"""

from __future__ import annotations

import importlib
import queue
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar, cast

from ._exceptions import CorruptCheckpointError

_isal: Any
try:  # pragma: no cover - depends on the installed wheels
    _isal = importlib.import_module("isal.isal_zlib")
except ImportError:  # pragma: no cover
    _isal = None

#: What a garbled deflate stream raises, whichever backend inflates it.
InflateError: tuple[type[Exception], ...] = (zlib.error, _isal.error) if _isal is not None else (zlib.error,)

__all__ = [
    "BACKEND",
    "CAN_COMBINE",
    "InflateError",
    "MAX_MEMBER_OUTPUT",
    "OrderedPool",
    "Scratch",
    "crc32",
    "crc32_combine",
    "encode_member",
    "encode_pieces",
    "inflate_member",
    "is_stored_member",
    "member_length",
    "stored_data",
]

T = TypeVar("T")

#: Which deflate implementation is in use: "isal" or "zlib".
BACKEND = "isal" if _isal is not None else "zlib"

#: A block is stored, not deflated, when deflating a sample of it saves less than this fraction.
STORE_BELOW_SAVING = 0.10
_SAMPLE = 64 * 1024
#: Most bytes one of our members may inflate to: bounds memory against crafted archives.
MAX_MEMBER_OUTPUT = 64 * 1024 * 1024

_HEADER = struct.Struct("<4sIBBHBBHI")  # magic+CM+FLG, MTIME, XFL, OS, XLEN, SI1, SI2, LEN, member size
_MAGIC_FLAGS = b"\x1f\x8b\x08\x04"  # gzip, deflate, FEXTRA
_TRAILER = struct.Struct("<II")
_STORED_HEAD = struct.Struct("<BHH")  # a stored deflate block: BFINAL/BTYPE bits, LEN, NLEN
#: The shortest and longest member we write: an empty deflate block (2 bytes), and a block of
#: ``MAX_MEMBER_OUTPUT`` stored (5 bytes of framing per 64 KiB block, and zlib's flush may add an
#: empty final one; 64 KiB of slack on top). A stated length outside them is a crafted or garbled
#: header: buffering it whole would let 20 bytes ask for gigabytes.
_MIN_MEMBER = _HEADER.size + 2 + _TRAILER.size
_MAX_MEMBER = _HEADER.size + MAX_MEMBER_OUTPUT + 5 * (MAX_MEMBER_OUTPUT // 65535 + 2) + 65536 + _TRAILER.size


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32 (the gzip/zlib/S3 polynomial) of ``data``, continuing from ``value``."""
    if _isal is not None:
        return int(_isal.crc32(data, value))
    return zlib.crc32(data, value)


#: Whether :func:`crc32_combine` is available (ISA-L has it; stdlib ``zlib`` does not expose it).
CAN_COMBINE = _isal is not None and hasattr(_isal, "crc32_combine")


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """The CRC32 of two pieces joined, from each piece's CRC32 (needs :data:`CAN_COMBINE`)."""
    return int(_isal.crc32_combine(first, second, second_length))


def raw_deflate_function(level: int) -> Callable[..., bytes]:
    """The one-shot raw deflate of ``level`` (1-9), called as ``f(data, level, -15)``: one call a
    piece, for callers deflating many small pieces (no compressor object each)."""
    if _isal is not None and level <= 3:
        return cast(Callable[..., bytes], _isal.compress)
    if sys.version_info >= (3, 11):
        return zlib.compress  # takes wbits from 3.11 on
    return _deflate_raw


def _deflate_raw(data: bytes | memoryview, level: int, wbits: int) -> bytes:
    """``zlib.compress(data, level, wbits)`` where ``zlib.compress`` takes no ``wbits`` (3.10)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


#: What a member is encoded from: bytes, or views of bytes nobody changes until it is encoded.
Piece = bytes | bytearray | memoryview

#: The most data one stored deflate block holds (its length field is 16 bits).
_STORED_BLOCK = 0xFFFF
#: Blocks of more pieces than this are joined (in a :class:`Scratch` buffer) before they are encoded.
_FEW_PIECES = 2


def _worth_deflating(sample: Piece, level: int) -> bool:
    """Probe a sample: float noise and compressed files gain too little to pay for inflating."""
    return len(_deflate_once(sample, level)) < len(sample) * (1 - STORE_BELOW_SAVING)


def _sample(pieces: Sequence[Piece]) -> Piece:
    """The first ``_SAMPLE`` bytes of ``pieces`` joined (a view when the first piece holds them)."""
    first = pieces[0]
    if len(first) >= _SAMPLE or len(pieces) == 1:
        return memoryview(first)[:_SAMPLE]
    parts: list[Piece] = []
    taken = 0
    for piece in pieces:
        parts.append(memoryview(piece)[: _SAMPLE - taken])
        taken += len(parts[-1])
        if taken >= _SAMPLE:
            break
    return b"".join(parts)


def encode_member(block: Piece, level: int) -> bytes:
    """One gzip member holding ``block``: deflated at ``level``, or stored if that does not pay."""
    return encode_pieces([block], level)


def encode_pieces(pieces: Sequence[Piece], level: int, scratch: Scratch | None = None) -> bytes:
    """One gzip member holding ``pieces`` joined: deflated at ``level``, or stored if that does
    not pay (see :data:`STORE_BELOW_SAVING`). ``pieces`` are byte buffers (``memoryview`` of
    format ``B``) that must not change until this returns; ``scratch`` gives the buffer more
    than a few of them are joined in (its size at least theirs), else one is made.

    The member is the one large buffer allocated: a stored member is framed around views of the
    pieces and joined once, a deflated one has its header, deflate output and trailer joined once.
    Allocations of a few sizes, not several copies of every block, keep glibc's heap from being
    returned to the system and faulted in again on every member (benchmarks/README.md, issue 19).
    """
    size = sum(map(len, pieces))
    buffer = None
    if len(pieces) > _FEW_PIECES:  # joined first: a C call a piece would take the GIL back for each
        if scratch is None:
            pieces = [b"".join(pieces)]
        else:
            buffer = scratch.take()
            position = 0
            for piece in pieces:
                end = position + len(piece)
                buffer[position:end] = piece
                position = end
            pieces = [buffer[:size]]
    try:
        crc = 0
        for piece in pieces:
            crc = crc32(piece, crc)
        if level > 0 and size and _worth_deflating(_sample(pieces), level):
            compressor = _compressor(level)
            parts = [b"", *map(compressor.compress, pieces), compressor.flush()]
            body = sum(map(len, parts))
            if body < size:
                parts[0] = _member_header(body)
                parts.append(_TRAILER.pack(crc, size & 0xFFFFFFFF))
                return b"".join(parts)
        return _stored_member(pieces, size, crc)
    finally:
        if buffer is not None and scratch is not None:
            scratch.give(buffer)


class Scratch:
    """Buffers of one size to join a block's pieces in before deflating it, reused: as many are
    made as threads join at once. A fresh buffer of a block's size for every block is what glibc
    serves by growing its heap and then returns to the system, to fault in again for the next."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[memoryview] = []

    def take(self) -> memoryview:
        """A buffer of :attr:`size` bytes for this thread alone, until it is given back."""
        try:
            return self._free.pop()  # list.pop and list.append are atomic: threads share this
        except IndexError:
            return memoryview(bytearray(self.size))

    def give(self, buffer: memoryview) -> None:
        self._free.append(buffer)


def _deflate_once(data: Piece, level: int) -> bytes:
    """``data`` as one raw deflate stream at ``level`` (1-9), in one call."""
    return raw_deflate_function(level)(data, level, -15)


def _compressor(level: int) -> Any:
    """A raw deflate (wbits=-15) compressor of ``level`` (1-9), of the fastest backend for it."""
    if _isal is not None and level <= 3:
        return _isal.compressobj(level, zlib.DEFLATED, -15)
    return zlib.compressobj(level, zlib.DEFLATED, -15)


def _member_header(body: int) -> bytes:
    """The header of one of our members whose deflate stream is ``body`` bytes long."""
    total = _HEADER.size + body + _TRAILER.size
    return _HEADER.pack(_MAGIC_FLAGS, 0, 0, 255, 8, ord("C"), ord("K"), 4, total)


def _stored_member(pieces: Sequence[Piece], size: int, crc: int) -> bytes:
    """A member holding ``pieces`` (``size`` bytes, CRC32 ``crc``) as stored deflate blocks of
    :data:`_STORED_BLOCK` bytes (the last one shorter, and final), each framed around views of the
    pieces: the bytes are copied once, into the member."""
    blocks = max(1, -(-size // _STORED_BLOCK))
    parts: list[Piece] = [_member_header(size + blocks * _STORED_HEAD.size)]
    remaining = size  # data not yet in a block
    room = 0  # data the current block still takes
    if not size:
        parts.append(_STORED_HEAD.pack(1, 0, 0xFFFF))
    for piece in pieces:
        view = memoryview(piece)
        start, end = 0, len(view)
        while start < end:
            if not room:
                room = min(remaining, _STORED_BLOCK)
                remaining -= room
                parts.append(_STORED_HEAD.pack(remaining == 0, room, room ^ 0xFFFF))
            taken = min(room, end - start)
            parts.append(view[start : start + taken])
            start += taken
            room -= taken
    parts.append(_TRAILER.pack(crc, size & 0xFFFFFFFF))
    return b"".join(parts)


def member_length(head: bytes | bytearray) -> int | None:
    """The total length of the member starting ``head`` if checkpointio wrote it, else ``None``.

    ``head`` needs at least 20 bytes; fewer, or a member of another writer, gives ``None``.

    Raises:
        CorruptCheckpointError: A member of ours states a length no member can have.
    """
    if len(head) < _HEADER.size or bytes(head[:4]) != _MAGIC_FLAGS:
        return None
    _, _, _, _, xlen, si1, si2, sublen, total = _HEADER.unpack_from(head)
    if xlen != 8 or si1 != ord("C") or si2 != ord("K") or sublen != 4:
        return None
    if not _MIN_MEMBER <= total <= _MAX_MEMBER:
        raise CorruptCheckpointError(f"the archive is garbled: a gzip member states a length of {total} bytes")
    return int(total)


def is_stored_member(member: bytes | Sequence[memoryview]) -> bool:
    """Whether one of our members holds its block stored (deflate block type 00), not compressed.
    ``member``: its bytes, or consecutive views holding them.

    Inflating a stored block is a copy and a CRC32: cheaper to do at once than to hand to a thread.
    """
    first = _Cursor(_as_views(member))
    first.skip(_HEADER.size)
    mode = first.small(1)
    return len(mode) == 1 and (mode[0] >> 1) & 3 == 0


def stored_data(member: bytes | Sequence[memoryview], *, check: bool = True) -> list[memoryview] | None:
    """The data of one of our members whose deflate stream is stored blocks only, as views of
    ``member`` (nothing copied), checked against the member's CRC32 and length; ``None`` when it
    holds any other kind of block or is not well formed (:func:`inflate_member` then inflates it,
    or says what is wrong with it). ``member``: its bytes, or consecutive views holding them (the
    blocks it arrived in: nothing is joined). ``check=False`` leaves out the CRC32 (the length is
    still checked), for a caller that checks a CRC32 of the very bytes of ``member`` (see
    :class:`._archive.GunzipReader`).

    A stored block is a byte holding BFINAL and BTYPE 00, then LEN and its complement, then LEN
    bytes as they are; the blocks after a stored one start on a byte boundary, so the data can be
    found without inflating.

    Raises:
        CorruptCheckpointError: The data does not match the member's CRC32 or length.
    """
    pieces = _as_views(member)
    end = sum(map(len, pieces)) - _TRAILER.size
    cursor = _Cursor(pieces)
    cursor.skip(_HEADER.size)
    position = _HEADER.size
    views: list[memoryview] = []
    total = 0
    crc = 0
    while True:
        if position + _STORED_HEAD.size > end:
            return None
        flags, length, complement = _STORED_HEAD.unpack(cursor.small(_STORED_HEAD.size))
        position += _STORED_HEAD.size + length
        if flags & 0b110 or length ^ complement != 0xFFFF or position > end:
            return None
        if length:
            for view in cursor.views(length):
                if check:
                    crc = crc32(view, crc)
                views.append(view)
            total += length
        if flags & 1:
            break
    if position != end or total > MAX_MEMBER_OUTPUT:
        return None
    expected_crc, expected_size = _TRAILER.unpack(cursor.small(_TRAILER.size))
    if (check and crc != expected_crc) or total & 0xFFFFFFFF != expected_size:
        raise CorruptCheckpointError("a gzip member fails its CRC32 check")
    return views


def _as_views(member: bytes | Sequence[memoryview]) -> Sequence[memoryview]:
    return [memoryview(member)] if isinstance(member, (bytes, bytearray, memoryview)) else member


class _Cursor:
    """Reads bytes held as consecutive views from the front, as views of them or small copies."""

    def __init__(self, pieces: Sequence[memoryview]) -> None:
        self._pieces = pieces
        self._index = 0  # the piece holding the next byte
        self._offset = 0  # where in it

    def views(self, size: int) -> list[memoryview]:
        """The next ``size`` bytes (fewer at the end) as views: one per piece they lie in."""
        out: list[memoryview] = []
        pieces = self._pieces
        while size > 0 and self._index < len(pieces):
            piece = pieces[self._index]
            taken = min(size, len(piece) - self._offset)
            out.append(piece[self._offset : self._offset + taken])
            size -= taken
            self._offset += taken
            if self._offset == len(piece):
                self._index += 1
                self._offset = 0
        return out

    def small(self, size: int) -> bytes:
        """A copy of the next ``size`` bytes (fewer at the end): a header or a trailer."""
        views = self.views(size)
        return bytes(views[0]) if len(views) == 1 else b"".join(views)

    def skip(self, size: int) -> None:
        self.views(size)


def inflate_member(member: bytes | memoryview) -> bytes:
    """Inflate one of our members and check its CRC32 and length.

    The output is limited to the length its trailer states (at most ``MAX_MEMBER_OUTPUT``): the
    inflater then allocates it once, which takes a third less time than letting it grow its
    buffer towards the 64 MiB bound (data beyond the stated length is an error either way).
    """
    body = memoryview(member)[_HEADER.size : len(member) - _TRAILER.size]
    expected_crc, expected_size = _TRAILER.unpack_from(member, len(member) - _TRAILER.size)
    inflater = (_isal or zlib).decompressobj(-15)
    try:  # a limit of 0 means none: an empty member's is 1
        data = bytes(inflater.decompress(body, min(expected_size, MAX_MEMBER_OUTPUT) or 1))
    except InflateError as error:
        raise CorruptCheckpointError(f"a gzip member does not inflate: {error}") from None
    if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise CorruptCheckpointError("a gzip member is garbled or inflates beyond the limit")
    if crc32(data) != expected_crc or len(data) & 0xFFFFFFFF != expected_size:
        raise CorruptCheckpointError("a gzip member fails its CRC32 check")
    return data


def raw_inflater() -> Any:
    """A raw deflate (wbits=-15) decompressor, of the fastest backend installed."""
    return (_isal or zlib).decompressobj(-15)


def sequential_inflater() -> Any:
    """A gzip (wbits=31) decompressor for streams other writers made, one member at a time."""
    return (_isal or zlib).decompressobj(31)


class OrderedPool:
    """Runs jobs on a few threads of its own; the caller takes results in submission order.

    Own threads rather than ``concurrent.futures.ThreadPoolExecutor``: executors refuse work
    once the interpreter starts exiting, and a checkpoint saved from an ``atexit`` handler must
    still go through. deflate, inflate and CRC32 release the GIL, so the threads run in parallel.
    """

    def __init__(self, workers: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, name="checkpointio-codec", daemon=True) for _ in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:
                future.set_exception(error)

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
