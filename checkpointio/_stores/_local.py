"""The local filesystem store: one file per checkpoint, committed by rename.

File I/O runs on anyio's worker threads (``anyio.open_file``), not aiofiles: aiofiles goes through
the event loop's default ``ThreadPoolExecutor``, which Python shuts down before ``atexit`` handlers
run, so a ``save_sync`` at interpreter exit would fail.

A save streams into a temporary file in the destination folder, fsyncs it and renames it over the
destination, so a reader sees the old checkpoint or the new one, never a part. The record lives in
a hidden sidecar (``.<name>.checkpointio``) that names the size and mtime of the file it
describes: a sidecar left from an older generation (a crash between the two renames) does not
match and is ignored, and the object is then recognised by its content.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread

from .._config import TransferConfig
from .._exceptions import AccessDeniedError, ConcurrentModificationError, CorruptCheckpointError, StoreError
from .._location import Location
from ._base import Body, ObjectInfo, PendingWrite, Record, Sink

__all__ = ["LocalStore", "own_files"]

logger = logging.getLogger(__name__)

_SIDECAR_SUFFIX = ".checkpointio"
_PARTIAL_MARK = ".partial-"


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}{_SIDECAR_SUFFIX}")


def _is_internal(name: str) -> bool:
    return name.startswith(".") and (name.endswith(_SIDECAR_SUFFIX) or _PARTIAL_MARK in name)


def _partial_of(name: str) -> str | None:
    """The checkpoint name a temporary ``.<name>.partial-<hex>[.checkpointio]`` file was writing."""
    if not name.startswith(".") or _PARTIAL_MARK not in name:
        return None
    target = name[1:].rpartition(_PARTIAL_MARK)[0]
    return target or None


#: Longest file name (bytes) on the filesystems checkpoints live on.
_NAME_MAX = 255


#: Hex digits that make a temporary name unique.
_UNIQUE = 16


def _temporary_prefix(name: str) -> str:
    """``.<name>.partial-``, the name cut (in bytes) where needed so that the sidecar's temporary
    name (``_UNIQUE`` hex digits and the sidecar suffix more) still fits in ``_NAME_MAX``."""
    room = _NAME_MAX - 1 - len(_PARTIAL_MARK) - _UNIQUE - len(_SIDECAR_SUFFIX)
    return f".{os.fsdecode(os.fsencode(name)[:room])}{_PARTIAL_MARK}"


def _temporary(path: Path) -> Path:
    """``.<name>.partial-<16 hex>`` beside ``path`` (see ``_temporary_prefix``; a 220-byte name
    failed with ENAMETOOLONG although it and its sidecar fit)."""
    return path.with_name(f"{_temporary_prefix(path.name)}{uuid.uuid4().hex[:_UNIQUE]}")


def own_files(path: Path) -> Callable[[str], bool]:
    """Whether a name in ``path``'s folder is one of the files this store keeps for the checkpoint
    at ``path``: the checkpoint, its record, or a temporary file of a save to it (or its record's).

    A folder saved to a key inside itself leaves these out, as ``tar`` leaves out its own archive:
    else every save would store the previous checkpoint, and grow by the tree's size each time.
    """
    exact = {path.name, _sidecar(path).name}
    temporary = re.compile(
        re.escape(_temporary_prefix(path.name)) + f"[0-9a-f]{{{_UNIQUE}}}(?:{re.escape(_SIDECAR_SUFFIX)})?"
    )
    return lambda name: name in exact or temporary.fullmatch(name) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(error: OSError, uri: str) -> StoreError:
    """A filesystem error as the store error it is (disk full, I/O error, a stale NFS handle...)."""
    if isinstance(error, PermissionError):
        return AccessDeniedError(f"{uri}: permission denied: {error}", uri=uri)
    return StoreError(f"{uri}: {error.strerror or error}: {error.filename or ''}".rstrip(": "), uri=uri)


def _walk(base: Path, root: Path, uri: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` from ``base`` into the folders whose paths start with ``root`` (a folder or a
    name prefix), where a folder that cannot be read is an error, not an empty folder.

    ``os.walk`` ignores errors by default: an unreadable run folder (permissions, a stale NFS
    handle) would list no attempts, and a restarted task would start from scratch and overwrite
    them. Only a folder that does not exist (the prefix names none yet, or it went away while it
    was listed) is empty. Folders that cannot hold a match are not entered (nor their errors met).
    """

    def fail(error: OSError) -> None:
        if isinstance(error, FileNotFoundError | NotADirectoryError):
            return
        raise _translate(error, uri) from error

    prefix = str(root)
    for dirpath, dirnames, filenames in os.walk(base, onerror=fail):
        dirnames[:] = [name for name in dirnames if os.path.join(dirpath, name).startswith(prefix)]
        yield dirpath, dirnames, filenames


class LocalStore:
    """Checkpoints as files on a local (or mounted) filesystem."""

    def __init__(self, config: TransferConfig) -> None:
        self._config = config

    async def head(self, location: Location) -> ObjectInfo | None:
        return await anyio.to_thread.run_sync(self._head, location)

    def _head(self, location: Location) -> ObjectInfo | None:
        path = Path(location.key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            raise _translate(error, location.uri) from error
        if not os.path.isfile(path):
            raise StoreError(f"{location.uri}: is a directory, not a checkpoint file", uri=location.uri)
        return ObjectInfo(
            location,
            st.st_size,
            f"{st.st_size}-{st.st_mtime_ns}",
            self._read_record(path, st),
            modified=st.st_mtime,
        )

    @staticmethod
    def _read_record(path: Path, st: os.stat_result) -> Record | None:
        try:
            doc = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable record %s: %s", _sidecar(path), error)
            return None
        if not isinstance(doc, dict) or doc.get("of") != [st.st_size, st.st_mtime_ns]:
            return None  # the record of another generation of this file
        meta = doc.get("record")
        return Record.from_metadata(meta) if isinstance(meta, dict) else None

    async def put(self, location: Location, body: Body, record: Record) -> ObjectInfo:
        path = Path(location.key)
        await anyio.to_thread.run_sync(self._prepare_parent, path, location.uri)
        tmp = _temporary(path)
        try:
            try:
                async with await anyio.open_file(tmp, "wb") as out:
                    async for chunk in body:
                        await out.write(chunk)
                    await out.flush()
                    await anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
                return await anyio.to_thread.run_sync(self._commit, location, tmp, record.completed(body.digest))
            except OSError as error:  # disk full, quota, I/O error: the previous checkpoint stays
                raise _translate(error, location.uri) from error
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
            raise

    @staticmethod
    def _prepare_parent(path: Path, uri: str) -> None:
        if path.is_dir():
            raise StoreError(f"{uri}: is a directory; a checkpoint URI names a file", uri=uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _translate(error, uri) from error

    def _commit(self, location: Location, tmp: Path, record: Record) -> ObjectInfo:
        path = Path(location.key)
        # A fresh mtime marks this generation; the sidecar names it.
        os.utime(tmp, ns=(time.time_ns(), time.time_ns()))
        st = tmp.stat()
        sidecar_tmp = tmp.with_name(tmp.name + _SIDECAR_SUFFIX)
        doc = {"of": [st.st_size, st.st_mtime_ns], "record": record.to_metadata()}
        try:
            with open(sidecar_tmp, "w", encoding="utf-8") as out:
                json.dump(doc, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            os.replace(sidecar_tmp, _sidecar(path))
        finally:
            sidecar_tmp.unlink(missing_ok=True)
        try:
            _fsync_dir(path.parent)
        except OSError as error:  # committed already: failing the save now would report a lie
            # Some filesystems refuse fsync on a folder (EINVAL on CIFS and some FUSE ones), and a
            # folder may be writable but not readable; the renames stand, only their durability
            # across a power loss is not confirmed.
            logger.warning("could not fsync %s after saving %s: %s", path.parent, location.uri, error)
        return ObjectInfo(location, st.st_size, f"{st.st_size}-{st.st_mtime_ns}", record, modified=st.st_mtime)

    async def get(self, info: ObjectInfo, sink: Sink) -> None:
        uri = info.location.uri
        chunk_size = self._config.chunk_size
        try:
            async with await anyio.open_file(info.location.key, "rb") as source:
                st = await anyio.to_thread.run_sync(os.fstat, source.wrapped.fileno())
                if f"{st.st_size}-{st.st_mtime_ns}" != info.etag:
                    raise ConcurrentModificationError(f"{uri}: replaced while being read", uri=uri)
                while chunk := await source.read(chunk_size):
                    await sink([chunk])
        except FileNotFoundError as error:
            raise ConcurrentModificationError(f"{uri}: removed while being read", uri=uri) from error
        except OSError as error:
            raise _translate(error, uri) from error

    async def delete(self, location: Location) -> bool:
        path = Path(location.key)

        def remove() -> bool:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except OSError as error:
                if error.errno == errno.EISDIR:
                    raise StoreError(f"{location.uri}: is a directory", uri=location.uri) from error
                raise _translate(error, location.uri) from error
            _sidecar(path).unlink(missing_ok=True)
            return True

        return await anyio.to_thread.run_sync(remove)

    async def pending(self, prefix: Location) -> list[PendingWrite]:
        root = Path(prefix.key)

        def scan() -> list[PendingWrite]:
            base = root if root.is_dir() else root.parent
            found: list[PendingWrite] = []
            for dirpath, _dirnames, filenames in _walk(base, root, prefix.uri):
                for name in filenames:
                    target = _partial_of(name)
                    if target is None or not os.path.join(dirpath, target).startswith(str(root)):
                        continue
                    full = os.path.join(dirpath, name)
                    try:
                        started = os.lstat(full).st_mtime
                    except FileNotFoundError:
                        continue  # its save just finished or was cleaned up
                    found.append(PendingWrite(Location("file", "", os.path.join(dirpath, target)), full, started))
            return sorted(found, key=lambda write: (write.started or 0.0, write.ident))

        return await anyio.to_thread.run_sync(scan)

    async def discard(self, write: PendingWrite) -> bool:
        def remove() -> bool:
            try:
                os.unlink(write.ident)
            except FileNotFoundError:
                return False
            except OSError as error:
                raise _translate(error, write.location.uri) from error
            return True

        return await anyio.to_thread.run_sync(remove)

    async def list(self, prefix: Location) -> list[ObjectInfo]:
        root = Path(prefix.key)

        def scan() -> list[ObjectInfo]:
            base = root if root.is_dir() else root.parent
            found: list[ObjectInfo] = []
            for dirpath, dirnames, filenames in _walk(base, root, prefix.uri):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    if _is_internal(name) or not full.startswith(str(root)):
                        continue
                    info = self._head(Location("file", "", full))
                    if info is not None:
                        found.append(info)
            return sorted(found, key=lambda info: info.location.key)

        return await anyio.to_thread.run_sync(scan)

    async def create(self, location: Location, data: bytes, record: Record) -> bool:
        path = Path(location.key)

        def create_exclusively() -> bool:
            self._prepare_parent(path, location.uri)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileExistsError:
                return False
            except OSError as error:
                raise _translate(error, location.uri) from error
            # The name is taken once open() returned; the bytes and the record follow (a crash before
            # the record leaves a file without one: still taken, recognised by content).
            tmp = _temporary(path)
            sidecar_tmp = tmp.with_name(tmp.name + _SIDECAR_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                    st = os.fstat(out.fileno())
                with open(sidecar_tmp, "w", encoding="utf-8") as side:
                    json.dump({"of": [st.st_size, st.st_mtime_ns], "record": record.to_metadata()}, side)
                    side.flush()
                    os.fsync(side.fileno())
                os.replace(sidecar_tmp, _sidecar(path))
            except OSError as error:
                raise _translate(error, location.uri) from error
            finally:
                sidecar_tmp.unlink(missing_ok=True)
            return True

        return await anyio.to_thread.run_sync(create_exclusively)

    async def read_range(self, info: ObjectInfo, offset: int, length: int) -> bytes:
        uri = info.location.uri

        def read() -> bytes:
            try:
                fd = os.open(info.location.key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError as error:
                raise ConcurrentModificationError(f"{uri}: removed while being read", uri=uri) from error
            except OSError as error:
                raise _translate(error, uri) from error
            try:
                st = os.fstat(fd)
                if f"{st.st_size}-{st.st_mtime_ns}" != info.etag:
                    raise ConcurrentModificationError(f"{uri}: replaced while being read", uri=uri)
                pieces: list[bytes] = []
                position, end = offset, offset + length
                while position < end:
                    piece = os.pread(fd, end - position, position)
                    if not piece:
                        raise CorruptCheckpointError(
                            f"{uri}: bytes {offset}..{end} asked for, the file ends at {position}", uri=uri
                        )
                    pieces.append(piece)
                    position += len(piece)
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            except OSError as error:
                raise _translate(error, uri) from error
            finally:
                os.close(fd)

        return await anyio.to_thread.run_sync(read)
