"""Putting files on the user's filesystem: the one module that renames, copies and removes there.

Restores (the engine), the command line's ``load`` and the Lightning and Hugging Face integrations
all place what they restored through here, so they share one set of guarantees:

- **Staging names.** Work in progress lives in the folder of its target, on the target's
  filesystem, under ``.checkpointio-partial-<32 hex>`` (:func:`staging_path`), so that the step
  that makes it visible is a rename. A killed process leaves such an entry behind; saving that
  folder leaves it out (:data:`STAGING_NAME`, which also knows the names older versions staged in).
- **All or none** (:func:`replace_all`): entries replace whatever their targets are (a file, a
  folder that is not empty, a symlink) together or not at all when an error stops it: every old
  entry is put back; the old ones are removed only once every new one is in place. A process
  *killed* on the way loses no data but may leave a mix: entries already replaced are new, the
  others old; an entry replacing a folder is, between its two renames, the old one in a staging
  folder beside it (not under its name) and the new one under its staging name. No entry is ever
  half written.
- **Across filesystems** (:func:`move_all`): a source on another filesystem than its target
  (``EXDEV``: a workspace in ``/tmp`` restored into a folder on another disk) is copied into a
  staging sibling of the target first, then renamed into place as above; the sources are removed
  once everything is in place.
- **Removal** (:func:`remove_tree`, :func:`remove`): iterative and relative to an open folder, so
  trees thousands of folders deep (past Python's recursion limit) and deeper than ``PATH_MAX`` go.
- **Errors name the path** (:func:`placing`): an ``OSError`` met while an integration works on
  the user's files is raised as the :class:`CheckpointError` it is (access denied, something in
  the way, any other failure), naming the path and where the restored files still are.
- **Temporary workspaces** (:func:`temporary_workspace`, :func:`discard_workspace`): removed by
  their owner, else at interpreter exit by the process that made them (never by a forked child);
  one made after that exit step ran (from a later ``atexit`` hook), by a helper process once this
  one has ended.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from . import _exit
from ._exceptions import AccessDeniedError, CheckpointError, DestinationError, StoreError

__all__ = [
    "STAGING_NAME",
    "STAGING_PREFIX",
    "StagingFolder",
    "WorkspaceGuard",
    "discard_workspace",
    "existing_mode",
    "make_staging_folder",
    "make_workspace",
    "move_all",
    "placement_error",
    "placing",
    "remove",
    "remove_tree",
    "replace_all",
    "staging_file",
    "staging_path",
    "temporary_workspace",
]

logger = logging.getLogger(__name__)


@dataclass
class WorkspaceGuard:
    """What a ``Checkpoint.load`` may replace in its workspace: nothing there that it did not put
    there itself (``placed``: relative paths of earlier restores of this checkpoint), unless
    ``force``. Set in :data:`guarded` for the load; :func:`replace_all`, through which every
    restore puts its entries in place, asks it first and records what it placed."""

    workspace: Path
    force: bool = False
    placed: set[str] = field(default_factory=set)
    #: Keep ``placed`` beside the workspace too (:func:`record_of`): a workspace of the user's,
    #: which a retried task's load in a fresh process restores over again.
    recorded: bool = False

    def __post_init__(self) -> None:
        if self.recorded:
            self.placed |= _read_record(self.workspace)

    def _relative(self, target: Path) -> str | None:
        try:
            return target.relative_to(self.workspace).as_posix()
        except ValueError:
            return None

    def check(self, targets: Sequence[Path]) -> None:
        """Raise ``DestinationError`` naming each of ``targets`` that exists and is not this load's
        to replace (nothing is changed)."""
        if self.force:
            return
        foreign: list[str] = []
        for target in targets:
            relative = self._relative(target)
            if relative is None or not os.path.lexists(target):
                continue
            parts = relative.split("/")
            if not any("/".join(parts[:end]) in self.placed for end in range(1, len(parts) + 1)):
                foreign.append(relative)
        if foreign:
            shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise DestinationError(
                f"restoring into {self.workspace} would replace what this checkpoint did not restore there: "
                f"{shown}; nothing was changed: pass force=True to load() to replace them, or restore into "
                "another workspace (the default, a new temporary folder, holds nothing of yours)",
                uri=str(self.workspace),
            )

    def note(self, targets: Sequence[Path]) -> None:
        """Record ``targets`` as placed by this checkpoint (in the workspace too, if ``recorded``)."""
        before = len(self.placed)
        for target in targets:
            relative = self._relative(target)
            if relative is not None:
                self.placed.add(relative)
        if self.recorded and len(self.placed) != before:
            _write_record(self.workspace, self.placed)


#: The end of the name of a workspace's record (:func:`record_of`).
RESTORED_SUFFIX = ".checkpointio-restored"


def record_of(workspace: Path) -> Path | None:
    """Where the record of a workspace of the user's is kept: beside it, as
    ``.<name>.checkpointio-restored`` (so the workspace holds only what was restored or put
    there), listing what loads restored there and what saves of the whole workspace took from it
    (relative paths, a JSON list): theirs to restore over again, in a later process too. Saves
    leave such files out (they are :data:`STAGING_NAME` names). ``None`` for a filesystem root."""
    return workspace.parent / f".{workspace.name}{RESTORED_SUFFIX}" if workspace.name else None


def record_saved(workspace: Path, source: Path) -> None:
    """A save of the workspace itself (a folder of the user's, ``workspace=``): what it holds now
    is the checkpoint's, for a later load (another process's too) to restore over."""
    try:
        if not source.is_dir() or not os.path.samefile(source, workspace):
            return
        names = {name for name in os.listdir(workspace) if not STAGING_NAME.fullmatch(name)}
    except OSError:  # the save meets the same error and reports it
        return
    known = _read_record(workspace)
    if not names <= known:
        _write_record(workspace, known | names)


def _read_record(workspace: Path) -> set[str]:
    """The paths a workspace's record lists; none if it is missing or not one (never an error:
    without it a load only refuses more)."""
    path = record_of(workspace)
    if path is None:
        return set()
    try:
        listed = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return set()
    if not isinstance(listed, list):
        return set()
    return {name for name in listed if isinstance(name, str) and name and not name.startswith("/")}


def _write_record(workspace: Path, placed: set[str]) -> None:
    """Replace the workspace's record with ``placed``, in one rename. A record that cannot be
    written (a folder beside which nothing can be written) is logged: the restore itself is in
    place, and a later load refuses rather than guesses."""
    path = record_of(workspace)
    if path is None:
        return
    temporary = staging_path(path.parent)
    try:
        temporary.write_text(json.dumps(sorted(placed)))
        os.replace(temporary, path)
    except OSError as error:
        logger.warning(
            "could not record what was restored in %s at %s (%s): a later load there needs force=True",
            workspace,
            path,
            error,
        )
        with contextlib.suppress(OSError):
            temporary.unlink()


#: The guard of the ``Checkpoint.load`` running in this context (worker threads inherit it).
guarded: ContextVar[WorkspaceGuard | None] = ContextVar("checkpointio_workspace_guard", default=None)

#: The start of every staging name: ``.checkpointio-partial-<32 hex>``.
STAGING_PREFIX = ".checkpointio-partial-"
#: Exactly the names staging entries have, now (``.checkpointio-partial-<32 hex>``) and in older
#: versions (``.checkpointio-partial-replaced-<32 hex>`` for entries moved aside,
#: ``.<name>.checkpointio-partial-<32 hex>`` beside a command line ``load``'s destination,
#: ``.checkpointio-snapshot-<8 characters>`` for a background save's scratch), and a workspace's
#: record beside a workspace (:func:`record_of`): what a save leaves out. A user's entry that merely starts with the
#: prefix is not one.
STAGING_NAME = re.compile(
    r"(?:\..+)?"
    + re.escape(STAGING_PREFIX)
    + r"(?:replaced-)?[0-9a-f]{32}|\.checkpointio-snapshot-[a-z0-9_]{8}|\..+\.checkpointio-restored",
    re.DOTALL,
)

_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


#: ``stat`` errors that mean "nothing there" (as ``Path.is_dir()`` took them before Python 3.14).
_NOTHING_THERE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF}


def existing_mode(path: Path) -> int | None:
    """The ``st_mode`` of ``path`` (symlinks followed), ``None`` where there is nothing; any other
    error (a folder on the way that may not be searched) is raised. ``Path.is_dir()`` and
    ``is_file()`` answer ``False`` to every error since Python 3.14: a guess, where a caller must
    not take "cannot look" for "nothing there"."""
    try:
        return os.stat(path).st_mode
    except OSError as error:
        if error.errno in _NOTHING_THERE:
            return None
        raise


def staging_path(folder: Path) -> Path:
    """A new staging name in ``folder`` (nothing is created)."""
    return folder / f"{STAGING_PREFIX}{uuid.uuid4().hex}"


def make_staging_folder(folder: Path) -> Path:
    """A new staging folder in ``folder``, only its owner's (as ``tempfile.mkdtemp`` makes them)."""
    path = staging_path(folder)
    path.mkdir(0o700)
    return path


