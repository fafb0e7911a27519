"""Progress of one transfer, reported to a user's callback as the bytes flow.

The engine calls the callback from its worker threads (the producer of a save, the consumer of a
load, or for a single file loaded from S3 by ranges the receiving thread that wrote them) as each
chunk passes, on a save once with ``committing=True`` when every byte was handed to
the store, and once more with ``finished=True`` when the transfer committed or verified. It is
never called on the caller's event loop, so a slow callback (a progress bar redrawing) delays
only the transfer's own threads (and ranges of other loads received on the same thread), and never
blocks other tasks on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Progress", "ProgressCallback", "human_size"]

Operation = Literal["save", "load", "verify"]


@dataclass(frozen=True)
class Progress:
    """One progress report of a save, load or verify.

    Attributes:
        operation: ``"save"``, ``"load"`` or ``"verify"``.
        uri: The checkpoint being written or read.
        done: Bytes of the stored object moved so far: handed to the store on a save (a
            directory counts its compressed archive), received from it on a load or verify.
        total: The object's size when known in advance (bytes, a file, any load); ``None`` for a
            directory being saved, whose compressed size is known only at the end.
        finished: ``True`` on the last report, sent once the save committed or the load verified.
        source_done: Bytes of the source read so far: for a directory being saved, the bytes of
            its files before compression; otherwise the same as ``done``. What a progress bar
            should show, against ``source_total``.
        source_total: The source's size when known: for a directory being saved, its regular
            files' sizes summed when the save starts (hard-linked files once); otherwise the same
            as ``total``. ``None`` for a stream of unknown length.
        committing: ``True`` once every byte was handed to the store and a save is completing
            (the last parts in flight and the upload's completion on S3, the flush and rename of a
            local file); the ``finished`` report follows when it is done.
    """

    operation: Operation
    uri: str
    done: int
    total: int | None
    finished: bool = False
    source_done: int | None = None
    source_total: int | None = None
    committing: bool = False


#: What ``on_progress=`` takes: called with each :class:`Progress`, from a worker thread.
ProgressCallback = Callable[[Progress], None]


class Meter:
    """Counts one transfer's bytes and reports them to the callback (or to nobody).

    ``packed``: the source is a directory packed into an archive, whose files' bytes are
    counted by :meth:`read` (the stored bytes by :meth:`advance`); otherwise the stored bytes are
    the source's own.
    """

    def __init__(
        self,
        callback: ProgressCallback | None,
        operation: Operation,
        uri: str,
        total: int | None,
        *,
        packed: bool = False,
    ) -> None:
        self._callback = callback
        self._operation: Operation = operation
        self._uri = uri
        self._packed = packed
        self.total = total
        self.done = 0
        self.source_total: int | None = None if packed else total
        self.source_done = 0
        self._committing = False

    @property
    def reporting(self) -> bool:
        """Whether anybody listens (the end report then costs a hop to a worker thread)."""
        return self._callback is not None

    def read(self, count: int) -> None:
        """Count ``count`` bytes of a packed source's files as read (reported with the next chunk)."""
        self.source_done += count

    def advance(self, count: int) -> None:
        self.done += count
        if not self._packed:
            self.source_done = self.done
        self._report()

    def commit(self) -> None:
        """Every byte was handed to the store, which is completing the save."""
        self._committing = True
        self._report()

    def finish(self) -> None:
        self.total = self.done
        if self._packed or self.source_total is None:
            self.source_total = self.source_done
        self._report(finished=True)

    def _report(self, *, finished: bool = False) -> None:
        if self._callback is not None:
            self._callback(
                Progress(
                    self._operation,
                    self._uri,
                    self.done,
                    self.total,
                    finished,
                    source_done=self.source_done,
                    source_total=self.source_total,
                    committing=self._committing,
                )
            )


def human_size(size: int) -> str:
    """``512 B``, ``1.5 KiB``, ``16.0 MiB``: binary units, as the bars, summaries and logs write sizes."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
