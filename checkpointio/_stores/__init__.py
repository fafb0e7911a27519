"""Stores by URI scheme: one small registry, so a new store is one entry, not another ``if``."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import anyio.to_thread

from .._config import TransferConfig
from ._base import (
    DISTRIBUTED,
    INCREMENTAL,
    MANIFEST_MAGIC,
    Blocks,
    Body,
    Digest,
    Filling,
    Kind,
    ObjectInfo,
    PendingWrite,
    RangedStore,
    RangeSink,
    Record,
    Sink,
    Store,
)

__all__ = [
    "DISTRIBUTED",
    "INCREMENTAL",
    "MANIFEST_MAGIC",
    "Blocks",
    "Body",
    "Digest",
    "Filling",
    "Kind",
    "ObjectInfo",
    "PendingWrite",
    "RangeSink",
    "RangedStore",
    "Record",
    "Sink",
    "Store",
    "open_store",
    "schemes",
]

#: scheme -> "module:class"; modules are imported on first use (aiobotocore only when S3 is used).
_REGISTRY: dict[str, str] = {
    "file": "._local:LocalStore",
    "memory": "._memory:MemoryStore",
    "s3": "._s3:S3Store",
}


def schemes() -> list[str]:
    """The URI schemes a store is registered for."""
    return sorted(_REGISTRY)


async def open_store(scheme: str, config: TransferConfig) -> Store:
    """The store for ``scheme``, configured by ``config``.

    A store's module is imported on first use in a worker thread: importing aiobotocore takes a
    few hundred milliseconds that would otherwise stall the event loop.
    """
    try:
        target = _REGISTRY[scheme]
    except KeyError:
        raise ValueError(f"no store handles {scheme!r} URIs; known: {schemes()}") from None
    module_name, _, class_name = target.partition(":")
    module = sys.modules.get(importlib.util.resolve_name(module_name, __name__))
    if module is None:
        module = await anyio.to_thread.run_sync(importlib.import_module, module_name, __name__)
    store: Store = getattr(module, class_name)(config)
    return store
