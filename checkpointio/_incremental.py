"""Incremental directory checkpoints: a manifest of chunks kept in shared, immutable packs.

Layout, next to the checkpoint's key (``<folder>/<name>``)::

    <folder>/<name>                                    the manifest, written last (the checkpoint)
    <folder>/.checkpointio-incremental/packs/<hash>    packs: chunks, compressed or stored
    <folder>/.checkpointio-incremental/leases/<id>     one per save in progress (see gc below)

Every checkpoint saved incrementally in one folder shares its packs: a save uploads only the
chunks that no parent (what the key held before, the checkpoint the task restored from) already
stored there. Unchanged files are recognised without reading them (same size, mtime and inode as
in the parent's manifest); changed ones are cut by content (:mod:`._cdc`) so an edit or an append
re-uploads only the chunks around it.

The manifest is a header line (``checkpointio-incremental/1``) and a zlib stream of JSON lines:
a header object (counts, packs), then the chunks (hash, pack, offset, stored and raw length,
codec) and the entries (path, type, mode, mtime, size, inode, chunk indices or link target) in
columns of up to ``BLOCK`` items a line. It is stored like any checkpoint (atomically, with its
CRC32), after every pack it names is stored.
Each pack carries a CRC32 of its own; each chunk is checked against its BLAKE3 hash before a
restore presents anything.

Chunks are named by BLAKE3 (128 bits): 1.5 GB/s per core here, faster than deflate and the disk,
and collision resistant, which naming data by its hash needs (a restore trusts the name; xxh3
is twice as fast but an engineered collision would restore the wrong bytes silently).

Garbage collection is in :func:`collect`; its safety model is documented there and in
docs/incremental.md.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import blake3

from . import _archive, _cdc, _codec, _engine, _placement, _tar
from ._concurrency import one_error
from ._config import TransferConfig
from ._exceptions import (
    CheckpointError,
    ConcurrentModificationError,
    CorruptCheckpointError,
    SourceChangedError,
    UnsafeArchiveError,
)
from ._location import Location
from ._progress import Meter, ProgressCallback, human_size
from ._selection import ListedEntry, Selection, roots
from ._stores import Kind, ObjectInfo, Store

__all__ = [
    "AREA",
    "MAGIC",
    "Manifest",
    "is_manifest",
    "load",
    "read_manifest",
    "save",
    "verify",
]

logger = logging.getLogger(__name__)

#: The manifest's first bytes: what it is, then the version of its layout and a newline.
MAGIC = b"checkpointio-incremental/"
VERSION = 1
_HEADER_LINE = MAGIC + str(VERSION).encode() + b"\n"
#: The folder, next to a checkpoint, holding the packs and leases of the checkpoints beside it.
AREA = ".checkpointio-incremental"
_PACKS = "packs/"
_LEASES = "leases/"
#: A pack's first line: what it is and the save that wrote it, so that two saves never write the
#: same pack name (gc may be deleting an unreferenced pack of that name; see :func:`collect`).
_PACK_MAGIC = b"checkpointio-pack/1 "

#: A pack is uploaded once it holds this many bytes: tens of MiB, few requests, parallel parts.
PACK_SIZE = 32 * 1024 * 1024
#: Chunks are encoded (hashed, compressed) on the pool in batches of about this many bytes or chunks.
_BATCH_BYTES = 2 * 1024 * 1024
_BATCH_CHUNKS = 512
#: Bytes of a file read at once while cutting it into chunks.
_READ_STEP = 8 * 1024 * 1024
#: Hash length in bytes (BLAKE3, truncated: 128 bits).
_HASH_BYTES = 16
#: How a chunk is held in its pack.
STORED, DEFLATED = 0, 1

#: Limits a manifest must respect; beyond them it is refused as crafted or garbled, before its
#: contents are held in memory.
MAX_MANIFEST = 2 * 1024 * 1024 * 1024
MAX_ENTRIES = 50_000_000
MAX_CHUNKS = 200_000_000
MAX_PACKS = 10_000_000
_MAX_LINE = 64 * 1024 * 1024
_MAX_CHUNK = _cdc.MAXIMUM
_MAX_STORED = _MAX_CHUNK + 5 * (_MAX_CHUNK // 65535 + 2) + 1024

#: A restore fetches a pack's chunks in ranges of at most this many bytes, merging chunks less
#: than ``_GAP`` apart into one range.
_SPAN = 8 * 1024 * 1024
_GAP = 256 * 1024

#: A lease older than this is taken for a save that died (gc then ignores it); a save renews its
#: lease every ``LEASE_RENEW`` seconds.
LEASE_TTL = 15 * 60.0
LEASE_RENEW = 60.0

_DIR, _FILE, _SYMLINK, _HARDLINK = "d", "f", "l", "h"

Hash = bytes


def _hash(data: bytes | memoryview) -> Hash:
    return blake3.blake3(data).digest(_HASH_BYTES)


# -- where things are ------------------------------------------------------------------------------


def area_of(location: Location) -> Location:
    """The folder (prefix) of the packs and leases shared by the checkpoints beside ``location``."""
    folder, slash, _ = location.key.rpartition("/")
    return Location(location.scheme, location.bucket, f"{folder}{slash}{AREA}/")


def pack_location(area: Location, name: str) -> Location:
    return Location(area.scheme, area.bucket, area.key + _PACKS + name)


def _lease_location(area: Location, save_id: str) -> Location:
    return Location(area.scheme, area.bucket, area.key + _LEASES + save_id)


def _new_save_id() -> str:
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"


# -- the manifest ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk as a manifest records it: its hash and where its bytes are."""

    hash: Hash
    pack: str
    offset: int
    stored: int
    size: int
    codec: int


@dataclass(slots=True)
class Entry:
    """One entry of a saved tree."""

    path: str
    kind: str
    mode: int
    mtime_ns: int
    size: int = 0
    inode: int = 0
    chunks: list[int] = field(default_factory=list)
    link: str = ""


@dataclass
class Manifest:
    """A decoded manifest: its packs (name -> size), chunks and entries (in tree order)."""

    packs: dict[str, int]
    chunks: list[Chunk]
    entries: list[Entry]
    save_id: str = ""
    created: float = 0.0

    def stored_size(self) -> int:
        return sum(self.packs.values())

    def files_using(self, chunk_indices: set[int], limit: int = 10) -> tuple[list[str], int]:
        """The paths of the files holding any of ``chunk_indices`` (at most ``limit``), and their count."""
        named: list[str] = []
        count = 0
        for entry in self.entries:
            if entry.kind == _FILE and not chunk_indices.isdisjoint(entry.chunks):
                count += 1
                if len(named) < limit:
                    named.append(entry.path)
        return named, count


