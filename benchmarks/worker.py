"""Child process that runs one measured Python operation and reports how long it took.

The runner starts ``python -m benchmarks.worker SPEC_JSON`` for every checkpointio or boto3
operation, so that each one has its own peak RSS (read by the parent from ``os.wait4``) and starts
from a cold interpreter like a real task would. Wall and CPU time are measured here, around the
operation only (imports and interpreter start-up excluded); CPU time is ``getrusage(RUSAGE_SELF)``
and covers every thread of the process.

The result is written as JSON to ``SPEC["result"]``: ``{"wall": s, "cpu": s, ...}``, or
``{"unsupported": message}`` when checkpointio refused an option with ``TypeError`` (an option
that this version does not have yet). checkpointio's steps also report the CPU time of each of
their threads, by the threads' names (``cpu_<group>``, see :class:`ThreadCPU`).

``SPEC["root"]``, when given, is a source tree whose ``checkpointio`` is imported instead of the
one on the path (the runner's ``--compare``: the same run measures another version).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Spec = dict[str, Any]
Result = dict[str, Any]

#: Event-loop probe: the ticker sleeps this long and records the longest time between two ticks.
TICK = 0.010


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(operation: Callable[[], object], *, per_thread: bool = False) -> Result:
    """Wall and CPU time of ``operation()``; with ``per_thread``, also its threads' CPU by group."""
    result: Result = {}
    with _per_thread(result) if per_thread else contextlib.nullcontext():
        cpu, start = _cpu(), time.perf_counter()
        operation()
        wall, cpu = time.perf_counter() - start, _cpu() - cpu
    return {"wall": wall, "cpu": cpu, **result}


#: Thread name -> the stage it is reported as (checkpointio names the threads of its pipeline).
THREAD_GROUPS = {
    "checkpointio-loop": "loop",
    "checkpointio-receiver": "receivers",
    "checkpointio-reader": "reader",
    "checkpointio-writer": "writers",
    "checkpointio-codec": "codec",
    "AnyIO worker thread": "workers",
    "MainThread": "main",
}
#: Every group a step reports, in table order; ``exited`` is CPU of threads that ended between two
#: samples (the process's CPU time less what the samples saw).
GROUPS = ("loop", "receivers", "reader", "writers", "codec", "workers", "main", "other", "exited")


class ThreadCPU:
    """Samples every thread's CPU clock (``pthread_getcpuclockid``) every few milliseconds and
    adds each thread's CPU time since the last sample to the group its *current* name belongs to
    (a pooled thread renamed while it runs one stage is counted there for that while).

    The cost is a few microseconds per thread and sample, on a thread of its own; CPU used by a
    thread that ends between two samples is reported as ``exited``.
    """

    def __init__(self, interval: float = 0.004) -> None:
        self._interval = interval
        self._last: dict[int, float] = {}
        self.groups: dict[str, float] = dict.fromkeys(GROUPS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._own = 0.0

    def _sample(self) -> None:
        for thread in threading.enumerate():
            ident = thread.ident
            if ident is None or thread is self._thread:
                continue
            try:
                now = time.clock_gettime(time.pthread_getcpuclockid(ident))
            except (OSError, ProcessLookupError):  # ended since enumerate()
                continue
            before = self._last.get(ident)
            self._last[ident] = now
            if before is not None:
                group = THREAD_GROUPS.get(thread.name, "other")
                self.groups[group] += now - before

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()
        self._own = time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)

    def __enter__(self) -> ThreadCPU:
        self._sample()  # the baseline of the threads already there
        self._cpu = _cpu()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        seen = sum(self.groups.values())
        self.groups["exited"] = max(0.0, _cpu() - self._cpu - seen - self._own)


@contextlib.contextmanager
def _per_thread(result: Result) -> Iterator[None]:
    """Add ``cpu_<group>`` entries for the threads' CPU time during the block to ``result``."""
    with ThreadCPU() as threads:
        yield
    result.update({f"cpu_{group}": round(seconds, 4) for group, seconds in threads.groups.items()})


def _checkpoint(spec: Spec, **kwargs: Any) -> Any:
    """A Checkpoint with the spec's options; ``TypeError`` means an option is not accepted."""
    from checkpointio import Checkpoint

    if str(spec["dest"]).startswith("s3://"):
        # checkpointio imports its S3 store (aiobotocore, ~0.4 s) on first use; import it now,
        # outside the clock, as the boto3 rows import boto3 before theirs.
        import checkpointio._stores._s3  # noqa: F401

    return Checkpoint(spec["dest"], **kwargs, **spec.get("options", {}))


async def _with_ticker(cold: Callable[[], Any], warm: Callable[[], Any]) -> Result:
    """Await ``cold()`` then ``warm()`` while a coroutine ticks every 10 ms; report the longest gap
    between two ticks during each. The first call creates the S3 client, the second reuses it."""
    worst = 0.0
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal worst, ticks
        last = time.perf_counter()
        while running:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            worst, ticks, last = max(worst, now - last), ticks + 1, now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    result: Result = {}
    for suffix, operation in (("", cold), ("_warm", warm)):
        worst = 0.0
        cpu, start = _cpu(), time.perf_counter()
        await operation()
        result[f"wall{suffix}"] = time.perf_counter() - start
        result[f"cpu{suffix}"] = _cpu() - cpu
        result[f"worst_gap{suffix}_ms"] = worst * 1000
    running = False
    await task
    return {**result, "ticks": ticks}


