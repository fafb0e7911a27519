"""Background saves: snapshot at the call, one in flight per checkpoint, errors never lost; every store."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from checkpointio import (
    AccessDeniedError,
    BackgroundSaveError,
    Checkpoint,
    CheckpointError,
    PortalError,
    SaveHandle,
    SourceChangedError,
    SourceNotFoundError,
    _snapshot,
)
from checkpointio._placement import STAGING_NAME, remove_tree

from .conftest import ProxiedBucket, StoreCase, make_tree, snapshot
from .scripts import run_script

ROOT = Path(__file__).resolve().parent.parent


async def restored_tree(store: StoreCase, name: str) -> dict[str, tuple[str, object, int, int]]:
    async with Checkpoint(store.uri("reader"), src=store.uri(name)) as cp:
        restored = await cp.load()
        assert restored is not None
        return snapshot(restored)


def restored_bytes_sync(store: StoreCase, name: str) -> bytes:
    with Checkpoint(store.uri("reader"), src=store.uri(name)) as cp:
        restored = cp.load_sync()
        assert restored is not None
        return restored.read_bytes()


async def restored_bytes(store: StoreCase, name: str) -> bytes:
    async with Checkpoint(store.uri("reader"), src=store.uri(name)) as cp:
        restored = await cp.load()
        assert restored is not None
        return restored.read_bytes()


async def test_background_save_of_a_directory_stores_the_state_at_the_call(store: StoreCase, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    expected = snapshot(tree)
    async with Checkpoint(store.uri("ckpt")) as cp:
        handle = await cp.save(tree, wait=False)
        # The caller carries on at once: replaces, adds and deletes files, then the whole tree.
        (tree / "model" / "weights.bin").unlink()
        (tree / "model" / "weights.bin").write_bytes(b"overwritten")
        (tree / "new-file").write_text("written after the call")
        shutil.rmtree(tree)
        await handle
        assert handle.done() and not handle.cancelled()
    assert await restored_tree(store, "ckpt") == expected


def test_sync_background_save_returns_before_the_upload_and_stores_the_snapshot(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    expected = snapshot(tree)
    with Checkpoint(store.uri("ckpt")) as cp:
        handle = cp.save_sync(tree, wait=False)
        assert isinstance(handle, SaveHandle)
        os.replace(tree / "private", tree / "moved")  # rename, as frameworks replace files
        (tree / "run.sh").unlink()
        handle.result(timeout=60)
        assert cp.pending is handle
    assert cp.pending is None
    assert anyio.run(restored_tree, store, "ckpt") == expected


async def test_background_save_of_bytes_and_a_bytearray_keeps_the_value_at_the_call(store: StoreCase) -> None:
    buffer = bytearray(b"step=1" * 1000)
    async with Checkpoint(store.uri("ckpt")) as cp:
        handle = await cp.save(buffer, wait=False)
        buffer[:] = b"x" * len(buffer)
        await handle
    assert await restored_bytes(store, "ckpt") == b"step=1" * 1000


async def test_background_save_of_a_file_survives_the_file_being_replaced(store: StoreCase, tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    state.write_bytes(b"epoch 1" * 10_000)
    async with Checkpoint(store.uri("ckpt")) as cp:
        handle = await cp.save(state, wait=False)
        state.unlink()
        state.write_bytes(b"epoch 2")
        await handle
    assert await restored_bytes(store, "ckpt") == b"epoch 1" * 10_000


def test_a_file_rewritten_in_place_during_a_background_save_fails_it_instead_of_storing_a_mix(
    store: StoreCase, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "model.pt").write_bytes(b"A" * (3 * 1024 * 1024))
    (tree / "notes.txt").write_text("kept")
    read, gate = threading.Event(), threading.Event()

    def hold(progress: Any) -> None:
        # Runs in the save's reading thread. Hold it once model.pt has been read whole, before the
        # check that precedes the commit: rewritten earlier, the read itself would find the file
        # shorter ("shrank"), which is another guard than the one this test is about.
        if progress.source_done >= 3 * 1024 * 1024 and not read.is_set():
            read.set()
            gate.wait(30)

    with Checkpoint(store.uri("ckpt")) as cp:
        cp.save_sync(b"previous")
        handle = cp.save_sync(tree, wait=False, on_progress=hold)
        assert read.wait(30)
        # What torch.save(state, "tree/model.pt") does to an existing path: truncate and rewrite it.
        with open(tree / "model.pt", "wb") as file:
            file.write(b"B" * (2 * 1024 * 1024))
        gate.set()
        with pytest.raises(SourceChangedError, match="rewritten in place"):
            handle.result(timeout=60)
        cp.save_sync(b"after", wait=False).result(timeout=60)
    assert restored_bytes_sync(store, "ckpt") == b"after"


def test_a_file_replaced_or_deleted_after_a_background_save_does_not_fail_it(store: StoreCase, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "model.pt").write_bytes(b"A" * (3 * 1024 * 1024))
    (tree / "old.pt").write_bytes(b"old")
    expected = snapshot(tree)
    gate = threading.Event()

    def hold(progress: Any) -> None:
        gate.wait(30)

    with Checkpoint(store.uri("ckpt")) as cp:
        handle = cp.save_sync(tree, wait=False, on_progress=hold)
        (tree / "model.pt.tmp").write_bytes(b"B")
        os.replace(tree / "model.pt.tmp", tree / "model.pt")  # the safe way to rewrite: a new file
        (tree / "old.pt").unlink()
        gate.set()
        handle.result(timeout=60)
    assert anyio.run(restored_tree, store, "ckpt") == expected


async def test_a_second_background_save_waits_for_the_first_and_the_last_one_wins(
    store: StoreCase, tmp_path: Path
) -> None:
    async with Checkpoint(store.uri("ckpt")) as cp:
        handles = [await cp.save(f"epoch {n}".encode(), wait=False) for n in range(5)]
        assert all(handle.done() for handle in handles[:-1])  # each save waited for the one before
        await cp.wait()
    assert await restored_bytes(store, "ckpt") == b"epoch 4"


def test_waiting_saves_keep_at_most_one_in_flight(proxied_bucket: ProxiedBucket) -> None:
    proxy = proxied_bucket.proxy
    proxy.slow = lambda method, target: method == "PUT"
    proxy.delay = 0.05  # each upload lingers in the proxy, so saves that overlapped would show
    cp = Checkpoint(proxied_bucket.uri(), **proxied_bucket.options)
    for n in range(4):
        cp.save_sync(f"{n}".encode(), wait=False)
    cp.close()
    assert [entry["method"] for entry in proxy.log].count("PUT") == 4
    assert proxy.max_in_flight == 1
    assert proxied_bucket.stored() == b"3"


def test_supersede_cancels_the_save_in_flight_and_stores_the_newer(proxied_bucket: ProxiedBucket) -> None:
    stalled = proxied_bucket.stall_upload()
    with Checkpoint(proxied_bucket.uri(), **proxied_bucket.options) as cp:
        old = cp.save_sync(b"old", wait=False)
        assert stalled.taken.wait(30)  # its upload reached the server, which never answers
        new = cp.save_sync(b"new", wait=False, supersede=True)
        new.result(timeout=30)  # not queued behind the old save: that one would never end
        assert old.done() and old.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            old.result()
    assert proxied_bucket.stored() == b"new"


def test_a_background_failure_is_raised_by_its_handle(proxied_bucket: ProxiedBucket) -> None:
    proxied_bucket.refuse_upload()
    with Checkpoint(proxied_bucket.uri(), **proxied_bucket.options) as cp:
        handle = cp.save_sync(b"doomed", wait=False)
        with pytest.raises(AccessDeniedError, match=f"{cp.dest}: access denied"):
            handle.result(timeout=30)
        cp.save_sync(b"fine")  # retrieved from the handle: not reported again
    assert proxied_bucket.stored() == b"fine"


async def test_a_background_failure_is_raised_when_awaiting_the_handle(proxied_bucket: ProxiedBucket) -> None:
    proxied_bucket.refuse_upload()
    async with Checkpoint(proxied_bucket.uri(), **proxied_bucket.options) as cp:
        handle = await cp.save(b"doomed", wait=False)
        with pytest.raises(AccessDeniedError, match=f"{cp.dest}: access denied"):
            await handle
    assert proxied_bucket.stored() is None


def test_an_unretrieved_background_failure_is_raised_by_the_next_save(proxied_bucket: ProxiedBucket) -> None:
    proxied_bucket.refuse_upload()
    with Checkpoint(proxied_bucket.uri(), **proxied_bucket.options) as cp:
        cp.save_sync(b"doomed", wait=False)
        with pytest.raises(BackgroundSaveError, match="access denied") as caught:
            cp.save_sync(b"next", wait=False)
        assert isinstance(caught.value.__cause__, AccessDeniedError)
        assert caught.value.uri == cp.dest
        cp.save_sync(b"after", wait=False).result(timeout=30)  # reported once
    assert proxied_bucket.stored() == b"after"


def test_an_unretrieved_background_failure_is_raised_by_close_and_wait(proxied_bucket: ProxiedBucket) -> None:
    proxied_bucket.refuse_upload(times=2)
    cp = Checkpoint(proxied_bucket.uri(), **proxied_bucket.options)
    cp.save_sync(b"doomed", wait=False)
    with pytest.raises(BackgroundSaveError, match="access denied"):
        cp.close()
    cp.save_sync(b"doomed again", wait=False)
    with pytest.raises(BackgroundSaveError, match="access denied"):
        cp.wait_sync()
    cp.close()
    assert proxied_bucket.stored() is None


async def test_a_real_store_failure_surfaces_on_the_handle(store: StoreCase, tmp_path: Path) -> None:
    if store.name == "memory":
        pytest.skip("the memory store cannot fail")
    if store.name == "s3":
        uri = "s3://no-such-bucket-checkpointio/ckpt"
    else:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        uri = str(blocker / "ckpt")
    async with Checkpoint(uri) as cp:
        handle = await cp.save(b"data", wait=False)
        with pytest.raises(Exception) as caught:  # each store has its own error
            await handle
        assert not isinstance(caught.value, BackgroundSaveError)
        await cp.save(b"again", wait=False)
        with pytest.raises(BackgroundSaveError):
            await cp.wait()


async def test_a_missing_source_fails_at_the_call_not_in_the_background(tmp_path: Path) -> None:
    async with Checkpoint(tmp_path / "ckpt") as cp:
        with pytest.raises(SourceNotFoundError):
            await cp.save(tmp_path / "missing", wait=False)
        with pytest.raises(TypeError):
            await cp.save(123, wait=False)  # type: ignore[arg-type]  # the wrong type on purpose
        assert cp.pending is None


def test_a_handle_behaves_like_a_future_of_a_stored_save(store: StoreCase) -> None:
    seen: list[tuple[SaveHandle, bool, BaseException | None]] = []
    with Checkpoint(store.uri("ckpt")) as cp:
        handle = cp.save_sync(b"stored", wait=False)
        handle.add_done_callback(lambda h: seen.append((h, h.done(), h.exception())))
        assert handle.exception(timeout=30) is None
        handle.result(timeout=30)
        assert handle.done() and not handle.running() and handle.cancelled() is False
        cp.wait_sync()
        assert len(seen) == 1 and seen[0] == (handle, True, None)
        # A callback added to a handle that has ended runs at once, in the caller's thread.
        here: list[int] = []
        handle.add_done_callback(lambda h: here.append(threading.get_ident()))
        assert here == [threading.get_ident()]
        finished = cp.save_sync(b"synchronous")
        assert finished.done() and finished.exception() is None and finished.cancelled() is False
    assert restored_bytes_sync(store, "ckpt") == b"synchronous"


def test_exception_returns_a_background_failure_once_and_callbacks_see_it(
    proxied_bucket: ProxiedBucket, caplog: pytest.LogCaptureFixture
) -> None:
    proxied_bucket.refuse_upload()
    errors: list[str] = []

    def broken(handle: SaveHandle) -> None:
        raise RuntimeError("a callback that fails")

    with Checkpoint(proxied_bucket.uri(), **proxied_bucket.options) as cp:
        handle = cp.save_sync(b"doomed", wait=False)
        handle.add_done_callback(broken)  # logged, and the next callback still runs
        handle.add_done_callback(lambda h: errors.append(str(h.exception())))
        error = handle.exception(timeout=30)
        assert isinstance(error, AccessDeniedError) and f"{cp.dest}: access denied" in str(error)
        cp.wait_sync()  # retrieved through exception(): not reported again
        cp.save_sync(b"fine")
    assert errors == [str(error)]
    assert "a done callback of <SaveHandle" in caplog.text and "a callback that fails" in caplog.text
    assert proxied_bucket.stored() == b"fine"


def test_a_cancelled_handle_says_so_like_a_future(proxied_bucket: ProxiedBucket) -> None:
    stalled = proxied_bucket.stall_upload()
    with Checkpoint(proxied_bucket.uri(), **proxied_bucket.options) as cp:
        old = cp.save_sync(b"old", wait=False)
        assert stalled.taken.wait(30)  # its upload reached the server, which never answers
        assert old.running() and old.cancelled() is False
        with pytest.raises(TimeoutError, match="still running"):
            old.exception(timeout=0.01)
        old.cancel()
        assert old.join(30)
        assert old.cancelled() is True
        with pytest.raises(concurrent.futures.CancelledError):
            old.exception()
    assert proxied_bucket.stored() is None


def test_result_on_the_loop_thread_raises_instead_of_deadlocking(proxied_bucket: ProxiedBucket) -> None:
    from checkpointio import _portal

    proxied_bucket.stall_upload()  # the save stays in flight until cancelled
    cp = Checkpoint(proxied_bucket.uri(), **proxied_bucket.options)

    async def on_loop() -> None:
        handle = await cp.save(b"x", wait=False)
        handle.result()

    with pytest.raises(PortalError, match="deadlock"):
        _portal.run_sync(on_loop)
    handle = cp.pending
    assert handle is not None and handle.running()
    handle.cancel()
    cp.close()
    assert handle.cancelled()


def test_snapshot_links_files_on_the_same_filesystem_and_copies_on_request(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    os.link(tree / "run.sh", tree / "run-again.sh")  # a hard link inside the tree stays one
    linked = _snapshot.take(tree)
    copied = _snapshot.take(tree, link=False)
    scratches = [linked.scratch, copied.scratch]
    try:
        for shot in (linked, copied):
            assert isinstance(shot.data, Path)
            assert snapshot(shot.data) == snapshot(tree)
            assert os.path.samefile(shot.data / "run.sh", shot.data / "run-again.sh")
        assert linked.copied == 0 and linked.linked == 5
        assert copied.linked == 0 and copied.copied == 5
        assert isinstance(linked.data, Path) and os.path.samefile(linked.data / "private", tree / "private")
    finally:
        linked.discard()
        copied.discard()
    assert all(scratch is not None and not scratch.exists() for scratch in scratches)


def test_a_file_given_as_a_symlink_is_saved_in_the_background_as_the_file(tmp_path: Path) -> None:
    (tmp_path / "epoch=1.ckpt").write_bytes(b"weights of epoch 1")
    (tmp_path / "last.ckpt").symlink_to("epoch=1.ckpt")  # relative, as Lightning makes it
    with Checkpoint(tmp_path / "ck") as cp:
        handle = cp.save_sync(tmp_path / "last.ckpt", wait=False)
        (tmp_path / "epoch=2.ckpt").write_bytes(b"weights of epoch 2")  # the safe pattern: a new file,
        os.replace(tmp_path / "epoch=2.ckpt", tmp_path / "epoch=1.ckpt")  # renamed over the old one
        handle.result(timeout=60)
    with Checkpoint(tmp_path / "reader", src=tmp_path / "ck") as reader:
        assert reader.load_bytes_sync() == b"weights of epoch 1"


def test_a_background_save_keeps_the_mtimes_of_symlinks(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    os.utime(tree / "latest", ns=(1_000_000_000 * 10**9, 1_000_000_000 * 10**9), follow_symlinks=False)
    with Checkpoint(tmp_path / "ck") as cp:
        cp.save_sync(tree, wait=False).result(timeout=60)
    with Checkpoint(tmp_path / "reader", src=tmp_path / "ck") as reader:
        restored = reader.load_sync()
        assert restored is not None
        assert os.lstat(restored / "latest").st_mtime == 1_000_000_000


def test_saving_the_current_folder_in_the_background_keeps_its_scratch_outside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a temporary folder on another filesystem than the tree")
    monkeypatch.setattr(tempfile, "tempdir", "/dev/shm")  # no hard links from there: scratch goes beside
    tree = make_tree(tmp_path / "tree")
    expected = snapshot(tree)
    monkeypatch.chdir(tree)
    with Checkpoint(tmp_path / "ck") as cp:
        cp.save_sync(".", wait=False).result(timeout=60)
    with Checkpoint(tmp_path / "reader", src=tmp_path / "ck") as reader:
        restored = reader.load_sync()
        assert restored is not None and snapshot(restored) == expected
    assert not [path for path in tmp_path.iterdir() if STAGING_NAME.fullmatch(path.name)]


def test_a_snapshot_whose_scratch_must_live_inside_the_tree_leaves_it_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    tree = make_tree(tmp_path / "tree")
    expected = snapshot(tree)
    # Where every candidate lies inside the tree (the tree is "/"), the scratch is made there.
    monkeypatch.setattr(
        _snapshot,
        "_scratch_for",
        lambda source, is_tree: Path(tempfile.mkdtemp(prefix=".checkpointio-snapshot-", dir=tree / "model")),
    )
    shot = _snapshot.take(tree)
    try:
        assert isinstance(shot.data, Path) and shot.scratch is not None
        assert shot.scratch.parent == tree / "model"
        assert snapshot(shot.data) == expected
    finally:
        shot.discard()
    assert snapshot(tree) == expected


def test_a_background_save_of_a_tree_with_a_symlink_to_a_folder_leaves_no_scratch_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    scratch_root = tmp_path / "scratch-root"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    tree = make_tree(tmp_path / "tree")
    (tree / "current").symlink_to("model")
    with Checkpoint(tmp_path / "ck") as cp:
        cp.save_sync(tree, wait=False).result(timeout=60)
    assert list(scratch_root.iterdir()) == []
    with Checkpoint(tmp_path / "reader", src=tmp_path / "ck") as reader:
        restored = reader.load_sync()
        assert restored is not None and snapshot(restored) == snapshot(tree)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
def test_a_background_save_of_a_tree_with_a_read_only_folder_leaves_no_scratch_behind(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "frozen").mkdir()
    (tree / "frozen" / "w.pt").write_bytes(b"frozen weights")
    (tree / "frozen").chmod(0o555)
    (tree / "current").symlink_to("model")
    scratch_root = tmp_path / "scratch-root"
    scratch_root.mkdir()
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from checkpointio import Checkpoint
            os.chmod({str(tmp_path)!r}, 0o777)
            with Checkpoint({str(tmp_path / "ck")!r}) as cp:
                cp.save_sync({str(tree)!r}, wait=False).result(timeout=60)
            print(sorted(os.listdir({str(scratch_root)!r})))
            """
        )
    )
    # as root, but without its power to ignore file permissions (as any other user runs)
    result = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch_root)},
    )
    (tree / "frozen").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    with Checkpoint(tmp_path / "reader", src=tmp_path / "ck") as reader:
        restored = reader.load_sync()
        assert restored is not None and (restored / "frozen" / "w.pt").read_bytes() == b"frozen weights"


