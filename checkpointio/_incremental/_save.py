"""Saving a tree as an incremental checkpoint: unchanged files taken from the parents' manifests
without reading them, changed ones cut into chunks, new chunks packed and uploaded, the manifest
written last."""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import operator
import os
import re
import stat
import struct
import time
import uuid
from array import array
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread
import blake3

from .. import _archive, _cdc, _codec, _engine
from .._concurrency import one_error
from .._config import TransferConfig, codec_workers
from .._exceptions import CheckpointError, CorruptCheckpointError, SourceChangedError
from .._location import Location
from .._progress import Meter, ProgressCallback, human_size
from .._stores import Kind, ObjectInfo, Store
from . import _chunks
from ._layout import AREA, area_of, pack_location
from ._leases import LEASE_TTL, Lease
from ._manifest import DIR, FILE, HARDLINK, HASH_BYTES, LAYOUT, SYMLINK, Hash, Manifest, encode, read_manifest

logger = logging.getLogger(__name__)

#: A pack's first line: what it is and the save that wrote it, so that two saves never write the
#: same pack name (gc may be deleting an unreferenced pack of that name; see :func:`._gc.collect_area`).
_PACK_MAGIC = b"checkpointio-pack/2 "
#: What names a pack, per block after its first line: the hash of the chunk that placed it, its
#: length in the pack and its codec. The first line names the save and the pack's number in it,
#: so every pack name is new (the name is not a hash of the pack's bytes: hashing every byte
#: again cost the packing thread ~0.5 s for 770 MiB of tensors; each chunk's bytes are checked
#: by its own hash).
_PACKED = struct.Struct(f"<{HASH_BYTES}sIB")
#: A pack is uploaded once it holds this many bytes: tens of MiB, few requests, parallel parts.
PACK_SIZE = 32 * 1024 * 1024
#: Chunks are encoded (hashed, compressed) on the pool in batches of about this many bytes or chunks.
_BATCH_BYTES = 2 * 1024 * 1024
_BATCH_CHUNKS = 512
_ENTRY_MASK = (1 << 40) - 1
#: What of an entry's ``lstat`` tells a file unchanged since a parent (with :attr:`_Parents.keys`).
_STAT_KEY = operator.attrgetter("st_mtime_ns", "st_size", "st_ino", "st_nlink", "st_mode")


def _new_save_id() -> str:
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"


class _Lookups:
    """How a file of a tree is told unchanged since one manifest, a run of siblings at a time
    (C-level maps, no Python per file): ``numbers`` (every entry's number by path) and the columns
    a file's ``lstat`` shows while it is unchanged since then (``_STAT_KEY``), as arrays: 8 bytes
    a column a file, not a tuple a file (~200 bytes: 200 MB more for a 1,000,000-file tree).

    Building them is work per entry of the manifest (~10 ms for 50,000 entries): done in a worker
    thread, never on the event loop.
    """

    def __init__(self, manifest: Manifest) -> None:
        #: path -> entry number (every entry: only a file's key can match)
        self.numbers: dict[str, int] = dict(zip(manifest.paths, range(manifest.entry_count), strict=True))
        #: the row of a path not found: past the manifest's entries, matching no ``lstat``
        self.missing = manifest.entry_count
        #: by entry number, what an ``lstat`` of the manifest's file shows while it is unchanged:
        #: its mtime, size and inode, and its mode as a regular file's (one link is asked of it
        #: too); -1 as the mode of every other entry and of the row ``missing``
        self.mtimes = array("q", manifest.mtimes)
        self.mtimes.append(-1)
        self.sizes = array("Q", manifest.file_sizes)
        self.sizes.append(0)
        self.inodes = array("Q", manifest.inodes)
        self.inodes.append(0)
        self.modes = array("q", map(stat.S_IFREG.__or__, manifest.modes))
        for other in re.finditer(rb"[^" + FILE.encode() + rb"]", manifest.kinds):
            self.modes[other.start()] = -1
        self.modes.append(-1)


