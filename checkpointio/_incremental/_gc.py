"""Garbage collection of incremental checkpoints' packs under leases (the safety model is at
:func:`collect_area`), and what each checkpoint holds in its folder's packs (:func:`usage`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .._config import TransferConfig
from .._exceptions import AccessDeniedError, ConcurrentModificationError, CorruptCheckpointError
from .._location import Location
from .._stores import ObjectInfo, Store
from ._layout import PACKS, areas_under, folder_of, pack_location
from ._leases import LEASE_TTL, leases
from ._manifest import FILE, Manifest, is_manifest_object, read_manifest


@dataclass
class AreaReport:
    """What :func:`collect` found in one folder's pack store.

    Attributes:
        area: The pack store (``<folder>/.checkpointio-incremental/``).
        removed: The packs no manifest references, older than the grace period: deleted (or, with
            ``dry_run``, to be deleted), name -> size.
        kept_unreferenced: Packs no manifest references that are younger than the grace period.
        skipped: Why nothing was deleted there (saves in progress, an unreadable manifest), or ``""``.
        stale_leases: Leases of saves that died, removed.
    """

    area: Location
    removed: dict[str, int] = field(default_factory=dict)
    kept_unreferenced: int = 0
    skipped: str = ""
    stale_leases: int = 0

    @property
    def freed(self) -> int:
        return sum(self.removed.values())


async def manifests_beside(store: Store, area: Location, config: TransferConfig) -> dict[str, Manifest]:
    """The incremental manifests of the folder ``area`` serves, by key. One removed while this
    reads it is left out; one replaced meanwhile is read again.

    Raises:
        CorruptCheckpointError: One of them is garbled (its packs cannot be known).
        ConcurrentModificationError: One kept being replaced while it was read.
    """
    folder = folder_of(area)
    found: dict[str, Manifest] = {}
    for listed in await store.list(folder):
        if "/" in listed.location.key[len(folder.key) :]:
            continue
        for attempt in range(3):
            try:
                manifest = await _manifest_of(store, listed, config)
            except ConcurrentModificationError:
                if attempt == 2:
                    raise
                continue
            if manifest is not None:
                found[listed.location.key] = manifest
            break
    return found


async def _children(store: Store, area: Location) -> dict[str, str]:
    """The objects directly in the folder ``area`` serves: key -> generation tag."""
    folder = folder_of(area)
    return {
        info.location.key: info.etag
        for info in await store.list(folder)
        if "/" not in info.location.key[len(folder.key) :]
    }


async def _manifest_of(store: Store, listed: ObjectInfo, config: TransferConfig) -> Manifest | None:
    info = listed if listed.record is not None else await store.head(listed.location)  # S3 lists no metadata
    if info is None or not await is_manifest_object(store, info):
        return None
    # A HEAD made here is fresh: the read needs no other. A listing may be older than a removal
    # or replacement since (a retry must see the object as it is now): the read asks again.
    fresh = None if info is listed else info
    return await read_manifest(store, info.location, config, check_tree=False, info=fresh)


async def collect_area(
    store: Store,
    area: Location,
    config: TransferConfig,
    *,
    older_than: float,
    dry_run: bool = False,
    lease_ttl: float = LEASE_TTL,
) -> AreaReport:
    """Delete the packs of ``area`` that no manifest beside it references and that were written
    more than ``older_than`` seconds ago, unless a save may be in progress there.

    The safety model (leases): every save writes a lease in the area before it reads any parent
    manifest, renews it every ``LEASE_RENEW`` seconds and removes it when it ends. A save can only
    reference packs named by a manifest it read after its lease existed, or packs it wrote itself.
    So this deletes nothing while any lease younger than ``lease_ttl`` exists, and checks again
    after reading every manifest and listing the packs, just before deleting: a save that started
    in between is seen then. A lease older than ``lease_ttl`` is a save that died (a live one
    renews it) and is removed. A save that was stalled for longer than ``LEASE_TTL / 2`` checks
    that every pack it references still exists before committing. ``older_than`` spares young
    packs on top (clock skew, a save stalled beyond its lease).
    """
    report = AreaReport(area)
    now = time.time()

    async def saves_in_progress() -> bool:
        live = False
        stale = time.time() - lease_ttl
        for lease in await leases(store, area):
            if lease.modified is not None and lease.modified < stale:
                if not dry_run and await store.delete(lease.location):
                    report.stale_leases += 1
            else:
                live = True
        return live

    if await saves_in_progress():
        report.skipped = "a save is in progress there"
        return report
    before = await _children(store, area)
    try:
        manifests = await manifests_beside(store, area, config)
    except (CorruptCheckpointError, ConcurrentModificationError, AccessDeniedError) as error:
        report.skipped = f"a manifest there cannot be read ({error}); its packs are kept"
        return report
    referenced = {name for manifest in manifests.values() for name in manifest.packs}
    cutoff = now - older_than
    packs_prefix = Location(area.scheme, area.bucket, area.key + PACKS)
    for info in await store.list(packs_prefix):
        name = info.location.key[len(packs_prefix.key) :]
        if name in referenced:
            continue
        if info.modified is not None and info.modified <= cutoff:
            report.removed[name] = info.size
        else:
            report.kept_unreferenced += 1
    if not report.removed or dry_run:
        return report
    # A save that started since the first look may reference any of them: it still holds its
    # lease, or it committed a manifest since (it may have read a manifest that was removed before
    # this read it, so its packs show as unreferenced). Any object of the folder written, replaced
    # or removed since the first look calls the deletion off: a later gc does it.
    if await saves_in_progress() or await _children(store, area) != before:
        report.removed = {}
        report.skipped = "a save ran while the manifests were read"
        return report
    for name in list(report.removed):
        if not await store.delete(pack_location(area, name)):
            del report.removed[name]
    return report


async def collect(
    store: Store,
    prefix: Location,
    config: TransferConfig,
    *,
    older_than: float,
    dry_run: bool = False,
    lease_ttl: float = LEASE_TTL,
) -> list[AreaReport]:
    """:func:`collect_area` for every pack store under ``prefix``."""
    areas = areas_under(await store.list(prefix))
    return [
        await collect_area(store, area, config, older_than=older_than, dry_run=dry_run, lease_ttl=lease_ttl)
        for _, area in sorted(areas.items())
    ]


@dataclass(frozen=True)
class Usage:
    """What one incremental checkpoint holds in its folder's pack store.

    Attributes:
        referenced: Bytes of the pack blocks holding the chunks it references (as stored:
            compressed).
        exclusive: Of those, the bytes in packs no other checkpoint of its folder references:
            what removing it and a ``gc`` frees at least (``gc`` deletes whole packs, so a block
            only it references, in a pack another checkpoint also uses, stays).
        files: Regular files in its tree.
    """

    referenced: int
    exclusive: int
    files: int


def usage(manifests: dict[str, Manifest]) -> dict[str, Usage]:
    """The :class:`Usage` of each of the manifests of one folder, by key (counted by pack block:
    chunks sharing a block share its bytes)."""
    blocks = {key: manifest.blocks() for key, manifest in manifests.items()}
    users: dict[str, int] = {}  # pack -> how many manifests reference a block of it
    for held in blocks.values():
        for pack in {pack for pack, _ in held}:
            users[pack] = users.get(pack, 0) + 1
    result = {}
    file = ord(FILE)
    for key, manifest in manifests.items():
        held = blocks[key]
        referenced = sum(held.values())
        exclusive = sum(stored for (pack, _), stored in held.items() if users[pack] == 1)
        files = manifest.kinds.count(file)
        result[key] = Usage(referenced, exclusive, files)
    return result
