"""Running a test's Python script in a fresh interpreter (exit-time behaviour, fork, signals)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


#: Runs a command as root without its power to ignore file permissions (as any other user runs).
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def run_script(
    code: str, tmp_path: Path, *, unprivileged: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) as ``tmp_path/script.py`` with ``tmp_path`` as the working folder and
    the repository on the import path (a script may import helpers from ``tests``); ``env`` adds to
    the environment; ``unprivileged``: under :data:`UNPRIVILEGED`, so that file permissions apply
    (tests using it skip where ``setpriv`` is missing). The timeout only keeps a hang from stalling
    the suite."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [*(UNPRIVILEGED if unprivileged else []), sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": python_path, **env},
    )


def restore_into_read_only(folder: Path, tmp_path: Path, restore: str) -> tuple[str, list[str]]:
    """Run ``restore``, code that puts ``cp``'s restore in place in ``folder``, unprivileged while
    ``folder`` cannot be written; ``cp`` restores ``tmp_path/store/attempt-0`` into the workspace
    ``tmp_path/ws``. Returns the ``AccessDeniedError``'s message and the names left in the workspace."""
    body = textwrap.indent(textwrap.dedent(restore).strip(), " " * 8)
    code = f"""\
import json
from pathlib import Path
from checkpointio import AccessDeniedError, Checkpoint
store, workspace = Path({str(tmp_path / "store")!r}), Path({str(tmp_path / "ws")!r})
with Checkpoint(store / "attempt-1", src=store / "attempt-0", workspace=workspace) as cp:
    try:
{body}
    except AccessDeniedError as error:
        print(error)
    print(json.dumps(sorted(path.name for path in cp.path.iterdir())))
"""
    folder.chmod(0o555)
    try:
        result = run_script(code, tmp_path, unprivileged=True, HF_HUB_OFFLINE="1")
    finally:
        folder.chmod(0o755)
    assert result.returncode == 0, result.stderr
    message, kept = result.stdout.splitlines()
    return message, json.loads(kept)


class RandomKills:
    """SIGKILLs runs of a command at random points of their run, for tests that a kill anywhere
    leaves a consistent state. Kill times are ``uniform(low, high)`` fractions of the run's length;
    a run that ends before its kill teaches the length (a loaded machine makes the measured first
    run longer than later ones), so later kills still land inside the run, not after it."""

    def __init__(self, seed: int, length: float, low: float, high: float) -> None:
        self.rng = random.Random(seed)
        self.length, self.low, self.high = length, low, high

    def run(self, args: list[str], env: dict[str, str] | None = None) -> bool:
        """Run ``args`` and kill it at a random point; whether it was killed (not ended by itself)."""
        started = time.monotonic()
        proc = subprocess.Popen(args, env=env)
        try:
            proc.wait(timeout=self.rng.uniform(self.low, self.high) * self.length)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        self.length = min(self.length, time.monotonic() - started)
        return False
