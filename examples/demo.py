"""The README's main job: tasks that fail part-way, are retried and resume from their checkpoints,
then a process killed outright (SIGKILL) that resumes when it is started again.

Runs on the embedded local store (no server). The same as ``checkpointio demo``, whose code (and
the tasks of the other examples) ships in the package so that it works wherever it is installed:

    python examples/demo.py [--root DIR]

``--root`` overrides the storage root (default: ``CHECKPOINTIO_STORAGE``, else
``~/.cache/checkpointio``).
"""

from __future__ import annotations

import sys

from checkpointio._cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
