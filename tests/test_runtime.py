"""The task runtime: retries, ctx(), attempt-to-attempt restore, resume after SIGKILL; every store."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import checkpointio
from checkpointio import AttemptFailure, TaskEnvironment, ctx, default_storage, latest_checkpoint

from .conftest import StoreCase, make_tree, snapshot

ROOT = Path(__file__).resolve().parent.parent


def environment(store: StoreCase, **kwargs: object) -> TaskEnvironment:
    return TaskEnvironment("tests", storage=store.uri("root"), **kwargs)  # type: ignore[arg-type]


def test_ctx_outside_a_task_is_falsy_and_empty() -> None:
    context = ctx()
    assert not context
    assert (context.checkpoint, context.attempt, context.run_id, context.task_name) == (None, None, None, None)


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
    restored_trees: list[dict[str, object]] = []

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
        return latest_checkpoint(restored, "**/*.bin").name  # type: ignore[union-attr]

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
        return json.loads(previous.read_text())  # type: ignore[no-any-return]

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


def test_retries_zero_means_no_checkpoint_and_no_retry(store: StoreCase) -> None:
    calls: list[object] = []

    @environment(store).task
    def plain() -> None:
        calls.append(ctx().checkpoint)
        raise ValueError("once")

    with pytest.raises(ValueError, match="once"):
        plain()
    assert calls == [None]


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


def test_the_last_error_carries_the_attempt_history(store: StoreCase) -> None:
    @environment(store).task(retries=2)
    def always_fails() -> None:
        raise RuntimeError(f"attempt {ctx().attempt}")

    with pytest.raises(RuntimeError, match="attempt 2") as caught:
        always_fails()
    history = caught.value.attempts  # type: ignore[attr-defined]
    assert [(failure.attempt, str(failure.error)) for failure in history] == [
        (0, "attempt 0"),
        (1, "attempt 1"),
        (2, "attempt 2"),
    ]
    assert all(isinstance(failure, AttemptFailure) for failure in history)


def test_backoff_doubles_between_attempts(store: StoreCase, monkeypatch: pytest.MonkeyPatch) -> None:
    import checkpointio._runtime as runtime

    slept: list[float] = []
    monkeypatch.setattr(runtime.time, "sleep", slept.append)

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


async def test_ctx_reaches_worker_threads_the_task_starts(store: StoreCase) -> None:
    @environment(store).task(retries=1, name="threaded")
    async def job() -> list[str | None]:
        return [
            await anyio.to_thread.run_sync(lambda: ctx().task_name),
            await asyncio.to_thread(lambda: ctx().run_id is not None and ctx().task_name),  # type: ignore[func-returns-value]
            ctx().checkpoint is not None and ctx().task_name,  # type: ignore[list-item]
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


def test_public_runtime_names_are_exported() -> None:
    for name in ("TaskEnvironment", "ctx", "env", "TaskContext", "AttemptFailure", "default_storage"):
        assert name in checkpointio.__all__