#: Chunks or entries per line of a manifest: lines are columns of this many (JSON lists parse
#: at C speed, one line per item would not), and a reader holds one line at a time.
BLOCK = 4096


def encode(manifest: Manifest, level: int = 6) -> bytes:
    """The bytes of ``manifest``: the header line and a zlib stream of JSON lines (see the module)."""
    names = list(manifest.packs)
    index = {name: number for number, name in enumerate(names)}
    compressor = zlib.compressobj(level)
    out = [_HEADER_LINE]

    def line(value: object) -> None:
        out.append(compressor.compress(json.dumps(value, separators=(",", ":")).encode() + b"\n"))

    line(
        {
            "save_id": manifest.save_id,
            "created": manifest.created,
            "hash": "blake3-128",
            "packs": [[name, manifest.packs[name]] for name in names],
            "chunks": len(manifest.chunks),
            "entries": len(manifest.entries),
        }
    )
    for start in range(0, len(manifest.chunks), BLOCK):
        block = manifest.chunks[start : start + BLOCK]
        line(
            {
                "hash": b"".join(chunk.hash for chunk in block).hex(),
                "pack": [index[chunk.pack] for chunk in block],
                "offset": [chunk.offset for chunk in block],
                "stored": [chunk.stored for chunk in block],
                "size": [chunk.size for chunk in block],
                "codec": [chunk.codec for chunk in block],
            }
        )
    for start in range(0, len(manifest.entries), BLOCK):
        entries = manifest.entries[start : start + BLOCK]
        line(
            {
                "path": [entry.path for entry in entries],
                "kind": "".join(entry.kind for entry in entries),
                "mode": [entry.mode for entry in entries],
                "mtime": [entry.mtime_ns for entry in entries],
                "size": [entry.size for entry in entries],
                "inode": [entry.inode for entry in entries],
                "chunks": [entry.chunks for entry in entries],
                "link": [entry.link for entry in entries],
            }
        )
    out.append(compressor.flush())
    return b"".join(out)


def is_manifest(head: bytes) -> bool:
    """Whether ``head`` (an object's first bytes) starts an incremental checkpoint's manifest."""
    return head.startswith(MAGIC)


def _lines(body: memoryview, uri: str) -> Iterator[bytes]:
    """The lines of the manifest's zlib stream, inflated a step at a time (memory bounded by a line)."""
    inflater = zlib.decompressobj()
    pending = b""
    data: bytes | memoryview = body
    total = 0
    while True:
        try:
            piece = inflater.decompress(data, 4 * 1024 * 1024)
        except zlib.error as error:
            raise CorruptCheckpointError(f"{uri}: the manifest does not inflate: {error}", uri=uri) from None
        data = inflater.unconsumed_tail
        total += len(piece)
        if total > MAX_MANIFEST:
            raise CorruptCheckpointError(f"{uri}: the manifest inflates beyond {MAX_MANIFEST} bytes", uri=uri)
        pending += piece
        *complete, pending = pending.split(b"\n")
        yield from complete
        if len(pending) > _MAX_LINE:
            raise CorruptCheckpointError(f"{uri}: the manifest holds a line longer than {_MAX_LINE} bytes", uri=uri)
        if not piece and not data:
            break
    if not inflater.eof or inflater.unused_data or pending:
        raise CorruptCheckpointError(f"{uri}: the manifest is truncated or garbled", uri=uri)


def _ints(values: object, count: int, what: str, low: int = 0, high: int = 1 << 63) -> list[int]:
    """A column of ``count`` integers in ``[low, high]``, or ``ValueError``."""
    if not isinstance(values, list) or len(values) != count:
        raise ValueError(f"a column of {what} of the wrong length")
    if values and (set(map(type, values)) != {int} or min(values) < low or max(values) > high):
        raise ValueError(f"a column of {what} holds something else than whole numbers in range")
    return values


def decode(data: bytes | bytearray | memoryview, uri: str, *, check_tree: bool = True) -> Manifest:
    """Parse and check a manifest: every count, range and path in bounds, or it is refused.

    ``check_tree=False`` leaves out what only a restore needs (paths, links, overlaps): for a
    parent a save only takes chunk locations from, each checked by its hash when restored.

    Raises:
        CorruptCheckpointError: It is garbled, or states what no save writes (``UnsafeArchiveError``
            for a path out of the workspace or an unsafe link).
    """
    view = memoryview(data)
    if len(view) > MAX_MANIFEST:
        raise CorruptCheckpointError(f"{uri}: a manifest of {len(view)} bytes is beyond the limit", uri=uri)
    first = bytes(view[:64]).partition(b"\n")[0] + b"\n"
    if not first.startswith(MAGIC):
        raise CorruptCheckpointError(f"{uri}: not an incremental checkpoint's manifest", uri=uri)
    if first != _HEADER_LINE:
        version = first[len(MAGIC) : -1].decode(errors="replace")
        raise CorruptCheckpointError(
            f"{uri}: an incremental checkpoint of manifest version {version!r}; this checkpointio reads "
            f"version {VERSION} (a newer checkpointio wrote it?)",
            uri=uri,
        )
    lines = _lines(view[len(first) :], uri)
    try:
        header = json.loads(next(lines))
        packs_list = header["packs"]
        chunk_count, entry_count = int(header["chunks"]), int(header["entries"])
        if not isinstance(packs_list, list) or len(packs_list) > MAX_PACKS:
            raise ValueError("too many packs")
        if not 0 <= chunk_count <= MAX_CHUNKS or not 0 <= entry_count <= MAX_ENTRIES:
            raise ValueError(f"{chunk_count} chunks and {entry_count} entries are beyond the limits")
        names: list[str] = []
        packs: dict[str, int] = {}
        for name, size in packs_list:
            name, size = str(name), int(size)
            if not _is_pack_name(name) or size < 0 or name in packs:
                raise ValueError(f"a pack named {name!r} of {size} bytes")
            names.append(name)
            packs[name] = size
        chunks: list[Chunk] = []
        while len(chunks) < chunk_count:
            block = json.loads(next(lines))
            count = min(BLOCK, chunk_count - len(chunks))
            hashes = bytes.fromhex(block["hash"])
            if len(hashes) != count * _HASH_BYTES:
                raise ValueError("a block of chunk hashes of the wrong length")
            in_pack = _ints(block["pack"], count, "packs", 0, len(names) - 1)
            offsets = _ints(block["offset"], count, "offsets")
            stored = _ints(block["stored"], count, "stored lengths", 1, _MAX_STORED)
            sizes = _ints(block["size"], count, "lengths", 1, _MAX_CHUNK)
            codecs = _ints(block["codec"], count, "codecs", STORED, DEFLATED)
            for number in range(count):
                pack = names[in_pack[number]]
                chunk = Chunk(
                    hashes[number * _HASH_BYTES : (number + 1) * _HASH_BYTES],
                    pack,
                    offsets[number],
                    stored[number],
                    sizes[number],
                    codecs[number],
                )
                if (chunk.codec == STORED and chunk.stored != chunk.size) or chunk.offset + chunk.stored > packs[pack]:
                    raise ValueError(f"chunk {len(chunks)} lies outside its pack or states impossible sizes")
                chunks.append(chunk)
        entries: list[Entry] = []
        while len(entries) < entry_count:
            block = json.loads(next(lines))
            count = min(BLOCK, entry_count - len(entries))
            entries += _entries(block, count, chunks)
        if next(lines, None) is not None:
            raise ValueError("more lines than the header states")
    except StopIteration:
        raise CorruptCheckpointError(f"{uri}: the manifest holds fewer lines than its header states", uri=uri) from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise CorruptCheckpointError(f"{uri}: the manifest is garbled: {error}", uri=uri) from error
    manifest = Manifest(packs, chunks, entries, str(header.get("save_id", "")), float(header.get("created", 0.0)))
    if check_tree:
        _check_overlaps(manifest, uri)
        _check_tree(manifest, uri)
    return manifest


