"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_fails_part_way_then_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "attempt 0 failed: simulated crash at step 5" in result.stdout
    assert "attempt starts at 4 (resumed from its checkpoint)" in result.stdout
    assert "attempt 1 finished: 8" in result.stdout
    assert "attempt starts at epoch 3" in result.stdout
    assert (tmp_path / "counter" / "attempt-1").read_bytes() == b"8"
