"""Cheap point-in-time copies of what a background save was given, so the caller may carry on.

A background save returns before its upload starts; the caller may then overwrite or delete what
it passed. So the save works from a snapshot taken during the call:

- ``bytes``: the object itself (immutable); a ``bytearray`` or ``memoryview`` is copied.
- a file: a hard link in a scratch folder on the same filesystem, else a copy.
- a directory: a shadow tree in a scratch folder: folders and symlinks recreated, every regular
  file hard-linked (same inode, so hard links inside the tree stay hard links); a file that cannot
  be linked (another filesystem, a filesystem without hard links) is copied.

A hard link shares the file's content: replacing a file (``torch.save`` to a new name, write to a
temporary name and rename, delete and recreate) leaves the snapshot alone, but rewriting a linked
file *in place* after the call (``open(path, "r+b")``, appending, ``torch.save`` or
``open(path, "wb")`` on an existing path, which truncate the same file) changes it. So each linked
file's size and mtime are recorded, and :meth:`Snapshot.check_unchanged` — called once the save
has read everything and before it commits — fails the save with :class:`SourceChangedError`
rather than store a mix of old and new bytes. ``Snapshot.linked`` tells which files were linked;
``link=False`` copies everything.

Everything here blocks: it runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import _archive, _placement
from ._exceptions import SourceChangedError, SourceNotFoundError, UnsupportedSourceError
from ._writes import PIECE

__all__ = ["Snapshot", "take"]

#: ``os.link`` errors that mean "this filesystem or pair of filesystems cannot hard-link": copy.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


@dataclass
class Snapshot:
    """What a background save uploads: ``data`` (bytes or a path inside ``scratch``).

    Attributes:
        data: The bytes, or the path of the snapshot file or tree.
        scratch: The scratch folder holding the snapshot, removed by :meth:`discard`.
        source: The path the caller gave (what messages about the snapshot name), if any.
        linked: How many regular files were hard-linked rather than copied.
        copied: How many regular files were copied.
        hard_links: The inodes (``st_dev``, ``st_ino``) of the snapshot's files that have more than
            one name in it. A linked file's link count also counts the caller's names, which may
            change after the call, so this set, not the count, tells the tree's own hard links.
    """

    data: bytes | Path
    scratch: Path | None = None
    source: str | None = None
    linked: int = 0
    copied: int = 0
    hard_links: set[tuple[int, int]] = field(default_factory=set)
    _inodes: dict[tuple[int, int], Path] = field(default_factory=dict, repr=False)
    _watched: list[tuple[str, Path, int, int]] = field(default_factory=list, repr=False)

    def check_unchanged(self) -> None:
        """Raise :class:`SourceChangedError` if a linked file was rewritten in place since the call."""
        for source, target, mtime_ns, size in self._watched:
            st = os.stat(target)
            if (st.st_mtime_ns, st.st_size) != (mtime_ns, size):
                raise SourceChangedError(
                    f"{source} was rewritten in place while its background save ran, so the save could "
                    "hold a mix of old and new bytes and was not stored; write new files (or a temporary "
                    "name, then rename) after save(wait=False), or save with wait=True",
                    uri=source,
                )

    def discard(self) -> None:
        """Remove the scratch folder (the source is never touched)."""
        if self.scratch is not None:
            _placement.remove_tree(self.scratch, writable=True)  # its folders may copy read-only modes
            self.scratch = None

    def _file(self, folder: int, name: str, shown: str, target: Path, st: os.stat_result, link: bool) -> None:
        """Link (or copy) the file ``name`` of the open folder ``folder``, listed as ``st``, to ``target``.

        Read through the folder's descriptor, never following a symlink: a file swapped since
        it was listed fails the snapshot (:class:`SourceChangedError`) instead of bringing in
        whatever the symlink points at.
        """
        uri = self.source or shown
        inode = (st.st_dev, st.st_ino)
        first = self._inodes.get(inode)
        if first is not None:  # a hard link inside the tree: keep it one inode in the snapshot too
            os.link(first, target)
            linked = os.lstat(target)
            self.hard_links.add((linked.st_dev, linked.st_ino))
            return
        if link:
            try:
                os.link(name, target, src_dir_fd=folder, follow_symlinks=False)
            except FileNotFoundError as error:
                raise SourceChangedError(f"{shown} disappeared while {uri} was being saved", uri=uri) from error
            except OSError as error:
                if error.errno not in _NO_LINK:
                    raise _archive.unreadable(error, shown, uri) from error
            else:
                linked = os.lstat(target)
                if (linked.st_dev, linked.st_ino) != inode:
                    raise SourceChangedError(
                        f"{shown} was replaced while {uri} was being saved (the file linked is not the one listed)",
                        uri=uri,
                    )
                self.linked += 1
                self._inodes[inode] = target
                self._watched.append((shown, target, linked.st_mtime_ns, linked.st_size))
                return
        _copy(folder, name, shown, uri, target, st)
        self.copied += 1
        self._inodes[inode] = target


def _copy(folder: int, name: str, shown: str, uri: str, target: Path, st: os.stat_result) -> None:
    """Copy the file ``name`` of the open folder ``folder`` (still the one listed as ``st``) to
    ``target``, with its mode and times."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=folder)
    except FileNotFoundError as error:
        raise SourceChangedError(f"{shown} disappeared while {uri} was being saved", uri=uri) from error
    except OSError as error:
        if error.errno == errno.ELOOP:
            message = f"{shown} was replaced by a symlink while {uri} was being saved"
            raise SourceChangedError(message, uri=uri) from error
        raise _archive.unreadable(error, shown, uri) from error
    with open(fd, "rb") as original:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise SourceChangedError(
                f"{shown} was replaced while {uri} was being saved (the file read is not the one listed)", uri=uri
            )
        with open(target, "xb") as copy:
            shutil.copyfileobj(original, copy, PIECE)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_link(folder: int, name: str, target: Path, st: os.stat_result) -> None:
    """The symlink again, with its own mtime (the archive stores it; a new one has the time now)."""
    os.symlink(os.readlink(name, dir_fd=folder), target)
    with contextlib.suppress(NotImplementedError, OSError):  # no lutimes on this platform
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _inside(path: Path, tree: Path) -> bool:
    """Whether ``path`` is ``tree`` or lies inside it (as real paths)."""
    real, top = os.path.realpath(path), os.path.realpath(tree)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _scratch_for(source: Path, is_tree: bool) -> Path:
    """A new scratch folder: outside the tree being snapshotted, on the source's filesystem when
    one can be found (so links work).

    Tried in order: the system temporary folder, then a hidden folder beside the source. Frameworks
    glob their own names (``checkpoint-*``, ``*.ckpt``); a dot-name beside them matches none. A
    temporary folder inside the tree (``TMPDIR`` set to a folder of the tree, where ``/tmp`` is
    small) is passed over: the snapshot would copy itself into itself. Only when every candidate
    lies inside the tree is one used there; :func:`take` then leaves it out of the walk.
    """
    device = source.stat().st_dev
    candidates = [Path(tempfile.gettempdir()), source.parent]
    outside = [base for base in candidates if not (is_tree and _inside(base, source))]
    for base in outside:
        try:
            if base.stat().st_dev == device:
                return _placement.make_staging_folder(base)
        except OSError:
            continue
    for base in outside:  # another filesystem: files are copied
        with contextlib.suppress(OSError):
            return _placement.make_staging_folder(base)
    return _placement.make_staging_folder(Path(tempfile.gettempdir()))