def _is_pack_name(name: str) -> bool:
    return len(name) == 2 * _HASH_BYTES and all(c in "0123456789abcdef" for c in name)


def _entries(block: dict[str, Any], count: int, chunks: list[Chunk]) -> list[Entry]:
    """One block of entries, checked: types known, each file's chunks existing and adding up to its size."""
    paths, kinds, links, used = block["path"], block["kind"], block["link"], block["chunks"]
    if not (isinstance(paths, list) and isinstance(kinds, str) and isinstance(links, list) and isinstance(used, list)):
        raise ValueError("a block of entries of the wrong shape")
    if not len(paths) == len(kinds) == len(links) == len(used) == count:
        raise ValueError("a block of entries whose columns differ in length")
    modes = _ints(block["mode"], count, "modes", 0, 0o7777)
    mtimes = _ints(block["mtime"], count, "mtimes", -(1 << 63), 1 << 63)
    sizes = _ints(block["size"], count, "sizes")
    inodes = _ints(block["inode"], count, "inodes")
    entries = []
    for number in range(count):
        path, kind, link, indices = paths[number], kinds[number], links[number], used[number]
        if not isinstance(path, str) or not isinstance(link, str):
            raise ValueError("a path or link target that is not a string")
        entry = Entry(path, kind, modes[number], mtimes[number], sizes[number], inodes[number], [], link)
        if kind == _FILE:
            if not isinstance(indices, list) or len(indices) > entry.size:
                raise ValueError(f"{path!r} names more chunks than it has bytes")
            total = 0
            for index in indices:
                if type(index) is not int or index < 0:
                    raise ValueError(f"{path!r} names a chunk that does not exist")
                total += chunks[index].size
            if total != entry.size:
                raise ValueError(f"{path!r} is {entry.size} bytes, but its chunks hold {total}")
            entry.chunks = indices
        elif kind not in (_DIR, _SYMLINK, _HARDLINK):
            raise ValueError(f"{path!r} is of an unknown type {kind!r}")
        entries.append(entry)
    return entries


def _check_overlaps(manifest: Manifest, uri: str) -> None:
    """Refuse chunks whose byte ranges in a pack overlap (no save writes such a manifest)."""
    by_pack: dict[str, list[tuple[int, int]]] = {}
    for chunk in manifest.chunks:
        by_pack.setdefault(chunk.pack, []).append((chunk.offset, chunk.stored))
    for name, ranges in by_pack.items():
        ranges.sort()
        end = 0
        for offset, stored in ranges:
            if offset < end:
                raise CorruptCheckpointError(f"{uri}: the manifest has overlapping chunks in pack {name}", uri=uri)
            end = offset + stored


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
    for entry in manifest.entries:
        _check_path(entry.path, uri)
        if entry.path in kinds:
            raise _unsafe(uri, f"the entry {entry.path!r} is listed twice")
        parent = entry.path.rpartition("/")[0]
        if parent and kinds.get(parent) != _DIR:
            raise _unsafe(uri, f"the entry {entry.path!r} is not in a folder listed before it")
        if entry.kind == _HARDLINK and kinds.get(entry.link) != _FILE:
            raise _unsafe(uri, f"the hard link {entry.path!r} does not point to a file listed before it")
        kinds[entry.path] = entry.kind
    for entry in manifest.entries:
        if entry.kind != _SYMLINK:
            continue
        link = entry.link
        way = None if (not link or link.startswith("/") or "\0" in link) else _tar.link_way(entry.path, link)
        if way is None:
            raise _unsafe(uri, f"the symlink {entry.path!r} -> {link!r} points outside the workspace")
        for here in way:
            if kinds.get(here) == _SYMLINK:
                raise _unsafe(uri, f"the symlink {entry.path!r} -> {link!r} goes through the symlink {here!r}")


async def read_manifest(
    store: Store, location: Location, config: TransferConfig, *, check_tree: bool = True
) -> Manifest | None:
    """The manifest at ``location``; ``None`` when what is there (if anything) is not one.

    Raises:
        CorruptCheckpointError: It is one, but garbled or unsafe.
    """
    info = await store.head(location)
    if info is None or not await is_manifest_object(store, info):
        return None
    data = await _engine.load_object(store, location, config)
    if data is None:
        return None
    return await anyio.to_thread.run_sync(partial(decode, data, location.uri, check_tree=check_tree))


#: ``Record.layout`` of a manifest: a load tells the format from the record, with no read.
LAYOUT = "incremental"


async def is_manifest_object(store: Store, info: ObjectInfo) -> bool:
    """Whether the object is an incremental manifest, as its record says (its first bytes then
    say it again when it is read)."""
    return info.record is not None and info.record.kind is Kind.DIRECTORY and info.record.layout == LAYOUT


# -- saving ----------------------------------------------------------------------------------------


@dataclass
class _Parents:
    """What the parents of a save stored: chunks by hash, and files by path (to skip reading them)."""

    chunks: dict[Hash, Chunk] = field(default_factory=dict)
    files: dict[str, tuple[int, int, int, list[Chunk]]] = field(default_factory=dict)
    pack_sizes: dict[str, int] = field(default_factory=dict)

    def add(self, manifest: Manifest) -> None:
        self.pack_sizes.update(manifest.packs)
        for chunk in manifest.chunks:
            self.chunks.setdefault(chunk.hash, chunk)
        for entry in manifest.entries:
            if entry.kind == _FILE and entry.path not in self.files:
                self.files[entry.path] = (
                    entry.size,
                    entry.mtime_ns,
                    entry.inode,
                    [manifest.chunks[index] for index in entry.chunks],
                )


