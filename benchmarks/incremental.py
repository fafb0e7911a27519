"""Benchmark incremental checkpoints against the tar.gz format (issue 21's targets).

    python benchmarks/incremental.py [--quick] [--small-files N] [--small-mib N] [--big-mib N]
                                     [--tensor-mib N] [--repeat N] [--compare DIR] [--workdir DIR]
                                     [--json FILE]

Every step runs in a child process of its own (its wall time and peak RSS are its own: the clock
starts and the RSS high-water mark is reset once checkpointio is imported), against a local
store; bytes uploaded are counted at the store: the bytes of the objects a step created or
replaced there.

* **small-file tree** (50,000 files, 328 MiB by default): a tar.gz save, a first incremental save,
  then 1% of the files modified, 0.5% added and 0.5% deleted and a second incremental save.
  Targets: the second save uploads at most 5% of a full save's bytes (the manifest included) and
  takes at most 10% of its wall time; the first incremental save takes at most 1.1x the tar.gz
  save's time. The second save is measured twice: in a fresh process (it starts anyio and reads
  the parent manifest back), and in the process that made the first save, right after it, through
  the same ``Checkpoint`` (as a task checkpointing every few minutes does): the child saves, the
  tree is changed meanwhile, the child saves again; the change is then undone for the next
  repetition.
* **big file** (1 GiB by default): saved, then 10 scattered 4 KiB edits in place, saved again.
  Target: the second save uploads at most 2% of the file.
* **tensor directory** (770 MiB by default): saved, one layer file rewritten, saved again.
  Target: it uploads that file's bytes, not the tree's.
* **restores** of the small-file tree and the tensor directory, tar.gz and incremental. Targets:
  the incremental restore reaches 0.9x the tar.gz restore's throughput; peak RSS < 300 MiB.
* **a manifest of 1,000,000 files** (``--manifest-files``; 1,000 folders of 1,000 one-chunk
  files): its size, and the memory and time decoding it takes (the checks a restore makes, and
  the lighter read a save makes of a parent), each in a child process of its own.

``--repeat N`` runs each small-file and tensor step N times and reports medians; ``--compare DIR``
runs them with the checkpointio of the source tree DIR too (a checkout of main: before and after
in one run, on the same data, the two versions alternating).

Nothing about time is asserted: the script fails only if a restore differs from what was saved,
so ``--quick`` (small datasets) is safe for CI. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.datasets import MiB, make_big_file, make_small_files, make_tensor_tree  # noqa: E402
from benchmarks.measure import clean_up_on_sigterm  # noqa: E402

#: Defines ``peak()`` in a child script: the peak RSS in MiB since this point, not the imports'
#: (the high-water mark is reset where Linux allows it), else the process's whole peak.
_PEAK = """
import resource

def peak_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    peak = peak_mib
except OSError:
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from checkpointio import Checkpoint
op, uri, path, incremental = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
{peak}
before = resource.getrusage(resource.RUSAGE_SELF)
cpu_before = before.ru_utime + before.ru_stime
started = time.perf_counter()
if op == "save":
    with Checkpoint(uri, incremental=incremental) as cp:
        cp.save_sync(path)
else:
    with Checkpoint(Path(path) / "unused", src=uri, workspace=path) as cp:
        assert cp.load_sync() is not None
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu = usage.ru_utime + usage.ru_stime - cpu_before
print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_mib": peak()}))
""".replace("{peak}", _PEAK)

#: Two incremental saves of one tree through one ``Checkpoint`` in one process: the first, then
#: (once the parent process changed the tree and wrote a line) the second; one JSON line each.
_WARM = """
import json, resource, sys, time
from checkpointio import Checkpoint
uri, path = sys.argv[1], sys.argv[2]
{peak}

def measured(cp):
    try:  # each save's own peak, where Linux allows it
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    cp.save_sync(path)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_mib": peak()}), flush=True)

with Checkpoint(uri, incremental=True) as cp:
    measured(cp)
    sys.stdin.readline()
    measured(cp)
