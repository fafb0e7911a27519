"""Where an incremental checkpoint's parts are: the manifest at the checkpoint's key, the packs and
leases in the folder's shared area (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Iterable

from .._location import Location
from .._stores import ObjectInfo

#: The folder, next to a checkpoint, holding the packs and leases of the checkpoints beside it.
AREA = ".checkpointio-incremental"
PACKS = "packs/"
LEASES = "leases/"


def area_of(location: Location) -> Location:
    """The folder (prefix) of the packs and leases shared by the checkpoints beside ``location``."""
    folder, slash, _ = location.key.rpartition("/")
    return Location(location.scheme, location.bucket, f"{folder}{slash}{AREA}/")


def pack_location(area: Location, name: str) -> Location:
    return Location(area.scheme, area.bucket, area.key + PACKS + name)


def lease_location(area: Location, save_id: str) -> Location:
    return Location(area.scheme, area.bucket, area.key + LEASES + save_id)


def folder_of(area: Location) -> Location:
    """The folder whose checkpoints share ``area``'s packs."""
    key = area.key[: -len(AREA) - 1]
    return Location(area.scheme, area.bucket, key)


def areas_under(infos: Iterable[ObjectInfo]) -> dict[str, Location]:
    """The pack stores among the listed objects, by key."""
    found: dict[str, Location] = {}
    marker = f"{AREA}/"
    for info in infos:
        key = info.location.key
        at = key.find(marker)
        while at > 0 and key[at - 1] != "/":
            at = key.find(marker, at + 1)
        if at < 0:
            continue
        area_key = key[: at + len(marker)]
        found.setdefault(area_key, Location(info.location.scheme, info.location.bucket, area_key))
    return found


def in_area(key: str) -> bool:
    """Whether ``key`` is a pack or lease of an incremental pack store (not a checkpoint)."""
    return key.startswith(f"{AREA}/") or f"/{AREA}/" in key
