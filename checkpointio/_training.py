"""What the training-framework integrations share: the checkpoint in force and the saves of a folder.

Lightning's callback (:mod:`checkpointio.lightning`) and the Hugging Face ``TrainerCallback``
(:mod:`checkpointio.hf`) both store a local folder after each framework save, in the background by
default, and keep under retention the file or folder a run resumed from until a later save has
succeeded. :class:`FolderSaver` holds that state once; each integration adds its framework's hooks.
"""

from __future__ import annotations

from pathlib import Path

from ._background import SaveHandle
from ._checkpoint import Checkpoint
from ._exceptions import NoCheckpointError
from ._runtime import _whole, ctx

__all__ = ["FolderSaver", "checked_checkpoint", "checkpoint_in_force"]


def checked_checkpoint(checkpoint: object) -> Checkpoint | None:
    """``checkpoint`` if it is a ``Checkpoint`` or ``None``; else a ``TypeError`` saying what it takes
    (raised where the integration is made, not at the framework's first save)."""
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        hint = ": make one with Checkpoint(uri)" if isinstance(checkpoint, str) else ""
        raise TypeError(
            f"checkpoint must be a Checkpoint (or None: ctx().checkpoint), got {type(checkpoint).__name__}{hint}"
        )
    return checkpoint


def checkpoint_in_force(checkpoint: Checkpoint | None) -> Checkpoint:
    """``checkpoint``, else ``ctx().checkpoint``; a clear error when there is neither.

    Raises:
        NoCheckpointError: No ``checkpoint`` was given and none is in force.
    """
    checkpoint = checkpoint if checkpoint is not None else ctx().checkpoint_or_none
    if checkpoint is None:
        raise NoCheckpointError("no checkpoint: pass checkpoint=, or run inside @env.task(retries=N) with N > 0")
    return checkpoint


class FolderSaver:
    """Mixin: stores a training folder after each save and knows when the resumed-from item may go.

    Attributes:
        keep_last: How many saved items retention keeps (``None``: all).
        background: Whether uploads run in the background.
        resumed_from: The file or folder the run resumed from, once restored.
        last: The handle of the last save.
    """

    def __init__(self, checkpoint: Checkpoint | None, keep_last: int | None, background: bool) -> None:
        if keep_last is not None:
            keep_last = _whole(keep_last, "keep_last", "an int or None")
            if keep_last < 1:
                raise ValueError("keep_last must be at least 1")
        self._checkpoint = checked_checkpoint(checkpoint)
        self.keep_last = keep_last
        self.background = background
        self.resumed_from: Path | None = None
        self.last: SaveHandle | None = None
        self._restored = False
        self._stored_newer = False

    @property
    def checkpoint(self) -> Checkpoint:
        """The checkpoint in force."""
        return checkpoint_in_force(self._checkpoint)

    def _store(self, folder: Path) -> None:
        self.last = self.checkpoint.save_sync(folder, wait=not self.background)
        # This call waited for the previous save (or was itself synchronous): an item newer than
        # the resumed one is stored once any save after the restore has succeeded.
        if self.last.succeeded():
            self._stored_newer = True

    def _resumed_is_protected(self) -> bool:
        """Whether retention must keep :attr:`resumed_from`: no save after the restore succeeded yet.

        The next save would wait for the one in flight anyway; waiting for it here first makes
        the answer exact rather than a race with the upload.
        """
        if self.last is not None and not self._stored_newer:
            self.last.join()
            self._stored_newer = self.last.succeeded()
        return self.resumed_from is not None and not self._stored_newer

    def wait(self) -> None:
        """Wait for the last background upload, raising its error.

        Raises:
            PortalError: Called on checkpointio's loop thread while the upload runs there
                (waiting would deadlock); a finished upload's outcome is reported there too.
        """
        if self.last is not None:
            self.last.result()
