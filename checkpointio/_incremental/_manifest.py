"""The manifest of an incremental checkpoint: what it records (:class:`Manifest`), its bytes
(:func:`encode`, :func:`decode`) and the checks a manifest passes before anything trusts it.

A manifest is a header line (``checkpointio-incremental/3``), then a zlib stream of little-endian
binary columns (documented in docs/incremental.md, "The manifest format"): a header (counts, save
id, time), the packs (name, size), the chunks in blocks of up to ``BLOCK`` (hash, pack, the offset
and stored length of the pack block holding it, its length, its offset in the block's inflated
bytes, the block's codec), then the entries in blocks of up to ``BLOCK`` (type, mode, mtime,
size, inode, chunk count, path and link lengths, then the paths, link targets and chunk indices).
A reader inflates it a block at a time and checks every block's counts and lengths before it
reads what they announce. It is stored like any checkpoint (atomically, with its CRC32), after
every pack it names is stored.

A decoded manifest is columns too (arrays, one list of paths), not an object per entry: a
1,000,000-file manifest holds about 165 MB decoded (``benchmarks/incremental.py`` measures it).
"""

from __future__ import annotations

import operator
import re
import struct
import sys
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, repeat
from typing import Any

import anyio.to_thread

from .. import _cdc, _codec, _engine, _tar
from .._config import TransferConfig
from .._exceptions import CorruptCheckpointError, UnsafeArchiveError
from .._location import Location
from .._stores import INCREMENTAL, MANIFEST_MAGIC, Kind, ObjectInfo, Store

#: The manifest's first bytes: what it is, then the version of its layout and a newline.
MAGIC = MANIFEST_MAGIC[INCREMENTAL]
VERSION = 3
_HEADER_LINE = MAGIC + str(VERSION).encode() + b"\n"
#: ``Record.layout`` of a manifest: a load tells the format from the record, with no read.
LAYOUT = INCREMENTAL

#: Hash length in bytes (BLAKE3, truncated: 128 bits).
HASH_BYTES = 16
#: How a pack block is held: its chunks' bytes as they are, or deflated as one raw stream.
STORED, DEFLATED = 0, 1
#: Most bytes a pack block inflates to: what a restore inflates to read one chunk (small chunks
#: share a block, deflated together; a large chunk has a block of its own).
MAX_BLOCK_BYTES = 1024 * 1024

