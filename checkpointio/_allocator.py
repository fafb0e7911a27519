"""Memory tweaks below Python: the one place checkpointio reaches into the C library or CPython's C API.

Each tweak was measured (``benchmarks/run.py --tweaks``, figures in ``benchmarks/README.md``) and
each has a test in ``tests/test_allocator.py`` that fails, rather than letting the tweak silently
do nothing, when the internal it relies on stops behaving as described here.

* :func:`tune_malloc` changes the whole process, so it only happens when asked:
  ``CHECKPOINTIO_TUNE_MALLOC=1``, or the command line, which owns its process (``=0`` keeps the
  command line from doing it). A transfer allocates and frees blocks of about 1 MiB all the time
  (reads, gzip members, file data). glibc serves blocks of that size from its heap only once its
  *dynamic mmap threshold* has risen above them, which glibc does by itself the first time the
  process frees a larger block it had mapped (mallopt(3), ``M_MMAP_THRESHOLD``): in an ML process,
  typically the first large tensor freed. Until then, in a fresh process, every such block is
  mapped and unmapped (or the heap trimmed above it) and its pages faulted in and zeroed again on
  the next use. Freeing one untouched 30 MB block makes glibc's own rule move the threshold to
  30 MB (and the trim threshold to twice that: up to 60 MB free at a heap's top are kept), for the
  rest of the process. No tunable is set; elsewhere than glibc nothing happens.
* :func:`unfilled_bytearray` and :func:`prefault` touch only buffers every byte of which is
  written before anyone reads them. ``load_bytes()``'s result buffer takes both, which pay off
  only together: it is not zeroed up front, and a worker thread faults its pages in with
  ``madvise(MADV_POPULATE_WRITE)`` while the data arrives, instead of the copying threads
  faulting them in with the GIL held. The S3 reader's receive blocks (:mod:`._stores._s3._http`)
  take the first alone: a socket fills each, and only a full one is handed on.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import cast

from ._concurrency import ForkSafeLock

__all__ = ["TUNE_MALLOC", "prefault", "tune_malloc", "unfilled_bytearray"]

#: The environment variable that asks for :func:`tune_malloc`: ``1`` to opt in, ``0`` to opt out.
TUNE_MALLOC = "CHECKPOINTIO_TUNE_MALLOC"

#: Below glibc's ceiling for the dynamic threshold (32 MiB on 64-bit), above any transfer buffer.
_BLOCK = 30_000_000

_lock = ForkSafeLock()  # a forked child finds it released
_tuned = False


def _is_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # the name is unknown where the C library is not glibc
        return False


def tune_malloc(*, default: bool = False) -> bool:
    """Raise glibc's dynamic mmap threshold above transfer buffers, once per process, if asked.

    Asked means ``CHECKPOINTIO_TUNE_MALLOC=1``, or ``default`` (the command line's choice for its
    own process) with the variable unset. Returns whether the threshold was raised, by this call
    or an earlier one.
    """
    global _tuned
    if _tuned:
        return True
    wanted = os.environ.get(TUNE_MALLOC, "")
    if not (wanted == "1" or (default and wanted == "")) or not _is_glibc():
        return False
    with _lock:
        if not _tuned:
            _tuned = _free_a_large_block()
    return _tuned


def _free_a_large_block() -> bool:
    import ctypes  # here: most processes never need it

    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        malloc, free = libc.malloc, libc.free
    except (OSError, AttributeError):  # pragma: no cover - no usable C library: merely slower
        return False
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    free.argtypes = [ctypes.c_void_p]
    free.restype = None
    block = malloc(_BLOCK)
    if not block:  # pragma: no cover - out of memory: nothing to tune
        return False
    free(block)
    return True


def unfilled_bytearray(size: int) -> bytearray:
    """A ``bytearray`` of ``size`` bytes whose contents are not set: the caller writes every one.

    ``bytearray(size)`` zeroes its memory first, which faults in every page of a large buffer at
    once, before any byte arrives, and costs a pass over it. Made by CPython's
    ``PyByteArray_FromStringAndSize(NULL, size)`` instead, a large buffer is fresh mapped memory
    whose pages :func:`prefault` brings in while the data arrives, and a block a socket reads into
    is written once. Elsewhere (another Python, no ``pythonapi``) it is a zeroed one. The caller
    must not hand the buffer out before every byte was written: a small one comes from the heap
    and holds whatever was there.
    """
    make = _unfilled_maker()
    if make is not None and size > 0:
        buffer = make(None, size)
        if isinstance(buffer, bytearray) and len(buffer) == size:
            return buffer
    return bytearray(size)


@functools.cache
def _unfilled_maker() -> Callable[[None, int], object] | None:
    if sys.implementation.name != "cpython":
        return None
    import ctypes

    try:
        # A prototype of our own (not pythonapi's shared attribute, whose restype others may
        # rely on); returning py_object, it hands the new reference over to Python.
        prototype = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)
        return cast(Callable[[None, int], object], prototype(("PyByteArray_FromStringAndSize", ctypes.pythonapi)))
    except (AttributeError, OSError):  # pragma: no cover - no C API to call: merely slower
        return None


#: madvise(2) advice that faults a range in, writable, in one call (Linux 5.14 and later).
_MADV_POPULATE_WRITE = 23
_PAGE = 4096
_POPULATE_STEP = 4 * 1024 * 1024


def prefault(buffer: bytearray) -> bool:
    """Fault in the pages of a large buffer from a worker thread, without holding the GIL.

    Copying into fresh pages faults each one in while the copying thread holds the GIL, which
    stalls the event loop receiving the next bytes. ``madvise(MADV_POPULATE_WRITE)`` does the same
    work in the kernel, concurrently with the download; pages already written are left as they
    are. Returns whether it did; where the call is missing (Linux before 5.14, other systems) or
    the buffer is small, nothing happens.
    """
    if not sys.platform.startswith("linux") or len(buffer) < 16 * _PAGE:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - no usable C library: merely slower
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    address = ctypes.addressof(view)
    del view  # no export left: the caller may resize the buffer once this returns
    start = -(-address // _PAGE) * _PAGE
    end = (address + len(buffer)) // _PAGE * _PAGE
    # A few MiB per call: the kernel holds the process's memory-map lock through each one, and a
    # thread that maps memory meanwhile (a new thread's stack, a large malloc) waits for it.
    for piece in range(start, end, _POPULATE_STEP):
        if madvise(piece, min(_POPULATE_STEP, end - piece), _MADV_POPULATE_WRITE):
            return False  # EINVAL before Linux 5.14: the copying threads fault the pages in instead
    return True
