"""Imported by a test's script first: ``Path.is_dir()`` and ``is_file()`` as Python 3.14 has them
(every ``OSError`` answers ``False``), so that what must not take "cannot look" for "nothing there"
is checked on the Pythons before 3.14 too."""

from __future__ import annotations

import pathlib
import stat
from collections.abc import Callable


def _false_on_every_error(kind: Callable[[int], bool]) -> Callable[[pathlib.Path], bool]:
    def test(self: pathlib.Path) -> bool:
        try:
            return kind(self.stat().st_mode)
        except OSError:
            return False

    return test


pathlib.Path.is_dir = _false_on_every_error(stat.S_ISDIR)  # type: ignore[assignment,method-assign]
pathlib.Path.is_file = _false_on_every_error(stat.S_ISREG)  # type: ignore[assignment,method-assign]
