"""checkpointio as the storage layer of ``torch.distributed.checkpoint`` (DCP).

Needs the ``torch`` extra; ``import checkpointio`` alone never imports this module (nor torch).
Every rank streams its shards into ONE object per save; the coordinator commits the save by
writing one small manifest at the checkpoint's URI, last::

    <uri>                          the manifest: DCP's metadata and every data object's size and CRC32
    <uri>.dcp/<save-id>/rank-<n>   rank n's items of one save, one after the other

The save id is fresh for every save and chosen by the coordinator, so a save never touches the
data the current manifest points to: a save that fails (or a rank that dies) half-way leaves the
previous checkpoint loadable and the new one invisible. Once the new manifest is in place, the data
of saves that started before it is deleted. A load fetches only the byte ranges its rank's plan
names, adjacent items coalesced into one request, requests in parallel, and checks every item's
CRC32 before DCP is told it is loaded.

A tensor is stored as its elements, as they lie in memory (the manifest records its dtype and
shape): a save writes them straight from the tensor, and a load receives them straight into it
(each block written into the target's memory as it arrives, its CRC32 taken meanwhile), with no
serialised copy on either side and nothing held between them. Tensors whose memory is not their
values (quantized, sparse, nested) are stored in torch's own format and read with
``torch.load(weights_only=True)``.
The manifest holds DCP's ``Metadata`` pickled, as DCP's own ``FileSystemWriter`` stores it:
load only checkpoints you trust, as with ``torch.load(weights_only=False)``.

Example::

    import torch.distributed.checkpoint as dcp
    from checkpointio.dcp import StorageReader, StorageWriter

    dcp.save(state_dict, storage_writer=StorageWriter("s3://bucket/run/step-100"))
    dcp.load(state_dict, storage_reader=StorageReader("s3://bucket/run/step-100"))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import io
import logging
import os
import pickle
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import anyio
import anyio.to_thread

try:
    import torch
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("checkpointio.dcp needs PyTorch: pip install 'checkpointio[torch]'") from error
from torch.autograd.graph import increment_version
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.state_dict_loader import load as _dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as _dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as _dcp_save
from torch.distributed.checkpoint.storage import StorageReader as _StorageReader
from torch.distributed.checkpoint.storage import StorageWriter as _StorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from typing_extensions import Unpack

from . import _codec, _dcp_layout, _engine, _exit, _group
from ._background import BackgroundSave, SaveHandle
from ._checkpoint import Checkpoint
from ._concurrency import one_error
from ._config import TransferConfig, TransferOptions
from ._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
)
from ._location import Location, checkpoint_location, split_scheme
from ._portal import run_sync
from ._progress import human_size
from ._stores import Kind, ObjectInfo, Store, open_store

__all__ = ["DistributedSaveHandle", "StorageReader", "StorageWriter", "latest", "load", "remove", "save"]

logger = logging.getLogger(__name__)

#: A URI or a path; or a :class:`~checkpointio.Checkpoint`: saves go to its ``dest``, loads read
#: its newest valid source.
Target = str | os.PathLike[str] | Checkpoint


@dataclass(frozen=True)
class _RankPlan:
    """What the coordinator tells each rank in its save plan: the save id and the rank's number."""

    save_id: str
    rank: int


@dataclass(frozen=True)
class _Slice:
    """Where one saved item lives (``Metadata.storage_data`` values).

    Attributes:
        object: The data object's name below ``<uri>.dcp/`` (``<save-id>/rank-<n>``).
        offset: Where the item starts in it.
        length: Its length in bytes.
        crc32: The CRC32 of those bytes.
        dtype: For a tensor, its dtype (``"torch.float32"``): the bytes are its elements, in
            row-major order, as they lie in memory (no serialisation to copy them into, or
            out of). Empty for a bytes item.
        shape: For a tensor, its shape.
    """

    object: str
    offset: int
    length: int
    crc32: int
    dtype: str = ""
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Written:
    """A rank's report of one item (``WriteResult.storage_data``): where it is, and the size and
    CRC32 of the whole object it went into, which the coordinator records in the manifest."""

    slice: _Slice
    object_size: int
    object_crc32: int


@dataclass(frozen=True)
class _Manifest:
    """What the checkpoint's URI holds: DCP's metadata and the data objects it points to."""

    save_id: str
    metadata: Metadata
    #: Data object name -> (size, CRC32).
    objects: dict[str, tuple[int, int]]
    #: How many ranks saved it.
    world_size: int = 1


def _new_save_id() -> str:
    """Fresh and ordered by start time (nanoseconds, fixed-width hex), so "older" is a string compare."""
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"


def _object_name(save_id: str, rank: int) -> str:
    return f"{save_id}/rank-{rank}"


def _memory_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor's elements, without copying them (valid while it lives)."""
    if tensor.nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")


def _dtype_named(name: str, uri: str) -> torch.dtype:
    """The dtype a slice names (``"torch.bfloat16"``); ``CorruptCheckpointError`` for anything else."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not name.startswith("torch.") or not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{uri}: the manifest names an unknown dtype {name!r}", uri=uri)
    return dtype


def _plain(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values are its elements in memory, read back as a dtype and shape."""
    return tensor.layout == torch.strided and not tensor.is_quantized and not tensor.is_nested


