"""The local filesystem store: one file per checkpoint, committed by one rename.

File I/O runs on anyio's worker threads (``anyio.open_file``), not aiofiles: aiofiles goes through
the event loop's default ``ThreadPoolExecutor``, which Python shuts down before ``atexit`` handlers
run, so a ``save_sync`` at interpreter exit would fail.

The file at a checkpoint's path is exactly the stored bytes (a directory's is a plain ``.tar.gz``),
so other tools read it as is. Its record lives in a hidden sidecar (``.<name>.checkpointio``) whose
entries each name the size and mtime of the generation of the file they describe.

A save streams into a temporary file in the destination folder and fsyncs it; then the commit:

1. the sidecar is replaced (by rename) with one naming the new generation *and still naming the
   current one*: the file at the path is unchanged and still matches its own entry;
2. the temporary file is renamed over the path: that one rename is the commit.

A process killed at any point therefore leaves the old bytes with their record or the new bytes
with theirs, never one with the other's. Anything that could make the commit fail half-way (a name
too long for the sidecar) is refused before anything is written.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .._codec import crc32
from .._config import TransferConfig
from .._exceptions import (
    AccessDeniedError,
    ConcurrentModificationError,
    CorruptCheckpointError,
    DestinationError,
    StoreError,
)
from .._location import Location
from .._writes import write_all
from ._base import Body, ObjectInfo, PendingWrite, Record, Sink

__all__ = ["LocalStore", "file_in_the_way", "foreign_file", "is_foreign", "own_files", "refuse_replacing"]

logger = logging.getLogger(__name__)

_SIDECAR_SUFFIX = ".checkpointio"
_PARTIAL_MARK = ".partial-"
#: The random token of a temporary name: 16 hex digits (32 in versions before names were cut).
_TOKEN_LENGTH = 16
#: Exactly the temporary names a save writes: ``.<name>.partial-<token>`` for the data and the same
#: with ``.checkpointio`` for its sidecar. Nothing else is taken for a save's leftover.
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.partial-(?P<token>[0-9a-f]{16}|[0-9a-f]{32})(?:\.checkpointio)?", re.DOTALL)
#: A sidecar is a few hundred bytes of JSON; a larger file of that name is not one.
_SIDECAR_MAX_BYTES = 64 * 1024
#: Longest file name (bytes) where the filesystem does not tell.
_NAME_MAX = 255
#: read_range_into reads and checks this much at a time (a step is still in the cache for its CRC32).
_READ_STEP = 1024 * 1024
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}{_SIDECAR_SUFFIX}")


def _name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name (bytes) the filesystem of ``folder`` takes."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return _NAME_MAX


def _name_room(name_max: int) -> int:
    """How many bytes of a checkpoint's name its temporary names keep: the temporary sidecar's name
    (``.<name>.partial-<token>.checkpointio``) must fit in ``name_max``."""
    return name_max - 1 - len(_PARTIAL_MARK) - _TOKEN_LENGTH - len(_SIDECAR_SUFFIX)


class _Output:
    """A new file that worker threads write: closed once, never while a write is under way, and
    never written after that (a thread left running by a cancelled task finds it closed instead of
    writing to a descriptor number the process may have reused)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False

    def open(self) -> None:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "closed before it was opened", str(self._path))
            self._fd = os.open(self._path, _CREATE_FLAGS, 0o666)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            write_all(self._opened(), data)

    def fsync(self) -> None:
        with self._lock:
            os.fsync(self._opened())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def _opened(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "closed", str(self._path))
        return self._fd


def _temporary(path: Path, name_max: int) -> Path:
    """``.<name>.partial-<16 hex>`` beside ``path``, the name cut (in bytes) to ``_name_room``."""
    cut = os.fsencode(path.name)[: _name_room(name_max)]
    return path.with_name(f".{os.fsdecode(cut)}{_PARTIAL_MARK}{uuid.uuid4().hex[:_TOKEN_LENGTH]}")


def _temporary_target(name: str, name_max: int) -> tuple[str, bool] | None:
    """For a save's temporary name, the (start of the) checkpoint name it was writing and whether
    that name may have been cut; ``None`` for any other name."""
    match = _TEMPORARY.fullmatch(name)
    if match is None:
        return None
    target = match["target"]
    cut = len(match["token"]) == _TOKEN_LENGTH and len(os.fsencode(target)) >= _name_room(name_max)
    return target, cut


