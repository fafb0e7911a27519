"""The command line: ``checkpointio save | load | ls | rm | verify | gc | demo``.

Built on :mod:`argparse` (no dependency; sub-commands and one shared parent parser for the
transfer options are all it needs) and :mod:`tqdm` for progress bars. This is the only module that
imports tqdm. Every transfer goes through the library's own ``on_progress`` callback: the bar shows
the same events a user's callback gets.

Exit codes: 0 success, 1 store or other error, 2 bad usage or input, 3 no such checkpoint,
4 corrupt checkpoint, 130 interrupted (Ctrl-C), 141 standard output closed by its reader,
143 terminated (SIGTERM, handled as Ctrl-C: an upload in flight is aborted).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import re
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from tqdm import tqdm

from . import __version__, _allocator, _archive, _incremental, _manage
from ._checkpoint import Checkpoint
from ._config import TransferConfig, field_help
from ._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    SourceNotFoundError,
    UnsupportedSourceError,
)
from ._location import checkpoint_location, parse_location, parse_prefix, split_scheme
from ._progress import Progress
from ._progress import human_size as _human
from ._selection import Entry
from ._signals import Termination, interrupt_on_sigterm
from ._stores import Kind, ObjectInfo, open_store
from ._writes import write_all

__all__ = ["main"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process SIGPIPE ended
EXIT_TERMINATED = 143  # what a shell reports for a process SIGTERM ended

#: Size suffixes, all powers of 1024 as aws and rclone read them (``5M`` = ``5MB`` = ``5MiB``).
_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: 1024 ** (power + 1) for power, prefix in enumerate("kmgt") for suffix in ("", "b", "i", "ib")
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Fields of TransferConfig that are byte sizes (accept 16MiB, 5M, ...).
_SIZE_FIELDS = {"part_size", "multipart_threshold", "chunk_size"}
#: Placeholders of the text fields whose first word would not say what they take.
_METAVARS = {
    "server_side_encryption": "MODE",
    "sse_kms_key_id": "KEY",
    "storage_class": "CLASS",
    "expected_bucket_owner": "ACCOUNT",
}


class UsageError(Exception):
    """Bad input caught before any transfer starts."""


def _local_path(text: str, role: str, hint: str) -> str:
    """``text`` where only a local path is taken (``save``'s SRC, ``load``'s DEST): a plain path as
    given, a ``file:`` URI as its path.

    Raises:
        UsageError: A URI of another scheme (``s3://bucket/k``, ``memory://x``): taken as a path,
            it would name a local folder ``s3:`` (the arguments swapped, or a load taken for a copy).
        ValueError: A path that starts like a mistyped URI (``s3:/bucket/k``), as URIs are refused.
    """
    split = split_scheme(text)
    if split is not None and split[0] != "file":
        raise UsageError(
            f"{role} must be a local path {hint}, got the URI {text!r} (save SRC URI stores a local file or folder, "
            "load URI DEST restores one here); for a local folder of that name write ./" + text
        )
    if not text or text == "-":
        return text
    location = parse_location(text)  # a mistyped URI is refused here, as everywhere
    return location.key if split is not None or text[:5].lower() == "file:" else text


def _refuse_memory(args: argparse.Namespace) -> None:
    """Refuse ``memory://`` URIs: they live in the process that saved them, and the command's own
    ends when it exits (a save would report a checkpoint already gone, the rest find nothing)."""
    given = getattr(args, "uri", None)
    uris = [*([given] if isinstance(given, str) else given or []), getattr(args, "prefix", None)]
    for uri in uris:
        split = split_scheme(uri) if isinstance(uri, str) else None
        if split is not None and split[0] == "memory":
            raise UsageError(
                f"{uri}: memory:// checkpoints live in the process that saved them, and this command's ends when it "
                "exits: nothing would be kept or found (use a local folder or s3://; memory:// is for tests in "
                "one Python process)"
            )


def parse_size(text: str) -> int:
    """``16MiB``, ``5M``, ``1.5GiB``, ``1048576`` -> bytes; K, M, G, T are binary with or without
    ``B`` or ``iB`` (``5M`` is 5 MiB, as aws and rclone read it)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16MiB, 5M, 1048576)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_duration(text: str) -> float:
    """``0``, ``90s``, ``30m``, ``12h``, ``1d``, ``2w`` -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 0, 90s, 30m, 12h, 1d)")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_tags(text: str) -> dict[str, str]:
    """``team=ml&run=7`` (URL query syntax, as S3's ``Tagging`` and ``aws s3api --tagging``) -> a dict."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not tags: {text!r} (e.g. 'team=ml&run=7')") from None
    tags = dict(pairs)
    if len(tags) != len(pairs):
        raise argparse.ArgumentTypeError(f"a tag key given twice: {text!r}")
    return tags


#: Commands that reach a store (all but ``demo``), that move a checkpoint's bytes, that write one.
_STORE_COMMANDS = frozenset({"save", "load", "ls", "rm", "verify", "gc"})
_TRANSFERS = frozenset({"save", "load", "verify"})
_SAVES = frozenset({"save"})
_LOADS = frozenset({"load", "verify"})
#: The commands each TransferConfig field applies to; a field not named here goes to every
#: command that reaches a store (connection settings, request options).
_APPLIES_TO = {
    "part_size": _TRANSFERS,  # parts of an upload, ranges of a download
    "max_concurrency": _TRANSFERS,
    "multipart_threshold": _SAVES,
    "chunk_size": _TRANSFERS,
    "pipeline_depth": _TRANSFERS,
    "compression_level": _SAVES,
    "compression_workers": _TRANSFERS,  # deflate on a save, inflate on a load or verify
    "receive_workers": _LOADS,
    "flexible_checksums": _SAVES,
    "server_side_encryption": _SAVES,  # how a saved object is stored: sent with its upload only
    "sse_kms_key_id": _SAVES,
    "bucket_key_enabled": _SAVES,
    "storage_class": _SAVES,
    "tags": _SAVES,
}
#: Flags named as aws names them, where the field's name differs; the field's spelling is kept as
#: a hidden alias.
_FLAGS = {"region_name": "--region"}


def _readable(value: object, *, size: bool = False) -> str:
    """A default as a user would write it: ``16 MiB``, ``10 s``, ``on``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if size and isinstance(value, int):
        for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value >= factor and value % factor == 0:
                return f"{value // factor} {unit}"
        return _human(value)
    if isinstance(value, float):
        return f"{value:g} s"
    return str(value)


def _add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    """The TransferConfig fields as flags (``part_size`` -> ``--part-size``): those that apply to
    ``command`` listed in its help, how its bytes move and then how the store is reached; the
    others accepted but not listed, so one set of flags can be passed to every command."""
    if command not in _STORE_COMMANDS:
        return
    transfer = parser.add_argument_group("transfer settings (the library's TransferConfig fields)")
    store = parser.add_argument_group("store connection (S3 and S3-compatible servers)")
    for field in dataclasses.fields(TransferConfig):
        applies = _APPLIES_TO.get(field.name, _STORE_COMMANDS)
        group = store if applies is _STORE_COMMANDS else transfer
        flag = _FLAGS.get(field.name, "--" + field.name.replace("_", "-"))
        default, size = field.default, field.name in _SIZE_FIELDS
        text, unset = field_help(field.name)
        text = text.rstrip(".").replace("%", "%%")  # argparse formats help with %
        if default is not None:
            text += f" (default: {_readable(default, size=size)})"
        elif unset is not None:
            text += f" (default: {unset})"
        if command not in applies:
            text = argparse.SUPPRESS
        if isinstance(default, bool) or field.type == "bool | None":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif field.name == "tags":
            group.add_argument(flag, type=parse_tags, metavar="KEY=VALUE&...", help=text)
        elif size:
            group.add_argument(flag, dest=field.name, type=parse_size, metavar="SIZE", help=text)
        elif isinstance(default, int) or field.type == "int | None":
            group.add_argument(flag, dest=field.name, type=int, metavar="N", help=text)
        elif isinstance(default, float):
            group.add_argument(flag, dest=field.name, type=float, metavar="SECONDS", help=text)
        elif field.name == "addressing_style":
            group.add_argument(flag, dest=field.name, choices=("path", "virtual", "auto"), help=text)
        else:
            metavar = _METAVARS.get(field.name, field.name.split("_")[0].upper())
            group.add_argument(flag, dest=field.name, metavar=metavar, help=text)
        if field.name in _FLAGS:
            alias = "--" + field.name.replace("_", "-")
            group.add_argument(alias, dest=field.name, metavar=metavar, help=argparse.SUPPRESS)


def _config(args: argparse.Namespace) -> TransferConfig:
    names = {field.name for field in dataclasses.fields(TransferConfig)}
    options = {name: value for name, value in vars(args).items() if name in names and value is not None}
    try:
        return TransferConfig(**options)
    except ValueError as error:
        raise UsageError(str(error)) from None


_VERBOSE_HELP = "log each transfer and what is retried, and show tracebacks (-vv: debug, -vvv: botocore's too)"


def _verbosity() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress, no summary")
    return parser


# -- progress --------------------------------------------------------------------------------------


class _ByteBar(tqdm):  # type: ignore[type-arg]  # tqdm is generic in its stubs only
    """A tqdm bar that writes sizes and rates in binary units (``MiB``, ``MiB/s``), as the summary
    line does; tqdm's own scaling divides the counts by 1024 but the rate by 1000, and says ``MB``."""

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        values = super().format_dict
        total, rate, elapsed = values["total"], values["rate"], values["elapsed"]
        if rate is None and elapsed:
            rate = values["n"] / elapsed
        values["done_h"] = _human(values["n"])
        values["total_h"] = _human(total) if total is not None else "?"
        values["rate_h"] = f"{_human(int(rate))}/s" if rate else "?/s"
        return values


#: With a known total: percentage, bar, bytes, time left. Without: bytes and rate only.
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done_h}/{total_h} [{elapsed}<{remaining}, {rate_h}{postfix}]"
_COUNTER_FORMAT = "{desc}: {done_h} [{elapsed}, {rate_h}{postfix}]"


