"""The tar format, lean: header encoding for saves, and safe extraction of a tar stream.

:mod:`tarfile` spends 100-300 microseconds per entry (object copies, pax bookkeeping, stream
buffering, a ``realpath`` per entry in its ``data`` filter); a tree of 50,000 small files then
takes longer to pack or restore than to transfer. Here headers are built and parsed directly
(ustar with POSIX pax records where needed; reading also GNU long names: what ``tarfile``, GNU tar
and bsdtar write) and files are written with plain ``os`` calls.

Safety follows PEP 706's ``data`` filter, checked with string operations only. That is enough
because the destination is a folder the caller just created: the only links that can redirect a
path are those this archive created, and they are tracked. Refused: absolute names, ``..``, names
or hard links through a symlink the archive made, symlinks pointing out of the folder (directly or
through another symlink of the archive, in either order), hard links to anything but a file
extracted before (and still a file), devices and pipes. Modes lose set-id, sticky and
group/other write bits; owners are not applied.

Folders, symlinks and hard links carry no data, whatever their size field says (POSIX ustar; some
writers fill it in, and ``tarfile`` and libarchive ignore it too). Records of a global pax header
apply to every later entry, as POSIX says; a pre-POSIX folder (a plain file type with a name ending
in ``/``) is a folder. A pax or GNU long-name header must be followed by its entry, and a long name
must end with its NUL within its stated size (both writers count it in): else the archive is refused.

A later entry replaces an earlier one of the same name (file, symlink or hard link; a folder
replaces them too), as GNU tar does; nothing replaces a folder (refused: its contents would go
with it). Names with a part over 255 bytes are refused (no file system holds one, and ``verify``
must refuse what a restore cannot make); every entry is made relative to the open destination,
so a name up to PATH_MAX restores however long the destination's own path is. An ``OSError`` a
name causes on this file system (one too long for it, or folded into another where case is
ignored) becomes a :class:`CorruptCheckpointError`.

Names are compared exactly, byte for byte. On a file system that ignores case (macOS, casefold
folders) ``D`` and ``d`` are one name there but two here: creating one over the other fails (and
is refused), but the symlink checks cannot see that a target spelled ``d/..`` walks through the
symlink ``D``. Restore archives you do not trust on a case-sensitive file system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ._exceptions import CorruptCheckpointError, UnsafeArchiveError
from ._writes import write_all, write_views

__all__ = [
    "BLOCK",
    "DIRECTORY",
    "FILE",
    "HARD_LINK",
    "Header",
    "KIND_NAMES",
    "Pick",
    "SYMLINK",
    "end_of_archive",
    "extract",
    "header",
    "is_header",
    "link_way",
]

Read = Callable[[int], bytes]


class Header(NamedTuple):
    """An entry's header as the archive gives it (what a :data:`Pick` decides on)."""

    name: str
    """As the archive spells it (not normalised)."""
    kind: bytes
    """The type byte (``FILE``, ``DIRECTORY``, ...; a pre-POSIX folder says ``DIRECTORY``)."""
    size: int
    mode: int
    mtime: int
    link: str


#: Decides whether to extract an entry; it may raise to refuse the archive (see :func:`extract`).
Pick = Callable[[Header], bool]
#: Gives the next ``size`` bytes of the stream (fewer at its end) as views, without copying them.
ReadViews = Callable[[int], list[memoryview]]

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
FILE, HARD_LINK, SYMLINK, DIRECTORY = b"0", b"1", b"2", b"5"
_FILE_TYPES = (b"0", b"\0", b"7")
#: Type bytes by the words tables of contents and listings use.
KIND_NAMES = {b"0": "file", b"\0": "file", b"7": "file", b"5": "dir", b"2": "symlink", b"1": "hardlink"}
_SPECIAL_TYPES = {b"3": "character device", b"4": "block device", b"6": "pipe"}
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_STEP = 1024 * 1024
#: Files at least this large have their data written by the writer threads; smaller ones are
#: written where they are read (a hand-off costs more than writing a few KiB, and every system
#: call of another thread has to win the GIL back from the reader).
_HAND_OFF = 256 * 1024
#: Most bytes of one file a writer thread takes in one job (written in pieces, see ``_writes``):
#: a large file is written by several threads at once, each at its offset.
_JOB = 4 * 1024 * 1024
#: Most bytes queued for the writer threads: the reader waits beyond it (bounded memory).
_QUEUED = 16 * 1024 * 1024
#: Smaller files are created by the writer threads in batches of files of one folder, at most
#: this many files or ``_BATCH_BYTES`` each: creating a file can wait on the disk (inode tables),
#: and several threads then wait at once, while the reader parses on.
_BATCH_FILES = 64
_BATCH_BYTES = 1024 * 1024


_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")
#: The fields :meth:`_Extraction.plain_files` reads: name, mode, size, mtime, checksum, type, magic
#: and prefix (owner, link target, version, owner names and device numbers are skipped).
_PLAIN = struct.Struct("100s8s16x12s12s8sc100x6s2x64x16x155s12x")
_DOT_OR_SLASH = b"./"
_RECORD = 20 * BLOCK  # archives end on a multiple of this, as tar(1) writes them
_MAX_OCTAL_11 = 8**11
_MAX_OCTAL_7 = 8**7
#: The times a file can have (a 64-bit ``time_t``): ``os.utime`` raises OverflowError beyond them.
_MIN_TIME, _MAX_TIME = -(2**63), 2**63 - 1
#: Most bytes a pax or GNU long-name header may hold: they are read whole (a name is at most a few
#: KiB), so without a bound a crafted header could make extraction hold gigabytes.
_MAX_META = 1024 * 1024
#: Longest name or link target: what a path may be on Linux (PATH_MAX, with its NUL). The checks
#: walk a name's folders, so a 1 MiB name of 500,000 parts would cost quadratic time and memory
#: (1.5 GiB for a 257-byte archive); a longer one could not be created anyway.
_MAX_NAME = 4095
#: Longest part of a name: what Linux file systems hold (NAME_MAX); a longer one cannot be created.
_MAX_PART = 255
#: Why creating an entry may fail when the archive, not the machine, is at fault: a name this file
#: system cannot hold (too long or not valid for it, or a second name it folds into the first:
#: ``A`` then ``a`` where case is ignored) or too many hard links to one file. Others (ENOSPC,
#: EFBIG, EACCES, EROFS, EIO, a destination removed meanwhile) stay OSErrors: they are the
#: machine's, and an older checkpoint would not restore any better.
_ENTRY_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.EMLINK, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
     errno.ELOOP}
)  # fmt: skip


