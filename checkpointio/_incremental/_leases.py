"""Leases: one object per save in progress in a pack store, so that ``gc`` deletes nothing a save
may still reference (the safety model is documented at :func:`._gc.collect_area`)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import anyio

from .. import _engine
from .._config import TransferConfig
from .._exceptions import CheckpointError
from .._location import Location
from .._stores import Kind, ObjectInfo, Store
from ._layout import LEASES, lease_location

#: A lease older than this is taken for a save that died (gc then ignores it); a save renews its
#: lease every ``LEASE_RENEW`` seconds.
LEASE_TTL = 15 * 60.0
LEASE_RENEW = 60.0


class Lease:
    """The lease of one save in progress: created before any parent is read, renewed while the
    save runs, removed when it ends."""

    def __init__(self, store: Store, area: Location, save_id: str, config: TransferConfig) -> None:
        self.store = store
        self.location = lease_location(area, save_id)
        self.config = config
        self.renewed = 0.0

    async def renew(self) -> None:
        body = json.dumps({"pid": os.getpid(), "time": time.time()}).encode()
        started = time.monotonic()
        await _engine.save_object(self.store, self.location, body, Kind.BYTES, self.config)
        self.renewed = started

    async def keep(self) -> None:
        while True:
            await anyio.sleep(LEASE_RENEW)
            await self.renew()

    async def drop(self) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(CheckpointError, OSError):
                await self.store.delete(self.location)


async def leases(store: Store, area: Location) -> list[ObjectInfo]:
    """The leases in ``area``: saves in progress, or dead ones not yet removed."""
    return await store.list(Location(area.scheme, area.bucket, area.key + LEASES))
