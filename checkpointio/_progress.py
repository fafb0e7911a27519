"""Progress of one transfer, reported to a user's callback as the bytes flow.

The engine calls the callback from its worker threads (the producer of a save, the consumer of a
load) as each chunk passes, and once more with ``finished=True`` when the transfer committed or
verified. It is never called on the event loop, so a slow callback (a progress bar redrawing)
delays only its own transfer's thread, and never blocks other tasks on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Progress", "ProgressCallback"]

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
    """

    operation: Operation
    uri: str
    done: int
    total: int | None
    finished: bool = False


#: What ``on_progress=`` takes: called with each :class:`Progress`, from a worker thread.
ProgressCallback = Callable[[Progress], None]


class Meter:
    """Counts one transfer's bytes and reports them to the callback (or to nobody)."""

    def __init__(self, callback: ProgressCallback | None, operation: Operation, uri: str, total: int | None) -> None:
        self._callback = callback
        self._operation: Operation = operation
        self._uri = uri
        self.total = total
        self.done = 0

    @property
    def reporting(self) -> bool:
        """Whether anybody listens (the end report then costs a hop to a worker thread)."""
        return self._callback is not None

    def advance(self, count: int) -> None:
        self.done += count
        if self._callback is not None:
            self._callback(Progress(self._operation, self._uri, self.done, self.total))

    def finish(self) -> None:
        if self._callback is not None:
            self._callback(Progress(self._operation, self._uri, self.done, self.done, finished=True))
