"""The task runtime: retries, ctx(), attempt-to-attempt restore, resume after SIGKILL; every store."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import checkpointio
from checkpointio import (
    AttemptFailure,
    Checkpoint,
    NoCheckpointError,
    TaskEnvironment,
    TransferConfig,
    _manage,
    ctx,
    default_storage,
    latest_checkpoint,
)
from checkpointio._stores import Kind

from .conftest import ONE_STORE, MotoServer, StoreCase, age_keeping_records, make_tree, snapshot

ROOT = Path(__file__).resolve().parent.parent


def environment(store: StoreCase, **kwargs: Any) -> TaskEnvironment:
    return TaskEnvironment("tests", storage=store.uri("root"), **kwargs)


def test_ctx_outside_a_task_is_falsy_and_empty() -> None:
    context = ctx()
    assert not context
    assert (context.checkpoint_or_none, context.attempt, context.run_id, context.task_name) == (None, None, None, None)
    # Typed Checkpoint, never None: outside a task it raises instead of failing later on None.
    with pytest.raises(NoCheckpointError, match=r"^ctx\(\).checkpoint used outside a task: only an @env.task"):
        _ = context.checkpoint


def wrong(value: object) -> Any:
    """``value`` typed as anything: a value of the wrong type, passed on purpose."""
    return value


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: TaskEnvironment(backoff=-1.0),
            ValueError,
            "backoff must be a finite number of seconds >= 0, got -1.0",
        ),
        (lambda: TaskEnvironment(backoff=float("nan")), ValueError, "backoff must be a finite number of seconds"),
        (lambda: TaskEnvironment().task(backoff=float("inf")), ValueError, "backoff must be a finite number"),
        (lambda: TaskEnvironment(backoff=wrong("1s")), TypeError, "backoff must be a number of seconds, got str '1s'"),
        (lambda: TaskEnvironment().task(retries=wrong(2.5)), TypeError, "retries must be an int, got float 2.5"),
        (lambda: TaskEnvironment().task(retries=wrong("3")), TypeError, "retries must be an int, got str '3'"),
        (lambda: TaskEnvironment().task(retries=True), TypeError, "retries must be an int, got bool True"),
        (lambda: TaskEnvironment(keep_last=wrong("2")), TypeError, "keep_last must be an int or None, got str '2'"),
        (lambda: TaskEnvironment(keep_runs=wrong(1.5)), TypeError, "keep_runs must be an int or None, got float 1.5"),
    ],
)
def test_retry_and_retention_settings_of_the_wrong_type_or_range_are_refused_when_made(
    make: Any, error: type[Exception], message: str
) -> None:
    """Not at the first retry, where a negative backoff failed the run with asyncio's 'sleep
    length must be non-negative' instead of retrying it."""
    with pytest.raises(error, match=re.escape(message)):
        make()


