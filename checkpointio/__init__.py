"""checkpointio: fault-tolerant tasks that save their progress to an object store and resume.

Public names are re-exported here; every other module is private.

Each module logs to its own logger under ``checkpointio`` (``checkpointio._stores._s3``, ...).
Like any library, checkpointio prints nothing itself: the package logger has a ``NullHandler``,
and an application shows the records by configuring logging (``logging.basicConfig()``).
"""

import logging

from ._checkpoint import Checkpoint, SaveHandle, latest_checkpoint
from ._config import MiB, TransferConfig, TransferOptions
from ._exceptions import (
    AccessDeniedError,
    BackgroundSaveError,
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    ConcurrentModificationError,
    CorruptCheckpointError,
    DestinationError,
    InvalidNameError,
    NoCheckpointError,
    ObjectTooLargeError,
    PortalError,
    SourceChangedError,
    SourceNotFoundError,
    SourceUnreadableError,
    StoreError,
    StoreUnavailableError,
    UnsafeArchiveError,
    UnsupportedSourceError,
)
from ._progress import Progress, ProgressCallback
from ._runtime import AttemptFailure, TaskContext, TaskEnvironment, ctx, default_storage, env
from ._selection import Entry
from ._signals import Termination, interrupt_on_sigterm

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AccessDeniedError",
    "AttemptFailure",
    "BackgroundSaveError",
    "BucketNotFoundError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "ConcurrentModificationError",
    "CorruptCheckpointError",
    "DestinationError",
    "Entry",
    "InvalidNameError",
    "NoCheckpointError",
    "MiB",
    "ObjectTooLargeError",
    "PortalError",
    "Progress",
    "ProgressCallback",
    "SaveHandle",
    "SourceChangedError",
    "SourceNotFoundError",
    "SourceUnreadableError",
    "StoreError",
    "StoreUnavailableError",
    "TaskContext",
    "TaskEnvironment",
    "Termination",
    "TransferConfig",
    "TransferOptions",
    "UnsafeArchiveError",
    "UnsupportedSourceError",
    "__version__",
    "ctx",
    "default_storage",
    "env",
    "interrupt_on_sigterm",
    "latest_checkpoint",
]
