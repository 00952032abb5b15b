"""Fleet over gRPC: register, heartbeat, find peers, list nodes."""

from __future__ import annotations

import time

import grpc

from cachepoint.errors import InvalidInput, NotFound
from cachepoint.rpc.errors import rpc_errors
from cachepoint.v1 import fleet_pb2, fleet_pb2_grpc, version_pb2
from cachepoint.wire import ref_from_pb
from coordinator.assignments import Assignments
from coordinator.fleet.registry import HEARTBEAT_INTERVAL_MS, Node, Registry, UnknownNode

MAX_PEERS = 64


class UnknownNodeError(NotFound):
    """node {!r} is not registered (register again)"""


def _ref_text(ref: version_pb2.Ref) -> str:
    parsed = ref_from_pb(ref)
    if parsed.number is None:
        raise InvalidInput(f"holdings are versions (LAYER@N), not tags: {parsed}")
    return str(parsed)


def _node_info(node: Node) -> fleet_pb2.NodeInfo:
    return fleet_pb2.NodeInfo(node_id=node.node_id, site=node.site, address=node.address)


class FleetService(fleet_pb2_grpc.FleetServicer):
    def __init__(self, registry: Registry, assignments: Assignments | None = None) -> None:
        self.registry = registry
        self.assignments = assignments

    @rpc_errors
    async def Register(  # noqa: N802 - gRPC method name
        self, request: fleet_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RegisterResponse:
        node = request.node
        for name in ("node_id", "site", "address"):
            if not getattr(node, name):
                raise InvalidInput(f"Register: {name} is required")
        self.registry.register(node.node_id, node.site, node.address)
        return fleet_pb2.RegisterResponse(heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)

    @rpc_errors
    async def Heartbeat(  # noqa: N802
        self, request: fleet_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.HeartbeatResponse:
        complete = {_ref_text(ref) for ref in request.complete}
        try:
            self.registry.heartbeat(request.node_id, complete, request.load)
        except UnknownNode as err:
            raise UnknownNodeError(request.node_id) from err
        return fleet_pb2.HeartbeatResponse()

    @rpc_errors
    async def FindPeers(  # noqa: N802
        self, request: fleet_pb2.FindPeersRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.FindPeersResponse:
        ref = _ref_text(request.version) if request.HasField("version") else None
        limit = min(request.limit or MAX_PEERS, MAX_PEERS)
        peers = [
            fleet_pb2.Peer(node=_node_info(node), same_site=same, load=node.load)
            for node, same in self.registry.holders(request.requester_id, ref, limit)
        ]
        return fleet_pb2.FindPeersResponse(peers=peers)

    @rpc_errors
    async def ListNodes(  # noqa: N802
        self, request: fleet_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListNodesResponse:
        now = time.time_ns()
        response = fleet_pb2.ListNodesResponse()
        for node in sorted(self.registry.nodes.values(), key=lambda n: (n.site, n.node_id)):
            status = response.nodes.add(
                node=_node_info(node),
                last_seen_ns=node.last_seen_ns,
                load=node.load,
                healthy=node.healthy(now),
                users=self.assignments.users_of(node.node_id) if self.assignments else (),
            )
            for ref in sorted(node.complete):
                layer, _, number = ref.rpartition("@")
                status.complete.add(layer=layer, number=int(number))
        return response