class Count:
    """A whole number of another integer type (as numpy's are): ``__index__`` makes it one."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_whole_numbers_of_any_integer_type_are_counts() -> None:
    env = TaskEnvironment(keep_last=wrong(Count(2)), keep_runs=wrong(Count(3)))
    assert (env.keep_last, env.keep_runs) == (2, 3)
    assert type(env.keep_last) is int and type(env.keep_runs) is int
    attempts = []

    @env.task(retries=wrong(Count(2)))
    def flaky() -> int:
        attempts.append(ctx().attempt)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return len(attempts)

    assert flaky() == 3
    assert attempts == [0, 1, 2]


def test_a_backoff_of_whole_seconds_and_zero_retries_are_fine() -> None:
    env = TaskEnvironment(backoff=0)

    @env.task(retries=0, backoff=1)
    def task() -> int:
        return 7

    assert task() == 7


def test_the_ready_default_environment_is_importable() -> None:
    from checkpointio import env

    assert isinstance(env, TaskEnvironment) and env.name == "default"


def test_sync_task_retries_and_resumes_from_its_bytes(store: StoreCase) -> None:
    seen: list[tuple[int, int]] = []

    @environment(store).task(retries=3)
    def count(target: int) -> int:
        context = ctx()
        assert context.checkpoint is not None and context.task_name == "count"
        previous = context.checkpoint.load_sync()
        value = int(previous.read_text()) if previous else 0
        seen.append((context.attempt or 0, value))
        while value < target:
            value += 1
            if context.attempt == 0 and value == 5:
                raise RuntimeError("boom")
            context.checkpoint.save_sync(str(value).encode())
        return value

    assert count(8) == 8
    assert seen == [(0, 0), (1, 4)]


async def test_async_task_retries_and_resumes_its_directory(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    restored_trees: list[dict[str, tuple[str, object, int, int]]] = []

    @environment(store).task(retries=2)
    async def train() -> str:
        context = ctx()
        assert context.checkpoint is not None
        restored = await context.checkpoint.load()
        if context.attempt == 0:
            assert restored is None
            await context.checkpoint.save(tree)
            raise ConnectionError("lost the node")
        assert restored is not None
        restored_trees.append(snapshot(restored))
        found = latest_checkpoint(restored, "**/*.bin")
        assert found is not None
        return found.name

    assert await train() == "weights.bin"
    assert restored_trees == [snapshot(tree)]


def test_a_file_checkpoint_restores_in_the_next_attempt(store: StoreCase, tmp_path: Path) -> None:
    state = tmp_path / "state.json"

    @environment(store).task(retries=1)
    def job() -> dict[str, int]:
        context = ctx()
        assert context.checkpoint is not None
        previous = context.checkpoint.load_sync()
        if previous is None:
            state.write_text(json.dumps({"step": 7}))
            context.checkpoint.save_sync(state)
            raise RuntimeError("first attempt dies")
        stored: dict[str, int] = json.loads(previous.read_text())
        return stored

    assert job() == {"step": 7}


def test_an_attempt_that_saved_nothing_is_skipped(store: StoreCase) -> None:
    loaded: list[bytes | None] = []

    @environment(store).task(retries=2)
    def job() -> None:
        context = ctx()
        assert context.checkpoint is not None
        previous = context.checkpoint.load_sync()
        loaded.append(previous.read_bytes() if previous else None)
        if context.attempt == 0:
            context.checkpoint.save_sync(b"from attempt 0")
        if context.attempt in (0, 1):  # attempt 1 fails without saving
            raise RuntimeError(f"attempt {context.attempt}")

    job()
    assert loaded == [None, b"from attempt 0", b"from attempt 0"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(
    store: StoreCase, caplog: pytest.LogCaptureFixture
) -> None:
    loaded: list[bytes | None] = []

    @environment(store, run_id="run-1").task(retries=2)
    def job() -> None:
        context = ctx()
        assert context.checkpoint is not None
        previous = context.checkpoint.load_sync()
        loaded.append(previous.read_bytes() if previous else None)
        if context.attempt == 0:
            context.checkpoint.save_sync(b"old but valid" * 1000)
            raise RuntimeError("attempt 0")
        if context.attempt == 1:
            context.checkpoint.save_sync(b"new" * 1000)
            store.corrupt("root/tests/job/run-1/attempt-1")
            raise RuntimeError("attempt 1")

    job()
    assert loaded == [None, b"old but valid" * 1000, b"old but valid" * 1000]
    assert "skipping corrupt checkpoint" in caplog.text and "attempt-1" in caplog.text


@ONE_STORE
def test_retries_zero_means_no_checkpoint_and_no_retry(store: StoreCase) -> None:
    calls: list[object] = []

    @environment(store).task
    def plain() -> None:
        calls.append(ctx().checkpoint_or_none)
        with pytest.raises(NoCheckpointError, match=r"in task 'plain', which has retries=0"):
            _ = ctx().checkpoint
        raise ValueError("once")

    with pytest.raises(ValueError, match="once"):
        plain()
    assert calls == [None]


@ONE_STORE
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_interrupts_are_never_retried(store: StoreCase, error: type[BaseException]) -> None:
    calls: list[int] = []

    @environment(store).task(retries=3)
    def job() -> None:
        calls.append(1)
        raise error()

    with pytest.raises(error):
        job()
    assert calls == [1]


@ONE_STORE
async def test_cancellation_is_never_retried(store: StoreCase) -> None:
    calls: list[int] = []

    @environment(store).task(retries=3)
    async def job() -> None:
        calls.append(1)
        await anyio.sleep(60)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(job)
            while not calls:
                await anyio.sleep(0.01)
            scope.cancel()
    await anyio.sleep(0.1)
    assert calls == [1]


@ONE_STORE
def test_the_last_error_carries_the_attempt_history(store: StoreCase) -> None:
    @environment(store).task(retries=2)
    def always_fails() -> None:
        raise RuntimeError(f"attempt {ctx().attempt}")

    with pytest.raises(RuntimeError, match="attempt 2") as caught:
        always_fails()
    history = caught.value.attempts  # type: ignore[attr-defined]  # set by the runtime on the task's own error
    assert [(failure.attempt, str(failure.error)) for failure in history] == [
        (0, "attempt 0"),
        (1, "attempt 1"),
        (2, "attempt 2"),
    ]
    assert all(isinstance(failure, AttemptFailure) for failure in history)


@ONE_STORE
def test_backoff_doubles_between_attempts(store: StoreCase, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)

    @environment(store).task(retries=3, backoff=0.5)
    def flaky() -> str:
        if (ctx().attempt or 0) < 3:
            raise RuntimeError("not yet")
        return "ok"

    assert flaky() == "ok"
    assert slept == [0.5, 1.0, 2.0]


def test_the_decorator_keeps_name_docstring_and_signature() -> None:
    task_env = TaskEnvironment("sig", storage="memory://sig")

    @task_env.task(retries=1)
    def documented(a: int, b: str = "x") -> str:
        """Docs survive."""
        return f"{a}{b}"

    @task_env.task(retries=1)
    async def documented_async(a: int) -> int:
        """Async docs survive."""
        return a

    assert documented.__name__ == "documented" and documented.__doc__ == "Docs survive."
    assert str(inspect.signature(documented)) == "(a: 'int', b: 'str' = 'x') -> 'str'"  # postponed annotations
    assert inspect.iscoroutinefunction(documented_async) and documented_async.__doc__ == "Async docs survive."
    assert documented(1) == "1x"


@ONE_STORE
async def test_ctx_reaches_worker_threads_the_task_starts(store: StoreCase) -> None:
    @environment(store).task(retries=1, name="threaded")
    async def job() -> list[str | None]:
        return [
            await anyio.to_thread.run_sync(lambda: ctx().task_name),
            await asyncio.to_thread(lambda: ctx().task_name if ctx().run_id is not None else None),
            ctx().task_name if ctx().checkpoint_or_none is not None else None,
        ]

    assert await job() == ["threaded", "threaded", "threaded"]
    assert not ctx()


def test_an_explicit_run_id_continues_the_run_across_calls(store: StoreCase) -> None:
    attempts: list[tuple[int, bytes | None]] = []
    run_env = environment(store, run_id="nightly")

    @run_env.task(retries=1)
    def job(fail: bool) -> None:
        context = ctx()
        assert context.checkpoint is not None and context.run_id == "nightly"
        previous = context.checkpoint.load_sync()
        attempts.append((context.attempt or 0, previous.read_bytes() if previous else None))
        context.checkpoint.save_sync(f"saved by attempt {context.attempt}".encode())
        if fail:
            raise RuntimeError("fails")

    with pytest.raises(RuntimeError):
        job(True)
    job(False)  # like a restarted process: numbering carries on, newest checkpoint restored
    assert attempts == [(0, None), (1, b"saved by attempt 0"), (2, b"saved by attempt 1")]


def test_a_run_folder_that_cannot_be_listed_fails_the_task_instead_of_restarting_it(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    run_env = TaskEnvironment("tests", storage=str(storage), run_id="nightly")
    attempts: list[int] = []

    @run_env.task(retries=1)
    def job() -> None:
        context = ctx()
        assert context.checkpoint is not None
        attempts.append(context.attempt or 0)
        context.checkpoint.save_sync(b"progress worth keeping")

    job()
    saved = sorted(storage.rglob("attempt-0"))
    assert len(saved) == 1
    run_folder = saved[0].parent
    kept = run_folder.with_name("kept")
    run_folder.rename(kept)
    run_folder.symlink_to(run_folder.name)  # a folder listing fails (ELOOP; EACCES or ESTALE alike)
    with pytest.raises(checkpointio.StoreError, match="nightly"):
        job()
    assert attempts == [0]  # no attempt ran as a first one, and nothing was overwritten
    assert (kept / "attempt-0").read_bytes() == b"progress worth keeping"


def test_keep_last_removes_old_attempts_only_after_success(store: StoreCase) -> None:
    @environment(store, run_id="r", keep_last=1).task(retries=3)
    def job() -> None:
        context = ctx()
        assert context.checkpoint is not None
        context.checkpoint.save_sync(f"attempt {context.attempt}".encode())
        if (context.attempt or 0) < 2:
            raise RuntimeError("again")

    job()
    kept = store.list_names("root/tests/job/r/")
    assert kept == ["attempt-2"]


def test_storage_comes_from_argument_then_environment_then_embedded_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CHECKPOINTIO_STORAGE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_storage() == str(tmp_path / "cache" / "checkpointio")
    monkeypatch.setenv("CHECKPOINTIO_STORAGE", "s3://bucket/prefix")
    assert default_storage() == "s3://bucket/prefix"


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_process_killed_with_sigkill_resumes_when_started_again(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "s3":
        server = request.getfixturevalue("moto_server")
        storage = f"s3://{server.new_bucket()}/runs"
    else:
        storage = str(tmp_path / "runs")
    env = {**os.environ, "CHECKPOINTIO_STORAGE": storage, "CHECKPOINTIO_RUN_ID": "killed-run"}
    command = [sys.executable, str(ROOT / "examples" / "persistent_counter.py"), "--target", "6", "--crash-at", "0"]
    last_saved = 0
    with subprocess.Popen([*command, "--step-seconds", "0.1"], env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("saved step"):
                last_saved = int(line.split()[-1])
                if last_saved == 3:
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and last_saved == 3
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "attempt 1 resumed from 3" in rerun.stdout
    assert "saved step 4" in rerun.stdout and "saved step 1\n" not in rerun.stdout
    assert "finished: counted to 6" in rerun.stdout
    if backend == "local":  # the killed process's claim went once the run succeeded
        assert sorted(path.name for path in (tmp_path / "runs").rglob("*.claim")) == []


def test_public_runtime_names_are_exported() -> None:
    for name in ("TaskEnvironment", "ctx", "env", "TaskContext", "AttemptFailure", "default_storage"):
        assert name in checkpointio.__all__


# -- names that become keys -----------------------------------------------------------------------

BAD_NAMES = ["..", ".", "", "a/b", "/", "a\\b", "a\0b"]


@pytest.mark.parametrize("value", BAD_NAMES)
def test_names_that_are_not_one_key_segment_are_refused_naming_the_value_and_its_source(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = "memory://names"
    with pytest.raises(
        checkpointio.InvalidNameError, match=r"environment name .* from TaskEnvironment\(name"
    ) as caught:
        TaskEnvironment(value, storage=storage)
    assert repr(value) in str(caught.value) and isinstance(caught.value, ValueError)
    with pytest.raises(checkpointio.InvalidNameError, match=r"run id .* from TaskEnvironment\(run_id=") as caught:
        TaskEnvironment("ok", storage=storage, run_id=value)
    assert repr(value) in str(caught.value)
    with pytest.raises(checkpointio.InvalidNameError, match=r"task name .* from task\(name=") as caught:
        TaskEnvironment("ok", storage=storage).task(retries=1, name=value)
    assert repr(value) in str(caught.value)
    with pytest.raises(checkpointio.InvalidNameError, match=r"run id .* from task\(run_id=") as caught:
        TaskEnvironment("ok", storage=storage).task(retries=1, run_id=value)
    assert repr(value) in str(caught.value)


# An empty variable means unset; a variable cannot hold NUL.
@pytest.mark.parametrize("value", [name for name in BAD_NAMES if name and "\0" not in name])
def test_a_run_id_from_the_environment_that_is_not_one_key_segment_is_refused_before_anything_is_stored(
    value: str, store: StoreCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINTIO_RUN_ID", value)
    ran: list[str] = []
    task_env = environment(store)

    @task_env.task(retries=1)
    def first() -> None:
        ran.append("first")
        ctx().checkpoint.save_sync(b"first's state")

    @task_env.task(retries=1)
    def second() -> None:
        ran.append("second")

    for task in (first, second):  # with "..", both tasks shared one folder: second restored first's state
        with pytest.raises(checkpointio.InvalidNameError, match="CHECKPOINTIO_RUN_ID") as caught:
            task()
        assert repr(value) in str(caught.value)
    assert ran == [] and store.list_names("root") == []


# -- the storage root -------------------------------------------------------------------------------


@pytest.mark.parametrize("top", ["s3://{bucket}", "s3://{bucket}/"])
def test_the_top_of_a_bucket_is_a_storage_root(top: str, moto_server: MotoServer) -> None:
    bucket = moto_server.new_bucket()
    seen: list[tuple[int, bytes | None]] = []

    @TaskEnvironment("train", storage=top.format(bucket=bucket), run_id="r").task(retries=1)
    def job() -> str:
        context = ctx()
        assert context.checkpoint is not None
        previous = context.checkpoint.load_sync()
        seen.append((context.attempt or 0, previous.read_bytes() if previous else None))
        if context.attempt == 0:
            context.checkpoint.save_sync(b"step 3")
            raise RuntimeError("node lost")
        return "done"

    assert job() == "done"
    assert seen == [(0, None), (1, b"step 3")]
    keys = [item["Key"] for item in moto_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "train/job/r/attempt-0" in keys


def test_a_malformed_storage_root_is_refused_when_the_environment_is_made() -> None:
    with pytest.raises(ValueError, match="s3:///x"):
        TaskEnvironment("e", storage="s3:///x")


# -- attempt numbers are claimed ----------------------------------------------------------------------


async def test_two_concurrent_calls_of_one_run_get_distinct_attempts_and_keys(store: StoreCase) -> None:
    run_env = environment(store, run_id="shared")
    first_running = anyio.Event()
    second_done = anyio.Event()
    attempts: dict[str, int] = {}

    @run_env.task(retries=1)
    async def job(who: str) -> None:
        context = ctx()
        assert context.checkpoint is not None
        attempts[who] = context.attempt or 0
        if who == "first":
            first_running.set()
            await second_done.wait()  # the second call starts while the first has saved nothing yet
        await context.checkpoint.save(f"state of {who}".encode())
        if who == "second":
            second_done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(job, "first")
        await first_running.wait()
        group.start_soon(job, "second")
    assert attempts == {"first": 0, "second": 1}
    names = await anyio.to_thread.run_sync(store.list_names, "root/tests/job/shared/")
    assert names == ["attempt-0", "attempt-1"]  # claims go once a call succeeded; each kept its own key
    assert store.get_raw("root/tests/job/shared/attempt-0") != store.get_raw("root/tests/job/shared/attempt-1")


_RACER = """
import os, sys, time
from pathlib import Path
from checkpointio import TaskEnvironment, ctx