def ours_save(spec: Spec) -> Result:
    """checkpointio ``save_sync`` (or ``await save`` with the ticker) of a path or of its bytes."""
    try:
        checkpoint = _checkpoint(spec)
    except TypeError as error:
        return {"unsupported": str(error)}
    source = Path(spec["src"])
    # as_bytes: read before the clock starts, as the bytes are the task's state already in memory
    data: bytes | Path = source.read_bytes() if spec.get("as_bytes") else source
    if spec.get("ticker"):
        return asyncio.run(_with_ticker(lambda: checkpoint.save(data), lambda: checkpoint.save(data)))
    return _timed(lambda: checkpoint.save_sync(data), per_thread=True)


def ours_load(spec: Spec) -> Result:
    """checkpointio ``load_sync`` (or ``await load`` with the ticker) into ``spec["workspace"]``."""
    try:
        checkpoint = _checkpoint(spec, src=spec["src"], workspace=spec["workspace"])
    except TypeError as error:
        return {"unsupported": str(error)}
    if spec.get("ticker"):
        again = _checkpoint(spec, src=spec["src"], workspace=spec["workspace"] + "-warm")  # left for the runner
        return asyncio.run(_with_ticker(checkpoint.load, again.load))

    if not spec.get("as_bytes"):
        return _timed(checkpoint.load_sync, per_thread=True)
    # as_bytes: the bytes back in memory, as a task restoring its state would want them
    # (load_bytes: no payload file in between); written out after the clock for the verification.
    loaded: list[bytearray | None] = []
    result = _timed(lambda: loaded.append(checkpoint.load_bytes_sync()), per_thread=True)
    data = loaded[0]
    if data is None:
        raise RuntimeError(f"{spec['src']}: no checkpoint to load")
    Path(spec["workspace"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["workspace"]) / "payload").write_bytes(data)
    return result


def _boto3_client_factory() -> Callable[[], Any]:
    """Import boto3 now (outside the clock); the client itself is made inside it, as ours is."""
    import boto3
    from botocore.config import Config

    def make() -> Any:
        return boto3.client(
            "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"], config=Config(s3={"addressing_style": "path"})
        )

    return make


def tarfile_save(spec: Spec) -> Result:
    """``tarfile`` ``w:gz`` at ``spec["level"]`` into a temporary file, then boto3 ``upload_file``."""
    make_client = _boto3_client_factory()

    def save() -> None:
        client = make_client()
        with tempfile.TemporaryDirectory(dir=spec["tmp"]) as tmp:
            archive = Path(tmp) / "checkpoint.tar.gz"
            with tarfile.open(archive, "w:gz", compresslevel=spec["level"]) as tar:
                tar.add(spec["src"], arcname=".")
            client.upload_file(str(archive), spec["bucket"], spec["key"])

    return _timed(save)


def tarfile_load(spec: Spec) -> Result:
    """boto3 ``download_file`` into a temporary file, then ``tarfile`` extraction."""
    make_client = _boto3_client_factory()

    def load() -> None:
        client = make_client()
        with tempfile.TemporaryDirectory(dir=spec["tmp"]) as tmp:
            archive = Path(tmp) / "checkpoint.tar.gz"
            client.download_file(spec["bucket"], spec["key"], str(archive))
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(spec["workspace"], filter="data")

    return _timed(load)


def idle(spec: Spec) -> Result:
    """Import checkpointio and its S3 client library and do nothing: the RSS floor of a worker."""
    import aiobotocore.session  # noqa: F401

    import checkpointio  # noqa: F401

    return {"wall": 0.0, "cpu": 0.0}


def ticker_floor(spec: Spec) -> Result:
    """The longest gap of the same 10 ms ticker, alone, while one busy process per core competes:
    what the operating system's scheduling alone costs a ticker when the cores are saturated (as
    they are during a transfer, with the S3 server on the same cores). Nothing of checkpointio runs."""
    import subprocess

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        seconds = float(spec.get("seconds", 3))
        result = asyncio.run(_with_ticker(lambda: asyncio.sleep(seconds), lambda: asyncio.sleep(0)))
    finally:
        for process in busy:  # ours, by their PIDs
            process.kill()
            process.wait()
    return {"wall": result["wall"], "cpu": 0.0, "worst_gap_ms": result["worst_gap_ms"]}


OPERATIONS: dict[str, Callable[[Spec], Result]] = {
    "ours_save": ours_save,
    "ours_load": ours_load,
    "tarfile_save": tarfile_save,
    "tarfile_load": tarfile_load,
    "idle": idle,
    "ticker_floor": ticker_floor,
}


#: Memory tweaks of checkpointio that a step can turn off (``spec["without"]``), each replaced by
#: what the library would do without it: a zeroed ``bytearray``, no prefaulting.
TWEAKS: dict[str, Callable[..., Any]] = {
    "unfilled_bytearray": bytearray,
    "prefault": lambda buffer: None,
}


def _turn_off(names: list[str]) -> None:
    """Replace the named tweaks in the module that owns them; fail if one is no longer there."""
    if not names:
        return
    from checkpointio import _allocator as owner

    for name in names:
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(f"{owner.__name__} has no {name}: update benchmarks/worker.py TWEAKS")
        setattr(owner, name, TWEAKS[name])


def main() -> None:
    """Run ``OPERATIONS[spec["op"]]`` and write its result where ``spec["result"]`` says."""
    spec: Spec = json.loads(sys.argv[1])
    if spec.get("root"):  # another version of checkpointio, imported instead of the one on the path
        sys.path.insert(0, spec["root"])
    os.environ.update(spec.get("env", {}))  # before checkpointio reads it
    _turn_off(spec.get("without", []))
    result = OPERATIONS[spec["op"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