class ProgressBars:
    """One tqdm bar per transfer, fed by the library's ``on_progress`` events (from worker threads).

    A bar counts the source's bytes (a directory's files before compression, against their total
    listed when the save starts, as ``rsync --info=progress2`` does) and says how much was sent
    when that differs, and when the save is committing.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bars: dict[tuple[str, str], _ByteBar] = {}
        self._lock = threading.Lock()
        self.last: Progress | None = None

    def __call__(self, event: Progress) -> None:
        self.last = event
        if not self.enabled:
            return
        key = (event.operation, event.uri)
        done = event.source_done if event.source_done is not None else event.done
        total = event.source_total if event.source_done is not None else event.total
        with self._lock:
            bar = self._bars.get(key)
            if bar is None:
                shape = _shape()
                bar = self._bars[key] = _ByteBar(
                    desc=_fit(f"{event.operation} {event.uri}", shape["ncols"] or 100),
                    total=total,
                    bar_format=_BAR_FORMAT if total is not None else _COUNTER_FORMAT,
                    **shape,
                    mininterval=0.1,
                    file=sys.stderr,
                )
            if total != bar.total:
                bar.total = total
                bar.bar_format = _BAR_FORMAT if total is not None else _COUNTER_FORMAT
            notes = [f"{_human(event.done)} sent"] if done != event.done else []
            if event.committing and not event.finished:
                notes.append("committing")
            postfix = ", ".join(notes)
            if postfix != (bar.postfix or ""):
                bar.set_postfix_str(postfix, refresh=False)
                bar.update(done - bar.n)
                bar.refresh()  # a change of phase shows at once, whatever the refresh interval
            else:
                bar.update(done - bar.n)
            if event.finished:
                bar.close()
                del self._bars[key]

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


def _shape() -> dict[str, Any]:
    """Follow the terminal's size; one that reports none (0 rows or columns: ``script``, CI logs,
    some IDE consoles) gets a fixed 100 x 20, as tqdm would hide the bar of a terminal of 0 rows.
    ``ncols`` is the width now (``None``: unknown)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        columns, lines = size.columns, size.lines
    except (OSError, ValueError):
        columns = lines = 0
    if columns > 0 and lines > 0:
        return {"dynamic_ncols": True, "ncols": columns}
    return {"ncols": columns if columns > 0 else 100, "nrows": lines if lines > 0 else 20}