class StagingFolder:
    """A new staging folder in ``workspace`` that a restore writes its tree into, then presents
    (:meth:`present`); leaving the ``with`` block removes it with whatever is still in it.

    The folder is held open from the start, so that one removed on the way (and recreated, by the
    extraction itself) is noticed instead of presenting a tree written partly elsewhere.
    """

    def __init__(self, workspace: Path, uri: str) -> None:
        self.workspace = workspace
        self.uri = uri
        self.path = staging_path(workspace)
        try:
            self.path.mkdir()
        except OSError as error:
            message = f"{uri}: could not make a folder to restore into in {workspace}: {error.strerror or error}"
            raise placement_error(error, message, uri) from error
        try:
            self._held = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            remove_tree(self.path)
            raise

    def __enter__(self) -> StagingFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        os.close(self._held)
        remove_tree(self.path)

    def present(self) -> None:
        """Move the staged tree's top-level names into the workspace, all or none (see
        :func:`replace_all`); other names in the workspace are left alone.

        Raises:
            DestinationError: The staging folder was removed on the way, or a name could not be
                put in place over what is there (the workspace is then as it was).
            AccessDeniedError: Permission denied putting the names in place (likewise).
            StoreError: Any other failure putting them in place (likewise).
        """
        self._check_held()
        self._place(sorted(os.listdir(self.path)))

    def present_paths(self, paths: Sequence[str]) -> None:
        """Move the staged entries at ``paths`` (relative, ``/``-separated, none inside another)
        to the same paths in the workspace, all or none (see :func:`replace_all`), creating the
        folders they are in where missing: a partial restore replaces what it restored and
        leaves everything else in the workspace alone.

        Raises:
            DestinationError: The staging folder was removed on the way, a folder of a path is a
                file or a symlink in the workspace (never followed), or an entry could not be put
                in place over what is there (the workspace then holds what it held, and maybe new
                empty folders).
            AccessDeniedError: Permission denied making a folder or putting the entries in place.
            StoreError: Any other failure doing so.
        """
        self._check_held()
        for path in paths:
            folder = self.workspace
            for part in path.split("/")[:-1]:
                folder = folder / part
                try:
                    os.mkdir(folder)
                except FileExistsError:
                    if not stat.S_ISDIR(os.lstat(folder).st_mode):
                        raise DestinationError(
                            f"{self.uri}: cannot restore {path!r} into {self.workspace}: {folder} is not a folder",
                            uri=self.uri,
                        ) from None
                except OSError as error:
                    message = f"{self.uri}: cannot restore {path!r} into {self.workspace}: {error.strerror or error}"
                    raise placement_error(error, message, self.uri) from error
        self._place(list(paths))

    def _check_held(self) -> None:
        original = os.fstat(self._held)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        if original.st_nlink == 0 or now is None or (now.st_dev, now.st_ino) != (original.st_dev, original.st_ino):
            raise DestinationError(
                f"{self.uri}: the workspace was removed while the checkpoint was restored", uri=self.uri
            )

    def _place(self, names: Sequence[str]) -> None:
        try:
            replace_all([(self.path / name, self.workspace / name) for name in names])
        except OSError as error:
            message = f"{self.uri}: could not put the restored checkpoint in place in {self.workspace}: {error}"
            raise placement_error(error, message, self.uri) from error