def test_a_forked_child_neither_waits_for_nor_removes_what_its_parent_owns(tmp_path: Path) -> None:
    result = run_script(
        f"""
        import os, pathlib, signal, sys, time
        from checkpointio import Checkpoint
        root = pathlib.Path({str(tmp_path)!r})
        Checkpoint(root / "first").save_sync(b"first")
        cp = Checkpoint(root / "second", src=root / "first")
        restored = cp.load_sync()

        def slow(event):
            time.sleep(0.05)

        cp.save_sync(os.urandom(8 * 1024 * 1024), wait=False, on_progress=slow, chunk_size=256 * 1024)
        child = os.fork()
        if child == 0:
            signal.alarm(20)  # a hang fails the test instead of stalling it
            cp.save_sync(b"from the child")  # the parent's background save is not the child's to wait for
            cp.close()  # nor is the parent's workspace the child's to remove
            os._exit(0)
        _, status = os.waitpid(child, 0)
        print("child exit:", os.waitstatus_to_exitcode(status))
        print("workspace kept:", restored.read_bytes() == b"first")
        cp.close()
        print("workspace removed by its owner:", not restored.exists())
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "child exit: 0",
        "workspace kept: True",
        "workspace removed by its owner: True",
    ]


def test_a_close_interrupted_while_waiting_keeps_the_save_reachable_for_cancelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from checkpointio import SaveHandle

    release = threading.Event()

    def held(event: object) -> None:
        release.wait(30)

    cp = Checkpoint(tmp_path / "ck")
    handle = cp.save_sync(os.urandom(3 * 1024 * 1024), wait=False, on_progress=held)
    real_join = SaveHandle.join

    def interrupted(self: SaveHandle, timeout: float | None = None) -> bool:
        monkeypatch.setattr(SaveHandle, "join", real_join)
        raise KeyboardInterrupt  # Ctrl-C while close() waits

    monkeypatch.setattr(SaveHandle, "join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cp.close()
    assert cp.pending is handle  # not lost: what handles the interrupt can still cancel it
    release.set()
    cp.close(timeout=30)
    assert cp.pending is None and handle.done()


def test_interpreter_exit_waits_for_the_background_save_in_flight(tmp_path: Path) -> None:
    result = run_script(
        f"""
        import os, pathlib
        from checkpointio import Checkpoint
        root = pathlib.Path({str(tmp_path)!r})
        tree = root / "tree"; tree.mkdir()
        for i in range(4):
            (tree / f"shard-{{i}}").write_bytes(os.urandom(4 * 1024 * 1024))
        handle = Checkpoint(root / "ckpt", chunk_size=256 * 1024).save_sync(tree, wait=False)
        print("returned before the upload:", not handle.done())
        # the script ends here: exit must not drop the checkpoint
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "returned before the upload: True" in result.stdout
    with Checkpoint(tmp_path / "reader", src=tmp_path / "ckpt") as cp:
        restored = cp.load_sync()
        assert restored is not None
        assert sorted(path.name for path in restored.iterdir()) == [f"shard-{i}" for i in range(4)]


def test_interpreter_exit_removes_temporary_workspaces_nobody_closed_after_saving_from_them(
    tmp_path: Path,
) -> None:
    tree = make_tree(tmp_path / "tree")
    with Checkpoint(tmp_path / "first") as writer:
        writer.save_sync(tree)
    result = run_script(
        f"""
        import os, pathlib, time
        from checkpointio import Checkpoint
        root = pathlib.Path({str(tmp_path)!r})
        cp = Checkpoint(root / "second", src=root / "first", chunk_size=64 * 1024)
        restored = cp.load_sync()
        (restored / "added").write_bytes(b"added" * 400_000)
        print("workspace:", restored)

        def slow(event):  # the save is still reading the workspace's files when the script ends
            time.sleep(0.01)

        cp.save_sync(restored, wait=False, on_progress=slow)
        child = os.fork()
        if child == 0:
            raise SystemExit(0)  # a forked child's exit leaves its parent's workspace alone
        os.waitpid(child, 0)
        print("after the child:", restored.is_dir())
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    workspace = Path(result.stdout.split("workspace: ", 1)[1].splitlines()[0])
    assert "after the child: True" in result.stdout
    assert not workspace.exists()
    with Checkpoint(tmp_path / "reader", src=tmp_path / "second") as reader:
        restored = reader.load_sync()
        assert restored is not None
        assert (restored / "added").read_bytes() == b"added" * 400_000
        (restored / "added").unlink()
        assert snapshot(restored) == snapshot(tree)


def test_interpreter_exit_logs_a_background_failure_nobody_retrieved(tmp_path: Path) -> None:
    result = run_script(
        f"""
        import pathlib
        from checkpointio import Checkpoint
        root = pathlib.Path({str(tmp_path)!r})
        (root / "a-file").write_text("not a folder")
        Checkpoint(root / "a-file" / "ckpt").save_sync(b"data", wait=False)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "background save to" in result.stderr and "failed" in result.stderr


def test_interpreter_exit_waits_only_as_long_as_its_bound(proxied_bucket: ProxiedBucket) -> None:
    stalled = proxied_bucket.stall_upload()  # the upload never ends
    script = f"""
        import sys
        from checkpointio import Checkpoint

        Checkpoint({proxied_bucket.uri()!r}, **{proxied_bucket.options!r}).save_sync(b"data", wait=False)
        sys.stdin.read()  # exits once the test saw the upload reach the server
        """
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CHECKPOINTIO_EXIT_TIMEOUT": "1"},
    ) as process:
        assert stalled.taken.wait(60)
        _, stderr = process.communicate("", timeout=120)
    assert process.returncode == 0, stderr
    assert "did not finish within 1 s of exit" in stderr
    assert proxied_bucket.stored() is None


def test_a_task_attempt_that_fails_right_after_a_background_save_is_resumed_from_it(
    store: StoreCase, tmp_path: Path
) -> None:
    from checkpointio import TaskEnvironment, ctx

    seen: list[bytes | None] = []

    @TaskEnvironment("bg", storage=store.uri("root")).task(retries=1)
    def job() -> None:
        cp = ctx().checkpoint
        assert cp is not None
        previous = cp.load_sync()
        seen.append(previous.read_bytes() if previous else None)
        if ctx().attempt == 0:
            cp.save_sync(b"saved in the background" * 1000, wait=False)
            raise RuntimeError("dies while the upload runs")

    job()
    assert seen == [None, b"saved in the background" * 1000]


def test_a_task_whose_last_background_save_failed_is_retried(proxied_bucket: ProxiedBucket) -> None:
    from checkpointio import TaskEnvironment, ctx

    refused = proxied_bucket.proxy.add(
        lambda method, target: method == "PUT" and target.partition("?")[0].endswith("/attempt-0"), "403"
    )
    attempts: list[int | None] = []

    @TaskEnvironment("bg", storage=proxied_bucket.uri("root"), **proxied_bucket.options).task(retries=1)
    def job() -> None:
        cp = ctx().checkpoint
        assert cp is not None
        attempts.append(ctx().attempt)
        cp.save_sync(b"doomed" if ctx().attempt == 0 else b"fine", wait=False)

    job()
    assert refused.taken.is_set()
    assert attempts == [0, 1]


def test_a_background_save_of_a_tree_1200_folders_deep_is_stored_and_leaves_no_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deeper than the recursion limit: the snapshot's scratch and the restore's workspace are
    removed all the same (no ``RecursionError`` from a recursive walk or ``rmtree``)."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the snapshot's scratch goes
    tree = tmp_path / "tree"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):  # pathlib's and os.makedirs's recursion would not get there
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as file:
        file.write(b"at the bottom")
    os.close(fd)
    with Checkpoint(tmp_path / "ck") as cp:
        cp.save_sync(tree, wait=False).result(timeout=120)
    assert list(scratch.iterdir()) == []
    reader = Checkpoint(tmp_path / "reader", src=tmp_path / "ck")
    restored = reader.load_sync()
    assert restored is not None and restored.parent == scratch  # a temporary workspace
    assert (restored / ("d/" * 1200 + "bottom")).read_bytes() == b"at the bottom"
    reader.close()
    assert list(scratch.iterdir()) == []
    remove_tree(tree)  # pytest removes old temporary folders recursively: it could not remove this one


