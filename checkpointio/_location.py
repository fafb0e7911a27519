"""Checkpoint URIs parsed into values: ``s3://bucket/key``, ``file:///path``, ``memory://name`` or a path."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

__all__ = ["Location", "checkpoint_location", "parse_location", "parse_prefix", "split_scheme", "uri_text"]

#: The schemes a store handles; a path that starts like one of them is a mistyped URI.
_SCHEMES = ("file", "memory", "s3")
#: Bucket names botocore sends (its own check): anything else is a typo, refused before a request.
_BUCKET = re.compile(r"[A-Za-z0-9.\-_]{1,255}")


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


def uri_text(uri: object) -> str:
    """The text of a URI given as a ``str`` or an ``os.PathLike`` (``pathlib.Path``).

    Raises:
        TypeError: Anything else (``bytes`` too: a URI is text), named with its value.
    """
    text = os.fspath(uri) if isinstance(uri, str | os.PathLike) else None
    if not isinstance(text, str):
        raise TypeError(
            f"a checkpoint URI must be a str or an os.PathLike (a pathlib.Path), got {type(uri).__name__} {uri!r}"
        )
    return text


def parse_location(uri: str | os.PathLike[str]) -> Location:
    """Parse a checkpoint URI; a bare path (relative or absolute) means the local filesystem.

    S3 keys and memory names are taken literally, as ``aws s3`` takes them (leading ``/`` dropped,
    a trailing one kept: ``s3://b/runs/7/`` and ``memory://runs/7/`` name a folder): ``#``, ``?`` and
    ``%`` are part of the key (a URL parser would cut ``s3://b/run#1`` down to ``run``, and two
    checkpoints would share one key). ``file://`` URIs are percent-decoded, as RFC 8089 has them,
    and so is its one-slash form ``file:/path``. The scheme is case-insensitive (``S3://``).

    A path that looks like a mistyped URI is refused rather than taken as a local folder:
    ``s3:/bucket/key``, ``s3:bucket/key``, ``s3//bucket/key``, ``gs:/x`` or a bare ``s3:`` would
    otherwise save into a folder named ``s3:`` (write ``./s3:/...`` to mean that folder).

    Raises:
        ValueError: The URI is empty, has no key, has a scheme no store handles, or looks like a
            mistyped one.
        TypeError: ``uri`` is neither a ``str`` nor an ``os.PathLike`` of one.
    """
    text = uri_text(uri)
    if not text:
        raise ValueError("a checkpoint URI must not be empty")
    split = split_scheme(text)
    if split is None:
        rfc_file = re.fullmatch(r"(?i:file):(/.*)", text, re.DOTALL)
        if rfc_file is not None:
            return Location("file", "", str(Path(unquote(rfc_file.group(1))).absolute()))
        _refuse_lookalike(text)
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
        return Location("s3", _bucket(bucket, text), key)
    if scheme == "memory":
        key = rest.lstrip("/")
        if not key.strip("/"):
            raise ValueError(f"a memory URI needs a name: memory://name, got {text!r}")
        return Location("memory", "", key)
    raise ValueError(f"no store handles {scheme!r} URIs ({text!r}); use a path, file://, s3:// or memory://")


def checkpoint_location(uri: str | os.PathLike[str]) -> Location:
    """:func:`parse_location` for the URI of one checkpoint object (not a prefix).

    A URI ending in ``/`` is refused, whatever its store: S3 consoles show such an object as a
    folder, ``aws s3 cp`` would put a file *under* that prefix, and ``newdir/`` names a folder, where
    a local checkpoint is one file (saving it as the file ``newdir`` would surprise). The URI must
    name the checkpoint itself (``s3://bucket/runs/7/big``, ``newdir/ckpt``).

    Raises:
        ValueError: As :func:`parse_location`, or the URI ends in ``/``.
    """
    location = parse_location(uri)
    text = uri_text(uri)
    if location.scheme == "file":
        if text.endswith(("/", os.sep)):
            raise ValueError(
                f"{text!r} ends with '/', a folder: a checkpoint URI names one file, "
                f"e.g. {os.path.join(location.key, 'NAME')}"
            )
    elif location.key.endswith("/"):
        raise ValueError(
            f"{text!r} ends with '/', a folder-like prefix: a checkpoint URI names one object, e.g. {location.uri}NAME"
        )
    return location


def parse_prefix(uri: str | os.PathLike[str]) -> Location:
    """Like :func:`parse_location`, but ``s3://bucket`` (a whole bucket) is a valid prefix, and a
    local path keeps its trailing ``/`` as the other schemes do: ``runs/7/`` is the folder only,
    where ``runs/7`` is the folder if there is one, else the start of names (see
    ``_stores._base.under``)."""
    text = uri_text(uri)
    if not text:  # parse_location would say "a checkpoint URI", where a prefix is asked for
        raise ValueError(
            "a prefix must not be empty: give a folder (. for the current one), the start of names, or s3://bucket/..."
        )
    split = split_scheme(text)
    if split is not None and split[0] == "s3":
        bucket, _, key = split[1].partition("/")
        if bucket and not key.strip("/"):
            return Location("s3", _bucket(bucket, text), "")
    location = parse_location(text)
    if location.scheme == "file" and text.endswith(("/", os.sep)) and not location.key.endswith(os.sep):
        return Location("file", "", location.key + os.sep)
    return location


def _bucket(name: str, text: str) -> str:
    if not _BUCKET.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid S3 bucket name (letters, digits, '.', '-', '_'), in {text!r}")
    return name


def _refuse_lookalike(text: str) -> None:
    """Raise for a path that starts like a URI: ``NAME:`` alone or followed by ``/``, or a
    handled scheme followed by ``:`` or ``//`` (``s3:bucket/k``, ``s3//bucket/k``)."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)(:|//)", text)
    if match is None:
        return
    scheme, mark = match.group(1), match.group(2)
    rest = text[match.end() :]
    known = scheme.lower() in _SCHEMES
    if mark == ":" and not known and rest and not rest.startswith("/"):
        return  # ``run:7`` and the like are ordinary names
    if mark == "//" and not known:
        return  # ``a//b`` is a path
    if known:
        root = "/" if scheme.lower() == "file" else ""
        hint = f"did you mean {scheme.lower()}://{root}{rest.lstrip('/')}?"
    else:
        hint = f"no store handles {scheme.lower()!r} URIs: use a path, file://, s3:// or memory://"
    raise ValueError(
        f"{text!r} looks like a URI with a mistyped scheme ({hint}); for a local folder of that name write ./{text}"
    )


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def split_scheme(text: str) -> tuple[str, str] | None:
    """``("s3", "bucket/key")`` for ``s3://bucket/key`` (scheme lower-cased); ``None`` for a path."""
    scheme, separator, rest = text.partition("://")
    if not separator or not _SCHEME.fullmatch(scheme):
        return None
    return scheme.lower(), rest
