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
from collections.abc import Callable
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
    "crc32",
    "crc32_combine",
    "encode_member",
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


def _deflate(data: bytes | memoryview, level: int) -> bytes:
    compressor: Any
    if level == 0:
        compressor = zlib.compressobj(0, zlib.DEFLATED, -15)
    elif _isal is not None and level <= 3:
        compressor = _isal.compressobj(level, zlib.DEFLATED, -15)
    else:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return bytes(compressor.compress(data) + compressor.flush())


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


def _worth_deflating(block: bytes, level: int) -> bool:
    """Probe a sample: float noise and compressed files gain too little to pay for inflating."""
    sample = memoryview(block)[:_SAMPLE]
    return len(_deflate(sample, level)) < len(sample) * (1 - STORE_BELOW_SAVING)


def encode_member(block: bytes, level: int) -> bytes:
    """One gzip member holding ``block``: deflated at ``level``, or stored if that does not pay."""
    raw = _deflate(block, level) if level > 0 and _worth_deflating(block, level) else b""
    if not raw or len(raw) >= len(block):
        raw = _deflate(block, 0)
    total = _HEADER.size + len(raw) + _TRAILER.size
    header = _HEADER.pack(_MAGIC_FLAGS, 0, 0, 255, 8, ord("C"), ord("K"), 4, total)
    return header + raw + _TRAILER.pack(crc32(block), len(block) & 0xFFFFFFFF)


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


def is_stored_member(member: bytes) -> bool:
    """Whether one of our members holds its block stored (deflate block type 00), not compressed.

    Inflating a stored block is a copy and a CRC32: cheaper to do at once than to hand to a thread.
    """
    return len(member) > _HEADER.size and (member[_HEADER.size] >> 1) & 3 == 0


_STORED_HEAD = struct.Struct("<BHH")  # BFINAL/BTYPE bits, LEN, NLEN


def stored_data(member: bytes, *, check: bool = True) -> list[memoryview] | None:
    """The data of one of our members whose deflate stream is stored blocks only, as views of
    ``member`` (nothing copied), checked against the member's CRC32 and length; ``None`` when it
    holds any other kind of block or is not well formed (:func:`inflate_member` then inflates it,
    or says what is wrong with it). ``check=False`` leaves out the CRC32 (the length is still
    checked), for a caller that checks a CRC32 of the very bytes of ``member`` (see
    :class:`._archive.GunzipReader`).

    A stored block is a byte holding BFINAL and BTYPE 00, then LEN and its complement, then LEN
    bytes as they are; the blocks after a stored one start on a byte boundary, so the data can be
    found without inflating.

    Raises:
        CorruptCheckpointError: The data does not match the member's CRC32 or length.
    """
    end = len(member) - _TRAILER.size
    position = _HEADER.size
    views: list[memoryview] = []
    whole = memoryview(member)
    total = 0
    crc = 0
    while True:
        if position + _STORED_HEAD.size > end:
            return None
        flags, length, complement = _STORED_HEAD.unpack_from(member, position)
        start = position + _STORED_HEAD.size
        position = start + length
        if flags & 0b110 or length ^ complement != 0xFFFF or position > end:
            return None
        if length:
            view = whole[start:position]
            if check:
                crc = crc32(view, crc)
            views.append(view)
            total += length
        if flags & 1:
            break
    if position != end or total > MAX_MEMBER_OUTPUT:
        return None
    expected_crc, expected_size = _TRAILER.unpack_from(member, end)
    if (check and crc != expected_crc) or total & 0xFFFFFFFF != expected_size:
        raise CorruptCheckpointError("a gzip member fails its CRC32 check")
    return views


def inflate_member(member: bytes) -> bytes:
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
