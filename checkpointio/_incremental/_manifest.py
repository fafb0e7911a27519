"""The manifest of an incremental checkpoint: what it records (:class:`Manifest`), its bytes
(:func:`encode`, :func:`decode`) and the checks a manifest passes before anything trusts it.

The manifest is a header line (``checkpointio-incremental/1``) and a zlib stream of JSON lines:
a header object (counts, packs), then the chunks (hash, pack, offset, stored and raw length,
codec) and the entries (path, type, mode, mtime, size, inode, chunk indices or link target) in
columns of up to ``BLOCK`` items a line. It is stored like any checkpoint (atomically, with its
CRC32), after every pack it names is stored.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio.to_thread

from .. import _cdc, _engine, _tar
from .._config import TransferConfig
from .._exceptions import CorruptCheckpointError, UnsafeArchiveError
from .._location import Location
from .._stores import Kind, ObjectInfo, Store

#: The manifest's first bytes: what it is, then the version of its layout and a newline.
MAGIC = b"checkpointio-incremental/"
VERSION = 1
_HEADER_LINE = MAGIC + str(VERSION).encode() + b"\n"
#: ``Record.layout`` of a manifest: a load tells the format from the record, with no read.
LAYOUT = "incremental"

#: Hash length in bytes (BLAKE3, truncated: 128 bits).
HASH_BYTES = 16
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

#: Entry types: folder, regular file, symlink, hard link (to a file listed before it).
DIR, FILE, SYMLINK, HARDLINK = "d", "f", "l", "h"

Hash = bytes


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
            if entry.kind == FILE and not chunk_indices.isdisjoint(entry.chunks):
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
            if len(hashes) != count * HASH_BYTES:
                raise ValueError("a block of chunk hashes of the wrong length")
            in_pack = _ints(block["pack"], count, "packs", 0, len(names) - 1)
            offsets = _ints(block["offset"], count, "offsets")
            stored = _ints(block["stored"], count, "stored lengths", 1, _MAX_STORED)
            sizes = _ints(block["size"], count, "lengths", 1, _MAX_CHUNK)
            codecs = _ints(block["codec"], count, "codecs", STORED, DEFLATED)
            for number in range(count):
                pack = names[in_pack[number]]
                chunk = Chunk(
                    hashes[number * HASH_BYTES : (number + 1) * HASH_BYTES],
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
    return len(name) == 2 * HASH_BYTES and all(c in "0123456789abcdef" for c in name)


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
        if kind == FILE:
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
        elif kind not in (DIR, SYMLINK, HARDLINK):
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
        if parent and kinds.get(parent) != DIR:
            raise _unsafe(uri, f"the entry {entry.path!r} is not in a folder listed before it")
        if entry.kind == HARDLINK and kinds.get(entry.link) != FILE:
            raise _unsafe(uri, f"the hard link {entry.path!r} does not point to a file listed before it")
        kinds[entry.path] = entry.kind
    for entry in manifest.entries:
        if entry.kind != SYMLINK:
            continue
        link = entry.link
        way = None if (not link or link.startswith("/") or "\0" in link) else _tar.link_way(entry.path, link)
        if way is None:
            raise _unsafe(uri, f"the symlink {entry.path!r} -> {link!r} points outside the workspace")
        for here in way:
            if kinds.get(here) == SYMLINK:
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


async def is_manifest_object(store: Store, info: ObjectInfo) -> bool:
    """Whether the object is an incremental manifest, as its record says (its first bytes then
    say it again when it is read)."""
    return info.record is not None and info.record.kind is Kind.DIRECTORY and info.record.layout == LAYOUT