class _Lease:
    """The lease of one save in progress: created before any parent is read, renewed while the
    save runs, removed when it ends (see :func:`collect`)."""

    def __init__(self, store: Store, area: Location, save_id: str, config: TransferConfig) -> None:
        self.store = store
        self.location = _lease_location(area, save_id)
        self.config = config
        self.renewed = 0.0

    async def renew(self) -> None:
        body = json.dumps({"pid": os.getpid(), "time": time.time()}).encode()
        started = time.monotonic()
        await _engine.save_object(self.store, self.location, body, Kind.BYTES, self.config)
        self.renewed = started

    async def keep(self) -> None:
        while True:
            await anyio.sleep(LEASE_RENEW)
            await self.renew()

    async def drop(self) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(CheckpointError, OSError):
                await self.store.delete(self.location)


class _Packer:
    """Worker-thread side of a save: walks the tree, cuts and hashes what changed, packs new chunks.

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
        self.known: dict[Hash, Chunk] = dict(parents.chunks)
        self.entries: list[Entry] = []
        self.file_chunks: list[list[Chunk]] = []  # per entry (empty for others)
        #: The pack being filled, as its pieces (joined once, when it is full: no growing buffer).
        self.pack: list[bytes] = []
        self.pack_length = 0
        self.pack_pending: list[tuple[Hash, int, int, int, int]] = []  # hash, offset, stored, size, codec
        self.sequence = 0
        self.pool: _codec.OrderedPool | None = None
        self.batch: list[tuple[list[Chunk], bytes]] = []
        self.batch_bytes = 0
        self.in_flight: collections.deque[
            tuple[list[tuple[list[Chunk], int]], Future[list[tuple[Hash, bytes | None, int]]]]
        ] = collections.deque()
        #: Pack name -> size, of the parents' packs and of those this save wrote.
        self.pack_sizes: dict[str, int] = dict(parents.pack_sizes)
        self.read_bytes = 0
        self.new_bytes = 0

    # chunk encoding runs on the pool's threads: BLAKE3 and deflate let go of the GIL
    def _encode_all(self, pieces: list[bytes]) -> list[tuple[Hash, bytes | None, int]]:
        return [self._encode(piece) for piece in pieces]

    def _queue(self, target: list[Chunk], piece: bytes) -> None:
        """Encode ``piece`` (on the pool) and add it to ``target`` in order; small chunks go in
        batches, one hand-off per batch rather than per file."""
        self.batch.append((target, piece))
        self.batch_bytes += len(piece)
        if self.batch_bytes >= _BATCH_BYTES or len(self.batch) >= _BATCH_CHUNKS:
            self._submit()

    def _submit(self) -> None:
        if not self.batch:
            return
        assert self.pool is not None
        targets = [(target, len(piece)) for target, piece in self.batch]
        self.in_flight.append((targets, self.pool.submit(self._encode_all, [piece for _, piece in self.batch])))
        self.batch, self.batch_bytes = [], 0
        while len(self.in_flight) > 2 * self.workers:
            self._drain_one()

    def _drain_one(self) -> None:
        targets, future = self.in_flight.popleft()
        for (target, size), encoded in zip(targets, future.result(), strict=True):
            self._add(target, *encoded, size)

    def _encode(self, data: bytes) -> tuple[Hash, bytes | None, int]:
        digest = _hash(data)
        if digest in self.known:
            return digest, None, STORED
        if self.level > 0 and len(data) >= 64:
            deflated = _codec._deflate(data, self.level)
            if len(deflated) < len(data) * (1 - _codec.STORE_BELOW_SAVING):
                return digest, deflated, DEFLATED
        return digest, data, STORED

    def _add(self, target: list[Chunk], digest: Hash, encoded: bytes | None, codec: int, size: int) -> None:
        known = self.known.get(digest)
        if known is not None:
            target.append(known)
            return
        if encoded is None:  # known when encoded, so known now (the table only grows)
            raise AssertionError("a chunk known when encoded is missing")
        if not self.pack:
            head = _PACK_MAGIC + f"{self.save_id} {self.sequence}\n".encode()
            self.pack.append(head)
            self.pack_length = len(head)
        offset = self.pack_length
        self.pack.append(encoded)
        self.pack_length += len(encoded)
        placeholder = Chunk(digest, "", offset, len(encoded), size, codec)
        self.known[digest] = placeholder
        self.pack_pending.append((digest, offset, len(encoded), size, codec))
        target.append(placeholder)
        self.new_bytes += len(encoded)
        if self.pack_length >= self.pack_size:
            self._flush_pack()

    def _flush_pack(self) -> None:
        if not self.pack:
            return
        data = b"".join(self.pack)
        self.pack = []
        name = blake3.blake3(data).hexdigest(_HASH_BYTES)
        for digest, offset, stored, size, codec in self.pack_pending:
            self.known[digest] = Chunk(digest, name, offset, stored, size, codec)
        self.pack_pending = []
        self.sequence += 1
        self.pack_sizes[name] = len(data)
        self.upload(name, data)

    def run(self) -> list[Entry]:
        links: dict[tuple[int, int], str] = {}
        top = self.shown.rstrip(os.sep) + os.sep
        with (
            _codec.OrderedPool(self.workers) as pool,
            contextlib.closing(
                _archive.walk_tree(str(self.root), shown=self.shown, uri=self.uri, skip=self.skip)
            ) as walk,
        ):
            self.pool = pool
            for item in walk:
                rel, st = item.rel, item.st
                full = top + rel
                mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
                if stat.S_ISDIR(st.st_mode):
                    self._append(Entry(rel, _DIR, mode, mtime))
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        target = os.readlink(item.name, dir_fd=item.folder)
                    except FileNotFoundError as error:
                        raise SourceChangedError(
                            f"{full} disappeared while {self.uri} was being saved", uri=self.uri
                        ) from error
                    _archive._check_link(str(self.root), rel, target, self.uri)
                    self._append(Entry(rel, _SYMLINK, mode, mtime, link=target))
                elif stat.S_ISREG(st.st_mode):
                    inode = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and inode in links:
                        self._append(Entry(rel, _HARDLINK, mode, mtime, link=links[inode]))
                        continue
                    if st.st_nlink > 1:
                        links[inode] = rel
                    self._file(item, full, mode)
                else:
                    logger.warning("skipping %s %s (it holds no data to save)", _archive.file_type(st.st_mode), full)
            self._submit()
            while self.in_flight:
                self._drain_one()
        self._flush_pack()
        return self.entries

    def _append(self, entry: Entry, chunks: list[Chunk] | None = None) -> None:
        self.entries.append(entry)
        self.file_chunks.append(chunks if chunks is not None else [])

    def _file(self, item: _archive.Entry, full: str, mode: int) -> None:
        st = item.st
        entry = Entry(item.rel, _FILE, mode, st.st_mtime_ns, st.st_size, st.st_ino)
        parent = self.parents.files.get(item.rel)
        if parent is not None and parent[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
            self._append(entry, [self.known[chunk.hash] for chunk in parent[3]])
            self.meter.read(st.st_size)
            return
        chunks: list[Chunk] = []
        self._append(entry, chunks)
        if st.st_size == 0:
            return
        try:  # not through a symlink swapped in since the listing
            fd = os.open(item.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=item.folder)
        except FileNotFoundError as error:
            raise SourceChangedError(f"{full} disappeared while {self.uri} was being saved", uri=self.uri) from error
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
            for piece in self._pieces(fd, st.st_size, full):
                self._queue(chunks, piece)
        finally:
            os.close(fd)

    def _pieces(self, fd: int, size: int, full: str) -> Iterator[bytes]:
        """The file's chunks, cut by content, as bytes."""
        buffer = bytearray()
        data = _archive.file_data(fd, size, full, self.uri, _READ_STEP)
        done = False
        while not done:
            block = next(data, None)
            if block is None:
                done = True
            else:
                buffer += block
                self.meter.read(len(block))
                self.read_bytes += len(block)
                if len(buffer) < _READ_STEP and len(buffer) < size:
                    continue
            view = memoryview(buffer)
            start = 0
            try:
                for length in _cdc.cut_points(view, final=done):
                    yield bytes(view[start : start + length])
                    start += length
            finally:
                view.release()
            del buffer[:start]
            if block is None:
                break