#: Columns kept for a bar's figures: percentage, bar, sizes, times, rate and notes.
_FIGURES = 80


def _fit(desc: str, width: int) -> str:
    """A bar's label cut at its start (the end of a URI tells checkpoints apart) to leave the
    figures room; tqdm would cut them instead, from the end of the line."""
    room = max(width - _FIGURES, 24)
    return desc if len(desc) <= room else "..." + desc[len(desc) - room + 3 :]


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):  # tar stores mtimes far outside any calendar
        return f"@{timestamp:.0f}"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _row(info: ObjectInfo) -> dict[str, Any]:
    """A checkpoint as ``--json`` gives it (``ls`` and ``verify``)."""
    return {
        "uri": info.location.uri,
        "key": info.location.key,
        "kind": info.record.kind.value if info.record is not None else None,
        "size": info.size,
        "modified": _when(info.modified) if info.modified is not None else None,
        "crc32": f"{info.record.crc32:08x}" if info.record and info.record.crc32 is not None else None,
    }


def _kind(info: ObjectInfo) -> str:
    return info.record.kind.value if info.record is not None else "-"


# -- commands --------------------------------------------------------------------------------------


class _Command:
    """What each command handler gets: its arguments, settings, progress bars and an output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = _config(args)
        self.quiet: bool = args.quiet
        self.bars = ProgressBars(enabled=not self.quiet and sys.stderr.isatty())

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)


def _emit_json(value: object) -> None:
    """A command's result for scripts (``--json``), on standard output."""
    print(json.dumps(value, indent=2), flush=True)


async def _save(cmd: _Command) -> None:
    source = _local_path(cmd.args.source, "SRC", "to save")
    if source == "-":
        if sys.stdin is None:
            raise UsageError("standard input is closed: nothing to save from '-' (give a file or a folder)")
        data: Any = sys.stdin.buffer
        kind = Kind.BYTES
    else:
        data = Path(source)
        is_dir = await anyio.to_thread.run_sync(data.is_dir)
        kind = Kind.DIRECTORY if is_dir else Kind.FILE  # a missing path: save() says so
    parents = cmd.args.parent or []
    if parents:
        await _check_parents(cmd.args.uri, parents, cmd.args.incremental, cmd.config)
    checkpoint = Checkpoint(
        cmd.args.uri, src=parents or None, config=cmd.config, on_progress=cmd.bars, incremental=cmd.args.incremental
    )
    if not cmd.args.force:
        await _manage.refuse_foreign_file(cmd.args.uri)
    if cmd.args.dry_run:
        await _save_dry_run(cmd, source, kind, checkpoint.dest)
        return
    await checkpoint.save(data, force=cmd.args.force)
    last = cmd.bars.last
    stored = last.done if last is not None else 0
    read = last.source_done if last is not None and last.source_done is not None else stored
    if cmd.args.json:
        _emit_json({"uri": checkpoint.dest, "kind": kind.value, "size": read, "stored": stored})
        return
    size = _human(stored) if read == stored else f"{_human(read)}, {_human(stored)} stored"
    cmd.say(f"saved {checkpoint.dest} ({kind.value}, {size})")


