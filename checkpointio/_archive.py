"""Directories as gzip-compressed tar streams, packed and unpacked in worker threads.

The tar format is :mod:`._tar`'s, compression :mod:`._codec`'s; this module walks the tree and
joins them into streams. Everything here is blocking
and runs in a worker thread; bytes come and go through plain callables, so the caller decides
how they cross to the event loop.

The archive is a tar stream cut into blocks, each compressed as an independent gzip member.
Concatenated members are one valid ``.tar.gz`` (``tar -xzf``, :mod:`tarfile` and :mod:`gzip`
read it), and independent members let compression run on several threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import operator
import os
import stat
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

from . import _codec, _tar, _toc
from ._exceptions import (
    CorruptCheckpointError,
    SourceChangedError,
    SourceUnreadableError,
    UnsafeArchiveError,
    UnsupportedSourceError,
)
from ._placement import STAGING_NAME

__all__ = [
    "Entry",
    "GunzipReader",
    "Pieces",
    "Run",
    "Skip",
    "check_directory",
    "file_data",
    "file_type",
    "looks_like_tar_gz",
    "pack_directory",
    "skip_any",
    "skip_within",
    "tree_size",
    "unpack_directory",
    "unreadable",
    "walk_runs",
    "walk_tree",
]

logger = logging.getLogger(__name__)

Emit = Callable[[bytes], None]
#: The next compressed bytes, as the blocks a store received them in; ``[]`` at the end.
NextBlocks = Callable[[], list[bytes]]

_GZIP_MAGIC = b"\x1f\x8b"
#: Bytes one inflate call may produce: bounds memory whatever the compression ratio (gzip bombs).
_INFLATE_STEP = 1024 * 1024
_COPY_BUFSIZE = 1024 * 1024


#: Members smaller than this (a large file's last bytes and their zero padding, cut into a member
#: of their own for partial reads) say nothing about the data that follows: they do not switch
#: encoding between this thread and the pool.
_DECIDES = 64 * 1024


class _GzipMemberWriter:
    """Write-only sink for the tar stream: cuts it into blocks and emits
    each as an independent gzip member, compressed on ``workers`` threads, in order.

    This thread is one of them: blocks that deflate are handed to a pool of ``workers - 1``
    threads, and while the pool holds two blocks per thread unfinished, the next is deflated here.
    A pool of ``workers`` threads beside a busy producer would have ``workers + 1`` threads taking
    turns on ``workers`` cores (benchmarks/README.md, issue 19). Once a block comes back stored (float
    weights, compressed files: see :func:`_codec.encode_member`), the next ones are encoded right
    here instead: storing is a copy and a CRC32, cheaper than handing the block to another thread
    (figures in benchmarks/README.md), until a block deflates again.

    A block is kept as the pieces written (views of them where a block ends inside one), never
    copied into a buffer of its own: its bytes are copied once, into its member. Every allocation
    of a block's size is one that glibc may serve by growing its heap and then return to the
    system, so that the next one faults its pages in again (benchmarks/README.md, issue 19).
    """

    def __init__(
        self, emit: Emit, block_size: int, level: int, workers: int, on_member: Callable[[int, int], None] | None = None
    ) -> None:
        self._emit_raw = emit
        self._on_member = on_member
        self._block_size = block_size
        self._level = level
        self._pieces: list[_codec.Piece] = []  # the current block so far
        self._buffered = 0  # their bytes
        self._position = 0
        # this thread deflates too, when the pool's threads are behind: never more threads
        # deflating than ``workers`` (see _emit_block)
        self._pool = _codec.OrderedPool(workers - 1) if workers > 1 and level > 0 else None
        self._queued = 2 * (workers - 1)  # blocks the pool may hold before this thread deflates one
        self._workers = workers
        self._pending: deque[tuple[Future[bytes], int]] = deque()
        self._inline = False
        self._scratch: memoryview | None = None  # see write_from
        self._joins = _codec.Scratch(block_size)  # where a block of several pieces is joined to be deflated

    def write(self, data: bytes) -> int:
        """Append ``data``; it is kept, not copied, until its member is encoded: it must not change."""
        size = len(data)
        if not size:  # a piece that would make an empty member of a cut
            return 0
        self._position += size
        room = self._block_size - self._buffered
        if size < room:
            self._pieces.append(data)
            self._buffered += size
            return size
        view = memoryview(data)
        start = 0
        while size - start >= room:  # every block this completes
            self._pieces.append(view[start : start + room])
            start += room
            self._emit_block()
            room = self._block_size
        if start < size:
            self._pieces.append(view[start:])
            self._buffered = size - start
        return size

    def write_from(self, fd: int, size: int, on_read: Callable[[int], None], shrank: Callable[[], Exception]) -> None:
        """Append exactly ``size`` bytes read from ``fd``, each read at most what the current
        block has room for; ``on_read`` hears of each. A file that ends sooner raises ``shrank()``.

        A read that completes a block encoded on this thread lands in one buffer reused for every
        such read: its bytes are copied only into the member. Any other read is kept as the bytes
        it returned until its member is encoded.
        """
        remaining = size
        while remaining:
            room = self._block_size - self._buffered
            want = min(remaining, room)
            if want == room and (here := self._encodes_here()):
                if self._scratch is None:
                    self._scratch = memoryview(bytearray(self._block_size))
                view = self._scratch[:want]
                done = 0
                while done < want:
                    got = os.readv(fd, [view[done:]])
                    if not got:
                        raise shrank()
                    done += got
                self._pieces.append(view)
                self._position += want
                self._emit_block(here)  # encoded before this returns: the buffer is free again
            else:
                chunk = os.read(fd, want)
                if not chunk:
                    raise shrank()
                done = len(chunk)
                self.write(chunk)
            remaining -= done
            on_read(done)

    def tell(self) -> int:
        return self._position

    def cut(self) -> None:
        """End the current member here, whatever its size: the next byte starts a new one."""
        if self._pieces:
            self._emit_block()

    def _emit(self, member: bytes, size: int) -> None:
        self._emit_raw(member)
        if self._on_member is not None:
            self._on_member(len(member), size)

    def finish(self) -> None:
        if self._pieces:
            self._emit_block()
        while self._pending:
            self._emit_next()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _emit_next(self) -> None:
        future, size = self._pending.popleft()
        member = future.result()
        if size >= _DECIDES:
            self._inline = len(member) >= size  # stored: encode the next blocks here
        self._emit(member, size)

    def _busy(self) -> int:
        """Blocks the pool has not finished encoding."""
        return sum(not future.done() for future, _ in self._pending)

    def _encodes_here(self) -> bool:
        """Whether the next block would be encoded on this thread: without a pool, while blocks come
        back stored, and while the pool is behind. (Only ever turns from true to false by itself,
        as the pool finishes blocks.)"""
        return self._pool is None or self._inline or self._busy() >= self._queued

    def _emit_block(self, here: bool | None = None) -> None:
        """Encode the pieces buffered as one member (on this thread if ``here``, as
        :meth:`_encodes_here` says when not given) and start the next block."""
        pieces, size = self._pieces, sum(map(len, self._pieces))
        self._pieces, self._buffered = [], 0
        if here is None:
            here = self._encodes_here()
        if self._pool is None or self._inline:
            while self._pending:  # keep the order
                self._emit_next()
            member = _codec.encode_pieces(pieces, self._level, self._joins)
            if size >= _DECIDES:
                self._inline = len(member) >= size  # stored: encode the next blocks here
            self._emit(member, size)
            return
        while self._pending and self._pending[0][0].done():  # what is ready goes on at once
            self._emit_next()
        if here:
            # The pool is behind: this thread deflates the block instead of waiting. Where
            # producing a block costs as much as deflating one (small files), producer and pool
            # share the cores without a third thread taking turns with them.
            done: Future[bytes] = Future()
            done.set_result(_codec.encode_pieces(pieces, self._level, self._joins))
            self._pending.append((done, size))
        else:
            self._pending.append((self._pool.submit(_codec.encode_pieces, pieces, self._level, self._joins), size))
        while len(self._pending) > 2 * self._workers:  # bounded: a few blocks in flight per thread
            self._emit_next()


#: A walk's filter: given an entry's path inside the tree ("sub/name"), whether to leave it out.
Skip = Callable[[str], bool]


class Entry(NamedTuple):
    """One entry of a tree being walked (see :func:`walk_tree`)."""

    rel: str
    """Its path inside the tree, ``/``-separated."""
    name: str
    """Its name in its folder."""
    folder: int
    """A descriptor of that folder, open until the walk moves past it: read the entry through it
    (``dir_fd=``), never through a path, which could lead elsewhere once a folder was swapped."""
    st: os.stat_result
    """Its ``lstat``, taken when the walk reached it."""


_FOLDER = "folder"
_SYMLINK = "symlink"
_OTHER = "file"


#: What the listing says an entry is, by (is a folder, is a symlink) as ``os.DirEntry`` tells them
#: without following a symlink (from the listing itself on Linux: no system call).
_LISTED_KINDS = {(False, False): _OTHER, (True, False): _FOLDER, (False, True): _SYMLINK}
#: What an ``lstat`` says an entry is, by ``S_IFMT`` of its mode (anything else: ``_OTHER``).
_STAT_KINDS = {stat.S_IFDIR: _FOLDER, stat.S_IFLNK: _SYMLINK}
_NAME = operator.attrgetter("name")
_IS_FOLDER = operator.methodcaller("is_dir", follow_symlinks=False)
_IS_FILE = operator.methodcaller("is_file", follow_symlinks=False)
_MODE = operator.attrgetter("st_mode")


def unreadable(error: OSError, shown: str, uri: str) -> Exception:
    """``error`` met reading ``shown`` (a path of what the user gave), as the error to raise:
    :class:`SourceUnreadableError` for a permission refused, else the same ``OSError`` naming
    ``shown`` (a descriptor-relative call names the entry only, a snapshot its scratch copy)."""
    if isinstance(error, PermissionError):
        return SourceUnreadableError(f"cannot read {shown} to save {uri}: permission denied", uri=uri)
    return OSError(error.errno, error.strerror, shown)


def _open_folder(parent: int | None, name: str, listed: os.stat_result | None, shown: str, uri: str) -> int:
    """A descriptor of the folder ``name`` in ``parent``, which must still be the one listed.

    ``O_NOFOLLOW`` relative to the parent's descriptor: a folder swapped for a symlink (to
    ``~/.ssh``, say) since it was listed is refused rather than followed, and so is a folder
    renamed over by another one (its identity differs from the listing's).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        # the root is the path the user named: followed if it is a symlink
        fd = os.open(name, flags) if parent is None else os.open(name, flags | os.O_NOFOLLOW, dir_fd=parent)
    except FileNotFoundError as error:
        raise SourceChangedError(f"{shown} disappeared while {uri} was being saved", uri=uri) from error
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SourceChangedError(
                f"{shown} was replaced (by a symlink or a file) while {uri} was being saved", uri=uri
            ) from error
        raise unreadable(error, shown, uri) from error
    if listed is not None:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (listed.st_dev, listed.st_ino):
            os.close(fd)
            raise SourceChangedError(
                f"{shown} was replaced while {uri} was being saved (the folder read is not the one listed)", uri=uri
            )
    return fd


def _listing(fd: int, shown: str, uri: str) -> tuple[list[str], list[str], list[bool]]:
    """The folder's names, sorted, what the listing says each is, and whether it says it is a
    regular file (from the listing itself where the file system gives the type, else an
    ``lstat``); the names a killed restore or placement left behind (``STAGING_NAME``) left out.
    Per-entry work is C-level maps."""
    try:
        with os.scandir(fd) as listed:
            entries = list(listed)
        entries.sort(key=_NAME)
        names = list(map(_NAME, entries))
        if ".checkpointio-" in "\0".join(names) and any(map(STAGING_NAME.fullmatch, names)):  # every such name holds it
            entries = [entry for entry in entries if not STAGING_NAME.fullmatch(entry.name)]
            names = list(map(_NAME, entries))
        kinds = list(
            map(
                _LISTED_KINDS.__getitem__,
                zip(map(_IS_FOLDER, entries), map(os.DirEntry.is_symlink, entries), strict=True),
            )
        )
        regular = list(map(_IS_FILE, entries))
    except OSError as error:
        raise unreadable(error, shown, uri) from error
    return names, kinds, regular


#: Most entries in one run of :func:`walk_runs`: what a walk holds of a flat folder beyond its
#: listing is this many ``lstat`` results, not one per file of the folder.
RUN_ENTRIES = 1024


class Run(NamedTuple):
    """Consecutive siblings of a tree being walked (see :func:`walk_runs`)."""

    folder: int
    """A descriptor of their folder, open until the walk moves past it: read them through it
    (``dir_fd=``), never through a path, which could lead elsewhere once a folder was swapped."""
    prefix: str
    """Their folder's path inside the tree, ``/``-separated, with a trailing ``/`` (``""`` at the top)."""
    names: list[str]
    """Their names, sorted."""
    stats: list[os.stat_result]
    """Their ``lstat``, taken when the walk reached them; with ``stat_files=False`` (see
    :func:`walk_runs`), ``None`` for each regular file (typed for the default only)."""


def walk_runs(
    root: str,
    *,
    shown: str | None = None,
    uri: str | None = None,
    skip: Skip | None = None,
    stat_files: bool = True,
) -> Generator[Run, None, None]:
    """Pre-order walk of ``root``, as runs of siblings: every folder comes before what it holds,
    siblings sorted by name.

    A run ends at a folder (its last entry), after :data:`RUN_ENTRIES` entries, or at the end of its
    folder's listing; once the caller asks for the next run, the walk goes into that folder.
    Callers handle a folder's files in bulk this way (:func:`walk_tree` gives one entry at a time).

    Every folder is opened relative to its parent's descriptor, without following a symlink, and
    must be the folder the listing showed; every entry must still be what the listing said (a
    folder, a symlink or a file): a tree changed under the walk raises :class:`SourceChangedError`
    instead of leading the walk outside it. The root is the path given (followed if a symlink).
    Entries a killed restore or placement left behind (exact staging names, see
    ``_placement.STAGING_NAME``, files or folders, at any depth) and what ``skip`` names are left out.
    ``shown`` is the path messages name (the user's, when ``root`` is a snapshot of it), ``uri`` what
    is being saved.

    ``stat_files=False`` leaves out the ``lstat`` of the entries the listing says are regular files
    (their stat is ``None``), for a caller that opens each and takes its ``fstat`` anyway: it must
    then check that what it opened is a regular file.
    """
    shown = shown if shown is not None else root
    uri = uri if uri is not None else shown
    top = _open_folder(None, root, None, shown, uri)
    # each folder being walked: its descriptor, its path inside the tree with a trailing "/", its
    # listing (names, kinds, which are regular files) and where the walk is in it
    frames: list[tuple[int, str, list[str], list[str], list[bool], list[int]]] = []
    lstat = os.stat
    try:
        frames.append((top, "", *_listing(top, shown, uri), [0]))
        while frames:
            fd, prefix, listed, expected, regular, position = frames[-1]
            start = position[0]
            if start >= len(listed):
                frames.pop()
                os.close(fd)
                continue
            try:  # a run ends at a folder, or after RUN_ENTRIES entries
                end = expected.index(_FOLDER, start, start + RUN_ENTRIES) + 1
            except ValueError:
                end = min(len(listed), start + RUN_ENTRIES)
            position[0] = end
            names, kinds, plain = listed[start:end], expected[start:end], regular[start:end]
            if skip is not None:
                kept = [number for number, name in enumerate(names) if not skip(prefix + name)]
                if len(kept) < len(names):
                    names, kinds = [names[number] for number in kept], [kinds[number] for number in kept]
                    plain = [plain[number] for number in kept]
                    if not names:
                        continue
            stats: list[os.stat_result | None]
            try:
                # a comprehension, not a map over functools.partial: merging its keywords costs a call
                if stat_files:
                    stats = [lstat(name, dir_fd=fd, follow_symlinks=False) for name in names]
                else:
                    stats = [
                        None if file else lstat(name, dir_fd=fd, follow_symlinks=False)
                        for name, file in zip(names, plain, strict=True)
                    ]
            except FileNotFoundError as error:
                message = f"{os.path.join(shown, prefix + str(error.filename))} disappeared while {uri} was being saved"
                raise SourceChangedError(message, uri=uri) from error
            except OSError as error:
                raise unreadable(error, os.path.join(shown, prefix + str(error.filename)), uri) from error
            if stat_files:
                found = list(map(_STAT_KINDS.get, map(stat.S_IFMT, map(_MODE, stats)), repeat(_OTHER)))
            else:
                found = [
                    kind if st is None else _STAT_KINDS.get(stat.S_IFMT(st.st_mode), _OTHER)
                    for kind, st in zip(kinds, stats, strict=True)
                ]
            if found != kinds:
                number = next(number for number, kind in enumerate(found) if kind != kinds[number])
                raise SourceChangedError(
                    f"{os.path.join(shown, prefix + names[number])} was replaced while {uri} was being saved "
                    f"(a {kinds[number]} became a {found[number]})",
                    uri=uri,
                )
            yield Run(fd, prefix, names, stats)  # type: ignore[arg-type]  # None only where asked for
            if found[-1] == _FOLDER:
                name, st = names[-1], stats[-1]
                rel = prefix + name
                full = os.path.join(shown, rel)
                child = _open_folder(fd, name, st, full, uri)
                listing: tuple[list[str], list[str], list[bool]] = ([], [], [])
                frames.append((child, f"{rel}/", *listing, [0]))  # first, so that it is closed if listing fails
                names, kinds, plain = _listing(child, full, uri)
                listing[0].extend(names)
                listing[1].extend(kinds)
                listing[2].extend(plain)
    finally:
        for fd, *_ in frames:
            os.close(fd)


def walk_tree(
    root: str, *, shown: str | None = None, uri: str | None = None, skip: Skip | None = None
) -> Generator[Entry, None, None]:
    """Pre-order walk of ``root``, one entry at a time: :func:`walk_runs` (its checks and what it
    leaves out), flattened."""
    with contextlib.closing(walk_runs(root, shown=shown, uri=uri, skip=skip)) as runs:
        for fd, prefix, names, stats in runs:
            for name, st in zip(names, stats, strict=True):
                yield Entry(prefix + name, name, fd, st)


def skip_within(root: str, folder: str, names: Callable[[str], bool]) -> Skip | None:
    """The :data:`Skip` leaving out the ``names`` of ``folder`` where it lies inside the tree at
    ``root`` (both compared as real paths); ``None`` when it lies outside."""
    base = os.path.realpath(root)
    place = os.path.realpath(folder)
    if place == base:
        inside = ""
    elif place.startswith(base.rstrip(os.sep) + os.sep):
        inside = os.path.relpath(place, base).replace(os.sep, "/") + "/"
    else:
        return None

    def skip(rel: str) -> bool:
        return rel.startswith(inside) and "/" not in rel[len(inside) :] and names(rel[len(inside) :])

    return skip


def skip_any(*skips: Skip | None) -> Skip | None:
    """One :data:`Skip` leaving out what any of ``skips`` does."""
    given = [skip for skip in skips if skip is not None]
    if len(given) <= 1:
        return given[0] if given else None
    return lambda rel: any(skip(rel) for skip in given)


def _check_link(root: str, rel: str, target: str, uri: str) -> None:
    """Refuse a symlink that a restore would refuse: the save would look fine and never come back.

    Extraction refuses a target outside the tree and a target whose way passes through another
    symlink of the tree (``d/up -> ..`` then ``d/x -> up/..`` climbs out although it reads as
    inside), walking the target as it does (:func:`_tar.link_way`).
    """
    way = None if os.path.isabs(target) else _tar.link_way(rel, target)
    if way is None:
        raise UnsupportedSourceError(
            f"{uri}: symlink {rel!r} -> {target!r} points outside the directory being saved; "
            "a restore would refuse it, so it is not saved (make it relative and inside the tree)",
            uri=uri,
        )
    for here in way:
        if os.path.islink(os.path.join(root, here)):
            raise UnsupportedSourceError(
                f"{uri}: symlink {rel!r} -> {target!r} goes through the symlink {here!r}; a restore "
                "refuses that (it is how links climb out of a folder), so it is not saved (point it "
                f"at the real path, without {here!r})",
                uri=uri,
            )


def file_data(fd: int, size: int, full: str, uri: str, step: int = _COPY_BUFSIZE) -> Iterator[bytes]:
    """Exactly ``size`` bytes of an open file (what it held when it was listed or given), in
    pieces of at most ``step``; a file that shrank meanwhile raises :class:`SourceChangedError`."""
    remaining = size
    while remaining:
        chunk = os.read(fd, min(remaining, step))
        if not chunk:
            raise SourceChangedError(f"{full} shrank while {uri} was being saved", uri=uri)
        remaining -= len(chunk)
        yield chunk


def _seconds(st: os.stat_result) -> int:
    """The whole second of a file's mtime, floored from the nanoseconds (``int(st.st_mtime)``
    rounds 1700000000.999999999 up through the float, and truncates -1.5 to -1)."""
    return st.st_mtime_ns // 1_000_000_000


#: How a file of the tree is opened for reading: never through a symlink swapped in since the
#: listing (its bytes would come from anywhere); without blocking or taking a terminal should the
#: entry have become a pipe or a device meanwhile (the ``fstat`` after it then refuses it).
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


def _open_failed(error: OSError, full: str, uri: str) -> Exception:
    """What to raise when opening the listed file ``full`` failed with ``error``."""
    if isinstance(error, FileNotFoundError):
        return SourceChangedError(f"{full} disappeared while {uri} was being saved", uri=uri)
    if error.errno == errno.ELOOP:
        return SourceChangedError(f"{full} was replaced by a symlink while {uri} was being saved", uri=uri)
    return unreadable(error, full, uri)


def _not_listed(full: str, uri: str) -> SourceChangedError:
    """The file opened as ``full`` is not the one listed: renamed over, or a folder now (whose
    inode number can be one reused)."""
    return SourceChangedError(
        f"{full} was replaced while {uri} was being saved (the file read is not the one listed)", uri=uri
    )


def _add_file(
    sink: _GzipMemberWriter,
    entry: Entry,
    full: str,
    uri: str,
    on_read: Callable[[int], None],
    opened: int | None = None,
) -> None:
    """Append a regular file's header and exactly the bytes its stat (``entry.st``) promised
    (counted by ``on_read``). ``opened``: the file open already, ``entry.st`` its ``fstat``
    (read as it is, and left open), else it is opened and must be the file ``entry.st`` stated."""
    st = entry.st
    size = st.st_size
    padding = bytes(-size % _tar.BLOCK)
    if opened is not None:
        fd = opened
    else:
        try:
            fd = os.open(entry.name, _READ_FLAGS, dir_fd=entry.folder)
        except OSError as error:
            raise _open_failed(error, full, uri) from error
    try:
        if opened is None:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise _not_listed(full, uri)
        header = _tar.header(entry.rel, _tar.FILE, size=size, mode=stat.S_IMODE(st.st_mode), mtime=_seconds(st))
        if size <= _COPY_BUFSIZE:  # header, data and padding in one write
            sink.write(b"".join((header, *file_data(fd, size, full, uri), padding)))
            on_read(size)
            return
        sink.write(header)
        shrank = f"{full} shrank while {uri} was being saved"
        sink.write_from(fd, size, on_read, lambda: SourceChangedError(shrank, uri=uri))
    finally:
        if opened is None:
            os.close(fd)
    sink.write(padding)


#: Most bytes of small files :func:`_add_files` joins before handing them to the archive: the
#: memory a batch holds beyond the block being filled.
_BATCH_BYTES = 256 * 1024
_FILE_KIND = "file"


class _Tree(NamedTuple):
    """What adding any entry of the tree being packed needs besides the entry (see :func:`_add_entry`)."""

    root: str
    top: str  # the path messages name, with a trailing separator: names are joined by concatenation
    uri: str
    links: dict[tuple[int, int], str]
    own_members: int
    batched: int  # plain files smaller than this are added in bulk (see _add_files)
    on_read: Callable[[int], None]


def _add_files(sink: _GzipMemberWriter, table: _toc.TableWriter, run: Run, batch: list[int], tree: _Tree) -> None:
    """Append the regular files ``run.names[i]`` for ``i`` in ``batch`` (small and linked
    nowhere else as listed, or not yet stated: see ``walk_runs(stat_files=False)``) with their
    table rows: what :func:`_add_file` does for each, with the per-file work in one loop, their
    headers and data joined per :data:`_BATCH_BYTES`, and the rows handed over once. A file not
    stated before that turns out large or hard-linked goes through :func:`_add_entry`.

    Every file is opened relative to its folder without following a symlink and must be a
    regular file, the one listed where it was stated (its ``fstat``); it is stored with the size
    it was listed with, else the size its ``fstat`` gives (a file that shrank raises
    :class:`SourceChangedError`).
    """
    folder, prefix, names, stats = run
    top, uri, batched = tree.top, tree.uri, tree.batched
    open_, fstat, read, close, header = os.open, os.fstat, os.read, os.close, _tar.header
    flags, kind, is_file = _READ_FLAGS, _tar.FILE, stat.S_ISREG
    pieces: list[bytes] = []
    rows: list[tuple[str, str, int, int, int, str, int, int]] = []
    position = sink.tell()
    joined = position  # where the pieces not yet handed to the archive start
    read_bytes = 0
    for number in batch:
        name, listed = names[number], stats[number]
        try:
            fd = open_(name, flags, dir_fd=folder)
        except OSError as error:
            raise _open_failed(error, top + prefix + name, uri) from error
        try:
            opened = fstat(fd)
            if not is_file(opened.st_mode) or (
                listed is not None and (opened.st_ino != listed.st_ino or opened.st_dev != listed.st_dev)
            ):
                raise _not_listed(top + prefix + name, uri)
            st = opened if listed is None else listed
            if listed is None and (st.st_size >= batched or st.st_nlink > 1):
                if pieces:  # what comes before it, first
                    sink.write(b"".join(pieces))
                    pieces.clear()
                table.extend(rows)
                rows.clear()
                tree.on_read(read_bytes)
                read_bytes = 0
                _add_entry(sink, table, Entry(prefix + name, name, folder, st), tree, top + prefix + name, fd)
                position = joined = sink.tell()
                continue
            size = st.st_size
            data = read(fd, size) if size else b""
            if len(data) < size:  # a short read, or it shrank: file_data tells which
                data += b"".join(file_data(fd, size - len(data), top + prefix + name, uri))
        finally:
            close(fd)
        rel = prefix + name
        mode, mtime = st.st_mode & 0o7777, st.st_mtime_ns // 1_000_000_000
        head = header(rel, kind, size=size, mode=mode, mtime=mtime)
        padding = -size % 512
        start = position
        position += len(head) + size + padding
        pieces += (head, data, bytes(padding))
        rows.append((rel, _FILE_KIND, mode, mtime, size, "", start, position))
        read_bytes += size
        if position - joined >= _BATCH_BYTES:
            sink.write(b"".join(pieces))
            pieces.clear()
            joined = position
    if pieces:
        sink.write(b"".join(pieces))
    table.extend(rows)
    tree.on_read(read_bytes)


def tree_size(root: Path, *, shown: str | None = None, skip: Skip | None = None) -> int:
    """The bytes of the regular files under ``root`` (hard-linked ones once), walked as
    :func:`pack_directory` walks it (the same ``skip``): the total a save's progress is measured
    against. A tree that changes under the walk raises as the save would."""
    uri = shown if shown is not None else str(root)
    total = 0
    seen: set[tuple[int, int]] = set()
    with contextlib.closing(walk_tree(str(root), shown=uri, uri=uri, skip=skip)) as entries:
        for entry in entries:
            st = entry.st
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _ignore(count: int) -> None:
    """The default ``on_read``: nobody counts."""


def _add_entry(
    sink: _GzipMemberWriter, table: _toc.TableWriter, entry: Entry, tree: _Tree, full: str, opened: int | None = None
) -> None:
    """Append one entry of any kind (a folder, a symlink, a hard link, a large file, something
    skipped with a warning) with its table row; ``tree.links`` maps the files linked elsewhere to
    their first name, files from ``tree.own_members`` bytes on get gzip members of their own.
    ``opened``: a regular file's descriptor, open already (see :func:`_add_file`), left open."""
    rel, st = entry.rel, entry.st
    links, own_members, root, uri, on_read = tree.links, tree.own_members, tree.root, tree.uri, tree.on_read
    mode, mtime = stat.S_IMODE(st.st_mode), _seconds(st)
    start = sink.tell()
    if stat.S_ISREG(st.st_mode):
        inode = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and inode in links:
            sink.write(_tar.header(rel, _tar.HARD_LINK, mode=mode, mtime=mtime, link=links[inode]))
            table.add(rel, "hardlink", mode, mtime, 0, links[inode], start, sink.tell())
            return
        if st.st_nlink > 1:
            links[inode] = rel
        if st.st_size >= own_members:  # a partial restore then reads little besides the file
            sink.cut()
            start = sink.tell()
        _add_file(sink, entry, full, uri, on_read, opened)
        table.add(rel, "file", mode, mtime, st.st_size, "", start, sink.tell())
        if st.st_size >= own_members:
            sink.cut()
    elif stat.S_ISDIR(st.st_mode):
        sink.write(_tar.header(rel + "/", _tar.DIRECTORY, mode=mode, mtime=mtime))
        table.add(rel, "dir", mode, mtime, 0, "", start, sink.tell())
    elif stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(entry.name, dir_fd=entry.folder)
        except FileNotFoundError as error:
            raise SourceChangedError(f"{full} disappeared while {uri} was being saved", uri=uri) from error
        _check_link(root, rel, target, uri)
        sink.write(_tar.header(rel, _tar.SYMLINK, mode=mode, mtime=mtime, link=target))
        table.add(rel, "symlink", mode, mtime, 0, target, start, sink.tell())
    else:
        kind = file_type(st.st_mode)
        logger.warning("skipping %s %s (it holds no data to save)", kind, full)


def pack_directory(
    root: Path,
    emit: Emit,
    *,
    block_size: int,
    level: int,
    workers: int = 1,
    shown: str | None = None,
    skip: Skip | None = None,
    on_read: Callable[[int], None] = _ignore,
) -> None:
    """Write ``root``'s contents as a .tar.gz stream to ``emit``, one gzip member per block.

    Entries are named relative to ``root`` in sorted order (but for what a killed restore or
    placement left under an exact staging name, see ``_placement.STAGING_NAME``, and what ``skip``
    names); empty folders, symlinks (as links), hard links, modes and mtimes (whole seconds) are
    kept; owners are not (a restore belongs to whoever runs it). Sockets, pipes and device files are
    skipped with a warning: they hold no data. Each file is stored whole as it was when opened
    (size, mode and time from its ``fstat``): one that grows meanwhile keeps the size it had then,
    one renamed over before it was opened is stored as the new file. One that shrinks while it is
    read, one that vanishes or is no longer a regular file when opened, and an entry replaced since
    it was listed (a folder swapped for a symlink included) raise :class:`SourceChangedError` (see
    :func:`walk_runs`). Messages name ``shown`` (default ``root``): the user's folder when ``root``
    is a snapshot of it. ``on_read`` hears of each piece of a file read.
    """
    uri = shown if shown is not None else str(root)
    table = _toc.TableWriter(block_size, level)
    sink = _GzipMemberWriter(emit, block_size, level, workers, on_member=table.member)
    own_members = block_size // 4  # files from this size on start a member and end one
    tree = _Tree(
        root=str(root),
        top=uri.rstrip(os.sep) + os.sep,
        uri=uri,
        links={},
        own_members=own_members,
        batched=min(own_members, _COPY_BUFSIZE),
        on_read=on_read,
    )
    try:
        # Regular files are not stated by the walk: _add_files takes the fstat of each as it opens it.
        with contextlib.closing(walk_runs(tree.root, shown=uri, uri=uri, skip=skip, stat_files=False)) as runs:
            for run in runs:
                # plain files too small for a member of their own go in bulk (see _add_files)
                batch: list[int] = []
                stats: list[os.stat_result | None] = run.stats  # type: ignore[assignment]  # see stat_files
                for number, st in enumerate(stats):
                    if st is None or (st.st_size < tree.batched and st.st_nlink == 1 and stat.S_ISREG(st.st_mode)):
                        batch.append(number)
                        continue
                    if batch:
                        _add_files(sink, table, run, batch, tree)
                        batch = []
                    name = run.names[number]
                    entry = Entry(run.prefix + name, name, run.folder, st)
                    _add_entry(sink, table, entry, tree, tree.top + entry.rel)
                if batch:
                    _add_files(sink, table, run, batch, tree)
        sink.write(_tar.end_of_archive(sink.tell()))
        sink.finish()
        for member in table.finish():  # after tar's end-of-archive blocks: see _toc
            emit(member)
    finally:
        sink.close()


def file_type(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words (for messages)."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "a regular file" if stat.S_ISREG(mode) else "a file of unknown type"


class Pieces:
    """Bytes as a queue of pieces (views of the blocks they came in), taken from the front.

    Nothing is joined unless asked for: a file's data goes from the blocks a member was cut
    into, or an inflated member, to the file's writer as views of them.
    """

    def __init__(self) -> None:
        self._pieces: deque[memoryview] = deque()
        self.length = 0

    def add(self, data: bytes | memoryview) -> None:
        if len(data):
            self._pieces.append(data if isinstance(data, memoryview) else memoryview(data))
            self.length += len(data)

    def take(self, size: int) -> list[memoryview]:
        """The first ``size`` bytes (fewer if there are fewer), as views, removed from the queue."""
        views: list[memoryview] = []
        pieces = self._pieces
        while size > 0 and pieces:
            piece = pieces[0]
            if len(piece) <= size:
                views.append(pieces.popleft())
                size -= len(piece)
                self.length -= len(piece)
            else:
                views.append(piece[:size])
                pieces[0] = piece[size:]
                self.length -= size
                size = 0
        return views

    def take_bytes(self, size: int) -> bytes:
        """The first ``size`` bytes (fewer if there are fewer) as one ``bytes`` (a copy)."""
        views = self.take(size)
        return bytes(views[0]) if len(views) == 1 else b"".join(views)

    def head(self, size: int) -> bytes:
        """A copy of the first ``size`` bytes (fewer if there are fewer), left in the queue."""
        pieces = self._pieces
        if pieces and len(pieces[0]) >= size:
            return bytes(pieces[0][:size])
        out = bytearray()
        for piece in pieces:
            out += piece[: size - len(out)]
            if len(out) >= size:
                break
        return bytes(out)

    def strip_zeros(self) -> None:
        """Drop zero bytes at the front (padding between gzip members, as gzip(1) allows)."""
        pieces = self._pieces
        while pieces:
            piece = pieces[0]
            kept = len(bytes(piece).lstrip(b"\x00")) if piece[0] == 0 else len(piece)
            if kept:
                pieces[0] = piece[len(piece) - kept :]
                self.length -= len(piece) - kept
                return
            pieces.popleft()
            self.length -= len(piece)

    def clear(self) -> None:
        self._pieces.clear()
        self.length = 0


def _contiguous(views: list[memoryview]) -> memoryview | bytes:
    """The bytes of ``views`` in one buffer: the one view itself, or a copy joining them."""
    return views[0] if len(views) == 1 else b"".join(views)


class GunzipReader:
    """Read-only file over a stream of compressed chunks: inflates concatenated gzip members.

    Members checkpointio wrote (they state their length) are cut from the stream and inflated on
    ``workers`` threads at once; a member holding its block stored (float weights, compressed
    files) is not inflated at all: its data is handed on as views of the member, checked against
    its CRC32. A stream from another writer is inflated sequentially. Memory stays bounded by a
    few members (or one inflate step) whatever the compression ratio.

    :meth:`read` gives a copy (tar headers); :meth:`read_views` gives views of the inflated
    data without copying it (file contents, on their way to a file).

    ``covered``: the caller checks a CRC32 of every byte ``pull`` gives against a checksum stored
    with the object, before anything read is presented. A stored member's CRC32 is then not
    taken. The invariant that makes it safe: a stored member's data *is* bytes of the stream as
    pulled (its stored blocks' payloads, views of the member cut from the pulled bytes), so any
    change to that data changes the stream's CRC32 and the caller refuses the restore; the
    member's own CRC32 would only say so sooner. A deflated member's CRC32 is always checked:
    it covers the inflated data, which no CRC32 of the stream does. Nor is anything else the
    member check does left out: a stored member's framing (block lengths, the stated length)
    is checked as before.
    """

    def __init__(self, pull: NextBlocks, workers: int = 1, *, covered: bool = False) -> None:
        self._pull = pull
        self._covered = covered
        self._input = Pieces()
        self._input_done = False
        self._output = Pieces()
        self._eof = False
        self._workers = workers
        self._parallel: bool | None = None  # decided by the first member
        self._pool: _codec.OrderedPool | None = None
        self._pending: deque[Future[bytes]] = deque()
        self._inflater: Any = None
        self._member_started = False
        self._draining = False  # the tar stream has ended: what follows is trailing data
        #: The start of bytes after the last member that are not one: an error once the members
        #: before them are read (members are read ahead, while the tar stream may already be over).
        self._not_member: bytes | None = None

    @property
    def buffered(self) -> int:
        """Inflated bytes waiting to be read."""
        return self._output.length

    def _ready(self, size: int) -> None:
        while not self._eof and (size < 0 or self._output.length < size):
            self._fill()

    def read(self, size: int = -1) -> bytes:
        self._ready(size)
        return self._output.take_bytes(self._output.length if size < 0 else size)

    def read_views(self, size: int) -> list[memoryview]:
        """The next ``size`` bytes (fewer at the end) as views, valid for as long as they are held."""
        self._ready(size)
        return self._output.take(size)

    def drain(self) -> None:
        """Inflate and discard the rest of the stream, so every byte was checked."""
        self._draining = True
        while not self._eof:
            self._fill()
            self._output.clear()
        self._output.clear()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        if self._pool is not None:
            self._pool.close()

    def _more_input(self) -> bool:
        if self._input_done:
            return False
        blocks = self._pull()
        if not blocks:
            self._input_done = True
            return False
        for block in blocks:
            self._input.add(block)
        return True

    def _fill(self) -> None:
        if self._parallel is None:
            while self._input.length < 32 and self._more_input():
                pass
            head = self._input.head(64 * 1024).lstrip(b"\x00")
            self._parallel = _codec.member_length(head) is not None
            if self._parallel and self._workers > 1:
                self._pool = _codec.OrderedPool(self._workers)
        if self._parallel:
            self._fill_members()
        else:
            self._fill_sequential()

    def _next_member(self) -> list[memoryview] | None:
        """The next member, as views of the blocks it arrived in; ``None`` after the last."""
        if self._not_member is not None:
            return None
        while True:
            self._input.strip_zeros()  # zero padding between members, as gzip(1) allows
            if self._input.length >= 32 or not self._more_input():
                break
        if not self._input.length:
            return None
        head = self._input.head(32)
        length = _codec.member_length(head)
        if length is None:
            self._not_member = head
            return None
        while self._input.length < length:
            if not self._more_input():
                raise CorruptCheckpointError("the archive is truncated: its last gzip member is incomplete")
        return self._input.take(length)

    def _not_a_member(self, data: bytes | bytearray) -> str:
        """What ``data``, which does not start a gzip member (of ours, in a stream of ours), is."""
        if self._input_done and len(data) < 32 and data.startswith(_GZIP_MAGIC[: len(data)]):
            return "the archive is truncated: its last gzip member is incomplete"
        if self._draining:  # GNU tar and Python's gzip refuse them too
            return "the archive has trailing data after its end: bytes that are not a gzip member"
        return "the archive is garbled: a gzip member has no valid header"

    def _end_of_members(self) -> None:
        if self._not_member is not None:
            raise CorruptCheckpointError(self._not_a_member(self._not_member))
        self._eof = True

    def _add_member(self, member: list[memoryview]) -> None:
        """Inflate ``member`` here: a stored one by reference (views of it), any other by copy."""
        stored = _codec.stored_data(member, check=not self._covered)
        if stored is None:
            self._output.add(_codec.inflate_member(_contiguous(member)))
            return
        for view in stored:
            self._output.add(view)

    def _fill_members(self) -> None:
        if self._pool is None:
            member = self._next_member()
            if member is None:
                self._end_of_members()
            else:
                self._add_member(member)
            return
        while len(self._pending) < 2 * self._workers:
            member = self._next_member()
            if member is None:
                break
            if _codec.is_stored_member(member):  # a CRC32, no copy: here, after those before it
                while self._pending:
                    self._output.add(self._pending.popleft().result())
                self._add_member(member)
                return
            self._pending.append(self._pool.submit(_codec.inflate_member, _contiguous(member)))
        if not self._pending:
            self._end_of_members()
            return
        self._output.add(self._pending.popleft().result())

    def _fill_sequential(self) -> None:
        inflater = self._inflater
        if inflater is not None and inflater.eof:
            unused = inflater.unused_data
            rest = self._input.take(self._input.length)
            self._input.add(unused)
            for view in rest:
                self._input.add(view)
            inflater = self._inflater = None
        if inflater is not None and inflater.unconsumed_tail:
            data = inflater.unconsumed_tail
        else:
            if not self._input.length and not self._more_input():
                if self._member_started and inflater is not None:
                    raise CorruptCheckpointError("the archive is truncated: its last gzip member is incomplete")
                self._eof = True
                return
            data = self._input.take_bytes(self._input.length)
        if inflater is None:
            data = data.lstrip(b"\x00")
            if not data:
                return
            if self._member_started and not data.startswith(_GZIP_MAGIC[: len(data)]):
                raise CorruptCheckpointError(self._not_a_member(data))
            inflater = self._inflater = _codec.sequential_inflater()
            self._member_started = True
        self._output.add(inflater.decompress(data, _INFLATE_STEP))


def looks_like_tar_gz(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of an object) starts a gzip-compressed tar archive."""
    block = b""
    try:  # past empty members (a stream of appended gzip files may start with one)
        while head.startswith(_GZIP_MAGIC) and len(block) < _tar.BLOCK:
            inflater = _codec.sequential_inflater()
            block += inflater.decompress(head, _tar.BLOCK - len(block))
            if not inflater.eof:
                break
            head = inflater.unused_data.lstrip(b"\x00")
    except _codec.InflateError:
        return False
    return _tar.is_header(block)


def unpack_directory(
    pull: NextBlocks,
    dest: Path | None,
    *,
    uri: str,
    workers: int = 1,
    pick: _tar.Pick | None = None,
    covered: bool = False,
) -> None:
    """Extract a .tar.gz stream from ``pull`` into the existing empty folder ``dest``.

    Nothing is written outside ``dest`` (see :mod:`._tar`): absolute names, ``..``, links
    pointing out and device files raise :class:`UnsafeArchiveError`. A truncated or garbled stream
    raises :class:`CorruptCheckpointError`. The stream is read to its end, so the caller's checksum
    covers every byte. On error, ``dest`` may hold part of the tree: the caller removes it.
    With ``dest=None`` the stream is checked the same way and nothing is written. ``pick`` selects
    the entries to extract (see :func:`_tar.extract`); the stream is still read to its end.
    ``covered``: the caller checks a CRC32 of the whole stream against a stored checksum before
    presenting anything (see :class:`GunzipReader`).
    """
    reader = GunzipReader(pull, workers, covered=covered)
    try:
        # The reader thread parses; with workers > 1, that many threads write large files' data.
        writers = workers if workers > 1 else 0
        _tar.extract(
            reader.read,
            str(dest) if dest is not None else None,
            views=reader.read_views,
            writers=writers,
            pick=pick,
            buffered=lambda: reader.buffered,
        )
        reader.drain()
    except UnsafeArchiveError as error:
        raise UnsafeArchiveError(f"{uri}: unsafe archive entry refused: {error}", uri=uri) from error
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"{uri}: {error}", uri=uri) from error
    except _codec.InflateError as error:
        raise CorruptCheckpointError(f"{uri}: the archive is corrupt: {error}", uri=uri) from error
    finally:
        reader.close()


def check_directory(
    pull: NextBlocks,
    *,
    uri: str,
    workers: int = 1,
    seen: Callable[[_tar.Header], None] | None = None,
    covered: bool = False,
) -> None:
    """Read a .tar.gz stream to its end as :func:`unpack_directory` would, writing nothing;
    ``seen`` hears of every entry's header."""

    def pick(header: _tar.Header) -> bool:
        assert seen is not None
        seen(header)
        return True

    unpack_directory(pull, None, uri=uri, workers=workers, pick=pick if seen is not None else None, covered=covered)
