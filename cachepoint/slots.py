"""Slots for work that holds memory while its peer is slow: a stream of blocks, a download.

Each such stream holds a few MiB (what it read ahead, what waits in a socket's buffer) for as long
as its peer takes to read. Memory is bounded by how many may run at once on a server; a peer that
opens many is held to its own share so that others are still served. A stream over a limit waits
up to ``wait`` seconds for a slot, then is refused; at most ``per_peer`` streams of one peer wait at
once and more are refused at once, so a peer that opens hundreds costs a few of them (each waiting
one holds its request). Used by gRPC (cachepoint/rpc/streams.py) and HTTP (cachepoint/http/app.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cachepoint import memory
from cachepoint.errors import CachepointError


class TooManyStreams(CachepointError):
    """{}: {} (the limit {}); try again later"""


@dataclass(frozen=True, slots=True)
class SlotLimits:
    per_server: int
    """Streams running at once on this server."""
    per_peer: int
    """Of those, streams one peer (an IP address) may run at once."""
    wait: float
    """Seconds a stream over a limit waits for a slot before it is refused."""
    stall: float
    """Seconds a stream may wait for its peer to take what it sent before it is ended."""


class Slots:
    """The slots of one kind of stream on one server (used from its event loop only)."""

    def __init__(self, what: str, limits: SlotLimits) -> None:
        self.what = what
        self.limits = limits
        self.running = 0
        self.by_peer: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self._released = asyncio.Event()

    def _refusal(self, peer: str) -> TooManyStreams | None:
        if self.by_peer.get(peer, 0) >= self.limits.per_peer:
            return TooManyStreams(self.what, f"{self.by_peer[peer]} from {peer} are running", "per peer")
        if self.running >= self.limits.per_server:
            return TooManyStreams(self.what, f"{self.running} are running", "of this node")
        return None

    async def acquire(self, peer: str) -> None:
        """Take a slot for ``peer``, waiting for one if need be; TooManyStreams if none comes.
        Every successful acquire is followed by exactly one ``release(peer)``."""
        refusal = self._refusal(peer)
        if refusal is not None:
            if self.waiting.get(peer, 0) >= self.limits.per_peer:
                raise refusal
            await self._wait(peer)
        self.running += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1

    def release(self, peer: str) -> None:
        self.running -= 1
        _count_down(self.by_peer, peer)
        # Everyone waiting looks again; the next release makes a new event for the next waits.
        self._released.set()
        self._released = asyncio.Event()
        if not self.running:
            memory.after_load()  # a wave of streams has ended: give its buffers back soon

    async def _wait(self, peer: str) -> None:
        self.waiting[peer] = self.waiting.get(peer, 0) + 1
        try:
            async with asyncio.timeout(self.limits.wait):
                while self._refusal(peer) is not None:
                    await self._released.wait()
        except TimeoutError:
            refusal = self._refusal(peer)
            if refusal is not None:
                raise refusal from None
        finally:
            _count_down(self.waiting, peer)


def _count_down(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
