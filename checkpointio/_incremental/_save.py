"""Saving a tree as an incremental checkpoint: unchanged files taken from the parents' manifests
without reading them, changed ones cut into chunks, new chunks packed and uploaded, the manifest
written last."""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread

from .. import _archive, _codec, _engine
from .._concurrency import one_error
from .._config import TransferConfig
from .._exceptions import CheckpointError, CorruptCheckpointError, SourceChangedError
from .._location import Location
from .._progress import Meter, ProgressCallback, human_size
from .._stores import Kind, Store
from . import _chunks
from ._layout import AREA, area_of, pack_location
from ._leases import LEASE_TTL, Lease
from ._manifest import DIR, FILE, HARDLINK, LAYOUT, SYMLINK, Chunk, Entry, Hash, Manifest, encode, read_manifest

logger = logging.getLogger(__name__)

#: A pack's first line: what it is and the save that wrote it, so that two saves never write the
#: same pack name (gc may be deleting an unreferenced pack of that name; see :func:`._gc.collect_area`).
_PACK_MAGIC = b"checkpointio-pack/1 "
#: A pack is uploaded once it holds this many bytes: tens of MiB, few requests, parallel parts.
PACK_SIZE = 32 * 1024 * 1024
#: Chunks are encoded (hashed, compressed) on the pool in batches of about this many bytes or chunks.
_BATCH_BYTES = 2 * 1024 * 1024
_BATCH_CHUNKS = 512


def _new_save_id() -> str:
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"


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
            if entry.kind == FILE and entry.path not in self.files:
                self.files[entry.path] = (
                    entry.size,
                    entry.mtime_ns,
                    entry.inode,
                    [manifest.chunks[index] for index in entry.chunks],
                )


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
        return _chunks.encode(data, self.level, self.known)

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
        name = _chunks.hash_of(data).hex()
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
                    self._append(Entry(rel, DIR, mode, mtime))
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        target = os.readlink(item.name, dir_fd=item.folder)
                    except FileNotFoundError as error:
                        raise SourceChangedError(
                            f"{full} disappeared while {self.uri} was being saved", uri=self.uri
                        ) from error
                    _archive._check_link(str(self.root), rel, target, self.uri)
                    self._append(Entry(rel, SYMLINK, mode, mtime, link=target))
                elif stat.S_ISREG(st.st_mode):
                    inode = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and inode in links:
                        self._append(Entry(rel, HARDLINK, mode, mtime, link=links[inode]))
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
        entry = Entry(item.rel, FILE, mode, st.st_mtime_ns, st.st_size, st.st_ino)
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
            for piece in _chunks.pieces(fd, st.st_size, full, self.uri, self._read):
                self._queue(chunks, piece)
        finally:
            os.close(fd)

    def _read(self, length: int) -> None:
        self.meter.read(length)
        self.read_bytes += length


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
    lease = Lease(store, area, save_id, config)
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
    lease: Lease,
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
        if entry.kind != FILE:
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