@contextlib.contextmanager
def placing(doing: str, path: Path, uri: str, *, kept: Path | None = None) -> Iterator[None]:
    """Raise an ``OSError`` met while the integration works on the local ``path`` (``doing``, such
    as "put the restored files in place in") as the :class:`CheckpointError` it is, naming ``path``
    and, where a restore is not in place, the folder ``kept`` that still holds it.

    Raises:
        AccessDeniedError: Permission denied.
        DestinationError: A file where a folder must be, or the reverse.
        StoreError: Any other failure (a full disk, an I/O error).
    """
    try:
        yield
    except CheckpointError:
        raise
    except OSError as error:
        where = f" ({error.filename})" if error.filename is not None and str(error.filename) != str(path) else ""
        message = f"{uri}: could not {doing} {path}: {error.strerror or error}{where}"
        if kept is not None:
            message += f"; the restored files are still in {kept}"
        raise placement_error(error, message, uri) from error


def placement_error(error: OSError, message: str, uri: str) -> CheckpointError:
    """The :class:`CheckpointError` an ``OSError`` met placing files is: :class:`AccessDeniedError`
    (permission denied), :class:`DestinationError` (a file where a folder must be, or the reverse),
    else :class:`StoreError` (a full disk, an I/O error)."""
    if isinstance(error, PermissionError):
        return AccessDeniedError(message, uri=uri)
    if isinstance(error, FileExistsError | NotADirectoryError | IsADirectoryError):
        return DestinationError(message, uri=uri)
    return StoreError(message, uri=uri)