def _refuse_unrestorable(error: OSError, name: str) -> None:
    """Raise the :class:`CorruptCheckpointError` that ``error``, met creating the archive's entry
    ``name``, is where the entry cannot be on this file system (:data:`_ENTRY_ERRNOS`); return for
    any other error, which the caller raises as it is (the machine's)."""
    if error.errno in _ENTRY_ERRNOS:
        raise CorruptCheckpointError(
            f"entry {name!r} cannot be restored on this file system: {error.strerror}"
        ) from error


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


_ZERO_8 = _octal(0, 8)  # owner, group and device numbers: always zero (a restore belongs to its user)


def _ustar(name: bytes, kind: bytes, size: int, mode: int, mtime: int, link: bytes) -> bytes:
    fields = _USTAR.pack(
        name[:100], _octal(mode, 8), _ZERO_8, _ZERO_8, _octal(size, 12), _octal(mtime, 12),
        b"        ", kind, link[:100], b"ustar\0", b"00", b"", b"", _ZERO_8, _ZERO_8, b"", b"",
    )  # fmt: skip
    return fields[:148] + b"%06o\0 " % (_byte_sum(fields[:256]) + _byte_sum(fields[256:])) + fields[156:]


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


#: What follows the checksum in a header without a link target, by the type bytes a save writes: the type, an empty
#: link, magic, version, empty owner names, zero device numbers and an empty prefix; and the sum of
#: its bytes plus the checksum field's as spaces (the part of the checksum every such header shares).
_TAILS = {
    kind: (tail, sum(tail) + 8 * ord(" "))
    for kind in (FILE, DIRECTORY, SYMLINK, HARD_LINK)
    for tail in [_USTAR.pack(*[b""] * 7, kind, b"", b"ustar\0", b"00", b"", b"", _ZERO_8, _ZERO_8, b"", b"")[156:]]
}


def header(name: str, kind: bytes, *, size: int = 0, mode: int = 0, mtime: int = 0, link: str = "") -> bytes:
    """The header block(s) of one entry: ustar, preceded by a pax header when a field needs one
    (long or non-ASCII names and link targets, sizes from 8 GiB, mtimes out of ustar's range)."""
    common = _TAILS.get(kind)
    if (
        common is not None
        and not link
        and len(name) <= 100
        and name.isascii()
        and 0 <= mode < _MAX_OCTAL_7
        and 0 <= size < _MAX_OCTAL_11
        and 0 <= mtime < _MAX_OCTAL_11
    ):
        # the usual entry (a file or folder of a short ASCII name), as ``_ustar`` would build it
        # with a third of its work: one format for the numbers, the rest shared (see _TAILS)
        raw_name = name.encode("ascii")
        numbers = b"%07o\x000000000\x000000000\x00%011o\x00%011o\x00" % (mode, size, mtime)
        tail, shared = common
        checksum = (zlib.adler32(numbers, zlib.adler32(raw_name)) & 0xFFFF) - 1 + shared
        return raw_name.ljust(100, b"\0") + numbers + b"%06o\0 " % checksum + tail
    raw_name = name.encode("utf-8", "surrogateescape")
    raw_link = link.encode("utf-8", "surrogateescape")
    records = []
    if len(raw_name) > 100 or not name.isascii():
        records.append(_pax_record(b"path", raw_name))
    if len(raw_link) > 100 or not link.isascii():
        records.append(_pax_record(b"linkpath", raw_link))
    if size >= _MAX_OCTAL_11:
        records.append(_pax_record(b"size", str(size).encode()))
        size = 0
    if not 0 <= mtime < _MAX_OCTAL_11:
        records.append(_pax_record(b"mtime", str(mtime).encode()))
        mtime = 0
    entry = _ustar(raw_name, kind, size, mode, mtime, raw_link)
    if not records:
        return entry
    try:
        (raw_name + raw_link).decode("utf-8")
    except UnicodeDecodeError:  # not UTF-8 (a name the filesystem holds as raw bytes)
        records.insert(0, _pax_record(b"hdrcharset", b"BINARY"))
    pax = b"".join(records)
    return _ustar(b"././@PaxHeader", b"x", len(pax), 0o644, 0, b"") + pax + bytes(-len(pax) % BLOCK) + entry


def end_of_archive(position: int) -> bytes:
    """Two zero blocks, then zeros up to the next whole record, given the bytes written so far."""
    end = position + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % _RECORD))


def _number(field: bytes, *, signed: bool = False) -> int:
    """A numeric header field: octal text, or GNU base-256 when its first byte is 0x80 (or 0xFF).

    Only a ``signed`` field (a time: GNU tar writes files from before 1970 so) may be negative,
    base-256 with a first byte of 0xFF; a negative size or mode is refused.
    """
    if field[:1] and field[0] & 0x80:
        if field[0] not in (0x80, 0xFF):  # GNU tar and tarfile mark base-256 with these two bytes only
            raise CorruptCheckpointError(f"a tar header holds a bad number {bytes(field)!r}")
        if field[0] == 0xFF:
            if not signed:
                raise CorruptCheckpointError("a tar header holds a negative number")
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text.isdigit():  # int() would also take a sign ("-1": a negative size), "_" and spaces
        if not text:
            return 0
        raise CorruptCheckpointError(f"a tar header holds a bad number {text!r}")
    try:
        return int(text, 8)
    except ValueError:  # 8 or 9
        raise CorruptCheckpointError(f"a tar header holds a bad number {text!r}") from None


_PAX_TIME = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")


def _pax_time(value: bytes) -> int:
    """A pax time record (decimal seconds, maybe negative, maybe with a fraction), floored to
    whole seconds as file systems count them (-1.5 is second -2).

    Parsed as text: ``float`` would round 1700000000.999999999 up to the next second, and would
    read ``inf``, ``nan`` and ``1e400``, which no file can have.
    """
    match = _PAX_TIME.fullmatch(value)
    if match is None:
        raise CorruptCheckpointError(f"a pax header holds a bad time {value!r}")
    seconds = int(match[2])
    if match[1]:
        seconds = -seconds - (1 if match[3] and match[3].strip(b"0") else 0)
    return seconds


