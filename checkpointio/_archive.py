"""Directories as gzip-compressed tar streams, packed and unpacked in worker threads.

The only module that imports :mod:`tarfile` and the deflate codec. Everything here is blocking
and runs in a worker thread; bytes come and go through plain callables, so the caller decides
how they cross to the event loop.

The archive is a tar stream cut into blocks, each compressed as an independent gzip member.
Concatenated members are one valid ``.tar.gz`` (``tar -xzf``, :mod:`tarfile` and :mod:`gzip`
read it), and independent members let compression run on several threads.
"""

from __future__ import annotations

import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from ._exceptions import CheckpointError, CorruptCheckpointError, UnsafeArchiveError, UnsupportedSourceError

__all__ = ["GunzipReader", "looks_like_tar_gz", "pack_directory", "unpack_directory"]

logger = logging.getLogger("checkpointio")

Emit = Callable[[bytes], None]
Pull = Callable[[], bytes]

_GZIP_MAGIC = b"\x1f\x8b"
#: Bytes one inflate call may produce: bounds memory whatever the compression ratio (gzip bombs).
_INFLATE_STEP = 1024 * 1024
_COPY_BUFSIZE = 1024 * 1024
# How tarfile's header reading ended (private names, stable since Python 3.2).
_END_OF_ARCHIVE: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_MISSING_HEADER: tuple[type[Exception], ...] = (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)  # type: ignore[attr-defined]


class _GzipMemberWriter:
    """Write-only file for :class:`tarfile.TarFile`: cuts the tar stream into gzip members."""

    def __init__(self, emit: Emit, block_size: int, level: int) -> None:
        self._emit = emit
        self._block_size = block_size
        self._level = level
        self._buffer = bytearray()
        self._position = 0

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._position += len(data)
        while len(self._buffer) >= self._block_size:
            block = bytes(self._buffer[: self._block_size])
            del self._buffer[: self._block_size]
            self._emit_member(block)
        return len(data)

    def tell(self) -> int:
        return self._position

    def finish(self) -> None:
        if self._buffer:
            self._emit_member(bytes(self._buffer))
            self._buffer.clear()

    def _emit_member(self, block: bytes) -> None:
        compressor = zlib.compressobj(self._level, zlib.DEFLATED, 31)
        self._emit(compressor.compress(block) + compressor.flush())


def _iter_tree(root: str) -> Iterator[tuple[str, str]]:
    """Pre-order walk: every folder comes before what it holds, siblings sorted by name."""
    stack: list[tuple[str, str]] = []
    with os.scandir(root) as entries:
        stack.extend((entry.name, entry.path) for entry in sorted(entries, key=lambda e: e.name, reverse=True))
    while stack:
        rel, full = stack.pop()
        yield rel, full
        if os.path.isdir(full) and not os.path.islink(full):
            with os.scandir(full) as entries:
                children = sorted(entries, key=lambda e: e.name, reverse=True)
            stack.extend((f"{rel}/{entry.name}", entry.path) for entry in children)


def _check_link(rel: str, target: str, uri: str) -> None:
    """Refuse a symlink that would point outside the restored tree (extraction would refuse it)."""
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    if os.path.isabs(target) or resolved == ".." or resolved.startswith("../"):
        raise UnsupportedSourceError(
            f"{uri}: symlink {rel!r} -> {target!r} points outside the directory being saved; "
            "a restore would refuse it, so it is not saved (make it relative and inside the tree)",
            uri=uri,
        )


def pack_directory(root: Path, emit: Emit, *, block_size: int, level: int) -> None:
    """Write ``root``'s contents as a .tar.gz stream to ``emit``, one gzip member per block.

    Entries are named relative to ``root`` in sorted order; empty folders, symlinks (as links),
    hard links, modes and mtimes are kept; owners are not (a restore belongs to whoever runs it).
    Sockets, pipes and device files are skipped with a warning: they hold no data.
    """
    uri = str(root)
    sink = _GzipMemberWriter(emit, block_size, level)
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.copybufsize = _COPY_BUFSIZE
        for rel, full in _iter_tree(str(root)):
            info = tar.gettarinfo(full, arcname=rel)
            if info is None or not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
                logger.warning("checkpointio: skipping special file %s (not regular data)", full)
                continue
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.issym():
                _check_link(rel, info.linkname, uri)
            if info.isreg():
                with open(full, "rb") as source:
                    tar.addfile(info, source)
            else:
                tar.addfile(info)
    sink.finish()


