"""Channel and server settings shared by every node: explicit message limits, keepalive."""

from __future__ import annotations

import grpc

from cachepoint.rpc.guards import RequestGuard

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


def channel(address: str, max_receive: int = MAX_MESSAGE) -> grpc.aio.Channel:
    """``max_receive``: a smaller bound on each message received, for a channel that only takes
    messages of a known size (a fetch of blocks)."""
    options = [(key, value) for key, value in OPTIONS if key != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", max_receive))
    return grpc.aio.insecure_channel(address, options=options)


def server() -> grpc.aio.Server:
    # Every server refuses malformed requests and caps block streams per peer (guards.py).
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[RequestGuard()])
