"""How a distributed (``checkpointio.dcp``) checkpoint lies in a store, readable without torch.

The command line lists, verifies, removes and cleans up such checkpoints through this module; only
loading one needs torch (``checkpointio.dcp``, which writes and reads the same layout)::

    <uri>                          the manifest: a header line, a JSON summary line, DCP's metadata pickled
    <uri>.dcp/<save-id>/rank-<n>   rank n's items of one save

The summary names the save the manifest commits, the world size that saved it, and every data
object's size and CRC32: all the command line needs, and nothing it would have to unpickle.
A save id is ``<start time in ns, 16 hex digits>-<8 hex digits>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass

import anyio
import anyio.to_thread

from . import _engine
from ._config import TransferConfig
from ._exceptions import AccessDeniedError, ConcurrentModificationError, CorruptCheckpointError
from ._location import Location
from ._progress import ProgressCallback
from ._stores import DISTRIBUTED, INCREMENTAL, MANIFEST_MAGIC, Kind, ObjectInfo, Store

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_SUFFIX",
    "Summary",
    "StaleSave",
    "collect",
    "data_location",
    "data_prefix",
    "decode",
    "delete_save",
    "encode",
    "is_data_of",
    "is_manifest",
    "read_manifest",
    "read_summary",
    "rank_of",
    "remove",
    "remove_checkpoint",
    "save_of",
    "verify",
]

#: The manifest's first line: what it is and the version of its layout.
MAGIC = MANIFEST_MAGIC[DISTRIBUTED]
VERSION = 1
#: The ``layout`` of a manifest's record: it tells the engine, which restores every other kind,
#: that the object is no checkpoint of its own to restore (only ``checkpointio.dcp`` loads it).
LAYOUT = DISTRIBUTED
#: What follows the checkpoint's key for the folder (prefix) of its data objects.
DATA_SUFFIX = ".dcp/"
#: A data object's key: the checkpoint's key, the save id and the rank.
_UNKNOWN = "?"
_DATA_KEY = re.compile(r"(?P<checkpoint>.+)\.dcp/(?P<save>[0-9a-f]{16}-[0-9a-f]{8})/rank-(?P<rank>\d+)")


@dataclass(frozen=True)
class Summary:
    """What a manifest says besides DCP's metadata.

    Attributes:
        save_id: The save it commits.
        world_size: How many ranks saved it.
        objects: Data object name (``<save-id>/rank-<n>``) -> (size, CRC32).
    """

    save_id: str
    world_size: int
    objects: dict[str, tuple[int, int]]

    @property
    def data_size(self) -> int:
        return sum(size for size, _ in self.objects.values())


def data_prefix(location: Location) -> Location:
    """The folder (prefix) of the data objects of the checkpoint at ``location``."""
    return Location(location.scheme, location.bucket, location.key + DATA_SUFFIX)


def data_location(location: Location, name: str) -> Location:
    """Where the data object ``name`` (``<save-id>/rank-<n>``) of ``location`` lives."""
    return Location(location.scheme, location.bucket, location.key + DATA_SUFFIX + name)


def rank_of(name: str) -> str:
    """The rank in a data object's name."""
    return name.rpartition("rank-")[2] or "?"


