"""Run one measured step in a child process and collect wall time, CPU time and peak RSS.

A step is either a shell pipeline (run by ``bash`` with ``pipefail``) or a Python operation of
:mod:`benchmarks.worker`. Every step is a fresh child in its own session, started through
:mod:`benchmarks.launch`, which reaps it with ``os.wait4``: its rusage gives the step's peak RSS
(for a shell pipeline: the largest single process of the pipeline, which ``wait4`` folds in from
the reaped grandchildren) and, for shell pipelines, the wall and CPU time of the whole pipeline. A
Python worker measures its own wall and CPU time around the operation, excluding interpreter
start-up and imports. A step that outlives its timeout has its process group killed (the group is
the step's own, so nothing else is touched).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PythonStep",
    "Runner",
    "Sample",
    "ShellStep",
    "Step",
    "StepFailed",
    "Unsupported",
    "clean_up_on_sigterm",
]

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launch.py"


@dataclass(frozen=True)
class ShellStep:
    """A bash script (``set -euo pipefail`` is prepended)."""

    script: str


@dataclass(frozen=True)
class PythonStep:
    """One operation of :mod:`benchmarks.worker`, described by its JSON spec."""

    spec: dict[str, Any]


Step = ShellStep | PythonStep


@dataclass(frozen=True)
class Sample:
    """One measured run of a step.

    Attributes:
        wall: Seconds of wall-clock time.
        cpu: User plus system CPU seconds of the step's processes (all threads).
        peak_rss: Peak resident set size in bytes (the largest process, for a pipeline).
        server_cpu: CPU seconds the S3 server spent meanwhile (0 without a server).
        other_cpu: CPU seconds the rest of the machine spent meanwhile (other users' processes;
            also the worker's interpreter start-up): a measure of how disturbed the sample is.
        extra: Other numbers the worker reported (for example ``worst_gap_ms``).
    """

    wall: float
    cpu: float
    peak_rss: int
    server_cpu: float
    other_cpu: float
    extra: dict[str, float] = field(default_factory=dict)


class StepFailed(Exception):
    """The step exited non-zero, was killed, or reported nothing."""


class Unsupported(Exception):
    """checkpointio refused an option of this step (``TypeError``): the row is reported as n/a."""


def clean_up_on_sigterm() -> None:
    """Make SIGTERM (``kill PID``, a CI timeout) end the benchmark as Ctrl-C does: through its
    ``finally`` blocks, which stop the S3 server and the step running, and remove the scratch
    folder. The default action ends the process at once and leaves them behind."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores (from ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Runner:
    """Runs steps one at a time with a fixed environment, logging each step's output to a file."""

    def __init__(
        self,
        logs: Path,
        env: dict[str, str],
        server_cpu: Callable[[], float] | None = None,
        timeout: float = 1800,
        cores: str | None = None,
    ) -> None:
        """``cores``: a CPU list (``taskset -c``'s form, e.g. ``0``) each step runs on; the server
        keeps running on every core."""
        self.logs = logs
        self.cores = cores
        self.env = env
        self.server_cpu = server_cpu or (lambda: 0.0)
        self.timeout = timeout
        self._count = 0
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, step: Step, label: str) -> Sample:
        """Run ``step`` to completion and measure it.

        Raises:
            StepFailed: It failed; the message ends with the last lines of its output.
            Unsupported: checkpointio did not accept one of its options.
        """
        self._count += 1
        stem = f"{self._count:04d}-" + "".join(c if c.isalnum() else "-" for c in label)[:80]
        log = self.logs / f"{stem}.log"
        usage_file = self.logs / f"{stem}.usage.json"
        result = self.logs / f"{stem}.json"
        if isinstance(step, PythonStep):
            argv = [sys.executable, "-m", "benchmarks.worker", json.dumps({**step.spec, "result": str(result)})]
        else:
            argv = ["bash", "-c", "set -euo pipefail\n" + step.script]
        if self.cores is not None:
            argv = ["taskset", "-c", self.cores, *argv]  # taskset execs the step: same process
        server_before, machine_before = self.server_cpu(), machine_cpu_seconds()
        with open(log, "wb") as output:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), str(usage_file), *argv],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=self.env, cwd=REPO,
                start_new_session=True,
            )  # fmt: skip
            timer = threading.Timer(self.timeout, _kill_group, (child.pid,))
            timer.start()
            try:
                child.wait()
            except BaseException:  # interrupted: the step must not outlive the runner
                _kill_group(child.pid)
                child.wait()
                raise
            finally:
                timer.cancel()
        server_cpu = self.server_cpu() - server_before
        machine_cpu = machine_cpu_seconds() - machine_before
        if child.returncode != 0:
            raise StepFailed(f"{label}: exit status {child.returncode}; last output ({log}):\n{_tail(log)}")
        usage = json.loads(usage_file.read_text())
        other_cpu = max(0.0, machine_cpu - usage["cpu"] - server_cpu)
        if isinstance(step, ShellStep):
            return Sample(usage["wall"], usage["cpu"], usage["peak_rss"], server_cpu, other_cpu)
        try:
            reported: dict[str, Any] = json.loads(result.read_text())
        except (OSError, ValueError) as error:
            raise StepFailed(f"{label}: the worker reported nothing ({error}); see {log}") from error
        if "unsupported" in reported:
            raise Unsupported(str(reported["unsupported"]))
        extra = {k: float(v) for k, v in reported.items() if k not in ("wall", "cpu")}
        wall, cpu = float(reported["wall"]), float(reported["cpu"])
        return Sample(wall, cpu, usage["peak_rss"], server_cpu, other_cpu, extra)