out, go = Path(sys.argv[1]), Path(sys.argv[2])

@TaskEnvironment("race", storage=sys.argv[3]).task(retries=1)
def job():
    out.write_text(str(ctx().attempt))
    while not go.exists():  # save only once every process has picked its attempt
        time.sleep(0.01)
    ctx().checkpoint.save_sync(f"pid {os.getpid()}".encode())

job()
"""


def test_two_processes_with_one_run_id_get_distinct_attempts(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    go = tmp_path / "go"
    env = {**os.environ, "CHECKPOINTIO_RUN_ID": "same-run", "PYTHONPATH": str(ROOT)}
    outputs = [tmp_path / f"attempt-of-{index}" for index in range(3)]
    processes = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(out), str(go), str(storage)], env=env) for out in outputs
    ]
    try:
        while not all(out.exists() and out.read_text() for out in outputs):
            assert all(process.poll() is None for process in processes), "a racer died before picking its attempt"
            time.sleep(0.02)
        go.touch()
        assert [process.wait(timeout=120) for process in processes] == [0, 0, 0]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert sorted(int(out.read_text()) for out in outputs) == [0, 1, 2]
    run = storage / "race" / "job" / "same-run"
    assert sorted(path.name for path in run.iterdir() if not path.name.startswith(".")) == [
        "attempt-0",
        "attempt-1",
        "attempt-2",
    ]
    assert len({path.read_bytes() for path in run.glob("attempt-?")}) == 3


def test_a_failed_run_keeps_its_claims_and_a_restart_numbers_after_them(store: StoreCase) -> None:
    run_env = environment(store, run_id="r")

    @run_env.task(retries=1)
    def job(fail: bool) -> int:
        if fail:
            raise RuntimeError("saved nothing")
        return ctx().attempt or 0

    with pytest.raises(RuntimeError):
        job(True)
    assert store.list_names("root/tests/job/r/") == ["attempt-0.claim", "attempt-1.claim"]
    claim = json.loads(store.get_raw("root/tests/job/r/attempt-1.claim"))
    assert (claim["run_id"], claim["attempt"], claim["pid"]) == ("r", 1, os.getpid())
    listed = anyio.run(_manage.list_checkpoints, store.uri("root/tests/job/r/"), TransferConfig())
    assert [(info.location.key.rpartition("/")[2], info.record and info.record.kind) for info in listed] == [
        ("attempt-0.claim", Kind.BYTES),  # checkpointio's own: `rm --recursive` removes them with the run
        ("attempt-1.claim", Kind.BYTES),
    ]
    assert job(False) == 2  # an attempt that saved nothing still holds its number
    assert store.list_names("root/tests/job/r/") == []  # the run succeeded: the ended call's claims went too


def test_a_succeeded_run_removes_the_claims_of_ended_processes_and_keeps_those_that_may_run(
    store: StoreCase,
) -> None:
    run = "root/tests/job/r"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ended_pid = int(ended.stdout)
    host = socket.gethostname()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as running:
        try:
            claims = [
                (0, {"host": host, "pid": ended_pid}),  # killed: its process is gone
                (1, {"host": host, "pid": running.pid}),  # another process of this run, still running
                (2, {"host": "another-host", "pid": ended_pid}),  # elsewhere: it may be running
            ]
            for attempt, who in claims:
                marker = json.dumps({"run_id": "r", "attempt": attempt, **who}).encode()
                Checkpoint(store.uri(f"{run}/attempt-{attempt}.claim")).save_sync(marker)

            @environment(store, run_id="r").task(retries=1)
            def job() -> int:
                return ctx().attempt or 0

            assert job() == 3
            assert store.list_names(f"{run}/") == ["attempt-1.claim", "attempt-2.claim"]
        finally:
            running.kill()


# -- retention and resuming -----------------------------------------------------------------------------


def _age(folder: Path, seconds: float) -> None:
    """Make everything below ``folder`` look last written ``seconds`` ago."""
    when = time.time() - seconds
    for path in folder.rglob("*"):
        age_keeping_records(path, when)


def _calls_of_a_task_that_fails_once(task_env: TaskEnvironment, calls: int, age: Path | None) -> None:
    @task_env.task(retries=1, name="train")
    def train() -> None:
        context = ctx()
        assert context.checkpoint is not None
        context.checkpoint.save_sync(f"attempt {context.attempt}".encode())
        if context.attempt == 0:
            raise RuntimeError("first attempt fails")

    for _ in range(calls):
        train()
        if age is not None and age.exists():
            _age(age, 2 * 24 * 3600)  # as if each run had ended two days before the next


def test_the_embedded_store_keeps_a_bounded_number_of_runs_and_attempts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CHECKPOINTIO_STORAGE", raising=False)
    monkeypatch.delenv("CHECKPOINTIO_RUN_ID", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    task_root = tmp_path / "cache" / "checkpointio" / "bounded" / "train"
    _calls_of_a_task_that_fails_once(TaskEnvironment("bounded"), 14, age=task_root)
    runs = sorted(task_root.iterdir())
    assert len(runs) == checkpointio._runtime.EMBEDDED_KEEP_RUNS == 10
    assert all(sorted(path.name for path in run.iterdir()) == [".attempt-1.checkpointio", "attempt-1"] for run in runs)


def test_runs_written_within_a_day_are_never_pruned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHECKPOINTIO_STORAGE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _calls_of_a_task_that_fails_once(TaskEnvironment("recent"), 12, age=None)  # e.g. 12 processes at once
    assert len(list((tmp_path / "cache" / "checkpointio" / "recent" / "train").iterdir())) == 12


def test_explicit_storage_keeps_every_run_and_attempt_unless_asked(tmp_path: Path) -> None:
    storage = tmp_path / "given"
    _calls_of_a_task_that_fails_once(TaskEnvironment("kept", storage=storage), 12, age=storage)
    runs = list((storage / "kept" / "train").iterdir())
    assert len(runs) == 12 and all(
        sorted(p.name for p in run.glob("attempt-*")) == ["attempt-0", "attempt-1"] for run in runs
    )


def test_keep_runs_prunes_the_oldest_runs_of_a_task_on_every_store(
    store: StoreCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Private: runs count as idle only after minutes without a write; no public setting shortens that.
    monkeypatch.setattr(checkpointio._runtime, "RUN_IDLE_BEFORE_PRUNING", 0.0)  # every finished run is idle
    for number in range(1, 5):
        task_env = environment(store, run_id=f"run-{number}", keep_runs=2)
        _calls_of_a_task_that_fails_once(task_env, 1, age=None)
        if number == 1:
            store.put_raw("root/tests/train/run-1/notes.txt", b"not the runtime's: never pruned")
    assert store.list_names("root/tests/train/") == [
        "run-1/notes.txt",
        "run-3/attempt-0",
        "run-3/attempt-1",
        "run-4/attempt-0",
        "run-4/attempt-1",
    ]
    if store.name == "local":
        assert (store.root / "root" / "tests" / "train" / "run-1" / "notes.txt").read_bytes().startswith(b"not the")
        assert sorted(path.name for path in (store.root / "root" / "tests" / "train").iterdir()) == [
            "run-1",
            "run-3",
            "run-4",
        ]


def test_the_log_says_where_a_run_is_stored_and_how_to_resume_it(
    store: StoreCase, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHECKPOINTIO_RUN_ID", raising=False)
    caplog.set_level(logging.INFO, logger="checkpointio")
    task_env = environment(store)
    calls: list[int] = []

    @task_env.task(retries=1)
    def job() -> bytes:
        context = ctx()
        assert context.checkpoint is not None
        calls.append(context.attempt or 0)
        previous = context.checkpoint.load_sync()
        if len(calls) <= 2:  # the first call's process, as good as OOM-killed: every attempt fails
            context.checkpoint.save_sync(b"step 41")
            raise RuntimeError("out of memory")
        return previous.read_bytes() if previous else b""

    with pytest.raises(RuntimeError) as caught:
        job()
    lines = [r.getMessage() for r in caplog.records if r.name == "checkpointio._runtime" and r.levelno == logging.INFO]
    assert len(lines) == 2
    found = re.search(r"attempt 0 of run (\S+) saves to (\S+) \(resume with CHECKPOINTIO_RUN_ID=(\S+)\)", lines[0])
    assert found is not None, lines[0]
    run_id = found.group(1)
    assert found.group(3) == run_id and found.group(2) == f"{store.uri('root')}/tests/job/{run_id}/attempt-0"
    if sys.version_info >= (3, 11):
        assert f"checkpointio: resume with CHECKPOINTIO_RUN_ID={run_id}" in caught.value.__notes__
    monkeypatch.setenv("CHECKPOINTIO_RUN_ID", run_id)  # what the log said to do
    assert job() == b"step 41" and calls == [0, 1, 2]


def test_a_task_without_retries_stores_nothing_and_logs_no_run(
    store: StoreCase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="checkpointio")

    @environment(store).task
    def job() -> int:
        return 7

    assert job() == 7
    assert [r for r in caplog.records if r.name == "checkpointio._runtime"] == []
    assert store.list_names("root") == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11's")
@pytest.mark.parametrize(("retries", "said"), [(0, "its one attempt failed"), (1, "all 2 attempts failed")])
def test_the_note_on_a_failed_task_counts_its_attempts_in_words(store: StoreCase, retries: int, said: str) -> None:
    @environment(store).task(retries=retries, backoff=0)
    def job() -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError) as caught:
        job()
    notes = [note for note in getattr(caught.value, "__notes__", []) if " failed (" in note]
    assert len(notes) == 1 and notes[0].startswith(f"checkpointio: {said} (attempt 0: RuntimeError: out of memory")


def test_ctx_knows_rank_and_world_size_and_several_ranks_without_a_process_group_are_refused(
    store: StoreCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (ctx().rank, ctx().world_size) == (None, None)  # outside a task

    @environment(store).task(retries=1)
    def alone() -> tuple[int | None, int | None]:
        return ctx().rank, ctx().world_size

    assert alone() == (0, 1)

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    @environment(store).task(retries=0)
    def no_checkpoint() -> tuple[int | None, int | None]:
        return ctx().rank, ctx().world_size

    assert no_checkpoint() == (1, 2)  # stores nothing: nothing to agree on

    @environment(store).task(retries=1)
    def sharded() -> None:
        raise AssertionError("never runs: its ranks could not agree on an attempt")

    with pytest.raises(checkpointio.CheckpointError, match=r"rank 1 of 2 \(RANK / WORLD_SIZE\).*init_process_group"):
        sharded()


def test_ctx_checkpoint_in_a_thread_that_did_not_inherit_the_task_says_how_to_pass_it_on(tmp_path: Path) -> None:
    import concurrent.futures
    import contextvars

    env = TaskEnvironment("tests", storage=str(tmp_path / "store"))

    @env.task(retries=1)
    def train() -> tuple[str, str]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with pytest.raises(NoCheckpointError) as caught:
                pool.submit(lambda: ctx().checkpoint).result()
            inherited = pool.submit(contextvars.copy_context().run, lambda: ctx().checkpoint).result()
        return str(caught.value), inherited.dest

    message, dest = train()
    assert message.startswith("ctx().checkpoint used outside a task (or in a thread that did not inherit")
    assert "contextvars.copy_context().run" in message
    assert dest.endswith("/attempt-0")