""".replace("{peak}", _PEAK)


_MANIFEST_BUILD = """
import os, sys
from array import array
from checkpointio._incremental import _manifest
folders, per = int(sys.argv[1]), 1000
count = folders * per
manifest = _manifest.Manifest()
manifest.pack_names = [os.urandom(16).hex()]
manifest.packs = {manifest.pack_names[0]: 200_000 * count}
manifest.hashes = bytearray(os.urandom(16 * count))
manifest.chunk_pack = array("I", bytes(4 * count))
manifest.offsets = array("Q", range(0, 200_000 * count, 200_000))
manifest.stored = array("I", [150_000]) * count
manifest.sizes = array("I", [200_000]) * count
manifest.codecs = bytearray([1]) * count
manifest.within = array("I", bytes(4 * count))  # each chunk a block of its own
for folder in range(folders):
    manifest.add_entry(f"layer-{folder:04d}", "d", 0o755, 1_700_000_000_000_000_000)
    for number in range(per):
        chunk = folder * per + number
        manifest.add_entry(f"layer-{folder:04d}/shard-{number:05d}.bin", "f", 0o644, 1_700_000_000_000_000_000 + chunk,
                           200_000, 10**6 + chunk)
        manifest.used.append(chunk)
        manifest.first[-1] = len(manifest.used)
with open(sys.argv[2], "wb") as out:
    out.write(_manifest.encode(manifest))