class GunzipReader:
    """Read-only file over a stream of compressed chunks: inflates concatenated gzip members.

    Memory stays bounded by the chunk size plus one inflate step, whatever the ratio.
    """

    def __init__(self, pull: Pull) -> None:
        self._pull = pull
        self._inflater = zlib.decompressobj(31)
        self._member_started = False
        self._pending = b""
        self._output = bytearray()
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._output) < size):
            self._fill()
        if size < 0 or size >= len(self._output):
            data = bytes(self._output)
            self._output.clear()
        else:
            data = bytes(self._output[:size])
            del self._output[:size]
        return data

    def drain(self) -> int:
        """Inflate and discard the rest of the stream; return how many bytes that was."""
        drained = len(self._output)
        self._output.clear()
        while not self._eof:
            self._fill()
            drained += len(self._output)
            self._output.clear()
        return drained

    def _fill(self) -> None:
        inflater = self._inflater
        if inflater.eof:
            self._pending = inflater.unused_data + self._pending
            self._inflater = inflater = zlib.decompressobj(31)
            self._member_started = False
        if inflater.unconsumed_tail:
            data = inflater.unconsumed_tail
        elif self._pending:
            data, self._pending = self._pending, b""
        else:
            data = self._pull()
            if not data:
                if self._member_started:
                    raise CorruptCheckpointError("the archive is truncated: its last gzip member is incomplete")
                self._eof = True
                return
        if not self._member_started:
            data = data.lstrip(b"\x00")  # zero padding between members, as gzip(1) allows
            if not data:
                return
            self._member_started = True
        out = inflater.decompress(data, _INFLATE_STEP)
        self._output += out


def looks_like_tar_gz(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of an object) starts a gzip-compressed tar archive."""
    if not head.startswith(_GZIP_MAGIC):
        return False
    try:
        block = zlib.decompressobj(31).decompress(head, tarfile.BLOCKSIZE)
    except zlib.error:
        return False
    if len(block) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _restore_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """PEP 706's ``data`` filter, refusing absolute names outright instead of stripping the slash,
    and keeping folder modes (the owner always keeps rwx, to fill them)."""
    if member.name.startswith(("/", os.sep)) or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    safe = tarfile.data_filter(member, dest)
    if safe is not None and member.isdir():
        safe = safe.replace(mode=(member.mode & 0o755) | 0o700, deep=False)
    return safe


def unpack_directory(pull: Pull, dest: Path, *, uri: str) -> None:
    """Extract a .tar.gz stream from ``pull`` into the existing empty folder ``dest``.

    Nothing is written outside ``dest``: absolute names, ``..``, links pointing out and device
    files raise :class:`UnsafeArchiveError`. A truncated or garbled stream raises
    :class:`CorruptCheckpointError`. The stream is read to its end, so the caller's checksum
    covers every byte. On error, ``dest`` may hold part of the tree: the caller removes it.
    """
    if not hasattr(tarfile, "data_filter"):  # pragma: no cover - Python < 3.10.12 / 3.11.4
        raise CheckpointError("safe extraction needs Python 3.10.12+ or 3.11.4+ (tarfile filters)", uri=uri)
    reader = GunzipReader(pull)
    ending: list[BaseException | None] = [None]

    class _WatchedTarInfo(tarfile.TarInfo):
        """Records how the member list ended: tarfile stops quietly at a missing or bad header."""

        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:  # type: ignore[override]
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as error:
                ending[0] = error
                raise

    try:
        with tarfile.open(fileobj=reader, mode="r|", tarinfo=_WatchedTarInfo) as tar:  # type: ignore[call-overload]
            tar.extractall(dest, filter=_restore_filter)
        reader.drain()
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(f"{uri}: unsafe archive entry refused: {error}", uri=uri) from error
    except (tarfile.TarError, zlib.error, EOFError) as error:
        raise CorruptCheckpointError(f"{uri}: the archive is corrupt or truncated: {error}", uri=uri) from error
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"{uri}: {error}", uri=uri) from error
    if not isinstance(ending[0], _END_OF_ARCHIVE):
        reason = "no end-of-archive marker" if isinstance(ending[0], _MISSING_HEADER) else f"bad header ({ending[0]})"
        raise CorruptCheckpointError(f"{uri}: the archive is truncated or corrupt: {reason}", uri=uri)