#: Limits a manifest must respect; beyond them it is refused as crafted or garbled, before its
#: contents are held in memory.
MAX_MANIFEST = 2 * 1024 * 1024 * 1024
MAX_ENTRIES = 50_000_000
MAX_CHUNKS = 200_000_000
MAX_PACKS = 10_000_000
_MAX_CHUNK = _cdc.MAXIMUM
_MAX_STORED = MAX_BLOCK_BYTES + 5 * (MAX_BLOCK_BYTES // 65535 + 2) + 1024
_MAX_SAVE_ID = 256

#: Entry types: folder, regular file, symlink, hard link (to a file listed before it).
DIR, FILE, SYMLINK, HARDLINK = "d", "f", "l", "h"
_KINDS = b"dflh"
#: An entry type other than a file's, in a column of types.
_NOT_FILE = re.compile(rb"[^f]")

Hash = bytes

#: Chunks or entries per block: a reader holds one block's columns at a time while decoding.
BLOCK = 65536

_HEAD = struct.Struct("<IQQdH")  # packs, chunks, entries, created, save id length
#: Step of inflation: a reader holds at most this much inflated data beyond the block it reads.
_STEP = 4 * 1024 * 1024
_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk as a manifest records it: its hash and where its bytes are: ``size`` bytes at
    ``within`` in the pack block of ``stored`` bytes at ``offset`` in ``pack``, held as ``codec``
    says (several small chunks share a block, deflated as one stream)."""

    hash: Hash
    pack: str
    offset: int
    stored: int
    size: int
    codec: int
    within: int = 0


@dataclass(slots=True)
class Entry:
    """One entry of a saved tree (a view of one row of a :class:`Manifest`, or a row to build one)."""

    path: str
    kind: str
    mode: int
    mtime_ns: int
    size: int = 0
    inode: int = 0
    chunks: list[int] = field(default_factory=list)
    link: str = ""


def _u(code: str) -> array[int]:
    return array(code)


class Manifest:
    """A decoded manifest, as columns: its packs (name -> size), its chunks, and its entries in
    tree order (each file's chunk indices are ``used[first[i]:first[i + 1]]``).

    :attr:`chunks` and :attr:`entries` give :class:`Chunk` and :class:`Entry` views, one object
    per access; code running once per file or chunk of a large tree reads the columns.
    """

    def __init__(self) -> None:
        self.packs: dict[str, int] = {}
        self.pack_names: list[str] = []
        self.hashes = bytearray()
        self.chunk_pack = _u("I")
        self.offsets = _u("Q")
        self.stored = _u("I")
        self.sizes = _u("I")
        self.codecs = bytearray()
        self.within = _u("I")
        self.kinds = bytearray()
        self.modes = _u("H")
        self.mtimes = _u("q")
        self.file_sizes = _u("Q")
        self.inodes = _u("Q")
        self.first = _u("Q")
        self.first.append(0)
        self.used = _u("I")
        self.paths: list[str] = []
        self.links: dict[int, str] = {}
        self.save_id = ""
        self.created = 0.0

    @classmethod
    def of(
        cls,
        packs: dict[str, int],
        chunks: Sequence[Chunk],
        entries: Sequence[Entry],
        save_id: str = "",
        created: float = 0.0,
    ) -> Manifest:
        """A manifest of the given rows (chunks naming packs of ``packs``)."""
        manifest = cls()
        manifest.packs = dict(packs)
        manifest.pack_names = list(packs)
        index = {name: number for number, name in enumerate(manifest.pack_names)}
        for chunk in chunks:
            manifest.hashes += chunk.hash
            manifest.chunk_pack.append(index[chunk.pack])
            manifest.offsets.append(chunk.offset)
            manifest.stored.append(chunk.stored)
            manifest.sizes.append(chunk.size)
            manifest.codecs.append(chunk.codec)
            manifest.within.append(chunk.within)
        for entry in entries:
            manifest.add_entry(entry.path, entry.kind, entry.mode, entry.mtime_ns, entry.size, entry.inode, entry.link)
            manifest.used.extend(entry.chunks)
            manifest.first[-1] = len(manifest.used)
        manifest.save_id, manifest.created = save_id, created
        return manifest

    def add_entry(
        self, path: str, kind: str, mode: int, mtime_ns: int, size: int = 0, inode: int = 0, link: str = ""
    ) -> None:
        """Append an entry; a file's chunk indices are then appended to :attr:`used` (and
        ``first[-1]`` set to ``len(used)``)."""
        number = len(self.paths)
        self.paths.append(path)
        self.kinds.append(ord(kind))
        self.modes.append(mode)
        self.mtimes.append(mtime_ns)
        self.file_sizes.append(size)
        self.inodes.append(inode)
        self.first.append(self.first[-1])
        if link:
            self.links[number] = link

    @property
    def chunk_count(self) -> int:
        return len(self.offsets)

    @property
    def entry_count(self) -> int:
        return len(self.paths)

    def chunk(self, index: int) -> Chunk:
        return Chunk(
            bytes(self.hashes[index * HASH_BYTES : (index + 1) * HASH_BYTES]),
            self.pack_names[self.chunk_pack[index]],
            self.offsets[index],
            self.stored[index],
            self.sizes[index],
            self.codecs[index],
            self.within[index],
        )

    def entry(self, number: int) -> Entry:
        kind = chr(self.kinds[number])
        return Entry(
            self.paths[number],
            kind,
            self.modes[number],
            self.mtimes[number],
            self.file_sizes[number],
            self.inodes[number],
            list(self.used[self.first[number] : self.first[number + 1]]),
            self.links.get(number, ""),
        )

    @property
    def chunks(self) -> list[Chunk]:
        """Every chunk, as :class:`Chunk` objects (built on each access)."""
        return [self.chunk(index) for index in range(self.chunk_count)]

    @property
    def entries(self) -> list[Entry]:
        """Every entry, as :class:`Entry` objects (built on each access)."""
        return [self.entry(number) for number in range(self.entry_count)]

    def chunks_of(self, number: int) -> array[int]:
        return self.used[self.first[number] : self.first[number + 1]]

    def stored_size(self) -> int:
        return sum(self.packs.values())

    def blocks(self) -> dict[tuple[str, int], int]:
        """The pack blocks its chunks are in, as (pack, offset) -> stored length."""
        names = self.pack_names
        return {
            (names[pack], offset): stored
            for pack, offset, stored in zip(self.chunk_pack, self.offsets, self.stored, strict=True)
        }

    def files_using(self, chunk_indices: set[int], limit: int = 10) -> tuple[list[str], int]:
        """The paths of the files holding any of ``chunk_indices`` (at most ``limit``), and their count."""
        named: list[str] = []
        count = 0
        file = ord(FILE)
        for number, kind in enumerate(self.kinds):
            if kind == file and not chunk_indices.isdisjoint(self.chunks_of(number)):
                count += 1
                if len(named) < limit:
                    named.append(self.paths[number])
        return named, count

    def selected(self, numbers: Iterable[int]) -> Manifest:
        """A manifest of the entries ``numbers`` (in order), sharing this one's chunks and packs."""
        part = Manifest()
        part.packs, part.pack_names = self.packs, self.pack_names
        part.hashes, part.chunk_pack, part.offsets = self.hashes, self.chunk_pack, self.offsets
        part.stored, part.sizes, part.codecs, part.within = self.stored, self.sizes, self.codecs, self.within
        for number in numbers:
            link = self.links.get(number, "")
            part.add_entry(
                self.paths[number],
                chr(self.kinds[number]),
                self.modes[number],
                self.mtimes[number],
                self.file_sizes[number],
                self.inodes[number],
                link,
            )
            part.used.extend(self.chunks_of(number))
            part.first[-1] = len(part.used)
        part.save_id, part.created = self.save_id, self.created
        return part


# -- bytes -----------------------------------------------------------------------------------------


def _le(column: array[int]) -> bytes:
    if _LITTLE:
        return column.tobytes()
    swapped = array(column.typecode, column)
    swapped.byteswap()
    return swapped.tobytes()


def _compressor() -> Any:
    """A zlib-format compressor at level 1, ISA-L's where installed (a manifest is mostly hashes
    and small integers: higher levels cost several times the time for a few percent)."""
    backend: Any = _codec._isal or zlib
    return backend.compressobj(1)


def _encode_path(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def encode(manifest: Manifest) -> bytes:
    """The bytes of ``manifest``: the header line and a zlib stream of binary columns (see the module)."""
    compressor = _compressor()
    out = [_HEADER_LINE]

    def put(data: bytes | bytearray) -> None:
        out.append(compressor.compress(data))

    save_id = manifest.save_id.encode()
    put(
        _HEAD.pack(len(manifest.pack_names), manifest.chunk_count, manifest.entry_count, manifest.created, len(save_id))
    )
    put(save_id)
    put(b"".join(bytes.fromhex(name) for name in manifest.pack_names))
    put(_le(array("Q", (manifest.packs[name] for name in manifest.pack_names))))
    for start in range(0, manifest.chunk_count, BLOCK):
        end = min(start + BLOCK, manifest.chunk_count)
        put(manifest.hashes[start * HASH_BYTES : end * HASH_BYTES])
        put(_le(manifest.chunk_pack[start:end]))
        put(_le(manifest.offsets[start:end]))
        put(_le(manifest.stored[start:end]))
        put(_le(manifest.sizes[start:end]))
        put(_le(manifest.within[start:end]))
        put(manifest.codecs[start:end])
    first, links = manifest.first, manifest.links
    linked = sorted(links)
    for start in range(0, manifest.entry_count, BLOCK):
        end = min(start + BLOCK, manifest.entry_count)
        paths = manifest.paths[start:end]
        path_lengths = array("I", map(len, paths))
        path_bytes = _encode_path("".join(paths))
        if len(path_bytes) != sum(path_lengths):  # a character of several bytes: lengths in bytes
            encoded = [_encode_path(path) for path in paths]
            path_lengths, path_bytes = array("I", map(len, encoded)), b"".join(encoded)
        targets = [b""] * (end - start)
        for number in linked[bisect_left(linked, start) : bisect_left(linked, end)]:
            targets[number - start] = _encode_path(links[number])
        counts = array("I", map(operator.sub, first[start + 1 : end + 1], first[start:end]))
        put(manifest.kinds[start:end])
        put(_le(manifest.modes[start:end]))
        put(_le(manifest.mtimes[start:end]))
        put(_le(manifest.file_sizes[start:end]))
        put(_le(manifest.inodes[start:end]))
        put(_le(counts))
        put(_le(path_lengths))
        put(_le(array("I", map(len, targets))))
        put(path_bytes)
        put(b"".join(targets))
        put(_le(manifest.used[first[start] : first[end]]))
    out.append(compressor.flush())
    return b"".join(out)


def is_manifest(head: bytes) -> bool:
    """Whether ``head`` (an object's first bytes) starts an incremental checkpoint's manifest."""
    return head.startswith(MAGIC)


class _Stream:
    """The manifest's zlib stream, read by exact lengths and inflated a step at a time: memory is
    bounded by what is asked for (each length checked first by the caller) plus one step."""

    def __init__(self, body: memoryview, uri: str) -> None:
        self.inflater = (_codec._isal or zlib).decompressobj()
        self.data: bytes | memoryview = body
        self.buffer = bytearray()
        self.position = 0
        self.total = 0
        self.uri = uri

    def _inflate(self) -> bool:
        try:
            piece = self.inflater.decompress(self.data, _STEP)
        except _codec.InflateError as error:
            raise CorruptCheckpointError(f"{self.uri}: the manifest does not inflate: {error}", uri=self.uri) from None
        self.data = self.inflater.unconsumed_tail
        self.total += len(piece)
        if self.total > MAX_MANIFEST:
            raise CorruptCheckpointError(f"{self.uri}: the manifest inflates beyond {MAX_MANIFEST} bytes", uri=self.uri)
        if self.position:
            del self.buffer[: self.position]
            self.position = 0
        self.buffer += piece
        return bool(piece) or bool(self.data)

    def read(self, length: int) -> bytes:
        while len(self.buffer) - self.position < length:
            if not self._inflate():
                raise CorruptCheckpointError(f"{self.uri}: the manifest is truncated", uri=self.uri)
        start = self.position
        self.position += length
        return bytes(self.buffer[start : self.position])

    def column(self, code: str, count: int) -> array[int]:
        column = array(code)
        column.frombytes(self.read(count * column.itemsize))
        if not _LITTLE:
            column.byteswap()
        return column

    def end(self) -> None:
        while self._inflate():
            if len(self.buffer) > self.position:
                break
        if len(self.buffer) > self.position or not self.inflater.eof or self.inflater.unused_data:
            raise CorruptCheckpointError(f"{self.uri}: the manifest holds more than its header states", uri=self.uri)


def _within(column: array[int], low: int, high: int, what: str) -> None:
    """Every value of ``column`` in ``[low, high]`` (the lower bound is not looked at when the
    column's type cannot go below it)."""
    if column and (((low > 0 or column.typecode in "bhilqfd") and min(column) < low) or max(column) > high):
        raise ValueError(f"a column of {what} holds a value out of range")


def decode(data: bytes | bytearray | memoryview, uri: str, *, check_tree: bool = True) -> Manifest:
    """Parse and check a manifest: every count, range and path in bounds, or it is refused.

    ``check_tree=False`` leaves out what only a restore needs (paths, links, overlaps, each
    file's chunks adding up to its size): for a parent a save only takes chunk locations from,
    each checked by its hash when restored.

    Raises:
        CorruptCheckpointError: It is garbled, or states what no save writes (``UnsafeArchiveError``
            for a path out of the workspace or an unsafe link).
    """
    view = memoryview(data)
    if len(view) > MAX_MANIFEST:
        raise CorruptCheckpointError(f"{uri}: a manifest of {len(view)} bytes is beyond the limit", uri=uri)
    first_line = bytes(view[:64]).partition(b"\n")[0] + b"\n"
    if not first_line.startswith(MAGIC):
        raise CorruptCheckpointError(f"{uri}: not an incremental checkpoint's manifest", uri=uri)
    if first_line != _HEADER_LINE:
        version = first_line[len(MAGIC) : -1].decode(errors="replace")
        raise CorruptCheckpointError(
            f"{uri}: an incremental checkpoint of manifest version {version!r}; this checkpointio reads "
            f"version {VERSION} (another checkpointio version wrote it?)",
            uri=uri,
        )
    stream = _Stream(view[len(first_line) :], uri)
    try:
        manifest = _read(stream)
        stream.end()
    except (ValueError, UnicodeDecodeError, OverflowError) as error:
        raise CorruptCheckpointError(f"{uri}: the manifest is garbled: {error}", uri=uri) from error
    if check_tree:
        _check_chunks(manifest, uri)
        _check_sizes(manifest, uri)
        _check_overlaps(manifest, uri)
        _check_tree(manifest, uri)
    return manifest


def _read(stream: _Stream) -> Manifest:
    manifest = Manifest()
    pack_count, chunk_count, entry_count, created, id_length = _HEAD.unpack(stream.read(_HEAD.size))
    if pack_count > MAX_PACKS or chunk_count > MAX_CHUNKS or entry_count > MAX_ENTRIES or id_length > _MAX_SAVE_ID:
        raise ValueError(f"{pack_count} packs, {chunk_count} chunks and {entry_count} entries are beyond the limits")
    manifest.save_id, manifest.created = stream.read(id_length).decode(), created
    for start in range(0, pack_count, BLOCK):
        count = min(BLOCK, pack_count - start)
        names = stream.read(count * HASH_BYTES)
        manifest.pack_names += [names[at : at + HASH_BYTES].hex() for at in range(0, len(names), HASH_BYTES)]
    sizes = array("Q")
    for start in range(0, pack_count, BLOCK):
        sizes += stream.column("Q", min(BLOCK, pack_count - start))
    manifest.packs = dict(zip(manifest.pack_names, sizes, strict=True))
    if len(manifest.packs) != pack_count:
        raise ValueError("a pack is listed twice")
    for start in range(0, chunk_count, BLOCK):
        count = min(BLOCK, chunk_count - start)
        manifest.hashes += stream.read(count * HASH_BYTES)
        in_pack = stream.column("I", count)
        _within(in_pack, 0, pack_count - 1, "packs")
        manifest.chunk_pack += in_pack
        manifest.offsets += stream.column("Q", count)
        stored = stream.column("I", count)
        _within(stored, 1, _MAX_STORED, "stored lengths")
        manifest.stored += stored
        sizes = stream.column("I", count)
        _within(sizes, 1, _MAX_CHUNK, "lengths")
        manifest.sizes += sizes
        within = stream.column("I", count)
        _within(within, 0, MAX_BLOCK_BYTES - 1, "offsets in blocks")
        manifest.within += within
        codecs = stream.read(count)
        if codecs.translate(None, bytes((STORED, DEFLATED))):
            raise ValueError("a chunk of an unknown codec")
        manifest.codecs += codecs
    for start in range(0, entry_count, BLOCK):
        _read_entries(stream, manifest, min(BLOCK, entry_count - start), chunk_count)
    return manifest


def _read_entries(stream: _Stream, manifest: Manifest, count: int, chunk_count: int) -> None:
    """One block of entries, its lengths and counts checked before what they announce is read."""
    kinds = stream.read(count)
    if kinds.translate(None, _KINDS):
        raise ValueError("an entry of an unknown type")
    modes = stream.column("H", count)
    _within(modes, 0, 0o7777, "modes")
    mtimes = stream.column("q", count)
    sizes = stream.column("Q", count)
    inodes = stream.column("Q", count)
    counts = stream.column("I", count)
    path_lengths = stream.column("I", count)
    link_lengths = stream.column("I", count)
    # a file has at most size // MINIMUM + 1 chunks, any other entry none (C-level maps: no Python per entry)
    most = map(operator.add, map(operator.floordiv, sizes, repeat(_cdc.MINIMUM)), repeat(1))
    if any(map(operator.gt, counts, most)) or any(counts[other.start()] for other in _NOT_FILE.finditer(kinds)):
        raise ValueError("an entry names more chunks than its size allows")
    blob = stream.read(sum(path_lengths))
    ends = list(accumulate(path_lengths))
    starts = [0, *ends[:-1]]
    number = manifest.entry_count
    if blob.isascii():  # one decode, then slices: byte offsets are character offsets
        text = blob.decode("ascii")
        manifest.paths += [text[start:end] for start, end in zip(starts, ends, strict=True)]
    else:
        manifest.paths += [
            blob[start:end].decode("utf-8", "surrogateescape") for start, end in zip(starts, ends, strict=True)
        ]
    blob = stream.read(sum(link_lengths))
    at = 0
    for offset, length in enumerate(link_lengths):
        if length:
            manifest.links[number + offset] = blob[at : at + length].decode("utf-8", "surrogateescape")
            at += length
    used = stream.column("I", sum(counts))
    _within(used, 0, chunk_count - 1, "chunk indices")
    manifest.kinds += kinds
    manifest.modes += modes
    manifest.mtimes += mtimes
    manifest.file_sizes += sizes
    manifest.inodes += inodes
    manifest.first += array("Q", accumulate(counts, initial=manifest.first[-1]))[1:]
    manifest.used += used


def _check_chunks(manifest: Manifest, uri: str) -> None:
    """Every block inside its pack; every chunk inside its block (a stored block's bytes, or what
    a block may inflate to)."""
    sizes = [manifest.packs[name] for name in manifest.pack_names]
    for number, (pack, offset, stored, size, codec, within) in enumerate(
        zip(
            manifest.chunk_pack,
            manifest.offsets,
            manifest.stored,
            manifest.sizes,
            manifest.codecs,
            manifest.within,
            strict=True,
        )
    ):
        if offset + stored > sizes[pack] or within + size > (stored if codec == STORED else MAX_BLOCK_BYTES):
            raise CorruptCheckpointError(
                f"{uri}: the manifest is garbled: chunk {number} lies outside its pack or block",
                uri=uri,
            )


def _check_sizes(manifest: Manifest, uri: str) -> None:
    """Every file's chunks add up to its size."""
    file = ord(FILE)
    sizes, used, first = manifest.sizes, manifest.used, manifest.first
    for number, kind in enumerate(manifest.kinds):
        if kind == file:
            total = sum(sizes[index] for index in used[first[number] : first[number + 1]])
            if total != manifest.file_sizes[number]:
                raise CorruptCheckpointError(
                    f"{uri}: the manifest is garbled: {manifest.paths[number]!r} is {manifest.file_sizes[number]} "
                    f"bytes, but its chunks hold {total}",
                    uri=uri,
                )


def _check_overlaps(manifest: Manifest, uri: str) -> None:
    """Refuse blocks whose byte ranges in a pack overlap, chunks of one block stated with two
    lengths or codecs, and chunks overlapping in their block (no save writes such a manifest)."""
    packs, offsets, stored, codecs = manifest.chunk_pack, manifest.offsets, manifest.stored, manifest.codecs
    within, sizes = manifest.within, manifest.sizes
    # one int a chunk as the sort key (pack, offset, offset in the block; ``within`` is below
    # 2**20, checked on reading): a tuple a chunk would take several times the memory
    order = sorted(
        range(manifest.chunk_count), key=lambda index: (packs[index] << 64 | offsets[index]) << 21 | within[index]
    )
    current, start, end, inner, previous = -1, -1, 0, 0, 0
    for index in order:
        if packs[index] != current:
            current, start, end, inner = packs[index], -1, 0, 0
        offset = offsets[index]
        if offset == start:  # another chunk of the same block
            bad = stored[index] != end - start or codecs[index] != codecs[previous] or within[index] < inner
        else:
            bad = offset < end
            start, end = offset, offset + stored[index]
        if bad:
            name = manifest.pack_names[current]
            raise CorruptCheckpointError(f"{uri}: the manifest has overlapping chunks in pack {name}", uri=uri)
        inner, previous = within[index] + sizes[index], index


def _unsafe(uri: str, what: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{uri}: {what}; nothing restored", uri=uri)


def _check_path(path: str, uri: str) -> None:
    framed = f"/{path}/"
    bad = (
        not path
        or path[0] == "/"
        or "\0" in path
        or "//" in framed
        or "/./" in framed
        or "/../" in framed
        or (len(path) > _tar._MAX_NAME // 4 and len(path.encode("utf-8", "surrogateescape")) > _tar._MAX_NAME)
        or (
            len(path) > _tar._MAX_PART // 4
            and any(len(part.encode("utf-8", "surrogateescape")) > _tar._MAX_PART for part in path.split("/"))
        )
    )
    if bad:
        raise _unsafe(uri, f"the entry {path!r} would be written outside the workspace or is not a valid name")


def _check_tree(manifest: Manifest, uri: str) -> None:
    """Every entry inside the workspace, in a folder listed before it, once; links inside too."""
    kinds: dict[str, str] = {}
    for number, path in enumerate(manifest.paths):
        kind = chr(manifest.kinds[number])
        _check_path(path, uri)
        if path in kinds:
            raise _unsafe(uri, f"the entry {path!r} is listed twice")
        parent = path.rpartition("/")[0]
        if parent and kinds.get(parent) != DIR:
            raise _unsafe(uri, f"the entry {path!r} is not in a folder listed before it")
        link = manifest.links.get(number, "")
        if kind == HARDLINK and kinds.get(link) != FILE:
            raise _unsafe(uri, f"the hard link {path!r} does not point to a file listed before it")
        if kind in (DIR, FILE) and link:
            raise _unsafe(uri, f"the entry {path!r} is not a link but names a target")
        kinds[path] = kind
    symlink = ord(SYMLINK)
    for number, code in enumerate(manifest.kinds):
        if code != symlink:
            continue
        path, link = manifest.paths[number], manifest.links.get(number, "")
        way = None if (not link or link.startswith("/") or "\0" in link) else _tar.link_way(path, link)
        if way is None:
            raise _unsafe(uri, f"the symlink {path!r} -> {link!r} points outside the workspace")
        for here in way:
            if kinds.get(here) == SYMLINK:
                raise _unsafe(uri, f"the symlink {path!r} -> {link!r} goes through the symlink {here!r}")


async def read_manifest(
    store: Store,
    location: Location,
    config: TransferConfig,
    *,
    check_tree: bool = True,
    info: ObjectInfo | None = None,
) -> Manifest | None:
    """The manifest at ``location``; ``None`` when what is there (if anything) is not one.

    ``info``: the object's metadata, when the caller HEADed it already (to tell it is a manifest):
    it is not asked again, and the read is pinned to its ETag (a manifest replaced since fails
    as changed while being read).

    Raises:
        CorruptCheckpointError: It is one, but garbled or unsafe.
    """
    if info is None:
        info = await _engine.head_for_reads(store, location)  # on a receiving thread, as the reads
    if info is None or not await is_manifest_object(store, info):
        return None
    data = await _engine.load_object(store, location, config, info=info)
    if data is None:
        return None
    return await anyio.to_thread.run_sync(partial(decode, data, location.uri, check_tree=check_tree))


async def is_manifest_object(store: Store, info: ObjectInfo) -> bool:
    """Whether the object is an incremental manifest, as its record says (its first bytes then
    say it again when it is read)."""
    return info.record is not None and info.record.kind is Kind.DIRECTORY and info.record.layout == LAYOUT
