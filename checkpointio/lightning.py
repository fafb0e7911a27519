"""PyTorch Lightning integration: a ``CheckpointIO`` plugin and an end-of-epoch callback.

Needs the ``lightning`` extra (``pip install 'checkpointio[lightning]'``). Works with the
``lightning`` package (``lightning.pytorch``) and, when that is not installed, ``pytorch_lightning``
2.x; use the classes with the Trainer of the same package. ``import checkpointio`` alone never
imports Lightning.

Sharded checkpoints (``ModelParallelStrategy``: FSDP2 and tensor parallel), every rank's shards
stored through :mod:`checkpointio.dcp`::

    strategy = CheckpointioModelParallelStrategy("s3://bucket/run/checkpoints")
    trainer = L.Trainer(strategy=strategy, callbacks=[ModelCheckpoint(dirpath="checkpoints")])
    trainer.fit(model, ckpt_path=strategy.ckpt_path)      # None at first; the newest one after a restart

The one-liner in a task::

    @env.task(retries=3)
    def train() -> None:
        saver = CheckpointioCallback()                    # saves ctx().checkpoint every epoch
        trainer = L.Trainer(max_epochs=10, callbacks=[saver])
        trainer.fit(model, ckpt_path=saver.ckpt_path)     # None at first; the restored file on retry
"""

from __future__ import annotations

import io
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from typing_extensions import Unpack

from . import _placement
from ._background import SaveHandle
from ._checkpoint import Checkpoint, latest_checkpoint
from ._config import TransferOptions
from ._group import fail_together
from ._location import split_scheme
from ._placement import placing
from ._training import FolderSaver, checked_checkpoint, checkpoint_in_force

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import ModelParallelStrategy
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.plugins.io import TorchCheckpointIO  # type: ignore[assignment]
        from pytorch_lightning.strategies import ModelParallelStrategy  # type: ignore[assignment]
    except ImportError as error:
        raise ImportError(
            "checkpointio.lightning needs lightning or pytorch-lightning 2.x: pip install 'checkpointio[lightning]'"
        ) from error

__all__ = ["CheckpointioCallback", "CheckpointioIO", "CheckpointioModelParallelStrategy"]

logger = logging.getLogger(__name__)