class _Parents:
    """What the parents of a save stored (their manifests, as read), and how a file of the tree
    is looked up in them: by path, in the first manifest holding a file of that path.

    The first parent is the one nearly every file of a tree saved again is unchanged since; its
    :class:`_Lookups` (``first``, built here unless given) serve a run of siblings at a time.
    Later parents are looked up one file at a time. Built in a worker thread: it is work per entry.
    """

    def __init__(self, manifests: list[Manifest], first: _Lookups | None = None) -> None:
        self.manifests = manifests
        if first is None:
            first = _Lookups(manifests[0] if manifests else Manifest())
        self.numbers = first.numbers
        self.missing = first.missing
        self.mtimes, self.sizes, self.inodes, self.modes = first.mtimes, first.sizes, first.inodes, first.modes
        #: per parent after the first: path -> entry number of its files
        file = ord(FILE)
        self.later = [
            {
                path: entry
                for entry, (path, kind) in enumerate(zip(manifest.paths, manifest.kinds, strict=True))
                if kind == file
            }
            for manifest in manifests[1:]
        ]

    def find(self, rel: str) -> int | None:
        """The file ``rel`` in the first parent holding a file of that path, as the parent's number
        << 40 | the entry's number in it; ``None`` when no parent holds one."""
        number = self.numbers.get(rel)
        if number is not None and self.modes[number] != -1:
            return number
        for parent, files in enumerate(self.later, 1):
            number = files.get(rel)
            if number is not None:
                return parent << 40 | number
        return None


