"""PyTorch Lightning integration: a ``CheckpointIO`` plugin and an end-of-epoch callback.

Needs the ``lightning`` extra (``pip install 'checkpointio[lightning]'``). Works with the
``lightning`` package (``lightning.pytorch``) and, when that is not installed, ``pytorch_lightning``
2.x; use the classes with the Trainer of the same package. ``import checkpointio`` alone never
imports Lightning.

The one-liner in a task::

    @env.task(retries=3)
    def train() -> None:
        saver = CheckpointioCallback()                    # saves ctx().checkpoint every epoch
        trainer = L.Trainer(max_epochs=10, callbacks=[saver])
        trainer.fit(model, ckpt_path=saver.ckpt_path)     # None at first; the restored file on retry
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from . import _placement
from ._background import SaveHandle
from ._checkpoint import Checkpoint, latest_checkpoint
from ._training import FolderSaver, checkpoint_in_force, placing

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.io import TorchCheckpointIO
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.plugins.io import TorchCheckpointIO  # type: ignore[assignment]
    except ImportError as error:
        raise ImportError(
            "checkpointio.lightning needs lightning or pytorch-lightning 2.x: pip install 'checkpointio[lightning]'"
        ) from error

__all__ = ["CheckpointioCallback", "CheckpointioIO"]

logger = logging.getLogger(__name__)

#: The file pattern of the checkpoints the callback writes and looks for.
PATTERN = "**/*.ckpt"


class CheckpointioIO(TorchCheckpointIO):
    """Lightning's checkpoint files, stored through a :class:`~checkpointio.Checkpoint`.

    Each checkpoint Lightning saves is written locally as usual (``torch.save``, atomically), then
    the folder holding it is saved to ``checkpoint`` (``ctx().checkpoint`` by default): in the
    background with ``background=True`` (training goes on; the next save waits for the previous),
    else before ``save_checkpoint`` returns. A file Lightning removes (``ModelCheckpoint``'s
    ``save_top_k``) is gone from the next save. ``teardown`` waits for the last upload.

    Use: ``Trainer(plugins=[CheckpointioIO()])``.
    """

    def __init__(self, checkpoint: Checkpoint | None = None, *, background: bool = True) -> None:
        super().__init__()
        self._checkpoint = checkpoint
        self.background = background
        self.last: SaveHandle | None = None

    @property
    def checkpoint(self) -> Checkpoint:
        """The checkpoint the files go to."""
        return checkpoint_in_force(self._checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.last = self.checkpoint.save_sync(Path(path).parent, wait=not self.background)

    def teardown(self) -> None:
        """Wait for the last background upload (raising its error)."""
        if self.last is not None:
            self.last.result()
        super().teardown()


class CheckpointioCallback(FolderSaver, pl.Callback):
    """Save a Lightning checkpoint to ``ctx().checkpoint`` at the end of every epoch; resume on retry.

    At the end of each training epoch the trainer's full state is written to
    ``dirpath/epoch=<e>-step=<s>.ckpt`` and the folder is saved to the checkpoint, in the
    background by default. On a retry, :attr:`ckpt_path` restores the previous attempt's folder into
    ``dirpath`` and names its newest ``.ckpt`` (``latest_checkpoint``), for
    ``trainer.fit(model, ckpt_path=callback.ckpt_path)``.

    Args:
        checkpoint: Where to save; ``ctx().checkpoint`` by default.
        dirpath: Local folder of the ``.ckpt`` files; by default the checkpoint's workspace
            (``cp.path``), where a restore lands, so restored and new files live together.
        keep_last: Keep the newest ``keep_last`` files (``None``: all). The file a run resumed
            from is kept until a newer one has been stored.
        background: Upload in the background (the next epoch's save waits for the previous).
    """

    def __init__(
        self,
        checkpoint: Checkpoint | None = None,
        *,
        dirpath: str | os.PathLike[str] | None = None,
        keep_last: int | None = 2,
        background: bool = True,
    ) -> None:
        FolderSaver.__init__(self, checkpoint, keep_last, background)
        self._dirpath = Path(dirpath) if dirpath is not None else None

    @property
    def dirpath(self) -> Path:
        """The local folder of the ``.ckpt`` files."""
        return self._dirpath if self._dirpath is not None else self.checkpoint.path

    @property
    def ckpt_path(self) -> str | None:
        """Restore the previous attempt's files (once) and return the newest ``.ckpt``, or ``None``."""
        if not self._restored:
            restored = self.checkpoint.load_sync()
            if restored is not None and restored.is_dir() and restored.resolve() != self.dirpath.resolve():
                doing = "put the restored files in place in"
                with placing(doing, self.dirpath, self.checkpoint.dest, kept=restored):
                    self.dirpath.mkdir(parents=True, exist_ok=True)
                    moves = [(child, self.dirpath / child.name) for child in sorted(restored.iterdir())]
                    _placement.move_all(moves)  # all or none, over folders that are not empty, across filesystems
                restored = self.dirpath
            self.resumed_from = latest_checkpoint(restored, PATTERN)
            self._restored = True
        return str(self.resumed_from) if self.resumed_from is not None else None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        with placing("create the checkpoint folder", self.dirpath, self.checkpoint.dest):
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.dirpath / f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt")
        if trainer.is_global_zero:
            self._retain()
            self._store(self.dirpath)

    def _retain(self) -> None:
        if self.keep_last is None:
            return
        protected = self._resumed_is_protected()
        with placing("list the checkpoint files in", self.dirpath, self.checkpoint.dest):
            files = sorted(self.dirpath.glob(PATTERN), key=lambda path: (path.stat().st_mtime_ns, path.name))
        for old in files[: -self.keep_last]:
            if protected and old == self.resumed_from:
                continue
            with placing("remove the old checkpoint file", old, self.checkpoint.dest):
                old.unlink()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.wait()
