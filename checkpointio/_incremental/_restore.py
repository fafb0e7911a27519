"""Restoring and verifying an incremental checkpoint: the packs' chunks fetched with ranged reads,
several at once, each checked against its hash, and files written as their chunks arrive."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from .. import _engine, _placement, _selection, _tar
from .._concurrency import one_error
from .._config import TransferConfig, codec_workers
from .._exceptions import CheckpointError, CorruptCheckpointError
from .._location import Location
from .._progress import Meter, ProgressCallback, human_size
from .._selection import Selection, roots
from .._stores import ObjectInfo, Store
from .._writes import PIECE, write_all
from . import _chunks
from ._layout import area_of, pack_location
from ._manifest import DIR, FILE, HARDLINK, HASH_BYTES, SYMLINK, Manifest, read_manifest

logger = logging.getLogger(__name__)

#: A restore fetches a pack's chunks in ranges of at most this many bytes, merging chunks less
#: than ``_GAP`` apart into one range.
_SPAN = 8 * 1024 * 1024
_GAP = 256 * 1024


@dataclass
class _Span:
    pack: str
    offset: int
    length: int
    chunks: list[int]


def _spans(manifest: Manifest, wanted: set[int]) -> list[_Span]:
    """The ranges to fetch: per pack, the blocks of the wanted chunks in offset order, merged
    across small gaps (a block is never split: its chunks, in order, are in one span)."""
    by_pack: dict[str, list[int]] = {}
    for index in sorted(wanted):
        by_pack.setdefault(manifest.pack_names[manifest.chunk_pack[index]], []).append(index)
    offsets, within = manifest.offsets, manifest.within
    spans: list[_Span] = []
    for name, indices in by_pack.items():
        indices.sort(key=lambda index: (offsets[index], within[index]))
        current: _Span | None = None
        for index in indices:
            offset, stored = offsets[index], manifest.stored[index]
            end = offset + stored
            if (
                current is not None
                and offset - (current.offset + current.length) <= _GAP
                and end - current.offset <= _SPAN
            ):
                current.length = max(current.length, end - current.offset)
                current.chunks.append(index)
            else:
                current = _Span(name, offset, stored, [index])
                spans.append(current)
    return spans


class _Fetched:
    """What fetching a manifest's chunks found wrong, by pack, to name the files it affects."""

    def __init__(self) -> None:
        self.missing: dict[str, str] = {}  # pack -> why
        self.bad: dict[int, str] = {}  # chunk -> why
        self.lock = threading.Lock()

    def error(self, manifest: Manifest, uri: str) -> CorruptCheckpointError | None:
        if not self.missing and not self.bad:
            return None
        missing = {number for number, name in enumerate(manifest.pack_names) if name in self.missing}
        affected = {index for index, pack in enumerate(manifest.chunk_pack) if pack in missing}
        affected |= set(self.bad)
        named, count = manifest.files_using(affected)
        problems = [f"pack {name} {why}" for name, why in sorted(self.missing.items())]
        bad_packs = sorted({manifest.pack_names[manifest.chunk_pack[index]] for index in self.bad})
        problems += [f"pack {name}: a chunk {self.bad_reason(manifest, name)}" for name in bad_packs]
        more = f" and {count - len(named)} more" if count > len(named) else ""
        return CorruptCheckpointError(
            f"{uri}: {'; '.join(problems[:5])}; it affects {count} file{'s' if count != 1 else ''}: "
            f"{', '.join(named)}{more}",
            uri=uri,
        )

    def bad_reason(self, manifest: Manifest, pack: str) -> str:
        return next(why for index, why in self.bad.items() if manifest.pack_names[manifest.chunk_pack[index]] == pack)