class _Packer:
    """Worker-thread side of a save: walks the tree, cuts and hashes what changed, packs new chunks,
    and builds the new manifest's columns as it goes.

    An unchanged file (same size, mtime and inode as in a parent) takes the parent's chunk rows:
    the new manifest starts with the first parent's chunk table (the same row numbers), a later
    parent's rows are copied in once each on first use (``remap``), and the rows no file uses are
    dropped at the end, so the new manifest holds exactly the chunks its files use. A changed
    file's chunks are encoded on the pool, in order; each reserves its slot in ``used`` when cut
    and gets its row when its encoding comes back.
    Finished packs go to ``upload`` (it blocks while enough are in flight).
    """

    def __init__(
        self,
        root: Path,
        uri: str,
        shown: str,
        parents: _Parents,
        level: int,
        workers: int,
        pack_size: int,
        save_id: str,
        upload: Callable[[str, bytes], None],
        skip: _archive.Skip | None,
        meter: Meter,
        hard_links: Collection[tuple[int, int]] | None = None,
    ) -> None:
        self.root = root
        self.uri = uri
        self.shown = shown
        self.parents = parents
        self.level = level
        self.workers = workers
        self.pack_size = pack_size
        self.save_id = save_id
        self.upload = upload
        self.skip = skip
        self.meter = meter
        #: The tree's own hard links where link counts cannot tell them (see :func:`save`).
        self.hard_links = hard_links
        #: The link count of a file with no other name in the tree saved: 1, or 2 in a background
        #: save's snapshot (its name there and the caller's, see :mod:`.._snapshot`).
        self.lone_links = 1 if hard_links is None else 2
        self.out = Manifest()
        self.out.save_id = save_id
        if parents.manifests:
            _copy_chunk_table(parents.manifests[0], self.out)
        #: Per parent after the first: its chunk rows' rows in ``out`` (-1: not copied yet), its
        #: packs' indices in ``out``. The first parent's rows are ``out``'s first rows, as they are.
        self.remap = [array("q", [-1]) * manifest.chunk_count for manifest in parents.manifests[1:]]
        self.pack_map = [array("q", [-1]) * len(manifest.pack_names) for manifest in parents.manifests[1:]]
        #: Parent chunks by hash (the first parent's first), as the parent's number << 40 | the
        #: chunk's row in it; built when a file must be read.
        self.parent_rows: dict[Hash, int] | None = None
        #: Rows of ``out`` holding the chunks this save packed, by hash.
        self.new_rows: dict[Hash, int] = {}
        #: The pack being filled, as its pieces (joined once, when it is full: no growing buffer),
        #: and its index in ``out.pack_names`` (its name is known once it is full).
        self.pack: list[bytes] = []
        self.pack_length = 0
        self.pack_index = -1
        self.sequence = 0
        self.pool: _codec.OrderedPool | None = None
        #: Names the pack being filled: its first line and its blocks' first hashes, lengths and codecs.
        self.pack_summary: list[bytes] = []
        self.batch: list[tuple[int, bytes]] = []  # (slot in out.used, piece)
        self.batch_bytes = 0
        self.in_flight: collections.deque[
            tuple[list[tuple[int, int]], Future[tuple[list[_chunks.Placed], list[_chunks.Block]]]]
        ] = collections.deque()
        self.read_bytes = 0
        self.new_bytes = 0
        #: The first path saved of each file with several links: (device, inode) -> path.
        self.links: dict[tuple[int, int], str] = {}
        if len(parents.manifests) > 1:
            self._index_parents()

    def _index_parents(self) -> None:
        rows: dict[Hash, int] = {}
        # a row of each hash, the first parent's where several hold it
        for number, manifest in reversed(list(enumerate(self.parents.manifests))):
            hashes = bytes(manifest.hashes)
            base = number << 40
            rows.update(
                zip(
                    [hashes[at : at + HASH_BYTES] for at in range(0, len(hashes), HASH_BYTES)],
                    range(base, base + manifest.chunk_count),
                    strict=True,
                )
            )
        self.parent_rows = rows

    def _take(self, parent: int, index: int) -> int:
        """The row in ``out`` of the parent's chunk row ``index``: the same row for the first parent
        (its table is ``out``'s to start with), else copied on first use (a chunk stored by two
        parents gets one row)."""
        if parent == 0:
            return index
        remap = self.remap[parent - 1]
        row = remap[index]
        if row >= 0:
            return row
        manifest = self.parents.manifests[parent]
        assert self.parent_rows is not None
        digest = bytes(manifest.hashes[index * HASH_BYTES : (index + 1) * HASH_BYTES])
        canonical = self.parent_rows[digest]
        if canonical != parent << 40 | index:
            row = remap[index] = self._take(canonical >> 40, canonical & _ENTRY_MASK)
            return row
        out = self.out
        pack = manifest.chunk_pack[index]
        pack_map = self.pack_map[parent - 1]
        pack_row = pack_map[pack]
        if pack_row < 0:
            name = manifest.pack_names[pack]
            pack_row = pack_map[pack] = len(out.pack_names)
            out.pack_names.append(name)
            out.packs[name] = manifest.packs[name]
        row = remap[index] = len(out.offsets)
        out.hashes += manifest.hashes[index * HASH_BYTES : (index + 1) * HASH_BYTES]
        out.chunk_pack.append(pack_row)
        out.offsets.append(manifest.offsets[index])
        out.stored.append(manifest.stored[index])
        out.sizes.append(manifest.sizes[index])
        out.codecs.append(manifest.codecs[index])
        out.within.append(manifest.within[index])
        return row

    def _queue(self, piece: bytes) -> None:
        """Encode ``piece`` (on the pool) into the next slot of ``out.used``; small chunks go in
        batches, one hand-off per batch rather than per file."""
        if self.parent_rows is None:
            self._index_parents()
        self.out.used.append(0)
        self.batch.append((len(self.out.used) - 1, piece))
        self.batch_bytes += len(piece)
        if self.batch_bytes >= _BATCH_BYTES or len(self.batch) >= _BATCH_CHUNKS:
            self._submit()

    # chunk encoding runs on the pool's threads: BLAKE3 and deflate let go of the GIL
    def _encode_all(self, pieces: list[bytes]) -> tuple[list[_chunks.Placed], list[_chunks.Block]]:
        assert self.parent_rows is not None
        return _chunks.encode_all(pieces, self.level, self.parent_rows, self.new_rows)

    def _submit(self) -> None:
        if not self.batch:
            return
        assert self.pool is not None
        slots = [(slot, len(piece)) for slot, piece in self.batch]
        self.in_flight.append((slots, self.pool.submit(self._encode_all, [piece for _, piece in self.batch])))
        self.batch, self.batch_bytes = [], 0
        while len(self.in_flight) > 2 * self.workers:
            self._drain_one()

    def _drain_one(self) -> None:
        slots, future = self.in_flight.popleft()
        placed, blocks = future.result()
        #: where each of the batch's blocks went: (pack index, offset), once a chunk of it is new
        where: list[tuple[int, int] | None] = [None] * len(blocks)
        used = self.out.used
        for (slot, size), (digest, block, within) in zip(slots, placed, strict=True):
            used[slot] = self._add(digest, block, within, size, blocks, where)

    def _add(
        self,
        digest: Hash,
        block: int,
        within: int,
        size: int,
        blocks: list[_chunks.Block],
        where: list[tuple[int, int] | None],
    ) -> int:
        """The row of the chunk ``digest`` in ``out``: a parent's, one packed before, or a new one
        (``size`` bytes at ``within`` in the batch's block ``block``, put in the pack being
        filled on first use, its place noted in ``where``: the block's later chunks name that
        pack by its index, full or not)."""
        assert self.parent_rows is not None
        known = self.parent_rows.get(digest)
        if known is not None:
            return self._take(known >> 40, known & _ENTRY_MASK)
        row = self.new_rows.get(digest)
        if row is not None:
            return row
        if block < 0:  # known when encoded, so known now (the tables only grow)
            raise AssertionError("a chunk known when encoded is missing")
        out = self.out
        data, codec = blocks[block]
        place = where[block]
        if place is None:
            if not self.pack:
                head = _PACK_MAGIC + f"{self.save_id} {self.sequence}\n".encode()
                self.pack.append(head)
                self.pack_length = len(head)
                self.pack_summary = [head]
                self.pack_index = len(out.pack_names)
                out.pack_names.append("")  # named when full
            place = where[block] = (self.pack_index, self.pack_length)
            self.pack.append(data)
            self.pack_summary.append(_PACKED.pack(digest, len(data), codec))
            self.pack_length += len(data)
            self.new_bytes += len(data)
            if self.pack_length >= self.pack_size:
                self._flush_pack()
        row = self.new_rows[digest] = len(out.offsets)
        out.hashes += digest
        out.chunk_pack.append(place[0])
        out.offsets.append(place[1])
        out.stored.append(len(data))
        out.sizes.append(size)
        out.codecs.append(codec)
        out.within.append(within)
        return row

    def _flush_pack(self) -> None:
        if not self.pack:
            return
        data = b"".join(self.pack)
        self.pack = []
        name = blake3.blake3(b"".join(self.pack_summary)).digest(HASH_BYTES).hex()
        self.out.pack_names[self.pack_index] = name
        self.out.packs[name] = len(data)
        self.sequence += 1
        self.upload(name, data)

    def run(self) -> Manifest:
        top = self.shown.rstrip(os.sep) + os.sep
        with (
            _codec.OrderedPool(self.workers) as pool,
            contextlib.closing(
                _archive.walk_runs(str(self.root), shown=self.shown, uri=self.uri, skip=self.skip)
            ) as walk,
        ):
            self.pool = pool
            for fd, prefix, names, stats in walk:
                self._run(fd, prefix, names, stats, top)
            self._submit()
            while self.in_flight:
                self._drain_one()
        self._flush_pack()
        _compact(self.out)
        return self.out

    def _run(self, fd: int, prefix: str, names: list[str], stats: list[os.stat_result], top: str) -> None:
        """One run of siblings (see :func:`_archive.walk_runs`). The files unchanged since the first
        parent, the bulk of a tree saved again, are told by comparing the run's ``lstat`` keys with
        the parent's in C-level maps, and added in slices; the others one at a time."""
        parents = self.parents
        rels = list(map(prefix.__add__, names))
        found = list(map(parents.numbers.get, rels, repeat(parents.missing)))
        then = zip(
            map(parents.mtimes.__getitem__, found),
            map(parents.sizes.__getitem__, found),
            map(parents.inodes.__getitem__, found),
            repeat(self.lone_links),
            map(parents.modes.__getitem__, found),
        )
        same = list(map(operator.eq, then, map(_STAT_KEY, stats)))
        if self.hard_links:  # a name of a hard link may have the lone count: it goes one at a time
            links = self.hard_links
            same = [alike and (st.st_dev, st.st_ino) not in links for alike, st in zip(same, stats, strict=True)]
        count = len(rels)
        start = 0
        while start < count:
            try:
                stop = same.index(False, start)
            except ValueError:
                stop = count
            if stop > start:
                self._add_unchanged(found[start:stop], rels[start:stop])
            if stop < count:
                self._entry(fd, rels[stop], names[stop], stats[stop], top)
            start = stop + 1

    def _add_unchanged(self, numbers: list[int], rels: list[str]) -> None:
        """Add the files ``rels``, unchanged since the first parent (its entries ``numbers``, in
        increasing order): their columns copied as slices of the parent's, their chunk rows the
        parent's own (see :func:`_copy_chunk_table`), no file read."""
        parent, out = self.parents.manifests[0], self.out
        out.paths += rels
        out.kinds += FILE.encode() * len(rels)
        first, used = parent.first, parent.used
        # consecutive runs of entry numbers (a file deleted since the parent breaks one)
        breaks = list(map(operator.ne, map(operator.sub, numbers[1:], numbers), repeat(1)))
        at = 0
        while at < len(numbers):
            try:
                end = breaks.index(True, at) + 1
            except ValueError:
                end = len(numbers)
            low, high = numbers[at], numbers[end - 1] + 1
            out.modes += parent.modes[low:high]
            out.mtimes += parent.mtimes[low:high]
            out.file_sizes += parent.file_sizes[low:high]
            out.inodes += parent.inodes[low:high]
            start = first[low]
            shift = len(out.used) - start
            out.used += used[start : first[high]]
            out.first.extend(map(shift.__add__, first[low + 1 : high + 1]))
            self.meter.read(sum(parent.file_sizes[low:high]))
            at = end

    def _entry(self, fd: int, rel: str, name: str, st: os.stat_result, top: str) -> None:
        """One entry that is not a file unchanged since the first parent (with the same mode)."""
        out = self.out
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if st.st_nlink > 1 if self.hard_links is None else (st.st_dev, st.st_ino) in self.hard_links:
                inode = (st.st_dev, st.st_ino)
                if inode in self.links:
                    out.add_entry(rel, HARDLINK, stat.S_IMODE(mode), st.st_mtime_ns, link=self.links[inode])
                    return
                self.links[inode] = rel
            found = self.parents.find(rel)
            if found is not None and self._same_as_parent(found, rel, st):
                return
            self._file(_archive.Entry(rel, name, fd, st), top + rel, stat.S_IMODE(mode))
        elif stat.S_ISDIR(mode):
            out.add_entry(rel, DIR, stat.S_IMODE(mode), st.st_mtime_ns)
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(name, dir_fd=fd)
            except FileNotFoundError as error:
                raise SourceChangedError(
                    f"{top + rel} disappeared while {self.uri} was being saved", uri=self.uri
                ) from error
            _archive._check_link(str(self.root), rel, target, self.uri)
            out.add_entry(rel, SYMLINK, stat.S_IMODE(mode), st.st_mtime_ns, link=target)
        else:
            logger.warning("skipping %s %s (it holds no data to save)", _archive.file_type(mode), top + rel)

    def _same_as_parent(self, found: int, rel: str, st: os.stat_result) -> bool:
        """Add the file ``rel`` with its parent's chunks if it is unchanged since that parent (same
        mtime, size and inode), one file at a time (a hard link, a file whose mode changed, or a
        file of a later parent)."""
        parent, number = found >> 40, found & _ENTRY_MASK
        manifest = self.parents.manifests[parent]
        if (
            manifest.mtimes[number] != st.st_mtime_ns
            or manifest.file_sizes[number] != st.st_size
            or manifest.inodes[number] != st.st_ino
        ):
            return False
        out = self.out
        out.add_entry(rel, FILE, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size, st.st_ino)
        take = self._take
        out.used.extend(take(parent, index) for index in manifest.chunks_of(number))
        out.first[-1] = len(out.used)
        self.meter.read(st.st_size)
        return True

    def _file(self, item: _archive.Entry, full: str, mode: int) -> None:
        """A new or changed file: read, cut, and its chunks queued for encoding."""
        st = item.st
        self.out.add_entry(item.rel, FILE, mode, st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            if st.st_size == 0:
                return
            try:  # not through a symlink swapped in since the listing
                fd = os.open(item.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=item.folder)
            except FileNotFoundError as error:
                raise SourceChangedError(
                    f"{full} disappeared while {self.uri} was being saved", uri=self.uri
                ) from error
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise _archive.unreadable(error, full, self.uri) from error
                raise SourceChangedError(
                    f"{full} was replaced by a symlink while {self.uri} was being saved", uri=self.uri
                ) from error
            try:
                opened = os.fstat(fd)
                if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                    raise SourceChangedError(
                        f"{full} was replaced while {self.uri} was being saved (the file read is not the one listed)",
                        uri=self.uri,
                    )
                if st.st_size <= _cdc.MINIMUM:  # one chunk whatever its content: read at once, not cut
                    data = os.read(fd, st.st_size)
                    if len(data) < st.st_size:  # a short read, or it shrank: file_data tells which
                        data += b"".join(_archive.file_data(fd, st.st_size - len(data), full, self.uri))
                    self._read(st.st_size)
                    self._queue(data)
                else:
                    for piece in _chunks.pieces(fd, st.st_size, full, self.uri, self._read):
                        self._queue(piece)
            finally:
                os.close(fd)
        finally:
            self.out.first[-1] = len(self.out.used)

    def _read(self, length: int) -> None:
        self.meter.read(length)
        self.read_bytes += length


def _copy_chunk_table(parent: Manifest, out: Manifest) -> None:
    """Start ``out``'s chunk table and packs as a copy of ``parent``'s (columns copied whole, no
    row at a time): a file unchanged since the parent keeps its chunk numbers. :func:`_compact`
    drops the rows no file of ``out`` uses in the end."""
    out.pack_names = list(parent.pack_names)
    out.packs = dict(parent.packs)
    out.hashes = bytearray(parent.hashes)
    out.chunk_pack = array("I", parent.chunk_pack)
    out.offsets = array("Q", parent.offsets)
    out.stored = array("I", parent.stored)
    out.sizes = array("I", parent.sizes)
    out.codecs = bytearray(parent.codecs)
    out.within = array("I", parent.within)


def _compact(out: Manifest) -> None:
    """Drop the chunk rows no entry of ``out`` uses, and the packs no row is in: a manifest names
    exactly the chunks and packs its files need (what ``gc`` and ``ls`` count on).

    The rows dropped are few (those of the files changed or deleted since the parent): the rows
    kept are copied as the slices between them, not one at a time.
    """
    count = out.chunk_count
    used = bytearray(count)  # a byte a row: 1 MB for 1,000,000 chunks
    collections.deque(map(used.__setitem__, out.used, repeat(1)), maxlen=0)  # marked with no Python step a row
    if used.find(0) >= 0:
        kept: list[tuple[int, int]] = []  # [start, end) of the rows kept, in order
        start = 0
        while start < count:
            end = used.find(0, start)
            if end < 0:
                end = count
            if end > start:
                kept.append((start, end))
            start = used.find(1, end)  # past the run of dropped rows
            if start < 0:
                break
        renumbered = array("I", bytes(4 * count))  # a dropped row's number is never looked up
        row = 0
        for start, end in kept:
            renumbered[start:end] = array("I", range(row, row + end - start))
            row += end - start
        out.used = array("I", map(renumbered.__getitem__, out.used))
        del renumbered

        def cut(column: bytearray | array[int], size: int) -> bytearray:
            """The kept rows of ``column`` (``size`` bytes a row), joined from views: no copy of a slice."""
            with memoryview(column) as whole, whole.cast("B") as view:
                return bytearray().join([view[start * size : end * size] for start, end in kept])

        for name in ("chunk_pack", "offsets", "stored", "sizes", "within"):
            column = getattr(out, name)
            setattr(out, name, array(column.typecode, cut(column, column.itemsize)))
        out.hashes = cut(out.hashes, HASH_BYTES)
        out.codecs = cut(out.codecs, 1)
    packs = sorted(set(out.chunk_pack))
    if len(packs) < len(out.pack_names):
        places = {pack: row for row, pack in enumerate(packs)}
        out.chunk_pack = array("I", map(places.__getitem__, out.chunk_pack))
        out.pack_names = [out.pack_names[pack] for pack in packs]
        out.packs = {name: out.packs[name] for name in out.pack_names}


@dataclass(eq=False)
class Written:
    """The manifest a save wrote, as the object the store answered with, and its lookups: kept by
    a :class:`~checkpointio.Checkpoint` to be the next save's parent without reading the manifest
    back and decoding it again (about 270 bytes a file, see docs/incremental.md).

    It stands for what the store holds only while a HEAD of the key answers with the very object
    written (same ETag, size and record, CRC32 included): another process may have saved there
    since, or removed it.
    """

    location: Location
    info: ObjectInfo
    manifest: Manifest
    lookups: _Lookups

    def holds(self, location: Location, info: ObjectInfo | None) -> bool:
        """Whether ``info`` (a HEAD of ``location`` just now) shows the object this save wrote."""
        written = self.info
        return (
            info is not None
            and location == self.location
            and info.etag == written.etag
            and info.size == written.size
            and info.record is not None
            and info.record == written.record
        )


async def _load_parents(
    store: Store,
    location: Location,
    parents: Iterable[Location],
    area: Location,
    config: TransferConfig,
    last: Written | None,
) -> tuple[list[Manifest], _Lookups | None]:
    """What ``location`` held and the first incremental checkpoint among ``parents`` (newest first)
    stored, where their packs are ``area``'s: only those can be referenced from here. What
    ``location`` holds is ``last`` when the store still holds exactly what it wrote (then its
    lookups come too), else it is read."""
    found: list[Manifest] = []
    lookups: _Lookups | None = None
    for candidate in [location, *(parent for parent in parents if parent != location)]:
        if area_of(candidate) != area:
            continue
        if candidate == location and last is not None and not found:
            info = await _engine.head_for_reads(store, location)
            if last.holds(location, info):
                found.append(last.manifest)
                lookups = last.lookups
                continue
            if info is None:
                continue
        else:
            info = None
        try:
            manifest = await read_manifest(store, candidate, config, check_tree=False, info=info)
        except CorruptCheckpointError as error:
            logger.warning("not deduplicating against %s: %s", candidate.uri, error)
            continue
        if manifest is not None:
            found.append(manifest)
            if candidate != location:
                break
    return found, lookups


async def save(
    store: Store,
    location: Location,
    root: Path,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
    *,
    parents: Iterable[Location] = (),
    check: Callable[[], None] | None = None,
    shown: str | None = None,
    skip: _archive.Skip | None = None,
    pack_size: int = PACK_SIZE,
    last: Written | None = None,
    hard_links: Collection[tuple[int, int]] | None = None,
    force: bool = False,
) -> Written:
    """Save the directory ``root`` at ``location`` as an incremental checkpoint.

    Chunks stored by ``location``'s previous checkpoint and by ``parents`` (incremental
    checkpoints in the same folder) are referenced, not uploaded again. Packs are uploaded as they
    fill, then the manifest (atomically, last): a save that fails or is killed leaves the previous
    checkpoint whole, and at most some packs no manifest names (``gc`` removes them).

    ``last``: what an earlier save in this process returned, used as ``location``'s previous
    checkpoint while the store still holds exactly that object (see :class:`Written`).
    ``hard_links``: where ``root`` is a snapshot whose files are hard links of the caller's (so a
    link count also counts names outside ``root``, which may change meanwhile), the inodes with
    more than one name in ``root``: the hard links stored; ``None``: the link counts tell them.
    ``force``: the manifest replaces a local file checkpointio did not write (see ``Store.put``).
    """
    started = time.monotonic()
    uri = location.uri
    shown = shown if shown is not None else str(root)
    area = area_of(location)
    own = await anyio.to_thread.run_sync(_engine.store_files_in, location, root)
    skip = _archive.skip_any(skip, own, _skip_area(location, root))
    save_id = _new_save_id()
    lease = Lease(store, area, save_id, config)
    meter = Meter(on_progress, "save", uri, None, packed=True)
    await lease.renew()  # before any parent is read: gc then spares what they reference
    try:
        with one_error():
            async with anyio.create_task_group() as keeper:
                keeper.start_soon(lease.keep)
                written, packer = await _save_tree(
                    store,
                    location,
                    root,
                    config,
                    meter,
                    parents,
                    check,
                    shown,
                    skip,
                    pack_size,
                    save_id,
                    lease,
                    last,
                    hard_links,
                    force=force,
                )
                keeper.cancel_scope.cancel()
    finally:
        await lease.drop()
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.finish)
    seconds = time.monotonic() - started
    logger.info(
        "saved directory %s to %s incrementally (%s read, %s uploaded in new packs, %d entries, in %.1f s)",
        shown,
        uri,
        human_size(packer.read_bytes),
        human_size(packer.new_bytes),
        written.manifest.entry_count,
        seconds,
    )
    return written


