"""Bounds on server-streaming calls: how many run at once, per server and per peer, and how long one
may wait for a caller that reads nothing.

A stream holds about two batches while its next message waits for the caller (ours, built for the
next write, and gRPC's serialised copy, which flow control keeps until the caller reads): ~1 MiB
each for FetchBlocks. Memory is bounded by the number of streams that may run at once; a peer that
opens many is held to its own share so the others are still served; a stream whose caller takes
nothing for ``stall`` seconds is ended, giving its slot back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from cachepoint import memory
from cachepoint.rpc.errors import PeerStalled, TooManyStreams

log = logging.getLogger("cachepoint.rpc")


@dataclass(frozen=True, slots=True)
class StreamLimits:
    per_server: int
    """Streams of one method running at once on this server."""
    per_peer: int
    """Of those, streams one peer (an IP address) may run at once."""
    wait: float
    """Seconds a stream over a limit waits for a slot before it is refused (RESOURCE_EXHAUSTED)."""
    stall: float
    """Seconds a message may wait for the caller to read before the stream is ended."""


def peer_host(peer: str) -> str:
    """The address part of grpc's peer string: ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``,
    ``ipv6:[::1]:51234`` -> ``::1``; a Unix socket's callers are all one local peer."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host
    return kind or peer


class StreamSlots:
    """Slots for the streams of one method, shared by every call to it on one server.

    A call over a limit waits up to ``wait`` seconds for a slot, then is refused. At most
    ``per_peer`` calls of one peer wait at once; more are refused at once, so a peer that opens
    hundreds of calls costs a few of them in memory (each holds its request) and others are served.
    """

    def __init__(self, method: str, limits: StreamLimits) -> None:
        self.method = method
        self.limits = limits
        self.running = 0
        self.by_peer: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self._released = asyncio.Event()

    def _refusal(self, host: str) -> TooManyStreams | None:
        if self.by_peer.get(host, 0) >= self.limits.per_peer:
            count = self.by_peer[host]
            return TooManyStreams(self.method, f"{count} streams from {host} are open", "per peer")
        if self.running >= self.limits.per_server:
            return TooManyStreams(self.method, f"{self.running} streams are open", "of this node")
        return None

    async def admit(self, context: grpc.aio.ServicerContext) -> None:
        """Take a slot for this call, waiting for one if need be (TooManyStreams if none comes).
        The slot is given back when gRPC has ended the call (with the buffers of the message it
        was sending), however the handler left."""
        host = peer_host(context.peer() or "")
        refusal = self._refusal(host)
        if refusal is not None:
            if self.waiting.get(host, 0) >= self.limits.per_peer:
                raise refusal
            await self._wait(host)
        self.running += 1
        self.by_peer[host] = self.by_peer.get(host, 0) + 1
        context.add_done_callback(lambda _context: self._release(host))

    def _release(self, host: str) -> None:
        self.running -= 1
        _count_down(self.by_peer, host)
        # Everyone waiting looks again; the next release makes a new event for the next waits.
        self._released.set()
        self._released = asyncio.Event()
        if not self.running:
            memory.after_load()  # a wave of streams has ended: give its buffers back soon

    async def _wait(self, host: str) -> None:
        self.waiting[host] = self.waiting.get(host, 0) + 1
        try:
            async with asyncio.timeout(self.limits.wait):
                while self._refusal(host) is not None:
                    await self._released.wait()
        except TimeoutError:
            refusal = self._refusal(host)
            if refusal is not None:
                raise refusal from None
        finally:
            _count_down(self.waiting, host)

    async def write(self, context: grpc.aio.ServicerContext, message: object) -> None:
        """Send one message, waiting as long as the caller reads, but no longer than ``stall`` for
        a caller that reads nothing: then the call ends (DEADLINE_EXCEEDED) and its slot comes back."""
        try:
            await asyncio.wait_for(context.write(message), self.limits.stall)
        except TimeoutError:
            # Ended with a status (for a caller that reads again someday); gRPC then drops the
            # call and the message it could not deliver, and the slot comes back.
            log.info("%s: %s read nothing for %g s", self.method, context.peer(), self.limits.stall)
            raise PeerStalled(self.method, self.limits.stall) from None
        except Exception as err:
            # The call is over: the caller cancelled or its connection died (gRPC then cancels this
            # handler too, but 3.11's wait_for may hand back the write's failure instead). There is
            # no one left to tell; end quietly rather than as an internal error with a traceback.
            log.debug("%s: the caller is gone: %r", self.method, err)
            raise asyncio.CancelledError() from None


def _count_down(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
