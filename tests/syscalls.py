"""This process's write system calls, counted by the kernel (Linux's ``/proc/self/io``): what
checks that file data is written in pieces, including calls made below Python."""

from __future__ import annotations

from pathlib import Path

__all__ = ["COUNTED", "writes_so_far"]

_IO = Path("/proc/self/io")
#: Whether this system counts them.
COUNTED = _IO.exists()


def writes_so_far() -> tuple[int, int]:
    """The write system calls this process made (all threads) and the bytes they wrote."""
    fields = dict(line.split(": ") for line in _IO.read_text().splitlines())
    return int(fields["syscw"]), int(fields["wchar"])
