"""Imported by a test's script: counts the blocks checkpointio's own HTTP reader hands over, so a
test can tell that object bodies went through it (not aiohttp)."""

from __future__ import annotations

from checkpointio._stores._s3 import _http

#: One entry per call of ``_Connection.take``: whether it handed over a block.
received: list[bool] = []

_take = _http._Connection.take


async def _counted(self: _http._Connection, timeout: float | None) -> bytearray | None:
    block = await _take(self, timeout)
    received.append(block is not None)
    return block


_http._Connection.take = _counted  # type: ignore[method-assign]