async def _load_parents(
    store: Store, location: Location, parents: Iterable[Location], area: Location, config: TransferConfig
) -> _Parents:
    """What ``location`` held and the first incremental checkpoint among ``parents`` (newest first)
    stored, where their packs are ``area``'s: only those can be referenced from here."""
    found = _Parents()
    for candidate in [location, *parents]:
        if area_of(candidate) != area:
            continue
        try:
            manifest = await read_manifest(store, candidate, config, check_tree=False)
        except CorruptCheckpointError as error:
            logger.warning("not deduplicating against %s: %s", candidate.uri, error)
            continue
        if manifest is not None:
            found.add(manifest)
            if candidate != location:
                break
    return found


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
) -> Manifest:
    """Save the directory ``root`` at ``location`` as an incremental checkpoint.

    Chunks stored by ``location``'s previous checkpoint and by ``parents`` (incremental
    checkpoints in the same folder) are referenced, not uploaded again. Packs are uploaded as they
    fill, then the manifest (atomically, last): a save that fails or is killed leaves the previous
    checkpoint whole, and at most some packs no manifest names (``gc`` removes them).
    """
    started = time.monotonic()
    uri = location.uri
    shown = shown if shown is not None else str(root)
    area = area_of(location)
    own = await anyio.to_thread.run_sync(_engine.store_files_in, location, root)
    skip = _archive.skip_any(skip, own, _skip_area(location, root))
    save_id = _new_save_id()
    lease = _Lease(store, area, save_id, config)
    meter = Meter(on_progress, "save", uri, None, packed=True)
    await lease.renew()  # before any parent is read: gc then spares what they reference
    try:
        with one_error():
            async with anyio.create_task_group() as keeper:
                keeper.start_soon(lease.keep)
                manifest, packer = await _save_tree(
                    store, location, root, config, meter, parents, check, shown, skip, pack_size, save_id, lease
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
        len(manifest.entries),
        seconds,
    )
    return manifest


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
    lease: _Lease,
) -> tuple[Manifest, _Packer]:
    area = area_of(location)
    known = await _load_parents(store, location, parents, area, config)
    # unbuffered: a full pack waits in the producer until an upload slot is free (at most three
    # packs in memory: two uploading, one waiting)
    send, receive = anyio.create_memory_object_stream[tuple[str, bytes]](0)
    uploaded: dict[str, int] = {}

    def upload(name: str, data: bytes) -> None:
        anyio.from_thread.run(send.send, (name, data))

    packer = _Packer(
        root,
        location.uri,
        shown,
        known,
        config.compression_level,
        max(1, config.compression_workers),
        pack_size,
        save_id,
        upload,
        skip,
        meter,
    )

    def produce() -> list[Entry]:
        entries = packer.run()
        if check is not None:
            check()
        return entries

    entries: list[Entry] = []

    async def run_producer() -> None:
        nonlocal entries
        try:
            entries = await anyio.to_thread.run_sync(produce, limiter=anyio.CapacityLimiter(1))
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

    manifest = _assemble(entries, packer, save_id)
    if time.monotonic() - lease.renewed > LEASE_TTL / 2:  # this process was stalled: gc may have run
        await _check_packs_exist(store, area, manifest, location.uri)
    data = await anyio.to_thread.run_sync(encode, manifest)
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.commit)
    await _engine.save_object(store, location, data, Kind.DIRECTORY, config, layout=LAYOUT)
    meter.advance(len(data))
    return manifest, packer


def _assemble(entries: list[Entry], packer: _Packer, save_id: str) -> Manifest:
    """The manifest: the chunks the entries use (each once), the packs those are in."""
    chunk_index: dict[Hash, int] = {}
    chunks: list[Chunk] = []
    packs: dict[str, int] = {}
    for entry, used in zip(entries, packer.file_chunks, strict=True):
        if entry.kind != _FILE:
            continue
        indices = []
        for placeholder in used:
            chunk = packer.known[placeholder.hash]  # with its pack's name, now that every pack is named
            index = chunk_index.get(chunk.hash)
            if index is None:
                index = chunk_index[chunk.hash] = len(chunks)
                chunks.append(chunk)
                packs[chunk.pack] = 0
            indices.append(index)
        entry.chunks = indices
    return Manifest({name: packer.pack_sizes[name] for name in packs}, chunks, entries, save_id, time.time())


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


# -- restoring and verifying -----------------------------------------------------------------------


@dataclass
class _Span:
    pack: str
    offset: int
    length: int
    chunks: list[int]


