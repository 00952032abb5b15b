"""Channel and server settings shared by every node: explicit message limits, keepalive, how many
streams a server runs at once, and the process's TLS identity when it has one
(cachepoint/trust/identity.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc

from cachepoint.rpc.guards import RequestGuard
from cachepoint.slots import SlotLimits

# Batches are ~1 MiB of stored blocks; a manifest of a 1 TiB image at 64 KiB blocks is 512 MiB of ids,
# far more than we ever send in one message, so manifests above this limit are refused, not truncated.
MAX_MESSAGE = 64 * 1024 * 1024
MAX_HAS_IDS = 65536
MAX_FETCH_IDS = 4096
BATCH_BYTES = 1024 * 1024

OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A node coming back should be reached within seconds, not after gRPC's default 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 4000),
]
SERVER_OPTIONS = [
    *OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]

# A cachepoint daemon's server: peers ask for blocks and catalog reads, local commands call the
# Agent. No request it takes is near 4 MiB (HasBlocks' 65536 ids are 2 MiB), and gRPC holds a whole
# message before it reaches us, so larger ones are refused before they cost memory. Streams per
# HTTP/2 connection and calls at once are capped too; a caller over a cap waits (streams) or is
# told RESOURCE_EXHAUSTED (calls).
NODE_MAX_RECEIVE = 4 * 1024 * 1024
NODE_MAX_CALLS = 256
NODE_SERVER_OPTIONS = [
    *[(key, value) for key, value in SERVER_OPTIONS if key != "grpc.max_receive_message_length"],
    ("grpc.max_receive_message_length", NODE_MAX_RECEIVE),
    ("grpc.max_concurrent_streams", 64),
]

# FetchBlocks streams at once (streams.py: each holds ~3-4 MiB while its caller is slow to read). A
# daemon serves the peers of its site; the coordinator, the origin, serves every node and is given
# the memory for it. 30 s without a read ends a stream: a fetcher gives up on a source after 10.
NODE_FETCH_LIMITS = SlotLimits(per_server=16, per_peer=8, wait=5.0, stall=30.0)
ORIGIN_FETCH_LIMITS = SlotLimits(per_server=64, per_peer=16, wait=5.0, stall=30.0)


class TlsIdentity(Protocol):
    generation: int  # grows at each renewal: channels made before present the old certificate

    def channel_credentials(self) -> grpc.ChannelCredentials: ...


# Set once by a command or daemon that has an identity; every channel it makes then presents it.
# Plaintext while None, as before enrollment existed.
_identity: TlsIdentity | None = None
PEER_TLS_NAME = "peer.cachepoint.invalid"  # = cachepoint.trust.principal.PEER_TLS_NAME (no grpc there)


def use_identity(identity: TlsIdentity | None) -> None:
    global _identity
    _identity = identity


def identity() -> TlsIdentity | None:
    return _identity


def generation() -> int:
    """Changes when the identity's certificate is renewed: a long-lived channel is then made again."""
    return _identity.generation if _identity is not None else 0


def channel(address: str, peer: bool = False, max_receive: int = MAX_MESSAGE) -> grpc.aio.Channel:
    """A channel to ``address``; with an identity, mutual TLS. A ``peer`` (another node, dialled by an
    address its certificate cannot name) is checked for the name every node's certificate carries.
    ``max_receive``: a smaller bound on each message received, for a channel that only takes messages
    of a known size (a fetch of blocks)."""
    options = [(key, value) for key, value in OPTIONS if key != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", max_receive))
    if _identity is None:
        return grpc.aio.insecure_channel(address, options=options)
    if peer:
        options.append(("grpc.ssl_target_name_override", PEER_TLS_NAME))
    return grpc.aio.secure_channel(address, _identity.channel_credentials(), options=options)


def server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    node: bool = False,
    metrics: grpc.aio.ServerInterceptor | None = None,
) -> grpc.aio.Server:
    """A server with our options; ``node``: a cachepoint daemon's, with its smaller limits. Every server
    refuses malformed requests and caps block streams per peer (guards.py). ``metrics`` (rpc/metrics.py)
    goes first, so that it sees the status of calls the others refuse."""
    guards = [*([metrics] if metrics is not None else []), RequestGuard(), *interceptors]
    if node:
        return grpc.aio.server(
            options=NODE_SERVER_OPTIONS, maximum_concurrent_rpcs=NODE_MAX_CALLS, interceptors=guards
        )
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=guards)
