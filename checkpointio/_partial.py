"""Partial restores and listings of a directory archive through its table of contents.

One suffix read fetches the footer and (mostly) the table (:mod:`._toc`); the entries a
:class:`~._selection.Selection` picks are mapped to the gzip members holding them, neighbouring
ranges are joined, and only those bytes are fetched (``read_range``, in requests of at most
:data:`_REQUEST` bytes). Every member fetched is checked against its CRC32 as it is inflated, and
every entry extracted against the table: the header found at the place the table gives must
name the same path, kind, size and link target, else :class:`CorruptCheckpointError`. The bytes
of the picked entries, in archive order, then go through the same extraction as a full restore
(:func:`._tar.extract`: paths kept inside, PEP 706 modes) into a staging folder, and are put in
place only once all of them were written.

Archives without a table are the engine's business: it streams them whole, keeping only what
the selection picks (``_engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import anyio
import anyio.from_thread
import anyio.to_thread

from . import _codec, _tar, _toc
from ._archive import Pieces
from ._concurrency import Aborted, one_error
from ._exceptions import CorruptCheckpointError, UnsafeArchiveError
from ._placement import StagingFolder
from ._progress import Meter
from ._selection import ListedEntry, Selection, normal_path, roots
from ._stores import ObjectInfo, Store

__all__ = ["fetch_table", "list_from_table", "restore_from_table"]

#: The suffix read: the footer, and the table when it is at most this minus the footer (a
#: 1 GiB tree of 1 MiB files has a table of ~15 KiB; 50,000 small files ~0.5 MiB).
_TAIL = 64 * 1024
#: Ranges closer than this are fetched as one (fewer requests for a few more bytes).
_GAP = 256 * 1024
#: Most bytes one ranged read fetches: bounds memory, whatever the size of the files picked.
_REQUEST = 32 * 1024 * 1024
_END_OF_ARCHIVE = bytes(2 * _tar.BLOCK)


async def fetch_table(store: Store, info: ObjectInfo, tail: int = _TAIL) -> tuple[_toc.Footer, bytes] | None:
    """The footer and the table's bytes: one read of the object's last ``tail`` bytes, a second
    one only for a table larger than that; ``None`` for an archive without a table."""
    uri = info.location.uri
    tail_length = min(info.size, tail)
    if tail_length < _toc.FOOTER_SIZE:
        return None
    end = await store.read_range(info, info.size - tail_length, tail_length)
    footer = _toc.parse_footer(end, info.size, uri)
    if footer is None:
        return None
    start = footer.offset - (info.size - tail_length)
    if start >= 0:
        return footer, end[start : start + footer.length]
    before = await store.read_range(info, footer.offset, -start)
    return footer, before + end[: tail_length - _toc.FOOTER_SIZE]


async def list_from_table(store: Store, info: ObjectInfo, each: Callable[[ListedEntry], None]) -> bool:
    """Give every entry of the archive's table to ``each`` (in a worker thread), in archive order;
    ``False`` (and nothing given) when the archive has no table."""
    found = await fetch_table(store, info)
    if found is None:
        return False
    footer, table = found

    def give() -> None:
        for entry in _toc.read_table(table, footer, info.location.uri):
            each(ListedEntry(entry.path, entry.kind, entry.size, entry.mtime, entry.mode, entry.link))

    await anyio.to_thread.run_sync(give)
    return True


def _pick(table: bytes, footer: _toc.Footer, selection: Selection, uri: str) -> list[_toc.TocEntry]:
    """The table's entries ``selection`` picks, with the file each picked hard link is to, in
    archive order. Two passes over the table (it is inflated again) rather than holding it."""
    chosen: list[_toc.TocEntry] = []
    targets: set[str] = set()
    for entry in _toc.read_table(table, footer, uri):
        if selection.matches(entry.path):
            chosen.append(entry)
            if entry.kind == "hardlink":
                targets.add(normal_path(entry.link))
    selection.check_all_used(uri)
    if not targets:
        return chosen
    links = {(entry.offset, entry.skip) for entry in chosen if entry.kind == "hardlink"}
    have = {(entry.offset, entry.skip) for entry in chosen}
    last_file: dict[str, _toc.TocEntry] = {}
    extra: dict[tuple[int, int], _toc.TocEntry] = {}
    for entry in _toc.read_table(table, footer, uri):
        if entry.kind == "file" and entry.path in targets:
            last_file[entry.path] = entry
        elif (entry.offset, entry.skip) in links:
            source = last_file.get(normal_path(entry.link))
            if source is None:
                raise CorruptCheckpointError(
                    f"{uri}: the table of contents lists hard link {entry.path!r} -> {entry.link!r}, which is not "
                    "to a file before it",
                    uri=uri,
                )
            if (source.offset, source.skip) not in have:
                extra[(source.offset, source.skip)] = source
    return sorted([*chosen, *extra.values()], key=lambda entry: (entry.offset, entry.skip))


class _Group(NamedTuple):
    """Neighbouring entries fetched as one range of whole members."""

    start: int
    end: int
    entries: list[_toc.TocEntry]


def _groups(entries: list[_toc.TocEntry]) -> list[_Group]:
    groups: list[_Group] = []
    for entry in entries:
        end = entry.offset + entry.span
        if groups and entry.offset <= groups[-1].end + _GAP:
            last = groups[-1]
            last.entries.append(entry)
            groups[-1] = _Group(last.start, max(last.end, end), last.entries)
        else:
            groups.append(_Group(entry.offset, end, [entry]))
    return groups


def _members(start: int, end: int, chunks: Iterator[bytes], uri: str) -> Iterator[tuple[int, list[memoryview]]]:
    """The members of the bytes ``start`` to ``end`` (arriving as ``chunks``): each one's offset and
    inflated data, checked against its CRC32."""
    buffer = bytearray()
    position = start
    while position < end:
        while len(buffer) < min(32, end - position):
            buffer += next(chunks)
        length = _codec.member_length(bytes(buffer[:32]))
        if length is None or position + length > end:
            raise CorruptCheckpointError(
                f"{uri}: the table of contents points at bytes that are not whole gzip members of the archive", uri=uri
            )
        while len(buffer) < length:
            buffer += next(chunks)
        member = bytes(buffer[:length])
        del buffer[:length]
        try:
            stored = _codec.stored_data(member)
            data = stored if stored is not None else [memoryview(_codec.inflate_member(member))]
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(f"{uri}: {error}", uri=uri) from error
        yield position, data
        position += length


class _Window:
    """The inflated data of one group's members, read on as its entries need it."""

    def __init__(self, group: _Group, chunks: Iterator[bytes], uri: str) -> None:
        self._members = _members(group.start, group.end, chunks, uri)
        self._uri = uri
        self.starts: dict[int, int] = {}  # member offset -> where its data starts, inflated
        self.data = Pieces()
        self.at = 0  # where the data's first byte is, inflated
        self.filled = 0  # where it ends
        self.last = -1  # the offset of the last member inflated

    def more(self, limit: int) -> None:
        """Inflate the next member, which must start before ``limit``."""
        found = next(self._members, None)
        if found is None or found[0] >= limit:
            raise CorruptCheckpointError(
                f"{self._uri}: an entry of the table of contents runs past the members it names", uri=self._uri
            )
        self.starts[found[0]] = self.filled
        self.last = found[0]
        for view in found[1]:
            self.data.add(view)
            self.filled += len(view)

    def rest(self) -> None:
        """Inflate the members left in the range: fetched, so checked too."""
        for _ in self._members:
            pass