def _spans(manifest: Manifest, wanted: set[int]) -> list[_Span]:
    """The ranges to fetch: per pack, the wanted chunks in offset order, merged across small gaps."""
    by_pack: dict[str, list[int]] = {}
    for index in sorted(wanted):
        by_pack.setdefault(manifest.chunks[index].pack, []).append(index)
    spans: list[_Span] = []
    for name, indices in by_pack.items():
        indices.sort(key=lambda index: manifest.chunks[index].offset)
        current: _Span | None = None
        for index in indices:
            chunk = manifest.chunks[index]
            end = chunk.offset + chunk.stored
            if (
                current is not None
                and chunk.offset - (current.offset + current.length) <= _GAP
                and end - current.offset <= _SPAN
            ):
                current.length = end - current.offset
                current.chunks.append(index)
            else:
                current = _Span(name, chunk.offset, chunk.stored, [index])
                spans.append(current)
    return spans


def _decode_chunk(chunk: Chunk, stored: memoryview) -> bytes:
    """A chunk's bytes from what its pack holds, checked against its hash."""
    if chunk.codec == DEFLATED:
        inflater = _codec.raw_inflater()
        try:
            data: bytes = inflater.decompress(stored, chunk.size)
        except _codec.InflateError as error:
            raise ValueError(f"does not inflate: {error}") from None
        if len(data) != chunk.size or inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("inflates to another size")
    else:
        data = bytes(stored)
    if _hash(data) != chunk.hash:
        raise ValueError("fails its BLAKE3 check")
    return data


class _Fetched:
    """What fetching a manifest's chunks found wrong, by pack, to name the files it affects."""

    def __init__(self) -> None:
        self.missing: dict[str, str] = {}  # pack -> why
        self.bad: dict[int, str] = {}  # chunk -> why
        self.lock = threading.Lock()

    def error(self, manifest: Manifest, uri: str) -> CorruptCheckpointError | None:
        if not self.missing and not self.bad:
            return None
        affected = {index for index, chunk in enumerate(manifest.chunks) if chunk.pack in self.missing}
        affected |= set(self.bad)
        named, count = manifest.files_using(affected)
        problems = [f"pack {name} {why}" for name, why in sorted(self.missing.items())]
        bad_packs = sorted({manifest.chunks[index].pack for index in self.bad})
        problems += [f"pack {name} holds chunks that {self.bad_reason(manifest, name)}" for name in bad_packs]
        more = f" and {count - len(named)} more" if count > len(named) else ""
        return CorruptCheckpointError(
            f"{uri}: {'; '.join(problems[:5])}; it affects {count} file{'s' if count != 1 else ''}: "
            f"{', '.join(named)}{more}",
            uri=uri,
        )

    def bad_reason(self, manifest: Manifest, pack: str) -> str:
        return next(why for index, why in self.bad.items() if manifest.chunks[index].pack == pack)


async def _fetch(
    store: Store,
    area: Location,
    manifest: Manifest,
    wanted: set[int],
    config: TransferConfig,
    meter: Meter,
    on_chunk: Callable[[int, bytes], None],
    uri: str,
) -> None:
    """Fetch the ``wanted`` chunks with ranged reads of their packs, several at once, and hand each
    one, checked, to ``on_chunk`` (in worker threads). What is missing or corrupt is collected,
    then raised as one :class:`CorruptCheckpointError` naming the files it affects."""
    found = _Fetched()
    spans = _spans(manifest, wanted)
    infos: dict[str, ObjectInfo] = {}
    slots = anyio.Semaphore(max(1, config.max_concurrency))
    # inflating and checking release the GIL, and creating files waits on the file system
    workers = anyio.CapacityLimiter(max(4, 2 * config.compression_workers))

    async def head(name: str) -> None:
        async with slots:
            info = await store.head(pack_location(area, name))
        if info is None:
            found.missing[name] = "is missing"
        elif info.size != manifest.packs[name]:
            found.missing[name] = f"holds {info.size} bytes, the manifest records {manifest.packs[name]}"
        else:
            infos[name] = info

    with one_error():
        async with anyio.create_task_group() as group:
            for name in {span.pack for span in spans}:
                group.start_soon(head, name)

    def take(span: _Span, data: bytes) -> None:
        view = memoryview(data)
        for index in span.chunks:
            chunk = manifest.chunks[index]
            start = chunk.offset - span.offset
            try:
                content = _decode_chunk(chunk, view[start : start + chunk.stored])
            except ValueError as error:
                with found.lock:
                    found.bad[index] = str(error)
                continue
            on_chunk(index, content)
        meter.advance(len(data))

    async def fetch(span: _Span) -> None:
        async with slots:  # held until the span is written: memory stays bounded by the slots
            data = await store.read_range(infos[span.pack], span.offset, span.length)
            await anyio.to_thread.run_sync(take, span, data, limiter=workers)

    with one_error():
        async with anyio.create_task_group() as group:
            for span in spans:
                if span.pack in infos:
                    group.start_soon(fetch, span)
    error = found.error(manifest, uri)
    if error is not None:
        raise error


_WRITE = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = _WRITE | os.O_CREAT | os.O_EXCL


class _Writer:
    """Writes a manifest's files into a staging folder as their chunks arrive, in any order."""

    def __init__(self, manifest: Manifest, folder: int) -> None:
        self.manifest = manifest
        self.folder = folder
        self.lock = threading.Lock()
        # chunk -> [(entry index, offset in the file)]
        self.uses: dict[int, list[tuple[int, int]]] = {}
        self.remaining: dict[int, int] = {}
        for number, entry in enumerate(manifest.entries):
            if entry.kind != _FILE:
                continue
            position = 0
            for index in entry.chunks:
                self.uses.setdefault(index, []).append((number, position))
                position += manifest.chunks[index].size
            self.remaining[number] = entry.size

    def prepare(self) -> None:
        """Create the folders, and the files that are empty or need several chunks (a single-chunk
        file is created whole when its chunk arrives)."""
        for entry in self.manifest.entries:
            if entry.kind == _DIR:
                os.mkdir(entry.path, 0o700, dir_fd=self.folder)
            elif entry.kind == _FILE and (entry.size == 0 or len(entry.chunks) > 1):
                fd = os.open(entry.path, _CREATE, 0o600, dir_fd=self.folder)
                try:
                    if entry.size == 0:
                        self._finish(fd, entry)
                finally:
                    os.close(fd)

    def chunk(self, index: int, data: bytes) -> None:
        for number, position in self.uses.get(index, ()):
            entry = self.manifest.entries[number]
            single = len(entry.chunks) == 1
            fd = os.open(entry.path, _CREATE if single else _WRITE, 0o600, dir_fd=self.folder)
            try:
                view = memoryview(data)
                while view:
                    written = os.pwrite(fd, view, position)
                    position += written
                    view = view[written:]
                with self.lock:
                    self.remaining[number] -= len(data)
                    complete = self.remaining[number] == 0
                if complete:
                    self._finish(fd, entry)
            finally:
                os.close(fd)

    @staticmethod
    def _finish(fd: int, entry: Entry) -> None:
        os.fchmod(fd, _tar._file_mode(entry.mode))
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def finish(self, uri: str) -> None:
        """Links, then folder modes and times (deepest first), once every file is whole."""
        short = [self.manifest.entries[n].path for n, left in self.remaining.items() if left != 0]
        if short:
            raise CorruptCheckpointError(f"{uri}: {short[0]!r} was not restored whole", uri=uri)
        for entry in self.manifest.entries:
            if entry.kind == _SYMLINK:
                os.symlink(entry.link, entry.path, dir_fd=self.folder)
            elif entry.kind == _HARDLINK:
                os.link(entry.link, entry.path, src_dir_fd=self.folder, dst_dir_fd=self.folder, follow_symlinks=False)
        for entry in reversed(self.manifest.entries):
            if entry.kind == _DIR:
                os.chmod(entry.path, entry.mode & 0o755 | 0o700, dir_fd=self.folder)
                os.utime(entry.path, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=self.folder, follow_symlinks=False)