@contextlib.contextmanager
def staging_file(folder: Path) -> Iterator[Path]:
    """A new staging name in ``folder`` for a file (not created); on exit a file left under it
    (one not renamed into place) is removed."""
    path = staging_path(folder)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def make_workspace(workspace: Path, uri: str) -> None:
    """Create the folder a restore of ``uri`` goes into, or say what stands in the way.

    Raises:
        DestinationError: Something that is not a folder is there, or in its path.
        AccessDeniedError: It cannot be created (permission denied).
        StoreError: Any other failure (a full disk, an I/O error).
    """
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # something that is not a folder (exist_ok covers folders)
        raise DestinationError(
            f"cannot restore {uri} into the workspace {workspace}: it exists and is not a folder "
            "(pass workspace= a folder, or a path that does not exist yet)",
            uri=uri,
        ) from error
    except NotADirectoryError as error:
        raise DestinationError(
            f"cannot restore {uri} into the workspace {workspace}: a part of its path is a file, not a folder",
            uri=uri,
        ) from error
    except OSError as error:
        message = f"cannot restore {uri} into the workspace {workspace}: {error.strerror or error}"
        raise placement_error(error, message, uri) from error


def replace_all(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename each source over its target (sources and targets on one filesystem): all or none.

    A target that exists is kept aside in a staging folder, and removed once every source is in
    place: a file (or symlink) replaced by a file stays linked there while the new one replaces
    it in one rename; anything else (a folder that is not empty, a file where the source is a
    folder) is moved there just before its source takes its place. On an error the sources go
    back, the old targets are put back, and the error is raised.
    """
    if not moves:
        return
    guard = guarded.get()
    if guard is not None:
        guard.check([target for _, target in moves])
    aside = staging_path(moves[0][1].parent)
    aside_made = False
    moved: list[int] = []
    placed: list[int] = []
    try:
        for index, (source, target) in enumerate(moves):
            if os.path.lexists(target):
                if not aside_made:
                    aside.mkdir()
                    aside_made = True
                if not _keep_linked(source, target, aside / str(index)):
                    os.replace(target, aside / str(index))
                moved.append(index)
            os.replace(source, target)
            placed.append(index)
    except BaseException:
        for index in reversed(placed):
            with contextlib.suppress(OSError):
                os.replace(moves[index][1], moves[index][0])
        for index in moved:
            kept = aside / str(index)
            with contextlib.suppress(OSError):
                os.replace(kept, moves[index][1])
                if os.path.lexists(kept):  # a link of the target itself, which the rename leaves
                    os.unlink(kept)
        if aside_made:
            with contextlib.suppress(OSError):
                aside.rmdir()
        raise
    if guard is not None:
        guard.note([target for _, target in moves])
    if aside_made:
        remove_tree(aside)


def _keep_linked(source: Path, target: Path, kept: Path) -> bool:
    """Hard-link ``target`` as ``kept`` when ``source`` can replace it in one rename (neither is a
    folder); whether it did."""
    if stat.S_ISDIR(os.lstat(source).st_mode) or stat.S_ISDIR(os.lstat(target).st_mode):
        return False
    try:
        os.link(target, kept, follow_symlinks=False)
    except OSError:  # a filesystem without hard links: moved aside instead
        return False
    return True


def move_all(moves: Sequence[tuple[Path, Path]]) -> None:
    """Move each source to its target, replacing what is there: all or none (see :func:`replace_all`).

    Sources may be on another filesystem than their targets: those are copied into a staging
    name beside their target first (symlinks as symlinks, modes and times kept), so that placing
    them is still a rename; the sources are removed once everything is in place. On an error the
    copies are removed and the sources and targets are as they were.
    """
    if not moves:
        return
    try:
        _move_all(moves, copy_all=False)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        _move_all(moves, copy_all=True)  # one filesystem by device number, yet not by mount (a bind mount)


def _move_all(moves: Sequence[tuple[Path, Path]], *, copy_all: bool) -> None:
    staged: list[tuple[Path, Path]] = []
    copies: list[Path] = []
    try:
        for source, target in moves:
            if copy_all or not _same_filesystem(source, target.parent):
                copy = staging_path(target.parent)
                copies.append(copy)
                _copy(source, copy)
                staged.append((copy, target))
            else:
                staged.append((source, target))
        replace_all(staged)
    except BaseException:
        for copy in copies:
            remove_tree(copy)
        raise
    for (source, _), (placed, _) in zip(moves, staged, strict=True):
        if placed != source:
            remove_tree(source)


def _same_filesystem(source: Path, folder: Path) -> bool:
    return os.lstat(source).st_dev == os.stat(folder).st_dev


def _copy(source: Path, target: Path) -> None:
    """Copy ``source`` (a file, a symlink or a tree, whatever its depth) to the new name ``target``."""
    if not stat.S_ISDIR(os.lstat(source).st_mode):
        shutil.copy2(source, target, follow_symlinks=False)
        return
    folders: list[tuple[Path, Path]] = []  # modes and times are set once each folder is filled
    pending = [(source, target)]
    while pending:
        folder, copy = pending.pop()
        os.mkdir(copy, 0o700)
        folders.append((folder, copy))
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), copy / entry.name))
                else:
                    shutil.copy2(entry.path, copy / entry.name, follow_symlinks=False)
    for folder, copy in reversed(folders):  # deepest first: a read-only folder is made so last
        shutil.copystat(folder, copy, follow_symlinks=False)


def remove(path: Path) -> None:
    """Remove ``path`` (a file, a symlink or a tree, whatever its depth); raise if it is still there."""
    remove_tree(path)
    if os.path.lexists(path):
        raise OSError(errno.ENOTEMPTY, f"could not remove everything in {path}", str(path))


def remove_tree(path: str | os.PathLike[str], *, writable: bool = False) -> None:
    """Remove ``path`` and everything in it, best effort (what cannot be removed is left), as
    ``shutil.rmtree(path, ignore_errors=True)`` does, but for trees a restore can make: thousands
    of folders deep (``rmtree`` and ``os.walk`` before Python 3.12 recurse once per level, past the
    recursion limit) and deeper than ``PATH_MAX`` (every call is relative to the folder open).
    Never follows a symlink; holds two descriptors at most, whatever the depth.

    ``writable``: give each folder its owner's full access before emptying it, for a scratch tree
    of our own whose folders copied read-only modes (never for the user's folders).
    """
    if writable:
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IRWXU)
    try:
        fd = os.open(path, _OPEN_FOLDER)
    except OSError:  # not a folder (a symlink to one too), or gone
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    levels: list[tuple[str, list[str]]] = []  # per folder above: the one open, its siblings left
    try:
        folders = _remove_files(fd)
        while True:
            if folders:
                name = folders.pop()
                if writable:  # listed as a folder by lstat: this follows no symlink
                    with contextlib.suppress(OSError):
                        os.chmod(name, stat.S_IRWXU, dir_fd=fd)
                try:
                    child = os.open(name, _OPEN_FOLDER, dir_fd=fd)
                except OSError:
                    continue
                os.close(fd)
                fd = child
                levels.append((name, folders))
                folders = _remove_files(fd)
            elif levels:
                name, folders = levels.pop()
                parent = os.open("..", _OPEN_FOLDER, dir_fd=fd)
                os.close(fd)
                fd = parent
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=fd)
            else:
                break
    except OSError:
        pass
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _remove_files(fd: int) -> list[str]:
    """Remove what the open folder ``fd`` holds but folders; the names of those."""
    folders = []
    for name in os.listdir(fd):
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                folders.append(name)
            else:
                os.unlink(name, dir_fd=fd)
        except OSError:
            pass
    return folders


#: Temporary workspaces not discarded yet, with the process that made each.
_temporary_workspaces: dict[Path, int] = {}


def temporary_workspace() -> Path:
    """A new temporary folder to restore into, removed at interpreter exit unless discarded first."""
    path = Path(tempfile.mkdtemp(prefix="checkpointio-"))
    _temporary_workspaces[path] = os.getpid()
    if _exit.passed(_exit.Stage.FILES):
        _remove_once_ended(path)
    return path


#: Removes what it is sent (NUL-separated paths) once its standard input ends, that is once every
#: process holding the other end (the one that sent them, and children forked since) has ended.
_REMOVER = """\
import os, sys
sys.path.insert(0, sys.argv[1])
paths = sys.stdin.buffer.read().split(b"\\0")
from checkpointio._placement import remove_tree
for path in paths:
    if path:
        remove_tree(os.fsdecode(path))
"""
#: This process's remover (by the process that started it: a forked child starts its own).
_removers: dict[int, subprocess.Popen[bytes]] = {}


def _remove_once_ended(path: Path) -> None:
    """Have ``path`` removed once this process has ended.

    For a workspace made after the exit step that removes them ran (a load in an ``atexit`` hook
    registered before checkpointio's): nothing of this process runs after the hooks, so a helper
    process does it, started in its own session (a Ctrl-C meant for this one does not stop it). Its
    standard error is this process's, for a failure to be seen.
    """
    remover = _removers.get(os.getpid())
    try:
        if remover is None:
            package_parent = str(Path(__file__).resolve().parent.parent)
            remover = subprocess.Popen(
                [sys.executable, "-c", _REMOVER, package_parent],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            _removers[os.getpid()] = remover
        assert remover.stdin is not None
        remover.stdin.write(os.fsencode(path) + b"\0")
        remover.stdin.flush()
    except OSError as error:  # no interpreter to start (embedded), no process left: the load goes on
        logger.warning("%s will not be removed after this process ends: %s", path, error)


def discard_workspace(path: Path) -> None:
    """Remove a folder :func:`temporary_workspace` made, unless another process made it (the
    parent of a forked child keeps using it)."""
    if _temporary_workspaces.get(path) == os.getpid():
        remove_tree(path)
        _temporary_workspaces.pop(path, None)


def _discard_temporary_workspaces() -> None:
    """At exit, once background saves were drained, remove the temporary workspaces nobody
    discarded (a restore can be gigabytes in ``/tmp``); a forked child leaves its parent's alone.

    No background save reads them anyway: one that returned early works from its own snapshot
    (hard links or copies in a scratch folder), taken during the call.
    """
    for path in list(_temporary_workspaces):
        discard_workspace(path)


_exit.on_exit(_exit.Stage.FILES, _discard_temporary_workspaces)