async def _fetch(
    store: Store,
    area: Location,
    manifest: Manifest,
    wanted: set[int],
    config: TransferConfig,
    meter: Meter,
    on_chunks: Callable[[list[tuple[int, bytes | memoryview]]], None],
    uri: str,
    *,
    head_first: bool = False,
) -> None:
    """Fetch the ``wanted`` chunks with ranged reads of their packs, several at once, and hand
    them, checked, to ``on_chunks`` a block at a time, as (chunk index, content) pairs (in worker
    threads; a stored chunk as a view of the range read, valid until ``on_chunks`` returns).
    What is missing or corrupt is collected, then raised as one :class:`CorruptCheckpointError`
    naming the files it affects.

    The packs are read without a HEAD first: the manifest records their sizes, a pack never
    changes once written (it is named by what it holds) and every chunk is checked against its
    hash, so one ranged GET per span is all a pack costs (one file of a large checkpoint: the
    manifest's two requests and one a pack). A read that fails is explained by a HEAD of its
    pack (missing, or of another size than recorded: named with the files it affects; else the
    read's error is raised). ``head_first`` (``verify``): HEAD every pack first, so that a pack
    of another size is named even where the chunks read from it are whole."""
    found = _Fetched()
    spans = await anyio.to_thread.run_sync(_spans, manifest, wanted)  # work per chunk: off the loop
    infos: dict[str, ObjectInfo] = {}
    slots = anyio.Semaphore(max(1, config.max_concurrency))
    explaining = anyio.Lock()
    # as many threads as a tar.gz restore writes on: each gives up the GIL at every system call
    # and must take it back, so more threads than cores only wait for it (measured: 2 beat 4)
    workers = anyio.CapacityLimiter(codec_workers(config))

    async def head(name: str) -> bool:
        """HEAD the pack ``name``: whether it is there with the size the manifest records (if
        not, what is wrong is noted)."""
        info = await _engine.head_for_reads(store, pack_location(area, name), one_of_many=True)  # as the reads
        if info is None:
            found.missing[name] = "is missing"
        elif info.size != manifest.packs[name]:
            found.missing[name] = f"holds {info.size} bytes, the manifest records {manifest.packs[name]}"
        else:
            infos[name] = info
            return True
        return False

    async def head_one(name: str) -> None:
        async with slots:
            await head(name)

    packs = {span.pack for span in spans}
    if head_first:
        with one_error():
            async with anyio.create_task_group() as group:
                for name in packs:
                    group.start_soon(head_one, name)
    else:
        infos.update(
            (name, ObjectInfo(pack_location(area, name), manifest.packs[name], "", pinned=False)) for name in packs
        )

    offsets, stored, sizes, within, codecs = (
        manifest.offsets,
        manifest.stored,
        manifest.sizes,
        manifest.within,
        manifest.codecs,
    )
    hashes, hash_of = memoryview(manifest.hashes), _chunks.hash_of

    def take(span: _Span, data: bytes) -> None:
        view = memoryview(data)
        chunks, count, at = span.chunks, len(span.chunks), 0
        while at < count:  # a block at a time: the run of the span's chunks at one offset
            offset = offsets[chunks[at]]
            end = at + 1
            while end < count and offsets[chunks[end]] == offset:
                end += 1
            start = offset - span.offset
            length = max(within[index] + sizes[index] for index in chunks[at:end])
            try:
                block = _chunks.decode_block(codecs[chunks[at]], view[start : start + stored[chunks[at]]], length)
            except ValueError as error:
                with found.lock:
                    found.bad.update(dict.fromkeys(chunks[at:end], str(error)))
                at = end
                continue
            checked = []
            for index in chunks[at:end]:  # the Python here runs once a chunk: kept to the checks
                content = block[within[index] : within[index] + sizes[index]]
                if len(content) != sizes[index]:
                    why = "lies beyond what its block holds"
                elif hash_of(content) != hashes[index * HASH_BYTES : (index + 1) * HASH_BYTES]:
                    why = "fails its BLAKE3 check"
                else:
                    checked.append((index, content))
                    continue
                with found.lock:
                    found.bad[index] = why
            on_chunks(checked)
            at = end
        meter.advance(len(data))

    async def explained(name: str) -> bool:
        """Whether a failed read of the pack ``name`` is explained (and noted) by what it is now."""
        async with explaining:  # one HEAD for all the spans of a pack that failed
            if name in found.missing:
                return True
            if head_first:
                return False
            try:
                return not await head(name)
            except CheckpointError:
                return False  # the read's own error says more

    async def fetch(span: _Span) -> None:
        async with slots:  # held until the span is written: memory stays bounded by the slots
            if span.pack in found.missing:
                return
            try:
                data = await store.read_range(infos[span.pack], span.offset, span.length)
            except CheckpointError:
                if await explained(span.pack):
                    return
                raise
            await anyio.to_thread.run_sync(take, span, data, limiter=workers)

    with one_error():
        async with anyio.create_task_group() as group:
            for span in spans:
                if span.pack in infos:
                    group.start_soon(fetch, span)
    error = await anyio.to_thread.run_sync(found.error, manifest, uri)
    if error is not None:
        raise error


