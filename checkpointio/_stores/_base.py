"""What every store offers the engine, and the record stored with each checkpoint object.

A store moves opaque bytes: it never looks inside them. The engine hands it a :class:`Body` (an
async stream of chunks whose producer keeps a running CRC32) and receives chunks back through a
sink, in order.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar, runtime_checkable

from .._codec import crc32
from .._location import Location

__all__ = [
    "Blocks",
    "Body",
    "Digest",
    "Filling",
    "Kind",
    "ObjectInfo",
    "OrderedRead",
    "PendingWrite",
    "RangeSink",
    "RangedStore",
    "Record",
    "Sink",
    "Store",
    "under",
]

#: Some of an object's bytes: the blocks a store received them in (joining them would be a copy).
Blocks = list[bytes]
#: Receives the bytes of an object in order, as blocks; awaiting it applies back-pressure.
Sink = Callable[[Blocks], Awaitable[None]]
#: Receives a piece of an object, ``(offset, blocks)``, in any order (see ``RangedStore``): called
#: on the store's receiving threads, several at once, so it must be thread-safe; it may block (its
#: range waits meanwhile).
RangeSink = Callable[[int, Blocks], None]

_Item = TypeVar("_Item")


class Filling:
    """An object's bytes written in order across ``buffers`` (writable, as ``memoryview``s of
    bytes), each buffer's CRC32 taken of what was written into it, as it is written: one pass over
    memory that is still in the cache, no second read. What :meth:`Store.read_range_into` does."""

    def __init__(self, buffers: Sequence[memoryview]) -> None:
        self._buffers = [buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer for buffer in buffers]
        #: Per buffer, the CRC32 of the bytes written into it so far.
        self.crc32s = [0] * len(self._buffers)
        #: Bytes written so far, and how many ``buffers`` take in all.
        self.length = 0
        self.size = sum(len(buffer) for buffer in self._buffers)
        self._index = 0  # the buffer being written, and where in it
        self._at = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` next; ``ValueError`` if it goes past the last buffer's end."""
        view = memoryview(data).cast("B")
        if self.length + len(view) > self.size:
            raise ValueError(f"{self.length + len(view)} bytes written where {self.size} were asked for")
        done = 0
        while done < len(view):
            buffer = self._buffers[self._index]
            if self._at == len(buffer):
                self._index, self._at = self._index + 1, 0
                continue
            count = min(len(buffer) - self._at, len(view) - done)
            into = buffer[self._at : self._at + count]
            into[:] = view[done : done + count]
            self.crc32s[self._index] = crc32(into, self.crc32s[self._index])
            self._at += count
            done += count
        self.length += done


_PREFIX = "checkpointio-"
FORMAT_VERSION = "1"


class Kind(str, enum.Enum):
    """What was saved, which decides how it is restored."""

    BYTES = "bytes"
    FILE = "file"
    DIRECTORY = "dir"


#: ``Record.layout`` of an incremental checkpoint's manifest (a directory's record).
INCREMENTAL = "incremental"
#: ``Record.layout`` of a distributed checkpoint's manifest (a bytes record): no checkpoint of its
#: own; only ``checkpointio.dcp`` restores what it commits.
DISTRIBUTED = "distributed"
#: Each layout's first bytes, which tell its manifest where the record was lost (an object copied
#: without its metadata or sidecar).
MANIFEST_MAGIC = {INCREMENTAL: b"checkpointio-incremental/", DISTRIBUTED: b"checkpointio-dcp/"}


@dataclass(frozen=True)
class Record:
    """What checkpointio stores with an object: its kind and, once known, size and CRC32.

    Objects written by other tools have no record; their kind is recognised by content.
    """

    kind: Kind
    size: int | None = None
    crc32: int | None = None
    #: What the object is when not a checkpoint of its kind as such: :data:`INCREMENTAL` (a
    #: directory's manifest) or :data:`DISTRIBUTED` (a manifest only ``checkpointio.dcp`` loads).
    #: A load needs no read to tell.
    layout: str | None = None

    def to_metadata(self) -> dict[str, str]:
        """Encode as string metadata (S3 user metadata, the local sidecar)."""
        meta = {f"{_PREFIX}format": FORMAT_VERSION, f"{_PREFIX}kind": self.kind.value}
        if self.size is not None:
            meta[f"{_PREFIX}size"] = str(self.size)
        if self.crc32 is not None:
            meta[f"{_PREFIX}crc32"] = f"{self.crc32:08x}"
        if self.layout is not None:
            meta[f"{_PREFIX}layout"] = self.layout
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Record | None:
        """Decode; ``None`` when the metadata holds no (understandable) record."""
        try:
            kind = Kind(meta[f"{_PREFIX}kind"])
            size = meta.get(f"{_PREFIX}size")
            crc = meta.get(f"{_PREFIX}crc32")
            layout = meta.get(f"{_PREFIX}layout")
            return cls(kind, int(size) if size is not None else None, int(crc, 16) if crc is not None else None, layout)
        except (KeyError, ValueError):
            return None

    def completed(self, digest: Digest) -> Record:
        """This record with the size and CRC32 of the bytes that were actually stored."""
        return replace(self, size=digest.length, crc32=digest.crc32)


