"""Finding the daemon that owns a store and asking it how it is doing, over its Agent socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc

from cachepoint.errors import InvalidInput, NotFound, StoreBusy
from cachepoint.layers.ingest import IngestOptions
from cachepoint.rpc.agent_socket import agent_channel
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.v1 import agent_pb2, agent_pb2_grpc

STATE_FILE = "daemon.json"
INGEST_DEADLINE = 6 * 3600.0


def agent_socket(store: Path) -> Path:
    """The Agent socket the daemon serving ``store`` announced when it started (STORE/agent.sock):
    local commands reach the daemon there only, never over its network port."""
    try:
        return Path(json.loads((store / STATE_FILE).read_text())["agent"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NotFound(
            f"no cachepoint daemon is running on store {store} (start one with `cachepoint serve`)"
        ) from err


async def daemon_status(store: Path) -> agent_pb2.StatusResponse:
    address = agent_socket(store)
    async with agent_channel(address) as ch:
        try:
            return await agent_pb2_grpc.AgentStub(ch).Status(
                agent_pb2.StatusRequest(), timeout=UNARY_DEADLINE
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, str(address)) from err


def status_of(store: Path) -> dict[str, object]:
    """`cachepoint status --json` of the daemon serving ``store``, for a caller without a loop (the
    command, and the harnesses that wait on a daemon: fleetlab, tests/fleet.py)."""
    return status_json(asyncio.run(daemon_status(store)))


async def ingest_via_daemon(store: Path, path: Path, options: IngestOptions) -> dict[str, object]:
    """Ask the daemon that holds ``store`` to ingest ``path`` (a path on this host)."""
    if options.chunking is not None:
        # The Agent's IngestRequest has no chunking field yet: refuse rather than cut another way.
        raise InvalidInput(
            f"--chunking cannot be passed to the daemon that holds {store}: ingest while it is stopped "
            "(a layer keeps its chunking, so later versions need no flag)"
        )
    try:
        address = agent_socket(store)
    except NotFound as err:
        raise StoreBusy(store, "another process holds it and no daemon is announced") from err
    request = agent_pb2.IngestRequest(
        layer=options.layer,
        path=str(path.resolve()),
        kind=int(options.kind),
        message=options.message,
        tags=list(options.tags),
        block_size=options.block_size or 0,
        author=options.author,
        allow_same=options.allow_same,
    )
    async with agent_channel(address) as ch:
        try:
            response = await agent_pb2_grpc.AgentStub(ch).Ingest(request, timeout=INGEST_DEADLINE)
        except grpc.RpcError as err:
            raise from_rpc_error(err, str(address)) from err
    return dict(json.loads(response.result_json))


def status_json(s: agent_pb2.StatusResponse) -> dict[str, object]:
    scrub = json.loads(s.scrub_json) if s.scrub_json else {}
    return {
        "node_id": s.node_id,
        "site": s.site,
        "address": s.address,
        "coordinator": s.coordinator,
        "coordinator_connected": s.coordinator_connected,
        "catalog_position": s.catalog_position,
        "subscriptions": [
            {
                "ref": sub.ref,
                "state": sub.state,
                "wanted": sub.wanted,
                "held": sub.held,
                "lag": max(sub.wanted - sub.held, 0),
                "last_error": sub.last_error,
            }
            for sub in s.subscriptions
        ],
        "versions": [f"{v.layer}@{v.number}" for v in s.versions],
        "outbox_depth": s.outbox_depth,
        "peers_known": s.peers_known,
        "bytes_by_source": {
            c.source_class: {
                "blocks": c.blocks,
                "bytes": c.bytes,
                "failures": c.failures,
                "corrupt": c.corrupt,  # of the failures, sources dropped for a block that failed its hash
            }
            for c in s.sources
        },
        # The last finished scrub pass (cachepoint/scrub.py) and the one running now, if any.
        "scrub": scrub.get("last"),
        "scrub_running": scrub.get("running"),
        "space": space_json(s.space) if s.HasField("space") else None,
    }


def space_json(space: agent_pb2.DiskSpace) -> dict[str, object]:
    from cachepoint.console import human

    paused = (
        f"pulls paused: {human(space.available_bytes)} free, at min_free {space.min_free} "
        f"({human(space.min_free_bytes)})"
    )
    return {
        "available_bytes": space.available_bytes,
        "total_bytes": space.total_bytes,
        "free_bytes": space.free_bytes,
        "min_free": space.min_free,
        "min_free_bytes": space.min_free_bytes,
        "pulls_paused": space.pulls_paused,
        "reserve_bytes": space.reserve_bytes,
        "reserve_target_bytes": space.reserve_target_bytes,
        "summary": paused
        if space.pulls_paused
        else f"{human(space.available_bytes)} free for pulls (min_free {space.min_free})",
    }


async def agent_call(store: Path, method: str, request: object, timeout: float = UNARY_DEADLINE) -> object:
    """Call one Agent method on the daemon that holds ``store``."""
    address = agent_socket(store)
    async with agent_channel(address) as ch:
        try:
            return await getattr(agent_pb2_grpc.AgentStub(ch), method)(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, str(address)) from err
