"""Incremental directory checkpoints: a manifest of chunks kept in shared, immutable packs.

Layout, next to the checkpoint's key (``<folder>/<name>``)::

    <folder>/<name>                                    the manifest, written last (the checkpoint)
    <folder>/.checkpointio-incremental/packs/<hash>    packs: blocks of chunks, deflated or stored
    <folder>/.checkpointio-incremental/leases/<id>     one per save in progress (see gc below)

Every checkpoint saved incrementally in one folder shares its packs: a save uploads only the
chunks that no parent (what the key held before, the checkpoint the task restored from) already
stored there. Unchanged files are recognised without reading them (same size, mtime and inode as
in the parent's manifest); changed ones are cut by content (:mod:`.._cdc`) so an edit or an append
re-uploads only the chunks around it. Each pack carries a CRC32 of its own; each chunk is checked
against its BLAKE3 hash before a restore presents anything.

Modules, each importing only those listed before it:

- :mod:`._layout`: where the manifest, packs and leases are;
- :mod:`._manifest`: what a manifest records, its bytes, and the checks it passes before use;
- :mod:`._chunks`: cutting files, naming, packing and checking chunks;
- :mod:`._leases`: the lease a save holds while it runs;
- :mod:`._save`, :mod:`._restore` (and verify), :mod:`._gc` (garbage collection, usage).

The rest of checkpointio uses the names this package exports.
"""

from ._gc import AreaReport, Usage, collect, collect_area, manifests_beside, usage
from ._layout import AREA, area_of, areas_under, folder_of, in_area, pack_location
from ._leases import LEASE_RENEW, LEASE_TTL
from ._manifest import (
    LAYOUT,
    MAGIC,
    MAX_BLOCK_BYTES,
    Chunk,
    Entry,
    Manifest,
    decode,
    encode,
    is_manifest,
    is_manifest_object,
    read_manifest,
)
from ._restore import list_entries, load, verify
from ._save import PACK_SIZE, Written, save

__all__ = [
    "AREA",
    "LAYOUT",
    "LEASE_RENEW",
    "LEASE_TTL",
    "MAGIC",
    "MAX_BLOCK_BYTES",
    "PACK_SIZE",
    "AreaReport",
    "Chunk",
    "Entry",
    "Manifest",
    "Usage",
    "Written",
    "area_of",
    "areas_under",
    "collect",
    "collect_area",
    "decode",
    "encode",
    "folder_of",
    "in_area",
    "is_manifest",
    "is_manifest_object",
    "list_entries",
    "load",
    "manifests_beside",
    "pack_location",
    "read_manifest",
    "save",
    "usage",
    "verify",
]
