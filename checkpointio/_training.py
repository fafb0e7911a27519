"""What the training-framework integrations share: the checkpoint in force and the saves of a folder.

Lightning's callback (:mod:`checkpointio.lightning`) and the Hugging Face ``TrainerCallback``
(:mod:`checkpointio.hf`) both store a local folder after each framework save, in the background by
default, and keep under retention the file or folder a run resumed from until a later save has
succeeded. :class:`FolderSaver` holds that state once; each integration adds its framework's hooks.

Both remove only what they wrote: the folder holds a ledger (:data:`LEDGER`) naming each file or
folder an integration wrote there and the run it was written for (:func:`run_of`: a task's run,
else the checkpoint's own URI). The ledger is stored and restored with the folder, so a retry, in this process
or on another machine, knows its earlier attempts' files; anything else in the folder (a
``ModelCheckpoint``'s files, another run's, the user's) is never removed or replaced.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from ._background import SaveHandle
from ._checkpoint import Checkpoint
from ._exceptions import NoCheckpointError
from ._runtime import _whole, ctx

__all__ = ["LEDGER", "FolderSaver", "checked_checkpoint", "checkpoint_in_force"]

#: The ledger's name in the folder an integration writes into.
LEDGER = ".checkpointio-written.json"


#: The last part of a task attempt's checkpoint URI (``attempt-<n>``, as the task runtime names them).
_ATTEMPT = re.compile(r"attempt-\d+")


def run_of(uri: str) -> str:
    """The run a checkpoint URI belongs to: a task attempt's run folder or prefix (``s3://b/runs/7``
    for ``s3://b/runs/7/attempt-1``), which every attempt of the run shares; any other URI is a
    run of its own (``s3://b/exp1`` and ``s3://b/exp2`` are two runs)."""
    base = uri.rstrip("/")
    parent, _, name = base.rpartition("/")
    return parent if _ATTEMPT.fullmatch(name) else base


def read_ledger(folder: Path) -> dict[str, str]:
    """The ledger of ``folder``: each name an integration wrote there, with its run. Empty when
    there is none, or the file of that name is not one (then nothing in the folder is ours).

    Raises:
        OSError: The ledger could not be read (callers name the checkpoint with ``placing``).
    """
    try:
        with open(folder / LEDGER, "rb") as source:
            doc = json.loads(source.read(4 * 1024 * 1024))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except ValueError:
        return {}
    written = doc.get("written") if isinstance(doc, dict) else None
    if not isinstance(written, dict):
        return {}
    # Only plain names of entries in the folder itself: the ledger comes back with the folder from
    # the store, and a name such as "../x" must never lead retention outside it.
    return {
        name: run for name, run in written.items() if isinstance(name, str) and isinstance(run, str) and _plain(name)
    }


def _plain(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def write_ledger(folder: Path, written: dict[str, str]) -> None:
    """Replace ``folder``'s ledger with ``written`` (by rename: a crash leaves the old one or the new).

    Raises:
        OSError: It could not be written.
    """
    temporary = folder / f"{LEDGER}.{secrets.token_hex(8)}"
    try:
        with open(temporary, "x", encoding="utf-8") as target:
            json.dump({"written": dict(sorted(written.items()))}, target, indent=1)
        os.replace(temporary, folder / LEDGER)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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

    def _runs(self) -> set[str]:
        """The runs whose entries are this saver's: its checkpoint's and its sources'."""
        checkpoint = self.checkpoint
        return {run_of(uri) for uri in (checkpoint.dest, *checkpoint.sources)}

    def _owned(self, folder: Path) -> set[str]:
        """The names in ``folder``'s ledger that this run wrote (or a restore of its brought back).

        Raises:
            OSError: The ledger could not be read.
        """
        runs = self._runs()
        return {name for name, run in read_ledger(folder).items() if run in runs}

    def _note(self, folder: Path, add: str | None = None, drop: set[str] | frozenset[str] = frozenset()) -> None:
        """Record in ``folder``'s ledger that this run wrote ``add`` and no longer has ``drop``;
        entries of names no longer there go too, other runs' entries stay.

        Raises:
            OSError: The ledger could not be read or written.
        """
        written = {name: run for name, run in read_ledger(folder).items() if name not in drop}
        written = {name: run for name, run in written.items() if os.path.lexists(folder / name)}
        if add is not None:  # noted before it is written too: a kill while it is written leaves it ours
            written[add] = run_of(self.checkpoint.dest)
        write_ledger(folder, written)

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