#: The file pattern of the checkpoints the callback looks for (to resume from).
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
        self._checkpoint = checked_checkpoint(checkpoint)
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
    background by default. A file of that name that the callback did not write (a
    ``ModelCheckpoint``'s in the same folder) is left as it is: the callback's file is then
    ``epoch=<e>-step=<s>-v1.ckpt`` (``-v2``...). On a retry, :attr:`ckpt_path` restores the
    previous attempt's folder into ``dirpath`` and names the restore's newest ``.ckpt``
    (``latest_checkpoint``), for ``trainer.fit(model, ckpt_path=callback.ckpt_path)``.

    Args:
        checkpoint: Where to save; ``ctx().checkpoint`` by default.
        dirpath: Local folder of the ``.ckpt`` files; by default the checkpoint's workspace
            (``cp.path``), where a restore lands, so restored and new files live together.
        keep_last: Keep the newest ``keep_last`` of the files this run's callbacks wrote (``None``:
            all), as the ledger in ``dirpath`` names them; other files in ``dirpath`` (a
            ``ModelCheckpoint``'s, another run's, yours) are never removed. The file a run
            resumed from is kept until a newer one has been stored.
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
            # The restore's newest file: not one that was in dirpath before (someone else's).
            newest = latest_checkpoint(restored, PATTERN)
            if restored is not None and restored.is_dir() and restored.resolve() != self.dirpath.resolve():
                doing = "put the restored files in place in"
                with placing(doing, self.dirpath, self.checkpoint.dest, kept=restored):
                    self.dirpath.mkdir(parents=True, exist_ok=True)
                    moves = [(child, self.dirpath / child.name) for child in sorted(restored.iterdir())]
                    _placement.move_all(moves)  # all or none, over folders that are not empty, across filesystems
                if newest is not None:
                    newest = self.dirpath / newest.relative_to(restored)
            self.resumed_from = newest
            self._restored = True
        return str(self.resumed_from) if self.resumed_from is not None else None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        uri = self.checkpoint.dest

        def prepare() -> str:
            with placing("create the checkpoint folder", self.dirpath, uri):
                self.dirpath.mkdir(parents=True, exist_ok=True)
            if not trainer.is_global_zero:
                return ""
            with placing("read the ledger of the files written in", self.dirpath, uri):
                return self._free_name(f"epoch={trainer.current_epoch}-step={trainer.global_step}")

        def store(name: str) -> None:
            if trainer.is_global_zero:
                with placing("write the ledger of the files written in", self.dirpath, uri):
                    self._note(self.dirpath, add=name)
                self._retain()
                self._store(self.dirpath)

        # With several ranks, what one rank does alone fails on all if it fails (fail_together):
        # the others would wait in the next collective (the broadcast, the next step's).
        name = fail_together(prepare, uri, ranks=trainer.world_size)
        name = trainer.strategy.broadcast(name)  # one name on every rank
        trainer.save_checkpoint(self.dirpath / name)  # sharded strategies write on each rank
        fail_together(lambda: store(name), uri, ranks=trainer.world_size)

    def _free_name(self, stem: str) -> str:
        """``<stem>.ckpt``, or ``<stem>-v<n>.ckpt`` with the lowest ``n`` whose file is absent or
        this run's (never a name someone else's file has: it would be replaced)."""
        owned = self._owned(self.dirpath)
        name, version = f"{stem}.ckpt", 0
        while os.path.lexists(self.dirpath / name) and name not in owned:
            version += 1
            name = f"{stem}-v{version}.ckpt"
        return name

    def _retain(self) -> None:
        if self.keep_last is None:
            return
        protected = self._resumed_is_protected()
        uri = self.checkpoint.dest
        with placing("list the checkpoint files in", self.dirpath, uri):
            written = [self.dirpath / name for name in self._owned(self.dirpath)]
            written = [path for path in written if path.is_file() and not path.is_symlink()]
            files = sorted(written, key=lambda path: (path.stat().st_mtime_ns, path.name))
        removed: set[str] = set()
        for old in files[: -self.keep_last]:
            if protected and old == self.resumed_from:
                continue
            with placing("remove the old checkpoint file", old, uri):
                old.unlink()
            removed.add(old.name)
        if removed:
            with placing("write the ledger of the files written in", self.dirpath, uri):
                self._note(self.dirpath, drop=removed)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # the last upload is rank 0's: its failure is every rank's, as in on_train_epoch_end
        fail_together(self.wait, self.checkpoint.dest, ranks=trainer.world_size)


#: The key of Lightning's own state (loops, callbacks, hyper-parameters...: what it keeps in
#: ``meta.pt`` of a sharded checkpoint folder) in the distributed checkpoint.
LIGHTNING_STATE = "lightning"


class CheckpointioModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel) whose sharded checkpoints
    every rank saves through :mod:`checkpointio.dcp`, to a folder or ``s3://`` prefix, and loads
    from there (resharded to the group's size).

    Each checkpoint Lightning saves (``trainer.save_checkpoint``, ``ModelCheckpoint``) is one
    distributed checkpoint: every rank streams its shards of the model and optimizers into its
    own object, and rank 0 commits the save with the manifest, which also holds Lightning's own
    state (loops, callbacks...). Nothing is written to the local path Lightning names; its file
    name is the checkpoint's name under ``target``. A checkpoint ``ModelCheckpoint`` removes
    (``save_top_k``) is removed with its data. A save that fails or is killed leaves the earlier
    checkpoints as they were.

    Args:
        target: Where the checkpoints go: a folder or ``s3://`` prefix (``epoch=1-step=12.ckpt``
            is saved at ``<target>/epoch=1-step=12.ckpt``); or a :class:`~checkpointio.Checkpoint`
            (``ctx().checkpoint`` by default), to which every save goes, replacing the one before.
        options: :class:`~checkpointio.TransferConfig` fields for the transfers.

    The other arguments are ``ModelParallelStrategy``'s. Resume with
    ``trainer.fit(model, ckpt_path=strategy.ckpt_path)``: the newest checkpoint committed under
    ``target`` (or the newest whole source of the ``Checkpoint``), ``None`` when there is none.
    A ``ckpt_path`` of your own is a URI, or a file name looked up under ``target``.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | Checkpoint | None = None,
        *,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        **options: Unpack[TransferOptions],
    ) -> None:
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self._target = target
        self._options = options

    def _checkpoint(self) -> Checkpoint | None:
        """The checkpoint every save goes to, when ``target`` is one (or none was given)."""
        if isinstance(self._target, Checkpoint):
            return self._target
        if self._target is None:
            return checkpoint_in_force(None)
        return None

    def uri_for(self, path: str | os.PathLike[str], *, loading: bool = False) -> str:
        """Where the checkpoint Lightning names ``path`` is saved (or, ``loading``, read): a URI
        as it is; else the file name under ``target``. With a ``Checkpoint``, saves go to its
        ``dest`` and a load reads ``path`` itself (the source :attr:`ckpt_path` named)."""
        text = os.fspath(path)
        if split_scheme(text) is not None:
            return text
        checkpoint = self._checkpoint()
        if checkpoint is not None:
            return text if loading else checkpoint.dest
        root = os.fspath(self._target)  # type: ignore[arg-type]  # a folder or prefix here
        name = Path(text).name
        return f"{root.rstrip('/')}/{name}" if split_scheme(root) is not None else os.path.join(root, name)

    @property
    def ckpt_path(self) -> str | None:
        """The checkpoint to resume from: the newest one committed under ``target`` (or the newest
        whole source of the ``Checkpoint``); ``None`` when there is none (a first run)."""
        from . import dcp

        checkpoint = self._checkpoint()
        if checkpoint is None:
            return dcp.latest(os.fspath(self._target), **self._options)  # type: ignore[arg-type]
        return dcp._newest_source(checkpoint, **self._options)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save the model's and optimizers' shards (every rank) and Lightning's state (rank 0)."""
        import torch

        from . import dcp

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported")
        uri = self.broadcast(self.uri_for(filepath))  # rank 0 names the checkpoint for every rank
        state: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
        for index, optimizer_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{index}"] = optimizer_state

        def lightning_state() -> None:
            if self.global_rank == 0:
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)  # what a module added may not pickle: rank 0's alone
                state[LIGHTNING_STATE] = buffer

        fail_together(lightning_state, uri, ranks=self.world_size)  # none left waiting in dcp.save
        dcp.save(state, uri, **self._options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the model's and optimizers' shards of the checkpoint (resharded to this group) and
        return Lightning's state.

        Raises:
            CheckpointNotFoundError: There is no distributed checkpoint at ``checkpoint_path``.
        """
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from . import dcp
        from ._exceptions import CheckpointNotFoundError

        uri = self.broadcast(self.uri_for(checkpoint_path, loading=True))
        reader = dcp.StorageReader(uri, **self._options)  # one manifest for the model, optimizers and state
        module = self.model
        assert module is not None and self.lightning_module is not None
        model_state = {"state_dict": get_model_state_dict(module)}
        if not dcp._load_with(model_state, reader):
            raise CheckpointNotFoundError(f"{uri}: no distributed checkpoint there to resume from", uri=uri)
        module.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp._load_with(optimizer_state, reader)
            set_optimizer_state_dict(
                module, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
            )
        lightning_state: dict[str, Any] = {LIGHTNING_STATE: io.BytesIO()}
        dcp._load_with(lightning_state, reader)
        dcp._log_loaded(reader)  # one line for the whole resume
        buffer = lightning_state[LIGHTNING_STATE]
        buffer.seek(0)
        loaded: dict[str, Any] = torch.load(buffer, weights_only=weights_only)
        return loaded

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove the checkpoint (rank 0), its data too; with a ``Checkpoint`` target nothing is
        removed: it holds only the newest save."""
        from . import dcp

        def remove() -> None:
            if self.is_global_zero and self._checkpoint() is None:
                dcp.remove(self.uri_for(filepath), **self._options)

        # Lightning calls it on every rank: rank 0's failure is every rank's (none left waiting)
        fail_together(remove, str(filepath), ranks=self.world_size)