def _wanted(manifest: Manifest) -> set[int]:
    return {index for entry in manifest.entries if entry.kind == _FILE for index in entry.chunks}


def _select(manifest: Manifest, only: Selection, uri: str) -> tuple[Manifest, list[str]]:
    """The part of ``manifest`` a partial restore writes (the entries ``only`` picks, the file a
    picked hard link needs, the folders holding them) and the paths it then presents."""
    picked = {entry.path for entry in manifest.entries if only.matches(entry.path)}
    picked |= {entry.link for entry in manifest.entries if entry.kind == _HARDLINK and entry.path in picked}
    only.check_all_used(uri)
    needed = set(picked)
    for path in picked:
        parts = path.split("/")
        needed.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    entries = [entry for entry in manifest.entries if entry.path in needed]
    return Manifest(manifest.packs, manifest.chunks, entries, manifest.save_id, manifest.created), roots(picked)


async def list_entries(
    store: Store, info: ObjectInfo, config: TransferConfig, each: Callable[[ListedEntry], None]
) -> None:
    """Give each entry of the incremental checkpoint ``info`` to ``each`` (in a worker thread), from
    its manifest alone (``ls --contents``)."""
    manifest = await read_manifest(store, info.location, config)
    if manifest is None:
        raise CheckpointError(f"{info.location.uri}: replaced while being read", uri=info.location.uri)
    kinds = {_DIR: "dir", _FILE: "file", _SYMLINK: "symlink", _HARDLINK: "hardlink"}

    def give() -> None:
        for entry in manifest.entries:
            size = entry.size if entry.kind == _FILE else 0
            mtime = entry.mtime_ns // 1_000_000_000
            each(ListedEntry(entry.path, kinds[entry.kind], size, mtime, entry.mode, entry.link))

    await anyio.to_thread.run_sync(give)


async def load(
    store: Store,
    info: ObjectInfo,
    workspace: Path,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
    *,
    only: Selection | None = None,
) -> Path:
    """Restore the incremental checkpoint whose manifest is ``info`` into ``workspace`` (with
    ``only``, just the entries it picks, at their paths, fetching only their chunks).

    Files are written into a staging folder as their chunks arrive; the tree is presented only
    once every chunk matched its hash.
    """
    location = info.location
    uri = location.uri
    started = time.monotonic()
    manifest = await read_manifest(store, location, config)
    if manifest is None:
        raise CheckpointError(f"{uri}: replaced while being read", uri=uri)
    presented: list[str] | None = None
    if only is not None:
        manifest, presented = _select(manifest, only, uri)
    meter = Meter(on_progress, "load", uri, manifest.stored_size())
    await anyio.to_thread.run_sync(_placement.make_workspace, workspace, uri)
    staging = await anyio.to_thread.run_sync(_placement.StagingFolder, workspace, uri)
    try:
        folder = await anyio.to_thread.run_sync(
            lambda: os.open(staging.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        )
        try:
            writer = _Writer(manifest, folder)
            await anyio.to_thread.run_sync(writer.prepare)
            await _fetch(store, area_of(location), manifest, _wanted(manifest), config, meter, writer.chunk, uri)
            await anyio.to_thread.run_sync(writer.finish, uri)
        finally:
            os.close(folder)
        if presented is None:
            await anyio.to_thread.run_sync(staging.present)
        else:
            await anyio.to_thread.run_sync(staging.present_paths, presented)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(staging.__exit__, None, None, None)
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.finish)
    logger.info(
        "loaded %s (incremental, %d entries, %s in %.1f s)",
        uri,
        len(manifest.entries),
        human_size(sum(entry.size for entry in manifest.entries)),
        time.monotonic() - started,
    )
    return workspace


async def verify(
    store: Store, info: ObjectInfo, config: TransferConfig, on_progress: ProgressCallback | None = None
) -> Manifest:
    """Check every chunk the manifest at ``info`` names, writing nothing.

    Raises:
        CorruptCheckpointError: The manifest is garbled or unsafe, or packs are missing or hold
            chunks that fail their check (named, with the files they affect).
    """
    location = info.location
    manifest = await read_manifest(store, location, config)
    if manifest is None:
        raise CheckpointError(f"{location.uri}: replaced while being read", uri=location.uri)
    meter = Meter(on_progress, "verify", location.uri, manifest.stored_size())

    def ignore(index: int, data: bytes) -> None:
        pass

    await _fetch(
        store, area_of(location), manifest, set(range(len(manifest.chunks))), config, meter, ignore, location.uri
    )
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.finish)
    return manifest


# -- garbage collection ----------------------------------------------------------------------------


@dataclass
class AreaReport:
    """What :func:`collect` found in one folder's pack store.

    Attributes:
        area: The pack store (``<folder>/.checkpointio-incremental/``).
        removed: The packs no manifest references, older than the grace period: deleted (or, with
            ``dry_run``, to be deleted), name -> size.
        kept_unreferenced: Packs no manifest references that are younger than the grace period.
        skipped: Why nothing was deleted there (saves in progress, an unreadable manifest), or ``""``.
        stale_leases: Leases of saves that died, removed.
    """

    area: Location
    removed: dict[str, int] = field(default_factory=dict)
    kept_unreferenced: int = 0
    skipped: str = ""
    stale_leases: int = 0

    @property
    def freed(self) -> int:
        return sum(self.removed.values())


def _folder_of(area: Location) -> Location:
    """The folder whose checkpoints share ``area``'s packs."""
    key = area.key[: -len(AREA) - 1]
    return Location(area.scheme, area.bucket, key)