def encode(summary: Summary, metadata: bytes) -> bytes:
    """A manifest: the header, the summary as one JSON line, then ``metadata`` (DCP's, pickled)."""
    header = MAGIC + str(VERSION).encode() + b"\n"
    line = json.dumps(
        {"save_id": summary.save_id, "world_size": summary.world_size, "objects": summary.objects},
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    return header + line + b"\n" + metadata


def is_manifest(head: bytes) -> bool:
    """Whether ``head`` (an object's first bytes) starts a distributed checkpoint's manifest."""
    return head.startswith(MAGIC)


def decode(data: bytes | bytearray | memoryview, uri: str) -> tuple[Summary, memoryview]:
    """The summary of the manifest ``data`` and the bytes of its pickled metadata.

    Raises:
        CorruptCheckpointError: ``data`` is not a manifest this version reads.
    """
    view = memoryview(data)
    line, newline, _ = bytes(view[:64]).partition(b"\n")
    if not newline or not line.startswith(MAGIC):
        raise CorruptCheckpointError(
            f"{uri}: not a distributed checkpoint (no checkpointio-dcp manifest there: another kind of "
            "checkpoint, or something another tool wrote)",
            uri=uri,
        )
    version = line[len(MAGIC) :]
    if version != str(VERSION).encode():
        raise CorruptCheckpointError(
            f"{uri}: a distributed checkpoint of manifest version {version.decode(errors='replace')!r}; "
            f"this checkpointio reads version {VERSION} (a newer checkpointio wrote it?)",
            uri=uri,
        )
    rest = view[len(line) + 1 :]
    end = bytes(rest).find(b"\n")
    try:
        if end < 0:
            raise ValueError("no summary line")
        fields = json.loads(bytes(rest[:end]))
        objects = {str(name): (int(size), int(crc)) for name, (size, crc) in fields["objects"].items()}
        summary = Summary(str(fields["save_id"]), int(fields["world_size"]), objects)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptCheckpointError(
            f"{uri}: the distributed checkpoint's manifest is garbled: {error}", uri=uri
        ) from error
    return summary, rest[end + 1 :]


async def _head_bytes(store: Store, info: ObjectInfo) -> bytes:
    return await store.read_range(info, 0, len(MAGIC))


#: How often a manifest removed or replaced while it is read is looked at again.
_READS_RACING_A_CHANGE = 3


async def read_summary(store: Store, location: Location, config: TransferConfig) -> Summary | None:
    """The summary of the distributed checkpoint at ``location``; ``None`` when what is there (if
    anything) is not one. Reads only the first bytes of anything else.

    Raises:
        CorruptCheckpointError: A garbled manifest.
    """
    found = await _read(store, location, config, for_load=False)
    if found is None or isinstance(found, ObjectInfo):
        return None
    return decode(found, location.uri)[0]


async def read_manifest(store: Store, location: Location, config: TransferConfig) -> bytearray | None:
    """The bytes of the manifest at ``location`` (checked as every load checks them), for a load
    that follows; ``None`` when there is no object there. Reads only the first bytes of anything else.

    Raises:
        CorruptCheckpointError: Something that is not a distributed checkpoint is there.
    """
    found = await _read(store, location, config, for_load=True)
    if isinstance(found, ObjectInfo):
        raise CorruptCheckpointError(_not_a_manifest(found), uri=location.uri)
    return found


def _not_a_manifest(info: ObjectInfo) -> str:
    """Why the object ``info`` describes is no distributed checkpoint, naming what it is when known."""
    uri = info.location.uri
    record = info.record
    if record is None:
        return f"{uri}: not a distributed checkpoint (no checkpointio-dcp manifest there: something another tool wrote)"
    kind = "an incremental" if record.layout == INCREMENTAL else f"a {_KIND_WORDS[record.kind]}"
    return (
        f"{uri}: not a distributed checkpoint: it holds {kind} checkpoint (restore it with "
        "Checkpoint.load(), or save a distributed one there first)"
    )


_KIND_WORDS = {Kind.BYTES: "bytes", Kind.FILE: "single-file", Kind.DIRECTORY: "directory"}


async def _read(
    store: Store, location: Location, config: TransferConfig, *, for_load: bool
) -> bytearray | ObjectInfo | None:
    """The manifest's bytes at ``location``; ``None`` when there is no object there, its
    description when it is something else (of which only the first bytes are read). ``for_load``:
    the reads that follow receive ranges (see ``_engine.head_for_reads``)."""
    for attempt in range(_READS_RACING_A_CHANGE):
        try:
            info = await (_engine.head_for_reads(store, location) if for_load else store.head(location))
            if info is None:
                return None
            recorded = info.record is not None and info.record.layout == LAYOUT
            if not recorded and (info.size < len(MAGIC) or not is_manifest(await _head_bytes(store, info))):
                return info
            data = await _engine.load_object(store, location, config, info=info)
        except ConcurrentModificationError:  # removed or replaced while read (a save or rm racing)
            if attempt + 1 == _READS_RACING_A_CHANGE:
                raise
            continue
        if data is None:  # removed meanwhile
            return None
        return data
    raise AssertionError("unreachable")  # pragma: no cover


async def verify(
    store: Store,
    location: Location,
    summary: Summary,
    config: TransferConfig,
    on_progress: ProgressCallback | None = None,
) -> None:
    """Read every data object the manifest at ``location`` names to its end and check its size and
    CRC32 against the manifest.

    Raises:
        CorruptCheckpointError: One is missing or of another size (``ChecksumMismatchError`` for
            other bytes), named with its rank.
    """
    for name, (size, crc32) in sorted(summary.objects.items()):
        data = data_location(location, name)
        what = f"{location.uri}: its data object {data.uri} (rank {rank_of(name)})"
        try:
            info = await _engine.verify(store, data, config, on_progress)
        except CorruptCheckpointError as error:
            raise type(error)(f"{what}: {error}", uri=data.uri) from error
        if info is None:
            raise CorruptCheckpointError(f"{what} is missing", uri=data.uri)
        stored = info.record.crc32 if info.record is not None else None
        if info.size != size or stored != crc32:
            raise CorruptCheckpointError(
                f"{what} holds {info.size} bytes, CRC32 {stored or 0:08x}; the manifest records {size} bytes, "
                f"CRC32 {crc32:08x} (replaced since the save?)",
                uri=data.uri,
            )


async def delete_save(store: Store, location: Location, save_id: str) -> None:
    """Delete every data object (and unfinished write) of the save ``save_id`` of ``location``."""
    prefix = data_location(location, save_id + "/")
    await _delete_data(store, location, prefix, await _data_under(store, location, prefix))
    if location.scheme == "file":
        await anyio.to_thread.run_sync(_remove_empty_folder, prefix.key)


def save_of(key: str) -> str | None:
    """The save id in a data object's key (``<key>.dcp/<save-id>/rank-<n>``); ``None`` for another key."""
    match = _DATA_KEY.fullmatch(key)
    return match["save"] if match is not None else None


def is_data_of(location: Location, key: str) -> bool:
    """Whether ``key`` is the name of a data object a save of the checkpoint at ``location`` writes
    (``<key>.dcp/<save-id>/rank-<n>``): only those are ever deleted under ``<key>.dcp/``."""
    match = _DATA_KEY.fullmatch(key)
    return match is not None and match["checkpoint"] == location.key


async def _data_under(store: Store, location: Location, prefix: Location) -> list[ObjectInfo]:
    """The data objects of ``location`` listed under ``prefix`` (a user's object there is not one)."""
    return [info for info in await store.list(prefix) if is_data_of(location, info.location.key)]


async def _delete_data(store: Store, location: Location, prefix: Location, listed: list[ObjectInfo]) -> None:
    """Delete the data objects ``listed`` and discard the unfinished writes of data objects of
    ``location`` under ``prefix``; anything else under it (a user's object) stays. Credentials that
    may not list unfinished uploads (S3's separate ``s3:ListBucketMultipartUploads``) leave those to
    ``gc``, with a warning: what was asked for is done."""
    for info in listed:
        await store.delete(info.location)
    try:
        pending = await store.pending(prefix)
    except AccessDeniedError:
        logger.warning("%s: may not list unfinished uploads there: those of unfinished saves stay (gc)", prefix.uri)
        return
    for write in pending:
        if is_data_of(location, write.location.key):
            await store.discard(write)


def _remove_empty_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # not empty (a save still writing), or gone already
        os.rmdir(folder)


async def remove(store: Store, location: Location) -> None:
    """Remove the distributed checkpoint at ``location``: its manifest first (it disappears at
    once), then the data of every save under it, committed or not. The data is listed before
    anything is deleted: credentials that may not list (``AccessDeniedError``) delete nothing,
    rather than a manifest whose data would then stay behind."""
    listed = await _data_under(store, location, data_prefix(location))
    await store.delete(location)
    await _remove_data(store, location, listed)


async def _remove_data(store: Store, location: Location, listed: list[ObjectInfo]) -> None:
    prefix = data_prefix(location)
    await _delete_data(store, location, prefix, listed)
    if location.scheme == "file":
        await anyio.to_thread.run_sync(_remove_empty_tree, prefix.key)


async def remove_checkpoint(store: Store, location: Location, config: TransferConfig, *, force: bool = False) -> bool:
    """Remove the checkpoint at ``location``, a distributed one with its data (its manifest first:
    it disappears at once); whether there was an object there.

    With credentials that may delete and list but not read (S3 without ``s3:GetObject``) the
    manifest cannot be read: the data objects under ``<key>.dcp/`` (only names a distributed save
    writes) are listed first, then the object goes, then they do, so no data is ever left behind
    once its manifest is gone; credentials that may not list delete nothing.

    A local file checkpointio did not write is refused (``DestinationError``) and kept, unless
    ``force`` (see ``Store.delete``).
    """
    try:
        summary = await read_summary(store, location, config)
    except CorruptCheckpointError:  # a garbled manifest: removed as the object it is
        summary = None
    except AccessDeniedError:
        listed = await _data_under(store, location, data_prefix(location))
        if not await store.delete(location):
            return False  # data without a manifest is no checkpoint: gc's to collect
        await _remove_data(store, location, listed)
        return True
    if summary is not None:
        await remove(store, location)
        return True
    return await store.delete(location, force=force)


def _remove_empty_tree(top: str) -> None:
    for dirpath, _dirnames, _filenames in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


@dataclass
class StaleSave:
    """The data of one save no manifest commits (it failed, was killed, or was replaced).

    Attributes:
        checkpoint: The checkpoint it was saved for.
        save_id: Its save id.
        objects: Its data objects.
        last_written: When it was last written to (its start, or its newest object).
    """

    checkpoint: Location
    save_id: str
    objects: list[ObjectInfo]
    last_written: float

    @property
    def size(self) -> int:
        return sum(info.size for info in self.objects)


async def collect(
    store: Store, prefix: Location, config: TransferConfig, *, cutoff: float, dry_run: bool = False
) -> list[StaleSave]:
    """Delete the data under ``prefix`` of distributed saves that no manifest commits and that were
    last written before ``cutoff`` (seconds since the epoch): a save still on its way looks the
    same until then. Returns what was (or, with ``dry_run``, would be) deleted."""
    saves: dict[tuple[str, str], StaleSave] = {}
    for info in await store.list(prefix):
        match = _DATA_KEY.fullmatch(info.location.key)
        if match is None:
            continue
        save_id = match["save"]
        started = int(save_id[:16], 16) / 1e9  # the save id starts with its start time
        checkpoint = Location(prefix.scheme, prefix.bucket, match["checkpoint"])
        one = saves.setdefault((checkpoint.key, save_id), StaleSave(checkpoint, save_id, [], started))
        one.objects.append(info)
        if info.modified is not None:
            one.last_written = max(one.last_written, info.modified)
    live: dict[str, str | None] = {}
    stale: list[StaleSave] = []
    for (key, save_id), one in sorted(saves.items()):
        if one.last_written > cutoff:
            continue
        if key not in live:
            try:
                summary = await read_summary(store, one.checkpoint, config)
            except CorruptCheckpointError:  # a garbled manifest: its data is kept, for whoever repairs it
                live[key] = _UNKNOWN
            except AccessDeniedError as error:  # may list, not read: which save it commits is unknown
                logger.warning("kept the data of the distributed saves of %s: %s", one.checkpoint.uri, error)
                live[key] = _UNKNOWN
            else:
                live[key] = summary.save_id if summary is not None else None
        if live[key] not in (save_id, _UNKNOWN):
            stale.append(one)
    if not dry_run:
        for one in stale:
            for info in one.objects:
                await store.delete(info.location)
            if prefix.scheme == "file":
                await anyio.to_thread.run_sync(_remove_empty_folder, data_location(one.checkpoint, one.save_id).key)
    return stale