def _byte_sum(data: bytes | memoryview) -> int:
    """The sum of the bytes of ``data`` (at most 256 of them): Adler-32's low half minus one.

    Below 257 bytes the sum cannot reach Adler-32's modulus (65521), and zlib adds in C what
    ``sum()`` adds one Python int at a time (a tenth of the time: headers are checked per file).
    """
    return (zlib.adler32(data) & 0xFFFF) - 1


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    with memoryview(block) as view:
        unsigned = _byte_sum(view[:256]) + _byte_sum(view[256:BLOCK]) - sum(view[148:156]) + 256
    if stored == unsigned:
        return True
    signed = 256 + sum(b - 256 if b > 127 else b for b in block[:148] + block[156:])
    return stored == signed


def is_header(block: bytes) -> bool:
    """Whether ``block`` is a valid tar header (what an archive starts with)."""
    if len(block) < BLOCK or block[:BLOCK] == _ZERO_BLOCK:
        return False
    try:
        return _checksum_ok(block[:BLOCK])
    except CorruptCheckpointError:
        return False


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        if space < 0:
            raise CorruptCheckpointError("a pax header is garbled")
        try:
            length = int(data[position:space])
        except ValueError:
            raise CorruptCheckpointError("a pax header is garbled") from None
        record = data[space + 1 : position + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise CorruptCheckpointError("a pax header is garbled")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("ascii", "replace")] = value
        position += length
    return records


class _Edge:
    """A run of folders in :class:`_Folders`: ``label`` is their parts joined by ``/``."""

    __slots__ = ("child", "label")

    def __init__(self, label: str, child: dict[str, _Edge]) -> None:
        self.label = label
        self.child = child


class _Folders:
    """The folders an extraction made: folder entries and every folder a name is in.

    A trie of path parts in which a chain of folders with one child each is one edge labelled
    with the parts joined (a radix tree): memory grows with the bytes of the names, whatever
    their depth. (A set of every folder's path would hold every prefix of a deep name: memory
    quadratic in its number of parts, from a tiny crafted archive.)
    """

    def __init__(self) -> None:
        self._root: dict[str, _Edge] = {}  # an edge by its first part

    def known(self, path: str) -> int:
        """How much of the normalised ``path`` is a known folder: the length of its longest
        prefix (cut at a ``/``) that is one; ``len(path)`` if ``path`` is a folder, 0 if no part is."""
        node, start, end = self._root, 0, len(path)
        while True:
            slash = path.find("/", start)
            edge = node.get(path[start:] if slash < 0 else path[start:slash])
            if edge is None:
                return start - 1 if start else 0
            matched = _matched(edge.label, path, start)
            if start + matched == end:
                return end
            if matched < len(edge.label):
                return start + matched
            node, start = edge.child, start + matched + 1

    def below(self, folder: str) -> dict[str, _Edge] | str:
        """What the known ``folder`` holds: the edges out of it by first part, or, where it is
        inside an edge, the rest of the edge's label (its only sub-folder, and theirs)."""
        node, start, end = self._root, 0, len(folder)
        while start < end:
            slash = folder.find("/", start)
            edge = node[folder[start:] if slash < 0 else folder[start:slash]]
            matched = _matched(edge.label, folder, start)
            if matched < len(edge.label):
                return edge.label[matched + 1 :]
            node, start = edge.child, start + matched + 1
        return node

    def add(self, path: str) -> None:
        """Record the normalised ``path`` (not ``""``) and the folders it is in as folders."""
        node, start, end = self._root, 0, len(path)
        while True:
            slash = path.find("/", start)
            first = path[start:] if slash < 0 else path[start:slash]
            edge = node.get(first)
            if edge is None:
                node[first] = _Edge(path[start:], {})
                return
            label = edge.label
            matched = _matched(label, path, start)
            if matched < len(label):  # the path leaves (or ends) inside the edge: split it there
                rest = label[matched + 1 :]
                edge.child = {rest.partition("/")[0]: _Edge(rest, edge.child)}
                edge.label = label[:matched]
            if start + matched == end:
                return
            node, start = edge.child, start + matched + 1


def _matched(label: str, path: str, start: int) -> int:
    """How much of ``label`` (whose first part is that of ``path[start:]``) ``path[start:]``
    begins with, in whole parts: a length at which ``label`` ends or has a ``/``."""
    end = len(path)
    stop = start + len(label)
    if path.startswith(label, start) and (stop == end or path[stop] == "/"):
        return len(label)
    low, high = 0, min(len(label), end - start)  # the longest common prefix, in characters
    while low < high:
        middle = (low + high + 1) // 2
        if path.startswith(label[:middle], start):
            low = middle
        else:
            high = middle - 1
    if (low == len(label) or label[low] == "/") and (start + low == end or path[start + low] == "/"):
        return low
    return label.rfind("/", 0, low)  # the first parts are equal: there is a "/" before ``low``


class _File:
    """A file being written by the writer threads; closed by whoever finishes it last."""

    __slots__ = ("fd", "mode", "mtime", "pending", "sealed")

    def __init__(self, fd: int, mode: int, mtime: int) -> None:
        self.fd = fd
        self.mode = mode
        self.mtime = mtime
        self.pending = 0  # jobs queued or being written
        self.sealed = False  # all its data was queued