def take(data: object, *, link: bool = True, skip: Callable[[Path], _archive.Skip | None] | None = None) -> Snapshot:
    """Snapshot ``data`` (bytes, a file or a directory) as it is now.

    ``skip``, given the real path of a directory being snapshotted, says what to leave out of it
    (the store's own files where the checkpoint is saved inside the tree).

    Raises:
        SourceNotFoundError: The path does not exist.
        UnsupportedSourceError: It is neither a regular file nor a directory (a FIFO, a socket).
        SourceChangedError: The tree changed under the walk (see :func:`_archive.walk_tree`).
        SourceUnreadableError: A file or folder of it cannot be read.
        TypeError: ``data`` is of another type.
    """
    if isinstance(data, bytes):
        return Snapshot(data)
    if isinstance(data, bytearray | memoryview):
        return Snapshot(bytes(data))
    if hasattr(data, "read"):
        raise TypeError("a file object cannot be saved with wait=False (it is only read once); save it with wait=True")
    if not isinstance(data, str | os.PathLike):
        raise TypeError(f"save() takes bytes, a str path or a pathlib.Path, not {type(data).__name__}")
    given = Path(data)
    shown = str(given)
    try:
        st = given.stat()
    except FileNotFoundError:
        raise SourceNotFoundError(f"cannot save {shown!r}: no such file or directory", uri=shown) from None
    is_tree = stat.S_ISDIR(st.st_mode)
    if not is_tree and not stat.S_ISREG(st.st_mode):
        raise UnsupportedSourceError(
            f"cannot save {shown!r}: it is {_archive.file_type(st.st_mode)}, not a regular file or directory (to "
            "save what a pipe carries, pass it open in binary mode to save(wait=True))",
            uri=shown,
        )
    # What a path names, not the symlink or "." that names it: a file given as a symlink (Lightning's
    # ``last.ckpt``) is linked as the file, and a scratch folder beside a tree is outside it.
    source = Path(os.path.realpath(given))
    scratch = _scratch_for(source, is_tree)
    target = scratch / "snapshot"
    snapshot = Snapshot(target, scratch, shown)
    try:
        if is_tree:
            own = _archive.skip_within(str(source), str(scratch.parent), lambda name: name == scratch.name)
            _tree(snapshot, source, shown, target, link, _archive.skip_any(own, skip(source) if skip else None))
        else:
            # O_PATH where there is one: linking a file needs no right to list its folder
            folder = os.open(source.parent, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                listed = os.stat(source.name, dir_fd=folder, follow_symlinks=False)
                snapshot._file(folder, source.name, shown, target, listed, link)
            finally:
                os.close(folder)
    except BaseException:
        snapshot.discard()
        raise
    return snapshot


def _tree(snapshot: Snapshot, source: Path, shown: str, target: Path, link: bool, skip: _archive.Skip | None) -> None:
    """Build the shadow tree of ``source`` at ``target`` through :func:`_archive.walk_tree`, so a
    folder swapped for a symlink while it is walked fails the snapshot rather than being followed."""
    target.mkdir()
    folders: list[tuple[Path, os.stat_result]] = [(target, source.stat())]
    with contextlib.closing(_archive.walk_tree(str(source), shown=shown, uri=shown, skip=skip)) as entries:
        for entry in entries:
            copy = target / entry.rel
            mode = entry.st.st_mode
            if stat.S_ISDIR(mode):
                copy.mkdir()
                folders.append((copy, entry.st))
            elif stat.S_ISLNK(mode):
                _copy_link(entry.folder, entry.name, copy, entry.st)
            elif stat.S_ISREG(mode):
                snapshot._file(entry.folder, entry.name, os.path.join(shown, entry.rel), copy, entry.st, link)
            # sockets, pipes and devices hold no data: the archive would skip them anyway
    for copy, st in reversed(folders):  # deepest first: creating entries changes a folder's mtime
        with contextlib.suppress(OSError):
            os.chmod(copy, stat.S_IMODE(st.st_mode))
            os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
