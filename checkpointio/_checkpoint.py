"""The public face: :class:`Checkpoint` (async methods and their sync twins) and ``latest_checkpoint``."""

from __future__ import annotations

import errno
import fnmatch
import functools
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from typing_extensions import Unpack

from . import _engine, _incremental, _placement, _portal, _snapshot
from ._background import InFlight, SaveHandle
from ._config import TransferConfig, TransferOptions
from ._exceptions import AccessDeniedError, CheckpointError, CorruptCheckpointError
from ._location import Location, checkpoint_location
from ._pending import awaitable
from ._progress import ProgressCallback
from ._selection import Entry, Selection
from ._stores import Store, open_store
from ._stores._local import refuse_replacing

__all__ = ["Checkpoint", "SaveHandle", "latest_checkpoint"]

logger = logging.getLogger(__name__)

URI = str | os.PathLike[str]
T = TypeVar("T")


class Checkpoint:
    """Saves this attempt's progress and restores the previous attempt's.

    Args:
        dest: Where this attempt saves: a local path, ``file://...``, ``s3://bucket/key`` or
            ``memory://name``.
        src: Where the previous attempt saved, or ``None`` on a first attempt. A sequence of URIs
            (newest first) is tried in order: a missing one is skipped, and a corrupt one is
            reported in the log and the next older one used, so one bad upload does not fail every
            retry.
        workspace: Local folder that ``load()`` restores into (``cp.path``). By default a new
            temporary folder, removed by ``close()`` / leaving a ``with`` block, or else at
            interpreter exit.
        config: Transfer settings; ``**options`` override single fields of it, e.g.
            ``part_size=32 * MiB`` or ``endpoint_url="http://127.0.0.1:9000"``.
        incremental: Save directories as incremental checkpoints (docs/incremental.md): a manifest
            of content-defined chunks kept in packs shared by the checkpoints of its folder, so a
            save uploads only what changed since ``dest``'s previous checkpoint and the one
            ``load()`` restored (or the newest of ``src``). Bytes and single files are saved as
            usual. Loads recognise either format by themselves.
        on_progress: Called with a :class:`Progress` as the bytes of each ``load()`` and
            ``save()`` flow, and once more when one finished. It runs in the transfer's worker
            thread, never on the event loop; it should be quick (a progress bar, a log line).
            Not a transfer setting (``TransferConfig`` holds values, not observers), so it is
            given here or per ``save()`` call.

    Example::

        async with Checkpoint("s3://bucket/run/attempt-1", src="s3://bucket/run/attempt-0") as cp:
            prev = await cp.load()          # None, a restored folder, or cp.path / "payload"
            await cp.save(b"step=42")
    """

    def __init__(
        self,
        dest: URI,
        src: URI | Sequence[URI] | None = None,
        *,
        workspace: str | os.PathLike[str] | None = None,
        config: TransferConfig | None = None,
        on_progress: ProgressCallback | None = None,
        incremental: bool = False,
        **options: Unpack[TransferOptions],
    ) -> None:
        self._dest: Location = checkpoint_location(dest)
        self._incremental = incremental
        #: The source ``load()`` restored from: the parent an incremental save deduplicates against.
        self._restored_from: Location | None = None
        if src is None:
            sources: Sequence[URI] = ()
        elif isinstance(src, str | os.PathLike) or not isinstance(src, Iterable) or isinstance(src, bytes | bytearray):
            sources = (src,)  # one URI; anything else but a sequence of them is refused as one
        else:
            sources = src
        self._sources: tuple[Location, ...] = tuple(checkpoint_location(uri) for uri in sources)
        self._config = (config or TransferConfig()).with_options(**options)
        self._on_progress = on_progress
        self._workspace = Path(workspace).absolute() if workspace is not None else None
        self._owns_workspace = workspace is None
        self._loaded = False
        self._restored: Path | None = None
        #: What this checkpoint's loads put in the workspace (relative paths): theirs to replace.
        self._placed: set[str] = set()
        self._inflight = InFlight()
        #: The manifest of this checkpoint's last incremental save: the next one's parent, while
        #: ``dest`` still holds exactly that object (else it is read from the store).
        self._written: _incremental.Written | None = None

    def __repr__(self) -> str:
        return f"Checkpoint(dest={self._dest.uri!r}, src={self.src!r})"

    @property
    def dest(self) -> str:
        """The URI this attempt saves to."""
        return self._dest.uri

    @property
    def src(self) -> str | None:
        """The URI the previous attempt saved to (the newest, when there are several), if any."""
        return self._sources[0].uri if self._sources else None

    @property
    def sources(self) -> tuple[str, ...]:
        """Every URI ``load()`` may restore from, newest first."""
        return tuple(location.uri for location in self._sources)

    @property
    def config(self) -> TransferConfig:
        """The transfer settings in force."""
        return self._config

    @property
    def path(self) -> Path:
        """The local workspace that ``load()`` restores into, created on first use.

        A temporary one lives until ``close()`` or, if the checkpoint is never closed, interpreter
        exit: keep the ``Checkpoint`` open (or pass ``workspace=``) while you use what it restored.
        """
        if self._workspace is None:
            self._workspace = _placement.temporary_workspace()
        return self._workspace

    async def _store(self, location: Location) -> Store:
        return await open_store(location.scheme, self._config)

    @awaitable("cp.load", "cp.load_sync")
    async def load(self, only: Sequence[str] | None = None, *, force: bool = False) -> Path | None:
        """Restore the previous attempt's checkpoint into ``cp.path``.

        A restore never replaces what it did not put in the workspace itself: an entry of the
        checkpoint whose name (or path, with ``only``) is already taken there by something no
        load restored and no save of the workspace took (your files in a ``workspace=`` of your
        choice, such as ``"."``; a record beside the workspace, ``.<name>.checkpointio-restored``,
        lists what loads and saves did, for later processes too) is a ``DestinationError`` naming them, and nothing is
        changed; ``force=True`` replaces them. The check comes when the verified restore is put
        in place, after the download. The default workspace, a new temporary folder, holds
        nothing of yours.

        Args:
            only: Glob patterns (``["model/*.pt", "config.json"]``): restore just the entries of a
                directory checkpoint they match, each at its path under ``cp.path`` (the folders
                they are in created as needed; other files there are left alone). ``*``, ``?`` and
                ``[...]`` match within one path part, a ``**`` part any number of parts, and a
                pattern naming a folder takes everything in it; a selected hard link brings the
                file it links to. Through the archive's table of contents only those entries'
                bytes are downloaded; an archive without one (another tool's, or an older
                version's) is streamed whole. Each call with ``only`` restores again.
            force: Replace entries of the workspace that this ``Checkpoint`` did not restore.

        Returns:
            ``None`` if there is no previous checkpoint; the restored root (``cp.path``) for a
            saved directory; ``cp.path / "payload"`` for saved bytes or a saved file. A second
            call returns the same path without downloading again.

        Raises:
            CorruptCheckpointError: The stored checkpoint is truncated, garbled or unsafe.
            StoreError: The store failed; never reported as "no checkpoint".
            CheckpointError: The checkpoint is a distributed one (``checkpointio.dcp.load``
                restores it); with ``only``: a pattern matches no entry, or the checkpoint holds
                bytes or a single file.
            ValueError: A pattern is empty, absolute or holds ``..``.
            DestinationError: The restore would replace entries of the workspace this
                ``Checkpoint`` did not restore (without ``force``); nothing was changed.
        """
        guard = _placement.WorkspaceGuard(self.path, force, self._placed, recorded=not self._owns_workspace)
        token = _placement.guarded.set(guard)
        try:
            return await self._load(only)
        finally:
            _placement.guarded.reset(token)

    async def _load(self, only: Sequence[str] | None) -> Path | None:
        if only is not None:
            patterns = Selection(only).patterns  # a bad pattern refused before anything is read; an iterator read once

            async def restore_selected(store: Store, location: Location) -> Path | None:
                selection = Selection(patterns)  # per source: it notes which patterns matched
                return await _engine.load(store, location, self.path, self._config, self._on_progress, only=selection)

            return await self._first_valid(restore_selected)
        if not self._loaded:
            self._restored = await self._load_first_valid()
            self._loaded = True
        return self._restored

    @awaitable("cp.contents", "cp.contents_sync")
    async def contents(self) -> list[Entry] | None:
        """List the entries of the previous attempt's directory checkpoint without restoring it.

        The checkpoint is the one ``load()`` would restore (missing and corrupt sources skipped
        the same way). A checkpoint with a table of contents (every directory this version
        saves) or an incremental one is listed from it: a few small reads, whatever its size. An
        archive without one (another tool's, an older version's) is read whole, under the
        extraction rules of a restore. Nothing is written.

        Returns:
            ``None`` if there is no previous checkpoint; else every :class:`Entry` (path, kind,
            size, mtime, mode, link) in archive order, folders included.

        Raises:
            CheckpointError: The checkpoint holds bytes or a single file, not a directory, or is a
                distributed one.
            CorruptCheckpointError: Its table of contents or archive is damaged, or an entry is
                unsafe (:class:`UnsafeArchiveError`), in every source.
            StoreError: The store failed; never reported as "no checkpoint".
        """

        async def listing(store: Store, location: Location) -> list[Entry] | None:
            entries: list[Entry] = []
            found = await _engine.list_contents(store, location, self._config, entries.append)
            return None if found is None else entries

        return await self._first_valid(listing)

    @awaitable("cp.load_bytes", "cp.load_bytes_sync")
    async def load_bytes(self) -> bytearray | None:
        """Read the previous attempt's bytes or single-file checkpoint into memory.

        Nothing is written to disk (``load()`` writes ``cp.path / "payload"``, which a caller
        wanting the bytes then reads again): for state that lives in memory anyway, such as a
        pickled or ``torch.save``-d object, this is one pass instead of two. Each call downloads
        again; the result is not kept.

        Returns:
            ``None`` if there is no previous checkpoint, else its bytes (a ``bytearray``: filled in
            place, so there is no second copy).

        Raises:
            CheckpointError: The checkpoint is a directory (restore it with :meth:`load`) or a
                distributed one (``checkpointio.dcp.load`` restores it).
            CorruptCheckpointError: The stored bytes are truncated or fail their checksum.
            StoreError: The store failed; never reported as "no checkpoint".
        """

        async def read(store: Store, location: Location) -> bytearray | None:
            return await _engine.load_bytes(store, location, self._config, self._on_progress)

        return await self._first_valid(read)

    async def _load_first_valid(self) -> Path | None:
        async def restore(store: Store, location: Location) -> Path | None:
            restored = await _engine.load(store, location, self.path, self._config, self._on_progress)
            if restored is not None:
                self._restored_from = location
            return restored

        return await self._first_valid(restore)

    async def _first_valid(self, load: Callable[[Store, Location], Awaitable[T | None]]) -> T | None:
        """``load`` from the newest source that holds a checkpoint, skipping corrupt ones."""
        errors: list[CorruptCheckpointError] = []
        for location in self._sources:
            try:
                restored = await load(await self._store(location), location)
            except CorruptCheckpointError as error:
                errors.append(error)
                said = str(error) if location.uri in str(error) else f"{location.uri}: {error}"
                logger.warning("skipping corrupt checkpoint %s", said)
                continue
            if restored is not None:
                if errors:
                    logger.warning("restored the older checkpoint %s instead", location.uri)
                return restored
        if errors:
            raise errors[0]
        return None

    @awaitable("cp.save", "cp.save_sync")
    async def save(
        self,
        data: _engine.SaveData,
        *,
        wait: bool = True,
        supersede: bool = False,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
        **options: Unpack[TransferOptions],
    ) -> SaveHandle:
        """Save ``data`` to ``dest``, replacing what was there only once it is complete.

        Args:
            data: ``bytes`` (stored as one object), a path to a file (stored as is), a path to
                a directory (stored as a .tar.gz of its contents, streamed, never via a
                temporary archive) or a binary file object such as ``sys.stdin.buffer`` (read
                to its end, streamed, stored as bytes).
            on_progress: For this call, instead of the checkpoint's ``on_progress``.
            wait: ``False`` returns as soon as ``data`` is snapshotted (bytes kept, files
                hard-linked or copied, see below) and uploads it in the background on
                checkpointio's event-loop thread; the returned handle tells when it is stored.
                The caller may change or delete ``data`` right after the call.
            supersede: What to do with a background save of this checkpoint still running: by
                default wait for it to finish (at most one is ever in flight, which also keeps
                memory and scratch space bounded); ``True`` cancels it (its upload is aborted, the
                store keeps what it had) and starts this one at once.
            force: Replace a local file at ``dest`` that checkpointio did not write (one without
                its record, ``.<name>.checkpointio``), as ``checkpointio save --force`` does. By
                default such a file is refused before anything is read or written: it is a user's
                file (``Checkpoint("train.py")``), not a checkpoint. A checkpoint checkpointio
                wrote is always replaced (atomically), with or without ``force``.
            **options: Transfer settings for this call only (e.g. ``compression_level=0``).

        Returns:
            A :class:`SaveHandle`; with ``wait=True`` it is already done.

        Snapshots: a directory becomes a shadow tree of hard links in a scratch folder on the
        same filesystem (copies where linking is impossible). Files the caller *replaces* after
        the call (a new name, write-then-rename, delete) do not affect the save, which is what
        ``torch.save`` to a new path, Lightning and Hugging Face do. A file rewritten *in place*
        before the upload read it would change the linked copy too: its size and mtime are
        checked before the commit, and the save fails with ``SourceChangedError`` instead of
        storing a mix of old and new bytes.

        Raises:
            SourceNotFoundError: The path does not exist.
            SourceChangedError: A file shrank while it was read or vanished, an entry (a folder
                swapped for a symlink, say) was replaced since it was listed, or (background save)
                a linked file was rewritten in place; nothing is stored, the previous checkpoint
                stays.
            UnsupportedSourceError: The tree holds something a restore would refuse (a symlink
                pointing outside it), or the path is neither a file nor a directory (a FIFO).
            SourceUnreadableError: A file or folder of it cannot be read (permission denied).
            BackgroundSaveError: An earlier background save of this checkpoint failed and its
                error had not been retrieved (this save was not started).
            DestinationError: ``dest`` is a local folder, or a local file checkpointio did not
                write (without ``force``); nothing was read or written.
            TypeError: ``data`` is of another type, or ``wait``, ``supersede`` or ``force`` is
                not a bool.
        """
        for flag, value in (("wait", wait), ("supersede", supersede), ("force", force)):
            if not isinstance(value, bool):  # "no" would be true: a background save nobody asked for
                raise TypeError(f"{flag} must be True or False, got {type(value).__name__} {value!r}")
        config = self._config.with_options(**options)
        callback = on_progress or self._on_progress
        if not force and self._dest.scheme == "file":  # the store refuses it too, but only once it is reached
            await anyio.to_thread.run_sync(refuse_replacing, self._dest)
        if not self._owns_workspace and isinstance(data, str | os.PathLike) and self._workspace is not None:
            await anyio.to_thread.run_sync(_placement.record_saved, self._workspace, Path(data))
        if wait:
            await self._inflight.wait_for_it(supersede)
            store = await open_store(self._dest.scheme, config)
            if await self._is_incremental(data):
                self._written = await _incremental.save(
                    store,
                    self._dest,
                    Path(data),  # type: ignore[arg-type]
                    config,
                    callback,
                    parents=self._parents(),
                    last=self._written,
                    force=force,
                )
            else:
                await _engine.save(store, self._dest, data, config, callback, force=force)
            return SaveHandle(self.dest)
        own = functools.partial(_engine.store_files_in, self._dest)
        snapshot = await anyio.to_thread.run_sync(functools.partial(_snapshot.take, data, skip=own))
        try:
            await self._inflight.wait_for_it(supersede)
        except BaseException:
            await anyio.to_thread.run_sync(snapshot.discard)
            raise
        return await self._inflight.start(self._save_snapshot, self.dest, snapshot, config, callback, force)

    async def _save_written(self, writer: _engine.Writer, **options: Unpack[TransferOptions]) -> None:
        """Save what ``writer`` writes into a file object (in a worker thread), streamed, as a file."""
        config = self._config.with_options(**options)
        await self._inflight.wait_for_it(False)
        store = await open_store(self._dest.scheme, config)
        await _engine.save_written(store, self._dest, writer, config, self._on_progress)

    async def _save_snapshot(
        self,
        snapshot: _snapshot.Snapshot,
        config: TransferConfig,
        on_progress: ProgressCallback | None,
        force: bool = False,
    ) -> None:
        try:
            store = await open_store(self._dest.scheme, config)
            if await self._is_incremental(snapshot.data):
                self._written = await _incremental.save(
                    store,
                    self._dest,
                    Path(snapshot.data),  # type: ignore[arg-type]
                    config,
                    on_progress,
                    parents=self._parents(),
                    check=snapshot.check_unchanged,
                    shown=snapshot.source,
                    last=self._written,
                    hard_links=snapshot.hard_links if snapshot.linked else None,
                    force=force,
                )
                return
            await _engine.save(
                store,
                self._dest,
                snapshot.data,
                config,
                on_progress,
                check=snapshot.check_unchanged,
                shown=snapshot.source,
                force=force,
            )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(snapshot.discard)

    async def _is_incremental(self, data: object) -> bool:
        """Whether this save is an incremental one: asked for, and of a directory."""
        if not self._incremental or not isinstance(data, str | os.PathLike):
            return False
        return await anyio.to_thread.run_sync(os.path.isdir, data)

    def _parents(self) -> list[Location]:
        """What an incremental save deduplicates against besides ``dest``'s previous checkpoint:
        the checkpoint ``load()`` restored, else every source (the first incremental one found counts)."""
        if self._restored_from is not None:
            return [self._restored_from]
        return list(self._sources)

    @property
    def pending(self) -> SaveHandle | None:
        """The last background save, until a later save, ``wait()`` or ``close()`` settled it."""
        return self._inflight.handle

    @awaitable("cp.wait", "cp.wait_sync")
    async def wait(self) -> None:
        """Wait for the background save in flight, if any.

        Raises:
            BackgroundSaveError: It failed (or an earlier one did) and the error had not been
                retrieved from its handle.
        """
        await self._inflight.wait_for_it(False)

    @awaitable("cp.prev_exists", "cp.prev_exists_sync")
    async def prev_exists(self) -> bool:
        """Whether the previous attempt left a checkpoint to restore."""
        for location in self._sources:
            if await (await self._store(location)).head(location) is not None:
                return True
        return False

    def load_sync(self, only: Sequence[str] | None = None, *, force: bool = False) -> Path | None:
        """Blocking twin of :meth:`load`."""
        return _portal.run_sync(self.load, only, force=force)

    def contents_sync(self) -> list[Entry] | None:
        """Blocking twin of :meth:`contents`."""
        return _portal.run_sync(self.contents)

    def load_bytes_sync(self) -> bytearray | None:
        """Blocking twin of :meth:`load_bytes`."""
        return _portal.run_sync(self.load_bytes)

    def save_sync(
        self,
        data: _engine.SaveData,
        *,
        wait: bool = True,
        supersede: bool = False,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
        **options: Unpack[TransferOptions],
    ) -> SaveHandle:
        """Blocking twin of :meth:`save` (with ``wait=False`` it returns once ``data`` is snapshotted)."""
        return _portal.run_sync(
            self.save, data, wait=wait, supersede=supersede, force=force, on_progress=on_progress, **options
        )

    def wait_sync(self) -> None:
        """Blocking twin of :meth:`wait`."""
        return _portal.run_sync(self.wait)

    def prev_exists_sync(self) -> bool:
        """Blocking twin of :meth:`prev_exists`."""
        return _portal.run_sync(self.prev_exists)

    def close(self, timeout: float | None = None) -> None:
        """Wait for a background save in flight, then remove the workspace if this checkpoint made it.

        Args:
            timeout: Wait at most this many seconds for the background save; one still running
                then is cancelled (its upload aborted; the store keeps the previous checkpoint).

        Raises:
            BackgroundSaveError: The background save failed and its error had not been retrieved.
        """
        error = self._inflight.close(timeout)
        if self._owns_workspace and self._workspace is not None:
            _placement.discard_workspace(self._workspace)  # not a forked child's: its parent's
            self._workspace = None
            self._placed.clear()
        self._loaded = False
        self._restored = None
        self._written = None
        if error is not None:
            raise error

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Checkpoint:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await anyio.to_thread.run_sync(self.close)


