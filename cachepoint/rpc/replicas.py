"""Failover across the coordinator's replicas: ``--coordinator a:7400,b:7400`` names several, and a
call goes to the first one that is up, in an order that starts at the replica that answered last
(sticky: a client does not go back to probing a dead first entry on every call).

Two ways in. ``reachable`` picks the replica to talk to, for code that hands one address on (a pull
gives it to its fetcher as the origin; a daemon's Watch and heartbeat streams): a failure later on
that replica fails that call, and the caller's own retry picks again, starting from the replica after
it. ``call`` runs a piece of work on a channel and, when the replica turns out to be down (nothing
listens, the connection broke, a deadline passed before it ever connected), runs the work again on
the next one. Work is retried only when running it twice cannot double anything: reads, pushes of
content-addressed blocks, and commits that carry a commit id (the coordinator returns the version
the first attempt made). Work that is not idempotent is sent only over a connection that is up, and
never sent twice.

One address (today's default) behaves exactly as before: no probe, no retry, the same errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from cachepoint.rpc import channel

log = logging.getLogger("cachepoint.replicas")
T = TypeVar("T")

# How long a replica may take to accept a connection (TCP, and the TLS handshake) before the next one
# is tried. A refused connection fails at once; this bounds a replica whose host is down, at the cost
# of that much delay once (the next call starts at the replica that answered).
CONNECT_TIMEOUT = 3.0

# Per list of replicas (as written), the one that answered last: process-wide, so a daemon's Watch,
# heartbeat and outbox all start where the others found a live replica.
_sticky: dict[tuple[str, ...], str] = {}


def parse(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The replicas a ``--coordinator`` value names: HOST:PORT entries separated by commas (a config
    may give a TOML list); blanks around entries are dropped, duplicates kept once."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    addresses = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    return addresses or ("",)  # nothing named: the one empty address, refused where it is dialled


def order(spec: str | Sequence[str]) -> list[str]:
    """The replicas in the order to try them: from the one that answered last, then round the list."""
    addresses = parse(spec)
    last = _sticky.get(addresses)
    start = addresses.index(last) if last in addresses else 0
    return [*addresses[start:], *addresses[:start]]


def answered(spec: str | Sequence[str], address: str) -> None:
    """``address`` answered: later calls start there."""
    addresses = parse(spec)
    if address in addresses and _sticky.get(addresses) != address:
        if addresses in _sticky:
            log.warning("coordinator: now using replica %s of %s", address, ",".join(addresses))
        _sticky[addresses] = address


async def connects(ch: grpc.aio.Channel, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether ``ch`` gets a working connection within ``timeout`` (False at the first failure to
    connect: a refused port or a failed handshake does not wait out the timeout)."""

    async def settle() -> bool:
        state = ch.get_state(try_to_connect=True)
        while state not in (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        ):
            await ch.wait_for_state_change(state)
            state = ch.get_state(try_to_connect=True)
        return state == grpc.ChannelConnectivity.READY

    try:
        return await asyncio.wait_for(settle(), timeout)
    except TimeoutError:
        return False


async def reachable(spec: str, peer: bool = False) -> str:
    """The replica to talk to: the first in ``order`` that accepts a connection. When none does, the
    first in order, so that the call made to it fails with the usual error naming it."""
    candidates = order(spec)
    if len(candidates) == 1:
        return candidates[0]
    for address in candidates:
        async with channel.channel(address, peer=peer) as ch:
            if await connects(ch):
                answered(spec, address)
                return address
        log.info("coordinator replica %s is not reachable; trying the next", address)
    return candidates[0]


def is_down(err: grpc.RpcError, ch: grpc.aio.Channel) -> bool:
    """The replica, not the call, failed: nothing listens or the connection broke (UNAVAILABLE), or
    the deadline passed while the channel never got a connection."""
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ch.get_state() != grpc.ChannelConnectivity.READY
    return False


async def call(
    spec: str,
    work: Callable[[grpc.aio.Channel, str], Awaitable[T]],
    *,
    idempotent: bool = True,
) -> T:
    """``work(channel, address)`` on the first replica that is up, again on the next while replicas
    are down (only when ``idempotent``). The last replica's error is raised as it came."""
    candidates = order(spec)
    for index, address in enumerate(candidates):
        last = index == len(candidates) - 1
        async with channel.channel(address) as ch:
            if not last and not idempotent and not await connects(ch):
                log.info("coordinator replica %s is not reachable; trying the next", address)
                continue
            try:
                result = await work(ch, address)
            except grpc.aio.AioRpcError as err:
                if last or not idempotent or not is_down(err, ch):
                    raise
                log.info("coordinator replica %s: %s; trying the next", address, err.code().name)
                continue
        answered(spec, address)
        return result
    raise AssertionError("unreachable: the last replica returns or raises")