def _in_place(request: ReadItem, piece: _Slice, target: torch.Tensor, uri: str) -> bool:
    """Whether ``piece``'s bytes can be copied into ``target`` as they are: it holds elements of
    ``target``'s dtype, all of them wanted (no resharding), and ``target`` is one contiguous
    CPU block of that shape whose memory reads as its values (no lazy conjugate or negative bit).
    Otherwise the elements are converted and narrowed by torch."""
    return (
        bool(piece.dtype)
        and target.device.type == "cpu"
        and _plain(target)
        and not target.is_conj()
        and not target.is_neg()
        and target.is_contiguous()
        and tuple(target.shape) == piece.shape == tuple(request.lengths)
        and all(offset == 0 for offset in request.storage_offsets)
        and _dtype_named(piece.dtype, uri) == target.dtype
    )


def _encode_manifest(manifest: _Manifest) -> bytes:
    summary = _dcp_layout.Summary(manifest.save_id, manifest.world_size, manifest.objects)
    return _dcp_layout.encode(summary, pickle.dumps(manifest.metadata, protocol=pickle.HIGHEST_PROTOCOL))


def _decode_manifest(data: bytes | bytearray, uri: str) -> _Manifest:
    """The manifest in ``data``; ``CorruptCheckpointError`` for anything else at the URI."""
    summary, pickled = _dcp_layout.decode(data, uri)
    try:
        metadata = pickle.loads(pickled)
    except Exception as error:
        raise CorruptCheckpointError(
            f"{uri}: the distributed checkpoint's manifest is garbled: {error}", uri=uri
        ) from error
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(f"{uri}: the distributed checkpoint's manifest is garbled", uri=uri)
    return _Manifest(summary.save_id, metadata, summary.objects, summary.world_size)


class _Target:
    """A checkpoint's location, transfer settings and stores (opened on the portal's loop, once).

    For a :class:`~checkpointio.Checkpoint`, ``location`` is its ``dest`` (where a save goes) until
    :meth:`find_manifest` picks the source a load reads.
    """

    def __init__(self, target: Target, options: TransferOptions) -> None:
        self.sources: tuple[Location, ...] | None
        if isinstance(target, Checkpoint):
            self.config = target.config.with_options(**options)
            sources = tuple(checkpoint_location(uri) for uri in target.sources)
            target = target.dest
        else:
            self.config = TransferConfig().with_options(**options)
            sources = None
        self._stores: dict[str, Store] = {}
        self.reset(target)
        self.sources = sources

    def reset(self, target: str | os.PathLike[str]) -> None:
        """Point at ``target`` alone: an explicit checkpoint id replaces a ``Checkpoint``'s sources."""
        self.location = checkpoint_location(target)
        self.sources = None

    async def store(self, location: Location | None = None) -> Store:
        scheme = (location or self.location).scheme
        if scheme not in self._stores:
            self._stores[scheme] = await open_store(scheme, self.config)
        return self._stores[scheme]

    async def read_manifest(self, location: Location | None = None) -> _Manifest | None:
        """The manifest at the URI (or ``location``); ``None`` when there is no object there."""
        location = location or self.location
        data = await _dcp_layout.read_manifest(await self.store(location), location, self.config)
        if data is None:
            return None
        return await anyio.to_thread.run_sync(_decode_manifest, data, location.uri)

    async def find_manifest(self) -> _Manifest | None:
        """The manifest a load reads: the URI's or, for a ``Checkpoint``, that of its newest source
        holding a whole one (a garbled manifest or a missing data object is logged and the next
        older source tried, as ``Checkpoint.load()`` does). ``location`` becomes that source.

        Raises:
            CorruptCheckpointError: Every source holding something is corrupt (the newest one's error).
        """
        if self.sources is None:
            return await self.read_manifest()
        errors: list[CorruptCheckpointError] = []
        for location in self.sources:
            try:
                manifest = await self.read_manifest(location)
                if manifest is None:
                    continue
                await _head_objects(await self.store(location), location, manifest, sorted(manifest.objects))
            except CorruptCheckpointError as error:
                errors.append(error)
                logger.warning("skipping corrupt checkpoint %s", error)
                continue
            if errors:
                logger.warning("restoring the older checkpoint %s instead", location.uri)
            self.location = location
            return manifest
        if errors:
            raise errors[0]
        return None

    def agreed_manifest(self) -> _Manifest | None:
        """:meth:`find_manifest`, decided once for the whole process group (called by every rank).

        With a ``Checkpoint``'s sources, ranks choosing on their own could restore different
        steps (one rank seeing a newer manifest appear, or a data object missing, that another
        did not): rank 0 chooses and broadcasts its choice, or its error, to the others.
        """
        if self.sources is None or not _in_process_group():
            return run_sync(self.find_manifest)
        choice: list[Any] = [None]
        manifest: _Manifest | None = None
        failure: BaseException | None = None
        if torch.distributed.get_rank() == 0:
            try:
                manifest = run_sync(self.find_manifest)
                choice = [("found", self.location.uri) if manifest is not None else ("none", "")]
            except Exception as error:
                failure = error
                choice = [("error", str(error))]
        torch.distributed.broadcast_object_list(choice, src=0)
        outcome, detail = choice[0]
        if failure is not None:
            raise failure
        if outcome == "error":
            uri = self.sources[0].uri if self.sources else self.location.uri
            raise CorruptCheckpointError(f"rank 0 could not choose a checkpoint to load: {detail}", uri=uri)

        def adopt() -> _Manifest | None:
            if outcome == "none" or manifest is not None:
                return manifest
            self.location = checkpoint_location(detail)
            found = run_sync(self.read_manifest)
            if found is None:
                raise CheckpointNotFoundError(f"{detail}: the checkpoint rank 0 chose is gone", uri=detail)
            return found

        # the other ranks read rank 0's choice themselves: one failing fails all (none waits in the load)
        return _group.fail_together(adopt, detail or self.location.uri)

    async def committed_save_id(self) -> str | None:
        """The save id the manifest at the URI commits; ``None`` when there is none, or something
        else is there (of which only the first bytes are read)."""
        try:
            summary = await _dcp_layout.read_summary(await self.store(), self.location, self.config)
        except CorruptCheckpointError:
            return None
        return summary.save_id if summary is not None else None


