"""The fleet as a source: blocks fetched nearest first (site peers, other peers, then the origin).

The streams, the choice of sources and the SHA-256 check of every block as it arrives belong to
cachepoint/replication/fetcher.py; the daemon hands this source a coroutine that runs one such fetch
and returns the verified stored values (cachepoint/daemon.py ``open_remote``). A block no source had
is missing (absent); a source that sent a corrupt block was dropped and the block asked elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from cachepoint.blocks import MAX_BLOCK_SIZE, decode_stored
from cachepoint.blocksource.base import BlockSource

FetchFn = Callable[[list[bytes]], Awaitable[dict[bytes, bytes]]]


class TieredSource(BlockSource):
    def __init__(
        self,
        fetch: FetchFn,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        block_size: int = MAX_BLOCK_SIZE,
    ) -> None:
        """``fetch`` runs on ``loop`` (the daemon's); this source is called from worker threads and
        waits up to ``timeout`` seconds for it. Never call it from ``loop``'s own thread."""
        self._fetch = fetch
        self._loop = loop
        self.timeout = timeout
        self.block_size = block_size

    def stored_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        if not ids:
            return {}
        future = asyncio.run_coroutine_threadsafe(self._run(list(ids)), self._loop)
        return future.result(timeout=self.timeout)

    async def _run(self, ids: list[bytes]) -> dict[bytes, bytes]:
        return await self._fetch(ids)

    def get_many(self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()) -> dict[bytes, bytes]:
        # Verified by the fetcher as they arrived: decoding is all that is left.
        size = self.block_size
        return {digest: decode_stored(digest, value, size) for digest, value in self.stored_many(ids).items()}
