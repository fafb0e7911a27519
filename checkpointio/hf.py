"""Hugging Face ``transformers`` integration: a ``TrainerCallback`` that stores the Trainer's checkpoints.

Needs the ``hf`` extra (``pip install 'checkpointio[hf]'``: ``transformers`` and ``accelerate``).
``import checkpointio`` alone never imports transformers.

With several processes (``torchrun``, ``accelerate launch``: DDP, FSDP, several nodes) every rank
takes part: each stores the files it wrote (its own RNG state, its shards), and the checkpoint is
committed once all are stored (through :mod:`checkpointio.dcp`); a resume restores every file on
every node.

The one-liner in a task::

    @env.task(retries=3)
    def train() -> None:
        saver = CheckpointioTrainerCallback()              # ctx().checkpoint, at every save, in the background
        trainer = Trainer(model, args, train_dataset=data, callbacks=[saver])
        trainer.train(resume_from_checkpoint=saver.resume_from_checkpoint)  # None at first
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _placement
from ._checkpoint import Checkpoint
from ._exceptions import CheckpointError, DestinationError
from ._group import fail_together as _together
from ._placement import placing
from ._training import FolderSaver
from ._writes import write_all

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("checkpointio.hf needs transformers: pip install 'checkpointio[hf]'") from error

__all__ = ["CheckpointioTrainerCallback", "checkpoint_folders"]

logger = logging.getLogger(__name__)

#: The name of the folders the Trainer writes: ``checkpoint-<global step>``.
_FOLDER = re.compile(re.escape(PREFIX_CHECKPOINT_DIR) + r"-(\d+)")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The Trainer's ``checkpoint-<step>`` folders directly in ``output_dir``, oldest step first.

    Ordered by the step number in the name (``checkpoint-10`` after ``checkpoint-9``), not by name
    or modification time: a restore may give every folder the same time. An ``output_dir`` that does
    not exist has none.

    Raises:
        AccessDeniedError: ``output_dir`` (or a folder on its path) may not be listed or searched.
        CheckpointError: Another error listing it (a file where a folder must be: ``DestinationError``).
    """
    base = Path(output_dir)
    try:
        return _folders(base)
    except FileNotFoundError as error:
        if error.filename is not None and Path(error.filename) != base:
            raise _unlistable(base, error) from error
        return []  # removed while listed: it has none now
    except OSError as error:
        raise _unlistable(base, error) from error


def _folders(base: Path) -> list[Path]:
    """:func:`checkpoint_folders`, raising the ``OSError`` met (the callback's callers name the
    checkpoint their work is for with :func:`placing`)."""
    mode = _placement.existing_mode(base)
    if mode is None or not stat.S_ISDIR(mode):
        return []
    found: list[tuple[int, str, Path]] = []
    for child in base.iterdir():
        match = _FOLDER.fullmatch(child.name)
        if match is not None and not child.is_symlink() and _is_folder(child):
            found.append((int(match[1]), child.name, child))
    return [path for _, _, path in sorted(found)]


def _is_folder(path: Path) -> bool:
    mode = _placement.existing_mode(path)
    return mode is not None and stat.S_ISDIR(mode)


def _unlistable(base: Path, error: OSError) -> CheckpointError:
    """The error :func:`checkpoint_folders` raises for ``error``, met listing ``base``: its folders
    are unknown, and "none" would make a resume start over and retention keep the wrong ones."""
    where = f" ({error.filename})" if error.filename is not None and Path(error.filename) != base else ""
    message = f"{base}: could not list its checkpoint folders: {error.strerror or error}{where}"
    return _placement.placement_error(error, message, str(base))


def _place(restored: Path | None, output_dir: Path, owned: set[str], uri: str) -> None:
    """Make the ``checkpoint-<step>`` folders of ``output_dir`` exactly those restored (none at first).

    ``checkpoint-<step>`` folders there that the restore does not have are this run's when
    ``owned`` (its ledger names them: an earlier attempt wrote them without storing them, perhaps
    half-written) and removed, with a warning, so that resuming does not pick them and retention,
    which goes by step, does not keep them over this run's. Any other such folder (another run's,
    the Trainer's without this callback, one made by hand) is refused before anything is changed:
    resuming and retention would mix it with this run's. Restored entries then replace
    same-named ones, all or none (a failure leaves ``output_dir`` as it was, never an entry removed
    and not replaced), also from a workspace on another filesystem. The workspace ends up empty.

    Raises:
        DestinationError: ``output_dir`` holds ``checkpoint-<step>`` folders this run did not write.
    """
    if restored is not None and output_dir.exists() and restored.resolve() == output_dir.resolve():
        return
    children = sorted(restored.iterdir()) if restored is not None else []
    names = {child.name for child in children}
    stale = [folder for folder in _folders(output_dir) if folder.name not in names]
    foreign = [folder.name for folder in stale if folder.name not in owned]
    if foreign:
        raise DestinationError(
            f"{output_dir} holds checkpoint folders this run did not write: {', '.join(foreign)}; nothing was "
            "changed: resuming would pick them and retention would mix them with this run's. Move them "
            "out of output_dir (or remove them), or give the Trainer another output_dir",
            uri=uri,
        )
    if restored is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        _placement.move_all([(child, output_dir / child.name) for child in children])
    for folder in stale:
        logger.warning("removing %s: this run wrote it and did not store it", folder)
        _placement.remove(folder)