def _picked_bytes(groups: list[_Group], chunks: Iterator[bytes], uri: str) -> Iterator[memoryview]:
    """The tar stream's bytes of every entry of ``groups``, in order, then an end-of-archive marker."""
    for group in groups:
        window = _Window(group, chunks, uri)
        for entry in group.entries:
            limit = entry.offset + entry.span
            while entry.offset not in window.starts:
                if window.last > entry.offset:
                    raise CorruptCheckpointError(
                        f"{uri}: the table of contents places {entry.path!r} inside a gzip member, not at its start",
                        uri=uri,
                    )
                window.more(group.end)
            begin = window.starts[entry.offset] + entry.skip
            if begin < window.at:
                raise CorruptCheckpointError(
                    f"{uri}: entries of the table of contents overlap at {entry.path!r}", uri=uri
                )
            while window.filled < begin:
                window.more(limit)
            window.data.take(begin - window.at)
            window.at = begin
            remaining = entry.length
            while remaining:
                if not window.data.length:
                    window.more(limit)
                views = window.data.take(min(remaining, window.data.length))
                taken = sum(map(len, views))
                remaining -= taken
                window.at += taken
                yield from views
        window.rest()
    yield memoryview(_END_OF_ARCHIVE)


class _Stream:
    """``read`` and ``read_views`` over an iterator of views, for :func:`_tar.extract`."""

    def __init__(self, source: Iterator[memoryview]) -> None:
        self._source = source
        self._buffer = Pieces()

    def _ready(self, size: int) -> None:
        while self._buffer.length < size:
            view = next(self._source, None)
            if view is None:
                return
            self._buffer.add(view)

    def read(self, size: int) -> bytes:
        self._ready(size)
        return self._buffer.take_bytes(size)

    def read_views(self, size: int) -> list[memoryview]:
        self._ready(size)
        return self._buffer.take(size)