async def _check_parents(uri: str, parents: Sequence[str], incremental: bool, config: TransferConfig) -> None:
    """Refuse, before anything is read or written, a ``--parent`` that an incremental save to
    ``uri`` could not reuse: it needs ``--incremental``, and each parent must be an incremental
    checkpoint that exists in ``uri``'s folder (packs are shared by the checkpoints of one folder)."""
    if not incremental:
        raise UsageError("--parent names what an incremental save reuses: add --incremental")
    dest = checkpoint_location(uri)
    for parent in parents:
        location = checkpoint_location(parent)
        if _incremental.area_of(location) != _incremental.area_of(dest):
            folder = dest.uri.rpartition("/")[0] or dest.uri
            raise UsageError(
                f"--parent {location.uri} is not in the folder of {dest.uri} ({folder}/): an incremental save "
                "reuses only the chunks of checkpoints beside it, whose packs it shares"
            )
        store = await open_store(location.scheme, config)
        info = await store.head(location)
        if info is None:
            raise CheckpointNotFoundError(f"--parent {location.uri}: no such checkpoint", uri=location.uri)
        if not await _incremental.is_manifest_object(store, info):
            kind = info.record.kind.value if info.record is not None else "unrecorded"
            raise UsageError(
                f"--parent {location.uri} is not an incremental checkpoint (a {kind} one): only an incremental "
                "checkpoint's chunks can be reused"
            )


async def _save_dry_run(cmd: _Command, source: str, kind: Kind, uri: str) -> None:
    """What ``save`` would do: the source's size, and whether a checkpoint at URI would be
    replaced (which reaches the store: a missing bucket or bad credentials show here too)."""
    size: int | None = None
    if source != "-":
        path = Path(source)
        if not await anyio.to_thread.run_sync(path.exists):
            raise SourceNotFoundError(f"cannot save {source!r}: no such file or directory", uri=source)
        measure = partial(_archive.tree_size, path) if kind is Kind.DIRECTORY else lambda: path.stat().st_size
        size = await anyio.to_thread.run_sync(measure)
    location = parse_location(uri)
    existing = await (await open_store(location.scheme, cmd.config)).head(location)
    if cmd.args.json:
        replaces = existing.size if existing is not None else None
        _emit_json({"uri": uri, "kind": kind.value, "size": size, "dry_run": True, "replaces": replaces})
        return
    what = "standard input" if source == "-" else f"{source} ({kind.value}, {_human(size or 0)})"
    after = f"replacing the checkpoint there ({_human(existing.size)})" if existing is not None else "a new checkpoint"
    print(f"would save {what} to {uri}: {after}", flush=True)