_WRITE = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = _WRITE | os.O_CREAT | os.O_EXCL


class _Writer:
    """Writes a manifest's files into a staging folder as their chunks arrive, in any order."""

    def __init__(self, manifest: Manifest, folder: int, umask: int | None = None) -> None:
        self.manifest = manifest
        self.folder = folder
        #: What creating a file takes from its mode (``None``: unknown, every file is chmod-ed).
        self.umask = umask
        self.lock = threading.Lock()
        # chunk -> [(entry index, offset in the file)]
        self.uses: dict[int, list[tuple[int, int]]] = {}
        self.remaining: dict[int, int] = {}
        file, sizes = ord(FILE), manifest.sizes
        for number, kind in enumerate(manifest.kinds):
            if kind != file:
                continue
            position = 0
            for index in manifest.chunks_of(number):
                self.uses.setdefault(index, []).append((number, position))
                position += sizes[index]
            self.remaining[number] = manifest.file_sizes[number]

    def prepare(self) -> None:
        """Create the folders, and the files that are empty or need several chunks (a single-chunk
        file is created whole when its chunk arrives)."""
        manifest = self.manifest
        folder, file, first = ord(DIR), ord(FILE), manifest.first
        for number, kind in enumerate(manifest.kinds):
            if kind == folder:
                os.mkdir(manifest.paths[number], 0o700, dir_fd=self.folder)
            elif kind == file and first[number + 1] - first[number] != 1:
                fd = os.open(manifest.paths[number], _CREATE, 0o600, dir_fd=self.folder)
                try:
                    if manifest.file_sizes[number] == 0:
                        self._finish(fd, number)
                finally:
                    os.close(fd)

    def chunks(self, checked: list[tuple[int, bytes | memoryview]]) -> None:
        """Write each checked chunk where its files hold it. A file of one chunk is created whole,
        with its mode (the staging folder is the owner's alone): four system calls where the
        umask takes nothing away (open, write, utime, close), with as little Python around them
        as a tar.gz restore's writers, since this thread needs the GIL back after each."""
        manifest, folder, umask, remaining, uses = self.manifest, self.folder, self.umask, self.remaining, self.uses
        first, paths, modes, mtimes = manifest.first, manifest.paths, manifest.modes, manifest.mtimes
        open_, write, utime, close, fchmod = os.open, os.write, os.utime, os.close, os.fchmod
        file_mode = _tar._file_mode
        for index, data in checked:
            for number, position in uses.get(index, ()):
                if first[number + 1] - first[number] != 1:
                    self._part(number, position, data)
                    continue
                mode = file_mode(modes[number])
                fd = open_(paths[number], _CREATE, mode, dir_fd=folder)
                try:
                    if len(data) > PIECE:
                        write_all(fd, data)
                    elif (written := write(fd, data)) < len(data):
                        write_all(fd, data[written:])
                    if umask is None or mode & umask:
                        fchmod(fd, mode)
                    mtime = mtimes[number]
                    utime(fd, ns=(mtime, mtime))
                finally:
                    close(fd)
                remaining[number] -= len(data)  # this file's alone: no other thread counts it

    def _part(self, number: int, position: int, data: bytes | memoryview) -> None:
        """Write one chunk of the file ``number`` (of several chunks) at ``position``."""
        fd = os.open(self.manifest.paths[number], _WRITE, dir_fd=self.folder)
        try:
            write_all(fd, data, position)
            with self.lock:
                self.remaining[number] -= len(data)
                complete = self.remaining[number] == 0
            if complete:
                self._finish(fd, number)
        finally:
            os.close(fd)

    def _finish(self, fd: int, number: int) -> None:
        mtime = self.manifest.mtimes[number]
        os.fchmod(fd, _tar._file_mode(self.manifest.modes[number]))
        os.utime(fd, ns=(mtime, mtime))

    def finish(self, uri: str) -> None:
        """Links, then folder modes and times (deepest first), once every file is whole."""
        manifest = self.manifest
        short = [manifest.paths[n] for n, left in self.remaining.items() if left != 0]
        if short:
            raise CorruptCheckpointError(f"{uri}: {short[0]!r} was not restored whole", uri=uri)
        symlink, hardlink, folder = ord(SYMLINK), ord(HARDLINK), ord(DIR)
        for number, link in manifest.links.items():
            path, kind = manifest.paths[number], manifest.kinds[number]
            if kind == symlink:
                os.symlink(link, path, dir_fd=self.folder)
            elif kind == hardlink:
                os.link(link, path, src_dir_fd=self.folder, dst_dir_fd=self.folder, follow_symlinks=False)
        for number in reversed(range(manifest.entry_count)):
            if manifest.kinds[number] == folder:
                path, mtime = manifest.paths[number], manifest.mtimes[number]
                os.chmod(path, manifest.modes[number] & 0o755 | 0o700, dir_fd=self.folder)
                os.utime(path, ns=(mtime, mtime), dir_fd=self.folder, follow_symlinks=False)


