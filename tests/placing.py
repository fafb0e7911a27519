"""Faults injected where files are put in place: a rename of a new entry onto a given target fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def fail_placing_onto(monkeypatch: pytest.MonkeyPatch, target: Path, error: OSError) -> list[str]:
    """Make renaming anything new onto ``target`` raise ``error``; renames putting the old entry
    back (from where it was moved or linked aside) still work. Returns the sources refused."""
    refused: list[str] = []
    kept: set[str] = set()  # where the old entry went aside
    real_replace, real_rename, real_link = os.replace, os.rename, os.link

    def guard(source: object, destination: object) -> None:
        if str(source) == str(target):
            kept.add(str(destination))
        elif str(destination) == str(target) and str(source) not in kept:
            refused.append(str(source))
            raise error

    def replace(source: Any, destination: Any, **kwargs: Any) -> None:
        guard(source, destination)
        real_replace(source, destination, **kwargs)

    def rename(source: Any, destination: Any, **kwargs: Any) -> None:
        guard(source, destination)
        real_rename(source, destination, **kwargs)

    def link(source: Any, destination: Any, **kwargs: Any) -> None:
        guard(source, destination)
        real_link(source, destination, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    return refused