@pytest.mark.parametrize("registered", ["before", "after"])
def test_interpreter_exit_stores_a_background_save_started_by_an_atexit_hook_whatever_the_import_order(
    registered: str, tmp_path: Path
) -> None:
    # atexit runs hooks in the reverse order of registration: a hook the application registered
    # before importing checkpointio runs after checkpointio's own exit step, one registered after
    # runs before it. A background save started from either must be stored before the process ends.
    hook = f"""
        def last_words():
            import os, pathlib
            from checkpointio import Checkpoint
            root = pathlib.Path({str(tmp_path)!r})
            tree = root / "tree"; tree.mkdir()
            for i in range(4):
                (tree / f"shard-{{i}}").write_bytes(os.urandom(4 * 1024 * 1024))
            Checkpoint(root / "ckpt", chunk_size=256 * 1024).save_sync(tree, wait=False)
            print("save started")
        """
    register = "import atexit; atexit.register(last_words)\n"
    imports = "import checkpointio\n" + "".join(  # with the integrations where they are installed
        f"try:\n    import checkpointio.{name}\nexcept ImportError:\n    pass\n" for name in ("lightning", "torch")
    )
    script = textwrap.dedent(hook) + (register + imports if registered == "before" else imports + register)
    result = run_script(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["save started"]
    with Checkpoint(tmp_path / "reader", src=tmp_path / "ckpt") as cp:
        restored = cp.load_sync()
        assert restored is not None
        assert snapshot(restored) == snapshot(tmp_path / "tree")


def test_a_forked_child_neither_awaits_nor_drains_its_parents_background_save(tmp_path: Path) -> None:
    result = run_script(
        f"""
        import logging, os, pathlib, signal, sys, threading
        from checkpointio import Checkpoint, PortalError
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        root = pathlib.Path({str(tmp_path)!r})
        release = threading.Event()

        def held(progress):  # the parent's save waits until its child has exited
            release.wait(60)

        cp = Checkpoint(root / "ckpt")
        handle = cp.save_sync(b"the parent's" * 100_000, wait=False, on_progress=held)
        child = os.fork()
        if child == 0:
            signal.alarm(20)  # a hang fails the test instead of stalling it
            print("child: pending", cp.pending, "in this process", handle.in_this_process(), flush=True)
            try:
                handle.result()
            except PortalError as error:
                print("child: result() refused:", "forked" in str(error), flush=True)
            sys.exit(0)  # a normal exit: the child's exit step must not wait for the parent's save
        _, status = os.waitpid(child, 0)
        print("child exit:", os.waitstatus_to_exitcode(status), "parent still saving:", not handle.done(), flush=True)
        release.set()
        print("parent: stored", handle.result(timeout=60) is None, flush=True)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith(("child", "parent"))] == [
        "child: pending None in this process False",
        "child: result() refused: True",
        "child exit: 0 parent still saving: True",
        "parent: stored True",
    ], result.stdout
    assert "waiting up to" not in result.stdout  # neither process had a save left to wait for at exit
    assert (tmp_path / "ckpt").read_bytes() == b"the parent's" * 100_000


def test_a_training_callbacks_wait_on_the_loop_thread_reports_the_save_never_skips_it(tmp_path: Path) -> None:
    from checkpointio import _portal
    from checkpointio._training import FolderSaver

    folder = make_tree(tmp_path / "folder")
    (tmp_path / "in-the-way").write_bytes(b"a file where the checkpoint's folder must be")
    failing = FolderSaver(Checkpoint(tmp_path / "in-the-way" / "ckpt"), None, background=True)
    failing._store(folder)
    assert failing.last is not None and failing.last.join() and not failing.last.succeeded()

    async def wait_on_loop(saver: FolderSaver) -> None:
        saver.wait()

    with pytest.raises(CheckpointError, match="in-the-way"):  # its failure, not a silent return
        _portal.run_sync(wait_on_loop, failing)

    in_flight = FolderSaver(Checkpoint(tmp_path / "ckpt"), None, background=True)

    async def save_and_wait_on_loop() -> None:
        in_flight.last = await in_flight.checkpoint.save(folder, wait=False)
        assert not in_flight.last.done()  # it runs on this loop, which this coroutine holds
        in_flight.wait()

    with pytest.raises(PortalError, match="deadlock"):  # not a return as if it were stored
        _portal.run_sync(save_and_wait_on_loop)
    assert in_flight.last is not None
    in_flight.last.result()
    with Checkpoint(tmp_path / "unused", src=tmp_path / "ckpt") as cp:
        assert cp.load_sync() and cp.path is not None
        assert snapshot(cp.path) == snapshot(folder)


@pytest.mark.parametrize("registered", ["before", "after"])
def test_a_temporary_workspace_made_by_an_atexit_hook_and_never_closed_is_removed_whatever_the_import_order(
    registered: str, tmp_path: Path
) -> None:
    # A hook registered before checkpointio was imported runs after its exit step that removes the
    # temporary workspaces nobody closed: the one it makes is removed once the process has ended.
    tree = make_tree(tmp_path / "tree")
    with Checkpoint(tmp_path / "first") as writer:
        writer.save_sync(tree)
    hook = f"""
        def last_words():
            import pathlib
            from checkpointio import Checkpoint
            root = pathlib.Path({str(tmp_path)!r})
            restored = Checkpoint(root / "second", src=root / "first").load_sync()  # never closed
            print(restored, (restored / "model" / "weights.bin").stat().st_size, flush=True)
        """
    register = "import atexit; atexit.register(last_words)\n"
    imports = "import checkpointio\n"
    script = textwrap.dedent(hook) + (register + imports if registered == "before" else imports + register)
    result = run_script(script, tmp_path)  # returns once its standard error is closed by every holder
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    workspace, size = result.stdout.split()
    assert int(size) == (tree / "model" / "weights.bin").stat().st_size  # it was restored there
    assert Path(workspace).name.startswith("checkpointio-")
    assert not Path(workspace).exists()
