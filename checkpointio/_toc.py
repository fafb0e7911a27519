"""The table of contents at the end of a directory archive: where each entry can be read alone.

Layout of a directory checkpoint (a ``.tar.gz`` any tool reads)::

    gzip members of the tar stream ... end-of-archive blocks | table members | footer member

The table and the footer are gzip members of their own (checkpointio's, with the ``CK`` length
field), after the members holding tar's end-of-archive blocks: ``tar``, :mod:`tarfile` and older
checkpointio versions stop extracting at that marker and read (or skip) the rest as data that
follows the archive, so no file appears. The table inflates to JSON lines, one per entry, in
archive order::

    [path, kind, mode, mtime, size, link, offset, span, skip, length]

``kind`` is ``file``, ``dir``, ``symlink`` or ``hardlink``; ``offset`` and ``span`` are the
compressed byte range of the gzip members the entry lies in (each member inflates on its own
and carries its CRC32), ``skip`` where its header starts in the inflated first member, and
``length`` its bytes in the tar stream (headers, data and padding). The footer is the last
:data:`FOOTER_SIZE` bytes of the object: one stored member whose data is :data:`_FOOTER`
(magic, version, the table's compressed offset, length and CRC32, its inflated length and its
number of entries), so one suffix read finds it and, for tables up to that read's size, the
table too.

A table is a claim, not a fact: a reader checks it (:func:`read_table`) and then checks every
entry it restores against the header found at that place in the archive.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from . import _codec
from ._exceptions import CorruptCheckpointError

__all__ = [
    "FOOTER_SIZE",
    "KINDS",
    "Footer",
    "Listing",
    "TableWriter",
    "TocEntry",
    "check_lists",
    "parse_footer",
    "read_table",
]

_MAGIC = b"CKIO-TOC"
_VERSION = 1
#: magic, version, flags, table offset, table length (compressed), inflated length, entries, CRC32
_FOOTER = struct.Struct("<8sHHQQQQI")
#: The footer member: gzip header with the length field, one stored deflate block, trailer.
FOOTER_SIZE = len(_codec.encode_member(bytes(_FOOTER.size), 0))
#: Largest table a reader fetches (compressed), and the longest line it holds: bounds memory
#: against a hostile footer whatever it claims. A 1,000,000-file tree's table is ~10 MiB.
MAX_TABLE = 512 * 1024 * 1024
_MAX_LINE = 64 * 1024
#: Most rows' bytes one table member holds: far below what a reader inflates per member
#: (``_codec.MAX_MEMBER_OUTPUT``) whatever the archive's block size, as a row is at most ``_MAX_LINE``.
_TABLE_MEMBER = 4 * 1024 * 1024
_MAX_NAME = 4095
#: Entry kinds in the table.
KINDS = ("file", "dir", "symlink", "hardlink")
_BLOCK = 512


#: A JSON string of any text, ASCII only (JSON's ``\\u`` escapes, lone surrogates included, so a
#: name that is not UTF-8 comes back as the same ``surrogateescape`` text), written in C.
_quote: Callable[[str], str] = encode_basestring_ascii


class TocEntry(NamedTuple):
    """One row of the table (see the module docstring)."""

    path: str
    kind: str
    mode: int
    mtime: int
    size: int
    link: str
    offset: int
    span: int
    skip: int
    length: int


class Footer(NamedTuple):
    """What the footer says about the table."""

    offset: int
    length: int
    inflated: int
    entries: int
    crc32: int


class TableWriter:
    """Builds the table while an archive is written (in the archive's thread).

    The archive writer reports each entry's place in the tar stream (:meth:`add`) and each gzip
    member as it is emitted (:meth:`member`); an entry becomes a row once the member holding its
    end went out, so rows are compressed as the save goes and only the members' boundaries are
    kept whole (a few integers per member).
    """

    def __init__(self, block_size: int, level: int) -> None:
        self._block_size = block_size
        self._level = max(level, 1)  # JSON deflates well; storing it would be 5-10 times larger
        #: Members emitted so far: inflated start, compressed start (parallel lists).
        self._raw_starts: list[int] = []
        self._starts: list[int] = []
        self._raw_end = 0
        self._end = 0
        self._member = 0  # the member holding the start of the last entry settled
        self._pending: list[tuple[str, str, int, int, int, str, int, int]] = []
        self._lines: list[str] = []
        self._held = 0
        self._members: list[bytes] = []
        self._inflated = 0
        self._count = 0

    def add(self, path: str, kind: str, mode: int, mtime: int, size: int, link: str, start: int, end: int) -> None:
        """An entry whose bytes in the tar stream are ``start`` to ``end`` (entries come in order)."""
        self._pending.append((path, kind, mode, mtime, size, link, start, end))

    def extend(self, rows: list[tuple[str, str, int, int, int, str, int, int]]) -> None:
        """Entries in order, as :meth:`add` takes them, given as tuples of its arguments."""
        self._pending.extend(rows)

    def member(self, compressed: int, inflated: int) -> None:
        """The next member went out: ``compressed`` bytes holding ``inflated`` of the tar stream."""
        self._raw_starts.append(self._raw_end)
        self._starts.append(self._end)
        self._raw_end += inflated
        self._end += compressed
        if self._pending and self._pending[0][7] <= self._raw_end:
            self._settle()

    def _settle(self) -> None:
        """Turn the entries whose last byte went out into rows. Runs once per member, not per entry,
        and walks the members with the entries (both in order): about a microsecond per entry, as
        what the entries lying wholly in one member share (its offset and span) is formatted once."""
        raw_starts, starts, raw_end, end_all = self._raw_starts, self._starts, self._raw_end, self._end
        members = len(raw_starts)
        first = self._member
        quote = _quote
        lines = self._lines
        held = self._held
        done = 0

        def within(first: int) -> tuple[int, int, str]:
            """Where the member after ``first`` starts, where ``first`` starts (both inflated), and
            the ``,offset,span,`` of the entries lying wholly in it."""
            after = first + 1 < members
            offset = starts[first]
            span = (starts[first + 1] if after else end_all) - offset
            return (raw_starts[first + 1] if after else raw_end), raw_starts[first], f",{offset},{span},"

        bound, base, shared = within(first)
        for path, kind, mode, mtime, size, link, start, end in self._pending:
            if end > raw_end:
                break
            if start >= bound:
                while first + 1 < members and raw_starts[first + 1] <= start:
                    first += 1
                bound, base, shared = within(first)
            if end <= bound:
                middle = shared
            else:
                last = first
                while last + 1 < members and raw_starts[last + 1] < end:
                    last += 1
                offset = starts[first]
                middle = f",{offset},{(starts[last + 1] if last + 1 < members else end_all) - offset},"
            line = f'[{quote(path)},"{kind}",{mode},{mtime},{size},{quote(link)}{middle}{start - base},{end - start}]\n'
            lines.append(line)
            held += len(line)
            done += 1
            if held >= _TABLE_MEMBER:
                self._held = held
                self._flush()
                held = 0
        self._held = held
        self._member = first
        self._count += done
        del self._pending[:done]
        if self._held >= min(self._block_size, _TABLE_MEMBER):
            self._flush()

    def _flush(self) -> None:
        if self._lines:
            data = "".join(self._lines).encode("ascii")
            self._inflated += len(data)
            self._members.append(_codec.encode_member(data, self._level))
            self._lines.clear()
            self._held = 0

    def finish(self) -> list[bytes]:
        """The table's members and the footer, to append after the archive's last member."""
        self._settle()
        if self._pending:
            raise AssertionError("entries past the last member emitted")
        self._flush()
        table = b"".join(self._members)
        footer = _FOOTER.pack(
            _MAGIC, _VERSION, 0, self._end, len(table), self._inflated, self._count, _codec.crc32(table)
        )
        return [*self._members, _codec.encode_member(footer, 0)]


def parse_footer(tail: bytes, size: int, uri: str) -> Footer | None:
    """The footer at the end of ``tail`` (the last bytes of an object of ``size`` bytes), or ``None``
    when the object does not end with one (an archive of another tool or of an older version).

    Raises:
        CorruptCheckpointError: It ends with a footer that is damaged or points outside the
            object or at more than :data:`MAX_TABLE` bytes.
    """
    if len(tail) < FOOTER_SIZE or size < FOOTER_SIZE:
        return None
    member = tail[-FOOTER_SIZE:]
    if _codec.member_length(member[:32]) != FOOTER_SIZE or _MAGIC not in member:
        return None
    try:
        stored = _codec.stored_data(member)
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"{uri}: the table of contents' footer fails its CRC32 check", uri=uri) from error
    if stored is None or sum(map(len, stored)) != _FOOTER.size:
        return None
    magic, version, _, offset, length, inflated, entries, crc = _FOOTER.unpack(b"".join(stored))
    if magic != _MAGIC:
        return None
    if version != _VERSION:
        raise CorruptCheckpointError(
            f"{uri}: its table of contents is of version {version}, newer than this checkpointio reads "
            "(upgrade, or restore it whole)",
            uri=uri,
        )
    if offset + length != size - FOOTER_SIZE or length > MAX_TABLE or (length == 0) != (entries == 0):
        raise CorruptCheckpointError(
            f"{uri}: the table of contents' footer points outside the object ({length} bytes at {offset}, "
            f"the object holds {size})",
            uri=uri,
        )
    if entries * 22 > inflated:  # the shortest row: ["a","dir",0,0,0,"",0,1,0,512]
        raise CorruptCheckpointError(
            f"{uri}: the table of contents claims {entries} entries in {inflated} bytes", uri=uri
        )
    return Footer(offset, length, inflated, entries, crc)


class Listing:
    """A running fingerprint of a sequence of entries (path, kind, size): what the table lists
    against what the archive holds, compared without holding either (``checkpointio verify``)."""

    def __init__(self) -> None:
        self.crc32 = 0
        self.count = 0

    def add(self, path: str, kind: str, size: int) -> None:
        line = f"{path}\0{kind}\0{size}\n".encode("utf-8", "surrogatepass")
        self.crc32 = _codec.crc32(line, self.crc32)
        self.count += 1


def check_lists(table: bytes, footer: Footer, archive: Listing, uri: str) -> None:
    """Raise unless the table lists exactly the entries ``archive`` saw, in order (paths, kinds,
    sizes; where each lies is checked by the restores that use it).

    Raises:
        CorruptCheckpointError: The table is damaged (see :func:`read_table`) or lists others.
    """
    listed = Listing()
    for entry in read_table(table, footer, uri):
        listed.add(entry.path, entry.kind, entry.size)
    if (listed.crc32, listed.count) != (archive.crc32, archive.count):
        raise CorruptCheckpointError(
            f"{uri}: the table of contents does not list the archive's entries ({listed.count} listed, "
            f"{archive.count} in the archive, or others)",
            uri=uri,
        )


def _bad(uri: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{uri}: the table of contents is corrupt: {why}", uri=uri)


def _entry(row: Any, footer: Footer, uri: str) -> TocEntry:
    """A row checked for shape and for what a restore relies on: a path inside the tree, a range
    before the table."""
    if not isinstance(row, list) or len(row) != 10:
        raise _bad(uri, "a row is not a list of 10 fields")
    path, kind, mode, mtime, size, link, offset, span, skip, length = row
    texts, numbers = (path, kind, link), (mode, mtime, size, offset, span, skip, length)
    if not all(isinstance(text, str) for text in texts) or not all(
        type(number) is int
        for number in numbers  # not isinstance: a bool is an int
    ):
        raise _bad(uri, f"a row has fields of the wrong type: {str(row)[:200]}")
    if kind not in KINDS:
        raise _bad(uri, f"entry {path!r} has an unknown kind {kind!r}")
    if (
        not path
        or path.startswith("/")
        or os.path.normpath(path) != path
        or path == ".."
        or path.startswith("../")
        or "\0" in path + link
        or len(path.encode("utf-8", "surrogatepass")) > _MAX_NAME
    ):
        raise _bad(uri, f"entry path {path[:200]!r} is not a path inside the tree")
    if not 0 <= mode <= 0o7777 or size < 0 or (kind != "file" and size) or not -(2**63) <= mtime < 2**63:
        raise _bad(uri, f"entry {path!r} has an impossible mode, size or mtime")
    if offset < 0 or span <= 0 or offset + span > footer.offset:
        raise _bad(uri, f"entry {path!r} lies at bytes {offset}..{offset + span}, outside the archive before the table")
    if skip < 0 or length < _BLOCK + size or length % _BLOCK:
        raise _bad(uri, f"entry {path!r} has an impossible place in its members")
    return TocEntry(path, kind, mode, mtime, size, link, offset, span, skip, length)


def read_table(table: bytes, footer: Footer, uri: str) -> Iterator[TocEntry]:
    """The rows of ``table`` (the bytes the footer points at), checked, in archive order.

    Memory stays bounded by one inflated member (at most 64 MiB) and one line, whatever the
    table claims.

    Raises:
        CorruptCheckpointError: The table fails its CRC32, does not inflate, holds a row that is
            not well formed, a path outside the tree, a range outside the archive, entries out of
            order or overlapping in one member, or not the number of entries the footer says.
    """
    if len(table) != footer.length or _codec.crc32(table) != footer.crc32:
        raise _bad(uri, "it fails its CRC32 check")
    position = 0
    count = 0
    inflated = 0
    carry = b""
    previous: TocEntry | None = None
    while position < len(table):
        length = _codec.member_length(table[position : position + 32])
        if length is None or position + length > len(table):
            raise _bad(uri, "it is not a series of gzip members")
        member = table[position : position + length]
        position += length
        data = _codec.inflate_member(member)
        inflated += len(data)
        buffer = carry + data if carry else data
        start = 0
        while True:  # one line at a time: a member of tiny rows never becomes a list of them
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if len(line) > _MAX_LINE:
                raise _bad(uri, f"a row is longer than {_MAX_LINE} bytes")
            try:
                row = json.loads(line)
            except ValueError:
                raise _bad(uri, "a row is not JSON") from None
            entry = _entry(row, footer, uri)
            if previous is not None and (
                (entry.offset, entry.skip) <= (previous.offset, previous.skip)
                or (entry.offset == previous.offset and entry.skip < previous.skip + previous.length)
            ):
                raise _bad(uri, f"entries {previous.path!r} and {entry.path!r} overlap or are out of order")
            previous = entry
            count += 1
            if count > footer.entries:
                raise _bad(uri, f"it holds more than the {footer.entries} entries its footer says")
            yield entry
        carry = buffer[start:]
        if len(carry) > _MAX_LINE:
            raise _bad(uri, f"a row is longer than {_MAX_LINE} bytes")
    if carry or count != footer.entries or inflated != footer.inflated:
        raise _bad(
            uri, f"it holds {count} entries in {inflated} bytes, its footer says {footer.entries} in {footer.inflated}"
        )
