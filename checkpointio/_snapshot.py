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
from dataclasses import dataclass, field
from pathlib import Path

from ._exceptions import SourceChangedError, SourceNotFoundError

__all__ = ["Snapshot", "take"]

#: ``os.link`` errors that mean "this filesystem or pair of filesystems cannot hard-link": copy.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


@dataclass
class Snapshot:
    """What a background save uploads: ``data`` (bytes or a path inside ``scratch``).

    Attributes:
        data: The bytes, or the path of the snapshot file or tree.
        scratch: The scratch folder holding the snapshot, removed by :meth:`discard`.
        linked: How many regular files were hard-linked rather than copied.
        copied: How many regular files were copied.
    """

    data: bytes | Path
    scratch: Path | None = None
    linked: int = 0
    copied: int = 0
    _inodes: dict[tuple[int, int], Path] = field(default_factory=dict, repr=False)
    _watched: list[tuple[Path, Path, int, int]] = field(default_factory=list, repr=False)

    def check_unchanged(self) -> None:
        """Raise :class:`SourceChangedError` if a linked file was rewritten in place since the call."""
        for source, target, mtime_ns, size in self._watched:
            st = os.stat(target)
            if (st.st_mtime_ns, st.st_size) != (mtime_ns, size):
                raise SourceChangedError(
                    f"{source} was rewritten in place while its background save ran, so the save could "
                    "hold a mix of old and new bytes and was not stored; write new files (or a temporary "
                    "name, then rename) after save(wait=False), or save with wait=True",
                    uri=str(source),
                )

    def discard(self) -> None:
        """Remove the scratch folder (the source is never touched)."""
        if self.scratch is not None:
            _remove_tree(self.scratch)
            self.scratch = None

    def _file(self, source: Path, target: Path, st: os.stat_result, link: bool) -> None:
        inode = (st.st_dev, st.st_ino)
        first = self._inodes.get(inode)
        if first is not None:  # a hard link inside the tree: keep it one inode in the snapshot too
            os.link(first, target)
            return
        if link:
            try:
                os.link(source, target, follow_symlinks=False)
            except OSError as error:
                if error.errno not in _NO_LINK:
                    raise
            else:
                self.linked += 1
                self._inodes[inode] = target
                linked = os.stat(target)
                self._watched.append((source, target, linked.st_mtime_ns, linked.st_size))
                return
        shutil.copy2(source, target, follow_symlinks=False)
        self.copied += 1
        self._inodes[inode] = target


def _copy_link(source: Path, target: Path) -> None:
    """The symlink again, with its own mtime (the archive stores it; a new one has the time now)."""
    os.symlink(os.readlink(source), target)
    st = source.lstat()
    with contextlib.suppress(NotImplementedError, OSError):  # no lutimes on this platform
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _remove_tree(root: Path) -> None:
    """``rmtree``, also where the shadow tree copied a read-only folder's mode (0o555 left its
    entries, and the hard links that keep old files' disk space in use, behind for a non-root user)."""
    for folder, subfolders, _ in os.walk(root):  # top-down: each folder is opened up before it is entered
        for name in subfolders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):  # os.walk lists symlinks to folders too; not entered, not changed
                with contextlib.suppress(OSError):
                    os.chmod(path, stat.S_IRWXU)
    with contextlib.suppress(OSError):
        os.chmod(root, stat.S_IRWXU)
    shutil.rmtree(root, ignore_errors=True)


def _scratch_for(source: Path) -> Path:
    """A new scratch folder, on the source's filesystem when one can be found (so links work).

    Tried in order: the system temporary folder, then a hidden folder beside the source. Frameworks
    glob their own names (``checkpoint-*``, ``*.ckpt``); a dot-name beside them matches none.
    """
    device = source.stat().st_dev
    candidates = [Path(tempfile.gettempdir()), source.parent]
    for base in candidates:
        try:
            if base.stat().st_dev == device:
                return Path(tempfile.mkdtemp(prefix=".checkpointio-snapshot-", dir=base))
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix=".checkpointio-snapshot-"))


def take(data: object, *, link: bool = True) -> Snapshot:
    """Snapshot ``data`` (bytes, a file or a directory) as it is now.

    Raises:
        SourceNotFoundError: The path does not exist.
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
    try:
        st = given.stat()
    except FileNotFoundError:
        raise SourceNotFoundError(f"cannot save {str(given)!r}: no such file or directory", uri=str(given)) from None
    # What a path names, not the symlink or "." that names it: a file given as a symlink (Lightning's
    # ``last.ckpt``) is linked as the file, and a scratch folder beside a tree is outside it.
    source = Path(os.path.realpath(given))
    scratch = _scratch_for(source)
    snapshot = Snapshot(scratch / "snapshot", scratch)
    try:
        target = scratch / "snapshot"
        if stat.S_ISDIR(st.st_mode):
            _tree(snapshot, source, target, link)
        else:
            snapshot._file(source, target, st, link)
    except BaseException:
        snapshot.discard()
        raise
    return snapshot


def _tree(snapshot: Snapshot, source: Path, target: Path, link: bool) -> None:
    target.mkdir()
    folders: list[tuple[Path, Path]] = [(source, target)]
    for root, dirs, files in os.walk(source):
        base = Path(root)
        shadow = target / base.relative_to(source)
        for name in dirs:
            path = base / name
            if path.is_symlink():
                _copy_link(path, shadow / name)
            else:
                (shadow / name).mkdir()
                folders.append((path, shadow / name))
        for name in files:
            path = base / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                _copy_link(path, shadow / name)
            elif stat.S_ISREG(st.st_mode):
                snapshot._file(path, shadow / name, st, link)
            # sockets, pipes and devices hold no data: the archive would skip them anyway
    for original, copy in reversed(folders):  # deepest first: creating entries changes a folder's mtime
        with contextlib.suppress(OSError):
            shutil.copystat(original, copy, follow_symlinks=False)
