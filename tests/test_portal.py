"""The sync twins: one event-loop thread, usable from anywhere a blocking call is."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import textwrap
import threading
import types
from pathlib import Path

import pytest

import checkpointio
from checkpointio import Checkpoint, PortalError, _portal

from .conftest import StoreCase
from .scripts import run_script


@pytest.mark.parametrize("name", ["load", "save", "prev_exists", "wait"])
def test_each_sync_twin_has_the_signature_of_its_async_method(name: str) -> None:
    async_sig = inspect.signature(getattr(Checkpoint, name))
    sync_sig = inspect.signature(getattr(Checkpoint, f"{name}_sync"))
    assert list(sync_sig.parameters) == list(async_sig.parameters)
    assert str(sync_sig.return_annotation) == str(async_sig.return_annotation)


def test_sync_calls_from_many_threads_all_land(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            Checkpoint(tmp_path / f"ckpt-{i}").save_sync(f"value {i}".encode())
            with Checkpoint(tmp_path / "unused", src=tmp_path / f"ckpt-{i}") as cp:
                restored = cp.load_sync()
                assert restored is not None and restored.read_bytes() == f"value {i}".encode()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_sync_call_from_inside_a_running_event_loop(tmp_path: Path) -> None:
    async def notebook_cell() -> bytes:
        Checkpoint(tmp_path / "a").save_sync(b"from a coroutine")
        with Checkpoint(tmp_path / "b", src=tmp_path / "a") as cp:
            restored = cp.load_sync()
            assert restored is not None
            return restored.read_bytes()

    assert asyncio.run(notebook_cell()) == b"from a coroutine"


def test_sync_call_from_the_loop_thread_raises_instead_of_deadlocking(tmp_path: Path) -> None:
    async def inside_loop_thread() -> None:
        Checkpoint(tmp_path / "a").save_sync(b"x")

    with pytest.raises(PortalError, match="deadlock"):
        _portal.run_sync(inside_loop_thread)
    Checkpoint(tmp_path / "a").save_sync(b"still usable")


def test_sync_calls_work_in_a_forked_child(tmp_path: Path) -> None:
    result = run_script(
        f"""
        import os
        from checkpointio import Checkpoint
        root = {str(tmp_path)!r}
        Checkpoint(root + "/parent").save_sync(b"parent")
        pid = os.fork()
        if pid == 0:
            try:
                Checkpoint(root + "/child").save_sync(b"child")
                with Checkpoint(root + "/x", src=root + "/parent") as cp:
                    ok = cp.load_sync().read_bytes() == b"parent"
                os._exit(0 if ok else 3)
            except BaseException:
                import traceback; traceback.print_exc()
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        with Checkpoint(root + "/y", src=root + "/child") as cp:
            assert cp.load_sync().read_bytes() == b"child"
        print("fork ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "fork ok" in result.stdout


def test_a_forked_child_that_ends_normally_ends_quietly(store: StoreCase) -> None:
    # The child inherits the parent's loop thread (and, on S3, its receivers) as orphans; its
    # interpreter exit must not run their clean-up against threads that are the parent's.
    uris = {name: store.uri(name) for name in ("parent", "child")}
    result = run_script(
        f"""
        import os, sys
        from checkpointio import Checkpoint
        uris = {uris!r}
        Checkpoint(uris["parent"]).save_sync(b"parent")
        assert Checkpoint("unused", src=uris["parent"]).load_bytes_sync() == b"parent"
        if os.fork() == 0:
            Checkpoint(uris["child"]).save_sync(b"child")
            assert Checkpoint("unused", src=uris["parent"]).load_bytes_sync() == b"parent"
            sys.exit(0)  # the interpreter's own exit, not os._exit
        _, status = os.wait()
        print("child exit code", os.waitstatus_to_exitcode(status))
        """,
        store.root,
        PYTHONWARNINGS="ignore::DeprecationWarning",  # Python 3.12+: fork() of a process with threads
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no traceback, no unclosed session of the parent's threads
    assert result.stdout.splitlines() == ["child exit code 0"]
    if store.name != "memory":  # a memory store ends with its process
        assert store.get_raw("child") == b"child"


def test_sync_calls_work_at_interpreter_exit(tmp_path: Path) -> None:
    result = run_script(
        f"""
        import atexit
        from checkpointio import Checkpoint
        root = {str(tmp_path)!r}

        def last_words():
            Checkpoint(root + "/at-exit").save_sync(b"saved at exit")
            print("saved")

        atexit.register(last_words)
        Checkpoint(root + "/early").save_sync(b"early")  # the loop thread exists before exit
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "at-exit").read_bytes() == b"saved at exit"


def test_sync_calls_after_the_loop_thread_stopped_at_exit_run_in_the_foreground(store: StoreCase) -> None:
    # atexit runs hooks in the reverse order of registration: a hook registered before checkpointio
    # runs after its exit hook stopped the loop thread. Its sync calls must still land (from plain
    # code and from inside a running event loop), and the interpreter must end without a traceback.
    uris = {name: store.uri(name) for name in ("plain", "background", "in-a-loop")}
    result = run_script(
        f"""
        import asyncio, atexit
        uris = {uris!r}

        def last_words():
            from checkpointio import Checkpoint
            Checkpoint(uris["plain"]).save_sync(b"saved at exit")
            handle = Checkpoint(uris["background"]).save_sync(b"saved at exit, wait=False", wait=False)
            print("background save finished:", handle.done())

            async def in_a_loop():
                Checkpoint(uris["in-a-loop"]).save_sync(b"saved at exit in a loop")

            asyncio.run(in_a_loop())
            for name, uri in uris.items():
                print(name, bytes(Checkpoint(uri + "-next", src=uri).load_bytes_sync() or b""))
            import threading  # no thread of checkpointio's started at exit is left behind (S3's receivers)
            print("threads:", sorted(t.name for t in threading.enumerate() if t.name.startswith("checkpointio")))

        atexit.register(last_words)  # before checkpointio's own exit hook: runs after it
        from checkpointio import Checkpoint
        Checkpoint(uris["plain"]).save_sync(b"early")  # the loop thread exists before exit
        Checkpoint(uris["plain"] + "-early", src=uris["plain"]).load_bytes_sync()  # and S3's receivers
        """,
        store.root,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "background save finished: True",
        "plain b'saved at exit'",
        "background b'saved at exit, wait=False'",
        "in-a-loop b'saved at exit in a loop'",
        "threads: []",
    ]
    if store.name != "memory":  # a memory store ends with its process
        assert store.get_raw("plain") == b"saved at exit"
        assert store.get_raw("in-a-loop") == b"saved at exit in a loop"


def _save_signalled_half_way(tmp_path: Path, sent: str, then: str) -> subprocess.CompletedProcess[str]:
    """Run a script whose ``cp`` saves the folder ``big`` (64 MiB) over ``tmp_path/ckpt`` (holding
    ``b"previous"``); once bytes flow it sends itself the signal ``sent`` (``"SIGINT"``: Ctrl-C)
    from the save's own thread, which cannot go on while the signal lands: the save is certainly
    in flight (a fast machine could otherwise finish it). ``then``: the rest of the script."""
    setup = f"""
        import asyncio, os, signal, time, pathlib
        from checkpointio import Checkpoint, interrupt_on_sigterm
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the suite runs with it ignored
        root = pathlib.Path({str(tmp_path)!r})
        Checkpoint(root / "ckpt").save_sync(b"previous")
        big = root / "big"; big.mkdir()
        for i in range(8):
            (big / f"shard-{{i}}").write_bytes(os.urandom(8 * 1024 * 1024))
        sent = []

        def signal_half_way(progress):
            if progress.done and not progress.finished and not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.{sent})
                time.sleep(1)

        cp = Checkpoint(root / "ckpt", chunk_size=256 * 1024, on_progress=signal_half_way)
        """
    return run_script(textwrap.dedent(setup) + textwrap.dedent(then), tmp_path)


def test_ctrl_c_during_save_sync_cancels_the_save_and_keeps_the_previous(tmp_path: Path) -> None:
    result = _save_signalled_half_way(
        tmp_path,
        "SIGINT",
        """
        try:
            cp.save_sync(big)
        except KeyboardInterrupt:
            print("interrupted")
        print("partials", len(list(root.glob(".ckpt.partial-*"))))
        Checkpoint(root / "other").save_sync(b"loop still usable")
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interrupted" in result.stdout, result.stdout + result.stderr
    assert "partials 0" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "ckpt").read_bytes() == b"previous"
    assert (tmp_path / "other").read_bytes() == b"loop still usable"


def test_ctrl_c_landing_as_a_sync_call_was_just_scheduled_cancels_it_and_waits_for_its_cleanup(
    tmp_path: Path,
) -> None:
    """Ctrl-C lands wherever the caller is: here right as its work was handed to the loop thread,
    before the caller waits for it (where a busy machine once let a save run on, unseen)."""
    result = run_script(
        """
        import os, signal, sys, anyio
        from anyio.from_thread import BlockingPortal
        from checkpointio import _portal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ran = []

        async def work():
            ran.append("started")
            try:
                await anyio.sleep_forever()
            finally:
                ran.append("cleaned up")

        def interrupt_as_scheduled(frame, event, arg):
            if event == "call" and frame.f_code is BlockingPortal.start_task_soon.__code__:
                def on_return(frame, event, arg):
                    if event == "return":
                        os.kill(os.getpid(), signal.SIGINT)  # handled as the call returns to run_sync
                    return on_return
                return on_return
            return None

        _portal.run_sync(anyio.sleep, 0)  # the loop thread runs
        sys.settrace(interrupt_as_scheduled)
        try:
            _portal.run_sync(work)
        except KeyboardInterrupt:
            sys.settrace(None)
            print("interrupted:", ran)
        for _ in range(3):
            _portal.run_sync(anyio.sleep, 0)  # the loop runs tasks in order: work has started by now, if ever
        print("afterwards:", ran)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    interrupted, afterwards = result.stdout.splitlines()
    # it never ran, or it ran and was cancelled, its cleanup done before the interrupt was raised
    assert interrupted in ("interrupted: []", "interrupted: ['started', 'cleaned up']"), result.stdout
    assert afterwards == interrupted.replace("interrupted", "afterwards"), result.stdout


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_inside_interrupt_on_sigterm_cancels_a_save_as_ctrl_c_does(mode: str, tmp_path: Path) -> None:
    result = _save_signalled_half_way(
        tmp_path,
        "SIGTERM",
        f"""
        with interrupt_on_sigterm() as term:
            try:
                if {mode!r} == "sync":
                    cp.save_sync(big)
                else:
                    asyncio.run(cp.save(big))
            except KeyboardInterrupt:
                print("interrupted, by sigterm:", term.received)
        print("partials", len(list(root.glob(".ckpt.partial-*"))))
        print("handler restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interrupted, by sigterm: True" in result.stdout, result.stdout + result.stderr
    assert "partials 0" in result.stdout and "handler restored: True" in result.stdout, result.stdout
    assert (tmp_path / "ckpt").read_bytes() == b"previous"


def test_public_names_are_exported_and_importable() -> None:
    for name in checkpointio.__all__:
        assert hasattr(checkpointio, name), name
    public = {  # optional integration submodules (checkpointio.torch, ...) are not re-exported names
        name
        for name in dir(checkpointio)
        if not name.startswith("_") and not isinstance(getattr(checkpointio, name), types.ModuleType)
    }
    assert public - set(checkpointio.__all__) == set()