_DIGITS = re.compile(r"(\d+)")


def _natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """``step_10`` after ``step_9``: digit runs compare as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(text) if part)


def latest_checkpoint(
    root: str | os.PathLike[str] | None,
    pattern: str = "**/last.ckpt",
    *,
    key: Callable[[Path], Any] | None = None,
) -> Path | None:
    """The newest file under ``root`` matching the glob ``pattern``, or ``None``.

    Newest means latest modification time; files with the same time are ordered by a natural
    sort of their path, so ``epoch_10.pt`` beats ``epoch_9.pt``. Pass ``key`` to order otherwise
    (the maximum wins). ``root`` may be ``None`` (as ``load()`` returns on a first attempt) or a
    file, which is returned if its name matches.

    Raises:
        AccessDeniedError: ``root``, or a folder under it that ``pattern`` looks into (``run-*``
            of ``run-*/*.pt``, every folder with ``**``), cannot be read, or a folder on the path
            to ``root`` cannot be searched: it may hold the newest checkpoint, so "none" would be
            a guess.
        CheckpointError: Another error looking at them (the error named).
        ValueError: ``pattern`` is empty, absolute or holds a ``..`` part: it would reach files
            that are not under ``root`` (checked even when ``root`` is ``None``).
        TypeError: ``pattern`` is not a ``str``.
    """
    _check_pattern(pattern, root)
    if root is None:
        return None
    base = Path(root)
    try:
        mode = _placement.existing_mode(base)
        if mode is not None and stat.S_ISREG(mode):
            return base if base.match(pattern.rsplit("/", 1)[-1]) else None
        if mode is None or not stat.S_ISDIR(mode):
            return None
        _check_listable(base, pattern)
        candidates = [path for path in base.glob(pattern) if _is_file(path)]
        if not candidates:
            return None
        if key is None:

            def default_key(path: Path) -> tuple[int, tuple[tuple[int, int | str], ...]]:
                return path.stat().st_mtime_ns, _natural_key(path.relative_to(base).as_posix())

            return max(candidates, key=default_key)
    except CheckpointError:  # an AccessDeniedError is a PermissionError too: raised as it is
        raise
    except OSError as error:  # root's path not searchable, a file that went while it was looked at
        raise _unlistable(error, base) from error
    return max(candidates, key=key)


def _check_pattern(pattern: object, root: str | os.PathLike[str] | None) -> None:
    """Refuse a ``latest_checkpoint`` pattern that is not a relative glob under ``root``."""
    if not isinstance(pattern, str):
        raise TypeError(
            f"latest_checkpoint: pattern must be a str glob such as '**/last.ckpt', got {type(pattern).__name__}"
        )
    if not pattern or pattern.startswith("/") or ".." in pattern.split("/"):
        where = os.fspath(Path(root)) if root is not None else "root"
        raise ValueError(
            f"latest_checkpoint: pattern {pattern!r} must be a relative glob of files under {where} "
            "(not empty, not absolute, no '..')"
        )


