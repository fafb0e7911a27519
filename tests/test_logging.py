"""What the library logs: under each module's own logger, nothing unless the application
configures logging, one INFO line per transfer, and a retried attempt's traceback kept at DEBUG."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from checkpointio import Checkpoint, TaskEnvironment, ctx

from .conftest import StoreCase, make_tree


def test_the_package_logger_has_a_null_handler_and_prints_nothing_unless_configured(tmp_path: Path) -> None:
    assert [type(handler) for handler in logging.getLogger("checkpointio").handlers] == [logging.NullHandler]
    tree = make_tree(tmp_path / "tree")
    os.mkfifo(tree / "pipe")  # skipped with a warning: a pipe holds no data
    script = (
        "import logging, sys, checkpointio\n"
        "if sys.argv[1] == 'configured': logging.basicConfig(format='%(levelname)s %(name)s %(message)s')\n"
        f"checkpointio.Checkpoint({str(tmp_path / 'ck')!r}).save_sync({str(tree)!r})\n"
    )
    silent = subprocess.run([sys.executable, "-c", script, "bare"], capture_output=True, text=True, timeout=120)
    assert silent.returncode == 0 and silent.stderr == ""
    shown = subprocess.run([sys.executable, "-c", script, "configured"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    said = f"skipping a named pipe (FIFO) {tree / 'pipe'} (it holds no data to save)"
    assert shown.stderr == f"WARNING checkpointio._archive {said}\n"


async def test_a_save_and_a_load_log_one_info_line_each_what_where_size_and_time(
    store: StoreCase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="checkpointio")
    data = os.urandom(3 * 1024 * 1024)
    await Checkpoint(store.uri("a")).save(data)
    tree = make_tree(tmp_path / "tree")
    await Checkpoint(store.uri("d")).save(tree)
    async with Checkpoint(store.uri("b"), src=store.uri("a")) as cp:
        await cp.load()
    async with Checkpoint(store.uri("c"), src=store.uri("d")) as cp:
        await cp.load()
    lines = [record.getMessage() for record in caplog.records if record.name == "checkpointio._engine"]
    assert len(lines) == 4, lines
    seconds = r" in \d+\.\d s\)"
    assert re.fullmatch(re.escape(f"saved bytes to {store.uri('a')} (3.0 MiB") + seconds, lines[0]), lines[0]
    files = r"\d\.\d MiB of files, \d\.\d MiB stored"
    assert re.fullmatch(re.escape(f"saved directory {tree} to {store.uri('d')} (") + files + seconds, lines[1])
    assert re.fullmatch(re.escape(f"loaded {store.uri('a')} (bytes, 3.0 MiB") + seconds, lines[2]), lines[2]
    assert re.fullmatch(re.escape(f"loaded {store.uri('d')} (directory, ") + r"\d\.\d MiB" + seconds, lines[3])
    assert all(record.levelno == logging.INFO for record in caplog.records)


def test_a_retried_attempt_logs_one_warning_and_its_traceback_at_debug(
    store: StoreCase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="checkpointio._runtime")

    @TaskEnvironment("tests", storage=store.uri("root")).task(retries=1)
    def job() -> int:
        if ctx().attempt == 0:
            raise RuntimeError("out of luck")
        return 7

    assert job() == 7
    records = [record for record in caplog.records if record.name == "checkpointio._runtime" and "failed" in record.msg]
    assert [(record.levelname, record.getMessage()) for record in records] == [
        ("WARNING", "task job: attempt 0 failed (RuntimeError: out of luck); retrying in 0 s"),
        ("DEBUG", "task job: attempt 0 failed with"),
    ]
    error = records[1].exc_info[1] if records[1].exc_info else None
    assert isinstance(error, RuntimeError) and str(error) == "out of luck"
    assert records[1].exc_text is None or "raise RuntimeError" in records[1].exc_text


def test_every_module_logs_under_its_own_name_without_repeating_the_package(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = make_tree(tmp_path / "tree")
    os.mkfifo(tree / "pipe")
    Checkpoint(tmp_path / "ck").save_sync(tree)
    (record,) = [record for record in caplog.records if record.name.startswith("checkpointio")]
    assert record.name == "checkpointio._archive" and record.levelno == logging.WARNING
    assert record.getMessage() == f"skipping a named pipe (FIFO) {tree / 'pipe'} (it holds no data to save)"
    sources = Path(__file__).parent.parent / "checkpointio"
    for path in sources.rglob("*.py"):
        text = path.read_text()
        assert re.findall(r"^logger = logging\.getLogger\((.*)\)$", text, re.MULTILINE) in ([], ["__name__"]), path
        assert not re.search(r'logger\.\w+\(\s*"checkpointio: ', text), path


@pytest.mark.parametrize("configured", [False, True])
def test_a_background_save_lost_at_exit_is_told_once_configured_or_not(tmp_path: Path, configured: bool) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    script = (
        "import logging, sys, checkpointio\n"
        "if sys.argv[1] == 'yes': logging.basicConfig(format='%(levelname)s %(name)s %(message)s')\n"
        f"checkpointio.Checkpoint({str(tmp_path / 'a-file' / 'ckpt')!r}).save_sync(b'data', wait=False)\n"
    )
    argument = "yes" if configured else "no"
    result = subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    told = [line for line in result.stderr.splitlines() if "background save to" in line]
    assert len(told) == 1 and "failed" in told[0], result.stderr
    if configured:  # the application's handler says it; no warning besides
        assert told[0].startswith("ERROR checkpointio._background background save to ")
        assert "Warning" not in result.stderr
    else:  # the NullHandler would swallow the record: Python's warnings say it
        assert "RuntimeWarning: checkpointio: background save to " in told[0]