def _in_process_group() -> bool:
    """Whether this process is one rank of several in an initialised process group."""
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1


def _failure_of(error: CheckpointException) -> CheckpointError | None:
    """The checkpointio error a rank raised inside DCP, if one did."""
    for failure in error.failures.values():
        one = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(one, CheckpointError):
            return one
    return None


def _describe(error: CheckpointException) -> str:
    """Each failed rank's error in one line (DCP's own message carries whole tracebacks)."""
    parts = []
    for rank, failure in sorted(error.failures.items()):
        one = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {type(one).__name__}: {one}")
    return "; ".join(parts) or str(error)


class StorageWriter(_StorageWriter):
    """DCP's ``StorageWriter`` for a checkpointio URI (local path, ``s3://``, ``memory://``), or a
    :class:`~checkpointio.Checkpoint` (it writes the checkpoint's ``dest``, with its settings).

    ``options`` are :class:`~checkpointio.TransferConfig` fields (part size, concurrency, S3
    endpoint and request options...). ``memory://`` works where every rank runs in one process.
    """

    def __init__(self, target: Target, **options: Unpack[TransferOptions]) -> None:
        super().__init__()
        self._target = _Target(target, options)
        self._save_id: str | None = None
        self._is_coordinator = False
        #: The manifest this process committed (the coordinator, once the save is stored).
        self._committed: _Manifest | None = None
        self._started = time.monotonic()  # of the save under way, for its INFO line

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._target.reset(checkpoint_id)
        self._save_id = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise CheckpointError(
                f"{self._target.location.uri}: checkpointio.dcp commits a save once for all ranks; "
                "dcp.save(use_collectives=False) is not supported",
                uri=self._target.location.uri,
            )
        self._is_coordinator = is_coordinator
        self._started = time.monotonic()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._save_id = _new_save_id()
        return [
            dataclasses.replace(plan, storage_data=_RankPlan(self._save_id, rank)) for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        ours = plan.storage_data
        if not isinstance(ours, _RankPlan):
            raise CheckpointError(
                f"{self._target.location.uri}: the save plan carries no save id (was prepare_global_plan skipped?)",
                uri=self._target.location.uri,
            )
        results: list[WriteResult] = []
        if plan.items:
            results = run_sync(self._write, ours, plan, planner)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    async def _write(self, ours: _RankPlan, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        """Stream every item of ``plan`` into this rank's one object (``torch.save`` for tensors,
        the bytes as they are for bytes items), noting each item's offset, length and CRC32."""
        name = _object_name(ours.save_id, ours.rank)
        location = _dcp_layout.data_location(self._target.location, name)
        placed: list[tuple[MetadataIndex, _Slice]] = []

        def write(out: BinaryIO) -> None:
            offset = 0
            for item in plan.items:
                data = planner.resolve_data(item)
                dtype: str = ""
                shape: tuple[int, ...] = ()
                if item.type == WriteItemType.BYTE_IO:
                    if not isinstance(data, io.BytesIO):
                        raise TypeError(f"a bytes item must resolve to io.BytesIO, got {type(data).__name__}")
                    buffer = data.getbuffer()
                else:
                    tensor = cast(torch.Tensor, data).detach().cpu()
                    if _plain(tensor):
                        # The elements as they lie in memory, written straight from the tensor (no
                        # serialised copy): the slice records what a load needs to read them back.
                        # Lazy conjugate and negative bits are applied first: memory holds the
                        # elements before them.
                        tensor = tensor.resolve_conj().resolve_neg().contiguous()
                        dtype, shape = str(tensor.dtype), tuple(tensor.shape)
                        buffer = _memory_of(tensor)
                    else:  # quantized, sparse, nested: torch's own format keeps what they are
                        serialised = io.BytesIO()
                        torch.save(tensor, serialised)
                        buffer = serialised.getbuffer()
                out.write(buffer)
                placed.append((item.index, _Slice(name, offset, len(buffer), _codec.crc32(buffer), dtype, shape)))
                offset += len(buffer)

        info = await _engine.save_written(await self._target.store(), location, write, self._target.config)
        record = info.record
        if record is None or record.size is None or record.crc32 is None:  # pragma: no cover - every store records
            raise CheckpointError(f"{location.uri}: the store kept no size and CRC32", uri=location.uri)
        return [
            WriteResult(index=index, size_in_bytes=one.length, storage_data=_Written(one, record.size, record.crc32))
            for index, one in placed
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: write the manifest at the URI (after every rank's data is stored), then delete
        the data of the save it replaced (see :meth:`_commit`)."""
        save_id = self._save_id
        uri = self._target.location.uri
        if save_id is None:
            raise CheckpointError(f"{uri}: finish() before prepare_global_plan()", uri=uri)
        slices: dict[MetadataIndex, _Slice] = {}
        objects: dict[str, tuple[int, int]] = {}
        for rank_results in results:
            for result in rank_results:
                written = result.storage_data
                if not isinstance(written, _Written):
                    raise CheckpointError(f"{uri}: a rank reported a write checkpointio did not make", uri=uri)
                slices[result.index] = written.slice
                objects[written.slice.object] = (written.object_size, written.object_crc32)
        metadata.storage_data = slices
        metadata.storage_meta = StorageMeta(checkpoint_id=uri, save_id=save_id)
        run_sync(self._commit, _Manifest(save_id, metadata, objects, len(results)))
        # Here, not in save(): torch's own dcp.save(..., storage_writer=...) commits through this too.
        _log_done("saved", uri, self._committed, self._started)

    async def _commit(self, manifest: _Manifest) -> None:
        """Write the manifest, then delete the data it replaced.

        Only data of saves whose manifest was superseded is deleted: the one this commit replaced
        (read just before), and this save's own if another commit landed after it. The data of a
        save that has not committed yet is never touched here (a slower save racing this one may
        still commit it); what a failed or killed save left behind goes with ``checkpointio gc``.
        """
        store = await self._target.store()
        location = self._target.location
        before = await self._target.committed_save_id()
        data = _encode_manifest(manifest)
        await _engine.save_object(store, location, data, Kind.BYTES, self._target.config, layout=_dcp_layout.LAYOUT)
        self._committed = manifest
        try:
            live = await self._target.committed_save_id()
            if live is None:  # unreadable now: keep everything rather than guess
                return
            superseded = {manifest.save_id} | ({before} if before is not None else set())
            for save_id in sorted(superseded - {live}):
                await _dcp_layout.delete_save(store, location, save_id)
        except Exception as error:  # committed: stale data costs space, not correctness
            logger.warning("%s: could not delete the data of earlier saves: %s", location.uri, error)

    def discard_failed_save(self) -> None:
        """After a failed save, delete the data its ranks stored (on the coordinator, best effort).

        Called once every rank has stopped writing (DCP gathers the ranks' outcomes before it
        raises). Data the live manifest points to is never deleted: a commit whose reply was lost
        may have landed.
        """
        run_sync(self.discard_failed_save_async)

    async def discard_failed_save_async(self) -> None:
        """:meth:`discard_failed_save` on the event loop."""
        save_id = self._save_id
        if not self._is_coordinator or save_id is None:
            return
        try:
            if await self._target.committed_save_id() != save_id:
                await _dcp_layout.delete_save(await self._target.store(), self._target.location, save_id)
        except Exception as error:
            logger.warning("%s: could not delete the data of the failed save: %s", self._target.location.uri, error)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self._target.location.uri, save_id=self._save_id or "")

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint's URI."""
        return self._target.location.uri

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _valid(checkpoint_id)


def _valid(checkpoint_id: str | os.PathLike[str]) -> bool:
    try:
        checkpoint_location(checkpoint_id)
    except ValueError:
        return False
    return True


async def _head_objects(
    store: Store, location: Location, manifest: _Manifest, names: list[str]
) -> dict[str, ObjectInfo]:
    """Each data object's description, checked against the size the manifest records.

    Raises:
        CorruptCheckpointError: One is missing or of another size.
    """
    infos: dict[str, ObjectInfo] = {}

    async def head(name: str) -> None:
        data = _dcp_layout.data_location(location, name)
        info = await _engine.head_for_reads(store, data, one_of_many=True)  # on the receivers in turn, as the reads
        if info is None:
            raise CorruptCheckpointError(
                f"{location.uri}: its data object {data.uri} (rank {_dcp_layout.rank_of(name)}) is missing",
                uri=location.uri,
            )
        expected = manifest.objects.get(name, (info.size, 0))[0]
        if info.size != expected:
            raise CorruptCheckpointError(
                f"{location.uri}: its data object {data.uri} (rank {_dcp_layout.rank_of(name)}) holds "
                f"{info.size} bytes, the manifest records {expected}",
                uri=location.uri,
            )
        infos[name] = info

    with one_error():
        async with anyio.create_task_group() as group:
            for name in names:
                group.start_soon(head, name)
    return infos


@dataclass
class _Range:
    """One request: a run of adjacent items of one object."""

    object: str
    offset: int
    length: int
    slices: list[_Slice]


@dataclass
class _Place:
    """Where one item of a range is received: ``buffer`` is the memory of ``received``, the
    target tensor it goes to as it is, or a buffer of its own (then converted into ``resolved``,
    the target its one request resolved to, if any, or into each request's)."""

    piece: _Slice
    buffer: memoryview
    received: torch.Tensor | None = None
    resolved: torch.Tensor | None = None


def _coalesce(slices: Sequence[_Slice], most: int) -> list[_Range]:
    """Join items that follow each other in one object into ranges of at most ``most`` bytes (an
    item larger than that is a range of its own)."""
    ranges: list[_Range] = []
    for one in sorted(set(slices), key=lambda s: (s.object, s.offset, s.length)):
        last = ranges[-1] if ranges else None
        if (
            last is not None
            and last.object == one.object
            and last.offset + last.length == one.offset
            and last.length + one.length <= most
        ):
            last.length += one.length
            last.slices.append(one)
        else:
            ranges.append(_Range(one.object, one.offset, one.length, [one]))
    return ranges


class StorageReader(_StorageReader):
    """DCP's ``StorageReader`` for a checkpointio URI written by :class:`StorageWriter`, or a
    :class:`~checkpointio.Checkpoint` (it reads the newest of its sources holding a whole
    distributed checkpoint, as ``Checkpoint.load()`` does, with its settings).

    ``options`` are :class:`~checkpointio.TransferConfig` fields; ``max_concurrency`` ranges are
    fetched at once, each at most ``part_size`` bytes (adjacent items joined up to that).
    """

    def __init__(self, target: Target, **options: Unpack[TransferOptions]) -> None:
        super().__init__()
        self._target = _Target(target, options)
        self._manifest: _Manifest | None = None
        self._storage_data: dict[MetadataIndex, _Slice] = {}
        self._created = time.monotonic()  # a restore's loads go through one reader: its INFO line times them all

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._target.reset(checkpoint_id)
            self._manifest = None
        self._storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        uri = self._target.location.uri
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata, which we never write
            raise CheckpointNotFoundError(
                f"{uri}: no per-rank metadata (checkpointio.dcp writes one manifest)", uri=uri
            )
        if self._manifest is None:
            manifest = self._target.agreed_manifest()
            if manifest is None:
                there = "there" if self._target.sources is None else "in any of its sources"
                raise CheckpointNotFoundError(f"{uri}: no distributed checkpoint {there}", uri=uri)
            self._manifest = manifest
        metadata = self._manifest.metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        storage_data = metadata.storage_data
        if not isinstance(storage_data, dict) or not all(isinstance(one, _Slice) for one in storage_data.values()):
            uri = self._target.location.uri
            raise CorruptCheckpointError(f"{uri}: the metadata does not come from checkpointio.dcp", uri=uri)
        self._storage_data = storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fetch the ranges the plan's items lie in, ``max_concurrency`` at a time, each received
        straight into the state dict's tensors where they take its items' bytes as they are, and
        hand each range's items to the planner (CRC32 checked) as soon as it is whole. At most
        ``max_concurrency`` ranges are held at once, and only their items that must be converted."""
        config = self._target.config
        wanted: dict[_Slice, list[ReadItem]] = {}
        for item in plan.items:
            wanted.setdefault(self._storage_data[item.storage_index], []).append(item)
        ranges = _coalesce(list(wanted), config.part_size)
        if ranges:
            run_sync(self._read, ranges, wanted, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    async def _read(self, ranges: list[_Range], wanted: dict[_Slice, list[ReadItem]], planner: LoadPlanner) -> None:
        store = await self._target.store()
        manifest = self._manifest or _Manifest("", Metadata({}), {})
        infos = await _head_objects(store, self._target.location, manifest, sorted({one.object for one in ranges}))
        slots = anyio.Semaphore(self._target.config.max_concurrency)  # ranges fetched and not yet delivered
        # Every call of the planner (resolve_tensor before a range is received, commit_tensor and
        # load_bytes once it is whole) runs in a worker thread, one at a time: the planner is not
        # thread-safe. Ranges are received meanwhile on the store's own threads.
        planning = anyio.CapacityLimiter(1)

        async def fetch(one: _Range) -> None:
            try:
                places = await anyio.to_thread.run_sync(self._places, one, wanted, planner, limiter=planning)
                crc32s = await store.read_range_into(infos[one.object], one.offset, [place.buffer for place in places])
                await anyio.to_thread.run_sync(self._deliver, places, crc32s, wanted, planner, limiter=planning)
            finally:
                slots.release()

        with one_error():
            async with anyio.create_task_group() as group:
                for one in ranges:
                    await slots.acquire()
                    group.start_soon(fetch, one)

    def _places(self, one: _Range, wanted: dict[_Slice, list[ReadItem]], planner: LoadPlanner) -> list[_Place]:
        """Worker thread, before ``one`` is fetched: where each of its items is received. An item
        whose one request takes its bytes as they are (see :func:`_in_place`) goes straight into
        the target's memory; any other into a buffer of its own, converted once checked."""
        uri = self._target.location.uri
        places = []
        for piece in one.slices:
            requests = wanted[piece]
            if len(requests) == 1 and requests[0].type != LoadItemType.BYTE_IO:
                target = planner.resolve_tensor(requests[0]).detach()
                if _in_place(requests[0], piece, target, uri):
                    # A write autograd does not see: counted as the in-place change it is (as copy_
                    # counts one), so a backward through a graph that saved the old values raises.
                    # Counted before the bytes arrive, so that a load failing half-way counts too.
                    increment_version(target)
                    places.append(_Place(piece, _memory_of(target), target))
                    continue
                places.append(_Place(piece, memoryview(bytearray(piece.length)), None, target))
                continue
            places.append(_Place(piece, memoryview(bytearray(piece.length))))
        return places

    def _deliver(
        self, places: list[_Place], crc32s: Sequence[int], wanted: dict[_Slice, list[ReadItem]], planner: LoadPlanner
    ) -> None:
        """Worker thread, once a range is whole: check each item's CRC32, then hand it to the
        planner (converted into its target first where it was not received into it)."""
        uri = self._target.location.uri
        for place, crc32 in zip(places, crc32s, strict=True):
            piece = place.piece
            if crc32 != piece.crc32:
                where = _dcp_layout.data_location(self._target.location, piece.object).uri
                raise ChecksumMismatchError(
                    f"{where}: the bytes {piece.offset}..{piece.offset + piece.length} saved by rank "
                    f"{_dcp_layout.rank_of(piece.object)} do not match their CRC32 (the object is corrupt); "
                    "the state dict is left partly loaded (its tensors may hold these bytes): load it "
                    "again from a whole checkpoint before using it",
                    uri=where,
                )
            if place.received is not None:  # already in place
                planner.commit_tensor(wanted[piece][0], place.received)
                continue
            for request in wanted[piece]:
                if request.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(request, io.BytesIO(place.buffer))
                    continue
                target = place.resolved if place.resolved is not None else planner.resolve_tensor(request).detach()
                tensor = narrow_tensor_by_index(
                    self._stored_tensor(piece, place.buffer), request.storage_offsets, request.lengths
                )
                if target.size() != tensor.size():
                    raise CheckpointError(
                        f"{uri}: {request.dest_index.fqn} is {tuple(tensor.size())} in the "
                        f"checkpoint, {tuple(target.size())} in the state dict",
                        uri=uri,
                    )
                target.copy_(tensor)
                planner.commit_tensor(request, target)

    def _stored_tensor(self, piece: _Slice, chunk: memoryview) -> torch.Tensor:
        """The tensor one item holds."""
        uri = self._target.location.uri
        if not piece.dtype:  # a tensor in torch's own format: quantized, sparse or nested
            try:
                stored = torch.load(io.BytesIO(chunk), map_location="cpu", weights_only=True)
            except Exception as error:
                raise CorruptCheckpointError(
                    f"{uri}: an item where DCP asks for a tensor does not load as one ({error})", uri=uri
                ) from error
            if not isinstance(stored, torch.Tensor):
                raise CorruptCheckpointError(
                    f"{uri}: the manifest records {type(stored).__name__} where DCP asks for a tensor", uri=uri
                )
            return stored
        dtype = _dtype_named(piece.dtype, uri)
        if not chunk:
            return torch.empty(piece.shape, dtype=dtype)
        return torch.frombuffer(chunk, dtype=dtype).reshape(piece.shape)  # the item's own (writable) buffer

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint's URI."""
        return self._target.location.uri

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _valid(checkpoint_id)


def _unwrapped(call: Callable[[], Any], loading: str | None = None, saving: str | None = None) -> Any:
    """Run a DCP call; a checkpointio error a rank raised inside it comes out as itself. Any other
    failure of a load (``loading``: its URI) is a ``CheckpointError`` naming the URI and each rank's
    error (a key missing from the checkpoint, a world size it cannot be resharded to...); of a save
    (``saving``) too (an object that cannot be serialized...), as a background save's failure is.
    DCP's own ``CheckpointException`` is a ``BaseException``: neither a task's retries nor an
    ``except Exception`` would see it.

    Without a process group DCP warns that it assumes one process: here that is meant, not news.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            return call()
    except CheckpointException as error:
        failure = _failure_of(error)
        if failure is not None:
            raise failure from error
        if loading is not None:
            raise CheckpointError(
                f"{loading}: the checkpoint does not fit the state dict: {_describe(error)}", uri=loading
            ) from error
        if saving is not None:
            raise CheckpointError(f"{saving}: the distributed save failed: {_describe(error)}", uri=saving) from error
        raise


class DistributedSaveHandle(SaveHandle):
    """What ``save(..., wait=False)`` returns: a :class:`~checkpointio.SaveHandle` of a distributed save.

    It behaves as a background save's handle does (``done()``, ``result()``, ``exception()``,
    ``await handle``, ``add_done_callback``), and its error is never lost: one nobody retrieved
    is raised, as :class:`~checkpointio.BackgroundSaveError`, by this process's next
    ``checkpointio.dcp`` ``save()`` or ``load()``, and logged at interpreter exit. It cannot be
    cancelled: every rank takes part in the save, one of them cannot call it off.
    """

    def cancel(self) -> None:
        """Does nothing: a distributed save runs to its end on every rank (see the class)."""


_lock = threading.Lock()
#: This process's saves with ``wait=False`` not yet settled by a later save or load.
_in_flight: list[DistributedSaveHandle] = []


def _forget_parents_saves() -> None:
    """In a forked child: the parent's saves can never end here, so they are not the child's to wait for."""
    global _lock
    _lock = threading.Lock()
    _in_flight.clear()


os.register_at_fork(after_in_child=_forget_parents_saves)


def _join_saves_in_flight() -> None:
    """Block until this process's ``wait=False`` saves have ended (their errors stay for whoever
    retrieves them): a task's agreement on its attempt is a collective too."""
    with _lock:
        earlier = list(_in_flight)
    for handle in earlier:
        if handle.in_this_process():
            handle.join()


_group.on_agree(_join_saves_in_flight)


def _wait_for_earlier_saves() -> None:
    """Wait for this process's earlier ``wait=False`` saves (two saves' collectives must never
    interleave), then raise the first failure nobody retrieved."""
    with _lock:
        earlier = list(_in_flight)
        _in_flight.clear()
    errors = []
    for handle in earlier:
        if not handle.in_this_process():
            continue
        handle.join()
        error = handle.unseen_error()
        if error is not None:
            errors.append(error)
    if errors:
        raise errors[0]


def _log_loaded(reader: StorageReader) -> None:
    """The INFO line of a distributed load that succeeded on every rank, by rank 0: once per
    restore (:func:`load`; the Lightning and Hugging Face integrations, after all their loads
    through one reader). DCP gives a storage reader no hook once the whole group read, so torch's
    own ``dcp.load`` through :class:`StorageReader` logs none."""
    if not _in_process_group() or torch.distributed.get_rank() == 0:
        _log_done("loaded", reader.checkpoint_id, reader._manifest, reader._created)


def _log_done(done: str, uri: str, manifest: _Manifest | None, started: float) -> None:
    """The INFO line of a distributed save (by the process that committed it, whoever called
    DCP: :func:`save`, torch's own ``dcp.save`` with :class:`StorageWriter`, the integrations)
    or load (:func:`_log_loaded`), as ``Checkpoint.save`` and ``load`` log theirs."""
    if manifest is None:
        return
    stored = human_size(sum(size for size, _ in manifest.objects.values()))
    seconds = time.monotonic() - started
    logger.info(
        "%s distributed checkpoint %s (world size %d, %s of data in %.1f s)",
        done,
        uri,
        manifest.world_size,
        stored,
        seconds,
    )


def save(
    state_dict: dict[str, Any],
    target: Target,
    *,
    wait: bool = True,
    planner: SavePlanner | None = None,
    **options: Unpack[TransferOptions],
) -> DistributedSaveHandle:
    """Save ``state_dict`` with ``torch.distributed.checkpoint.save`` to ``target``, committed at once.

    Called by every rank of the process group (or alone, without one). ``options`` are
    :class:`~checkpointio.TransferConfig` fields. With ``wait=False`` the save goes on in the
    background (``torch.distributed.checkpoint.async_save``: the state is copied to CPU memory
    first, so training may change it at once) and the returned handle tells how it ended.
    ``planner`` is DCP's (its default planner unless given). It first waits for this process's
    earlier ``wait=False`` save, if one still runs. Called at interpreter exit (from an
    ``atexit`` hook), it saves in the foreground whatever ``wait`` says.

    Returns:
        The save's handle, already done unless ``wait=False``.

    Raises:
        BackgroundSaveError: An earlier ``wait=False`` save failed and nobody retrieved its error.
        CheckpointError: The save failed on a rank (the store's error as itself; any other, an
            object that cannot be serialized, say, as a ``CheckpointError`` naming the URI, DCP's
            ``CheckpointException`` as its cause); the previous checkpoint stays.
    """
    _wait_for_earlier_saves()
    if isinstance(target, Checkpoint) and not wait:
        # It becomes the checkpoint's save in flight: waited for (and its failure raised) by the
        # checkpoint's next save, wait() and close(), so a task's attempt ends once it is stored.
        run_sync(target._inflight.wait_for_it, False)
    writer = StorageWriter(target, **options)
    if wait or _exit.passed(_exit.Stage.SAVES) or _exit.began():
        # At interpreter exit (from an atexit hook) DCP's async_save cannot start its thread, and
        # once the exit step waited for background saves nobody would wait for this one: save here.
        try:
            _unwrapped(
                lambda: _dcp_save(state_dict, storage_writer=writer, planner=planner), saving=writer.checkpoint_id
            )
        except (Exception, CheckpointException):  # DCP's own error is a BaseException
            writer.discard_failed_save()
            raise
        return DistributedSaveHandle(writer.checkpoint_id)
    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    future = cast(
        concurrent.futures.Future[Any],
        _dcp_async_save(state_dict, storage_writer=writer, planner=planner, no_dist=single),
    )
    uri = writer.checkpoint_id
    work = BackgroundSave(uri, f"distributed save to {uri}")
    work.start(_awaited, writer, future)
    handle = DistributedSaveHandle(uri, work)
    with _lock:
        _in_flight.append(handle)
    if isinstance(target, Checkpoint):
        target._inflight.adopt(handle)
    return handle


async def _awaited(writer: StorageWriter, future: concurrent.futures.Future[Any]) -> None:
    """The outcome of DCP's background save: a checkpointio error where a rank raised one."""
    try:
        await asyncio.wrap_future(future)
    except (Exception, CheckpointException) as error:
        await writer.discard_failed_save_async()
        if isinstance(error, CheckpointException):
            failure = _failure_of(error)
            uri = writer.checkpoint_id
            if failure is not None:
                raise failure from error
            raise CheckpointError(f"{uri}: the distributed save failed: {_describe(error)}", uri=uri) from error
        raise


def load(
    state_dict: dict[str, Any],
    target: Target,
    *,
    planner: LoadPlanner | None = None,
    **options: Unpack[TransferOptions],
) -> bool:
    """Load ``target`` into ``state_dict`` in place (``torch.distributed.checkpoint.load``, which
    reshards to this world size); ``False``, and ``state_dict`` untouched, when there is no
    checkpoint at ``target`` (a first attempt). ``planner`` is DCP's (its default planner unless
    given). It first waits for this process's earlier
    ``save(wait=False)``, if one still runs.

    Raises:
        CorruptCheckpointError: Something that is not a distributed checkpoint is at ``target``.
        ChecksumMismatchError: A data object's bytes do not match their CRC32.
        CheckpointError: The checkpoint does not fit ``state_dict`` (a key it lacks, a shape or
            world size it cannot be resharded to): DCP's error, with the URI.
        BackgroundSaveError: An earlier ``wait=False`` save failed and nobody retrieved its error.
    """
    reader = StorageReader(target, **options)
    if not _load_with(state_dict, reader, planner):
        return False
    _log_loaded(reader)
    return True


def _agree_on_manifest(reader: StorageReader) -> bool:
    """Whether there is a checkpoint for ``reader`` to load, decided by rank 0 for the whole group
    (called by every rank); the reader keeps the manifest."""
    if reader._manifest is None:
        reader._manifest = reader._target.agreed_manifest()
    return reader._manifest is not None


def _load_with(state_dict: dict[str, Any], reader: StorageReader, planner: LoadPlanner | None = None) -> bool:
    """:func:`load` through ``reader``: several loads through one reader read one manifest (the
    parts of one checkpoint loaded one after the other, as a model before its optimizer)."""
    _wait_for_earlier_saves()
    if not _agree_on_manifest(reader):
        return False
    _unwrapped(lambda: _dcp_load(state_dict, storage_reader=reader, planner=planner), loading=reader.checkpoint_id)
    return True


def latest(prefix: str | os.PathLike[str], **options: Unpack[TransferOptions]) -> str | None:
    """The URI of the newest distributed checkpoint committed under ``prefix`` (a folder, or an
    ``s3://`` prefix), by when its save started; ``None`` when there is none.

    Every rank may call it: each lists the prefix itself (Lightning's ``load_checkpoint`` then
    loads the URI rank 0 names).
    """
    text = os.fspath(prefix)
    if split_scheme(text) is None and not os.path.isdir(text):
        return None  # nothing saved there yet
    return run_sync(_latest, text, TransferConfig().with_options(**options))


async def _latest(prefix: str, config: TransferConfig) -> str | None:
    from . import _manage

    found = await _manage.distributed_among(await _manage.list_checkpoints(prefix, config), config)
    if not found:
        return None
    saves = {one.summary.save_id: one.manifest.location.uri for one in found.values() if one.summary is not None}
    return saves[max(saves)]


def _newest_source(checkpoint: Checkpoint, **options: Unpack[TransferOptions]) -> str | None:
    """The URI of the newest of ``checkpoint``'s sources that holds a whole distributed
    checkpoint (what :func:`load` would read); ``None`` when none does.

    Raises:
        CorruptCheckpointError: Every source holding something is corrupt (the newest one's error).
    """
    target = _Target(checkpoint, options)
    return None if run_sync(target.find_manifest) is None else target.location.uri


def remove(uri: str | os.PathLike[str], **options: Unpack[TransferOptions]) -> bool:
    """Delete the distributed checkpoint at ``uri``, its manifest first, then its data; ``False``
    when there is none.

    Raises:
        DestinationError: ``uri`` is a local file checkpointio did not write; it is kept.
    """
    from . import _manage

    try:
        run_sync(_manage.remove, str(uri), TransferConfig().with_options(**options))
    except CheckpointNotFoundError:
        return False
    return True