class _Writers:
    """Threads that write file data at its offsets while the reader goes on with the archive.

    ``pwritev`` releases the GIL, so writes into the page cache (the largest cost of restoring
    large files) run on other cores while the reader checksums, cuts and parses what follows. A
    file's last job gives it its mode and time and closes it. Memory stays bounded: the reader
    waits while more than ``_QUEUED`` bytes are queued. The first error is kept and raised to the
    reader at its next call; after it, queued jobs are dropped.
    """

    def __init__(self, threads: int, umask: int | None) -> None:
        self._umask = umask
        self._jobs: queue.SimpleQueue[tuple[_File | None, int, list[Any], int] | None] = queue.SimpleQueue()
        self._changed = threading.Condition(threading.Lock())
        self._queued = 0  # bytes
        self._busy = 0  # jobs queued or running, and files being closed
        self._open: set[_File] = set()
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._work, name="checkpointio-writer", daemon=True) for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _raise(self) -> None:
        error, self._error = self._error, _Stopped()
        if error is not None and not isinstance(error, _Stopped):
            raise error

    def open(self, fd: int, mode: int, mtime: int) -> _File:
        file = _File(fd, mode, mtime)
        with self._changed:
            self._open.add(file)
        return file

    def write(self, file: _File, offset: int, views: list[memoryview], length: int) -> None:
        self._reserve(length, file)
        self._jobs.put((file, offset, views, length))

    def create(self, folder: int, batch: list[_NewFile], length: int) -> None:
        """Create the files of ``batch`` (new names, in the open folder ``folder``) with their data."""
        self._reserve(length, None)
        self._jobs.put((None, folder, batch, length))

    def _reserve(self, length: int, file: _File | None) -> None:
        """Wait until ``length`` more bytes fit in the queue (raising a writer's error), then count a job."""
        with self._changed:
            while self._queued and self._queued + length > _QUEUED and self._error is None:
                self._changed.wait()
            if self._error is not None:
                self._raise()
            self._queued += length
            self._busy += 1
            if file is not None:
                file.pending += 1

    def seal(self, file: _File) -> None:
        """All of ``file``'s data is queued: it is finished and closed once written."""
        with self._changed:
            file.sealed = True
            last = file.pending == 0
            if last:
                self._busy += 1
        if last:
            self._close(file)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            file, offset, views, length = job
            error: BaseException | None = None
            try:
                if self._error is None and file is None:
                    _create_all(offset, views, self._umask)
                elif self._error is None and file is not None:
                    write_views(file.fd, views, offset)
            except BaseException as caught:  # raised to the reader, in its thread
                error = caught
            del views
            with self._changed:
                self._queued -= length
                self._busy -= 1
                if error is not None and self._error is None:
                    self._error = error
                if file is None:
                    self._changed.notify_all()
                    continue
                file.pending -= 1
                last = file.sealed and file.pending == 0
                if last:
                    self._busy += 1
                self._changed.notify_all()
            if last:
                self._close(file)

    def _close(self, file: _File) -> None:
        error: BaseException | None = None
        try:
            try:
                if self._error is None:
                    _finish(file.fd, file.mode, file.mtime, self._umask)
            finally:
                os.close(file.fd)
        except BaseException as caught:
            error = caught
        with self._changed:
            self._open.discard(file)
            self._busy -= 1
            if error is not None and self._error is None:
                self._error = error
            self._changed.notify_all()

    def join(self) -> None:
        """Wait until every file queued is written and closed; raise the first error."""
        with self._changed:
            while self._busy and self._error is None:
                self._changed.wait()
            if self._error is not None:
                self._raise()

    def stop(self) -> None:
        """End the threads (dropping what is still queued after an error) and close every file
        still open. Idempotent."""
        with self._changed:
            if self._error is None:
                self._error = _Stopped()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        for file in list(self._open):
            with contextlib.suppress(OSError):
                os.close(file.fd)
        self._open.clear()


class _Stopped(Exception):
    """The writers were stopped: what is queued is dropped (the reader raised already)."""


#: A file for the writer threads to create: its name in the archive (for messages), its path in
#: the destination, data, mode and time. A plain tuple: one is made per small file.
_NewFile = tuple[str, str, list[memoryview], int, int]


def _create_all(folder: int, batch: list[_NewFile], umask: int | None) -> None:
    """Create each file of ``batch`` in the open folder ``folder`` (a name the archive cannot
    have here is a :class:`CorruptCheckpointError`, as when the reader creates it).

    Four system calls a file (open, write, utime, close; fchmod only where the umask would take
    bits of the mode away), with as little Python around them as it takes: this thread needs the
    GIL back after each of them.
    """
    open_, write, utime, close = os.open, os.write, os.utime, os.close
    for name, rel, views, mode, mtime in batch:
        try:
            fd = open_(rel, _WRITE_FLAGS, mode, dir_fd=folder)
        except OSError as error:
            _refuse_unrestorable(error, name)
            raise
        try:
            if len(views) == 1:
                view = views[0]
                if len(view) and (written := write(fd, view)) < len(view):
                    write_all(fd, view[written:])
            else:
                write_views(fd, views)
            if umask is None or mode & umask:
                os.fchmod(fd, mode)
            utime(fd, (mtime, mtime))
        finally:
            close(fd)


