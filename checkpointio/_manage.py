"""Operations on stored checkpoints by URI, for the command line: list, remove, verify, restore to a
path, and collect what unfinished saves left behind.

Each is one async function over the engine and the stores; the CLI only parses, reports progress
and prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from bisect import bisect_left as _bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from . import _dcp_layout, _engine, _incremental, _placement
from ._concurrency import one_error
from ._config import TransferConfig
from ._exceptions import (
    AccessDeniedError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DestinationError,
)
from ._location import Location, checkpoint_location, parse_prefix
from ._progress import ProgressCallback
from ._selection import Entry, Selection
from ._stores import ObjectInfo, PendingWrite, Store, open_store
from ._stores._local import file_in_the_way, is_foreign

__all__ = [
    "Distributed",
    "Removal",
    "StoredRun",
    "collect_distributed",
    "collect_garbage",
    "distributed_among",
    "distributed_summary",
    "delete_run",
    "find_runs",
    "list_checkpoints",
    "parse_prefix",
    "prune_runs",
    "refuse_sweeping",
    "remove",
    "remove_under",
    "restore",
    "verify",
    "verify_distributed",
    "write_out",
]

logger = logging.getLogger(__name__)

#: HEADs in flight at once when a listing lacks the records (S3 lists no metadata).
_HEADS_AT_ONCE = 16


async def list_checkpoints(prefix: str, config: TransferConfig, unread: set[str] | None = None) -> list[ObjectInfo]:
    """The objects under ``prefix`` with their records (kind, size, CRC32) where they have one and
    the credentials may read them; the keys of those whose record they may not read are added to
    ``unread``."""
    location = parse_prefix(prefix)
    store = await open_store(location.scheme, config)
    infos = await store.list(location)
    slots = anyio.Semaphore(_HEADS_AT_ONCE)
    full: list[ObjectInfo | None] = list(infos)

    async def head(index: int, info: ObjectInfo) -> None:
        async with slots:
            try:
                found = await store.head(info.location)
            except AccessDeniedError:  # may list, not read (only s3:ListBucket): the row as listed, kind unknown
                if unread is not None:
                    unread.add(info.location.key)
                return
        full[index] = found  # None: removed since it was listed

    with one_error():  # one failed HEAD: its StoreError, not an exception group
        async with anyio.create_task_group() as group:
            for index, info in enumerate(infos):
                if info.record is None and location.scheme == "s3":
                    group.start_soon(head, index, info)
    return [info for info in full if info is not None]


@dataclass(frozen=True)
class Distributed:
    """A distributed (``checkpointio.dcp``) checkpoint found in a listing.

    Attributes:
        manifest: The object at its URI.
        summary: What its manifest says (save id, world size, data objects); ``None`` where the
            credentials may list and not read it (known by its data objects listed).
        listed: The bytes of the data objects listed under it (every save's), for a ``summary``
            unknown.
        saves: How many saves' data objects ``size`` counts: the committed save's alone where
            the manifest was read; else every save whose data is listed (only one of them is the
            one the manifest commits: the others are unfinished, or being committed).
    """

    manifest: ObjectInfo
    summary: _dcp_layout.Summary | None
    listed: int = 0
    saves: int = 1

    @property
    def size(self) -> int:
        """The manifest's and the committed data objects' bytes (unread: every listed data
        object's, of :attr:`saves` saves)."""
        return self.manifest.size + (self.summary.data_size if self.summary is not None else self.listed)


async def distributed_among(
    infos: list[ObjectInfo], config: TransferConfig, *, unreadable: bool = False
) -> dict[str, Distributed]:
    """The distributed checkpoints among ``infos`` (a listing), by key: the objects that have data
    objects listed under ``<key>.dcp/`` and hold a manifest (only those are read).

    ``unreadable``: a manifest the credentials may not read is one too, its ``summary`` ``None``
    (else its ``AccessDeniedError`` is raised).
    """
    keys = sorted(info.location.key for info in infos)
    found: dict[str, Distributed] = {}
    for info in infos:
        key = info.location.key
        if key.endswith("/"):
            continue
        data = key + _dcp_layout.DATA_SUFFIX
        at = _bisect_left(keys, data)
        if at == len(keys) or not keys[at].startswith(data):
            continue
        store = await open_store(info.location.scheme, config)
        try:
            summary = await _dcp_layout.read_summary(store, info.location, config)
        except CorruptCheckpointError:
            continue  # listed as the object it is; verify says what is wrong
        except AccessDeniedError:
            if not unreadable:
                raise
            # Which save the manifest commits is unknown: one save's data listed is that save's
            # (its data exists while it is committed); several saves' are counted, and said to be.
            listed = [one for one in infos if _dcp_layout.is_data_of(info.location, one.location.key)]
            if not listed:
                continue  # only others' objects under <key>.dcp/: the object is listed as what it is
            saves = {_dcp_layout.save_of(one.location.key) for one in listed}
            found[key] = Distributed(info, None, sum(one.size for one in listed), len(saves))
            continue
        if summary is not None:
            found[key] = Distributed(info, summary)
    return found


def folded(info: ObjectInfo, distributed: dict[str, Distributed]) -> bool:
    """Whether ``info`` is a data object of one of the ``distributed`` checkpoints, or a pack or
    lease of incremental ones (a listing shows the checkpoints as one row each instead)."""
    if _incremental.in_area(info.location.key):
        return True
    key, sep, _ = info.location.key.partition(_dcp_layout.DATA_SUFFIX)
    return bool(sep) and key in distributed


async def distributed_summary(uri: str, config: TransferConfig) -> _dcp_layout.Summary | None:
    """The summary of the distributed checkpoint at ``uri``; ``None`` if there is something else
    (or nothing). Of anything else only the first bytes are read.

    Raises:
        CorruptCheckpointError: Its manifest is garbled.
    """
    location = checkpoint_location(uri)
    return await _dcp_layout.read_summary(await open_store(location.scheme, config), location, config)


async def verify_distributed(
    uri: str, summary: _dcp_layout.Summary, config: TransferConfig, on_progress: ProgressCallback | None = None
) -> None:
    """Read every data object of the distributed checkpoint at ``uri`` and check it against its
    manifest's ``summary``.

    Raises:
        CorruptCheckpointError: One is missing, of another size or other bytes (named with its rank).
    """
    location = checkpoint_location(uri)
    await _dcp_layout.verify(await open_store(location.scheme, config), location, summary, config, on_progress)


async def collect_distributed(
    prefix: str, config: TransferConfig, *, older_than: float, dry_run: bool = False
) -> list[_dcp_layout.StaleSave]:
    """Delete the data of distributed saves under ``prefix`` that no manifest commits (failed,
    killed or replaced) and that were last written more than ``older_than`` seconds ago.

    Raises:
        DestinationError: ``prefix`` covers ``/``, the current or home folder or one of their parents.
    """
    location = parse_prefix(prefix)
    refuse_sweeping(location, "clean up under")
    store = await open_store(location.scheme, config)
    return await _dcp_layout.collect(store, location, config, cutoff=time.time() - older_than, dry_run=dry_run)


async def collect_incremental(
    prefix: str, config: TransferConfig, *, older_than: float, dry_run: bool = False, lease_ttl: float | None = None
) -> list[_incremental.AreaReport]:
    """Delete the packs of incremental checkpoints under ``prefix`` that no manifest references and
    that were written more than ``older_than`` seconds ago, where no save is in progress (see
    :func:`._incremental.collect_area`). ``lease_ttl``: after how long a save's lease is taken for
    a dead save's (default ``LEASE_TTL``).

    Raises:
        DestinationError: ``prefix`` covers ``/``, the current or home folder or one of their parents.
    """
    location = parse_prefix(prefix)
    refuse_sweeping(location, "clean up under")
    store = await open_store(location.scheme, config)
    ttl = _incremental.LEASE_TTL if lease_ttl is None else lease_ttl
    return await _incremental.collect(store, location, config, older_than=older_than, dry_run=dry_run, lease_ttl=ttl)


@dataclass(frozen=True)
class Incremental:
    """An incremental checkpoint found in a listing: its manifest and what it holds in the packs."""

    manifest: ObjectInfo
    usage: _incremental.Usage

    @property
    def size(self) -> int:
        """The manifest's bytes and the stored bytes of every chunk it references."""
        return self.manifest.size + self.usage.referenced


async def incremental_of(info: ObjectInfo, config: TransferConfig) -> Incremental | None:
    """``info``'s checkpoint as an :class:`Incremental` (what ``ls`` shows of it) if it is one,
    with the manifests of its folder read for what it holds alone; ``None`` for any other kind,
    or where the folder's manifests cannot all be read, for whatever reason (a description only:
    ``verify``, which asks, has checked the checkpoint itself already and must not fail on it)."""
    if info.record is None or info.record.layout != _incremental.LAYOUT:
        return None
    store = await open_store(info.location.scheme, config)
    try:
        manifests = await _incremental.manifests_beside(store, _incremental.area_of(info.location), config)
    except CheckpointError:
        return None
    usage = (await anyio.to_thread.run_sync(_incremental.usage, manifests)).get(info.location.key)
    return Incremental(info, usage) if usage is not None else None


async def incremental_among(
    infos: list[ObjectInfo], config: TransferConfig, unread: set[str] | None = None
) -> dict[str, Incremental]:
    """The incremental checkpoints among ``infos`` (a listing), by key, with what each references
    and holds alone (every manifest of their folders is read: sharing is per folder).

    With ``unread`` given, a folder whose manifests the credentials may not read is left out, its
    objects' keys added to ``unread`` (else its ``AccessDeniedError`` is raised).
    """
    found: dict[str, Incremental] = {}
    areas = _incremental.areas_under(infos)
    for area in areas.values():
        store = await open_store(area.scheme, config)
        try:
            manifests = await _incremental.manifests_beside(store, area, config)
        except CorruptCheckpointError:
            continue  # listed as the objects they are; verify says what is wrong
        except AccessDeniedError:
            if unread is None:
                raise
            folder = _incremental.folder_of(area).key
            unread.update(
                info.location.key
                for info in infos
                if info.location.key.startswith(folder) and "/" not in info.location.key[len(folder) :]
            )
            continue
        usage = await anyio.to_thread.run_sync(_incremental.usage, manifests)  # work per chunk: off the loop
        for info in infos:
            if info.location.key in usage:
                found[info.location.key] = Incremental(info, usage[info.location.key])
    return found


async def remove(uri: str, config: TransferConfig, *, dry_run: bool = False, force: bool = False) -> None:
    """Delete the checkpoint at ``uri`` (with ``dry_run``, only check that there is one); a
    distributed one with its data (the manifest first: it disappears at once).

    Credentials that may list and delete suffice (see :func:`._dcp_layout.remove_checkpoint`).

    Raises:
        CheckpointNotFoundError: There is none.
        DestinationError: It is a local file checkpointio did not write (unless ``force``); kept.
    """
    location = checkpoint_location(uri)
    store = await open_store(location.scheme, config)
    if dry_run:
        found = await _exists(store, location)
    else:
        found = await _dcp_layout.remove_checkpoint(store, location, config, force=force)
    if not found:
        raise CheckpointNotFoundError(f"{location.uri}: no such checkpoint", uri=location.uri)


async def _exists(store: Store, location: Location) -> bool:
    """Whether there is an object at ``location``: a HEAD, or a listing where the credentials may
    list and not read."""
    try:
        return await store.head(location) is not None
    except AccessDeniedError:
        return any(info.location.key == location.key for info in await store.list(location))


async def refuse_foreign_file(uri: str, *, removing: bool = False) -> None:
    """Raise if ``uri`` is a local file that checkpointio did not write (no record of it): a save
    there would replace a user's file, as ``save ckpt/ train.py`` (the arguments swapped) would,
    and ``rm train.py`` (``removing``) would delete it.

    Raises:
        DestinationError: It is such a file.
    """
    location = checkpoint_location(uri)
    if location.scheme == "file" and await anyio.to_thread.run_sync(is_foreign, Path(location.key)):
        hint = "; --force removes it" if removing else " (check the order: save SRC URI); --force replaces it"
        raise DestinationError(f"{location.uri} is a file checkpointio did not write{hint}", uri=location.uri)


@dataclass(frozen=True)
class Removal:
    """What :func:`remove_under` removed (or, with ``dry_run``, would remove) and what it left."""

    removed: list[Location]
    skipped: list[Location]
    #: Of ``skipped``, those whose record the credentials may not read (list, not read): checkpointio's
    #: or not is unknown, so they are kept too.
    unread: list[Location] = field(default_factory=list)


async def remove_under(prefix: str, config: TransferConfig, *, dry_run: bool = False) -> Removal:
    """Delete every checkpoint under ``prefix`` that checkpointio wrote (one with its record).

    Objects and files without checkpointio's record (a user's files in a local folder, objects
    other tools wrote) are never deleted: they are returned as skipped (``rm URI`` removes one),
    as are those whose record the credentials may not read (S3 without ``s3:GetObject``).

    Raises:
        DestinationError: A local ``prefix`` covers ``/``, the current or home folder or one of
            their parents.
    """
    location = parse_prefix(prefix)
    refuse_sweeping(location, "remove the checkpoints under")
    unread: set[str] = set()
    infos = await list_checkpoints(prefix, config, unread)
    ours = [info.location for info in infos if info.record is not None]
    skipped = [info.location for info in infos if info.record is None]
    kept = [found for found in skipped if found.key in unread]
    if dry_run:
        return Removal(ours, skipped, kept)
    store = await open_store(location.scheme, config)
    removed = [found for found in ours if await store.delete(found)]  # False: removed meanwhile
    return Removal(removed, skipped, kept)


async def verify(uri: str, config: TransferConfig, on_progress: ProgressCallback | None = None) -> ObjectInfo:
    """Read the checkpoint at ``uri`` to its end and check it, writing nothing.

    Raises:
        CheckpointNotFoundError: There is none.
        CorruptCheckpointError: It does not read back whole (checksum, truncation, unsafe entries).
    """
    location = checkpoint_location(uri)
    info = await _engine.verify(await open_store(location.scheme, config), location, config, on_progress)
    if info is None:
        raise CheckpointNotFoundError(f"{location.uri}: no such checkpoint", uri=location.uri)
    return info


async def write_out(
    uri: str,
    write: Callable[[bytes], object],
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
) -> ObjectInfo:
    """Give the bytes of the bytes or file checkpoint at ``uri`` to ``write`` as they arrive.

    Raises:
        CheckpointNotFoundError: There is none.
        CheckpointError: It is a directory.
        CorruptCheckpointError: It did not read back whole, found after its bytes were written.
    """
    location = checkpoint_location(uri)
    info = await _engine.write_out(await open_store(location.scheme, config), location, write, config, on_progress)
    if info is None:
        raise CheckpointNotFoundError(f"{location.uri}: no such checkpoint", uri=location.uri)
    return info


def _protected(checkpoint: Location | None = None) -> list[tuple[Path, str]]:
    """The folders no command may replace or sweep, resolved, with what each is: ``/``, the
    current folder, the home folder, their parents, and the local checkpoint being read and the
    folders that hold it."""
    folders: list[tuple[Path, str]] = [(Path("/"), "the root folder")]
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was removed: nothing of it to protect
        pass
    else:
        folders += [(cwd, "the current folder"), *((p, "a parent of the current folder") for p in cwd.parents)]
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no HOME and no password entry
        pass
    else:
        folders += [(home, "the home folder"), *((p, "a parent of the home folder") for p in home.parents)]
    if checkpoint is not None and checkpoint.scheme == "file":
        stored = Path(checkpoint.key).resolve()
        folders.append((stored, "the checkpoint being read"))
        holding = f"a folder holding the checkpoint being read ({checkpoint.uri})"
        folders += [(p, holding) for p in stored.parents]
    return folders


def _spellings(path: Path) -> list[Path]:
    """``path`` as written (its folder resolved) and with every symlink resolved (``./link`` to
    ``.``, ``sub/..``): a command is refused if either is protected."""
    seen = {path.resolve()}
    if path.name not in ("", ".", ".."):
        seen.add(path.parent.resolve() / path.name)
    return sorted(seen)


def refuse_protected(path: Path, doing: str, checkpoint: Location | None = None) -> None:
    """Raise :class:`DestinationError` if ``path`` is a folder that ``doing`` must never touch (see
    :func:`_protected`).

    Raises:
        DestinationError: It is one of them.
    """
    protected = _protected(checkpoint)
    for candidate in _spellings(path):
        for folder, why in protected:
            if candidate == folder:
                shown = str(path) if candidate == path else f"{path} ({candidate})"
                raise DestinationError(f"refusing to {doing} {shown}: it is {why}", uri=str(path))


def refuse_sweeping(prefix: Location, doing: str) -> None:
    """Raise :class:`DestinationError` if the local ``prefix`` (a folder, or a name prefix such as
    ``/ho``) covers a folder of :func:`_protected`: ``rm --recursive`` or ``gc`` of ``/``, ``~``,
    ``.`` or one of their parents.

    Raises:
        DestinationError: It covers one of them.
    """
    if prefix.scheme != "file":
        return
    protected = _protected()
    for candidate in _spellings(Path(prefix.key)):
        root = str(candidate)
        exact = [(folder, why) for folder, why in protected if folder == candidate]
        for folder, why in exact or protected:  # the folder it is, else those its names take in
            if str(folder).startswith(root):
                raise DestinationError(
                    f"refusing to {doing} {prefix.uri}: it covers {folder}, {why}; name a folder below it",
                    uri=prefix.uri,
                )


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` put at its destination."""

    path: Path
    is_directory: bool
    size: int


async def restore(
    uri: str,
    dest: str | os.PathLike[str],
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
    *,
    overwrite: bool = False,
    only: Sequence[str] | None = None,
    only_option: str = "only=",
) -> Restored:
    """Restore the checkpoint at ``uri`` as ``dest``: the saved tree for a directory, else a file.

    It is restored into a hidden folder next to ``dest`` and renamed into place only once it read
    back whole; on any error or cancellation (Ctrl-C) that folder is removed, so ``dest`` is never
    left half-written. With ``overwrite`` the old ``dest`` is renamed aside first and removed only
    once the new one is in place.

    ``dest`` is the name to create, never a folder to restore into: it is refused, even with
    ``overwrite``, when it is ``/``, the current or home folder or one of their parents, or the
    local checkpoint itself or a folder holding it (symlinks resolved); a bytes or file checkpoint
    never replaces a folder that is not empty. ``only``: just the entries of a directory these
    glob patterns match (see ``Checkpoint.load``); messages call them ``only_option``.

    Raises:
        FileExistsError: ``dest`` exists and ``overwrite`` is false.
        DestinationError: ``dest`` is one of the folders above, or a file stands where a folder of
            its path must be.
        CheckpointNotFoundError: There is no checkpoint at ``uri``.
    """
    location = checkpoint_location(uri)
    selection = Selection(only, option=only_option) if only is not None else None

    def prepare() -> Path:
        target = Path(dest).absolute()
        try:
            refuse_protected(target, "replace", location)
        except DestinationError as error:
            if not target.is_dir():
                raise
            raise DestinationError(
                f"{error}. DEST is the name to create: the checkpoint is restored as DEST, not into it "
                f"(e.g. {os.path.join(target, 'NAME')})",
                uri=error.uri,
            ) from None
        if not overwrite and (target.exists() or target.is_symlink()):
            if not target.is_dir():  # nothing can be restored into a file: no NAME under it to suggest
                raise FileExistsError(f"{target} already exists (not a folder); --force replaces it")
            raise FileExistsError(
                f"{target} already exists. DEST is the name to create: the checkpoint is restored as DEST, "
                f"not into it (e.g. {os.path.join(target, 'NAME')}); --force replaces it"
            )
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            blocker = file_in_the_way(target)
            if blocker is None:
                raise
            raise DestinationError(
                f"cannot create {target}: {blocker} is a file, not a folder", uri=str(target)
            ) from error
        return target

    target = await anyio.to_thread.run_sync(prepare)
    staging = _placement.staging_path(target.parent)
    try:
        store = await open_store(location.scheme, config)
        restored = await _engine.load(store, location, staging, config, on_progress, only=selection)
        if restored is None:
            raise CheckpointNotFoundError(f"{location.uri}: no such checkpoint", uri=location.uri)

        def put_in_place(source: Path) -> Restored:
            is_directory = source == staging
            size = source.stat().st_size if not is_directory else 0
            if not is_directory and target.is_dir() and not target.is_symlink() and any(target.iterdir()):
                raise DestinationError(
                    f"{target} is a folder that is not empty, and {location.uri} is a single file: it is restored "
                    f"as DEST, not into it; name the file to create (e.g. {target / 'NAME'})",
                    uri=str(target),
                )
            if overwrite:  # the old one stays whole until the new one is in place
                _placement.replace_all([(source, target)])
            else:
                os.replace(source, target)
            return Restored(target, is_directory, size)

        return await anyio.to_thread.run_sync(put_in_place, restored)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_placement.remove_tree, staging)


async def list_contents(uri: str, config: TransferConfig, each: Callable[[Entry], None]) -> bool:
    """Give each entry of the directory checkpoint at ``uri`` to ``each`` (from a worker thread);
    whether its table of contents was read (``False``: the whole archive was streamed).

    Raises:
        CheckpointNotFoundError: There is no checkpoint at ``uri``.
    """
    location = checkpoint_location(uri)
    store = await open_store(location.scheme, config)
    found = await _engine.list_contents(store, location, config, each)
    if found is None:
        raise CheckpointNotFoundError(f"{location.uri}: no such checkpoint", uri=location.uri)
    return found


async def collect_garbage(
    prefix: str, config: TransferConfig, *, older_than: float, dry_run: bool = False
) -> list[PendingWrite]:
    """Discard the unfinished saves under ``prefix`` that started more than ``older_than`` seconds ago.

    A save still running looks the same as an abandoned one, hence the age cutoff. Returns what
    was (or, with ``dry_run``, would be) discarded.

    Raises:
        DestinationError: ``prefix`` covers ``/``, the current or home folder or one of their parents.
    """
    location = parse_prefix(prefix)
    refuse_sweeping(location, "clean up under")
    store = await open_store(location.scheme, config)
    cutoff = time.time() - older_than
    stale = [write for write in await store.pending(location) if write.started is None or write.started <= cutoff]
    if dry_run:
        return stale
    done: list[PendingWrite] = []
    for write in stale:
        if await store.discard(write):
            done.append(write)
    return done


#: The last key segment of a task attempt's checkpoint, or of the marker claiming its number.
_ATTEMPT_NAME = re.compile(r"attempt-(\d+)(\.claim)?")


@dataclass
class StoredRun:
    """One task run found in a store: the folder holding ``attempt-<n>`` checkpoints and claims.

    Attributes:
        location: The run's folder (``<storage>/<environment>/<task>/<run id>``).
        objects: Its attempts' checkpoints and claim markers (nothing else in the folder).
        unfinished: Saves of its attempts that never finished.
        last_written: When it was last written to, or ``None`` if the store does not say.
    """

    location: Location
    objects: list[Location] = field(default_factory=list)
    unfinished: list[PendingWrite] = field(default_factory=list)
    last_written: float | None = None

    def saw(self, when: float | None) -> None:
        if when is not None and (self.last_written is None or when > self.last_written):
            self.last_written = when


def _run_of(key: str) -> str | None:
    """The run folder of an attempt's key (or of a data object of a distributed attempt's,
    ``attempt-<n>.dcp/...``), or ``None`` for a key that is not an attempt's."""
    attempt, data, _ = key.partition(_dcp_layout.DATA_SUFFIX)
    folder, slash, name = attempt.rpartition("/")
    if not (slash and folder and _ATTEMPT_NAME.fullmatch(name)) or (data and name.endswith(".claim")):
        return None
    return folder


async def find_runs(store: Store, prefix: Location) -> list[StoredRun]:
    """The task runs below ``prefix``, oldest written first (a tie: by folder)."""
    runs: dict[str, StoredRun] = {}

    def run_of(location: Location) -> StoredRun | None:
        folder = _run_of(location.key)
        if folder is None:
            return None
        return runs.setdefault(folder, StoredRun(Location(location.scheme, location.bucket, folder)))

    packs: dict[str, list[ObjectInfo]] = {}  # a folder's incremental packs and leases, by folder
    for info in await store.list(prefix):
        key = info.location.key
        if _incremental.in_area(key):
            folder = key.partition(f"/{_incremental.AREA}/")[0]
            packs.setdefault(folder, []).append(info)
        elif (run := run_of(info.location)) is not None:
            run.objects.append(info.location)
            run.saw(info.modified)
    for folder, infos in packs.items():
        found = runs.get(folder)  # only a run's own: a folder of other checkpoints is no run
        if found is not None:
            for info in infos:
                found.objects.append(info.location)
                found.saw(info.modified)
    for write in await store.pending(prefix):
        if (run := run_of(write.location)) is not None:
            run.unfinished.append(write)
            run.saw(write.started)
    return sorted(runs.values(), key=lambda run: (run.last_written or 0.0, run.location.key))


async def delete_run(store: Store, run: StoredRun) -> None:
    """Delete a run's attempts, claims and unfinished saves; on a local store, its emptied folders.
    A local file of such a name that checkpointio did not write is kept (with a warning)."""
    for write in run.unfinished:
        await store.discard(write)
    for location in run.objects:
        try:
            await store.delete(location)
        except DestinationError as error:
            logger.warning("kept %s: %s", location.uri, error)
    if run.location.scheme == "file":
        await anyio.to_thread.run_sync(_remove_empty_folders, run.location.key)


def _remove_empty_folders(top: str) -> None:
    """Remove ``top`` and the folders below it that are empty."""
    for dirpath, _dirnames, _filenames in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):  # not empty (something else lives there), or gone already
            os.rmdir(dirpath)


async def prune_runs(
    prefix: str, config: TransferConfig, *, older_than: float, dry_run: bool = False
) -> list[StoredRun]:
    """Delete the task runs under ``prefix`` last written more than ``older_than`` seconds ago.

    Only what the task runtime writes goes: ``attempt-<n>`` checkpoints, their claims and unfinished
    saves. A run whose store gives no times is kept. Returns what was (or, with ``dry_run``, would
    be) deleted.

    Raises:
        DestinationError: ``prefix`` covers ``/``, the current or home folder or one of their parents.
    """
    location = parse_prefix(prefix)
    refuse_sweeping(location, "remove the runs under")
    store = await open_store(location.scheme, config)
    cutoff = time.time() - older_than
    stale = [
        run for run in await find_runs(store, location) if run.last_written is not None and run.last_written <= cutoff
    ]
    if not dry_run:
        for run in stale:
            await delete_run(store, run)
    return stale