def _entry(doc: Any) -> tuple[tuple[int, int], dict[str, str]] | None:
    """One ``{"of": [size, mtime_ns], "record": {...}}`` entry of a sidecar, or ``None``."""
    if not isinstance(doc, dict):
        return None
    of, record = doc.get("of"), doc.get("record")
    if not (isinstance(of, list) and len(of) == 2 and all(type(value) is int for value in of)):
        return None
    if not isinstance(record, dict):
        return None
    return (of[0], of[1]), record


def _entries(doc: Any) -> list[tuple[tuple[int, int], dict[str, str]]] | None:
    """A sidecar's entries, newest first: its own (the newest generation, the only one versions
    before the one-rename commit wrote and read) and those under ``"also"``. ``None`` when ``doc``
    is not a sidecar checkpointio wrote."""
    top = _entry(doc)
    if top is None:
        return None
    found = [top]
    also = doc.get("also", [])
    if isinstance(also, list):
        found.extend(entry for entry in map(_entry, also) if entry is not None)
    return found


def _read_sidecar(sidecar: Path) -> list[tuple[tuple[int, int], dict[str, str]]] | None:
    """The entries of the sidecar at ``sidecar``; ``None`` if there is none or the file there is not
    one (a user's file of that name). Errors reading it raise."""
    try:
        with open(sidecar, "rb") as source:
            text = source.read(_SIDECAR_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno in (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR):
            return None  # no sidecar can have that name
        raise
    if len(text) > _SIDECAR_MAX_BYTES:
        return None
    try:
        return _entries(json.loads(text))
    except ValueError:
        return None


def _is_sidecar_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(_SIDECAR_SUFFIX) and len(name) > 1 + len(_SIDECAR_SUFFIX)


def _is_sidecar(full: str) -> bool:
    """Whether ``full`` is a sidecar checkpointio wrote: named like one *and* holding one, so that a
    user's file of such a name is listed and never removed with a checkpoint."""
    if not _is_sidecar_name(os.path.basename(full)):
        return False
    try:
        return _read_sidecar(Path(full)) is not None
    except OSError:
        return True  # unreadable: not listed as a checkpoint either (reading it would fail too)


def _path_max(folder: str | os.PathLike[str]) -> int:
    """The longest path (bytes, with its terminating NUL) the filesystem of ``folder`` takes."""
    try:
        return int(os.pathconf(folder, "PC_PATH_MAX"))
    except (OSError, ValueError):
        return 4096


def _folder_name_max(path: Path) -> int:
    """``_name_max`` of the folder ``path`` is (or will be, once made) in."""
    existing = path.parent
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent  # the folder the missing ones will be made in
    return _name_max(existing)


def own_files(path: Path) -> Callable[[str], bool]:
    """Whether a name in ``path``'s folder is one of the files this store keeps for the checkpoint
    at ``path``: the checkpoint, its record, or a temporary file of a save to it (or its record's).

    A folder saved to a key inside itself leaves these out, as ``tar`` leaves out its own archive:
    else every save would store the previous checkpoint, and grow by the tree's size each time.
    """
    exact = {path.name, _sidecar(path).name}
    name = os.fsencode(path.name)
    cut = name[: _name_room(_folder_name_max(path))]  # what a save's temporary names keep of it

    def own(entry: str) -> bool:
        if entry in exact:
            return True
        matched = _TEMPORARY.fullmatch(entry)
        if matched is None:
            return False
        target = os.fsencode(matched["target"])
        return target == name or (len(matched["token"]) == _TOKEN_LENGTH and target == cut)

    return own


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parents that exists and is not a folder (so ``path`` cannot be made)."""
    for parent in reversed(path.parents):
        if os.path.lexists(parent) and not parent.is_dir():
            return parent
    return None


def foreign_file(uri: str, *, removing: bool = False, hint: str | None = None) -> DestinationError:
    """The error for a file at ``uri`` that checkpointio did not write: a save would replace it,
    a removal (``removing``) delete it. ``hint`` says how to proceed anyway (the Python API's
    ``force=True`` by default)."""
    done = "nothing was removed" if removing else "nothing was written"
    if hint is None:
        hint = "move it away or remove it yourself" if removing else "pass force=True to replace it"
    return DestinationError(
        f"{uri} is a file checkpointio did not write (no record of it beside it); {done}: {hint}", uri=uri
    )


def is_foreign(path: Path) -> bool:
    """Whether ``path`` is a file (or a symlink to one) that checkpointio did not write: no record
    beside it. Nothing there, or a folder, is not one.

    Any record will do, not only one of the file's generation: a checkpoint whose times changed
    (``touch``, a copy that does not keep them) stays checkpointio's to replace, or a loop saving
    to one URI would stop at the first such copy. Its bytes then have no record to be checked
    against, which a load says; the record's presence only tells whose file it is."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        return not _read_sidecar(_sidecar(path))
    except OSError:  # unreadable: nothing says checkpointio wrote the file
        return True


def refuse_replacing(location: Location) -> None:
    """Raise ``DestinationError`` if a save at the local ``location`` would replace a folder or a file
    checkpointio did not write: what ``LocalStore.put`` refuses, asked before a save reads or
    snapshots its source (a background or incremental save would only meet the refusal later)."""
    path = Path(location.key)
    try:
        if path.is_dir():
            raise DestinationError(f"{location.uri}: is a directory; a checkpoint URI names a file", uri=location.uri)
        if is_foreign(path):
            raise foreign_file(location.uri)
    except OSError as error:
        raise _translate(error, location.uri) from error


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


def _listing_base(prefix: str) -> Path | None:
    """Where a listing of ``prefix`` walks from (see ``_base.under``): the folder it names, else
    the folder holding the names that start with it; ``None`` when it ends with ``/`` and names
    no folder (nothing lies under it)."""
    root = Path(prefix)
    if root.is_dir():
        return root
    return None if prefix.endswith(("/", os.sep)) else root.parent


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


def _generation(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


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
        if not stat.S_ISREG(st.st_mode):  # from the one stat: the file may go away right after it
            raise DestinationError(f"{location.uri}: is a directory, not a checkpoint file", uri=location.uri)
        return ObjectInfo(
            location,
            st.st_size,
            f"{st.st_size}-{st.st_mtime_ns}",
            self._read_record(path, st),
            modified=st.st_mtime,
        )

    @staticmethod
    def _read_record(path: Path, st: os.stat_result) -> Record | None:
        """The record of the generation of ``path`` that ``st`` describes, if its sidecar names it
        (by size and mtime) once; a file another tool wrote or rewrote has none."""
        try:
            entries = _read_sidecar(_sidecar(path))
        except OSError as error:
            logger.warning("ignoring unreadable record %s: %s", _sidecar(path), error)
            return None
        records = {json.dumps(meta, sort_keys=True): meta for of, meta in entries or [] if of == _generation(st)}
        if len(records) != 1:
            return None  # none of this generation, or two that cannot be told apart
        return Record.from_metadata(next(iter(records.values())))

    async def put(self, location: Location, body: Body, record: Record, *, force: bool = False) -> ObjectInfo:
        path = Path(location.key)
        name_max = await anyio.to_thread.run_sync(self._prepare, path, location.uri, force)
        tmp = _temporary(path, name_max)
        try:
            try:
                out = _Output(tmp)
                try:
                    await anyio.to_thread.run_sync(out.open)
                    async for chunk in body:
                        await anyio.to_thread.run_sync(out.write, chunk)
                    await anyio.to_thread.run_sync(out.fsync)
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(out.close)
                return await anyio.to_thread.run_sync(self._commit, location, tmp, record.completed(body.digest))
            except OSError as error:  # disk full, quota, I/O error: the previous checkpoint stays
                raise _translate(error, location.uri) from error
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
            raise

    def _prepare(self, path: Path, uri: str, force: bool = False) -> int:
        """Refuse, before anything is written, a save whose commit could not complete or that would
        replace a file checkpointio did not write (unless ``force``); create the parent folder.
        Returns the longest name its filesystem takes."""
        if _TEMPORARY.fullmatch(path.name) or _is_sidecar_name(path.name):
            raise StoreError(
                f"{uri}: {path.name!r} is a name the local store uses for its own files (records, unfinished "
                "saves); choose another",
                uri=uri,
            )
        try:
            name_max = _folder_name_max(path)
            longest = name_max - 1 - len(_SIDECAR_SUFFIX)
            size = len(os.fsencode(path.name))
            if size > longest:
                raise StoreError(
                    f"{uri}: the name is {size} bytes; the local store keeps checkpoints of names up to "
                    f"{longest} bytes here (its record, .<name>{_SIDECAR_SUFFIX}, must fit in {name_max}); "
                    "nothing was changed",
                    uri=uri,
                )
            sidecar = _sidecar(path)
            path_max = _path_max(path.parent if path.parent.is_dir() else "/")
            if len(os.fsencode(str(sidecar))) >= path_max:
                raise StoreError(
                    f"{uri}: the path of its record ({sidecar}) would exceed the {path_max}-byte path limit; "
                    "nothing was changed",
                    uri=uri,
                )
            if path.is_dir():
                raise DestinationError(f"{uri}: is a directory; a checkpoint URI names a file", uri=uri)
            if not force and is_foreign(path):
                raise foreign_file(uri)
            # An empty one is what a crash can leave of a record: nothing to keep.
            if sidecar.exists() and sidecar.stat().st_size > 0 and _read_sidecar(sidecar) is None:
                raise StoreError(
                    f"{uri}: {sidecar} is where the local store keeps this checkpoint's record, and it holds "
                    "something else; move it away to save here",
                    uri=uri,
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            blocker = file_in_the_way(path) if isinstance(error, FileExistsError | NotADirectoryError) else None
            if blocker is not None:
                raise DestinationError(f"{uri}: {blocker} is a file, not a folder", uri=uri) from error
            raise _translate(error, uri) from error
        return name_max

    def _commit(self, location: Location, tmp: Path, record: Record) -> ObjectInfo:
        path = Path(location.key)
        sidecar = _sidecar(path)
        kept = self._entries_to_keep(path, sidecar)
        st = self._stamp(tmp, {of for of, _meta in kept})
        doc = {
            "of": list(_generation(st)),
            "record": record.to_metadata(),
            "also": [{"of": list(of), "record": meta} for of, meta in kept],
        }
        sidecar_tmp = tmp.with_name(tmp.name + _SIDECAR_SUFFIX)
        try:
            with open(sidecar_tmp, "x", encoding="utf-8") as out:
                json.dump(doc, out)
                out.flush()
                os.fsync(out.fileno())
            # Names the new generation and keeps the current one's entry: the file at the path
            # still reads with its own record until the next rename.
            os.replace(sidecar_tmp, sidecar)
            os.replace(tmp, path)  # the commit: new bytes, whose entry the sidecar already holds
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

    @staticmethod
    def _entries_to_keep(path: Path, sidecar: Path) -> list[tuple[tuple[int, int], dict[str, str]]]:
        """The entries the new sidecar carries besides the new generation's: the one of the file at
        the path now (it must keep its record until the commit) and the newest of the current
        sidecar (a concurrent save of this key may be about to commit it)."""
        entries = _read_sidecar(sidecar) or []
        try:
            live: tuple[int, int] | None = _generation(path.stat())
        except FileNotFoundError:
            live = None
        kept = [entry for entry in entries if entry[0] == live][:1]
        if entries and entries[0] not in kept:
            kept.append(entries[0])
        return kept

    @staticmethod
    def _stamp(tmp: Path, taken: set[tuple[int, int]]) -> os.stat_result:
        """Give ``tmp`` a fresh mtime that, with its size, tells it apart from the generations in
        ``taken`` (on a filesystem with coarse timestamps a second later), and return its stat."""
        mtime = time.time_ns()
        os.utime(tmp, ns=(mtime, mtime))
        st = tmp.stat()
        for _ in range(3):
            if _generation(st) not in taken:
                break
            mtime = max(of[1] for of in taken) + 1_000_000_000
            os.utime(tmp, ns=(mtime, mtime))
            st = tmp.stat()
        return st

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

    async def delete(self, location: Location, *, force: bool = False) -> bool:
        path = Path(location.key)

        def remove() -> bool:
            try:
                if not force and is_foreign(path):
                    raise foreign_file(location.uri, removing=True)
                path.unlink()
            except FileNotFoundError:
                return False
            except OSError as error:
                if error.errno == errno.EISDIR:
                    raise StoreError(f"{location.uri}: is a directory", uri=location.uri) from error
                raise _translate(error, location.uri) from error
            sidecar = _sidecar(path)
            if _is_sidecar(str(sidecar)):  # a user's file of that name is not ours to remove
                sidecar.unlink(missing_ok=True)
            return True

        return await anyio.to_thread.run_sync(remove)

    async def pending(self, prefix: Location) -> list[PendingWrite]:
        root = Path(prefix.key)
        wanted = str(root)

        def scan() -> list[PendingWrite]:
            base = _listing_base(prefix.key)
            if base is None:
                return []
            found: list[PendingWrite] = []
            for dirpath, _dirnames, filenames in _walk(base, root, prefix.uri):
                name_max = _name_max(dirpath)
                for name in filenames:
                    matched = _temporary_target(name, name_max)
                    if matched is None:
                        continue
                    target, cut = matched
                    written = os.path.join(dirpath, target)
                    if not written.startswith(wanted):
                        # A cut name is the start of the real one: the checkpoint asked for may
                        # be the one this save was writing.
                        rest = wanted[len(written) :]
                        if not (cut and wanted.startswith(written) and os.sep not in rest):
                            continue
                        written = wanted
                    full = os.path.join(dirpath, name)
                    try:
                        started = os.lstat(full).st_mtime
                    except FileNotFoundError:
                        continue  # its save just finished or was cleaned up
                    found.append(PendingWrite(Location("file", "", written), full, started))
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
            base = _listing_base(prefix.key)
            if base is None:
                return []
            found: list[ObjectInfo] = []
            for dirpath, dirnames, filenames in _walk(base, root, prefix.uri):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    if not full.startswith(str(root)) or _TEMPORARY.fullmatch(name) or _is_sidecar(full):
                        continue
                    info = self._head(Location("file", "", full))
                    if info is not None:
                        found.append(info)
            return sorted(found, key=lambda info: info.location.key)

        return await anyio.to_thread.run_sync(scan)

    async def create(self, location: Location, data: bytes, record: Record) -> bool:
        path = Path(location.key)

        def create_exclusively() -> bool:
            name_max = self._prepare(path, location.uri, force=True)  # never replaces: O_EXCL
            try:
                fd = os.open(path, _CREATE_FLAGS, 0o644)
            except FileExistsError:
                return False
            except OSError as error:
                raise _translate(error, location.uri) from error
            # The name is taken once open() returned; the bytes and the record follow (a crash before
            # the record leaves a file without one: still taken, recognised by content).
            tmp = _temporary(path, name_max)
            sidecar_tmp = tmp.with_name(tmp.name + _SIDECAR_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    write_all(out.fileno(), data)
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
        if offset < 0 or length < 0:
            raise CorruptCheckpointError(f"{uri}: bytes {offset}..{offset + length} asked for", uri=uri)

        def read() -> bytes:
            fd = _open_unchanged(info)
            try:
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

    async def read_range_into(self, info: ObjectInfo, offset: int, buffers: Sequence[memoryview]) -> Sequence[int]:
        uri = info.location.uri
        views = [buffer.cast("B") for buffer in buffers]
        total = sum(len(view) for view in views)
        if offset < 0 or offset + total > info.size:  # refused before any buffer is written, as S3 does
            raise CorruptCheckpointError(
                f"{uri}: bytes {offset}..{offset + total} asked for, the object holds {info.size}", uri=uri
            )

        def read() -> list[int]:
            fd = _open_unchanged(info)
            try:
                # Straight into the buffers (FileIO.readinto is one read(2) into them), in steps
                # that are still in the CPU's cache when their CRC32 is taken.
                with io.FileIO(fd, "rb", closefd=False) as file:
                    file.seek(offset)
                    crc32s = []
                    for view in views:
                        value = 0
                        for start in range(0, len(view), _READ_STEP):
                            step = view[start : start + _READ_STEP]
                            got = 0
                            while got < len(step):
                                count = file.readinto(step[got:])
                                if not count:  # shorter than described: cut since
                                    ended = file.tell()
                                    raise CorruptCheckpointError(
                                        f"{uri}: bytes {offset}..{offset + total} asked for, the file ends at {ended}",
                                        uri=uri,
                                    )
                                got += count
                            value = crc32(step, value)
                        crc32s.append(value)
                return crc32s
            except OSError as error:
                raise _translate(error, uri) from error
            finally:
                os.close(fd)

        return await anyio.to_thread.run_sync(read)


def _open_unchanged(info: ObjectInfo) -> int:
    """The file ``info`` describes, opened for reading; ``ConcurrentModificationError`` if it was
    removed or (``info.pinned``) replaced since (its size and modification time are its ETag)."""
    uri = info.location.uri
    try:
        fd = os.open(info.location.key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as error:
        raise ConcurrentModificationError(f"{uri}: removed while being read", uri=uri) from error
    except OSError as error:
        raise _translate(error, uri) from error
    try:
        st = os.fstat(fd)
        if info.pinned and f"{st.st_size}-{st.st_mtime_ns}" != info.etag:
            raise ConcurrentModificationError(f"{uri}: replaced while being read", uri=uri)
    except BaseException as error:
        os.close(fd)
        if isinstance(error, OSError):
            raise _translate(error, uri) from error
        raise
    return fd