def _group_size() -> int:
    """The size of this process's ``torch.distributed`` group; 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class _LocalFile:
    """A file of ``output_dir`` in a distributed checkpoint: read when the save writes it, or where
    a load writes it."""

    path: Path


def _files_planners(targets: dict[str, Path] | None = None) -> tuple[Any, Any]:
    """DCP planners that save each :class:`_LocalFile` as its bytes, and load each name's bytes
    into the file ``targets`` names (DCP's load planner does not keep non-tensor values).

    Every rank offers the files it sees; DCP keeps one copy of each name (on a shared file system
    every rank sees the same files: each is stored once; on node-local ones, each node's own).
    """
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    class SaveFiles(DefaultSavePlanner):
        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def transform_object(self, write_item: Any, object: Any) -> Any:
            if isinstance(object, _LocalFile):
                return io.BytesIO(object.path.read_bytes())
            return super().transform_object(write_item, object)

    class LoadFiles(DefaultLoadPlanner):
        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            target = (targets or {})[read_item.dest_index.fqn]
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            try:
                write_all(fd, value.getbuffer())
            finally:
                os.close(fd)

    return SaveFiles(), LoadFiles()


def _shared_with_rank_zero(folder: Path, uri: str) -> bool:
    """Whether this rank sees the same ``folder`` as rank 0 (one shared file system) rather than a
    node-local one of the same name: rank 0 leaves a marker there that the others look for.
    Called by every rank.

    Raises:
        CheckpointError: The folder or the marker could not be made (``uri``: the checkpoint's).
    """
    import torch.distributed as dist

    def make() -> None:
        with placing("create the output folder", folder, uri):
            folder.mkdir(parents=True, exist_ok=True)

    def leave_marker() -> None:
        if dist.get_rank() == 0:
            with placing("write a marker file in", folder, uri):
                marker.touch()

    def remove_marker() -> None:
        if dist.get_rank() == 0:
            with placing("remove the marker file in", folder, uri):
                marker.unlink(missing_ok=True)  # also after a failed touch

    def look() -> bool:
        with placing("look for the marker file in", folder, uri):
            return marker.exists()

    _together(make, uri)
    name = [f".checkpointio-{secrets.token_hex(8)}" if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(name, src=0)
    marker = folder / name[0]
    try:
        _together(leave_marker, uri)  # also a barrier: the marker is there before any rank looks
        return _together(look, uri)  # also a barrier: every rank looked before rank 0 removes it
    finally:  # on every rank alike: each step above raised on all or on none
        _together(remove_marker, uri)


class CheckpointioTrainerCallback(FolderSaver, TrainerCallback):
    """Store every checkpoint the ``transformers`` Trainer saves; resume from it on retry.

    Each time the Trainer has written ``output_dir/checkpoint-<step>/`` (per ``save_strategy`` /
    ``save_steps``, and at the end of training), the callback applies its retention and saves the
    whole ``output_dir`` folder to the checkpoint, in the background by default: the folder is
    snapshotted (hard links) at the call, so training goes on and may write or delete files at once;
    the next save waits for the previous upload. ``on_train_end`` waits for the last one.

    On a retry, :attr:`resume_from_checkpoint` restores the previous attempt's folder into the
    Trainer's ``output_dir`` and names its newest ``checkpoint-<step>`` folder, for
    ``trainer.train(resume_from_checkpoint=callback.resume_from_checkpoint)``. The callback learns
    ``output_dir`` from the Trainer it is given to (``Trainer(..., callbacks=[callback])``), so read
    the property after building the Trainer.

    Retention and the Trainer's own ``save_total_limit``: the Trainer deletes folders beyond
    ``save_total_limit`` (keeping the newest and the best) *before* this callback runs, without
    regard to the folder a run resumed from. Both apply; a folder remains only if both keep it. Leave
    ``save_total_limit`` unset and use ``keep_last`` to keep the resumed-from folder until a newer
    save is stored.

    With several processes (a ``torch.distributed`` group of more than one) every rank stores the
    files it sees in ``output_dir`` (its RNG state, its shards; on a shared file system each file
    is stored once) in one distributed checkpoint (:mod:`checkpointio.dcp`: one object per rank,
    committed by rank 0 once every rank's files are stored); saves are then synchronous. A resume
    restores every file on every node (once on a shared file system). Use it with the same kind of
    group it saved with: a group resumes from a distributed checkpoint, a single process from a
    folder. With one process, the main process alone saves. ``output_dir`` should belong to
    this run: everything in it is stored (model files a final ``trainer.save_model()`` wrote there,
    logs). The callback removes only the ``checkpoint-<step>`` folders this run wrote (named in the
    ledger ``.checkpointio-written.json`` in ``output_dir``, stored and restored with it), and
    :attr:`resume_from_checkpoint` refuses an ``output_dir`` holding others.

    Args:
        checkpoint: Where to save; ``ctx().checkpoint`` by default.
        keep_last: Keep the newest ``keep_last`` of this run's ``checkpoint-<step>`` folders, by
            step (``None``: all); other folders are never removed. The folder a run resumed from
            is kept until a newer save has been stored, and the Trainer's best checkpoint
            (``state.best_model_checkpoint``) is never removed.
        background: Upload in the background (the next save waits for the previous); ``False``
            stores the folder before ``on_save`` returns.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | None = None,
        *,
        keep_last: int | None = 2,
        background: bool = True,
    ) -> None:
        FolderSaver.__init__(self, checkpoint, keep_last, background)
        #: The Trainer's ``output_dir``, known once the Trainer was built with this callback.
        self.output_dir: Path | None = None

    @property
    def resume_from_checkpoint(self) -> str | None:
        """Restore the previous attempt's folder (once) and return its newest checkpoint, or ``None``.

        The restored tree is moved into the Trainer's ``output_dir``, so the run's old and new
        checkpoint folders live, and are stored, together; ``checkpoint-<step>`` folders already
        there that the restore does not have are removed, with a warning, when this run wrote them
        (an earlier attempt's, not stored); any other such folder is refused, nothing changed.
        Returns the path of the restored ``checkpoint-<step>`` folder with the highest step, or
        ``None`` on a first attempt.

        Raises:
            RuntimeError: No Trainer was built with this callback yet (``output_dir`` is unknown).
            ValueError: The checkpoint holds bytes or a single file, not a Trainer's folder.
            DestinationError: ``output_dir`` holds ``checkpoint-<step>`` folders the restore does
                not have and this run did not write (another run's, the Trainer's without this
                callback, yours): move them away or use another ``output_dir``.
        """
        if not self._restored:
            if self.output_dir is None:
                raise RuntimeError(
                    "output_dir is unknown: build the Trainer with callbacks=[this callback] before reading "
                    "resume_from_checkpoint"
                )
            if _group_size() > 1:
                self._restore_distributed(self.output_dir)
                self._restored = True
                return str(self.resumed_from) if self.resumed_from is not None else None
            uri = self.checkpoint.dest
            restored = self.checkpoint.load_sync()
            if restored is not None and not restored.is_dir():
                raise ValueError(f"the checkpoint restored as the file {restored}, not as a Trainer output folder")
            with placing("put the restored checkpoint folders in place in", self.output_dir, uri, kept=restored):
                restored_names = {child.name for child in restored.iterdir()} if restored is not None else set()
                _place(restored, self.output_dir, self._owned(self.output_dir), uri)
            if restored is not None:
                with placing("list the checkpoint folders in", self.output_dir, uri):
                    folders = [folder for folder in _folders(self.output_dir) if folder.name in restored_names]
                self.resumed_from = folders[-1] if folders else None
                if self.resumed_from is None:
                    logger.warning("the restored folder has no checkpoint-<step> folder; starting over")
            self._restored = True
        return str(self.resumed_from) if self.resumed_from is not None else None

    def _restore_distributed(self, output_dir: Path) -> None:
        """Every rank: restore the distributed checkpoint's files into ``output_dir`` (on rank 0
        and on each rank whose ``output_dir`` is not rank 0's), as :func:`_place` does."""
        import torch.distributed as dist

        from . import dcp

        uri = self.checkpoint.dest
        shared = _shared_with_rank_zero(output_dir, uri)  # a collective: every rank asks
        places = dist.get_rank() == 0 or not shared
        reader = dcp.StorageReader(self.checkpoint)
        found = dcp._agree_on_manifest(reader)
        staging: Path | None = None

        # Each step that may fail on one rank alone is followed by a collective that makes it
        # fail on all (_together): a rank left in the next collective would wait until its timeout.
        def prepare() -> dict[str, Path]:
            nonlocal staging
            with placing("create a folder to restore into beside", output_dir, uri):
                staging = Path(tempfile.mkdtemp(prefix=".checkpointio-restore-", dir=output_dir.parent))
            if found and places:
                return {name: staging / name for name in reader.read_metadata().state_dict_metadata}
            return {}

        def place() -> None:
            if places:
                with placing("put the restored checkpoint folders in place in", output_dir, uri):
                    _place(staging if found else None, output_dir, self._owned(output_dir), uri)

        def clean() -> None:
            if staging is not None:
                with placing("remove the folder restored into", staging, uri):
                    _placement.remove(staging)

        try:
            targets = _together(prepare, uri)
            if found:  # a collective: every rank loads, those that do not place load nothing
                dcp._load_with(dict.fromkeys(targets, b""), reader, _files_planners(targets)[1])
                dcp._log_loaded(reader)
            _together(place, uri)
        except BaseException:
            # raised on every rank alike (by _together or by torch's own collectives)
            with contextlib.suppress(CheckpointError):
                clean()
            raise
        _together(clean, uri)  # also a barrier: rank 0's output_dir is in place before any rank looks
        with placing("list the checkpoint folders in", output_dir, uri):
            folders = _folders(output_dir)
        self.resumed_from = folders[-1] if found and folders else None

    def _store_distributed(self, output_dir: Path, state: TrainerState) -> None:
        """Every rank: store the files of ``output_dir`` in one distributed checkpoint."""
        import torch.distributed as dist

        from . import dcp

        dist.barrier()  # every rank has written its files of this save
        uri = self.checkpoint.dest
        shared = _shared_with_rank_zero(output_dir, uri)  # a collective: every rank asks

        def retain() -> None:
            if state.is_world_process_zero or not shared:
                self._note_save(output_dir, state)
                self._retain(output_dir, state)

        def listing() -> dict[str, _LocalFile]:
            with placing("list the files to store in", output_dir, uri):
                return {
                    path.relative_to(output_dir).as_posix(): _LocalFile(path)
                    for path in sorted(output_dir.rglob("*"))
                    if path.is_file() and not path.is_symlink()
                }

        # as in _restore_distributed: a step failing on one rank fails on all, none left waiting
        _together(retain, uri)  # also a barrier: retention is done before any rank lists the files
        files = _together(listing, uri)
        self.last = dcp.save(files, self.checkpoint, planner=_files_planners()[0])
        self._stored_newer = True

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.output_dir is not None:
            self.output_dir = Path(args.output_dir)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.output_dir is not None and _group_size() > 1:
            self._store_distributed(Path(args.output_dir), state)
            return
        if not state.is_world_process_zero or args.output_dir is None:
            return
        output_dir = Path(args.output_dir)
        self._note_save(output_dir, state)
        self._retain(output_dir, state)
        self._store(output_dir)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._note_coming_save(args, state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._note_coming_save(args, state, control)

    def _note_coming_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Before the Trainer writes ``checkpoint-<step>``, name it in the ledger: a kill while it is
        written leaves a folder the retry knows to be this run's (and removes). Every rank does, as
        every rank writes its files there (on node-local output folders, each its own ledger)."""
        if control.should_save and args.output_dir is not None:
            output_dir = Path(args.output_dir)
            # every rank decides alike to save: with several, one failing fails all (none waits)
            _together(lambda: self._note_save(output_dir, state), self.checkpoint.dest)

    def _note_save(self, output_dir: Path, state: TrainerState) -> None:
        """Name ``checkpoint-<global step>`` in the ledger as this run's, unless someone else's
        folder of that name is there (it stays theirs: retention leaves it)."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        with placing("write the ledger of the folders written in", output_dir, self.checkpoint.dest):
            output_dir.mkdir(parents=True, exist_ok=True)  # the Trainer's first save makes it too
            if not (output_dir / name).exists() or name in self._owned(output_dir):
                self._note(output_dir, add=name)

    def _retain(self, output_dir: Path, state: TrainerState) -> None:
        if self.keep_last is None:
            return
        protected = self._resumed_is_protected()
        best = state.best_model_checkpoint
        keep = {output_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"}  # the one just written
        if best is not None:
            keep.add(Path(best))
        if protected and self.resumed_from is not None:
            keep.add(self.resumed_from)
        kept = {path.resolve() for path in keep}
        uri = self.checkpoint.dest
        with placing("list the checkpoint folders in", output_dir, uri):
            owned = self._owned(output_dir)
            folders = [folder for folder in _folders(output_dir) if folder.name in owned]
        removed: set[str] = set()
        for old in folders[: -self.keep_last]:
            if old.resolve() not in kept:
                with placing("remove the old checkpoint folder", old, uri):
                    _placement.remove(old)
                removed.add(old.name)
        if removed:
            with placing("write the ledger of the folders written in", output_dir, uri):
                self._note(output_dir, drop=removed)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.wait()
