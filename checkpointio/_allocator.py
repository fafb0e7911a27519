"""Keep glibc from handing transfer buffers back to the kernel after every use.

A transfer allocates and frees blocks of about 1 MiB all the time (network reads, gzip members,
file data). glibc serves blocks of that size from its heap only once its *dynamic mmap threshold*
has risen above them, which glibc does by itself the first time the process frees a larger block
it had mapped (mallopt(3), ``M_MMAP_THRESHOLD``) — in an ML process, typically the first large
tensor freed. Until then, in a fresh process, every such block is mapped and unmapped (or the heap
trimmed above it), and each of its pages is faulted in and zeroed again on the next use. Measured
on the benchmark's machine: extracting 256 MiB of tensors from memory into tmpfs took 0.40-0.85 s
of CPU before and 0.13 s after; a whole local load 0.23 s before, 0.18 s after.

:func:`settle` makes that same adjustment happen once, by freeing a block of 30 MB that it
allocated without touching. It sets no tunable: glibc's own rule moves the threshold to 30 MB (and
the trim threshold to twice that, the most free memory a heap keeps at its top), exactly as after
any large free. Elsewhere (musl, macOS, Windows) it does nothing; ``CHECKPOINTIO_TUNE_MALLOC=0``
turns it off.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["settle"]

#: Below glibc's ceiling for the dynamic threshold (32 MiB on 64-bit), above any transfer buffer.
_BLOCK = 30_000_000

_lock = threading.Lock()
_settled = False


def _is_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # the name is unknown where the C library is not glibc
        return False


def settle() -> None:
    """Raise glibc's dynamic mmap threshold above transfer buffers, once per process (see above)."""
    global _settled
    if _settled:
        return
    with _lock:
        if _settled:
            return
        _settled = True
        if os.environ.get("CHECKPOINTIO_TUNE_MALLOC", "1") == "0" or not _is_glibc():
            return
        import ctypes  # here: most processes never need it

        try:
            libc = ctypes.CDLL(None)  # the C library this process already runs on
            malloc, free = libc.malloc, libc.free
            malloc.restype = ctypes.c_void_p
            malloc.argtypes = [ctypes.c_size_t]
            free.argtypes = [ctypes.c_void_p]
            free.restype = None
            block = malloc(_BLOCK)
            if block:
                free(block)
        except (OSError, AttributeError):  # pragma: no cover - no usable C library: merely slower
            pass
