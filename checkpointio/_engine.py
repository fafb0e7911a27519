"""Async save and load: a worker thread and a store joined by a bounded stream, in one task group.

A save runs the producer (bytes slicer, file reader or tar.gz packer) in a worker thread that keeps
a running CRC32 and pushes chunks into a bounded memory stream; the store consumes the stream on
the event loop. A load is the mirror image: the store fetches onto the stream, a worker thread
checksums what it reads and writes it under a staging name, and only once the checksum matched is
the result put in place (all or none, by :mod:`._placement`). Back-pressure of the stream bounds
memory; the task group ties both sides' lifetimes, so an error or cancellation on either side stops
the other and the store aborts instead of committing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeGuard, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from . import _allocator, _archive, _codec, _partial, _placement, _tar, _toc
from ._concurrency import PLUMBING as _PLUMBING
from ._concurrency import Aborted as _Aborted
from ._concurrency import Handoff, one_error
from ._config import TransferConfig, codec_workers
from ._exceptions import (
    CheckpointError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    SourceNotFoundError,
    UnsupportedSourceError,
)
from ._location import Location
from ._progress import Meter, ProgressCallback, human_size
from ._selection import Entry, Roots, Selection, normal_path
from ._stores import (
    DISTRIBUTED,
    INCREMENTAL,
    MANIFEST_MAGIC,
    Blocks,
    Body,
    Digest,
    Kind,
    ObjectInfo,
    RangedStore,
    Record,
    Store,
)
from ._stores._local import own_files
from ._writes import write_all, write_views

__all__ = [
    "PAYLOAD_NAME",
    "SaveData",
    "Writer",
    "head_for_reads",
    "load",
    "load_bytes",
    "load_object",
    "save",
    "save_object",
    "save_written",
    "store_files_in",
    "unsupported_type",
    "verify",
    "write_out",
]

#: The file a restored bytes or single-file checkpoint is written to, inside the workspace.
PAYLOAD_NAME = "payload"

#: What ``save()`` takes: bytes, a path to a file or directory, or a binary file object read to its
#: end (stdin, a pipe, a socket), streamed and stored as bytes.
SaveData = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]
#: Writes a single-file checkpoint into the binary file object it is given (e.g. ``torch.save``).
Writer = Callable[[BinaryIO], None]

T = TypeVar("T")

logger = logging.getLogger(__name__)


def _own_thread() -> anyio.CapacityLimiter:
    """A limiter of one for a pipeline thread that lives as long as its transfer.

    Taking a token of anyio's default limiter instead would let 40 concurrent transfers hold all
    of them while waiting on stores whose short file operations need a token too: a deadlock.
    """
    return anyio.CapacityLimiter(1)


@dataclass(frozen=True)
class _Source:
    kind: Kind
    size: int | None
    data: bytes | memoryview | None = None
    path: Path | None = None
    stream: IO[bytes] | None = None
    writer: Writer | None = None
    #: The path messages name: the one given, also when ``path`` is a snapshot of it.
    shown: str | None = None
    #: The record's layout (see ``Record.layout``).
    layout: str | None = None


class _ChunkingWriter(io.RawIOBase):
    """A write-only file object that hands ``step``-sized chunks to ``emit`` as they fill."""

    def __init__(self, emit: Callable[[bytes], None], step: int) -> None:
        self._emit = emit
        self._step = step
        self._buffer = bytearray()
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        length = len(view)
        self._written += length
        start = 0
        if self._buffer:  # complete the chunk begun by earlier writes first
            start = min(length, self._step - len(self._buffer))
            self._buffer += view[:start]
            if len(self._buffer) == self._step:
                self._emit(bytes(self._buffer))
                self._buffer.clear()
        while length - start >= self._step:  # whole chunks straight from the caller's bytes: one copy each
            self._emit(bytes(view[start : start + self._step]))
            start += self._step
        if start < length:
            self._buffer += view[start:]
        return length

    def tell(self) -> int:
        return self._written

    def finish(self) -> None:
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()


def _classify(data: object, shown: str | None = None) -> _Source:
    """What ``data`` is; ``shown`` is the path messages name (the user's, for a snapshot of it)."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        return _Source(Kind.BYTES, len(view), data=view)
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        shown = shown if shown is not None else str(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise SourceNotFoundError(f"cannot save {shown!r}: no such file or directory", uri=shown) from None
        if stat.S_ISDIR(st.st_mode):
            return _Source(Kind.DIRECTORY, None, path=path, shown=shown)
        if stat.S_ISREG(st.st_mode):
            return _Source(Kind.FILE, st.st_size, path=path, shown=shown)
        raise unsupported_type(shown, st.st_mode)
    if hasattr(data, "read") and not isinstance(data, io.TextIOBase):
        return _Source(Kind.BYTES, None, stream=data)  # type: ignore[arg-type]
    raise TypeError(
        f"save() takes bytes, a str path or a pathlib.Path (or a binary file object), not {type(data).__name__}"
    )


def unsupported_type(shown: str, mode: int) -> UnsupportedSourceError:
    """The error for a path given to ``save()`` that is neither a regular file nor a directory."""
    return UnsupportedSourceError(
        f"cannot save {shown!r}: it is {_archive.file_type(mode)}, not a regular file or directory (to save "
        "what a pipe carries, pass it open in binary mode, or pipe it to `checkpointio save - URI`)",
        uri=shown,
    )


def store_files_in(location: Location, root: Path) -> _archive.Skip | None:
    """For a folder saved to a local key inside it: the store's own files for that key (the
    checkpoint, its record, temporary files of saves to it), left out of the archive as ``tar``
    leaves out its own; else every save would store the previous checkpoint. ``None`` otherwise.

    The key's folder is created first when it lies inside the tree (the store would create it
    while the tree is walked), so that whether the archive holds it does not depend on timing.
    """
    if location.scheme != "file":
        return None
    key = Path(location.key)
    skip = _archive.skip_within(str(root), str(key.parent), own_files(key))
    if skip is not None:
        with contextlib.suppress(OSError):  # the store reports what is wrong with the folder
            key.parent.mkdir(parents=True, exist_ok=True)
    return skip


#: Bytes per CRC32 call when reading a source up front: the GIL is let go between calls.
_CRC_STEP = 4 * 1024 * 1024


def _crc32_up_front(source: _Source) -> Callable[[], int] | None:
    """For bytes and files (sizes known in advance): a function that reads the source once more
    and returns its CRC32, for stores that record it before the data (see ``Body``)."""
    if source.data is not None:
        data = source.data

        def of_bytes() -> int:
            crc = 0
            for start in range(0, len(data), _CRC_STEP):
                crc = _codec.crc32(data[start : start + _CRC_STEP], crc)
            return crc

        return of_bytes
    if source.kind is Kind.FILE and source.path is not None and source.size is not None:
        path, size = source.path, source.size

        def of_file() -> int:
            crc = 0
            for chunk in _file_chunks(path, size, _CRC_STEP, source.shown):
                crc = _codec.crc32(chunk, crc)
            return crc

        return of_file
    return None


def _file_chunks(path: Path, size: int, step: int, shown: str | None = None) -> Iterator[bytes]:
    """The ``size`` bytes a file held when ``save()`` was called (as for a directory's files: a
    file that grew is stored as it was then, one that shrank fails the save)."""
    shown = shown if shown is not None else str(path)
    try:
        file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below; the error is translated)
    except PermissionError as error:
        raise _archive.unreadable(error, shown, shown) from error
    with file:
        yield from _archive.file_data(file.fileno(), size, shown, shown, step)


def _produce(
    source: _Source,
    emit: Callable[[bytes], None],
    config: TransferConfig,
    meter: Meter,
    skip: _archive.Skip | None = None,
) -> None:
    """Worker thread: turn the source into chunks (a directory without what ``skip`` names, its
    files counted by ``meter``)."""
    step = config.chunk_size
    if source.writer is not None:
        out = _ChunkingWriter(emit, step)
        source.writer(out)  # type: ignore[arg-type]
        out.finish()
    elif source.data is not None:
        view = source.data
        for start in range(0, len(view), step):
            emit(bytes(view[start : start + step]))
    elif source.stream is not None:
        while chunk := source.stream.read(step):
            emit(bytes(chunk))
    elif source.kind is Kind.FILE:
        assert source.path is not None and source.size is not None
        for chunk in _file_chunks(source.path, source.size, step, source.shown):
            emit(chunk)
    else:
        assert source.path is not None
        if meter.reporting:  # progress against the source's size, as rsync and aws s3 cp show it
            meter.source_total = _archive.tree_size(source.path, shown=source.shown, skip=skip)
        _archive.pack_directory(
            source.path,
            emit,
            block_size=step,
            level=config.compression_level,
            workers=codec_workers(config),
            shown=source.shown,
            skip=skip,
            on_read=meter.read,
        )


async def save(
    store: Store,
    location: Location,
    data: SaveData,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
    *,
    check: Callable[[], None] | None = None,
    shown: str | None = None,
    skip: _archive.Skip | None = None,
    force: bool = False,
) -> ObjectInfo:
    """Save ``data`` (bytes, a file, a directory or a binary stream) at ``location``; atomic on every store.

    ``on_progress`` hears of each chunk handed to the store, from the producer thread, and of the
    commit. ``check`` runs in the producer thread once every byte was read and before the store
    may commit; an error it raises fails the save (a background snapshot uses it to refuse files
    rewritten in place). A background snapshot also gives ``shown``, the user's path for messages,
    and ``skip``, what its tree leaves out (else :func:`store_files_in` is applied here). ``force``
    replaces a local file checkpointio did not write (see ``Store.put``).
    """
    source = _classify(data, shown)
    if source.kind is Kind.DIRECTORY and skip is None and source.path is not None:
        skip = await anyio.to_thread.run_sync(store_files_in, location, source.path)
    return await _save(store, location, source, config, on_progress, check, skip, force=force)


async def save_written(
    store: Store,
    location: Location,
    writer: Writer,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
) -> ObjectInfo:
    """Save what ``writer`` writes (in a worker thread) as a single-file checkpoint, streamed."""
    return await _save(store, location, _Source(Kind.FILE, None, writer=writer), config, on_progress)


async def save_object(
    store: Store,
    location: Location,
    data: bytes,
    kind: Kind,
    config: TransferConfig,
    *,
    layout: str | None = None,
    force: bool = False,
) -> ObjectInfo:
    """Store ``data`` (in memory already) at ``location`` as an object of ``kind`` (and ``layout``),
    atomically and with its CRC32: the parts of a checkpoint another module lays out (manifests, packs)."""
    source = _Source(kind, len(data), data=memoryview(data), layout=layout)
    return await _save(store, location, source, config, None, log=False, force=force)


async def _save(
    store: Store,
    location: Location,
    source: _Source,
    config: TransferConfig,
    on_progress: ProgressCallback | None,
    check: Callable[[], None] | None = None,
    skip: _archive.Skip | None = None,
    *,
    log: bool = True,
    force: bool = False,
) -> ObjectInfo:
    started = time.monotonic()
    _allocator.tune_malloc()  # only if asked: it changes the whole process
    chunks = Handoff[bytes](config.pipeline_depth)
    body = Body(chunks, source.size, crc32_up_front=_crc32_up_front(source))
    digest = body.digest
    meter = Meter(on_progress, "save", location.uri, source.size, packed=source.kind is Kind.DIRECTORY)

    def emit(chunk: bytes) -> None:
        digest.crc32 = _codec.crc32(chunk, digest.crc32)
        digest.length += len(chunk)
        chunks.send(chunk)
        meter.advance(len(chunk))

    def produce_all() -> None:
        _produce(source, emit, config, meter, skip)
        if check is not None:
            check()
        if meter.reporting:
            meter.commit()

    async def produce() -> None:
        try:
            await anyio.to_thread.run_sync(produce_all, limiter=_own_thread())
        except _PLUMBING:
            return  # the store side stopped first; its error (or the cancellation) is the one to report
        chunks.end()  # only on success: a failed producer must never look like a finished one

    stored: ObjectInfo | None = None

    async def put() -> None:
        nonlocal stored
        try:
            stored = await store.put(location, body, Record(source.kind, layout=source.layout), force=force)
        finally:
            chunks.stop()  # the producer, waiting to hand on a chunk or not, stops at its next one

    with one_error():  # both sides in tasks of their own: each is cancelled by the group's scope
        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            group.start_soon(put)
    assert stored is not None  # else the group raised
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.finish)
    if log and logger.isEnabledFor(logging.INFO):
        size = human_size(stored.size)
        if source.kind is Kind.DIRECTORY:  # its files are counted whether or not anybody listens
            size = f"{human_size(meter.source_done)} of files, {size} stored"
        seconds = time.monotonic() - started
        logger.info("saved %s to %s (%s in %.1f s)", _what(source), location.uri, size, seconds)
    return stored


