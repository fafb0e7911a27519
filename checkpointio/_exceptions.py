"""The one exception tree of checkpointio.

Every error the library raises on purpose derives from :class:`CheckpointError`, and carries the
URI it concerns. Built-in bases are mixed in where a caller would reasonably catch the built-in::

    CheckpointError
    ├── SourceNotFoundError (also FileNotFoundError)  what save() was given does not exist
    ├── UnsupportedSourceError (also ValueError)      what save() was given cannot be stored safely
    ├── SourceChangedError                            a file shrank or vanished while it was saved
    ├── SourceUnreadableError (also PermissionError)  what save() was given cannot be read
    ├── CheckpointNotFoundError (also FileNotFoundError)  an explicit read of a missing object
    ├── CorruptCheckpointError                          what was stored does not read back whole
    │   ├── ChecksumMismatchError                       bytes differ from the recorded checksum
    │   └── UnsafeArchiveError                          an archive tries to leave its folder
    ├── ConcurrentModificationError                     the object changed while it was read
    ├── StoreError                                      the store failed or refused
    │   ├── StoreUnavailableError                       unreachable endpoint, timeouts
    │   ├── AccessDeniedError (also PermissionError)    bad credentials or missing permission
    │   ├── BucketNotFoundError                         the bucket does not exist
    │   ├── ObjectTooLargeError                         over the store's object size limit
    │   └── DestinationError (also ValueError)          a path that cannot be written as named
    ├── BackgroundSaveError                             an earlier background save failed
    ├── InvalidNameError (also ValueError)              a run id or task name that cannot be a key
    ├── NoCheckpointError (also RuntimeError)           ctx().checkpoint where there is none
    └── PortalError (also RuntimeError)                 a *_sync call that would deadlock

Cancellation (``KeyboardInterrupt``, ``anyio`` cancellation) is never wrapped.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "BackgroundSaveError",
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "ConcurrentModificationError",
    "CorruptCheckpointError",
    "DestinationError",
    "InvalidNameError",
    "NoCheckpointError",
    "ObjectTooLargeError",
    "PortalError",
    "SourceChangedError",
    "SourceNotFoundError",
    "SourceUnreadableError",
    "StoreError",
    "StoreUnavailableError",
    "UnsafeArchiveError",
    "UnsupportedSourceError",
]


class CheckpointError(Exception):
    """Base class of every error checkpointio raises on purpose.

    Attributes:
        uri: The checkpoint or source the error concerns, when there is one.
    """

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class SourceNotFoundError(CheckpointError, FileNotFoundError):
    """The path given to ``save()`` does not exist."""


class UnsupportedSourceError(CheckpointError, ValueError):
    """The tree given to ``save()`` holds something that could not be restored safely.

    For example a symlink pointing outside the tree, which extraction would refuse.
    """


class SourceChangedError(CheckpointError):
    """A file shrank while it was read or disappeared while its directory was being saved, or an
    entry of the tree was replaced (a folder swapped for a symlink, a file for a folder, say) since
    it was listed; nothing was stored.

    A file that grows is stored with the size it had when it was opened; one renamed over by
    another file before it was opened is stored as that file.
    """


class SourceUnreadableError(CheckpointError, PermissionError):
    """A file or folder of what ``save()`` was given cannot be read (permission denied); nothing
    was stored. The message names the user's path, also for a background save."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """An operation that needs an existing checkpoint found none at the URI."""


class CorruptCheckpointError(CheckpointError):
    """The stored checkpoint is truncated, garbled or otherwise does not read back whole."""


class ChecksumMismatchError(CorruptCheckpointError):
    """The bytes read back differ from the checksum recorded when they were saved."""


class UnsafeArchiveError(CorruptCheckpointError):
    """An archive entry would be written outside its folder, or is a device or unsafe link."""


class ConcurrentModificationError(CheckpointError):
    """The object was replaced while it was being read; nothing of the mix is kept."""


class StoreError(CheckpointError):
    """The store failed or refused an operation."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (connection refused, timed out, DNS) after retries."""


class AccessDeniedError(StoreError, PermissionError):
    """The credentials are invalid or lack the permission for this operation."""


class BucketNotFoundError(StoreError):
    """The bucket named in the URI does not exist."""


class ObjectTooLargeError(StoreError):
    """The object is larger than the store accepts (5 TiB on S3)."""


class DestinationError(StoreError, ValueError):
    """A local path that cannot be written as named: a folder where a checkpoint file goes, a file
    where a folder is needed on its way, or a restore that would replace a folder it must not (the
    current folder or one of its parents, the home folder, ``/``, the checkpoint being read)."""


class BackgroundSaveError(CheckpointError):
    """A background save (``save(wait=False)``) failed and nobody had retrieved its error yet.

    Raised by the next ``save()``, ``wait()`` or ``close()`` of the same checkpoint; the original
    error is the ``__cause__`` (the save's handle raises the original error itself).
    """


class InvalidNameError(CheckpointError, ValueError):
    """A run id, environment or task name that cannot be one segment of a key.

    Empty, ``.``, ``..`` or holding ``/``, ``\\`` or NUL: such a name would share its keys with
    another run or task, or leave the storage root.
    """


class NoCheckpointError(CheckpointError, RuntimeError):
    """``ctx().checkpoint`` (or an integration defaulting to it) where no checkpoint is in force.

    Outside a task, or in a task with ``retries=0`` (nothing could ever be restored, so none is
    made). ``ctx().checkpoint_or_none`` is ``None`` there instead of raising.
    """


class PortalError(CheckpointError, RuntimeError):
    """A ``*_sync`` method was called where it would deadlock (from the portal's own thread)."""
