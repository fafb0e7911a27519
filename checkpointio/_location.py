"""Checkpoint URIs parsed into values: ``s3://bucket/key``, ``file:///path``, ``memory://name`` or a path."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

__all__ = ["Location", "parse_location", "split_scheme"]


@dataclass(frozen=True)
class Location:
    """Where one checkpoint object lives.

    Attributes:
        scheme: ``"file"``, ``"s3"`` or ``"memory"``: which store handles it.
        bucket: The S3 bucket (empty for other schemes).
        key: The object key; for ``file`` the absolute path.
    """

    scheme: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """The canonical URI, used in every message about this checkpoint."""
        if self.scheme == "file":
            return self.key
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"{self.scheme}://{self.key}"

    def child(self, name: str) -> Location:
        """The location of ``name`` below this one, treating this one as a folder or prefix."""
        sep = "" if not self.key or self.key.endswith("/") else "/"
        return Location(self.scheme, self.bucket, f"{self.key}{sep}{name}")

    def __str__(self) -> str:
        return self.uri


def parse_location(uri: str | os.PathLike[str]) -> Location:
    """Parse a checkpoint URI; a bare path (relative or absolute) means the local filesystem.

    S3 keys and memory names are taken literally, as ``aws s3`` takes them: ``#``, ``?`` and
    ``%`` are part of the key (a URL parser would cut ``s3://b/run#1`` down to ``run``, and two
    checkpoints would share one key). ``file://`` URIs are percent-decoded, as RFC 8089 has them.

    Raises:
        ValueError: The URI is empty, has no key, or has a scheme no store handles.
    """
    text = os.fspath(uri)
    if not text:
        raise ValueError("a checkpoint URI must not be empty")
    split = split_scheme(text)
    if split is None:
        return Location("file", "", str(Path(text).expanduser().absolute()))
    scheme, rest = split
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise ValueError(f"file URIs name a local path, got host {host!r} in {text!r}")
        return Location("file", "", str(Path(unquote("/" + path)).absolute()))
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        key = key.lstrip("/")
        if not bucket or not key:
            raise ValueError(f"an S3 checkpoint URI needs a bucket and a key: s3://bucket/key, got {text!r}")
        return Location("s3", bucket, key)
    if scheme == "memory":
        key = rest.strip("/")
        if not key:
            raise ValueError(f"a memory URI needs a name: memory://name, got {text!r}")
        return Location("memory", "", key)
    raise ValueError(f"no store handles {scheme!r} URIs ({text!r}); use a path, file://, s3:// or memory://")


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def split_scheme(text: str) -> tuple[str, str] | None:
    """``("s3", "bucket/key")`` for ``s3://bucket/key`` (scheme lower-cased); ``None`` for a path."""
    scheme, separator, rest = text.partition("://")
    if not separator or not _SCHEME.fullmatch(scheme):
        return None
    return scheme.lower(), rest
