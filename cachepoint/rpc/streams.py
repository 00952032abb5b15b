"""Server-streaming calls under cachepoint/slots.py's limits: a slot per call, per server and per peer
address, and a bound on how long a message may wait for a caller that reads nothing.

A FetchBlocks stream holds its batch while the message waits for the caller, and gRPC its serialised
copy, which flow control keeps until the caller reads: ~3-4 MiB in all (measured). Handlers write
with ``write`` (context.write), never by yielding: then the next batch is built only once the
previous one has been taken, and a stall can be noticed.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from cachepoint.rpc.errors import PeerStalled
from cachepoint.slots import SlotLimits, Slots

log = logging.getLogger("cachepoint.rpc")


def peer_host(peer: str) -> str:
    """The address part of grpc's peer string: ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``,
    ``ipv6:[::1]:51234`` -> ``::1``; a Unix socket's callers are all one local peer."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host
    return kind or peer


class StreamSlots:
    """The slots of one method's calls on one server."""

    def __init__(self, method: str, limits: SlotLimits) -> None:
        self.method = method
        self.slots = Slots(f"{method} streams", limits)

    @property
    def running(self) -> int:
        return self.slots.running

    async def admit(self, context: grpc.aio.ServicerContext) -> None:
        """Take a slot for this call, waiting for one if need be (TooManyStreams if none comes).
        The slot is given back when gRPC has ended the call (and dropped the message it was
        sending), however the handler left."""
        host = peer_host(context.peer() or "")
        await self.slots.acquire(host)
        context.add_done_callback(lambda _context: self.slots.release(host))

    async def write(self, context: grpc.aio.ServicerContext, message: object) -> None:
        """Send one message, waiting as long as the caller reads, but no longer than ``stall`` for
        a caller that reads nothing: then the call ends (DEADLINE_EXCEEDED) and its slot comes back."""
        stall = self.slots.limits.stall
        try:
            await asyncio.wait_for(context.write(message), stall)
        except TimeoutError:
            log.info("%s: %s read nothing for %g s", self.method, context.peer(), stall)
            raise PeerStalled(self.method, stall) from None
        except Exception as err:
            # The call is over: the caller cancelled or its connection died (gRPC then cancels this
            # handler too, but 3.11's wait_for may hand back the write's failure instead). There is
            # no one left to tell; end quietly rather than as an internal error with a traceback.
            log.debug("%s: the caller is gone: %r", self.method, err)
            raise asyncio.CancelledError() from None
