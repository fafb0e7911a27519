"""``python -m checkpointio``: the command line."""

from ._cli import run

run()
