"""SIGTERM handled as Ctrl-C: the signal that ``timeout``, ``kill``, systemd, Docker, Kubernetes
and Slurm send to stop a process.

Python's default for SIGTERM ends the process at once: no ``finally`` runs, so an S3 multipart
upload in flight stays incomplete (billed until ``checkpointio gc`` or a lifecycle rule removes
it; the checkpoint at the key is unaffected). Ctrl-C instead raises ``KeyboardInterrupt`` (or,
under ``asyncio.run``, cancels the main task), which checkpointio turns into an aborted upload and
a removed staging folder. :func:`interrupt_on_sigterm` makes SIGTERM take that same path.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

__all__ = ["Termination", "interrupt_on_sigterm"]


@dataclass
class Termination:
    """Whether SIGTERM arrived inside :func:`interrupt_on_sigterm` (the ``KeyboardInterrupt``
    then came from it, not from Ctrl-C: exit with 143, as a shell reports a SIGTERM death)."""

    received: bool = False


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[Termination]:
    """Within the block, SIGTERM does what Ctrl-C does: ``KeyboardInterrupt`` in sync code (a
    ``save_sync`` in progress is cancelled and its upload aborted before it propagates), the main
    task cancelled under ``asyncio.run`` / ``anyio.run`` (which then raise ``KeyboardInterrupt``).

    It calls whatever handles SIGINT at that moment, so both cases, and a program's own SIGINT
    handler, behave alike. A second SIGTERM, like a second Ctrl-C, interrupts the cleanup. Outside
    the main thread (where Python cannot install signal handlers) it does nothing. The previous
    SIGTERM handler is put back on exit::

        with checkpointio.interrupt_on_sigterm() as term:
            try:
                train()                      # saves with save_sync(), or asyncio.run(main())
            except KeyboardInterrupt:
                sys.exit(143 if term.received else 130)
    """
    state = Termination()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        state.received = True
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored or left to the system: still stop as Ctrl-C would
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
