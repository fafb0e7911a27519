"""Which entries of a directory checkpoint a partial restore takes: ``load(only=[...])`` patterns.

Format-neutral: the tar.gz restore (:mod:`._partial`) and any other directory format match entry
paths through :class:`Selection` and describe what they hold as :class:`Entry` rows.

Patterns are matched against an entry's path inside the saved tree: relative, ``/``-separated,
without a leading ``./`` or a trailing ``/`` (``model/layer1.pt``, ``config.json``). Within one
path part ``*`` matches any run of characters, ``?`` one character and ``[abc]`` / ``[!abc]`` one
of (or none of) a set, as :mod:`fnmatch` does, but never across a ``/``; a part that is exactly
``**`` matches any number of parts, none included (``**/*.json`` matches ``config.json`` and
``a/b/config.json``). Matching is case-sensitive. An entry is selected when the pattern matches
its path or the path of a folder it is in: ``model`` selects the folder ``model`` with
everything under it, as ``tar -x NAME`` does.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from typing import NamedTuple

from ._exceptions import CheckpointError

__all__ = ["Entry", "Roots", "Selection", "normal_path", "roots"]


class Entry(NamedTuple):
    """One entry of a directory checkpoint, as :meth:`Checkpoint.contents` and
    ``checkpointio ls --contents`` list it."""

    path: str
    """Its path inside the saved tree (``/``-separated, no trailing ``/``)."""
    kind: str
    """``file``, ``dir``, ``symlink`` or ``hardlink``."""
    size: int
    """Bytes of data (0 for anything but a file)."""
    mtime: int
    """Modification time, whole seconds since the epoch."""
    mode: int
    """Permission bits as saved."""
    link: str = ""
    """The target of a symlink or hard link."""


def normal_path(name: str) -> str:
    """An archive name as patterns see it: ``./a//b/`` is ``a/b``."""
    normal = posixpath.normpath(name)
    return "" if normal == "." else normal


def _part(pattern: str) -> str:
    """The regular expression of one path part of a pattern (no ``/`` in it)."""
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = index
            if end < len(pattern) and pattern[end] in "!^":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1
            end = pattern.find("]", end)
            if end < 0:  # no closing bracket: a literal "[", as fnmatch reads it
                out.append(re.escape(char))
                continue
            body = pattern[index:end].replace("\\", "\\\\")
            index = end + 1
            if body[:1] == "!":
                body = "^/" + body[1:]  # none of them, and never a "/"
            elif body[:1] == "^":
                body = "\\" + body  # a literal "^", as fnmatch reads it
            out.append(f"[{body}]")
        else:
            out.append(re.escape(char))
    return "".join(out)


def _compile(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for part in pattern.split("/"):
        if not (part == "**" and parts[-1:] == ["**"]):  # "**/**" is "**"
            parts.append(part)
    regex = ""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**" and last:
            # Any number of parts, none included: "a/**" is "a" too.
            regex = regex[:-1] + "(?:/.*)?" if regex else ".*"
        elif part == "**":
            regex += "(?:[^/]+/)*"
        else:
            regex += _part(part) + ("" if last else "/")
    return re.compile(regex, re.DOTALL)


class Selection:
    """The entries ``only=`` patterns select, and which patterns selected anything.

    ``option`` is how messages name the patterns: ``only=`` for the Python API, ``--only`` for
    the command line.

    Raises (on construction):
        ValueError: A pattern is empty, absolute or climbs out with ``..``.
        TypeError: A pattern is not a ``str`` (``bytes`` given for the list too).
    """

    def __init__(self, patterns: Iterable[str], *, option: str = "only=") -> None:
        self.option = option
        if isinstance(patterns, bytes | bytearray):
            raise TypeError(f"only= takes a list of str glob patterns, got {type(patterns).__name__}")
        self.patterns: tuple[str, ...] = tuple(patterns)
        if isinstance(patterns, str) or not self.patterns:
            raise ValueError("only= takes a non-empty list of glob patterns, e.g. only=['model/*.pt']")
        self._compiled: list[re.Pattern[str]] = []
        for pattern in self.patterns:
            if not isinstance(pattern, str):
                raise TypeError(
                    f"only= patterns must be str globs such as 'model/*.pt', got {type(pattern).__name__} {pattern!r}"
                )
            cleaned = pattern.strip("/") if not pattern.startswith("/") else pattern
            while cleaned.startswith("./"):
                cleaned = cleaned[2:]
            if not cleaned or cleaned == "." or pattern.startswith("/") or ".." in cleaned.split("/"):
                raise ValueError(
                    f"{option} pattern {pattern!r} must name paths inside the checkpoint (relative, without '..')"
                )
            self._compiled.append(_compile(cleaned))
        self._used = [False] * len(self._compiled)
        self._exact: set[str] = set()

    def matches(self, path: str) -> bool:
        """Whether the entry at ``path`` (see :func:`normal_path`) is selected: a pattern matches it
        or a folder it is in. Notes which patterns matched, for :meth:`check_all_used`."""
        if not path:
            return False
        if path in self._exact:
            return True
        found = False
        candidate = path
        while True:
            for index, compiled in enumerate(self._compiled):
                if compiled.fullmatch(candidate):
                    self._used[index] = True
                    found = True
            if found:
                return True
            cut = candidate.rfind("/")
            if cut < 0:
                return False
            candidate = candidate[:cut]

    def selects(self, path: str) -> bool:
        """Whether :meth:`matches` would select ``path``, without noting any pattern as used."""
        if path in self._exact:
            return True
        candidate = path
        while candidate:
            if any(compiled.fullmatch(candidate) for compiled in self._compiled):
                return True
            candidate = candidate[: max(candidate.rfind("/"), 0)]
        return False

    def also(self, paths: Iterable[str]) -> None:
        """Select these exact paths too (the file a selected hard link needs)."""
        self._exact.update(paths)

    def check_all_used(self, uri: str) -> None:
        """Raise unless every pattern selected an entry: a typo must not restore nothing quietly.

        Raises:
            CheckpointError: Naming the patterns that matched nothing.
        """
        unused = [pattern for pattern, used in zip(self.patterns, self._used, strict=True) if not used]
        if unused:
            names = ", ".join(repr(pattern) for pattern in unused)
            raise CheckpointError(f"{uri}: no entry matches {names} ({self.option} patterns)", uri=uri)


def roots(paths: Iterable[str]) -> list[str]:
    """The paths not inside another of ``paths`` (what a partial restore places as wholes)."""
    given = set(paths)
    out = []
    for path in sorted(given):
        parts = path.split("/")
        if not any("/".join(parts[:depth]) in given for depth in range(1, len(parts))):
            out.append(path)
    return out


class Roots:
    """The roots (see :func:`roots`) of paths given one at a time in archive order, holding only
    the paths no earlier one holds: a folder's entries, which follow it, add nothing, so a
    restore picking a million entries of a few folders keeps a few paths, not a million."""

    def __init__(self) -> None:
        self._held: dict[str, None] = {}

    def add(self, path: str) -> None:
        held = self._held
        cut = len(path)
        while cut > 0:
            if path[:cut] in held:
                return
            cut = path.rfind("/", 0, cut)
        held[path] = None

    def result(self) -> list[str]:
        """The roots of every path given (a folder listed after its entries included)."""
        return roots(self._held)