def _skip_area(location: Location, root: Path) -> _archive.Skip | None:
    if location.scheme != "file":
        return None
    folder = os.path.dirname(location.key)
    return _archive.skip_within(str(root), folder, lambda name: name == AREA)


async def _save_tree(
    store: Store,
    location: Location,
    root: Path,
    config: TransferConfig,
    meter: Meter,
    parents: Iterable[Location],
    check: Callable[[], None] | None,
    shown: str,
    skip: _archive.Skip | None,
    pack_size: int,
    save_id: str,
    lease: Lease,
    last: Written | None,
    hard_links: Collection[tuple[int, int]] | None,
    *,
    force: bool,
) -> tuple[Written, _Packer]:
    area = area_of(location)
    manifests, lookups = await _load_parents(store, location, parents, area, config, last)
    # unbuffered: a full pack waits in the producer until an upload slot is free (at most three
    # packs in memory: two uploading, one waiting)
    send, receive = anyio.create_memory_object_stream[tuple[str, bytes]](0)
    uploaded: dict[str, int] = {}

    def upload(name: str, data: bytes) -> None:
        anyio.from_thread.run(send.send, (name, data))

    def prepare() -> _Packer:  # lookups and copies of the parents' columns: work per entry, off the loop
        return _Packer(
            root,
            location.uri,
            shown,
            _Parents(manifests, lookups),
            config.compression_level,
            codec_workers(config),
            pack_size,
            save_id,
            upload,
            skip,
            meter,
            hard_links,
        )

    packer = await anyio.to_thread.run_sync(prepare)

    def produce() -> tuple[Manifest, bytes]:
        manifest = packer.run()
        if check is not None:
            check()
        manifest.created = time.time()
        # encoded here, while the last packs upload (it is stored only once they all are)
        return manifest, encode(manifest)

    built: list[tuple[Manifest, bytes]] = []

    async def run_producer() -> None:
        try:
            built.append(await anyio.to_thread.run_sync(produce, limiter=anyio.CapacityLimiter(1)))
        finally:
            send.close()

    async def put_pack(name: str, data: bytes, slots: anyio.Semaphore) -> None:
        try:
            await _engine.save_object(store, pack_location(area, name), data, Kind.BYTES, config)
            uploaded[name] = len(data)
            meter.advance(len(data))
        finally:
            slots.release()

    async def uploader() -> None:
        slots = anyio.Semaphore(2)
        async with anyio.create_task_group() as group:
            with receive:
                while True:
                    await slots.acquire()  # before taking a pack: the producer waits meanwhile
                    try:
                        name, data = await receive.receive()
                    except anyio.EndOfStream:
                        slots.release()
                        break
                    group.start_soon(put_pack, name, data, slots)

    with one_error():
        async with anyio.create_task_group() as group:
            group.start_soon(run_producer)
            group.start_soon(uploader)

    manifest, data = built[0]
    if time.monotonic() - lease.renewed > LEASE_TTL / 2:  # this process was stalled: gc may have run
        await _check_packs_exist(store, area, manifest, location.uri)
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.commit)
    looked_up: list[_Lookups] = []

    async def look_up() -> None:  # the next save's lookups of this manifest, while it is written
        looked_up.append(await anyio.to_thread.run_sync(_Lookups, manifest))

    with one_error():
        async with anyio.create_task_group() as group:
            group.start_soon(look_up)
            info = await _engine.save_object(store, location, data, Kind.DIRECTORY, config, layout=LAYOUT, force=force)
    meter.advance(len(data))
    return Written(location, info, manifest, looked_up[0]), packer


async def _check_packs_exist(store: Store, area: Location, manifest: Manifest, uri: str) -> None:
    missing = []
    for name in manifest.packs:
        if await store.head(pack_location(area, name)) is None:
            missing.append(name)
    if missing:
        raise CheckpointError(
            f"{uri}: not saved: packs it would reference were removed meanwhile ({', '.join(missing[:5])}); save again",
            uri=uri,
        )
