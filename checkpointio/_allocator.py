"""Memory for transfers: glibc's mmap threshold, and buffers that are not zeroed first.

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

:func:`unfilled_bytearray` serves ``load_bytes()``: a result buffer that is not zeroed, so its
pages are faulted in by the threads that copy data into them, while the network delivers more.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["prefault", "settle", "unfilled_bytearray"]

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


def unfilled_bytearray(size: int) -> bytearray:
    """A ``bytearray`` of ``size`` bytes whose contents are not set: the caller writes every one.

    ``bytearray(size)`` zeroes its memory first, which faults in every page of a large buffer at
    once before any byte arrives (0.11 s for 256 MiB here, in a row before the download). Made by
    CPython's ``PyByteArray_FromStringAndSize(NULL, size)`` instead, a large buffer is fresh mapped
    memory whose pages the copying threads fault in as the data lands. Elsewhere (another Python,
    no ``pythonapi``) it is a zeroed one. The caller must not hand the buffer out before every byte
    was written: a small one comes from the heap and holds whatever was there.
    """
    if sys.implementation.name == "cpython" and size > 0:
        import ctypes

        try:
            # A prototype of our own (not pythonapi's shared attribute, whose restype others may
            # rely on); returning py_object, it hands the new reference over to Python.
            prototype = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)
            make = prototype(("PyByteArray_FromStringAndSize", ctypes.pythonapi))
            buffer = make(None, size)
            if isinstance(buffer, bytearray) and len(buffer) == size:
                return buffer
        except (AttributeError, OSError):  # pragma: no cover - no C API to call: merely slower
            pass
    return bytearray(size)


#: madvise(2) advice that faults a range in, writable, in one call (Linux 5.14 and later).
_MADV_POPULATE_WRITE = 23
_PAGE = 4096
_POPULATE_STEP = 4 * 1024 * 1024


def prefault(buffer: bytearray) -> None:
    """Fault in the pages of a large buffer from a worker thread, without holding the GIL.

    Copying into fresh pages faults each one in while the copying thread holds the GIL, which
    stalls the event loop receiving the next bytes. ``madvise(MADV_POPULATE_WRITE)`` does the same
    work in the kernel, concurrently with the download; pages already written are left as they
    are. Where the call is missing (older kernels, other systems) nothing happens.
    """
    if not sys.platform.startswith("linux") or len(buffer) < 16 * _PAGE:
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        address = ctypes.addressof(view)
        del view  # no export left: the caller may resize the buffer once this returns
        start = -(-address // _PAGE) * _PAGE
        end = (address + len(buffer)) // _PAGE * _PAGE
        # A few MiB per call: the kernel holds the process's memory-map lock through each one, and
        # a thread that maps memory meanwhile (a new thread's stack, a large malloc) waits for it.
        for piece in range(start, end, _POPULATE_STEP):
            if madvise(piece, min(_POPULATE_STEP, end - piece), _MADV_POPULATE_WRITE):
                return  # EINVAL before Linux 5.14: the copying threads fault the pages in instead
    except (OSError, AttributeError):  # pragma: no cover - no usable C library: merely slower
        pass