def _stdout_writer() -> Callable[[bytes], object]:
    """Writes to file descriptor 1 itself: blocks are large already, and Python's buffer would
    be flushed once more at exit, into a pipe its reader may have closed."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without one
        return sys.stdout.buffer.write

    def write(block: bytes) -> None:
        write_all(fd, block)

    return write


def _need_stdout(what: str) -> None:
    """Refuse, before any work, a command whose result is its output when standard output is closed
    (``>&-``): it would do the work and exit 0 having shown nothing."""
    if sys.stdout is None:
        raise UsageError(f"standard output is closed: nowhere to write {what}")


async def _load(cmd: _Command) -> None:
    if cmd.args.only and cmd.args.dest == "-":
        raise UsageError("--only restores entries of a directory into DEST, not to standard output")
    dest = _local_path(cmd.args.dest, "DEST", "to create")
    if dest == "-":
        if cmd.args.json:
            raise UsageError("--json prints a summary to standard output, which DEST '-' takes for the bytes")
        _need_stdout("the checkpoint's bytes")
        await _manage.write_out(cmd.args.uri, _stdout_writer(), cmd.config, cmd.bars)
        return  # no summary: standard output holds the checkpoint
    restored = await _manage.restore(
        cmd.args.uri, dest, cmd.config, cmd.bars, overwrite=cmd.args.force, only=cmd.args.only, only_option="--only"
    )
    if cmd.args.json:
        kind = Kind.DIRECTORY if restored.is_directory else Kind.FILE
        size = None if restored.is_directory else restored.size
        _emit_json(
            {"uri": parse_location(cmd.args.uri).uri, "dest": str(restored.path), "kind": kind.value, "size": size}
        )
        return
    what = "directory" if restored.is_directory else f"file, {_human(restored.size)}"
    cmd.say(f"restored {cmd.args.uri} to {restored.path} ({what})")


def _names_nothing(prefix: str) -> CheckpointError:
    """The error for a prefix under which nothing at all was listed, as ``aws s3 ls`` exits 1 for
    one: a typo must not look like an empty store. An existing local folder or a whole bucket may
    be empty."""
    location = parse_prefix(prefix)
    if location.scheme == "file" and not os.path.lexists(location.key):
        return CheckpointError(f"{location.uri}: no such file or folder, and no name starts with it", uri=location.uri)
    return CheckpointError(f"{location.uri}: nothing there (no object's name starts with it)", uri=location.uri)


def _empty_is_fine(prefix: str) -> bool:
    location = parse_prefix(prefix)
    return (location.scheme == "file" and os.path.isdir(location.key)) or (location.scheme == "s3" and not location.key)


def _distributed_row(found: _manage.Distributed) -> dict[str, Any]:
    """A distributed checkpoint as ``--json`` gives it: its manifest's row, with the kind
    ``distributed``, the total size (manifest and data), how many saves' data that size counts
    (more than one only where the manifest may not be read) and the world size that saved it."""
    return {
        **_row(found.manifest),
        "kind": "distributed",
        "size": found.size,
        "saves_counted": found.saves,
        "crc32": None,
        "world_size": found.summary.world_size if found.summary is not None else None,
    }


async def _ls_contents(cmd: _Command) -> None:
    """``ls --contents URI``: the entries of one directory checkpoint, from its table of contents."""
    rows: list[dict[str, Any]] = []

    def each(entry: Entry) -> None:
        if cmd.args.json:
            row = {"path": entry.path, "kind": entry.kind, "size": entry.size, "mtime": _when(entry.mtime)}
            rows.append({**row, "mode": f"{entry.mode:04o}", **({"link": entry.link} if entry.link else {})})
            return
        link = f" -> {entry.link}" if entry.kind == "symlink" else f" => {entry.link}" if entry.link else ""
        print(f"{entry.kind:<8} {entry.size:>14} {_when(entry.mtime):<20} {entry.path}{link}")

    table = await _manage.list_contents(cmd.args.prefix, cmd.config, each)
    if cmd.args.json:
        _emit_json(rows)
    if not table:
        logger.warning(
            "%s has no table of contents (saved by another tool or an older checkpointio): the whole archive was "
            "read to list it",
            parse_location(cmd.args.prefix).uri,
        )


def _incremental_row(found: _manage.Incremental) -> dict[str, Any]:
    """An incremental checkpoint as ``--json`` gives it: its manifest's row, with the kind
    ``incremental``, the bytes it references (``size``, the manifest included) and the bytes
    only it holds (``exclusive``: in packs no other checkpoint uses, freed by removing it and a
    ``gc``)."""
    return {**_row(found.manifest), "kind": "incremental", "size": found.size, "exclusive": found.usage.exclusive}


async def _ls(cmd: _Command) -> None:
    _need_stdout("the listing")
    if cmd.args.contents:
        await _ls_contents(cmd)
        return
    unread: set[str] = set()  # rows whose record or manifest the credentials may not read
    infos = await _manage.list_checkpoints(cmd.args.prefix, cmd.config, unread)
    if not infos and not _empty_is_fine(cmd.args.prefix):
        raise _names_nothing(cmd.args.prefix)
    distributed = await _manage.distributed_among(infos, cmd.config, unreadable=True)
    unread.update(key for key, found in distributed.items() if found.summary is None)
    incremental = await _manage.incremental_among(infos, cmd.config, unread)
    infos = [info for info in infos if not _manage.folded(info, distributed)]
    if cmd.args.json:
        _emit_json(
            [
                {
                    **(
                        _distributed_row(distributed[info.location.key])
                        if info.location.key in distributed
                        else _incremental_row(incremental[info.location.key])
                        if info.location.key in incremental
                        else _row(info)
                    ),
                    "unread": info.location.key in unread,
                }
                for info in infos
            ]
        )
    else:
        for info in infos:
            found = distributed.get(info.location.key)
            chunked = incremental.get(info.location.key)
            note = " (not read: access denied)" if info.location.key in unread else ""
            if chunked is not None:
                only = f"(only it: {_human(chunked.usage.exclusive)})"
                print(f"incremental {chunked.size:>14} {_when(info.modified):<20} {info.location.uri} {only}")
            elif found is None:
                print(f"{_kind(info):<11} {info.size:>14} {_when(info.modified):<20} {info.location.uri}{note}")
            else:
                world = f" (world size {found.summary.world_size})" if found.summary is not None else note
                if found.saves > 1:  # only where the manifest may not be read
                    world = (
                        f" (not read: access denied; the size counts the data of {found.saves} saves, "
                        f"{found.saves - 1} of them not committed)"
                    )
                print(f"distributed {found.size:>14} {_when(info.modified):<20} {info.location.uri}{world}")
    shown = unread & {info.location.key for info in infos}
    if shown:
        logger.warning(
            "%d of the checkpoints listed under %s could not be read (access denied: these credentials may list, "
            "not read): shown as listed, their kind, size or world size unknown",
            len(shown),
            parse_prefix(cmd.args.prefix).uri,
        )


async def _rm(cmd: _Command) -> int:
    args = cmd.args
    if args.dry_run:
        _need_stdout("what would be removed")
    verb = "would remove" if args.dry_run else "removed"
    if args.recursive:
        for prefix in args.uri:  # every prefix checked before anything is removed
            _manage.refuse_sweeping(parse_prefix(prefix), "remove the checkpoints under")
        for prefix in args.uri:
            removal = await _manage.remove_under(prefix, cmd.config, dry_run=args.dry_run)
            if not removal.removed and not removal.skipped and not _empty_is_fine(prefix):
                raise _names_nothing(prefix)
            for location in removal.removed:
                print(f"{verb} {location.uri}", flush=True)
            unread = set(removal.unread)
            for location in removal.skipped:
                why = "its record may not be read" if location in unread else "no checkpointio record"
                print(f"skipped {location.uri} ({why}: not removed)", flush=True)
        return EXIT_OK
    for uri in args.uri:
        location = checkpoint_location(uri)  # a bad URI among them: nothing removed
        if location.scheme == "file" and await anyio.to_thread.run_sync(os.path.isdir, location.key):
            raise UsageError(
                f"{location.uri} is a folder, not a checkpoint: rm --recursive removes the checkpoints in it"
            )
    if not args.force:  # nor a user's own file among them (rm train.py)
        for uri in args.uri:
            await _manage.refuse_foreign_file(uri, removing=True)
    code = EXIT_OK
    for uri in args.uri:
        try:
            await _manage.remove(uri, cmd.config, dry_run=args.dry_run, force=args.force)
        except CheckpointNotFoundError as error:  # the others are still removed, as rm does
            print(f"checkpointio: error: {error}", file=sys.stderr)
            code = code or EXIT_NOT_FOUND
            continue
        if args.dry_run:
            print(f"{verb} {checkpoint_location(uri).uri}", flush=True)
        else:
            cmd.say(f"{verb} {checkpoint_location(uri).uri}")
    return code


def _count(count: int, noun: str) -> str:
    """``1 object``, ``2 objects``: a count and its noun, in the plural unless it is one."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


