"""S3 and S3-compatible stores through aiobotocore: this package is the only importer of (aio)botocore.

- ``_errors``: botocore's and aiohttp's errors mapped to the ``CheckpointError`` tree.
- ``_loader``: a botocore session whose S3 models are parsed off the event loop.
- ``_client``: one client (and connection pool) per event loop and settings, closed when its loop
  shuts down its async generators (``asyncio.run`` and anyio do); the request options.
- ``_upload``: one PUT, or a multipart upload fed as a stream; aborted on any error or cancellation.
- ``_download``: concurrent ranged GETs pinned to the ETag a HEAD found, delivered in order; a range
  that fails half-way is resumed on its own.
- ``_store``: :class:`S3Store`, the ``Store`` the rest of the library sees: HEAD, list, delete,
  conditional create, unfinished uploads; put and get through ``_upload`` and ``_download``.
"""

from ._store import S3Store

__all__ = ["S3Store"]
