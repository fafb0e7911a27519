"""A fresh process serves transfer-sized buffers from its heap once checkpointio has settled glibc.

Each case runs in a new interpreter: glibc's dynamic threshold only ever rises, so the test process
itself (which has freed large blocks long ago) cannot show the difference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
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
if sys.argv[1] == "settle":
    from checkpointio import _allocator
    _allocator.settle()
elif sys.argv[1] == "save":
    import tempfile
    from checkpointio import Checkpoint
    with tempfile.TemporaryDirectory() as folder, Checkpoint(folder + "/ckpt") as checkpoint:
        checkpoint.save_sync(b"state")
block = libc.malloc(1024 * 1024)
mapped = bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2)
libc.free(block)
print("mapped" if mapped else "heap")
"""


def probe(mode: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return result.stdout.strip()


def test_a_fresh_process_maps_each_megabyte_buffer_on_its_own() -> None:
    assert probe("plain") == "mapped"  # what settle() exists to avoid


def test_settle_has_glibc_serve_megabyte_buffers_from_its_heap() -> None:
    assert probe("settle") == "heap"


def test_the_first_transfer_settles_it() -> None:
    assert probe("save") == "heap"


def test_settle_can_be_turned_off() -> None:
    assert probe("settle", CHECKPOINTIO_TUNE_MALLOC="0") == "mapped"
