"""Blocks this node's shared pull is fetching now, and a wake-up for the site peers waiting for them.

In a site fan-out (docs/design.md) every puller asks the owner of a share for it, often before the
owner has fetched it across the WAN. Rather than answer "not yet" and be asked again (a call per
poll on both nodes, most of them empty), the owner holds such a FetchBlocks call open (the request's
``wait_ms``) and streams each block of the call as its pull stores it: one call per unit, as full
as the owner's own batches, with no polling delay. The fetcher (``expect``, ``stored``, ``forget``)
and the FetchBlocks handler (``pending``, ``changed``) share one of these per daemon, on its event
loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable


class BlockArrivals:
    def __init__(self) -> None:
        # An id counts once per fetch expecting it (two pulls of versions sharing a block).
        self._pending: Counter[bytes] = Counter()
        self._changed = asyncio.Event()

    def pending(self, ids: Iterable[bytes]) -> set[bytes]:
        """Those of ``ids`` a pull of this node is still fetching (worth waiting for)."""
        return {digest for digest in ids if digest in self._pending}

    async def changed(self, timeout: float) -> None:
        """Until blocks arrive or a fetch ends, or ``timeout`` seconds."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass

    def expect(self, ids: Iterable[bytes]) -> None:
        self._pending.update(ids)

    def stored(self, ids: Iterable[bytes]) -> None:
        """``ids`` are in the store now: wake everyone waiting (each looks for its own)."""
        for digest in ids:
            self._settle(digest)
        self._wake()

    def forget(self, ids: Iterable[bytes]) -> None:
        """A fetch ended: what it did not store is no longer coming from it."""
        for digest in ids:
            self._settle(digest)
        self._wake()

    def _settle(self, digest: bytes) -> None:
        count = self._pending.get(digest, 0)
        if count > 1:
            self._pending[digest] = count - 1
        elif count:
            del self._pending[digest]

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