async def _verify(cmd: _Command) -> None:
    summary = await _manage.distributed_summary(cmd.args.uri, cmd.config)
    info = await _manage.verify(cmd.args.uri, cmd.config, cmd.bars)
    if summary is not None:
        await _manage.verify_distributed(cmd.args.uri, summary, cmd.config, cmd.bars)
        found = _manage.Distributed(info, summary)
        if cmd.args.json:
            _emit_json(_distributed_row(found))
            return
        objects = len(summary.objects)
        cmd.say(
            f"ok {info.location.uri} (distributed, {_human(found.size)}, world size {summary.world_size}, "
            f"{_count(objects, 'data object')})"
        )
        return
    chunked = await _manage.incremental_of(info, cmd.config)  # described as ls describes it
    if cmd.args.json:
        _emit_json(_incremental_row(chunked) if chunked is not None else _row(info))
        return
    crc = f", crc32 {info.record.crc32:08x}" if info.record and info.record.crc32 is not None else ""
    kind, size = ("incremental", chunked.size) if chunked is not None else (_kind(info), info.size)
    cmd.say(f"ok {info.location.uri} ({kind}, {_human(size)}{crc})")


async def _gc(cmd: _Command) -> None:
    args = cmd.args
    if args.dry_run:
        _need_stdout("what would be aborted")
    writes = await _manage.collect_garbage(args.prefix, cmd.config, older_than=args.older_than, dry_run=args.dry_run)
    stale = await _manage.collect_distributed(args.prefix, cmd.config, older_than=args.older_than, dry_run=args.dry_run)
    areas = await _manage.collect_incremental(args.prefix, cmd.config, older_than=args.older_than, dry_run=args.dry_run)
    runs = []
    if args.runs_older_than is not None:
        runs = await _manage.prune_runs(args.prefix, cmd.config, older_than=args.runs_older_than, dry_run=args.dry_run)
    if args.json:
        saves = [{"uri": write.location.uri, "ident": write.ident, "started": _when(write.started)} for write in writes]
        old = [{"uri": run.location.uri, "last_written": _when(run.last_written)} for run in runs]
        data = [
            {
                "uri": one.checkpoint.uri,
                "save_id": one.save_id,
                "objects": [info.location.uri for info in one.objects],
                "size": one.size,
                "last_written": _when(one.last_written),
            }
            for one in stale
        ]
        packs = [
            {
                "uri": area.area.uri,
                "removed": sorted(area.removed),
                "size": area.freed,
                "kept_unreferenced": area.kept_unreferenced,
                "skipped": area.skipped or None,
            }
            for area in areas
        ]
        _emit_json(
            {
                "dry_run": args.dry_run,
                "unfinished_saves": saves,
                "distributed_saves": data,
                "incremental_packs": packs,
                "runs": old,
            }
        )
        return
    verb = "would abort" if args.dry_run else "aborted"
    for write in writes:
        print(f"{verb} {write.location.uri} {write.ident} (started {_when(write.started)})")
    for one in stale:
        removed = "would remove" if args.dry_run else "removed"
        print(
            f"{removed} the data of the uncommitted distributed save {one.save_id} of {one.checkpoint.uri} "
            f"({_count(len(one.objects), 'object')}, {_human(one.size)}, last written {_when(one.last_written)})"
        )
    for area in areas:
        removed = "would remove" if args.dry_run else "removed"
        if area.removed:
            print(
                f"{removed} {_count(len(area.removed), 'pack')} no incremental checkpoint references from "
                f"{area.area.uri} ({_human(area.freed)})"
            )
        if area.skipped:
            print(f"kept the packs of {area.area.uri}: {area.skipped}")
    for run in runs:
        removed = "would remove" if args.dry_run else "removed"
        print(f"{removed} run {run.location.uri} (last written {_when(run.last_written)})")
    if not writes and not stale and not runs and not any(area.removed or area.skipped for area in areas):
        cmd.say(f"nothing to clean up under {args.prefix}")


def _demo(cmd: _Command) -> None:
    from . import _demo

    _demo.run(cmd.args.root)


