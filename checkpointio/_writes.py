"""Writing file data in pieces the page cache fills fast: at most :data:`PIECE` bytes a system call.

Every write of file data (restored files, staging files, the local store's objects) goes
through here; snapshot copies use these pieces with ``shutil.copyfileobj``. The size of one
buffered write decides the size of the page-cache folios Linux allocates for it (ext4 and xfs
take large folios since 6.x). On virtual machines that
hand free memory back to their host (virtio-balloon free page reporting), large folios often come
from memory the host has to back again, and filling them costs 10-30x more: on this project's
benchmark VM (Firecracker, Linux 6.18, ext4), 256 MiB written in 1 MiB calls took 0.9-2.8 s in
such phases, in 2 MiB calls 0.7-2.7 s, and in calls of 512 KiB or less 0.06-0.19 s, every time
(``benchmarks/README.md``, "Write sizes and the page cache"). At 256 KiB a call, the calls
themselves cost about 1 ms per 256 MiB, wherever it runs.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

__all__ = ["PIECE", "write_all", "write_views"]

#: Most bytes one system call writes (half the largest size measured fast, see the module's docstring).
PIECE = 256 * 1024

#: Most buffers one ``writev`` takes here (the system's limit, IOV_MAX, is 1024 on Linux).
_VECTOR = 512


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
    """Write all of ``data`` to ``fd``: at ``offset`` (``pwrite``), or at its position."""
    view = memoryview(data).cast("B")
    while view:
        piece = view[:PIECE]
        count = os.write(fd, piece) if offset is None else os.pwrite(fd, piece, offset)
        if offset is not None:
            offset += count
        view = view[count:]


def write_views(fd: int, views: Sequence[memoryview], offset: int | None = None) -> None:
    """Write ``views`` one after the other to ``fd`` (at ``offset``, or at its position), several
    in one ``writev``/``pwritev`` call where the system has it, at most :data:`PIECE` bytes a call."""
    if len(views) == 1 or not hasattr(os, "writev" if offset is None else "pwritev"):
        for view in views:
            write_all(fd, view, offset)
            if offset is not None:
                offset += view.nbytes
        return
    pending = deque(view.cast("B") if view.format != "B" or view.ndim != 1 else view for view in views)
    while pending:
        piece: list[memoryview] = []
        size = 0
        for view in pending:
            take = view[: PIECE - size]
            piece.append(take)
            size += len(take)
            if size == PIECE or len(piece) == _VECTOR:
                break
        count = os.writev(fd, piece) if offset is None else os.pwritev(fd, piece, offset)
        if offset is not None:
            offset += count
        while pending and count >= len(pending[0]):
            count -= len(pending[0])
            pending.popleft()
        if count:
            pending[0] = pending[0][count:]
