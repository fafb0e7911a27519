"""Fixtures: one behavioural suite over every store (``store``), plus tree helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from checkpointio._stores._memory import _lock as memory_lock
from checkpointio._stores._memory import _objects as memory_objects

STORES = ["local", "memory"]


@dataclass
class StoreCase:
    """One store under test: makes URIs and reaches behind the library to inspect or damage objects."""

    name: str
    root: Path
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex)

    def uri(self, name: str) -> str:
        if self.name == "local":
            return str(self.root / name)
        return f"memory://{self.prefix}/{name}"

    def put_raw(self, name: str, data: bytes) -> None:
        """Store bytes as another tool would: no checkpointio record."""
        if self.name == "local":
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            import checkpointio._stores._memory as memory
            from checkpointio._location import parse_location
            from checkpointio._stores._base import ObjectInfo

            location = parse_location(self.uri(name))
            info = ObjectInfo(location, len(data), uuid.uuid4().hex)
            with memory_lock:
                memory_objects[location.key] = memory._Object(data, info)

    def get_raw(self, name: str) -> bytes:
        if self.name == "local":
            return (self.root / name).read_bytes()
        from checkpointio._location import parse_location

        with memory_lock:
            return memory_objects[parse_location(self.uri(name)).key].data

    def corrupt(self, name: str) -> None:
        """Flip bytes in the middle of the stored object, keeping its size and record."""
        if self.name == "local":
            path = self.root / name
            st = path.stat()
            data = bytearray(path.read_bytes())
            middle = len(data) // 2
            data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
            path.write_bytes(bytes(data))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # keep the record matching
        else:
            from checkpointio._location import parse_location

            key = parse_location(self.uri(name)).key
            with memory_lock:
                obj = memory_objects[key]
                data = bytearray(obj.data)
                middle = len(data) // 2
                data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
                memory_objects[key] = type(obj)(bytes(data), obj.info)

    def partial_writes(self) -> int | None:
        """How many saves are visibly in progress, or None where the store cannot show it."""
        if self.name == "local":
            return sum(1 for path in self.root.rglob(".*.partial-*"))
        return None


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreCase]:
    root = tmp_path / "store"
    root.mkdir()
    yield StoreCase(request.param, root)


def make_tree(root: Path) -> Path:
    """A directory with nested folders, an empty folder, a symlink, binary content and modes."""
    (root / "model" / "layers").mkdir(parents=True)
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "model" / "layers" / "0.txt").write_text("layer zero\n" * 1000)
    (root / "zero-bytes").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "private").write_text("secret")
    (root / "private").chmod(0o600)
    (root / "latest").symlink_to("model/weights.bin")
    (root / "model" / "up").symlink_to("../run.sh")
    os.utime(root / "model" / "layers" / "0.txt", (1_600_000_000, 1_600_000_000))
    return root


def snapshot(root: Path) -> dict[str, tuple[str, object, int, int]]:
    """What a restored tree must equal: kind, content or link target, mode and mtime of each entry."""
    result: dict[str, tuple[str, object, int, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_symlink():
            result[rel] = ("link", os.readlink(path), 0, 0)
        elif path.is_dir():
            result[rel] = ("dir", None, st.st_mode & 0o777, 0)
        else:
            result[rel] = ("file", path.read_bytes(), st.st_mode & 0o777, int(st.st_mtime))
    return result