def _matching(expected: list[_toc.TocEntry], uri: str) -> tuple[_tar.Pick, Callable[[], None]]:
    """A pick that checks each entry extracted against the table (and takes it), and the check
    that every entry the table promised came."""
    pending = iter(expected)

    def pick(header: _tar.Header) -> bool:
        entry = next(pending, None)
        found = (normal_path(header.name), _tar.KIND_NAMES.get(header.kind, repr(header.kind)))
        if (
            entry is None
            or found != (entry.path, entry.kind)
            or (entry.kind == "file" and header.size != entry.size)
            or (entry.kind in ("symlink", "hardlink") and header.link != entry.link)
        ):
            said = f"{entry.kind} {entry.path!r}" if entry is not None else "nothing"
            raise CorruptCheckpointError(
                f"{uri}: the table of contents does not match the archive: it places {said} where the archive "
                f"holds {found[1]} {found[0]!r}",
                uri=uri,
            )
        return True

    def all_came() -> None:
        entry = next(pending, None)
        if entry is not None:
            raise CorruptCheckpointError(
                f"{uri}: the table of contents does not match the archive: {entry.path!r} is not where it says",
                uri=uri,
            )

    return pick, all_came


async def restore_from_table(
    store: Store, info: ObjectInfo, workspace: Path, meter: Meter, selection: Selection, workers: int
) -> bool:
    """Restore the entries ``selection`` picks into ``workspace`` through the archive's table;
    ``False`` (nothing fetched but the suffix) when it has none.

    Raises:
        CheckpointError: A pattern matches no entry (nothing is fetched beyond the table).
        CorruptCheckpointError: The table or the members read are damaged or disagree.
        UnsafeArchiveError: A picked entry would land outside the workspace.
    """
    uri = info.location.uri
    found = await fetch_table(store, info)
    if found is None:
        return False
    footer, table = found
    entries = await anyio.to_thread.run_sync(_pick, table, footer, selection, uri)
    del table
    groups = _groups(entries)
    meter.total = meter.source_total = sum(group.end - group.start for group in groups)
    send, receive = anyio.create_memory_object_stream[bytes](2)

    fetch_failed = False

    async def fetch() -> None:
        nonlocal fetch_failed
        with send:
            try:
                for group in groups:
                    for start in range(group.start, group.end, _REQUEST):
                        await send.send(await store.read_range(info, start, min(_REQUEST, group.end - start)))
            except BaseException:
                fetch_failed = True  # its error is the one to report, not the reader's
                raise

    def chunks() -> Iterator[bytes]:
        while True:
            try:
                data = anyio.from_thread.run(receive.receive)
            except anyio.EndOfStream:
                if fetch_failed:
                    raise Aborted from None
                raise CorruptCheckpointError(f"{uri}: fewer bytes came than were asked for", uri=uri) from None
            meter.advance(len(data))  # in this worker thread: progress callbacks never run on the loop
            yield data

    def extract() -> None:
        pick, all_came = _matching(entries, uri)
        with StagingFolder(workspace, uri) as staging:
            stream = _Stream(_picked_bytes(groups, chunks(), uri))
            try:
                _tar.extract(stream.read, str(staging.path), views=stream.read_views, writers=workers, pick=pick)
            except UnsafeArchiveError as error:
                raise UnsafeArchiveError(f"{uri}: unsafe archive entry refused: {error}", uri=uri) from error
            except CorruptCheckpointError as error:
                said = str(error)
                raise CorruptCheckpointError(said if uri in said else f"{uri}: {said}", uri=uri) from error
            all_came()
            staging.present_paths(roots(entry.path for entry in entries))

    async def consume() -> None:
        with receive:
            await anyio.to_thread.run_sync(extract)

    with one_error():
        async with anyio.create_task_group() as group:
            group.start_soon(fetch)
            group.start_soon(consume)
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.finish)
    return True
