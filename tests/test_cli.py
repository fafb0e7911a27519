"""The console script, run for real in subprocesses against the local store and a moto S3 server."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from checkpointio import Checkpoint, TransferConfig
from checkpointio._cli import build_parser, main, parse_size
from checkpointio._config import field_help
from checkpointio._stores import Store, open_store

from .conftest import (
    GuardedS3,
    MotoServer,
    StoreCase,
    age_keeping_records,
    free_port,
    make_tree,
    snapshot,
    start_moto,
    stop,
)
from .counting import CountingStore
from .faultproxy import FaultProxy
from .scripts import run_script

SCRIPT = str(Path(sys.executable).with_name("checkpointio"))  # installed by pyproject's [project.scripts]
SMALL_PARTS = ["--part-size", "5MiB", "--multipart-threshold", "5MiB"]


def cli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [SCRIPT, *args],
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    return result


def output(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command whose standard output is binary (no newline translation)."""
    return subprocess.run([SCRIPT, *args], capture_output=True, timeout=120)


def ok(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    result = cli(*args, stdin=stdin, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr  # not a terminal: no progress bar
    return result.stdout


def fails(code: int, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a command that must fail with ``code`` and one line on stderr, no traceback; that line."""
    result = cli(*args, env=env, cwd=cwd)
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpointio: error: "), result.stderr
    return lines[0]


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the checkpoints of a test go: a local folder, or a fresh bucket on the moto server."""
    if request.param == "s3":
        server: MotoServer = request.getfixturevalue("moto_server")
        return f"s3://{server.new_bucket()}/runs"
    return str(tmp_path / "store")


def test_directory_file_and_stdin_round_trips(root: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tmp_path / "state.bin").write_bytes(os.urandom(6 * 1024 * 1024 + 1))
    piped = os.urandom(7 * 1024 * 1024 + 3)
    assert ok("save", str(tree), f"{root}/dir", *SMALL_PARTS).startswith(f"saved {root}/dir (dir, ")
    assert ok("save", str(tmp_path / "state.bin"), f"{root}/file", *SMALL_PARTS).startswith(f"saved {root}/file (file")
    assert ok("save", "-", f"{root}/stdin", *SMALL_PARTS, stdin=piped).startswith(
        f"saved {root}/stdin (bytes, 7.0 MiB)"
    )

    ok("load", f"{root}/dir", str(tmp_path / "out" / "dir"))
    assert snapshot(tmp_path / "out" / "dir") == snapshot(tree)
    ok("load", f"{root}/file", str(tmp_path / "out" / "file"), "--max-concurrency", "2", *SMALL_PARTS)
    assert (tmp_path / "out" / "file").read_bytes() == (tmp_path / "state.bin").read_bytes()
    ok("-q", "load", f"{root}/stdin", str(tmp_path / "out" / "stdin"))
    assert (tmp_path / "out" / "stdin").read_bytes() == piped


def test_load_to_standard_output_writes_the_bytes_and_refuses_a_directory(root: str, tmp_path: Path) -> None:
    data = os.urandom(11 * 1024 * 1024 + 7)  # three ranges of 5 MiB parts
    (tmp_path / "state.bin").write_bytes(data)
    ok("save", str(tmp_path / "state.bin"), f"{root}/file", *SMALL_PARTS)
    ok("save", "-", f"{root}/stdin", stdin=b"piped bytes")
    ok("save", str(make_tree(tmp_path / "tree")), f"{root}/dir")

    result = output("load", f"{root}/file", "-", *SMALL_PARTS)
    assert (result.returncode, result.stderr) == (0, b"")  # no summary line either: stdout holds the data
    assert result.stdout == data
    assert ok("-q", "load", f"{root}/stdin", "-") == "piped bytes"
    assert "holds a directory" in fails(1, "load", f"{root}/dir", "-")
    assert "no such checkpoint" in fails(3, "load", f"{root}/missing", "-")
    assert not (Path.cwd() / "-").exists()

    reader = subprocess.Popen([SCRIPT, "load", f"{root}/file", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    assert reader.stdout.read(10) == data[:10]
    reader.stdout.close()  # as `| head -c 10` does
    assert reader.wait(timeout=60) == 141
    assert reader.stderr.read() == b""  # quietly
    reader.stderr.close()


def test_only_with_standard_output_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    ok("save", "-", str(tmp_path / "ck"), stdin=b"the whole state")
    result = cli("load", str(tmp_path / "ck"), "-", "--only", "model/*.pt")
    assert (result.returncode, result.stdout) == (2, "")  # not the whole checkpoint, --only ignored
    assert result.stderr == (
        "checkpointio: error: --only restores entries of a directory into DEST, not to standard output\n"
    )


def test_load_to_standard_output_fails_after_the_bytes_of_a_corrupt_checkpoint(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    ok("save", "-", str(tmp_path / "ck"), stdin=data)
    path = tmp_path / "ck"
    st = path.stat()
    garbled = bytearray(path.read_bytes())
    garbled[150_000] ^= 0xFF
    path.write_bytes(bytes(garbled))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the record still matches: only the content changed
    result = output("load", str(path), "-")
    assert result.returncode == 4
    assert result.stdout == bytes(garbled)  # out before the check could fail
    assert b"CRC32" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
def test_ls_of_a_name_prefix_is_not_stopped_by_an_unreadable_folder_it_does_not_match(tmp_path: Path) -> None:
    ok("save", "-", str(tmp_path / "pfx" / "run7" / "a"), stdin=b"x")
    (tmp_path / "pfx" / "other" / "locked").mkdir(parents=True)
    (tmp_path / "pfx" / "other" / "locked").chmod(0)
    (tmp_path / "pfx" / "run8").mkdir()
    (tmp_path / "pfx" / "run8").chmod(0)  # matches the prefix: its listing must fail, not look empty
    as_a_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", SCRIPT]
    try:
        listed = subprocess.run([*as_a_user, "ls", str(tmp_path / "pfx" / "run7")], capture_output=True, text=True)
        failed = subprocess.run([*as_a_user, "ls", str(tmp_path / "pfx" / "run")], capture_output=True, text=True)
    finally:
        (tmp_path / "pfx" / "other" / "locked").chmod(0o755)
        (tmp_path / "pfx" / "run8").chmod(0o755)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[-1] == str(tmp_path / "pfx" / "run7" / "a")
    assert failed.returncode == 1 and "permission denied" in failed.stderr and "run8" in failed.stderr


def test_ls_lists_kind_size_and_time_as_text_and_json(root: str, tmp_path: Path) -> None:
    ok("save", str(make_tree(tmp_path / "tree")), f"{root}/a/dir")
    ok("save", "-", f"{root}/a/bytes", stdin=b"12345")
    lines = ok("ls", f"{root}/a/").splitlines()
    assert [line.split()[0] for line in lines] == ["bytes", "dir"]
    assert lines[0].split()[1] == "5" and lines[0].split()[3] == f"{root}/a/bytes"
    assert lines[0].split()[2].endswith("Z")  # UTC time
    rows = json.loads(ok("ls", "--json", f"{root}/a/"))
    assert [(row["uri"], row["kind"]) for row in rows] == [(f"{root}/a/bytes", "bytes"), (f"{root}/a/dir", "dir")]
    assert rows[0]["size"] == 5 and rows[0]["modified"].endswith("Z") and len(rows[0]["crc32"]) == 8
    assert "nothing-here" in fails(1, "ls", "--json", f"{root}/nothing-here/")  # as aws s3 ls: exit 1


def test_save_load_verify_and_gc_give_their_result_as_json(root: str, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    saved = json.loads(ok("save", "-", f"{root}/j", "--json", stdin=data))
    assert saved == {"uri": f"{root}/j", "kind": "bytes", "size": len(data), "stored": len(data)}
    tree = make_tree(tmp_path / "tree")
    files = sum(path.stat().st_size for path in tree.rglob("*") if path.is_file() and not path.is_symlink())
    saved = json.loads(ok("save", str(tree), f"{root}/t", "--json"))
    assert saved["kind"] == "dir" and saved["size"] == files and 0 < saved["stored"] < files
    checked = json.loads(ok("verify", f"{root}/j", "--json"))
    assert checked["uri"] == f"{root}/j" and checked["kind"] == "bytes" and checked["size"] == len(data)
    assert checked["crc32"] == f"{zlib.crc32(data):08x}"
    restored = json.loads(ok("load", f"{root}/j", str(tmp_path / "out"), "--json"))
    assert restored == {"uri": f"{root}/j", "dest": str(tmp_path / "out"), "kind": "file", "size": len(data)}
    assert (tmp_path / "out").read_bytes() == data
    assert json.loads(ok("gc", root, "--json")) == {
        "dry_run": False,
        "unfinished_saves": [],
        "distributed_saves": [],
        "incremental_packs": [],
        "runs": [],
    }
    assert "DEST '-' takes for the bytes" in fails(2, "load", f"{root}/j", "-", "--json")


def test_save_dry_run_says_what_it_would_save_and_replace_and_writes_nothing(root: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    files = sum(path.stat().st_size for path in tree.rglob("*") if path.is_file() and not path.is_symlink())
    said = ok("save", "--dry-run", str(tree), f"{root}/d")
    assert said == f"would save {tree} (dir, {files / 1024 / 1024:.1f} MiB) to {root}/d: a new checkpoint\n"
    fails(3, "verify", f"{root}/d")  # nothing was written
    ok("save", "-", f"{root}/d", stdin=b"x" * 2048)
    said = ok("save", "--dry-run", str(tree), f"{root}/d")
    assert said.endswith(f"to {root}/d: replacing the checkpoint there (2.0 KiB)\n"), said
    planned = json.loads(ok("save", "--dry-run", "--json", str(tree), f"{root}/d"))
    assert planned == {"uri": f"{root}/d", "kind": "dir", "size": files, "dry_run": True, "replaces": 2048}
    assert json.loads(ok("verify", f"{root}/d", "--json"))["size"] == 2048  # still the old one
    assert "no such file or directory" in fails(2, "save", "--dry-run", str(tmp_path / "missing"), f"{root}/d")


def test_save_dry_run_reaches_the_store(moto_server: MotoServer, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    assert "does not exist" in fails(1, "save", "--dry-run", str(tmp_path / "f"), "s3://no-such-bucket-4711/x")


def test_rm_removes_and_a_second_rm_says_there_is_none(root: str) -> None:
    ok("save", "-", f"{root}/x", stdin=b"x")
    assert ok("rm", f"{root}/x") == f"removed {root}/x\n"
    assert "no such checkpoint" in fails(3, "rm", f"{root}/x")
    if root.startswith("s3://"):  # an empty prefix is not there at all: exit 1, as aws s3 ls
        assert "nothing there" in fails(1, "ls", f"{root}/")
    else:  # the folder remains, empty
        assert ok("ls", f"{root}/") == ""


def test_ls_of_a_prefix_that_names_nothing_exits_1(root: str, tmp_path: Path) -> None:
    assert f"{root}/missing" in fails(1, "ls", f"{root}/missing")
    assert fails(1, "ls", "--json", f"{root}/missing").startswith("checkpointio: error: ")
    ok("save", "-", f"{root}/run-1/a", stdin=b"x")
    assert ok("ls", f"{root}/run").rstrip().endswith(f"{root}/run-1/a")  # a name prefix that matches
    (tmp_path / "empty").mkdir()
    assert ok("ls", str(tmp_path / "empty")) == ""  # an existing folder may be empty
    assert "no such file or folder" in fails(1, "ls", str(tmp_path / "no" / "such" / "path"))


def test_ls_of_a_whole_empty_bucket_is_empty_not_an_error(moto_server: MotoServer) -> None:
    assert ok("ls", f"s3://{moto_server.new_bucket()}") == ""


def _put_foreign(root: str, name: str, data: bytes) -> None:
    """An object or file another tool wrote under ``root``: no checkpointio record."""
    if root.startswith("s3://"):
        import boto3

        bucket, _, key = root[len("s3://") :].partition("/")
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")
        client.put_object(Bucket=bucket, Key=f"{key}/{name}", Body=data)
    else:
        (Path(root) / name).parent.mkdir(parents=True, exist_ok=True)
        (Path(root) / name).write_bytes(data)


def test_rm_of_several_uris_removes_each_and_reports_the_missing(root: str) -> None:
    # Saved and read back through the library: the command line runs only the commands tested.
    for name in ("a", "b", "c"):
        Checkpoint(f"{root}/{name}").save_sync(name.encode())

    def stored(name: str) -> bytes | None:
        with Checkpoint(f"{root}/{name}-reader", src=f"{root}/{name}") as reader:
            found = reader.load_bytes_sync()
        return bytes(found) if found is not None else None

    result = cli("rm", f"{root}/a", f"{root}/missing", f"{root}/b")
    assert result.returncode == 3, result.stderr
    assert result.stdout == f"removed {root}/a\nremoved {root}/b\n"
    assert result.stderr == f"checkpointio: error: {root}/missing: no such checkpoint\n"
    assert (stored("a"), stored("b")) == (None, None)
    assert "mistyped scheme" in fails(2, "rm", f"{root}/c", "s3:/bucket/x")  # checked before removing any
    assert ok("rm", "--dry-run", f"{root}/c") == f"would remove {root}/c\n"
    assert stored("c") == b"c"


def test_rm_of_a_local_file_checkpointio_did_not_write_needs_force(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('training')\n")  # rm train.py: a user's own file, not a checkpoint
    ok("save", "-", str(tmp_path / "ckpt"), stdin=b"x")
    message = fails(2, "rm", str(tmp_path / "ckpt"), str(script))
    assert message == f"checkpointio: error: {script} is a file checkpointio did not write; --force removes it"
    assert script.read_text() == "print('training')\n"
    assert (tmp_path / "ckpt").exists()  # checked before anything is removed
    assert fails(2, "rm", "--dry-run", str(script)).endswith("--force removes it")
    removed = ok("rm", "--force", str(script), str(tmp_path / "ckpt"))
    assert removed == f"removed {script}\nremoved {tmp_path / 'ckpt'}\n"
    assert not script.exists() and not (tmp_path / "ckpt").exists()


def test_save_incremental_with_a_parent_uploads_only_what_changed(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import checkpointio._checkpoint

    tree = tmp_path / "tree"
    tree.mkdir()
    for index in range(16):
        (tree / f"shard-{index}.bin").write_bytes(os.urandom(256 * 1024))  # incompressible: 4 MiB in all
    ok("save", "--incremental", str(tree), f"{root}/step-1")
    (tree / "shard-3.bin").write_bytes(os.urandom(256 * 1024))  # one shard of 16 changed
    stores: list[CountingStore] = []
    real = open_store

    async def counted(scheme: str, config: TransferConfig) -> Store:
        stores.append(CountingStore(await real(scheme, config)))
        return stores[-1]

    monkeypatch.setattr(checkpointio._checkpoint, "open_store", counted)
    parent = f"{root}/step-1"
    assert main(["-q", "save", "--incremental", str(tree), f"{root}/step-2", "--parent", parent]) == 0
    with_parent = sum(store.sent for store in stores)
    stores.clear()
    assert main(["-q", "save", "--incremental", str(tree), f"{root}/step-3"]) == 0  # a new key, no parent
    without = sum(store.sent for store in stores)
    assert without > 4 * 1024 * 1024  # the whole tree again
    assert with_parent < without / 8, (with_parent, without)  # about one shard of 16, and the manifest
    ok("load", f"{root}/step-2", str(tmp_path / "restored"))
    assert snapshot(tmp_path / "restored") == snapshot(tree)


def test_save_parent_errors_are_clear_and_write_nothing(root: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    ok("save", "--incremental", str(tree), f"{root}/inc")
    ok("save", str(tree), f"{root}/plain")
    dest = f"{root}/new"
    line = fails(2, "save", str(tree), dest, "--parent", f"{root}/inc")
    assert line == "checkpointio: error: --parent names what an incremental save reuses: add --incremental"
    line = fails(3, "save", "--incremental", str(tree), dest, "--parent", f"{root}/missing")
    assert line == f"checkpointio: error: --parent {root}/missing: no such checkpoint"
    line = fails(2, "save", "--incremental", str(tree), dest, "--parent", f"{root}/plain")
    assert line == (
        f"checkpointio: error: --parent {root}/plain is not an incremental checkpoint (a dir one): only an "
        "incremental checkpoint's chunks can be reused"
    )
    line = fails(2, "save", "--incremental", str(tree), dest, "--parent", f"{root}/inc", "--parent", f"{root}/x/inc")
    assert line.startswith(f"checkpointio: error: --parent {root}/x/inc is not in the folder of {dest} ({root}/)")
    listed = ok("ls", f"{root}/")
    assert f"{root}/new" not in listed and "incremental" in listed  # nothing saved by any of them


def test_rm_of_a_folder_is_a_usage_error_naming_rm_recursive(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "run")
    before = snapshot(folder)
    ok("save", "-", str(tmp_path / "ckpt"), stdin=b"x")
    for args in (["rm"], ["rm", "--dry-run"], ["rm", "--force"]):
        message = fails(2, *args, str(tmp_path / "ckpt"), str(folder))
        hint = "rm --recursive removes the checkpoints in it"
        assert message == f"checkpointio: error: {folder} is a folder, not a checkpoint: {hint}"
    assert snapshot(folder) == before and (tmp_path / "ckpt").exists()  # checked before anything is removed
    # The other commands taking a checkpoint URI say the same kind of thing with the same code.
    assert fails(2, "verify", str(folder)).endswith(f"{folder}: is a directory, not a checkpoint file")
    assert fails(2, "load", str(folder), str(tmp_path / "out")).endswith("is a directory, not a checkpoint file")


def test_an_empty_prefix_is_refused_as_a_prefix(tmp_path: Path) -> None:
    for args in (["ls"], ["rm", "--recursive"], ["gc"]):
        message = fails(2, *args, "", cwd=tmp_path)
        assert message == (
            "checkpointio: error: a prefix must not be empty: give a folder (. for the current one), the start of "
            "names, or s3://bucket/..."
        )
    assert fails(2, "load", "", str(tmp_path / "out")) == "checkpointio: error: a checkpoint URI must not be empty"


def test_load_only_errors_name_the_option(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    ok("save", str(tree), str(tmp_path / "ckpt"))
    for pattern in ("", "/abs", "../up"):
        message = fails(2, "load", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--only", pattern)
        assert message == (
            f"checkpointio: error: --only pattern {pattern!r} must name paths inside the checkpoint (relative, "
            "without '..')"
        )
    message = fails(1, "load", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--only", "nothing/*")
    assert message.endswith("no entry matches 'nothing/*' (--only patterns)")
    assert not (tmp_path / "out").exists()


def test_rm_recursive_removes_only_checkpoints_and_dry_run_only_lists_them(root: str) -> None:
    for name in ("run/a", "run/sub/b", "run-2/c", "other/d"):
        ok("save", "-", f"{root}/{name}", stdin=name.encode())
    _put_foreign(root, "run/notes.txt", b"a user's file")
    listed = ok("ls", f"{root}/")
    expected = [f"would remove {root}/run/a", f"would remove {root}/run/sub/b"]
    skipped = f"skipped {root}/run/notes.txt (no checkpointio record: not removed)"
    assert ok("rm", "-r", "--dry-run", f"{root}/run/").splitlines() == [*expected, skipped]
    assert ok("ls", f"{root}/") == listed  # nothing removed
    assert ok("rm", "--recursive", f"{root}/run/").splitlines() == [
        f"removed {root}/run/a",
        f"removed {root}/run/sub/b",
        skipped,
    ]
    remaining = [line.split()[-1] for line in ok("ls", f"{root}/").splitlines()]
    assert remaining == [f"{root}/other/d", f"{root}/run-2/c", f"{root}/run/notes.txt"]
    assert "run/missing" in fails(1, "rm", "-r", f"{root}/run/missing")


def test_rm_recursive_and_gc_refuse_a_prefix_covering_the_current_home_or_root_folder(tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    (work / "sub").mkdir(parents=True)
    home.mkdir()
    ok("save", "-", str(work / "sub" / "ck"), stdin=b"kept")
    ok("save", "-", str(home / "ck"), stdin=b"kept")
    left = work / "sub" / ".ck.partial-0123456789abcdef"
    left.write_bytes(b"an unfinished save")
    env = {"HOME": str(home)}
    for command, why in [
        (["rm", "-r", "."], "the current folder"),
        (["rm", "-r", "--dry-run", "."], "the current folder"),
        (["gc", ".", "--older-than", "0"], "the current folder"),
        (["rm", "-r", ".."], "a parent of the current folder"),
        (["gc", "sub/..", "--older-than", "0"], "the current folder"),
        (["rm", "-r", "/"], "the root folder"),
        (["gc", "/", "--older-than", "0"], "the root folder"),
        (["rm", "-r", str(home)], "the home folder"),
        (["gc", str(home), "--older-than", "0"], "the home folder"),
        (["rm", "-r", str(tmp_path / "wo")], "the current folder"),  # a name prefix that takes it in
    ]:
        line = fails(2, *command, cwd=work, env=env)
        assert "refusing to" in line and why in line, (command, line)
    assert "mistyped" in fails(2, "rm", "-r", str(work / "sub"), "s3:/x", cwd=work)  # all checked first
    assert (work / "sub" / "ck").read_bytes() == b"kept" and (home / "ck").read_bytes() == b"kept" and left.exists()
    assert ok("rm", "-r", str(work / "sub")) == f"removed {work / 'sub' / 'ck'}\n"  # below them: fine


def test_verify_passes_intact_checkpoints_and_fails_corrupt_ones(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok("save", str(make_tree(tmp_path / "tree")), str(store / "dir"))
    assert ok("verify", str(store / "dir")).startswith(f"ok {store / 'dir'} (dir, ")
    path = store / "dir"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the record still matches: only the content changed
    line = fails(4, "verify", str(path))
    assert str(path) in line
    assert "no such checkpoint" in fails(3, "verify", str(store / "missing"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"]  # verify wrote nothing


def test_gc_aborts_incomplete_uploads_and_dry_run_only_lists_them(moto_server: MotoServer) -> None:
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    upload = client.create_multipart_upload(Bucket=bucket, Key="runs/killed")
    client.upload_part(Bucket=bucket, Key="runs/killed", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 10)
    client.create_multipart_upload(Bucket=bucket, Key="elsewhere/other")

    listed = ok("gc", f"s3://{bucket}/runs/", "--older-than", "0", "--dry-run")
    assert listed.startswith(f"would abort s3://{bucket}/runs/killed {upload['UploadId']} (started ")
    assert len(client.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 2

    aborted = ok("gc", f"s3://{bucket}/runs/", "--older-than", "0")
    assert aborted.startswith(f"aborted s3://{bucket}/runs/killed {upload['UploadId']}")
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]] == ["elsewhere/other"]
    assert ok("gc", f"s3://{bucket}", "--older-than", "0").startswith(f"aborted s3://{bucket}/elsewhere/other")
    assert ok("gc", f"s3://{bucket}", "--older-than", "0") == f"nothing to clean up under s3://{bucket}\n"


def test_s3_request_options_from_the_command_line_reach_the_saved_object(moto_server: MotoServer) -> None:
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    options = ["--server-side-encryption", "aws:kms", "--sse-kms-key-id", "alias/ckpt", "--bucket-key-enabled"]
    options += ["--storage-class", "ONEZONE_IA", "--tags", "team=ml%20research&run=7"]
    options += ["--expected-bucket-owner", "123456789012", "--requester-pays"]
    ok("save", "-", f"s3://{bucket}/runs/a", *options, stdin=b"state")
    head = client.head_object(Bucket=bucket, Key="runs/a")
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"], head["BucketKeyEnabled"], head["StorageClass"]) == (
        "aws:kms",
        "alias/ckpt",
        True,
        "ONEZONE_IA",
    )
    tags = client.get_object_tagging(Bucket=bucket, Key="runs/a")["TagSet"]
    assert {tag["Key"]: tag["Value"] for tag in tags} == {"team": "ml research", "run": "7"}
    assert output("load", f"s3://{bucket}/runs/a", "-", "--requester-pays").stdout == b"state"
    assert "storage_class 'GLACIER' is refused" in fails(
        2, "save", "-", f"s3://{bucket}/b", "--storage-class", "GLACIER"
    )
    for tags, message in (("team", "not tags: 'team'"), ("a=1&a=2", "a tag key given twice: 'a=1&a=2'")):
        refused = cli("save", "-", f"s3://{bucket}/b", "--tags", tags)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_gc_removes_temporary_files_a_killed_local_save_left(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok("save", "-", str(store / "kept"), stdin=b"done")
    left = store / ".killed.partial-0123456789abcdef"
    left.write_bytes(b"half")
    assert ok("gc", str(store)) == f"nothing to clean up under {store}\n"  # younger than a day: may be running
    assert ok("gc", str(store), "--older-than", "0").startswith(f"aborted {store / 'killed'} {left}")
    assert not left.exists() and (store / "kept").exists()


def test_bad_input_fails_with_one_line_and_an_exit_code(tmp_path: Path) -> None:
    assert "no such file or directory" in fails(2, "save", str(tmp_path / "missing"), str(tmp_path / "ck"))
    assert "no such checkpoint" in fails(3, "load", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert "part_size must be 5 MiB to 5 GiB" in fails(2, "save", "-", str(tmp_path / "ck"), "--part-size", "1MiB")
    assert "no store handles 'ftp'" in fails(2, "ls", "ftp://host/x")
    ok("save", "-", str(tmp_path / "ck"), stdin=b"x")
    (tmp_path / "out").mkdir()
    assert "already exists" in fails(2, "load", str(tmp_path / "ck"), str(tmp_path / "out"))
    ok("load", "--force", str(tmp_path / "ck"), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == b"x"


def test_sizes_read_k_m_g_t_as_powers_of_1024_as_aws_and_rclone_do(tmp_path: Path) -> None:
    mib = 1024 * 1024
    assert [parse_size(text) for text in ("5M", "5MB", "5MiB", "5m", "5Mi", " 5 mb ")] == [5 * mib] * 6
    assert [parse_size(text) for text in ("64K", "1.5G", "1T", "1048576", "0", "7B")] == [
        64 * 1024,
        3 * 512 * mib,
        1024**4,
        mib,
        0,
        7,
    ]
    data = os.urandom(6 * mib)  # 5M is S3's smallest part, 5 MiB: it was read as 5,000,000 and refused
    ok("save", "-", str(tmp_path / "ck"), "--part-size", "5M", "--multipart-threshold", "5MB", stdin=data)
    assert (tmp_path / "ck").read_bytes() == data
    for wrong in ("5X", "M", "-1M", "5 M B"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
            parse_size(wrong)


def test_a_mistyped_scheme_or_bad_bucket_is_refused_and_nothing_is_saved(tmp_path: Path) -> None:
    (tmp_path / "state.bin").write_bytes(b"state")
    for uri in ("s3:/bucket/x", "s3:bucket/x", "S3:/bucket/x", "gs:/bucket/x"):
        assert "mistyped scheme" in fails(2, "save", "state.bin", uri, cwd=tmp_path)
        assert "mistyped scheme" in fails(2, "ls", uri, cwd=tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["state.bin"]  # no folder named s3:
    assert "not a valid S3 bucket name" in fails(2, "save", "state.bin", "s3://bücket/x", cwd=tmp_path)
    assert "ends with '/'" in fails(2, "save", "state.bin", "s3://bucket/runs/7/", cwd=tmp_path)


def test_a_uri_where_a_local_path_goes_is_refused_and_nothing_named_after_it_is_made(tmp_path: Path) -> None:
    """load's DEST and save's SRC are local paths: a URI there (the arguments swapped, or load taken
    for a copy to S3) made a local folder ``s3:`` holding ``bucket/key``."""
    ok("save", "-", str(tmp_path / "ck"), stdin=b"restored bytes")
    before = snapshot(tmp_path)
    for dest in ("s3://bucket/out", "S3://bucket/out", "memory://out", "gs://bucket/out"):
        line = fails(2, "load", "ck", dest, cwd=tmp_path)
        assert line.startswith(f"checkpointio: error: DEST must be a local path to create, got the URI {dest!r}"), line
    assert "mistyped scheme" in fails(2, "load", "ck", "s3:/bucket/out", cwd=tmp_path)
    line = fails(2, "save", "s3://bucket/x", "ck2", cwd=tmp_path)
    assert line.startswith("checkpointio: error: SRC must be a local path to save, got the URI 's3://bucket/x'"), line
    assert snapshot(tmp_path) == before  # no folder named s3:, memory: or gs:, no checkpoint ck2
    ok("load", "ck", f"file://{tmp_path}/out", cwd=tmp_path)  # a file URI is a local path
    assert (tmp_path / "out").read_bytes() == b"restored bytes"
    ok("load", "ck", "./s3:/out", cwd=tmp_path)  # a folder of that name, as the URI rules have it
    assert (tmp_path / "s3:" / "out").read_bytes() == b"restored bytes"


def test_memory_uris_are_refused_by_the_command_line_whose_process_would_take_them_along(tmp_path: Path) -> None:
    """memory:// lives in one process: a save there said 'saved' and was gone when the command
    exited, and every other command found nothing."""
    (tmp_path / "state.bin").write_bytes(b"state")
    for args in (
        ("save", str(tmp_path / "state.bin"), "memory://runs/a"),
        ("load", "memory://runs/a", str(tmp_path / "out")),
        ("verify", "memory://runs/a"),
        ("ls", "memory://runs/"),
        ("rm", str(tmp_path / "state.bin"), "memory://runs/a"),
        ("gc", "memory://runs/"),
    ):
        line = fails(2, *args)
        assert "memory:// checkpoints live in the process that saved them" in line, line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["state.bin"]  # rm removed nothing either
    uri = f"memory://{tmp_path.name}/a"  # in a program's own process, memory:// is its store, as for the library
    assert main(["-q", "save", str(tmp_path / "state.bin"), uri]) == 0
    assert Checkpoint("memory://x/y", src=uri).load_bytes_sync() == b"state"


def test_an_existing_dest_is_refused_with_a_hint_that_fits_what_it_is(tmp_path: Path) -> None:
    ok("save", "-", str(tmp_path / "ck"), stdin=b"restored bytes")
    (tmp_path / "train.py").write_text("print('train')")
    (tmp_path / "out").mkdir()
    line = fails(2, "load", str(tmp_path / "ck"), str(tmp_path / "train.py"))
    assert line == f"checkpointio: error: {tmp_path / 'train.py'} already exists (not a folder); --force replaces it"
    line = fails(2, "load", str(tmp_path / "ck"), str(tmp_path / "out"))  # a folder: the hint says where NAME goes
    assert line == (
        f"checkpointio: error: {tmp_path / 'out'} already exists. DEST is the name to create: the checkpoint is "
        f"restored as DEST, not into it (e.g. {tmp_path / 'out' / 'NAME'}); --force replaces it"
    )
    assert (tmp_path / "train.py").read_text() == "print('train')"


def test_load_refuses_a_dest_it_must_never_replace_even_with_force(tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    home.mkdir()
    (work / "sub").mkdir(parents=True)
    (work / "train.py").write_text("print('train')")
    (work / "here").symlink_to(".")
    ok("save", "-", str(tmp_path / "ck"), stdin=b"restored bytes")
    ok("save", str(make_tree(tmp_path / "tree")), str(tmp_path / "tree-ck"))
    before = snapshot(tmp_path)
    env = {"HOME": str(home)}
    for checkpoint, dest, why in [
        ("ck", ".", "it is the current folder"),
        ("tree-ck", ".", "it is the current folder"),  # a directory checkpoint too
        ("ck", "..", "it is a parent of the current folder"),
        ("tree-ck", "..", "it is a parent of the current folder"),
        ("ck", "sub/..", "it is the current folder"),
        ("ck", "here", "it is the current folder"),  # a symlink to it
        ("ck", "/", "it is the root folder"),
        ("tree-ck", str(home), "it is the home folder"),
        ("ck", str(tmp_path), "it is a parent of the current folder"),
    ]:
        line = fails(2, "load", str(tmp_path / checkpoint), dest, "--force", cwd=work, env=env)
        assert "refusing to replace" in line and why in line and "DEST is the name to create" in line, line
    # the folder holding a local checkpoint, and the checkpoint itself
    assert "holding the checkpoint being read" in fails(2, "load", str(tmp_path / "ck"), str(tmp_path), "--force")
    assert "it is the checkpoint being read" in fails(2, "load", str(tmp_path / "ck"), str(tmp_path / "ck"), "-f")
    assert snapshot(tmp_path) == before  # nothing moved, nothing lost


def test_a_file_checkpoint_never_replaces_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    ok("save", "-", str(tmp_path / "ck"), stdin=b"restored bytes")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "train.py").write_text("print('train')")
    line = fails(2, "load", str(tmp_path / "ck"), str(tmp_path / "project"), "--force")
    assert "is a folder that is not empty" in line and f"{tmp_path / 'project' / 'NAME'}" in line
    assert (tmp_path / "project" / "train.py").read_text() == "print('train')"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".ck.checkpointio", "ck", "project"]
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: --force replaces it
    ok("load", str(tmp_path / "ck"), str(tmp_path / "empty"), "--force")
    assert (tmp_path / "empty").read_bytes() == b"restored bytes"


def test_save_does_not_replace_a_local_file_checkpointio_did_not_write_unless_forced(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "ckpt")
    (tmp_path / "train.py").write_text("print('train')")
    line = fails(2, "save", str(tree), str(tmp_path / "train.py"))  # the arguments swapped
    assert "did not write" in line and "--force" in line
    assert (tmp_path / "train.py").read_text() == "print('train')"
    ok("save", "-", str(tmp_path / "ck"), stdin=b"one")
    ok("save", "-", str(tmp_path / "ck"), stdin=b"two")  # a checkpoint of ours is replaced as before
    ok("save", "--force", str(tree), str(tmp_path / "train.py"))
    ok("load", str(tmp_path / "train.py"), str(tmp_path / "restored"))
    assert snapshot(tmp_path / "restored") == snapshot(tree)


def test_a_file_where_a_folder_of_the_destination_must_be_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("notes")
    (tmp_path / "folder").mkdir()
    ok("save", "-", str(tmp_path / "ck"), stdin=b"x")
    expected = f"{tmp_path / 'notes'} is a file, not a folder"
    assert expected in fails(2, "load", str(tmp_path / "ck"), str(tmp_path / "notes" / "out"))
    assert expected in fails(2, "load", str(tmp_path / "ck"), str(tmp_path / "notes" / "a" / "b"))
    assert expected in fails(2, "save", "-", str(tmp_path / "notes" / "ck"))
    assert "is a directory; a checkpoint URI names a file" in fails(2, "save", "-", str(tmp_path / "folder"))
    assert (tmp_path / "notes").read_text() == "notes" and list((tmp_path / "folder").iterdir()) == []


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    result = cli("-v", "load", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.returncode == 3 and "Traceback" in result.stderr


def test_verbose_says_what_is_retried_and_max_attempts_counts_the_first_try(moto_server: MotoServer) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: every attempt fails to connect
    args = ("ls", "s3://bucket/x", "--endpoint-url", endpoint, "--max-attempts", "3", "--connect-timeout", "1")
    result = cli("-v", *args)
    assert result.returncode == 1, result.stderr
    retrying = " INFO checkpointio._stores._s3._client: retrying "
    retries = [line for line in result.stderr.splitlines() if retrying in line]
    assert [line.split("(attempt ")[1].split(")")[0] for line in retries] == ["2 of 3", "3 of 3"], result.stderr
    assert all(f"ListObjectsV2 {endpoint}/bucket" in line for line in retries), retries
    assert all("after EndpointConnectionError: Could not connect to the endpoint URL" in line for line in retries)
    assert "retrying" not in fails(1, *args)  # without -v: the error line alone


def test_warnings_are_one_line_prefixed_once(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "data").write_bytes(b"x")
    os.mkfifo(tmp_path / "tree" / "pipe")
    result = cli("save", str(tmp_path / "tree"), str(tmp_path / "ck"))
    assert result.returncode == 0
    pipe = tmp_path / "tree" / "pipe"
    assert result.stderr == f"checkpointio: warning: skipping a named pipe (FIFO) {pipe} (it holds no data to save)\n"


def test_store_failures_name_the_uri(moto_server: MotoServer) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    line = fails(1, "ls", "s3://bucket/x", "--endpoint-url", endpoint, "--max-attempts", "1", "--connect-timeout", "2")
    assert "cannot reach the store" in line and "s3://bucket/x" in line
    missing = fails(1, "save", "-", "s3://no-such-bucket-4711/x")  # the fact last, not "(upload the checkpoint)"
    assert missing.endswith(": cannot upload the checkpoint: bucket 'no-such-bucket-4711' does not exist"), missing
    guarded = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        wrong = {"AWS_ACCESS_KEY_ID": "AKIANOTAREALKEY", "AWS_SECRET_ACCESS_KEY": "wrong"}
        args = ("load", "s3://guarded/a", "out", "--endpoint-url", guarded.endpoint, "--max-attempts", "1")
        assert "access denied" in fails(1, *args, env=wrong)
    finally:
        stop(guarded.process)


def test_settings_no_s3_client_can_be_made_with_give_one_line_naming_the_uri(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    bucket = moto_server.new_bucket()
    (tmp_path / "state.bin").write_bytes(b"state")
    ok("save", str(tmp_path / "state.bin"), f"s3://{bucket}/a")
    profile = ("--profile", "no-such-profile-4711")
    for args in (
        ("save", str(tmp_path / "state.bin"), f"s3://{bucket}/b", *profile),
        ("load", f"s3://{bucket}/a", str(tmp_path / "out"), *profile),
        ("verify", f"s3://{bucket}/a", *profile),
        ("ls", f"s3://{bucket}/", *profile),
        ("rm", f"s3://{bucket}/a", *profile),
        ("gc", f"s3://{bucket}/", *profile),
    ):
        line = fails(1, *args)
        uri = next(arg for arg in args if arg.startswith("s3://"))
        assert line.startswith(f"checkpointio: error: {uri}: could not set up the S3 client: "), line
        assert "no-such-profile-4711" in line
    assert "endpoint_url must be an http:// or https:// URL" in fails(
        2, "save", str(tmp_path / "state.bin"), f"s3://{bucket}/b", "--endpoint-url", "127.0.0.1:9000"
    )
    assert "region_name must be a region name" in fails(2, "ls", f"s3://{bucket}/", "--region", "us east 1")
    line = fails(2, "ls", f"s3://{bucket}/", env={"AWS_ENDPOINT_URL_S3": "localhost:9000"})
    assert line.startswith(f"checkpointio: error: s3://{bucket}/: AWS_ENDPOINT_URL_S3='localhost:9000' is not"), line
    assert not (tmp_path / "out").exists()
    assert ok("load", f"s3://{bucket}/a", "-") == "state"  # nothing was removed


def test_a_truncated_archive_is_reported_as_corrupt(tmp_path: Path) -> None:
    import tarfile

    (tmp_path / "data.bin").write_bytes(os.urandom(200_000))
    with tarfile.open(tmp_path / "whole.tar.gz", "w:gz") as tar:  # as another tool writes them
        tar.add(tmp_path / "data.bin", arcname="data.bin")
    whole = (tmp_path / "whole.tar.gz").read_bytes()
    (tmp_path / "bad.tar.gz").write_bytes(whole[: len(whole) // 2])
    assert "truncated" in fails(4, "load", str(tmp_path / "bad.tar.gz"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.tar.gz", "data.bin", "whole.tar.gz"]


def test_each_command_has_help_with_an_example() -> None:
    for command in ("save", "load", "ls", "rm", "verify", "gc", "demo"):
        text = ok(command, "--help")
        assert "example:\n  checkpointio " in text, command
    module = subprocess.run([sys.executable, "-m", "checkpointio", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout.startswith("checkpointio ")


def test_each_positional_argument_says_what_it_takes() -> None:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    described = {
        (name, action.metavar): action.help
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not action.option_strings
    }
    assert described[("save", "URI")] == described[("load", "URI")] == described[("verify", "URI")]
    assert described[("gc", "PREFIX")] == "a folder or s3://bucket[/prefix]"
    assert all(described.values()), [key for key, text in described.items() if not text]


def test_each_command_lists_only_the_settings_that_apply_with_readable_defaults() -> None:
    moving = ("--part-size SIZE", "--max-concurrency N", "--chunk-size SIZE", "--pipeline-depth N")
    writing = ("--multipart-threshold SIZE", "--compression-level N", "--no-flexible-checksums")
    receiving = ("--receive-workers N",)
    reaching = ("--endpoint-url", "--region REGION", "--profile", "--addressing-style", "--max-attempts N")
    for command in ("save", "load", "ls", "rm", "verify", "gc", "demo"):
        text = " ".join(ok(command, "--help").split())  # argparse wraps lines where it likes
        assert all((flag in text) == (command in ("save", "load", "verify")) for flag in moving), command
        assert all((flag in text) == (command == "save") for flag in writing), command
        assert all((flag in text) == (command in ("load", "verify")) for flag in receiving), command
        assert all((flag in text) == (command != "demo") for flag in reaching), command
        assert "--region-name" not in text and "None" not in text and "16777216" not in text, command
    save = " ".join(ok("save", "--help").split())
    assert "--part-size SIZE Size of one multipart part" in save and "(default: 16 MiB)" in save
    assert "(default: 1 MiB)" in save and "(default: 10 s)" in save and "(default: on)" in save
    assert "--region REGION S3 region (default: the AWS configuration's)" in save
    # one set of flags still goes to every command (scripts, aliases): those that do not apply are ignored
    assert build_parser().parse_args(["ls", "--compression-level", "3", "--part-size", "5M", "x"]).part_size == 5 << 20
    for spelling in ("--region", "--region-name"):  # aws's name, and the field's, kept for scripts
        assert build_parser().parse_args(["ls", spelling, "eu-west-3", "x"]).region_name == "eu-west-3"


def test_the_help_of_each_setting_is_its_fields_documentation_with_its_default() -> None:
    # every option listed (save lists every TransferConfig field but the load-only ones, load those
    # that apply to it) shows the whole of the field's help text and its default as a user would write it
    load_only = {"receive_workers"}
    wide = {"COLUMNS": "10000"}  # one line per option: argparse would break lines at hyphens too
    for command in ("save", "load"):
        shown = " ".join(cli(command, "--help", env=wide).stdout.split())
        section = shown[shown.index("transfer settings (") : shown.index("example:")]
        options = ["--" + entry for entry in section.split(" --")[1:]]
        listed = 0
        for setting in dataclasses.fields(TransferConfig):
            text, unset = field_help(setting.name)
            flag = "--region" if setting.name == "region_name" else "--" + setting.name.replace("_", "-")
            entries = [entry for entry in options if entry.startswith((flag + " ", "--no-" + flag[2:] + " "))]
            if not entries and (command == "load" or setting.name in load_only):
                continue  # not listed where it does not apply (test above)
            assert len(entries) == 1, (command, setting.name)
            assert text.rstrip(".") in entries[0] and "(default: " + (unset or "") in entries[0], (command, entries)
            listed += 1
        assert listed == len(dataclasses.fields(TransferConfig)) - len(load_only) if command == "save" else listed > 10
    save = " ".join(cli("save", "--help", env=wide).stdout.split())
    assert "(default: no tags)" in save and "(default: the bucket's default encryption)" in save
    assert "refused: their objects cannot be loaded without a restore. boto3's StorageClass" in save


def on_a_terminal(*args: str, cwd: Path, rows: int = 24, columns: int = 120) -> str:
    """Run a command in ``cwd`` with its standard error on a pseudo-terminal of that size; what it
    showed there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen([SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=slave, cwd=cwd)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert process.wait(timeout=60) == 0
    return output.decode(errors="replace")


# a terminal of 0 rows and columns: what ``script``, CI logs and some IDE consoles report
@pytest.mark.parametrize(("rows", "columns"), [(24, 120), (0, 0)])
def test_a_terminal_gets_a_progress_bar_and_quiet_silences_it(tmp_path: Path, rows: int, columns: int) -> None:
    (tmp_path / "big").write_bytes(os.urandom(8 * 1024 * 1024))
    shown = on_a_terminal("save", "big", "ck", cwd=tmp_path, rows=rows, columns=columns)
    assert "/ck: 100%|" in shown and "| 8.0 MiB/8.0 MiB [" in shown and "MiB/s" in shown
    assert "MB" not in shown  # binary units, as the summary line says them
    assert on_a_terminal("-q", "load", "ck", "out", cwd=tmp_path, rows=rows, columns=columns) == ""


def test_a_directory_save_shows_its_files_bytes_against_their_total_and_the_commit(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "random").write_bytes(os.urandom(6 * 1024 * 1024))
    (tree / "zeros").write_bytes(bytes(2 * 1024 * 1024))  # compresses to almost nothing
    shown = on_a_terminal("save", "tree", "ck", cwd=tmp_path)
    lines = shown.replace("\r", "\n").splitlines()
    assert any(line.endswith("| 0 B/8.0 MiB [00:00<?, ?/s]") for line in lines), shown  # the total, up front
    assert any(" 100%|" in line and "| 8.0 MiB/8.0 MiB [" in line and ", committing]" in line for line in lines), shown
    stored = (tmp_path / "ck").stat().st_size
    assert any(line.endswith(f"MiB/s, {stored / 1024 / 1024:.1f} MiB sent]") for line in lines), shown


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("sent", "code", "word"),
    [
        pytest.param(signal.SIGINT, 130, "interrupted", id="ctrl_c"),
        # SIGTERM, as timeout, kill, systemd, Docker, Kubernetes and Slurm send it
        pytest.param(signal.SIGTERM, 143, "terminated", id="sigterm"),
    ],
)
def test_a_signal_during_a_large_save_aborts_the_upload_and_exits_with_its_code(
    moto_server: MotoServer, proxy: FaultProxy, tmp_path: Path, sent: signal.Signals, code: int, word: str
) -> None:
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    (tmp_path / "big").write_bytes(os.urandom(40 * 1024 * 1024))
    proxy.delay, proxy.slow = 0.5, lambda method, target: method == "PUT" and "partNumber=" in target
    process = subprocess.Popen(
        [SCRIPT, "save", str(tmp_path / "big"), f"s3://{bucket}/big", "--endpoint-url", proxy.endpoint, *SMALL_PARTS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the upload to start")
    _wait_for(lambda: proxy.max_in_flight >= 1, "a part in flight")
    process.send_signal(sent)
    out, err = process.communicate(timeout=90)
    assert process.returncode == code, out + err
    assert err.strip().splitlines()[-1] == f"checkpointio: {word}", err
    assert "Traceback" not in err
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_ctrl_c_during_a_load_leaves_no_dest(moto_server: MotoServer, proxy: FaultProxy, tmp_path: Path) -> None:
    bucket = moto_server.new_bucket()
    ok("save", str(make_tree(tmp_path / "tree")), f"s3://{bucket}/dir", *SMALL_PARTS)
    (tmp_path / "tree" / "more.bin").write_bytes(os.urandom(30 * 1024 * 1024))
    ok("save", str(tmp_path / "tree"), f"s3://{bucket}/dir", *SMALL_PARTS, "--compression-level", "0")
    proxy.delay, proxy.slow = 0.5, lambda method, target: method == "GET"
    dest = tmp_path / "restored"
    args = ["load", f"s3://{bucket}/dir", str(dest), "--endpoint-url", proxy.endpoint, "--max-concurrency", "1"]
    process = subprocess.Popen([SCRIPT, *args, *SMALL_PARTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list(tmp_path.glob(".checkpointio-partial-*")), "the restore to start")
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=90)
    assert process.returncode == 130, out + err
    assert not dest.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tree"]  # no staging folder left either


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in sh, where ``$CLI`` is the console script (for redirections like ``>&-``)."""
    env = {**os.environ, "CLI": SCRIPT}
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_closed_standard_streams_give_one_line_errors_and_the_right_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "state.bin").write_bytes(b"state")
    ok("save", "-", str(tmp_path / "ck"), stdin=b"stored")
    for command, what in [
        ('"$CLI" save - fresh <&-', "standard input is closed"),
        ('"$CLI" load ck - >&-', "standard output is closed"),
        ('"$CLI" ls . >&-', "standard output is closed"),
        ('"$CLI" gc . --dry-run >&-', "standard output is closed"),
    ]:
        result = shell(command, tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("checkpointio: error: ") and what in lines[0], result.stderr
    assert not (tmp_path / "fresh").exists()
    # a closed stderr stops nothing: the work is done, with the exit code it deserves
    saved = shell('"$CLI" save state.bin copy 2>&- && "$CLI" load copy restored 2>&-', tmp_path)
    assert saved.returncode == 0 and saved.stdout.startswith(f"saved {tmp_path / 'copy'} (file"), saved
    assert (tmp_path / "restored").read_bytes() == b"state"
    assert shell('"$CLI" load missing out 2>&-', tmp_path).returncode == 3
    listed = shell('"$CLI" ls . 2>&-', tmp_path)
    assert listed.returncode == 0 and f"{tmp_path / 'copy'}" in listed.stdout
    # a closed stdout does not stop a save either: only its summary line is lost
    assert shell('"$CLI" save state.bin quiet >&-', tmp_path).returncode == 0
    assert (tmp_path / "quiet").read_bytes() == b"state"


@pytest.mark.timeout(300)
def test_demo_runs_from_the_installed_package(tmp_path: Path) -> None:
    result = subprocess.run(
        [SCRIPT, "demo", "--root", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,  # not the repository: nothing of examples/ is needed
        env={key: value for key, value in os.environ.items() if key != "CHECKPOINTIO_RUN_ID"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (
        "attempt 1 resumed from 4",
        "attempt 1 resumed at epoch 3 from epoch_2.json",
        "attempt 1 resumed at 4 with total 6",
        "process killed with SIGKILL (exit status -9)",
        "attempt 1 resumed from 3",
        "Every task resumed from its last checkpoint",
    ):
        assert line in result.stdout, result.stdout


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_gc_runs_older_than_removes_old_task_runs_and_nothing_else(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from checkpointio import TaskEnvironment, ctx

    if backend == "s3":
        server: MotoServer = request.getfixturevalue("moto_server")
        bucket = server.new_bucket()
        storage = f"s3://{bucket}/runs"
    else:
        storage = str(tmp_path / "runs")

    for run_id in ("old", "new"):

        @TaskEnvironment("e", storage=storage, run_id=run_id).task(retries=1)
        def job() -> None:
            ctx().checkpoint.save_sync(b"progress")
            raise RuntimeError("fails: the run keeps its attempts and claims")

        with pytest.raises(RuntimeError):
            job()
    ok("save", "-", f"{storage}/models/final", stdin=b"the model")  # not a run: never pruned
    if backend == "s3":
        server.client().put_object(Bucket=bucket, Key="runs/e/job/old/notes.txt", Body=b"mine")
        age = "0"  # S3 times cannot be set back: every run is old enough
        removed = ["new", "old"]
    else:
        (tmp_path / "runs" / "e" / "job" / "old" / "notes.txt").write_bytes(b"mine")
        when = time.time() - 3 * 86400
        for path in (tmp_path / "runs" / "e" / "job" / "old").iterdir():
            age_keeping_records(path, when)
        age = "2d"
        removed = ["old"]

    def runs_in(lines: str) -> list[str]:
        return [line.split(" (last written ")[0] for line in lines.splitlines()]

    # Oldest run first; the two S3 runs may share a timestamp or not, so compare them as sets.
    dry = runs_in(ok("gc", storage, "--runs-older-than", age, "--dry-run"))
    assert sorted(dry) == [f"would remove run {storage}/e/job/{run}" for run in removed]
    assert "attempt-1.claim" in ok("ls", f"{storage}/e/job/old/")  # the dry run removed nothing
    done = runs_in(ok("gc", storage, "--runs-older-than", age))
    assert sorted(done) == [f"removed run {storage}/e/job/{run}" for run in removed]
    left = ok("ls", storage)
    assert "models/final" in left and "e/job/old/notes.txt" in left and "e/job/old/attempt-" not in left
    assert ("e/job/new/attempt-1" in left) == (backend == "local")
    assert ok("gc", storage, "--runs-older-than", age) == f"nothing to clean up under {storage}\n"


def _tar_gz(*entries: bytes, after: bytes = b"") -> bytes:
    import gzip

    from checkpointio import _tar

    tar = b"".join(entries)
    return gzip.compress(tar + _tar.end_of_archive(len(tar))) + after


def _crafted_archives() -> dict[str, tuple[bytes, int, object]]:
    """Archive -> (stored bytes, the exit code of `verify` and `load`, the tree restored or the
    words the error has)."""
    import gzip

    from checkpointio._tar import DIRECTORY, FILE, SYMLINK, header

    def file(name: str, data: bytes) -> bytes:
        return header(name, FILE, size=len(data), mode=0o644) + data + bytes(-len(data) % 512)

    parts = [f"{i:02}" + "p" * 248 for i in range(15)]  # 3,764 bytes: over PATH_MAX under a long DEST
    return {
        # GNU tar's rule: a later entry replaces an earlier one of the same name (a folder stays)
        "file then folder": (
            _tar_gz(file("d", b"old"), header("d/", DIRECTORY, mode=0o755), file("d/f", b"new")),
            0,
            {"d": "dir", "d/f": b"new"},
        ),
        "symlink then folder": (
            _tar_gz(header("d", SYMLINK, link="x"), header("d/", DIRECTORY, mode=0o755)),
            0,
            {"d": "dir"},
        ),
        "name part over 255 bytes": (_tar_gz(file("n" * 256, b"x")), 4, "name part over 255 bytes"),
        "deeper than PATH_MAX once in DEST": (
            _tar_gz(file("/".join(parts) + "/f", b"deep")),
            0,
            {"/".join(parts[:end]): "dir" for end in range(1, 16)} | {"/".join(parts) + "/f": b"deep"},
        ),
        # 1,500 folders made, then a refusal: removing them recursed past Python's limit
        "1,500 folders deep, then refused": (
            _tar_gz(file("a/" * 1500 + "f", b"x"), header("dev", b"3")),
            4,
            "character device",
        ),
        "trailing garbage": (_tar_gz(file("f", b"x"), after=b"garbage!" * 4), 4, "trailing data after its end"),
        "empty first gzip member": (gzip.compress(b"") + _tar_gz(file("f", b"tree")), 0, {"f": b"tree"}),
    }


CRAFTED = _crafted_archives()


def _tree(top: Path) -> dict[str, object]:
    """What ``top`` holds: file bytes, "dir", or ("link", target), read relative to open folders
    (the paths can be longer than PATH_MAX)."""
    import stat

    found: dict[str, object] = {}

    def walk(fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(fd)):
            mode = os.lstat(name, dir_fd=fd).st_mode
            if stat.S_ISLNK(mode):
                found[prefix + name] = ("link", os.readlink(name, dir_fd=fd))
            elif stat.S_ISDIR(mode):
                found[prefix + name] = "dir"
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                try:
                    walk(child, f"{prefix}{name}/")
                finally:
                    os.close(child)
            else:
                with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as data:
                    found[prefix + name] = data.read()

    top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk(top_fd, "")
    finally:
        os.close(top_fd)
    return found


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_archives_give_verify_load_and_the_cli_one_outcome(
    root: str, tmp_path: Path, request: pytest.FixtureRequest, case: str
) -> None:
    from checkpointio import Checkpoint, CorruptCheckpointError

    data, code, expected = CRAFTED[case]
    if root.startswith("s3://"):
        bucket, _, prefix = root[5:].partition("/")
        moto: MotoServer = request.getfixturevalue("moto_server")
        moto.client().put_object(Bucket=bucket, Key=f"{prefix}/crafted", Body=data)
    else:
        Path(root).mkdir()
        (Path(root) / "crafted").write_bytes(data)
    uri = f"{root}/crafted"
    long = tmp_path / ("d" * 250) / ("d" * 250) / ("d" * 250)  # with the names: over PATH_MAX
    long.mkdir(parents=True)

    verify = cli("verify", uri)
    loaded = cli("load", uri, str(long / "cli"))
    try:
        with Checkpoint(str(tmp_path / "unused"), src=uri, workspace=long / "lib") as cp:
            restored = cp.load_sync()
        library = (0, "")
    except CorruptCheckpointError as error:  # anything else (a raw OSError before) fails the test
        library, restored = (4, str(error)), None

    assert (verify.returncode, loaded.returncode, library[0]) == (code, code, code), verify.stderr + loaded.stderr
    if code == 0:
        assert restored == long / "lib"
        assert _tree(long / "cli") == _tree(long / "lib") == expected
    else:
        assert isinstance(expected, str)
        for said in (verify.stderr, loaded.stderr, library[1]):
            assert expected in said and uri in said, said
        assert not (long / "cli").exists() and list((long / "lib").iterdir()) == []


def test_load_onto_another_filesystem_and_with_force_over_a_non_empty_folder(
    tmp_path: Path, other_filesystem: Path
) -> None:
    """The store on the test's disk, DEST on a tmpfs (/dev/shm): the tree and file arrive whole,
    --force replaces a folder that is not empty, and nothing is left beside DEST."""
    tree = make_tree(tmp_path / "tree")
    ok("save", str(tree), str(tmp_path / "dir"))
    ok("save", "-", str(tmp_path / "bytes"), stdin=b"payload")
    ok("load", str(tmp_path / "dir"), str(other_filesystem / "tree"))
    assert snapshot(other_filesystem / "tree") == snapshot(tree)
    ok("load", str(tmp_path / "bytes"), str(other_filesystem / "file"))
    assert (other_filesystem / "file").read_bytes() == b"payload"
    old = other_filesystem / "old"
    (old / "model").mkdir(parents=True)
    (old / "model" / "weights.bin").write_bytes(b"the old weights")
    (old / "only-in-old").write_bytes(b"gone once replaced")
    assert "already exists" in fails(2, "load", str(tmp_path / "dir"), str(old))
    assert (old / "only-in-old").read_bytes() == b"gone once replaced"
    ok("load", "--force", str(tmp_path / "dir"), str(old))
    assert snapshot(old) == snapshot(tree)
    assert sorted(path.name for path in other_filesystem.iterdir()) == ["file", "old", "tree"]


def _store_case(root: str, request: pytest.FixtureRequest) -> StoreCase:
    """The test store behind ``root`` (to damage objects behind the command line's back)."""
    if root.startswith("s3://"):
        bucket, _, prefix = root[len("s3://") :].partition("/")
        return StoreCase("s3", Path(), request.getfixturevalue("moto_server"), bucket, prefix)
    return StoreCase("local", Path(root))


def test_a_distributed_checkpoint_is_listed_verified_removed_and_cleaned_up_whole(
    root: str, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip("torch")
    import torch
    import torch.distributed.checkpoint as dcp

    from checkpointio.dcp import save

    from .test_dcp import DiesBeforeCommit, data_objects, save_ids

    store = _store_case(root, request)
    save({"weight": torch.arange(1000.0), "step": 3}, f"{root}/ckpt")
    ok("save", "-", f"{root}/plain", stdin=b"plain bytes")
    (committed,) = save_ids(store, "ckpt")
    with pytest.raises(BaseException, match="died before its commit"):
        dcp.save({"weight": torch.zeros(1000), "step": 4}, storage_writer=DiesBeforeCommit(f"{root}/ckpt"))
    (uncommitted,) = save_ids(store, "ckpt") - {committed}
    manifest, data = len(store.get_raw("ckpt")), len(store.get_raw(f"ckpt.dcp/{committed}/rank-0"))

    listed = json.loads(ok("ls", root, "--json"))
    assert [(row["kind"], row["uri"]) for row in listed] == [
        ("distributed", f"{root}/ckpt"),
        ("bytes", f"{root}/plain"),
    ]
    assert listed[0]["size"] == manifest + data and listed[0]["world_size"] == 1  # its data objects: one row
    (line, _) = ok("ls", root).splitlines()
    assert line.startswith(f"distributed {manifest + data:>14} ") and line.endswith(f"{root}/ckpt (world size 1)")

    said = ok("verify", f"{root}/ckpt")
    assert said.startswith(f"ok {root}/ckpt (distributed, ") and "world size 1, 1 data object)" in said
    assert json.loads(ok("verify", f"{root}/ckpt", "--json"))["kind"] == "distributed"

    would = f"would remove the data of the uncommitted distributed save {uncommitted} of {root}/ckpt (1 object, "
    assert ok("gc", root, "--older-than", "0", "--dry-run").startswith(would)  # one object, not "1 objects"
    cleaned = json.loads(ok("gc", root, "--older-than", "0", "--json"))
    assert [(one["uri"], one["save_id"]) for one in cleaned["distributed_saves"]] == [(f"{root}/ckpt", uncommitted)]
    assert data_objects(store, "ckpt") == [f"{committed}/rank-0"]  # the committed data stays
    assert "nothing to clean up" in ok("gc", root, "--older-than", "0")
    ok("verify", f"{root}/ckpt")

    store.corrupt(f"ckpt.dcp/{committed}/rank-0")
    error = fails(4, "verify", f"{root}/ckpt")
    assert f"{root}/ckpt: its data object {root}/ckpt.dcp/{committed}/rank-0 (rank 0)" in error

    ok("save", "-", f"{root}/empty", stdin=b"")  # too short to be a manifest: checked without reading it
    assert ok("verify", f"{root}/empty").startswith(f"ok {root}/empty (bytes, ")
    assert ok("rm", f"{root}/empty", f"{root}/ckpt") == f"removed {root}/empty\nremoved {root}/ckpt\n"
    assert data_objects(store, "ckpt") == [] and store.list_names("") == ["plain"]
    if store.name == "local":
        assert not (Path(root) / "ckpt.dcp").exists() and not (Path(root) / "ckpt").exists()  # no folder left


def test_a_principal_allowed_only_to_list_lists_checkpoints_and_runs(guarded_s3: GuardedS3) -> None:
    """``ls`` and ``gc --dry-run`` need only the listing permission: listing a prefix that names a
    folder never HEADs the object of that name, and ``ls`` shows the rows it may not read as listed
    (kind ``-``)."""
    admin = guarded_s3.admin
    lister = guarded_s3.principal("lister", GuardedS3.LISTING)
    bucket = guarded_s3.new_bucket()
    run = f"s3://{bucket}/e/job/7"
    reach = ("--endpoint-url", guarded_s3.endpoint, "--max-attempts", "1")
    for name in ("", "/attempt-0", "/attempt-1"):  # runs/7 itself too: the object of the folder's name
        saved = cli("save", "-", run + name, *reach, stdin=b"step" + name.encode(), env=admin)
        assert saved.returncode == 0, saved.stderr
    with pytest.raises(Exception, match="403"):  # the lister may not read
        guarded_s3.client("s3", lister).head_object(Bucket=bucket, Key="e/job/7")

    listed = cli("ls", "--json", run, *reach, env=lister)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["uri"], row["kind"], row["size"]) for row in rows] == [
        (run, None, 4),
        (run + "/attempt-0", None, 14),
        (run + "/attempt-1", None, 14),
    ]
    as_admin = json.loads(cli("ls", "--json", run, *reach, env=admin).stdout)
    assert [row["kind"] for row in as_admin] == ["bytes"] * 3  # who may read sees the records
    dry = cli("gc", f"s3://{bucket}/e", "--runs-older-than", "0", "--dry-run", *reach, env=lister)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"would remove run {run} (last written "), dry.stdout
    assert len(dry.stdout.splitlines()) == 1, dry.stdout


def test_list_only_and_list_and_delete_principals_list_and_remove_distributed_and_incremental_checkpoints(
    guarded_s3: GuardedS3, tmp_path: Path
) -> None:
    """Credentials that may list and not read: ``ls`` lists every checkpoint (a distributed one as
    one row, its data folded, world size unknown) and says which it could not read; with delete
    too, ``rm`` removes a distributed checkpoint with every data object of it, a user's object
    beside them kept, and ``gc`` keeps the data whose manifest it may not read."""
    pytest.importorskip("torch")
    admin = guarded_s3.admin
    lister = guarded_s3.principal("only-lister", GuardedS3.LISTING)
    remover = guarded_s3.principal("remover", [*GuardedS3.LISTING, "s3:DeleteObject", "s3:AbortMultipartUpload"])
    bucket = guarded_s3.new_bucket()
    root = f"s3://{bucket}/r"
    reach = ("--endpoint-url", guarded_s3.endpoint, "--max-attempts", "1")

    def save_distributed(name: str, elements: int) -> None:
        saved = run_script(
            f"""
            import torch
            from checkpointio.dcp import save
            save({{"weight": torch.arange({elements}.0)}}, {f"{root}/{name}"!r}, endpoint_url={guarded_s3.endpoint!r})
            """,
            tmp_path,
            unprivileged=False,
            **admin,
        )
        assert saved.returncode == 0, saved.stderr

    save_distributed("ckpt", 1000)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_bytes(b"incremental" * 100)
    for args, stdin in (
        (("save", "-", f"{root}/plain"), b"plain"),
        (("save", "--incremental", str(tree), f"{root}/inc"), None),
    ):
        done = cli(*args, *reach, stdin=stdin, env=admin)
        assert done.returncode == 0, done.stderr
    s3 = guarded_s3.client("s3", admin)
    s3.put_object(Bucket=bucket, Key="r/ckpt.dcp/notes.txt", Body=b"mine")  # a user's object among the data

    def keys() -> list[str]:
        return sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []))

    (data,) = [key for key in keys() if key.startswith("r/ckpt.dcp/") and key.endswith("/rank-0")]
    sizes = {item["Key"]: item["Size"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    for who in (lister, remover):
        listed = cli("ls", "--json", root + "/", *reach, env=who)
        assert listed.returncode == 0, listed.stderr
        rows = [
            (row["uri"], row["kind"], row["size"], row.get("world_size"), row["unread"])
            for row in json.loads(listed.stdout)
        ]
        assert rows == [
            (f"{root}/ckpt", "distributed", sizes["r/ckpt"] + sizes[data], None, True),
            (f"{root}/inc", None, sizes["r/inc"], None, True),
            (f"{root}/plain", None, 5, None, True),
        ]
        assert "3 of the checkpoints listed under" in listed.stderr
        text = cli("ls", root + "/", *reach, env=who)
        assert text.returncode == 0, text.stderr
        assert [line.split()[0] for line in text.stdout.splitlines()] == ["distributed", "-", "-"]
        assert all(line.endswith(" (not read: access denied)") for line in text.stdout.splitlines()), text.stdout

    # An unfinished save's data beside the committed save's: which save the unread manifest names is
    # unknown, so the size counts both and the row says so; who may read counts the committed one's.
    stale = "r/ckpt.dcp/18ee000000000000-0badcafe/rank-0"
    s3.put_object(Bucket=bucket, Key=stale, Body=b"x" * 300)
    listed = cli("ls", "--json", root + "/", *reach, env=lister)
    assert listed.returncode == 0, listed.stderr
    (row,) = [row for row in json.loads(listed.stdout) if row["uri"] == f"{root}/ckpt"]
    assert (row["size"], row["saves_counted"], row["unread"]) == (sizes["r/ckpt"] + sizes[data] + 300, 2, True)
    text = cli("ls", root + "/", *reach, env=lister)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].endswith(
        f"{root}/ckpt (not read: access denied; the size counts the data of 2 saves, 1 of them not committed)"
    ), text.stdout

    as_admin = {row["uri"]: row for row in json.loads(cli("ls", "--json", root + "/", *reach, env=admin).stdout)}
    # who may read sees the world size, and the size of the committed save alone
    assert [
        (row["kind"], row["world_size"], row["size"], row["saves_counted"], row["unread"])
        for row in [as_admin[f"{root}/ckpt"]]
    ] == [("distributed", 1, sizes["r/ckpt"] + sizes[data], 1, False)]

    cleaned = cli("gc", root + "/", "--older-than", "0", *reach, env=remover)
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"kept the data of the distributed saves of {root}/ckpt" in cleaned.stderr
    assert f"kept the packs of {root}/.checkpointio-incremental/" in cleaned.stdout
    assert data in keys()  # which save the manifest commits is unknown: nothing of it collected

    swept = cli("rm", "--recursive", "--dry-run", root + "/", *reach, env=remover)
    assert swept.returncode == 0, swept.stderr
    assert f"skipped {root}/plain (its record may not be read: not removed)" in swept.stdout.splitlines()

    dry = cli("rm", "--dry-run", f"{root}/ckpt", f"{root}/none", *reach, env=remover)
    assert (dry.returncode, dry.stdout) == (3, f"would remove {root}/ckpt\n"), dry.stderr
    assert f"{root}/none: no such checkpoint" in dry.stderr
    removed = cli("rm", f"{root}/ckpt", f"{root}/plain", *reach, env=remover)
    assert removed.returncode == 0, removed.stderr
    assert [key for key in keys() if not key.startswith("r/.checkpointio-incremental/")] == [
        "r/ckpt.dcp/notes.txt",  # the user's object stays; every data object went with the manifest
        "r/inc",
    ]
    again = cli("rm", f"{root}/ckpt", *reach, env=remover)
    assert again.returncode == 3 and f"{root}/ckpt: no such checkpoint" in again.stderr

    # A plain checkpoint with a user's object under <key>.dcp/ is no distributed one: it is listed
    # as what it is, and the user's object as well.
    done = cli("save", "-", f"{root}/other", *reach, stdin=b"plain", env=admin)
    assert done.returncode == 0, done.stderr
    s3.put_object(Bucket=bucket, Key="r/other.dcp/notes.txt", Body=b"mine")
    listed = cli("ls", "--json", root + "/", *reach, env=lister)
    assert listed.returncode == 0, listed.stderr
    kinds = {row["uri"]: row["kind"] for row in json.loads(listed.stdout)}
    assert kinds[f"{root}/other"] is None and f"{root}/other.dcp/notes.txt" in kinds, kinds

    # Credentials that may list objects and delete, not list unfinished uploads: rm does what it is
    # asked (those uploads are gc's); credentials that may read and delete, not list: rm of a
    # distributed checkpoint deletes nothing rather than its manifest without its data.
    objects_only = guarded_s3.principal("objects-only", ["s3:ListBucket", "s3:ListObjectsV2", "s3:DeleteObject"])
    removed = cli("rm", f"{root}/other", *reach, env=objects_only)
    assert removed.returncode == 0, removed.stderr
    assert "r/other" not in keys()
    save_distributed("again", 10)
    before = [key for key in keys() if key.startswith("r/again")]
    reader = guarded_s3.principal("reader-remover", ["s3:GetObject", "s3:HeadObject", "s3:DeleteObject"])
    refused = cli("rm", f"{root}/again", *reach, env=reader)
    assert refused.returncode != 0 and "access denied" in refused.stderr, refused.stderr
    assert [key for key in keys() if key.startswith("r/again")] == before and len(before) == 2