_COMMANDS: dict[str, Callable[[_Command], Awaitable[int | None]]] = {
    "save": _save,
    "load": _load,
    "ls": _ls,
    "rm": _rm,
    "verify": _verify,
    "gc": _gc,
}


_JSON_HELP = "print the result as a JSON object, for scripts"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command, each with an example in its ``--help``."""
    verbosity = _verbosity()
    parser = argparse.ArgumentParser(
        prog="checkpointio",
        description="Save, restore, inspect and clean up checkpoints in a local folder or s3://.",
        epilog="Run 'checkpointio COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"checkpointio {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no summary line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[verbosity],
        )
        _add_settings(parser, name)
        return parser

    sub = command(
        "save",
        "Save a directory (streamed as tar.gz), a file, or '-' (standard input, streamed) to URI.",
        "checkpointio save ./checkpoints s3://bucket/runs/7/attempt-0 --part-size 32MiB",
    )
    sub.add_argument("source", metavar="SRC", help="a directory, a file, or - for standard input")
    sub.add_argument("uri", metavar="URI", help="a path, file://... or s3://bucket/key")
    sub.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be saved (its size) and whether a checkpoint at URI would be replaced; write nothing",
    )
    sub.add_argument("--json", action="store_true", help=_JSON_HELP)
    sub.add_argument(
        "-f", "--force", action="store_true", help="replace a local file at URI that checkpointio did not write"
    )
    sub.add_argument(
        "--incremental",
        action="store_true",
        help="save a directory as an incremental checkpoint: upload only the chunks the incremental checkpoint "
        "at URI (its previous save there), or the one named by --parent, does not hold already",
    )
    sub.add_argument(
        "--parent",
        action="append",
        metavar="PARENT",
        help="with --incremental: an incremental checkpoint in URI's folder whose chunks this save reuses, so a "
        "save to a new key uploads only what changed since PARENT; repeatable (newest first: the first "
        "found is used, as a task's earlier attempts are)",
    )

    sub = command(
        "load",
        "Restore the checkpoint at URI as DEST: the saved directory tree, or the saved bytes as a file; "
        "DEST '-' writes the bytes of a bytes or file checkpoint to standard output (checked once written: "
        "a corrupt one exits with 4 after its bytes went out).",
        "checkpointio load s3://bucket/runs/7/attempt-0 ./restored",
    )
    sub.add_argument("uri", metavar="URI", help="a path, file://... or s3://bucket/key")
    sub.add_argument(
        "dest", metavar="DEST", help="path to create (refused if it exists, unless --force), or - for standard output"
    )
    sub.add_argument("-f", "--force", action="store_true", help="replace DEST if it exists")
    sub.add_argument(
        "--only",
        action="append",
        metavar="GLOB",
        help="restore just the entries of a directory checkpoint matching GLOB (a path inside it; * ? [...] "
        "within a part, ** across parts, a folder with its contents); repeatable",
    )
    sub.add_argument("--json", action="store_true", help=_JSON_HELP)

    sub = command(
        "ls",
        "List the checkpoints under a prefix: kind, size, time (UTC) and URI; a distributed checkpoint "
        "is one row (its total size and world size). With --contents, the files in one directory "
        "checkpoint, read from its table of contents without downloading its data.",
        "checkpointio ls s3://bucket/runs/7/ --json",
    )
    sub.add_argument(
        "prefix",
        metavar="URI_PREFIX",
        help="a folder or s3://bucket[/prefix] (with --contents: a URI)",
    )
    sub.add_argument(
        "--contents",
        action="store_true",
        help="list the entries of the directory checkpoint at URI: kind, size, mtime (UTC), path (an archive "
        "without a table of contents, from another tool or an older version, is read whole)",
    )
    sub.add_argument("--json", action="store_true", help="a JSON array of objects, for scripts")

    sub = command(
        "rm",
        "Delete the checkpoints at the URIs (a distributed one with its data); with --recursive, every "
        "checkpoint checkpointio wrote under each prefix (files and objects without its record are listed "
        "as skipped, never deleted).",
        "checkpointio rm --recursive --dry-run s3://bucket/runs/7/",
    )
    sub.add_argument("uri", metavar="URI", nargs="+", help="checkpoint URIs, or prefixes with --recursive")
    sub.add_argument("-r", "--recursive", action="store_true", help="remove every checkpoint under each prefix")
    sub.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    sub.add_argument(
        "-f", "--force", action="store_true", help="also remove a local file at URI that checkpointio did not write"
    )

    sub = command(
        "verify",
        "Read the checkpoint at URI to its end and check its checksum and, for a directory, its archive "
        "(for a distributed one, every data object against its manifest); writes nothing.",
        "checkpointio verify s3://bucket/runs/7/attempt-0 && echo intact",
    )
    sub.add_argument("uri", metavar="URI", help="a path, file://... or s3://bucket/key")
    sub.add_argument("--json", action="store_true", help=_JSON_HELP)

    sub = command(
        "gc",
        "Abort unfinished saves under a prefix (S3: incomplete multipart uploads; local: temporary files "
        "of killed saves), remove the data of distributed saves no manifest commits and the packs no "
        "incremental checkpoint references (none while a save is in progress beside them), and list them.",
        "checkpointio gc s3://bucket/runs/ --older-than 12h --dry-run",
    )
    sub.add_argument("prefix", metavar="PREFIX", help="a folder or s3://bucket[/prefix]")
    sub.add_argument(
        "--older-than",
        type=parse_duration,
        default=86400.0,
        metavar="AGE",
        help="only those started longer ago than this: 0, 90s, 30m, 12h, 1d (default: 1d)",
    )
    sub.add_argument(
        "--runs-older-than",
        type=parse_duration,
        metavar="AGE",
        help="also remove the task runs (attempt-<n> checkpoints, their claims) last written longer ago than this",
    )
    sub.add_argument("--dry-run", action="store_true", help="list what would be aborted or removed, change nothing")
    sub.add_argument("--json", action="store_true", help="an object of the unfinished saves and the runs, for scripts")

    sub = command(
        "demo",
        "Run the README's main job: tasks fail part-way, are retried and resume; a SIGKILLed run resumes.",
        "checkpointio demo --root /tmp/demo-store",
    )
    sub.add_argument("--root", help="storage root (default: CHECKPOINTIO_STORAGE, else ~/.cache/checkpointio)")
    return parser


def _exit_code(error: BaseException) -> int:
    if isinstance(error, CheckpointNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, CorruptCheckpointError):
        return EXIT_CORRUPT
    if isinstance(error, UsageError | SourceNotFoundError | UnsupportedSourceError | FileExistsError | ValueError):
        return EXIT_USAGE
    return EXIT_ERROR


class _Formatter(logging.Formatter):
    """``checkpointio: warning: ...`` as the error line reads; with ``-v`` a time and the logger."""

    def __init__(self, verbose: int) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else None)
        self._verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self._verbose:
            return super().format(record)
        text = f"checkpointio: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _setup_logging(verbose: int, quiet: bool) -> None:
    """The command's own output: warnings, ``-v`` what it does and retries (INFO) and tracebacks,
    ``-vv`` checkpointio's debug records, ``-vvv`` botocore's and every other library's too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(verbose))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)
    levels = {0: logging.ERROR if quiet else logging.WARNING, 1: logging.INFO}
    logging.getLogger("checkpointio").setLevel(levels.get(verbose, logging.DEBUG))