def areas_under(infos: Iterable[ObjectInfo]) -> dict[str, Location]:
    """The pack stores among the listed objects, by key."""
    found: dict[str, Location] = {}
    marker = f"{AREA}/"
    for info in infos:
        key = info.location.key
        at = key.find(marker)
        while at > 0 and key[at - 1] != "/":
            at = key.find(marker, at + 1)
        if at < 0:
            continue
        area_key = key[: at + len(marker)]
        found.setdefault(area_key, Location(info.location.scheme, info.location.bucket, area_key))
    return found


def in_area(key: str) -> bool:
    """Whether ``key`` is a pack or lease of an incremental pack store (not a checkpoint)."""
    return key.startswith(f"{AREA}/") or f"/{AREA}/" in key


async def manifests_beside(store: Store, area: Location, config: TransferConfig) -> dict[str, Manifest]:
    """The incremental manifests of the folder ``area`` serves, by key. One removed while this
    reads it is left out; one replaced meanwhile is read again.

    Raises:
        CorruptCheckpointError: One of them is garbled (its packs cannot be known).
        ConcurrentModificationError: One kept being replaced while it was read.
    """
    folder = _folder_of(area)
    found: dict[str, Manifest] = {}
    for listed in await store.list(folder):
        if "/" in listed.location.key[len(folder.key) :]:
            continue
        for attempt in range(3):
            try:
                manifest = await _manifest_of(store, listed, config)
            except ConcurrentModificationError:
                if attempt == 2:
                    raise
                continue
            if manifest is not None:
                found[listed.location.key] = manifest
            break
    return found


async def _children(store: Store, area: Location) -> dict[str, str]:
    """The objects directly in the folder ``area`` serves: key -> generation tag."""
    folder = _folder_of(area)
    return {
        info.location.key: info.etag
        for info in await store.list(folder)
        if "/" not in info.location.key[len(folder.key) :]
    }


async def _manifest_of(store: Store, listed: ObjectInfo, config: TransferConfig) -> Manifest | None:
    info = listed if listed.record is not None else await store.head(listed.location)  # S3 lists no metadata
    if info is None or not await is_manifest_object(store, info):
        return None
    return await read_manifest(store, info.location, config, check_tree=False)


async def _leases(store: Store, area: Location) -> list[ObjectInfo]:
    return await store.list(Location(area.scheme, area.bucket, area.key + _LEASES))


async def collect_area(
    store: Store,
    area: Location,
    config: TransferConfig,
    *,
    older_than: float,
    dry_run: bool = False,
    lease_ttl: float = LEASE_TTL,
) -> AreaReport:
    """Delete the packs of ``area`` that no manifest beside it references and that were written
    more than ``older_than`` seconds ago, unless a save may be in progress there.

    The safety model (leases): every save writes a lease in the area before it reads any parent
    manifest, renews it every ``LEASE_RENEW`` seconds and removes it when it ends. A save can only
    reference packs named by a manifest it read after its lease existed, or packs it wrote itself.
    So this deletes nothing while any lease younger than ``lease_ttl`` exists, and checks again
    after reading every manifest and listing the packs, just before deleting: a save that started
    in between is seen then. A lease older than ``lease_ttl`` is a save that died (a live one
    renews it) and is removed. A save that was stalled for longer than ``LEASE_TTL / 2`` checks
    that every pack it references still exists before committing. ``older_than`` spares young
    packs on top (clock skew, a save stalled beyond its lease).
    """
    report = AreaReport(area)
    now = time.time()

    async def saves_in_progress() -> bool:
        live = False
        stale = time.time() - lease_ttl
        for lease in await _leases(store, area):
            if lease.modified is not None and lease.modified < stale:
                if not dry_run and await store.delete(lease.location):
                    report.stale_leases += 1
            else:
                live = True
        return live

    if await saves_in_progress():
        report.skipped = "a save is in progress there"
        return report
    before = await _children(store, area)
    try:
        manifests = await manifests_beside(store, area, config)
    except (CorruptCheckpointError, ConcurrentModificationError) as error:
        report.skipped = f"a manifest there cannot be read ({error}); its packs are kept"
        return report
    referenced = {name for manifest in manifests.values() for name in manifest.packs}
    cutoff = now - older_than
    packs_prefix = Location(area.scheme, area.bucket, area.key + _PACKS)
    for info in await store.list(packs_prefix):
        name = info.location.key[len(packs_prefix.key) :]
        if name in referenced:
            continue
        if info.modified is not None and info.modified <= cutoff:
            report.removed[name] = info.size
        else:
            report.kept_unreferenced += 1
    if not report.removed or dry_run:
        return report
    # A save that started since the first look may reference any of them: it still holds its
    # lease, or it committed a manifest since (it may have read a manifest that was removed before
    # this read it, so its packs show as unreferenced). Any object of the folder written, replaced
    # or removed since the first look calls the deletion off: a later gc does it.
    if await saves_in_progress() or await _children(store, area) != before:
        report.removed = {}
        report.skipped = "a save ran while the manifests were read"
        return report
    for name in list(report.removed):
        if not await store.delete(pack_location(area, name)):
            del report.removed[name]
    return report


async def collect(
    store: Store,
    prefix: Location,
    config: TransferConfig,
    *,
    older_than: float,
    dry_run: bool = False,
    lease_ttl: float = LEASE_TTL,
) -> list[AreaReport]:
    """:func:`collect_area` for every pack store under ``prefix``."""
    areas = areas_under(await store.list(prefix))
    return [
        await collect_area(store, area, config, older_than=older_than, dry_run=dry_run, lease_ttl=lease_ttl)
        for _, area in sorted(areas.items())
    ]


@dataclass(frozen=True)
class Usage:
    """What one incremental checkpoint holds in its folder's pack store.

    Attributes:
        referenced: Bytes of the chunks it references (as stored: compressed).
        exclusive: Of those, the bytes no other checkpoint of its folder references: what removing
            it (and a ``gc``) frees.
        files: Regular files in its tree.
    """

    referenced: int
    exclusive: int
    files: int


def usage(manifests: dict[str, Manifest]) -> dict[str, Usage]:
    """The :class:`Usage` of each of the manifests of one folder, by key."""
    users: dict[tuple[str, int], int] = {}
    for manifest in manifests.values():
        for chunk in manifest.chunks:
            place = (chunk.pack, chunk.offset)
            users[place] = users.get(place, 0) + 1
    result = {}
    for key, manifest in manifests.items():
        referenced = sum(chunk.stored for chunk in manifest.chunks)
        exclusive = sum(chunk.stored for chunk in manifest.chunks if users[(chunk.pack, chunk.offset)] == 1)
        files = sum(1 for entry in manifest.entries if entry.kind == _FILE)
        result[key] = Usage(referenced, exclusive, files)
    return result
