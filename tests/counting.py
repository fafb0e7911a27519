"""A store that counts the requests made through it and the bytes they brought back.

Shared by the tests (``tests/test_partial.py``) and the benchmarks (``benchmarks/partial.py``),
which measure partial restores and listings by what they ask of the store: no network capture,
and the same counts over every store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from checkpointio._location import Location
from checkpointio._stores import Body, ObjectInfo, PendingWrite, Record, Sink, Store

__all__ = ["CountingStore"]


@dataclass
class CountingStore:
    """Passes every call to ``inner``; notes each request it makes (``head``, ``put``, ``get``,
    ``range OFFSET+LENGTH``, ``delete``, ``pending``, ``discard``, ``list``, ``create``) in order,
    the bytes reads brought back and the bytes puts stored: a bound on requests counts every kind."""

    inner: Store
    requests: list[str] = field(default_factory=list)
    received: int = 0
    #: Bytes of the objects stored through ``put``: what the saves uploaded.
    sent: int = 0

    async def head(self, location: Location) -> ObjectInfo | None:
        self.requests.append("head")
        return await self.inner.head(location)

    async def put(self, location: Location, body: Body, record: Record, *, force: bool = False) -> ObjectInfo:
        self.requests.append("put")
        info = await self.inner.put(location, body, record, force=force)
        self.sent += info.size
        return info

    async def get(self, info: ObjectInfo, sink: Sink) -> None:
        self.requests.append("get")

        async def counted(blocks: list[bytes]) -> None:
            self.received += sum(map(len, blocks))
            await sink(blocks)

        await self.inner.get(info, counted)

    async def delete(self, location: Location, *, force: bool = False) -> bool:
        self.requests.append("delete")
        return await self.inner.delete(location, force=force)

    async def pending(self, prefix: Location) -> list[PendingWrite]:
        self.requests.append("pending")
        return await self.inner.pending(prefix)

    async def discard(self, write: PendingWrite) -> bool:
        self.requests.append("discard")
        return await self.inner.discard(write)

    async def list(self, prefix: Location) -> list[ObjectInfo]:
        self.requests.append("list")
        return await self.inner.list(prefix)

    async def create(self, location: Location, data: bytes, record: Record) -> bool:
        self.requests.append("create")
        return await self.inner.create(location, data, record)

    async def read_range(self, info: ObjectInfo, offset: int, length: int) -> bytes:
        self.requests.append(f"range {offset}+{length}")
        data = await self.inner.read_range(info, offset, length)
        self.received += len(data)
        return data

    async def read_range_into(self, info: ObjectInfo, offset: int, buffers: Sequence[memoryview]) -> Sequence[int]:
        length = sum(buffer.nbytes for buffer in buffers)
        self.requests.append(f"range {offset}+{length}")
        crc32s = await self.inner.read_range_into(info, offset, buffers)
        self.received += length
        return crc32s