def _closed_streams_to_devnull() -> None:
    """Open the null device on each standard descriptor (0, 1, 2) that was closed at start.

    Python leaves ``sys.stdin``/``stdout``/``stderr`` as ``None`` for those (the commands check
    that), but the descriptor number is free: the first file the command opens would get it, and a
    write meant for the terminal would land in a checkpoint. A closed stderr gets a writer to the
    null device, so the work goes on and only its messages are lost (``print(file=None)`` would
    write them to standard output).
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the process's life)


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run the command line; returns the exit code (the console script exits with it).

    ``own_process``: the command is the whole process (the console script, ``python -m``), so a
    ``memory://`` URI is refused: its checkpoints would end with it. Called in a program's own
    process, ``memory://`` is that process's store, as for the library.
    """
    _closed_streams_to_devnull()
    with interrupt_on_sigterm() as termination:
        return _main(argv, termination, own_process=own_process)


def _run_command(command: Callable[[_Command], Awaitable[int | None]], cmd: _Command) -> int | None:
    """Run one command on a fresh event loop; Ctrl-C (or SIGTERM) is a ``KeyboardInterrupt``.

    On Python 3.11+ anyio's runner turns the interrupt it delivered as a cancellation of the main
    task back into ``KeyboardInterrupt``; on 3.10 (no ``Task.uncancel``) it lets the
    ``CancelledError`` out, which only an interrupt can cause here.
    """
    try:
        return anyio.run(command, cmd)
    except asyncio.CancelledError:
        if sys.version_info >= (3, 11):
            raise
        raise KeyboardInterrupt from None


def _main(argv: Sequence[str] | None, termination: Termination, *, own_process: bool) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", 0) or 0
    args.quiet = bool(getattr(args, "quiet", False))
    _setup_logging(args.verbose, args.quiet)
    cmd: _Command | None = None
    try:
        if own_process and args.command != "demo":
            _refuse_memory(args)
        cmd = _Command(args)
        logger.debug("checkpointio %s: %s with %s", __version__, args.command, cmd.config)
        if args.command == "demo":
            _demo(cmd)
        else:
            code = _run_command(_COMMANDS[args.command], cmd)
            if code:  # a command that went on past a failure (rm of several URIs)
                return code
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (interrupt_on_sigterm)
        if cmd is not None:
            cmd.bars.close()
        if termination.received:
            print("checkpointio: terminated", file=sys.stderr)
            return EXIT_TERMINATED
        print("checkpointio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of standard output left (``| head``): stop quietly, as tar does
        if cmd is not None:
            cmd.bars.close()
        return EXIT_BROKEN_PIPE
    except (CheckpointError, OSError, UsageError, ValueError) as error:
        if cmd is not None:
            cmd.bars.close()
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"checkpointio: error: {message}", file=sys.stderr)
        return _exit_code(error)
    return EXIT_OK


def run() -> None:
    """Console-script entry point: the command owns its process, so it has glibc keep transfer
    buffers on its heap (see ``_allocator.tune_malloc``; ``CHECKPOINTIO_TUNE_MALLOC=0`` opts out)."""
    _allocator.tune_malloc(default=True)
    sys.exit(main(own_process=True))