#: Kinds as a log line names them.
_KIND_WORDS = {Kind.BYTES: "bytes", Kind.FILE: "file", Kind.DIRECTORY: "directory"}


def _what(source: _Source) -> str:
    """What a save was given, for its log line."""
    if source.path is not None:
        return f"{_KIND_WORDS[source.kind]} {source.path}"
    return "a stream" if source.stream is not None or source.writer is not None else "bytes"


def _log_read(verb: str, info: ObjectInfo, started: float) -> None:
    """One INFO line for a finished load or verify: what, where, how much, how long."""
    kind = _KIND_WORDS[info.record.kind] if info.record is not None else "object"
    seconds = time.monotonic() - started
    logger.info("%s %s (%s, %s in %.1f s)", verb, info.location.uri, kind, human_size(info.size), seconds)


class _BlockReader:
    """Worker-thread side of a load: takes the fetched blocks as they come, counting and checksumming.

    The blocks come as the store received them: consumers copy them anyway (into the archive
    reader's buffer, into a file), so joining them first would be one more copy of every byte.
    ``pull`` gives the next groups of blocks (each as the store handed it on), waiting for them;
    no groups at the end of the fetch. ``crc32``: the CRC32 of every block pulled so far, taken
    where the blocks were received (:meth:`OrderedRead.crc32`); without it the reader takes it,
    unless ``checksum`` is false: the object has no CRC32 to check it against
    (:attr:`ObjectInfo.checkable`), so nobody takes one.
    """

    def __init__(
        self,
        pull: Callable[[], list[Blocks]],
        meter: Meter,
        crc32: Callable[[], int | None] | None = None,
        *,
        checksum: bool = True,
    ) -> None:
        self._pull = pull
        self._crc32 = crc32
        self._checksum = checksum and crc32 is None
        #: Set by the fetch side when it failed: the end of the stream is then no end of the object.
        self.fetch_failed = False
        #: The end of the fetch was reached (every byte taken).
        self.ended = False
        self._first: Blocks | None = None
        self._meter = meter
        self.digest = Digest()

    @classmethod
    def of_stream(
        cls, receive: MemoryObjectReceiveStream[Blocks], meter: Meter, *, checksum: bool = True
    ) -> _BlockReader:
        """Taking the groups a store's ``get`` sent into ``receive``, through the event loop."""

        async def receive_all() -> list[Blocks]:
            # The next group of blocks, and all those queued behind it (one hand-off instead of
            # one per group, when the reader is behind).
            groups = [await receive.receive()]
            while True:
                try:
                    groups.append(receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    return groups

        def pull() -> list[Blocks]:
            try:
                return anyio.from_thread.run(receive_all)
            except anyio.EndOfStream:
                return []

        return cls(pull, meter, checksum=checksum)

    def peek(self) -> bytes:
        if self._first is None:
            self._first = self._next()
        return b"".join(self._first)

    def blocks(self) -> Blocks:
        """The next blocks; ``[]`` at the end."""
        if self._first is not None:
            blocks, self._first = self._first, None
            return blocks
        return self._next()

    def _next(self) -> Blocks:
        groups = self._pull()
        if not groups:
            if self.fetch_failed:
                raise _Aborted
            self.ended = True
            return []
        blocks: Blocks = []
        for group in groups:  # progress is reported per group, as the store handed them on
            crc, length = self.digest.crc32, 0
            if self._checksum:
                for block in group:
                    crc = _codec.crc32(block, crc)
                    length += len(block)
            else:
                length = sum(map(len, group))
            self.digest.crc32 = crc
            self.digest.length += length
            self._meter.advance(length)
            blocks += group
        if self._crc32 is not None:
            received = self._crc32()
            assert received is not None  # given only by a read whose receivers take it
            self.digest.crc32 = received
        return blocks


#: Why a load could check only a checkpoint's length, for each reason already logged (once per
#: process each: a user loading a foreign object after such a stream still learns about it).
_warned_unchecked: set[str] = set()

#: Why there is no CRC32 to check, by whether the object carries checkpointio's record.
_UNCHECKED_WHY = {
    True: "a stream saved in parts to a server that keeps no checksum of the whole object",
    False: "an object written by another tool, without checkpointio's record, to a store that keeps no "
    "checksum of its whole content",
}


def _verify(info: ObjectInfo, digest: Digest, *, archive: bool = False) -> None:
    """Check what was read against the size and CRC32s stored with the object.

    ``archive``: it was read as a tar.gz, whose gzip members each carry a CRC32 of their own
    (checked as they were inflated). Bytes with neither our CRC32 (a stream saved in several
    parts, whose size was not known when the upload started, or an object another tool wrote)
    nor the server's can be checked for their length only, which is logged once per reason.
    """
    uri = info.location.uri
    if digest.length != info.size:
        raise CorruptCheckpointError(f"{uri}: read {digest.length} bytes of {info.size}", uri=uri)
    record = info.record
    if record is not None and record.size is not None and record.size != info.size:
        raise CorruptCheckpointError(f"{uri}: stored {info.size} bytes, but {record.size} were saved", uri=uri)
    for source, expected in (("saved", record.crc32 if record else None), ("server", info.server_crc32)):
        if expected is not None and expected != digest.crc32:
            raise ChecksumMismatchError(
                f"{uri}: CRC32 of the stored bytes is {digest.crc32:08x}, the {source} checksum is {expected:08x}",
                uri=uri,
            )
    unchecked = (record is None or record.crc32 is None) and info.server_crc32 is None and not archive
    why = _UNCHECKED_WHY[record is not None]
    if unchecked and why not in _warned_unchecked:
        _warned_unchecked.add(why)
        logger.warning("%s has no CRC32 to check (%s): only its length was checked", uri, why)


def _kind(reader: _BlockReader, info: ObjectInfo) -> Kind:
    """What the object holds: its record says, else its first bytes (objects other tools wrote)."""
    if info.record is not None:
        return info.record.kind
    return Kind.DIRECTORY if _archive.looks_like_tar_gz(reader.peek()) else Kind.FILE


def _check(reader: _BlockReader, info: ObjectInfo, workers: int) -> _toc.Listing | None:
    """Worker thread: read the object to its end as a restore would, writing nothing; for a
    directory, the fingerprint of the entries it holds (see :func:`verify`)."""
    archive = _kind(reader, info) is Kind.DIRECTORY
    listing = _toc.Listing() if archive else None
    if listing is not None:

        def seen(header: _tar.Header) -> None:
            path = normal_path(header.name)
            if path:
                kind = _tar.KIND_NAMES.get(header.kind, "other")
                listing.add(path, kind, header.size if kind == "file" else 0)

        _archive.check_directory(
            reader.blocks, uri=info.location.uri, workers=workers, seen=seen, covered=info.checkable
        )
    else:
        while reader.blocks():
            pass
    _verify(info, reader.digest, archive=archive)
    return listing


def _restore_selected(
    reader: _BlockReader, info: ObjectInfo, workspace: Path, workers: int, only: Selection
) -> set[str]:
    """Worker thread: restore the entries of the directory archive ``only`` picks, streaming all of
    it; present nothing until it verified. Returns the paths of the entries picked hard links need
    that ``only`` does not pick (then nothing was presented: restore again with them picked too),
    found in this one pass whatever their number, links to links included."""
    uri = info.location.uri
    _refuse_selecting(info, _kind(reader, info))
    placed = Roots()
    needed: set[str] = set()  # the entries picked hard links need that are not picked
    unpicked_links: dict[str, str] = {}  # hard link -> its target, for those not picked

    def pick(header: _tar.Header) -> bool:
        path = normal_path(header.name)
        target = normal_path(header.link) if header.kind == _tar.HARD_LINK else None
        if not only.matches(path):
            if target is not None:
                unpicked_links[path] = target
            else:
                unpicked_links.pop(path, None)  # a later entry of that name replaces the link
            return False
        if target is not None and (needed or not only.selects(target)):
            if not only.selects(target):
                needed.add(target)
            return False
        if needed:
            return False  # another pass restores everything: write nothing more, only look on
        placed.add(path)
        return True

    with _placement.StagingFolder(workspace, uri) as staging:
        _archive.unpack_directory(
            reader.blocks, staging.path, uri=uri, workers=workers, pick=pick, covered=info.checkable
        )
        _verify(info, reader.digest, archive=True)
        only.check_all_used(uri)
        if needed:
            for path in list(needed):
                while (path := unpicked_links.get(path, "")) and path not in needed:
                    needed.add(path)
            return needed
        staging.present_paths(placed.result())
    return set()


def _restore(reader: _BlockReader, info: ObjectInfo, workspace: Path, workers: int) -> Path:
    """Worker thread: write the object into ``workspace``; present nothing until it verified."""
    uri = info.location.uri
    if info.record is None:
        _refuse_distributed(info, reader.peek())
    if _kind(reader, info) is Kind.DIRECTORY:
        with _placement.StagingFolder(workspace, uri) as staging:
            _archive.unpack_directory(reader.blocks, staging.path, uri=uri, workers=workers, covered=info.checkable)
            _verify(info, reader.digest, archive=True)
            staging.present()
        return workspace
    with _placement.staging_file(workspace) as staging_file:
        fd = os.open(staging_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            while blocks := reader.blocks():
                write_views(fd, [memoryview(block) for block in blocks])
        finally:
            os.close(fd)
        _verify(info, reader.digest)
        target = workspace / PAYLOAD_NAME
        _placement.replace_all([(staging_file, target)])
    return target


def _nothing() -> None:
    pass


async def _read(
    store: Store,
    info: ObjectInfo,
    config: TransferConfig,
    meter: Meter,
    consume: Callable[[_BlockReader], T],
    *,
    last: bool = True,
) -> T:
    """Stream the object from the store into ``consume``, run in a worker thread; its result.
    ``last=False``: another read of it follows, so the meter is not told it finished."""
    _allocator.tune_malloc()  # only if asked: it changes the whole process
    if isinstance(store, RangedStore):
        # The reader takes the blocks from the receiving threads itself: no hop through this loop.
        read = store.ordered(info)

        def take() -> list[Blocks]:
            blocks = read.take()
            return [blocks] if blocks else []

        # take() raises Aborted once the fetch failed; the receivers take the CRC32 where they can.
        reader = _BlockReader(take, meter, read.crc32 if read.checksums else None, checksum=info.checkable)
        fetching: Callable[[], Awaitable[None]] = read.run
        closing: Callable[[], None] = _nothing
        receive: MemoryObjectReceiveStream[Blocks] | None = None
    else:
        send, receive = anyio.create_memory_object_stream[Blocks](config.pipeline_depth)
        reader = _BlockReader.of_stream(receive, meter, checksum=info.checkable)
        fetching, closing = partial(store.get, info, send.send), send.close

    result: T | None = None

    def consume_named(reader: _BlockReader) -> T:
        # Named while it reads, so a profiler (and the benchmark's CPU table) can tell it apart.
        thread = threading.current_thread()
        name, thread.name = thread.name, "checkpointio-reader"
        try:
            return consume(reader)
        finally:
            thread.name = name

    async def run_consumer(scope: anyio.CancelScope) -> None:
        nonlocal result
        with receive if receive is not None else contextlib.nullcontext():
            try:
                result = await anyio.to_thread.run_sync(consume_named, reader, limiter=_own_thread())
            except _PLUMBING:
                return  # the fetch side stopped first; its error (or the cancellation) is reported
        if receive is None and not reader.ended:
            scope.cancel()  # done before the end: nobody takes the rest (a stream's close stops its fetch)

    async def fetch() -> None:
        try:
            await fetching()
        except BaseException:
            reader.fetch_failed = True  # set before the reader can hear of the end
            raise
        finally:
            closing()

    with one_error():
        async with anyio.create_task_group() as group:
            group.start_soon(run_consumer, group.cancel_scope)
            group.start_soon(fetch)
    if meter.reporting and last:
        await anyio.to_thread.run_sync(meter.finish)
    return cast(T, result)  # what the consumer returned: had it not returned, the group raised


_PICKING = "only= picks entries of a directory checkpoint"
_LISTING = "a listing of contents lists the entries of a directory checkpoint"


def _refuse_selecting(info: ObjectInfo, kind: Kind, what: str = _PICKING) -> None:
    """``only=`` picks, and a listing lists, entries of a directory: bytes and files have none."""
    if kind is not Kind.DIRECTORY:
        uri = info.location.uri
        raise CheckpointError(f"{uri} holds a single file, not a directory: {what} (load it whole)", uri=uri)


async def head_for_reads(store: Store, location: Location, *, one_of_many: bool = False) -> ObjectInfo | None:
    """The object's metadata, for a read of it that follows: a ranged store gets ready meanwhile
    (S3 asks on a receiving thread, so a load makes no client on the caller's loop). Every load's
    HEAD goes through here. ``one_of_many``: one of many asked at once (a distributed load's data
    objects, an incremental one's packs), spread over the receiving threads as their reads are."""
    if isinstance(store, RangedStore):
        return await store.head_for_reads(location, one_of_many=one_of_many)
    return await store.head(location)


async def load(
    store: Store,
    location: Location,
    workspace: Path,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
    *,
    only: Selection | None = None,
) -> Path | None:
    """Restore the object at ``location`` into ``workspace``; ``None`` if there is none.

    Returns the workspace itself for a directory (its restored root) or ``workspace/payload``.
    ``on_progress`` hears of each chunk received, from the consumer thread, and of the end.
    ``only`` restores just the entries of a directory it picks (see :mod:`._selection`), placed at
    their paths in the workspace: through the archive's table of contents when it has one
    (:mod:`._partial`), else by streaming the whole archive and keeping them.
    """
    info = await head_for_reads(store, location)
    if info is None:
        return None
    _refuse_distributed(info)
    if await _incremental.is_manifest_object(store, info):
        return await _incremental.load(store, info, workspace, config, on_progress, only=only)
    await anyio.to_thread.run_sync(_placement.make_workspace, workspace, location.uri)
    started = time.monotonic()
    meter = Meter(on_progress, "load", location.uri, info.size)
    if only is not None:
        await _load_selected(store, info, workspace, config, meter, only)
        _log_read("loaded the selected entries of", info, started)
        return workspace
    if info.record is not None and info.record.kind is not Kind.DIRECTORY and _ranged(store, info, config):
        restored = await _restore_ranges(store, info, workspace, meter)
    else:
        workers = codec_workers(config)
        restored = await _read(store, info, config, meter, lambda reader: _restore(reader, info, workspace, workers))
    _log_read("loaded", info, started)
    return restored


async def _load_selected(
    store: Store, info: ObjectInfo, workspace: Path, config: TransferConfig, meter: Meter, only: Selection
) -> None:
    """:func:`load` with ``only``: through the table, else streaming the archive (again with the
    file a picked hard link needs, should it have been left out)."""
    if info.record is not None:
        _refuse_selecting(info, info.record.kind)
    workers = codec_workers(config)
    if await _partial.restore_from_table(store, info, workspace, meter, only, workers):
        return
    needed = await _read(
        store, info, config, meter, lambda reader: _restore_selected(reader, info, workspace, workers, only), last=False
    )
    if not needed:
        return
    only.also(needed)
    meter.total = meter.source_total = 2 * info.size
    if await _read(
        store, info, config, meter, lambda reader: _restore_selected(reader, info, workspace, workers, only)
    ):
        raise CorruptCheckpointError(
            f"{info.location.uri}: a hard link is to a file not picked although it was picked (the archive changed "
            "between two reads?)",
            uri=info.location.uri,
        )


async def list_contents(
    store: Store, location: Location, config: TransferConfig, each: Callable[[Entry], None]
) -> bool | None:
    """Give each entry of the directory checkpoint at ``location`` to ``each`` (in a worker thread,
    in archive order) without restoring anything; ``None`` if there is no checkpoint.

    ``each`` hears of no entry unless all of them are sound: every row of a table of contents is
    checked before the first is given, and an archive without one is read to its end under the
    extraction rules of a restore (paths inside, no devices, CRC32), its entries held until then.

    Returns whether the archive's table of contents was read (a few small reads); ``False``: it
    has none (saved by another tool or an older version) and the whole archive was streamed.

    Raises:
        CheckpointError: It holds bytes or a single file, not a directory.
        CorruptCheckpointError: The table, or the archive streamed, is damaged.
        UnsafeArchiveError: An entry of an archive without a table would be restored outside the
            folder, or is a device (as a restore would refuse it).
    """
    info = await head_for_reads(store, location)
    if info is None:
        return None
    _refuse_distributed(info)
    if info.record is not None:
        _refuse_selecting(info, info.record.kind, _LISTING)
    if await _incremental.is_manifest_object(store, info):
        await _incremental.list_entries(store, info, config, each)
        return True  # its manifest is its table of contents
    if await _partial.list_from_table(store, info, each):
        return True

    def walk(reader: _BlockReader) -> list[Entry]:
        _refuse_selecting(info, _kind(reader, info), _LISTING)
        rows: list[Entry] = []

        def seen(header: _tar.Header) -> None:
            path = normal_path(header.name)
            if path:
                kind = _tar.KIND_NAMES.get(header.kind, "other")
                size = header.size if kind == "file" else 0
                rows.append(Entry(path, kind, size, header.mtime, header.mode & 0o7777, header.link))

        workers = codec_workers(config)
        _archive.check_directory(
            reader.blocks, uri=info.location.uri, workers=workers, seen=seen, covered=info.checkable
        )
        _verify(info, reader.digest, archive=True)
        for row in rows:
            each(row)
        return rows

    await _read(store, info, config, Meter(None, "load", location.uri, info.size), walk)
    return False


async def _fetch_ranges(
    store: RangedStore, info: ObjectInfo, meter: Meter, write_at: Callable[[int, bytes], None]
) -> Callable[[], None]:
    """Fetch the object's ranges at once, handing each block to ``write_at(offset, block)`` on the
    store's receiving threads as it arrives; return the check to run (in a worker thread, with
    whatever presents the result) before the bytes are presented: it raises unless they match
    the stored checksum.

    The ranges' CRC32s are combined in order into the whole object's, so the stored checksum is
    checked as on the ordered path.
    """
    _allocator.tune_malloc()  # only if asked: it changes the whole process
    written: dict[int, tuple[int, int]] = {}  # offset -> (length, CRC32)
    lock = threading.Lock()
    checksum = info.checkable  # else nothing to check a CRC32 against: only the length is

    def write(offset: int, blocks: list[bytes]) -> None:
        crc, position = 0, offset
        for block in blocks:
            if checksum:
                crc = _codec.crc32(block, crc)
            write_at(position, block)
            position += len(block)
        with lock:
            written[offset] = (position - offset, crc)
            meter.advance(position - offset)

    def check() -> None:
        digest = Digest()
        for offset in sorted(written):
            length, crc = written[offset]
            if offset != digest.length:
                raise CorruptCheckpointError(f"{info.location.uri}: a range is missing", uri=info.location.uri)
            digest.crc32 = _codec.crc32_combine(digest.crc32, crc, length)
            digest.length += length
        _verify(info, digest)

    await store.get_ranges(info, write)
    return check


def _ranged(store: Store, info: ObjectInfo, config: TransferConfig) -> TypeGuard[RangedStore]:
    """Whether to fetch a bytes or single-file object as ranges written at their offsets."""
    return isinstance(store, RangedStore) and info.size > config.part_size and _codec.CAN_COMBINE


async def _restore_ranges(store: RangedStore, info: ObjectInfo, workspace: Path, meter: Meter) -> Path:
    """Restore a single file by writing each range at its offset as it arrives, on the receiving
    threads; the file appears under its name only once its checksum matched."""
    staging = _placement.staging_path(workspace)
    fd = await anyio.to_thread.run_sync(os.open, staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write_at(position: int, block: bytes) -> None:
        write_all(fd, block, position)

    is_open = [True]  # the staging file's descriptor, closed exactly once

    def close() -> None:
        if is_open[0]:
            is_open[0] = False
            os.close(fd)

    def discard() -> None:
        try:
            close()
        finally:
            staging.unlink(missing_ok=True)

    def present(check: Callable[[], None]) -> Path:
        # One hop to a worker thread for all of it: closed, checked, renamed into place.
        try:
            close()
            check()
            target = workspace / PAYLOAD_NAME
            _placement.replace_all([(staging, target)])
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        meter.finish()
        return target

    try:
        check = await _fetch_ranges(store, info, meter, write_at)
        return await anyio.to_thread.run_sync(present, check)
    except BaseException:
        # Failed, or cancelled (also once the ranges were in, before present() started): the
        # descriptor closed and nothing left in the workspace (a file already in place stays).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(discard)
        raise


async def load_bytes(
    store: Store,
    location: Location,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
) -> bytearray | None:
    """The bytes or single file saved at ``location``, read into memory; ``None`` if there is none.

    Nothing touches the disk: ranges are copied to their offsets in one buffer as they arrive,
    and the buffer is returned only once its CRC32 matched the stored one.
    """
    return await _load_bytes(store, location, config, on_progress)


async def load_object(
    store: Store, location: Location, config: TransferConfig, *, info: ObjectInfo | None = None
) -> bytearray | None:
    """The bytes of any object at ``location`` (a manifest, say), checked as :func:`load_bytes`
    checks them, whatever its kind; ``None`` if there is none. Nothing is logged. ``info``: its
    metadata, when the caller has it already (no HEAD then; the reads are pinned to its ETag)."""
    return await _load_bytes(store, location, config, None, whole=True, info=info)


async def _load_bytes(
    store: Store,
    location: Location,
    config: TransferConfig,
    on_progress: ProgressCallback | None,
    *,
    whole: bool = False,
    info: ObjectInfo | None = None,
) -> bytearray | None:
    if info is None:
        info = await head_for_reads(store, location)
    if info is None:
        return None
    uri = location.uri
    if not whole:
        _refuse_distributed(info)
        _refuse_directory(info, "restore it with load(), not load_bytes()")
    started = time.monotonic()
    meter = Meter(on_progress, "load", uri, info.size)
    # Not zeroed: its pages are faulted in by the threads that copy into them, during the
    # download. Every byte is written before it is returned (``_verify`` checks the length).
    buffer = _allocator.unfilled_bytearray(info.size)
    view = memoryview(buffer)

    def write_at(position: int, block: bytes) -> None:
        view[position : position + len(block)] = block

    def fill(reader: _BlockReader) -> None:
        position = 0
        while blocks := reader.blocks():
            for block in blocks:
                if position + len(block) > info.size:
                    raise CorruptCheckpointError(f"{uri}: read more than the {info.size} bytes stored", uri=uri)
                write_at(position, block)
                position += len(block)
        _verify(info, reader.digest)

    async def fetch() -> None:
        if _ranged(store, info, config):
            check = await _fetch_ranges(store, info, meter, write_at)

            def finish() -> None:
                check()
                if meter.reporting:
                    meter.finish()

            await anyio.to_thread.run_sync(finish)
        else:
            await _read(store, info, config, meter, fill)

    try:
        with one_error():
            async with anyio.create_task_group() as group:
                group.start_soon(partial(anyio.to_thread.run_sync, _allocator.prefault, buffer, limiter=_own_thread()))
                group.start_soon(fetch)
    finally:
        view.release()
    if not whole:
        if info.record is None:
            _refuse_distributed(info, bytes(buffer[:_MAGIC_LENGTH]))
        _log_read("loaded into memory", info, started)
    return buffer


def _refuse_distributed(info: ObjectInfo, first: bytes = b"") -> None:
    """A distributed checkpoint's manifest is no checkpoint of its own: only ``checkpointio.dcp``
    restores what it commits (restoring the manifest as a file would pass for a restore). Its
    record says so; where the record was lost, ``first``, the object's first bytes, do. So do they
    for an incremental checkpoint's manifest, which only its record makes restorable."""
    uri = info.location.uri
    if info.record is not None:
        layout = info.record.layout
    else:
        layout = next((name for name, magic in MANIFEST_MAGIC.items() if first.startswith(magic)), None)
    if layout == DISTRIBUTED:
        raise CheckpointError(
            f"{uri} holds a distributed checkpoint (torch.distributed.checkpoint): load it with "
            "checkpointio.dcp.load(state_dict, uri) on every rank",
            uri=uri,
        )
    if layout == INCREMENTAL and info.record is None:
        raise CorruptCheckpointError(
            f"{uri} holds an incremental checkpoint's manifest without the record saved with it (copied "
            "without its metadata, or its .checkpointio sidecar file?): it cannot be restored as it is",
            uri=uri,
        )


_MAGIC_LENGTH = max(map(len, MANIFEST_MAGIC.values()))


def _refuse_directory(info: ObjectInfo, hint: str) -> None:
    """For reads that give bytes: a saved directory has no bytes of its own to give."""
    if info.record is not None and info.record.kind is Kind.DIRECTORY:
        raise CheckpointError(f"{info.location.uri} holds a directory: {hint}", uri=info.location.uri)


async def write_out(
    store: Store,
    location: Location,
    write: Callable[[bytes], object],
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
) -> ObjectInfo | None:
    """Give the bytes or single file saved at ``location`` to ``write``, in order, as they arrive
    (standard output, for ``checkpointio load URI -``); ``None`` if there is none.

    Nothing is held back, so the CRC32 is checked after the last byte went out: a corrupt object
    raises (and the command fails) once its bytes were written. Only an exit status can tell the
    reader of a pipe.
    """
    info = await head_for_reads(store, location)
    if info is None:
        return None
    _refuse_distributed(info)
    _refuse_directory(info, "restore it to a folder")

    def copy(reader: _BlockReader) -> None:
        if info.record is None:
            _refuse_distributed(info, reader.peek())  # before a byte goes out
        while blocks := reader.blocks():
            for block in blocks:
                write(block)
        _verify(info, reader.digest)

    started = time.monotonic()
    await _read(store, info, config, Meter(on_progress, "load", location.uri, info.size), copy)
    _log_read("wrote out", info, started)
    return info


async def verify(
    store: Store,
    location: Location,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
) -> ObjectInfo | None:
    """Read the object at ``location`` as a load would, writing nothing; ``None`` if there is none.

    The stored CRC32 is checked and a directory archive is read to its end through the same
    extraction filter, so whatever a load would refuse raises the same
    :class:`CorruptCheckpointError`; its table of contents, if it has one, must list exactly the
    entries read (what ``load(only=...)`` and ``ls --contents`` would refuse, or show wrongly,
    fails here too).
    """
    info = await head_for_reads(store, location)
    if info is None:
        return None
    started = time.monotonic()
    if await _incremental.is_manifest_object(store, info):
        await _incremental.verify(store, info, config, on_progress)
        _log_read("verified", info, started)
        return info
    meter = Meter(on_progress, "verify", location.uri, info.size)
    workers = codec_workers(config)
    listing = await _read(store, info, config, meter, lambda reader: _check(reader, info, workers))
    if listing is not None:
        found = await _partial.fetch_table(store, info)
        if found is not None:
            await anyio.to_thread.run_sync(_toc.check_lists, found[1], found[0], listing, location.uri)
    _log_read("verified", info, started)
    return info


from . import _incremental  # noqa: E402  (they build on this module: imported once it is complete)
