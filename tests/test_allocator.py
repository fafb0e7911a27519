"""The memory tweaks (checkpointio/_allocator.py), each checked against the internal it relies on:
glibc's dynamic mmap threshold is left alone unless asked for (the command line asks for its own
process), and load_bytes() gets its result buffer without zeroing it first, its pages faulted in
by madvise.

The glibc cases run in a new interpreter each: glibc's dynamic threshold only ever rises, so the
test process itself (which has freed large blocks long ago) cannot show the difference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from checkpointio import _allocator

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "confstr") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)

# Allocates 1 MiB (a transfer buffer) and prints whether glibc mapped it on its own (the IS_MMAPPED
# bit of the chunk's size word) instead of serving it from the heap.
PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tune":
    from checkpointio import _allocator
    print("tuned" if _allocator.tune_malloc() else "untouched")
elif sys.argv[1] == "save":
    import tempfile
    from checkpointio import Checkpoint
    with tempfile.TemporaryDirectory() as folder, Checkpoint(folder + "/ckpt") as checkpoint:
        checkpoint.save_sync(b"state")
elif sys.argv[1] == "cli":
    import tempfile
    from checkpointio import _cli
    with tempfile.TemporaryDirectory() as folder:
        open(folder + "/state", "wb").write(b"state")
        sys.argv = ["checkpointio", "-q", "save", folder + "/state", folder + "/ckpt"]
        try:
            _cli.run()
        except SystemExit as exit:
            assert exit.code == 0, exit.code
block = libc.malloc(1024 * 1024)
mapped = bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2)
libc.free(block)
print("mapped" if mapped else "heap")
"""


def probe(mode: str, **env: str) -> list[str]:
    """What the probe printed, in a new interpreter (``CHECKPOINTIO_TUNE_MALLOC`` unset unless given)."""
    inherited = {name: value for name, value in os.environ.items() if name != "CHECKPOINTIO_TUNE_MALLOC"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env={**inherited, **env}, check=True
    )
    return result.stdout.split()


@glibc_only
def test_a_fresh_process_maps_each_megabyte_buffer_on_its_own() -> None:
    assert probe("plain") == ["mapped"]  # what tune_malloc() exists to avoid


@glibc_only
def test_tune_malloc_does_nothing_unless_asked() -> None:
    assert probe("tune") == ["untouched", "mapped"]
    assert probe("tune", CHECKPOINTIO_TUNE_MALLOC="0") == ["untouched", "mapped"]


@glibc_only
def test_tune_malloc_when_asked_has_glibc_serve_megabyte_buffers_from_its_heap() -> None:
    assert probe("tune", CHECKPOINTIO_TUNE_MALLOC="1") == ["tuned", "heap"]


@glibc_only
def test_a_transfer_leaves_the_process_allocator_alone_by_default() -> None:
    assert probe("save") == ["mapped"]


@glibc_only
def test_a_transfer_tunes_the_allocator_when_asked() -> None:
    assert probe("save", CHECKPOINTIO_TUNE_MALLOC="1") == ["heap"]


@glibc_only
def test_the_command_line_tunes_its_own_process_unless_told_not_to() -> None:
    assert probe("cli") == ["heap"]
    assert probe("cli", CHECKPOINTIO_TUNE_MALLOC="0") == ["mapped"]


@pytest.mark.parametrize("size", [0, 1, 4097, 64 * 1024 * 1024])
def test_an_unfilled_bytearray_is_an_ordinary_bytearray_of_that_size(size: int) -> None:
    buffer = _allocator.unfilled_bytearray(size)
    assert type(buffer) is bytearray and len(buffer) == size
    pattern = bytes(range(256)) * (size // 256 + 1)
    buffer[:] = pattern[:size]  # every byte written, as load_bytes() does before handing it out
    assert buffer == pattern[:size]
    buffer.extend(b"more")  # resizable: nothing holds on to its memory
    assert buffer[size:] == b"more"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or sys.implementation.name != "cpython", reason="CPython on Linux"
)
def test_a_large_unfilled_bytearray_is_not_zeroed_up_front() -> None:
    size = 64 * 1024 * 1024  # fresh mapped memory: its pages are only brought in when written
    before = _resident_bytes()
    buffer = _allocator.unfilled_bytearray(size)
    assert _resident_bytes() - before < size // 10  # bytearray(size) would have touched all of it
    buffer[:] = b"\x01" * size
    assert _resident_bytes() - before > size * 0.9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_prefault_keeps_written_bytes_and_leaves_the_buffer_resizable() -> None:
    buffer = _allocator.unfilled_bytearray(8 * 1024 * 1024)
    buffer[:4096] = b"x" * 4096
    _allocator.prefault(buffer)  # whether the kernel has MADV_POPULATE_WRITE or not
    assert buffer[:4096] == b"x" * 4096
    buffer.extend(b"more")
    assert buffer[-4:] == b"more"


def _linux_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform.startswith("linux") else None
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


@pytest.mark.skipif(not _linux_at_least(5, 14), reason="MADV_POPULATE_WRITE needs Linux 5.14")
def test_prefault_brings_an_untouched_buffer_into_memory() -> None:
    size = 64 * 1024 * 1024  # above glibc's largest mmap threshold: fresh, untouched pages
    buffer = _allocator.unfilled_bytearray(size)
    before = _resident_bytes()
    assert _allocator.prefault(buffer) is True
    assert _resident_bytes() - before > size * 0.9