class _Input:
    """The stream, kept as views of the pieces it came in, read ahead as far as the source has
    data ready (``buffered``: a gzip reader's inflated members), or a step (``_STEP``).

    The parser takes headers and file data from the front; :meth:`front` lends it the first
    piece whole, so that the entries inside one piece are parsed in one loop (see
    :meth:`_Extraction.plain_files`). Memory: what the source held already, or a step more.
    What is past the end of the archive is asked for only when the archive needs it: a source
    tells data after the tar stream ("trailing data") from a damaged stream by when it is asked.
    """

    __slots__ = ("_buffered", "_ended", "_pieces", "_views")

    def __init__(self, views: ReadViews, buffered: Callable[[], int] | None) -> None:
        self._views = views
        self._buffered = buffered
        self._pieces: deque[memoryview] = deque()
        self._ended = False

    def _more(self, size: int) -> bool:
        """Read the next ``size`` bytes or more into the buffer; False at the end."""
        if self._ended:
            return False
        got = False
        for view in self._views(max(size, _STEP if self._buffered is None else self._buffered())):
            if len(view):
                self._pieces.append(view if isinstance(view, memoryview) else memoryview(view))
                got = True
        self._ended = not got
        return got

    def front(self) -> memoryview:
        """The first piece buffered (reading one in if none is): empty at the end of the stream."""
        if not self._pieces and not self._more(BLOCK):
            return _EMPTY
        return self._pieces[0]

    def advance(self, size: int) -> None:
        """Drop the first ``size`` bytes of :meth:`front`'s piece (``size`` at most its length)."""
        if size:
            first = self._pieces[0]
            if size == len(first):
                self._pieces.popleft()
            else:
                self._pieces[0] = first[size:]

    def take(self, size: int) -> list[memoryview]:
        """The next ``size`` bytes (fewer at the end of the stream) as views, without copying."""
        views: list[memoryview] = []
        pieces = self._pieces
        while size > 0:
            if not pieces and not self._more(size):
                break
            piece = pieces[0]
            if len(piece) <= size:
                views.append(pieces.popleft())
                size -= len(piece)
            else:
                views.append(piece[:size])
                pieces[0] = piece[size:]
                size = 0
        return views

    def take_bytes(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end of the stream) as one ``bytes`` (a copy)."""
        pieces = self._pieces
        if pieces and len(pieces[0]) > size:
            first = pieces[0]
            pieces[0] = first[size:]
            return bytes(first[:size])
        views = self.take(size)
        return bytes(views[0]) if len(views) == 1 else b"".join(views)


_EMPTY = memoryview(b"")


class _Extraction:
    def __init__(
        self,
        read: Read,
        dest: str | None,
        views: ReadViews | None = None,
        writers: int = 0,
        pick: Pick | None = None,
        buffered: Callable[[], int] | None = None,
    ) -> None:
        self._pick = pick
        self._input = _Input(views if views is not None else (lambda size: [memoryview(read(size))]), buffered)
        self._write = dest is not None  # False: check everything, write nothing
        #: The destination, held open: entries are created relative to it, so a name up to
        #: PATH_MAX restores however long the destination's own path is.
        self._fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if dest is not None else -1
        self._files: set[str] = set()
        #: Symlink -> its target; the targets are walked once every entry is in (:meth:`check_links`).
        self._links: dict[str, str] = {}
        self._dirs = _Folders()
        self._last_parent = ""  # a known folder: entries come folder by folder, most need no lookup
        self._below_parent: str | None = None  # the folder self._below is of (None: not known)
        self._below: dict[str, _Edge] | str = ""
        #: Folder -> (mode, mtime), applied at the end; keyed by name, so a crafted archive naming
        #: one folder a million times holds one entry (a list held 50x the archive's size).
        self._dir_attrs: dict[str, tuple[int, int]] = {}
        self._umask = _creation_umask(dest)
        self._writers = _Writers(writers, self._umask) if writers > 0 and self._write else None
        #: Small files waiting to be handed to the writers together (all in one folder), their bytes,
        #: and the names of every file handed on whose creation may not have happened yet.
        self._batch: list[_NewFile] = []
        self._batch_bytes = 0
        self._batch_folder = ""
        self._creating: set[str] = set()

    def read_exact(self, size: int) -> bytes:
        data = self._input.take_bytes(size)
        if len(data) != size:
            raise CorruptCheckpointError("the archive is truncated: it ends inside an entry")
        return data

    def skip(self, size: int) -> None:
        while size:
            got = sum(map(len, self._input.take(min(size, _STEP))))
            if not got:
                raise CorruptCheckpointError("the archive is truncated: it ends inside an entry")
            size -= got

    def read_views(self, size: int) -> list[memoryview]:
        views = self._input.take(size)
        if sum(map(len, views)) != size:
            raise CorruptCheckpointError("the archive is truncated: it ends inside an entry")
        return views

    def read_padded(self, size: int) -> bytes:
        data = self.read_exact(size)
        self.skip(-size % BLOCK)
        return data

    def inside(self, name: str, what: str) -> str:
        """``name`` normalised, or refused if it would land outside the folder."""
        if name.startswith("/") or os.path.isabs(name):
            raise UnsafeArchiveError(f"{what} {name!r} is an absolute path")
        normal = os.path.normpath(name)  # relative, no "." or empty parts, no trailing "/"
        if normal == ".." or normal.startswith("../"):
            raise UnsafeArchiveError(f"{what} {name!r} would be outside the destination")
        if self._links and _parent(normal) != self._last_parent:
            first = self.first_new(normal)
            if first is not None and first != normal and first in self._links:
                raise UnsafeArchiveError(f"{what} {name!r} goes through the symlink {first!r}")
        return normal

    def first_new(self, normal: str) -> str | None:
        """The first of the folders ``normal`` is in, and ``normal``, that is not a known folder;
        ``None`` if ``normal`` is one.

        Whatever is in a folder of the archive (file, symlink or folder) had every folder it is in
        made first, and a folder stays one: so of the folders ``normal`` is in, only this one can
        be a file or a symlink of the archive. One lookup, not one per folder.
        """
        known = self._dirs.known(normal)
        if known == len(normal):
            return None
        end = normal.find("/", known + 1 if known else 0)
        return normal if end < 0 else normal[:end]

    def make_parents(self, rel: str) -> None:
        """Create the folders ``rel`` is in, refusing to go through a file the archive made
        (``mkdir`` would fail on it with an OSError that says nothing of the archive)."""
        parent = _parent(rel)
        if parent == self._last_parent:
            return
        first = self.first_new(parent)
        if first is not None:
            if first in self._files:
                raise CorruptCheckpointError(f"entry {rel!r} is inside {first!r}, a file of the archive")
            end = len(first)
            while self._write:  # each new folder in turn, as os.makedirs does, relative to the top
                os.mkdir(parent[:end], dir_fd=self._fd)
                if end == len(parent):
                    break
                end = parent.find("/", end + 1)
                end = len(parent) if end < 0 else end
            self.add_folder(parent)
        self._last_parent = parent

    def is_folder(self, rel: str) -> bool:
        """Whether ``rel``, in a known folder, is a known folder itself."""
        parent, _, leaf = rel.rpartition("/")
        if parent != self._below_parent:  # entries come folder by folder: one walk per folder
            self._below = self._dirs.below(parent)
            self._below_parent = parent
        below = self._below
        if isinstance(below, dict):
            return leaf in below
        return below.startswith(leaf) and (len(below) == len(leaf) or below[len(leaf)] == "/")

    def add_folder(self, rel: str) -> None:
        self._dirs.add(rel)
        self._below_parent = None

    def clear(self, rel: str) -> None:
        """Remove the file or symlink an earlier entry named ``rel`` made: a later entry replaces
        an earlier one, as in GNU tar (a folder is never replaced: that is refused before)."""
        if rel in self._files:
            self.created(rel)
            self._files.discard(rel)
        elif self._links.pop(rel, None) is None:
            return
        if self._write:
            os.unlink(rel, dir_fd=self._fd)

    def hand_on(self) -> None:
        """Give the batch of small files to the writer threads."""
        if self._batch and self._writers is not None:
            batch, self._batch, length, self._batch_bytes = self._batch, [], self._batch_bytes, 0
            self._writers.create(self._fd, batch, length)

    def created(self, rel: str) -> None:
        """Wait until ``rel``, if the writers were to create it, exists (it is about to be
        replaced or linked to)."""
        if rel in self._creating and self._writers is not None:
            self.hand_on()
            self._writers.join()
            self._creating.clear()

    def run(self) -> None:
        try:
            self.entries()
            if self._writers is not None:
                self.hand_on()
                self._writers.join()
            self.check_links()
            for rel, (mode, mtime) in sorted(self._dir_attrs.items(), reverse=True) if self._write else ():
                os.chmod(rel, mode, dir_fd=self._fd)  # deepest first
                os.utime(rel, (mtime, mtime), dir_fd=self._fd)
        finally:
            if self._writers is not None:
                self._writers.stop()
            if self._fd >= 0:
                os.close(self._fd)

    def entries(self) -> None:
        pax: dict[str, bytes] = {}
        #: Records of global pax headers (``g``): they apply to every later entry, under its own.
        global_pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        plain = self._pick is None
        while True:
            if plain and not pax and long_name is None and long_link is None and not global_pax:
                self.plain_files()
            block = self._input.take_bytes(BLOCK)
            if len(block) < BLOCK:
                raise CorruptCheckpointError("the archive is truncated: no end-of-archive marker")
            if block == _ZERO_BLOCK:
                if pax or long_name is not None or long_link is not None:
                    raise CorruptCheckpointError(
                        "the archive is corrupt: it ends after a pax or GNU long-name header, without its entry"
                    )
                break
            if not _checksum_ok(block):
                raise CorruptCheckpointError("the archive is corrupt: a tar header fails its checksum")
            name, raw_mode, _, _, raw_size, raw_mtime, _, kind, link, magic, _, _, _, _, _, prefix, _ = (
                _USTAR.unpack_from(block)
            )
            size = _number(raw_size)
            if kind in (b"x", b"g", b"L", b"K") and size > _MAX_META:
                raise CorruptCheckpointError(f"a {kind.decode()!r} header of {size} bytes (more than 1 MiB): refused")
            if kind in (b"x", b"g"):
                records = _pax_records(self.read_padded(size))
                if kind == b"x":
                    pax = records
                else:
                    global_pax.update(records)
                continue
            if kind in (b"L", b"K"):
                value, nul, _ = self.read_padded(size).partition(b"\0")
                if not nul:  # GNU tar and tarfile count it in: without it, the size was damaged
                    raise CorruptCheckpointError(f"a GNU long-name header is garbled: {size} bytes without a NUL")
                if kind == b"L":
                    long_name = value
                else:
                    long_link = value
                continue
            name = name.split(b"\0", 1)[0]
            if kind == b"\0" and name.endswith(b"/"):  # a pre-POSIX folder: old type, name with a "/"
                kind = DIRECTORY
            if magic[:5] == b"ustar" and prefix[:1] != b"\0":
                name = prefix.split(b"\0", 1)[0] + b"/" + name
            link = link.split(b"\0", 1)[0]
            mode = _number(raw_mode) & 0o7777
            if global_pax:
                pax = {**global_pax, **pax}
            if pax or long_name is not None or long_link is not None:
                name = pax.get("path", long_name if long_name is not None else name)
                link = pax.get("linkpath", long_link if long_link is not None else link)
                if "size" in pax:
                    if not pax["size"].isdigit():
                        raise CorruptCheckpointError(f"a pax header holds a bad size {pax['size']!r}")
                    size = int(pax["size"])
                mtime = _pax_time(pax["mtime"]) if "mtime" in pax else _number(raw_mtime, signed=True)
                sparse = any(key.startswith("GNU.sparse.") for key in pax)
                pax, long_name, long_link = {}, None, None
                if b"\0" in name or b"\0" in link:  # only pax records can hold one: os calls refuse it
                    raise CorruptCheckpointError(f"a pax header holds a name with a NUL byte {name!r}")
                if sparse:  # GNU tar's pax sparse files: the data is a map and fragments, not the file
                    raise CorruptCheckpointError(f"entry {_text(name)!r} is a GNU sparse file, which is not supported")
            else:
                mtime = _number(raw_mtime, signed=True)
            if not _MIN_TIME <= mtime <= _MAX_TIME:  # pax or GNU base-256 numbers can hold more
                raise CorruptCheckpointError(f"entry {_text(name)!r} has an out-of-range time {mtime}")
            if len(name) > _MAX_NAME or len(link) > _MAX_NAME:
                raise CorruptCheckpointError(
                    f"entry {_text(name[:100])!r}... has a name or link target over {_MAX_NAME} bytes"
                )
            if len(name) > _MAX_PART and max(map(len, name.split(b"/"))) > _MAX_PART:
                raise CorruptCheckpointError(
                    f"entry {_text(name[:100])!r}... has a name part over {_MAX_PART} bytes, which no file system holds"
                )
            if self._pick is not None and not self._pick(Header(_text(name), kind, size, mode, mtime, _text(link))):
                if kind in _FILE_TYPES:
                    self.skip(size + -size % BLOCK)
                continue
            try:
                self.entry(kind, _text(name), _text(link), size, mode, mtime)
            except OSError as error:
                _refuse_unrestorable(error, _text(name))
                raise

    def plain_files(self) -> None:
        """Extract the plain files at the front of the stream in one loop, up to the first entry
        that is anything else: :meth:`entries` takes that one, and then calls this again.

        Parsing and checking headers is most of the cost of restoring small files: this loop does
        for each plain file what the general path does, without its calls and objects. A plain
        file: a file type, a ustar header whose numbers are plain octal and whose checksum is in
        its usual form (six digits, NUL, space), no pax or long-name header before it, no name
        prefix, a name already normal (no ``.``, ``..`` or empty part, not absolute, no trailing
        ``/``: at most 100 bytes) in the folder of the entry before it, not a folder of the archive
        and not a name used before (nothing to replace), under ``_HAND_OFF`` bytes, its data and
        padding in the piece of the stream at hand. For such an entry every rule of the general
        path is checked here (the header's checksum, a part of the name or a folder of the
        archive in the way) or cannot apply: the folder it is in was made and checked for links
        by the entry before. Whatever does not fit stops the loop, before anything is done for it.
        """
        below_parent = self._below_parent
        if below_parent != self._last_parent:
            return  # the folder's contents are looked up by the general path first
        below = self._below
        view = self._input.front()
        end = len(view)
        position = 0
        unpack = _PLAIN.unpack_from
        adler32 = zlib.adler32
        file_modes = _FILE_MODES
        files = self._files
        links = self._links
        writers = self._writers
        write = self._write
        creating = self._creating
        try:
            while position + BLOCK <= end:
                raw_name, raw_mode, raw_size, raw_mtime, raw_sum, kind, magic, prefix = unpack(view, position)
                if (
                    kind not in _FILE_TYPES
                    or raw_sum[6:] != b"\0 "
                    or raw_size[11]
                    or raw_mode[7]
                    or raw_mtime[11]
                    or (prefix[0] and magic[:5] == b"ustar")
                ):
                    break
                raw_name = raw_name.partition(b"\0")[0]
                relative = raw_name[2:] if raw_name.startswith(b"./") else raw_name
                if (
                    not relative
                    or relative[0] in _DOT_OR_SLASH
                    or relative[-1] == 47  # "/"
                    or b"/." in relative
                    or b"//" in relative
                ):
                    break
                digits_sum, digits_size, digits_mode, digits_mtime = (
                    raw_sum[:6],
                    raw_size[:11],
                    raw_mode[:7],
                    raw_mtime[:11],
                )
                if not (
                    digits_sum.isdigit() and digits_size.isdigit() and digits_mode.isdigit() and digits_mtime.isdigit()
                ):
                    break  # int() would also take signs, "_" and spaces
                try:
                    stored_sum, size = int(digits_sum, 8), int(digits_size, 8)
                    mode, mtime = file_modes[int(digits_mode, 8) & 0o7777], int(digits_mtime, 8)
                except ValueError:  # an 8 or a 9
                    break
                start = position + BLOCK
                header = view[position:start]
                if (
                    stored_sum
                    != (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - sum(raw_sum) + 254
                ):
                    break  # the general path refuses it (or takes the signed sum some old writers used)
                stop = start + size
                after = stop + (-size % BLOCK)
                if after > end or size >= _HAND_OFF:
                    break
                rel = relative.decode("utf-8", "surrogateescape")
                parent, _, leaf = rel.rpartition("/")
                if parent != below_parent or rel in files or rel in links:
                    break
                if isinstance(below, dict):
                    if leaf in below:
                        break
                elif below.startswith(leaf) and (len(below) == len(leaf) or below[len(leaf)] == "/"):
                    break
                name = rel if relative is raw_name else raw_name.decode("utf-8", "surrogateescape")
                if writers is not None:
                    batch = self._batch
                    if batch and (
                        len(batch) >= _BATCH_FILES
                        or self._batch_bytes + size > _BATCH_BYTES
                        or self._batch_folder != parent
                    ):
                        self.hand_on()
                        batch = self._batch
                    if not batch:
                        self._batch_folder = parent
                    batch.append((name, rel, [view[start:stop]], mode, mtime))
                    self._batch_bytes += size
                    creating.add(rel)
                elif write:
                    self.create(name, rel, view[start:stop], mode, mtime)
                files.add(rel)
                position = after
        finally:
            self._input.advance(position)

    def create(self, name: str, rel: str, data: memoryview, mode: int, mtime: int) -> None:
        """Create the small file ``rel`` with ``data`` here, in the reader (no writer threads)."""
        try:
            fd = os.open(rel, _WRITE_FLAGS, mode, dir_fd=self._fd)
        except OSError as error:
            _refuse_unrestorable(error, name)
            raise
        try:
            write_all(fd, data)
            _finish(fd, mode, mtime, self._umask)
        finally:
            os.close(fd)

    def entry(self, kind: bytes, name: str, link: str, size: int, mode: int, mtime: int) -> None:
        rel = self.inside(name, "entry")
        if kind in _SPECIAL_TYPES:
            raise UnsafeArchiveError(f"entry {name!r} is a {_SPECIAL_TYPES[kind]}")
        if rel == ".":
            if kind != b"5":
                raise UnsafeArchiveError(f"entry {name!r} would replace the destination")
            self._dir_attrs[rel] = (mode & 0o755 | 0o700, mtime)
            return
        if kind != b"5":
            _names_a_file(name, "entry")
        self.make_parents(rel)
        folder = self.is_folder(rel)
        if folder and kind in (*_FILE_TYPES, b"1", b"2"):
            raise CorruptCheckpointError(f"entry {name!r} would replace a folder of the archive")
        if kind in _FILE_TYPES:
            self.clear(rel)
            self.write_file(rel, name, size, mode, mtime)
            self._files.add(rel)
        elif kind == b"5":
            if not folder:
                self.clear(rel)
                if self._write:
                    os.mkdir(rel, 0o700, dir_fd=self._fd)
                self.add_folder(rel)
            self._dir_attrs[rel] = (mode & 0o755 | 0o700, mtime)
        elif kind == b"2":
            self.check_link_target(rel, name, link)
            self.clear(rel)
            if self._write:
                os.symlink(link, rel, dir_fd=self._fd)
                os.utime(rel, (mtime, mtime), dir_fd=self._fd, follow_symlinks=False)
            self._links[rel] = link
        elif kind == b"1":
            source = self.inside(_names_a_file(link, "hard link target"), "hard link target")
            if source not in self._files:
                raise UnsafeArchiveError(f"hard link {name!r} -> {link!r} is not to a file extracted before")
            if source != rel:  # a link to itself (GNU tar's for a linked file named twice) is already there
                self.created(source)
                self.clear(rel)
                if self._write:
                    os.link(source, rel, src_dir_fd=self._fd, dst_dir_fd=self._fd, follow_symlinks=False)
                self._files.add(rel)
        else:
            raise CorruptCheckpointError(f"entry {name!r} has an unsupported type {kind!r}")

    def check_link_target(self, rel: str, name: str, link: str) -> None:
        """Refuse a symlink whose target is empty, absolute or climbs above the folder (``..``
        counted from the link's own folder); whether its way passes through another symlink is
        known once all of them are in (:meth:`check_links`)."""
        if not link:  # os.symlink refuses it (ENOENT)
            raise CorruptCheckpointError(f"symlink {name!r} has an empty target")
        if link.startswith("/") or os.path.isabs(link):
            raise UnsafeArchiveError(f"symlink {name!r} -> {link!r} points to an absolute path")
        if _climbs_out(rel, link):
            raise UnsafeArchiveError(f"symlink {name!r} -> {link!r} points outside the destination")

    def check_links(self) -> None:
        """Refuse a symlink whose target walks through another symlink of the tree, as it is at
        the end (``d/up -> ..`` then ``d/x -> up/..`` leaves the folder, in either order).

        Checked on the finished tree, not as links arrive: nothing the extraction does follows a
        symlink (no name may go through one, files are opened with ``O_NOFOLLOW``), and a refusal
        fails the whole restore. So the ways need not be kept: only each link's name and target.
        """
        for rel, link in self._links.items():
            for here in _way(rel, link):
                if here in self._links:
                    raise UnsafeArchiveError(f"symlink {rel!r} -> {link!r} goes through the symlink {here!r}")

    def write_file(self, rel: str, name: str, size: int, mode: int, mtime: int) -> None:
        padding = -size % BLOCK
        if not self._write:
            self.skip(size + padding)
            return
        mode = _file_mode(mode)
        writers = self._writers
        if writers is not None and size < _HAND_OFF:
            if self._batch and (
                len(self._batch) >= _BATCH_FILES
                or self._batch_bytes + size > _BATCH_BYTES
                or self._batch_folder != _parent(rel)
            ):
                self.hand_on()
            if not self._batch:
                self._batch_folder = _parent(rel)
            self._batch.append((name, rel, self.read_views(size), mode, mtime))
            self._batch_bytes += size
            self._creating.add(rel)
            self.skip(padding)
            return
        fd = os.open(rel, _WRITE_FLAGS, mode, dir_fd=self._fd)
        if writers is not None:
            file = writers.open(fd, mode, mtime)  # closed by the writers from here on
            offset = 0
            while offset < size:
                length = min(size - offset, _JOB)
                writers.write(file, offset, self.read_views(length), length)
                offset += length
            writers.seal(file)
            self.skip(padding)
            return
        try:
            remaining = size
            while remaining:
                length = min(remaining, _STEP)
                write_views(fd, self.read_views(length))
                remaining -= length
            _finish(fd, mode, mtime, self._umask)
        finally:
            os.close(fd)
        self.skip(padding)


def link_way(rel: str, link: str) -> list[str] | None:
    """The folders (relative to the top) that the relative symlink ``rel -> link`` walks through
    from its own folder, ``..`` going up a level; ``None`` if the way climbs above the top.

    The walk extraction checks (none of them may be a symlink of the archive), for saving, which
    refuses up front what extraction would.
    """
    return None if _climbs_out(rel, link) else list(_way(rel, link))


def _climbs_out(rel: str, link: str) -> bool:
    """Whether the relative symlink ``rel -> link`` climbs above the top (more ``..`` than levels)."""
    depth = rel.count("/")
    for step in link.split("/"):
        if step == "..":
            if not depth:
                return True
            depth -= 1
        elif step not in ("", "."):
            depth += 1
    return False


def _way(rel: str, link: str) -> Iterator[str]:
    """The folders :func:`link_way` lists, one at a time (for a target that does not climb out):
    a target of thousands of parts passes through as many folders, which a list would hold at once."""
    parts = rel.split("/")[:-1]
    steps = [step for step in link.split("/") if step not in ("", ".")]
    for index, step in enumerate(steps):
        if step == "..":
            parts.pop()
            continue
        parts.append(step)
        if index < len(steps) - 1:
            yield "/".join(parts)


def _names_a_file(name: str, what: str) -> str:
    """``name``, refused if its last part is empty, ``.`` or ``..``: such a name can only be a
    folder (``x/``, ``x/.``), and no tool creates a file, link or symlink there (tar and ``tarfile``
    fail on it), so the archive is damaged."""
    if name.rpartition("/")[2] in ("", ".", ".."):
        raise CorruptCheckpointError(f"{what} {name!r} names a folder, not a file")
    return name


def _parent(normal: str) -> str:
    """``os.path.dirname`` of a normalised relative path, for a fraction of its cost."""
    return normal.rpartition("/")[0]


def _file_mode(mode: int) -> int:
    """The mode a restored file gets: owner read/write always, no set-id or sticky bits, no write
    for group and others, and execute for group and others only along with the owner's."""
    mode = mode & 0o755 | 0o600
    if not mode & 0o100:
        mode &= ~0o011
    return mode


#: :func:`_file_mode` of every mode a header can give (its low 12 bits), looked up per small file.
_FILE_MODES = [_file_mode(mode) for mode in range(0o10000)]


def _creation_umask(dest: str | None) -> int | None:
    """What creating a file in ``dest`` takes away from the mode asked for, when that is known:
    the process umask, unless ``dest`` has a default ACL (which then applies instead)."""
    if dest is None:
        return None
    try:
        os.getxattr(dest, "system.posix_acl_default")
        return None  # a default ACL: always fchmod
    except OSError as error:
        if error.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
    except AttributeError:  # pragma: no cover - no xattrs on this platform (and no /proc either)
        return None
    return _umask()


def _umask() -> int | None:
    """The process umask, read without changing it (``os.umask`` can only swap it, a race with
    other threads creating files); ``None`` where ``/proc`` does not tell it."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _finish(fd: int, mode: int, mtime: int, umask: int | None) -> None:
    """Give an open file its mode (unless creating it already did) and its modification time."""
    if umask is None or mode & umask:
        os.fchmod(fd, mode)
    os.utime(fd, (mtime, mtime))


def extract(
    read: Read,
    dest: str | None,
    *,
    views: ReadViews | None = None,
    writers: int = 0,
    pick: Pick | None = None,
    buffered: Callable[[], int] | None = None,
) -> None:
    """Extract the tar stream ``read`` gives into the new, empty folder ``dest``.

    With ``dest=None`` every header, rule and byte is checked the same way and nothing is written
    (``checkpointio verify``). ``views``, if given, reads file data without copying it;
    ``writers`` threads, if any, write the data of large files while the stream is read on
    (every file is written, closed and given its time before this returns). ``pick``, if given,
    is asked about every entry: those it declines are skipped, unchecked and unwritten (a partial
    restore). ``buffered``, if given, tells how many bytes ``views`` can give without reading
    further into its source: the stream is read ahead that far (else a step at a time), never
    past the end of the archive before it is needed.

    Raises:
        UnsafeArchiveError: An entry would be written outside ``dest`` or is a device.
        CorruptCheckpointError: The stream is truncated, garbled or of an unsupported kind.
    """
    _Extraction(read, dest, views, writers, pick, buffered).run()
