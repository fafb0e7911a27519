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

Memory stays bounded whatever the number of entries picked: the table is walked (inflated again),
never turned into a list; the picked entries go out in groups of at most :data:`_GROUP_ENTRIES`,
and of the members fetched only the one being read is held inflated.

Archives without a table are the engine's business: it streams them whole, keeping only what
the selection picks (``_engine``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
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
from ._selection import Entry, Roots, Selection, normal_path
from ._stores import ObjectInfo, Store

__all__ = ["fetch_table", "list_from_table", "restore_from_table"]

#: The suffix read: the footer, and the table when it is at most this minus the footer (a
#: 1 GiB tree of 1 MiB files has a table of ~15 KiB; 50,000 small files ~0.5 MiB).
_TAIL = 64 * 1024
#: Ranges closer than this are fetched as one (fewer requests for a few more bytes).
_GAP = 256 * 1024
#: Most entries one fetched range holds: bounds the memory of a restore of a million entries.
_GROUP_ENTRIES = 1024
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


async def list_from_table(store: Store, info: ObjectInfo, each: Callable[[Entry], None]) -> bool:
    """Give every entry of the archive's table to ``each`` (in a worker thread), in archive order,
    once every row was checked (a damaged table gives none); ``False`` (and nothing given) when the
    archive has no table."""
    found = await fetch_table(store, info)
    if found is None:
        return False
    footer, table = found

    def give() -> None:
        for _ in _toc.read_table(table, footer, info.location.uri):
            pass  # checked whole first: the table is inflated twice rather than held as rows
        for entry in _toc.read_table(table, footer, info.location.uri):
            each(Entry(entry.path, entry.kind, entry.size, entry.mtime, entry.mode, entry.link))

    await anyio.to_thread.run_sync(give)
    return True


class _Group(NamedTuple):
    """Neighbouring entries fetched as one range of whole members."""

    start: int
    end: int
    entries: list[_toc.TocEntry]


def _groups(entries: Iterable[_toc.TocEntry]) -> Iterator[_Group]:
    """``entries`` (in archive order) as ranges to fetch: neighbours closer than :data:`_GAP` share
    one, of at most :data:`_GROUP_ENTRIES` entries (a longer run is cut, and the member two groups
    share, if any, fetched twice), so memory stays bounded whatever the number of entries picked."""
    held: list[_toc.TocEntry] = []
    start = end = 0
    for entry in entries:
        if held and entry.offset <= end + _GAP and len(held) < _GROUP_ENTRIES:
            held.append(entry)
            end = max(end, entry.offset + entry.span)
            continue
        if held:
            yield _Group(start, end, held)
        held, start, end = [entry], entry.offset, entry.offset + entry.span
    if held:
        yield _Group(start, end, held)


class _Plan(NamedTuple):
    """What a restore fetches: its bytes (for progress) and the walk of the entries it restores."""

    fetched: int
    entries: Callable[[], Iterator[_toc.TocEntry]]


def _plan(table: bytes, footer: _toc.Footer, selection: Selection, uri: str) -> _Plan:
    """The table's entries ``selection`` picks and the file each picked hard link to an entry it
    does not pick needs, as a walk over the table (inflated again each time, never held as a list):
    two walks, two more when such hard links exist. Raises unless every pattern matched."""

    def picked() -> Iterator[_toc.TocEntry]:
        return (entry for entry in _toc.read_table(table, footer, uri) if selection.matches(entry.path))

    fetched = 0
    targets: set[str] = set()  # the paths of the files hard links need that are not picked
    for group in _groups(picked()):
        fetched += group.end - group.start
        for entry in group.entries:
            if entry.kind == "hardlink" and not selection.selects(normal_path(entry.link)):
                targets.add(normal_path(entry.link))
    selection.check_all_used(uri)
    if not targets:
        return _Plan(fetched, picked)
    last_file: dict[str, tuple[int, int]] = {}
    sources: set[tuple[int, int]] = set()  # (offset, skip) of each file needed
    for entry in _toc.read_table(table, footer, uri):
        if entry.kind == "file" and entry.path in targets:
            last_file[entry.path] = (entry.offset, entry.skip)
        elif entry.kind == "hardlink" and normal_path(entry.link) in targets and selection.selects(entry.path):
            source = last_file.get(normal_path(entry.link))
            if source is None:
                raise CorruptCheckpointError(
                    f"{uri}: the table of contents lists hard link {entry.path!r} -> {entry.link!r}, which is not "
                    "to a file before it",
                    uri=uri,
                )
            sources.add(source)

    def with_sources() -> Iterator[_toc.TocEntry]:
        for entry in _toc.read_table(table, footer, uri):
            if (entry.offset, entry.skip) in sources or selection.selects(entry.path):
                yield entry

    return _Plan(sum(group.end - group.start for group in _groups(with_sources())), with_sources)


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
    """The inflated data of one group's members, read on as its entries need it: at most the
    member being read is held (bytes no entry needs are dropped as they are inflated)."""

    def __init__(self, group: _Group, chunks: Iterator[bytes], uri: str) -> None:
        self._members = _members(group.start, group.end, chunks, uri)
        self._uri = uri
        self.data = Pieces()
        self.at = 0  # where the data's first byte is, inflated
        self.filled = 0  # where it ends
        self.last = -1  # the offset of the last member inflated
        self.last_start = 0  # where its data starts, inflated

    def more(self, limit: int) -> None:
        """Inflate the next member, which must start before ``limit``."""
        found = next(self._members, None)
        if found is None or found[0] >= limit:
            raise CorruptCheckpointError(
                f"{self._uri}: an entry of the table of contents runs past the members it names", uri=self._uri
            )
        self.last, self.last_start = found[0], self.filled
        for view in found[1]:
            self.data.add(view)
            self.filled += len(view)

    def drop(self) -> None:
        """Forget the data inflated so far: no entry left starts in it."""
        self.data = Pieces()
        self.at = self.filled

    def skip_to(self, position: int, limit: int) -> None:
        """Drop the data before ``position`` (inflated), inflating members up to ``limit`` as needed."""
        while True:
            dropped = min(position - self.at, self.data.length)
            self.data.take(dropped)
            self.at += dropped
            if self.at == position:
                return
            self.more(limit)

    def rest(self) -> None:
        """Inflate the members left in the range: fetched, so checked too."""
        for _ in self._members:
            pass


class _Sequence:
    """The entries whose bytes went to the extraction, in order, until it checked each one
    (:func:`_matching`); whether every group came."""

    def __init__(self) -> None:
        self.pending: deque[_toc.TocEntry] = deque()
        self.ended = False


def _group_chunks(group: _Group, items: Iterator[_Group | bytes], uri: str) -> Iterator[bytes]:
    """The bytes fetched for ``group``: the items that follow it, up to its length."""
    remaining = group.end - group.start
    while remaining > 0:
        item = next(items, None)
        if item is None or isinstance(item, _Group):
            raise CorruptCheckpointError(f"{uri}: fewer bytes came than were asked for", uri=uri)
        remaining -= len(item)
        yield item


def _picked_bytes(items: Iterator[_Group | bytes], sequence: _Sequence, uri: str) -> Iterator[memoryview]:
    """The tar stream's bytes of every entry of the groups in ``items`` (each followed by its
    fetched bytes), in order, then an end-of-archive marker."""
    for group in items:
        if not isinstance(group, _Group):
            raise CorruptCheckpointError(f"{uri}: more bytes came than were asked for", uri=uri)
        window = _Window(group, _group_chunks(group, items, uri), uri)
        for entry in group.entries:
            limit = entry.offset + entry.span
            while window.last < entry.offset:
                window.drop()
                window.more(group.end)
            if window.last != entry.offset:
                raise CorruptCheckpointError(
                    f"{uri}: the table of contents places {entry.path!r} inside a gzip member, not at its start",
                    uri=uri,
                )
            begin = window.last_start + entry.skip
            if begin < window.at:
                raise CorruptCheckpointError(
                    f"{uri}: entries of the table of contents overlap at {entry.path!r}", uri=uri
                )
            window.skip_to(begin, limit)
            sequence.pending.append(entry)
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
    sequence.ended = True
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


def _matching(sequence: _Sequence, uri: str) -> tuple[_tar.Pick, Callable[[], None]]:
    """A pick that checks each entry extracted against the table (and takes it), and the check
    that every entry the table promised came."""

    def pick(header: _tar.Header) -> bool:
        entry = sequence.pending.popleft() if sequence.pending else None
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
        if sequence.pending or not sequence.ended:
            where = repr(sequence.pending[0].path) if sequence.pending else "an entry"
            raise CorruptCheckpointError(
                f"{uri}: the table of contents does not match the archive: {where} is not where it says",
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
    plan = await anyio.to_thread.run_sync(_plan, table, footer, selection, uri)
    meter.total = meter.source_total = plan.fetched
    groups = _groups(plan.entries())  # walked one group at a time, in worker threads, by fetch()
    send, receive = anyio.create_memory_object_stream[_Group | bytes](2)

    fetch_failed = False

    async def fetch() -> None:
        nonlocal fetch_failed
        with send:
            try:
                while (group := await anyio.to_thread.run_sync(next, groups, None)) is not None:
                    await send.send(group)
                    for start in range(group.start, group.end, _REQUEST):
                        await send.send(await store.read_range(info, start, min(_REQUEST, group.end - start)))
            except BaseException:
                fetch_failed = True  # its error is the one to report, not the reader's
                raise

    def items() -> Iterator[_Group | bytes]:
        while True:
            try:
                item = anyio.from_thread.run(receive.receive)
            except anyio.EndOfStream:
                if fetch_failed:
                    raise Aborted from None
                return
            if not isinstance(item, _Group):
                meter.advance(len(item))  # in this worker thread: progress callbacks never run on the loop
            yield item

    def extract() -> None:
        sequence = _Sequence()
        pick, all_came = _matching(sequence, uri)
        placed = Roots()

        def pick_and_place(header: _tar.Header) -> bool:
            pick(header)
            placed.add(normal_path(header.name))
            return True

        with StagingFolder(workspace, uri) as staging:
            stream = _Stream(_picked_bytes(items(), sequence, uri))
            try:
                _tar.extract(
                    stream.read, str(staging.path), views=stream.read_views, writers=workers, pick=pick_and_place
                )
            except UnsafeArchiveError as error:
                raise UnsafeArchiveError(f"{uri}: unsafe archive entry refused: {error}", uri=uri) from error
            except CorruptCheckpointError as error:
                said = str(error)
                raise CorruptCheckpointError(said if uri in said else f"{uri}: {said}", uri=uri) from error
            all_came()
            staging.present_paths(placed.result())

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