def _unlistable(error: OSError, base: Path, folder: str | None = None) -> CheckpointError:
    """What an ``OSError`` met looking for the latest checkpoint under ``base`` (in ``folder``) is:
    the checkpoint there is unknown, and "none" would make a task start over.
    :class:`AccessDeniedError` for a permission denied, else :class:`CheckpointError`."""
    shown = folder or error.filename or base
    message = f"{shown}: cannot list it to find the latest checkpoint: {error.strerror or error}"
    if isinstance(error, PermissionError):
        return AccessDeniedError(message, uri=str(shown))
    return CheckpointError(message, uri=str(shown))


#: Errors that ``Path.glob`` takes for "no folder here" (nothing there, a file, a symlink loop);
#: any other means the folder may hold checkpoints that cannot be seen.
_NO_FOLDER = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def _check_listable(base: Path, pattern: str) -> None:
    """Raise if a folder ``Path.glob(pattern)`` looks into cannot be read: it skips such folders,
    and a run folder that only looks empty makes a task start over.

    ``base`` is listed; below it, the folders the pattern reaches are followed part by part as
    ``Path.glob`` does: listed where a wildcard is matched against their entries (every folder
    under them for ``**``), searched where a literal name is looked up in them.
    """

    def fail(error: OSError, folder: str | None = None) -> None:
        if error.errno in _NO_FOLDER:
            return  # gone while listed, or a symlink loop: it holds nothing
        raise _unlistable(error, base, folder) from error

    try:
        os.scandir(base).close()
    except OSError as error:
        fail(error)
    folders = [str(base)]
    for part in pattern.split("/"):
        if part in ("", "."):
            continue
        reached: list[str] = []
        for folder in folders:
            if part == "**":  # the folder and every folder under it, symlinks not followed
                reached.extend(dirpath for dirpath, _, _ in os.walk(folder, onerror=fail))
            elif "*" in part or "?" in part or "[" in part:
                try:
                    with os.scandir(folder) as entries:
                        matched = [entry for entry in entries if fnmatch.fnmatchcase(entry.name, part)]
                except OSError as error:
                    fail(error, folder)
                    continue
                for entry in matched:
                    try:
                        if entry.is_dir():  # a symlink is followed, as Path.glob does
                            reached.append(entry.path)
                    except OSError as error:  # a symlink into a folder that may not be searched
                        fail(error, entry.path)
            else:
                try:
                    if stat.S_ISDIR(os.stat(os.path.join(folder, part)).st_mode):
                        reached.append(os.path.join(folder, part))
                except PermissionError as error:  # ``folder`` may not be searched
                    fail(error, folder)
                except OSError as error:
                    fail(error, os.path.join(folder, part))
        folders = reached


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file (or a symlink to one); an error other than "nothing there" is raised."""
    mode = _placement.existing_mode(path)
    return mode is not None and stat.S_ISREG(mode)
