"""An in-process store (``memory://name``): for tests, users' tests and throwaway runs.

Objects live in a process-wide dictionary shared by every event loop and thread; a save becomes
visible in one assignment when it completes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .._concurrency import ForkSafeLock
from .._config import TransferConfig
from .._exceptions import ConcurrentModificationError, CorruptCheckpointError
from .._location import Location
from ._base import Body, Filling, ObjectInfo, PendingWrite, Record, Sink, under

__all__ = ["MemoryStore", "read_raw", "write_raw"]


@dataclass(frozen=True)
class _Object:
    data: bytes
    info: ObjectInfo


_objects: dict[str, _Object] = {}
_lock = ForkSafeLock()  # a forked child finds it released


def read_raw(location: Location) -> tuple[bytes, ObjectInfo]:
    """The bytes and description held at ``location``, as they are (nothing checked).

    With :func:`write_raw`, how a test puts the store in a state a save never leaves, as it would
    write a file or an S3 object directly on the other stores.

    Raises:
        KeyError: Nothing is held there.
    """
    with _lock:
        obj = _objects[location.key]
    return obj.data, obj.info


def write_raw(location: Location, data: bytes, info: ObjectInfo | None = None) -> None:
    """Hold ``data`` at ``location`` as given, bypassing a save.

    Without ``info`` the object has no record, as one another tool wrote; with the ``info`` of the
    object it replaces (from :func:`read_raw`), it is that object damaged in place.
    """
    if info is None:
        info = ObjectInfo(location, len(data), uuid.uuid4().hex, modified=time.time())
    with _lock:
        _objects[location.key] = _Object(data, info)


def _key(info: ObjectInfo) -> str:
    return info.location.key


class MemoryStore:
    """Checkpoints held in this process's memory."""

    def __init__(self, config: TransferConfig) -> None:
        self._config = config

    async def head(self, location: Location) -> ObjectInfo | None:
        with _lock:
            obj = _objects.get(location.key)
        return obj.info if obj is not None else None

    async def put(self, location: Location, body: Body, record: Record, *, force: bool = False) -> ObjectInfo:
        parts = [chunk async for chunk in body]
        data = b"".join(parts)
        info = ObjectInfo(location, len(data), uuid.uuid4().hex, record.completed(body.digest), modified=time.time())
        with _lock:
            _objects[location.key] = _Object(data, info)
        return info

    async def get(self, info: ObjectInfo, sink: Sink) -> None:
        with _lock:
            obj = _objects.get(info.location.key)
        if obj is None or obj.info.etag != info.etag:
            raise ConcurrentModificationError(f"{info.location.uri}: replaced while being read", uri=info.location.uri)
        view = memoryview(obj.data)
        step = self._config.chunk_size
        for start in range(0, len(view), step):
            await sink([bytes(view[start : start + step])])

    async def delete(self, location: Location, *, force: bool = False) -> bool:
        with _lock:
            return _objects.pop(location.key, None) is not None

    async def pending(self, prefix: Location) -> list[PendingWrite]:
        return []  # a save here becomes visible in one assignment: nothing is ever left half-done

    async def discard(self, write: PendingWrite) -> bool:
        return False

    async def list(self, prefix: Location) -> list[ObjectInfo]:
        with _lock:
            infos = [obj.info for key, obj in _objects.items() if key.startswith(prefix.key)]
        return sorted(under(prefix.key, infos, _key), key=_key)

    async def create(self, location: Location, data: bytes, record: Record) -> bool:
        info = ObjectInfo(location, len(data), uuid.uuid4().hex, record, modified=time.time())
        with _lock:
            if location.key in _objects:
                return False
            _objects[location.key] = _Object(data, info)
        return True

    async def read_range(self, info: ObjectInfo, offset: int, length: int) -> bytes:
        return bytes(_range_of(info, offset, length))

    async def read_range_into(self, info: ObjectInfo, offset: int, buffers: Sequence[memoryview]) -> Sequence[int]:
        filling = Filling(buffers)
        filling.write(_range_of(info, offset, filling.size))
        return filling.crc32s


def _range_of(info: ObjectInfo, offset: int, length: int) -> memoryview:
    """``length`` bytes of the object ``info`` describes, from ``offset`` (a view, no copy)."""
    with _lock:
        obj = _objects.get(info.location.key)
    if obj is None or (info.pinned and obj.info.etag != info.etag):
        raise ConcurrentModificationError(f"{info.location.uri}: replaced while being read", uri=info.location.uri)
    if offset < 0 or length < 0 or offset + length > len(obj.data):
        raise CorruptCheckpointError(
            f"{info.location.uri}: bytes {offset}..{offset + length} asked for, the object holds {len(obj.data)}",
            uri=info.location.uri,
        )
    return memoryview(obj.data)[offset : offset + length]