@dataclass
class Digest:
    """Running length and CRC32 of a byte stream, kept by whichever thread produces the bytes."""

    length: int = 0
    crc32: int = 0


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object, as a HEAD or a listing sees it.

    Attributes:
        location: Where it is.
        size: Its size in bytes.
        etag: An opaque generation tag: a new save gives a new one.
        record: checkpointio's record, or ``None`` for objects other tools wrote.
        server_crc32: A whole-object CRC32 the server computed, where it offers one.
        modified: Last-modified time, seconds since the epoch.
        pinned: Whether reads of it fail once the object changed (its ETag). ``False`` only for
            an object described without asking the store (no HEAD), that never changes and whose
            bytes the reader checks itself: an incremental checkpoint's packs, content-named,
            every chunk checked against its hash. Reads of it then take whatever the store holds.
    """

    location: Location
    size: int
    etag: str
    record: Record | None = None
    server_crc32: int | None = None
    modified: float | None = None
    pinned: bool = True

    @property
    def checkable(self) -> bool:
        """Whether a CRC32 of the whole object is known (saved with it, or the server's) for a
        read to be checked against; without one, only its length (and whatever the content
        carries, such as a gzip member's CRC32) can be."""
        return (self.record is not None and self.record.crc32 is not None) or self.server_crc32 is not None


@dataclass(frozen=True)
class PendingWrite:
    """A save that started and never finished, still holding space in the store.

    On S3 an incomplete multipart upload (its parts are billed until aborted); on the local store a
    temporary file a killed process left next to the checkpoint. A save in progress looks the same,
    which is why garbage collection only takes ones older than a cutoff.

    Attributes:
        location: The checkpoint the save was writing.
        ident: What identifies it in the store: the upload id, or the temporary file's path.
        started: When it started (seconds since the epoch), where the store tells.
    """

    location: Location
    ident: str
    started: float | None = None


@dataclass
class Body:
    """The bytes of one save on their way to a store.

    ``size`` is known for bytes and files and ``None`` for directory archives. ``digest`` is
    final once the stream is exhausted.

    ``crc32_up_front``, given for bytes and files, reads the source once more and returns the
    CRC32 the stream will have (blocking: call it in a worker thread). A store that must write
    the record before the data (S3's multipart metadata is set when the upload starts) uses it,
    so the object still carries its CRC32, and checks ``digest`` against it before committing.
    """

    chunks: AsyncIterable[bytes]
    size: int | None
    digest: Digest = field(default_factory=Digest)
    crc32_up_front: Callable[[], int] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks.__aiter__()


def under(prefix: str, items: list[_Item], key: Callable[[_Item], str]) -> list[_Item]:
    """The ``items`` whose ``key`` lies under the prefix, as every store lists: a prefix that ends
    with ``/`` or names a folder (something lies below ``prefix/``) is that folder, holding
    ``prefix`` itself and what lies below ``prefix/``; any other prefix is the start of names.

    So ``runs/7`` lists ``runs/7/...`` and never ``runs/70/...`` once ``runs/7/`` holds anything,
    as a local folder is listed; ``runs/ckpt`` lists ``runs/ckpt``, ``runs/ckpt-2`` and a
    distributed checkpoint's ``runs/ckpt.dcp/...`` when there is no folder ``runs/ckpt/``.
    ``items`` are those whose key starts with ``prefix`` (what an S3 listing returns).
    """
    matched = [item for item in items if key(item).startswith(prefix)]
    folder = prefix + "/"
    if not prefix or prefix.endswith("/") or not any(key(item).startswith(folder) for item in matched):
        return matched
    return [item for item in matched if key(item) == prefix or key(item).startswith(folder)]


class Store(Protocol):
    """An object store the engine can save to and load from."""

    async def head(self, location: Location) -> ObjectInfo | None:
        """Describe the object, or ``None`` if there is none. Other failures raise."""
        ...

    async def put(self, location: Location, body: Body, record: Record, *, force: bool = False) -> ObjectInfo:
        """Store ``body`` atomically: on any error or cancellation, the previous object stays.

        A local file at ``location`` that checkpointio did not write (no record of it) is refused
        with ``DestinationError`` before anything is written, unless ``force``: it is a user's file
        (``save ckpt/ train.py``). Other stores replace whatever object is at the key, as ``aws s3
        cp`` does.
        """
        ...

    async def get(self, info: ObjectInfo, sink: Sink) -> None:
        """Send the object's bytes to ``sink`` in order; fail if it changed since ``info``."""
        ...

    async def delete(self, location: Location, *, force: bool = False) -> bool:
        """Remove the object; ``False`` if there was none.

        A local file that checkpointio did not write is refused with ``DestinationError`` and kept,
        unless ``force`` (see :meth:`put`).
        """
        ...

    async def pending(self, prefix: Location) -> list[PendingWrite]:
        """Unfinished saves of checkpoints :func:`under` ``prefix``, oldest first."""
        ...

    async def discard(self, write: PendingWrite) -> bool:
        """Free what an unfinished save holds; ``False`` if it was already gone."""
        ...

    async def list(self, prefix: Location) -> list[ObjectInfo]:
        """The objects :func:`under` ``prefix``, sorted by key."""
        ...

    async def create(self, location: Location, data: bytes, record: Record) -> bool:
        """Store the small object ``data`` with ``record`` only if there is none at ``location``.

        Atomic against other processes writing the same key: of several racing calls exactly one
        returns ``True`` (the task runtime claims attempt numbers this way). ``False``: an object
        was there already.
        """
        ...

    async def read_range(self, info: ObjectInfo, offset: int, length: int) -> bytes:
        """The ``length`` bytes of the object at ``offset`` (one request, in memory); fail if the
        object changed since ``info`` (unless ``info.pinned`` is false), is gone or holds fewer
        bytes. For readers that need a few slices of a large object (``checkpointio.dcp``, an
        incremental restore's packs), not for whole objects (use ``get``)."""
        ...

    async def read_range_into(self, info: ObjectInfo, offset: int, buffers: Sequence[memoryview]) -> Sequence[int]:
        """What :meth:`read_range` does, written straight into ``buffers`` instead of a new
        ``bytes``: the object's bytes from ``offset`` fill them in order (as many as they hold in
        all, one request; S3 writes each block as it arrives, on a receiving thread) and the CRC32
        of each buffer's bytes comes back, taken as they were written (see :class:`Filling`).

        Failing half-way leaves the buffers partly written. For ``checkpointio.dcp``, whose
        buffers are the state dict's tensors: every byte is written once, and nothing is held.
        """
        ...


class OrderedRead(Protocol):
    """An object's bytes in order, taken by one thread straight from where they arrive
    (:meth:`RangedStore.ordered`): :meth:`run` on the caller's loop, :meth:`take` in that thread."""

    async def run(self) -> None:
        """Fetch the object; return once every byte arrived, or raise (once nothing runs any
        more). Either way :meth:`take` then hears of no more bytes. Call it once."""
        ...

    def take(self) -> Blocks:
        """In one thread: the next blocks in order, waiting for them; ``[]`` once every byte was
        taken. Raises ``_concurrency.Aborted`` once :meth:`run` ended without them (failed or
        cancelled: its error is the one to report)."""
        ...

    #: Whether the CRC32 of the bytes is taken where they arrive (:meth:`crc32`), so the taking
    #: thread need not make a pass over them for it.
    checksums: bool

    def crc32(self) -> int | None:
        """In the taking thread: the CRC32 of every byte :meth:`take` gave so far, ``None`` unless
        :attr:`checksums`."""
        ...


@runtime_checkable
class RangedStore(Store, Protocol):
    """A store that can also deliver an object as ranges fetched at once, in any order.

    A single-file restore then writes each range at its offset as it arrives, instead of
    waiting for the ranges before it: what a parallel download is for.
    """

    async def head_for_reads(self, location: Location, *, one_of_many: bool = False) -> ObjectInfo | None:
        """:meth:`head`, asked by a reader about to read the object: the store gets ready for the
        reads meanwhile (S3: asked on a receiving thread while the others make their clients).
        ``one_of_many``: one of many asked at once, to be spread as their reads are (S3: over the
        receiving threads in turn)."""
        ...

    def ordered(self, info: ObjectInfo) -> OrderedRead:
        """The object's bytes in order, as :meth:`get` sends them, for a thread to take as they
        arrive with no hop through the caller's loop; nothing is fetched before its ``run()``."""
        ...

    async def get_ranges(self, info: ObjectInfo, sink: RangeSink) -> None:
        """Send every byte of the object to ``sink`` once, as ``(offset, blocks)`` pieces in any order
        (each range in pieces of about ``chunk_size``, as they arrive, on the thread that received
        them); fail if the object changed. Once it returns or raises, ``sink`` is called no more."""
        ...
