"""The documentation is kept honest: README.md and docs/*.md are checked as code.

- Every Python block passes ``mypy --strict`` (with the examples, in one run) and runs, unless the line
  before it says ``<!-- not run: REASON -->`` (it needs S3, torch or a task around it).
- Every ``checkpointio ...`` command in a shell block parses with the command line's own parser.
- Every relative link points to a file that exists, and to a heading of it where it names one.
- Every row of the guarantees table names tests that exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Pages whose links are checked besides DOCS.
LINKED = [*DOCS, ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "HISTORY.md"]

#: Names a fragment leaves to the reader (your model, your data, a checkpoint in scope).
PRELUDE = """\
from typing import Any

from checkpointio import Checkpoint, ctx

model: Any = None
optimizer: Any = None
data: Any = None
step: int = 0
cp: Checkpoint = Checkpoint("memory://docs")
"""

NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]+?) -->\s*$")
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>\w*)\n(?P<code>.*?)^(?P=indent)```[ ]*$", re.S | re.M)


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(paths: list[Path] = DOCS) -> list[Block]:
    found = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = NOT_RUN.search(before)
            code = textwrap.dedent(match["indent"] + match["code"].replace("\n" + match["indent"], "\n"))
            found.append(Block(path, line, match["lang"], code, marker["reason"] if marker else None))
    return found


def python_blocks() -> list[Block]:
    return [block for block in blocks() if block.lang == "python"]


def test_the_docs_have_python_blocks_and_each_not_run_marker_says_why() -> None:
    found = python_blocks()
    assert len(found) >= 15, [block.where for block in found]
    assert any(block.not_run is None for block in found)
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^<!-- not run", text, flags=re.M):
            line = text.count("\n", 0, match.start()) + 1
            assert any(block.path == path and block.line == line + 1 for block in found), (
                f"{path.name}:{line}: a 'not run' marker must sit on the line before a ```python block"
            )


@pytest.mark.timeout(600)
def test_the_docs_python_and_the_examples_pass_mypy_strict(tmp_path: Path) -> None:
    from mypy import api

    files = []
    for number, block in enumerate(python_blocks()):
        path = tmp_path / f"block_{number}_{block.path.stem.replace('-', '_')}_line_{block.line}.py"
        path.write_text(PRELUDE + "\n" + block.code, encoding="utf-8")
        files.append(str(path))
    files += sorted(str(path) for path in (ROOT / "examples").glob("*.py"))
    config = tmp_path / "mypy.ini"
    config.write_text(
        textwrap.dedent(f"""\
            [mypy]
            strict = True
            python_version = 3.10
            mypy_path = {ROOT}
            cache_dir = {ROOT / ".mypy_cache" / "docs"}
            # The frameworks' classes are Any here (below): the examples subclass them.
            disallow_subclassing_any = False

            # Checked by the project's own mypy run; here only what the snippets use of it.
            [mypy-checkpointio.*]
            follow_imports = silent

            # The ML frameworks are large and not what is checked here: their names are Any.
            [mypy-torch.*,lightning.*,pytorch_lightning.*,transformers.*,accelerate.*]
            follow_imports = skip
            ignore_missing_imports = True

            [mypy-aiobotocore.*,botocore.*,exceptiongroup]
            ignore_missing_imports = True
            """)
    )
    out, err, status = api.run(["--config-file", str(config), "--no-error-summary", *files])
    assert status == 0, out + err


#: Runs each block in a fresh namespace and working folder, with a `checkpoints/` folder to save.
HARNESS = """\
import os, sys, tempfile, traceback
from pathlib import Path

failed = []
for where, code in BLOCKS:
    folder = tempfile.mkdtemp(dir=sys.argv[1])
    os.chdir(folder)
    Path("checkpoints").mkdir()
    Path("checkpoints", "step_1.pt").write_bytes(b"weights")
    try:
        namespace = {"__name__": "__docs__"}
        exec(PRELUDE, namespace)
        exec(compile(code, where, "exec"), namespace)
    except BaseException:
        failed.append(where + "\\n" + traceback.format_exc())
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.timeout(300)
def test_the_docs_python_blocks_run(tmp_path: Path) -> None:
    runnable = [block for block in python_blocks() if block.not_run is None]
    assert len(runnable) >= 5
    script = tmp_path / "harness.py"
    pairs = [(block.where, block.code) for block in runnable]
    script.write_text(f"PRELUDE = {PRELUDE!r}\nBLOCKS = {pairs!r}\n" + HARNESS, encoding="utf-8")
    env = {**os.environ, "CHECKPOINTIO_STORAGE": str(tmp_path / "store"), "PYTHONPATH": str(ROOT)}
    env.pop("CHECKPOINTIO_RUN_ID", None)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(script), str(work)], capture_output=True, text=True, timeout=240, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr


def checkpointio_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for block in blocks():
        if block.lang not in ("bash", "sh", "shell", "console"):
            continue
        for number, line in enumerate(block.code.splitlines()):
            words = shlex.split(line, comments=True)
            while words:
                if words[0] == "checkpointio":
                    end = words.index("|") if "|" in words else len(words)
                    commands.append((f"{block.where}+{number + 1}", words[1:end]))
                words = words[words.index("|") + 1 :] if "|" in words else []
    return commands


def test_every_checkpointio_command_in_the_docs_parses() -> None:
    from checkpointio._cli import build_parser

    commands = checkpointio_commands()
    assert len(commands) >= 15
    names = set()
    for where, args in commands:
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit as error:  # argparse's way of refusing
            pytest.fail(f"{where}: checkpointio {shlex.join(args)} does not parse (exit {error.code})")
        names.add(parsed.command)
    assert {"save", "load", "ls", "rm", "verify", "gc", "demo"} <= names


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slugs_follow_github() -> None:
    assert slug("State held in memory: `load_bytes()`") == "state-held-in-memory-load_bytes"
    assert slug("Compared with boto3's `TransferConfig`") == "compared-with-boto3s-transferconfig"
    assert slug("Retries, connections, cost per byte") == "retries-connections-cost-per-byte"


def test_every_relative_link_points_to_a_file_and_heading_that_exist() -> None:
    broken = []
    for path in LINKED:
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_docs_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    pages = {path.name for path in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages and {page for page in pages if f"]({page})" not in index} == set()


def functions_of(path: Path) -> set[str]:
    return set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))


def test_every_guarantee_names_tests_that_exist() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    assert len(rows) >= 60
    missing = []
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[-1]
        names = re.findall(r"`([^`]+)`", cell)
        assert names, f"a row without a test: {row}"
        files = ["test_reliability.py"]
        for name in names:
            if "::" in name:
                file, name = name.split("::", 1)
                files = [file, "test_reliability.py"]
            pattern = re.escape(re.sub(r"\[.*\]$", "", name)).replace("…", ".*")
            if not any(
                re.fullmatch(pattern, function) for file in files for function in functions_of(ROOT / "tests" / file)
            ):
                missing.append(f"{name} (in {' or '.join(files)}): {row[:80]}")
    assert not missing, "\n".join(missing)