"""

_MANIFEST_DECODE = """
import json, resource, sys, time
from checkpointio._incremental import _manifest
data = open(sys.argv[1], "rb").read()
{peak}
before = peak()
started = time.perf_counter()
manifest = _manifest.decode(data, sys.argv[1], check_tree=sys.argv[2] == "1")
seconds = time.perf_counter() - started
after = peak()
print(json.dumps({"seconds": seconds, "entries": manifest.entry_count, "rss_mib": after, "extra_mib": after - before}))
""".replace("{peak}", _PEAK)


def _manifest_memory(scratch: Path, files: int) -> dict[str, Any]:
    """Build a manifest of ``files`` one-chunk files, then decode it as a restore and as a save's
    parent, each in a fresh process: its size, the peak RSS the decoding added, the time."""
    path = scratch / "manifest.bin"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", _MANIFEST_BUILD, str(max(1, files // 1000)), str(path)], env=env, cwd=ROOT, check=True
    )
    result: dict[str, Any] = {"bytes": path.stat().st_size}
    for label, check in (("restore", "1"), ("parent", "0")):
        done = subprocess.run(
            [sys.executable, "-c", _MANIFEST_DECODE, str(path), check],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        result[label] = json.loads(done.stdout.strip().splitlines()[-1])
    path.unlink()
    return result


def _objects(store: Path) -> dict[str, tuple[int, int, int]]:
    found = {}
    for path in store.rglob("*"):
        if path.is_file():
            st = path.stat()
            found[str(path)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def _step(op: str, uri: str, path: Path, incremental: bool, store: Path, code: Path = ROOT) -> dict[str, Any]:
    """One save or load in a child process running the checkpointio of the source tree ``code``."""
    before = _objects(store)
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(  # in ``code``: ``python -c`` puts the working folder first on sys.path
        [sys.executable, "-c", _CHILD, op, uri, str(path), "1" if incremental else "0"],
        env=env,
        cwd=code,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{op} {uri} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    after = _objects(store)
    result["uploaded"] = sum(size for name, (*_, size) in after.items() if before.get(name) != after[name])
    return result


def _warm(uri: str, path: Path, store: Path, change: Any, code: Path = ROOT) -> tuple[dict[str, Any], dict[str, Any]]:
    """A first and a second incremental save of ``path`` in one child process (the checkpointio of
    ``code``), ``change()`` run between them; the bytes each uploaded, counted at the store."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    before = _objects(store)
    with subprocess.Popen(
        [sys.executable, "-c", _WARM, uri, str(path)],
        env=env,
        cwd=code,  # python -c puts the working folder first on sys.path
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"save {uri} failed:\n{child.communicate()[1]}")
        first: dict[str, Any] = json.loads(line)
        between = _objects(store)
        first["uploaded"] = sum(size for name, (*_, size) in between.items() if before.get(name) != between[name])
        change()
        child.stdin.write("\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"second save {uri} failed:\n{child.communicate()[1]}")
        second: dict[str, Any] = json.loads(line)
        child.communicate()
    after = _objects(store)
    second["uploaded"] = sum(size for name, (*_, size) in after.items() if between.get(name) != after[name])
    return first, second


def _same_tree(one: Path, other: Path) -> None:
    done = subprocess.run(["diff", "-r", "--no-dereference", "-q", str(one), str(other)], capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"restore differs:\n{done.stdout.decode()[:2000]}")


def _tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def _mutate(
    root: Path, rng: random.Random, undo: list[tuple[Path, bytes | None, int]] | None = None
) -> tuple[int, int, int]:
    """1% of the files modified in place, 0.5% added, 0.5% deleted; with ``undo``, what
    :func:`_undo` needs to bring the tree back (contents and mtimes; deleted files get new inodes)."""
    files = sorted(path for path in root.rglob("*") if path.is_file())
    count = len(files)
    picked = rng.sample(files, max(1, count // 100) + 2 * max(1, count // 200))
    modified = picked[: max(1, count // 100)]
    deleted = picked[len(modified) : len(modified) + max(1, count // 200)]
    if undo is not None:
        undo += [(path, path.read_bytes(), path.stat().st_mtime_ns) for path in modified + deleted]
    for path in modified:
        data = bytearray(path.read_bytes())
        at = rng.randrange(len(data))
        data[at : at + 64] = rng.randbytes(64)
        path.write_bytes(bytes(data))
    for path in deleted:
        path.unlink()
    added = max(1, count // 200)
    for number in range(added):
        source = rng.choice(files[:100])
        (source.parent / f"added-{number}.txt").write_bytes(rng.randbytes(64) + source.read_bytes()[::-1])
        if undo is not None:
            undo.append((source.parent / f"added-{number}.txt", None, 0))
    return len(modified), added, len(deleted)


def _undo(undo: list[tuple[Path, bytes | None, int]]) -> None:
    for path, data, mtime in reversed(undo):
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
            os.utime(path, ns=(mtime, mtime))


def _edit_big(path: Path, rng: random.Random) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as out:
        for _ in range(10):
            out.seek(rng.randrange(size - 4096))
            out.write(rng.randbytes(4096))


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


class _Steps:
    """Each step run ``repeat`` times for each version measured (``codes``: label -> source tree),
    the versions alternating in order from one repetition to the next; results by name, in lists."""

    def __init__(self, store: Path, codes: dict[str, Path], repeat: int) -> None:
        self.store, self.codes, self.repeat = store, codes, repeat
        self.results: dict[str, dict[str, list[dict[str, Any]]]] = {label: {} for label in codes}

    def run(
        self, name: str, op: str, key: str, path: Path, incremental: bool = False, same_as: Path | None = None
    ) -> None:
        """``op`` (save or load) of ``path`` at ``<label><key>-<repetition>``; a load is compared with
        ``same_as`` and stays until the scratch folder goes, at the end: on ext4 without a journal,
        creating files for minutes after deleting many is several times slower (the inode allocator
        skips recently deleted inodes), which would slow down whichever restore came next."""
        labels = list(self.codes)
        for rep in range(self.repeat):
            for label in labels if rep % 2 == 0 else labels[::-1]:
                uri = str(self.store / f"{label}{key}-{rep}")
                target = path.with_name(f"{path.name}-{label}{rep}") if op == "load" else path
                step = _step(op, uri, target, incremental, self.store, self.codes[label])
                if op == "load":
                    assert same_as is not None
                    _same_tree(same_as, target)
                self.results[label].setdefault(name, []).append(step)

    def run_warm(self, names: tuple[str, str], key: str, path: Path, seed: int) -> None:
        """Two incremental saves of ``path`` in one process, the tree changed between them by
        :func:`_mutate` with ``seed`` (and brought back after), at ``<label><key>-<repetition>``."""
        labels = list(self.codes)
        for rep in range(self.repeat):
            for label in labels if rep % 2 == 0 else labels[::-1]:
                undo: list[tuple[Path, bytes | None, int]] = []
                try:
                    steps = _warm(
                        str(self.store / f"{label}{key}-{rep}"),
                        path,
                        self.store,
                        functools.partial(_mutate, path, random.Random(seed), undo),
                        self.codes[label],
                    )
                finally:
                    _undo(undo)
                for name, step in zip(names, steps, strict=True):
                    self.results[label].setdefault(name, []).append(step)


def _median(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over repetitions (each figure on its own)."""
    return {key: statistics.median(step[key] for step in steps) for key in steps[0]}


def main() -> None:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small datasets (CI)")
    parser.add_argument("--small-files", type=int)
    parser.add_argument("--small-mib", type=float)
    parser.add_argument("--big-mib", type=float)
    parser.add_argument("--tensor-mib", type=float)
    parser.add_argument("--manifest-files", type=int, help="files in the manifest whose decoding is measured")
    parser.add_argument("--repeat", type=int, default=1, help="run each save and restore this many times (medians)")
    parser.add_argument(
        "--compare",
        type=Path,
        help="also run the small-file and tensor steps with the checkpointio of this source tree (a checkout)",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    small_files = args.small_files or (2000 if args.quick else 50_000)
    small_mib = args.small_mib or (13.0 if args.quick else 328.0)
    big_mib = args.big_mib or (32.0 if args.quick else 1024.0)
    tensor_mib = args.tensor_mib or (24.0 if args.quick else 770.0)
    manifest_files = args.manifest_files or (50_000 if args.quick else 1_000_000)
    scratch = Path(tempfile.mkdtemp(prefix="checkpointio-incbench-", dir=args.workdir)).resolve()
    rng = random.Random(21)
    codes = {"": ROOT} | ({"before-": args.compare.resolve()} if args.compare else {})
    results: dict[str, Any] = {}
    try:
        store = scratch / "store"
        store.mkdir()
        data = scratch / "data"
        small = make_small_files(data / "small", small_files, small_mib).path
        big_folder = data / "big"
        make_big_file(big_folder / "weights.f32", big_mib)
        tensors = make_tensor_tree(data / "tensors", tensor_mib).path
        steps = _Steps(store, codes, max(1, args.repeat))

        # small-file tree
        steps.run("tar", "save", "small-tar", small)
        steps.run("first", "save", "small-inc", small, True)
        steps.run_warm(("warm_first", "warm_second"), "small-warm", small, 21)
        changes = _mutate(small, rng)  # the changes run_warm made and undid (rng is Random(21) so far)
        steps.run("second", "save", "small-inc", small, True)
        steps.run("tar_again", "save", "small-tar", small)
        # restores (the mutated tree, both formats)
        steps.run("restore_tar", "load", "small-tar", scratch / "restore-small", same_as=small)
        steps.run("restore_inc", "load", "small-inc", scratch / "restore-small", same_as=small)

        # tensor directory
        steps.run("t_tar", "save", "tensors-tar", tensors)
        steps.run("t_first", "save", "tensors-inc", tensors, True)
        layer = sorted(tensors.rglob("mlp_up.f32"))[0]
        layer.write_bytes(rng.randbytes(layer.stat().st_size))
        steps.run("t_second", "save", "tensors-inc", tensors, True)
        steps.run("t_tar_again", "save", "tensors-tar", tensors)
        steps.run("t_restore_tar", "load", "tensors-tar", scratch / "restore-tensors", same_as=tensors)
        steps.run("t_restore_inc", "load", "tensors-inc", scratch / "restore-tensors", same_as=tensors)
        for label, measured in steps.results.items():
            results[label or "after"] = {name: _median(runs) for name, runs in measured.items()} | {
                "changes": changes,
                "layer_bytes": layer.stat().st_size,
                "runs": measured,
            }

        # big file (this version only)
        big_first = _step("save", str(store / "big-inc"), big_folder, True, store)
        _edit_big(big_folder / "weights.f32", rng)
        big_second = _step("save", str(store / "big-inc"), big_folder, True, store)
        out = scratch / "restore-big"
        big_restore = _step("load", str(store / "big-inc"), out, False, store)
        _same_tree(big_folder, out)
        shutil.rmtree(out)
        results["big"] = {"first": big_first, "second": big_second, "restore": big_restore}
        results["manifest"] = _manifest_memory(scratch, manifest_files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"each step's median of {max(1, args.repeat)}; load average at the end: {os.getloadavg()[0]:.1f}")
    for label in codes:
        name = label or "after"
        if args.compare:
            print(f"\n## {'this version' if not label else f'{args.compare}'}")
        _report(results[name], small_files, small_mib, tensor_mib)
    _report_big(results, big_mib)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _report(small: dict[str, Any], small_files: int, small_mib: float, tensor_mib: float) -> None:
    tar, first, second = small["tar"], small["first"], small["second"]
    modified, added, deleted = small["changes"]
    print(
        f"small-file tree: {small_files} files, {small_mib:g} MiB; "
        f"then {modified} modified, {added} added, {deleted} deleted"
    )
    print("| step | wall s | CPU s | uploaded MiB | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for label, step in (
        ("tar.gz save", tar),
        ("first incremental save", first),
        ("second incremental save (a fresh process)", second),
        ("first incremental save, in the process of the next row", small["warm_first"]),
        ("second incremental save, same process and Checkpoint as the first", small["warm_second"]),
        ("tar.gz save of the changed tree", small["tar_again"]),
        ("tar.gz restore", small["restore_tar"]),
        ("incremental restore", small["restore_inc"]),
        ("tensors: tar.gz save", small["t_tar"]),
        ("tensors: first incremental save", small["t_first"]),
        ("tensors: second incremental save (one layer rewritten)", small["t_second"]),
        ("tensors: tar.gz restore", small["t_restore_tar"]),
        ("tensors: incremental restore", small["t_restore_inc"]),
    ):
        print(
            f"| {label} | {_fmt(step['seconds'])} | {_fmt(step['cpu'])} | {_fmt(step['uploaded'] / MiB)} "
            f"| {_fmt(step['rss_mib'], 0)} |"
        )
    print(
        f"second save / full incremental save: uploaded {_fmt(100 * second['uploaded'] / first['uploaded'], 1)}%, "
        f"wall {_fmt(100 * second['seconds'] / first['seconds'], 1)}% "
        f"(vs the tar.gz save: {_fmt(100 * second['uploaded'] / tar['uploaded'], 1)}%, "
        f"{_fmt(100 * second['seconds'] / tar['seconds'], 1)}%); first incremental / tar.gz wall: "
        f"{_fmt(first['seconds'] / tar['seconds'])}x"
    )
    warm = small["warm_second"]
    print(
        f"second save in the first save's process: wall {_fmt(100 * warm['seconds'] / first['seconds'], 1)}% "
        f"of the first incremental save (its own process; CPU {_fmt(100 * warm['cpu'] / first['cpu'], 1)}%), "
        f"{_fmt(100 * warm['seconds'] / small['warm_first']['seconds'], 1)}% of the first save in the same process; "
        f"uploaded {_fmt(100 * warm['uploaded'] / first['uploaded'], 1)}%"
    )
    ratio = small["restore_tar"]["seconds"] / small["restore_inc"]["seconds"]
    t_ratio = small["t_restore_tar"]["seconds"] / small["t_restore_inc"]["seconds"]
    print(f"restore throughput, incremental / tar.gz: small files {_fmt(ratio)}x, tensors {_fmt(t_ratio)}x")
    print(
        f"tensor directory ({tensor_mib:g} MiB), one layer file ({_fmt(small['layer_bytes'] / MiB)} MiB) rewritten: "
        f"second save uploaded {_fmt(small['t_second']['uploaded'] / MiB)} MiB "
        f"(tar.gz save: {_fmt(small['t_tar']['uploaded'] / MiB)} MiB)"
    )


def _report_big(results: dict[str, Any], big_mib: float) -> None:
    big = results["big"]
    print(
        f"big file ({big_mib:g} MiB), 10 scattered 4 KiB edits: second save uploaded "
        f"{_fmt(big['second']['uploaded'] / MiB)} MiB = {_fmt(100 * big['second']['uploaded'] / (big_mib * MiB), 2)}% "
        f"of the file in {_fmt(big['second']['seconds'])} s (first: {_fmt(big['first']['seconds'])} s); "
        f"peak RSS {_fmt(max(big['first']['rss_mib'], big['second']['rss_mib'], big['restore']['rss_mib']), 0)} MiB"
    )
    manifest = results["manifest"]
    restore, parent = manifest["restore"], manifest["parent"]
    print(
        f"manifest of {restore['entries']:,} entries: {_fmt(manifest['bytes'] / 1e6, 1)} MB; decoded and checked "
        f"for a restore: +{_fmt(restore['extra_mib'], 0)} MiB peak RSS ({_fmt(restore['rss_mib'], 0)} MiB in all), "
        f"{_fmt(restore['seconds'])} s; read as a save's parent: +{_fmt(parent['extra_mib'], 0)} MiB, "
        f"{_fmt(parent['seconds'])} s"
    )


if __name__ == "__main__":
    main()