def _wanted(manifest: Manifest) -> set[int]:
    return set(manifest.used)


def _select(manifest: Manifest, only: Selection, uri: str) -> tuple[Manifest, list[str]]:
    """The part of ``manifest`` a partial restore writes (the entries ``only`` picks, the file a
    picked hard link needs, the folders holding them) and the paths it then presents."""
    picked = {path for path in manifest.paths if only.matches(path)}
    hardlink = ord(HARDLINK)
    picked |= {
        link
        for number, link in manifest.links.items()
        if manifest.kinds[number] == hardlink and manifest.paths[number] in picked
    }
    only.check_all_used(uri)
    needed = set(picked)
    for path in picked:
        parts = path.split("/")
        needed.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    chosen = (number for number, path in enumerate(manifest.paths) if path in needed)
    return manifest.selected(chosen), roots(picked)


async def list_entries(
    store: Store, info: ObjectInfo, config: TransferConfig, each: Callable[[_selection.Entry], None]
) -> None:
    """Give each entry of the incremental checkpoint ``info`` to ``each`` (in a worker thread), from
    its manifest alone (``ls --contents``)."""
    manifest = await read_manifest(store, info.location, config, info=info)
    if manifest is None:
        raise CheckpointError(f"{info.location.uri}: replaced while being read", uri=info.location.uri)
    kinds = {DIR: "dir", FILE: "file", SYMLINK: "symlink", HARDLINK: "hardlink"}

    def give() -> None:
        file = ord(FILE)
        for number, path in enumerate(manifest.paths):
            kind = manifest.kinds[number]
            size = manifest.file_sizes[number] if kind == file else 0
            mtime = manifest.mtimes[number] // 1_000_000_000
            link = manifest.links.get(number, "")
            each(_selection.Entry(path, kinds[chr(kind)], size, mtime, manifest.modes[number], link))

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
    whole = await read_manifest(store, location, config, info=info)
    if whole is None:
        raise CheckpointError(f"{uri}: replaced while being read", uri=uri)
    manifest = whole
    presented: list[str] | None = None
    if only is not None:  # this and what follows is work per entry or chunk: off the loop
        manifest, presented = await anyio.to_thread.run_sync(_select, manifest, only, uri)
    total = await anyio.to_thread.run_sync(lambda: sum(manifest.file_sizes))
    meter = Meter(on_progress, "load", uri, manifest.stored_size())
    await anyio.to_thread.run_sync(_placement.make_workspace, workspace, uri)
    staging = await anyio.to_thread.run_sync(_placement.StagingFolder, workspace, uri)
    try:
        folder = await anyio.to_thread.run_sync(
            lambda: os.open(staging.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        )
        try:
            umask = await anyio.to_thread.run_sync(_tar._creation_umask, str(staging.path))
            writer = await anyio.to_thread.run_sync(_Writer, manifest, folder, umask)
            await anyio.to_thread.run_sync(writer.prepare)
            wanted = await anyio.to_thread.run_sync(_wanted, manifest)
            await _fetch(store, area_of(location), manifest, wanted, config, meter, writer.chunks, uri)
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
        manifest.entry_count,
        human_size(total),
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
    manifest = await read_manifest(store, location, config, info=info)
    if manifest is None:
        raise CheckpointError(f"{location.uri}: replaced while being read", uri=location.uri)
    meter = Meter(on_progress, "verify", location.uri, manifest.stored_size())

    def ignore(checked: list[tuple[int, bytes | memoryview]]) -> None:
        pass

    every = await anyio.to_thread.run_sync(set, range(manifest.chunk_count))
    await _fetch(store, area_of(location), manifest, every, config, meter, ignore, location.uri, head_first=True)
    if meter.reporting:
        await anyio.to_thread.run_sync(meter.finish)
    return manifest
