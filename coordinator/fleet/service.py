"""Fleet over gRPC: register, heartbeat, find peers, list nodes.

With mutual TLS (``caller`` gives the call's principal), a heartbeat reply carries the fleet view a
node's peer port needs (revocations, assignments: cachepoint/trust/fleet_view.py), and the listings
show a caller only holdings of layers it may read; admins and auditors see all, and the assignments.
(That Register and Heartbeat name the caller's own node id is a rule of coordinator/authz.py.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from cachepoint.errors import InvalidInput, NotFound
from cachepoint.rpc.errors import rpc_errors
from cachepoint.trust import reading
from cachepoint.trust.principal import Principal
from cachepoint.v1 import fleet_pb2, fleet_pb2_grpc, version_pb2
from cachepoint.wire import ref_from_pb
from coordinator.assignments import AssignmentView
from coordinator.fleet.registry import (
    HEARTBEAT_INTERVAL_MS,
    FleetRegistry,
    Node,
    NodeReport,
    SubscriptionLag,
    UnknownNode,
)

MAX_PEERS = 64
# The call's principal, None without TLS (everything is shown); the revoked names and when.
Caller = Callable[[grpc.aio.ServicerContext], Principal | None]
RevokedNames = Callable[[], dict[str, float]]


class UnknownNodeError(NotFound):
    """node {!r} is not registered (register again)"""


def _ref_text(ref: version_pb2.Ref) -> str:
    parsed = ref_from_pb(ref)
    if parsed.number is None:
        raise InvalidInput(f"holdings are versions (LAYER@N), not tags: {parsed}")
    return str(parsed)


MAX_REPORTED = 256  # sources and subscriptions kept of one heartbeat's report (a bound, not a rule)


def _report(request: fleet_pb2.HeartbeatRequest) -> NodeReport | None:
    if not request.HasField("report"):
        return None  # a node older than the dashboard: keep what is known
    report = request.report
    return NodeReport(
        software=report.software[:64],
        outbox_depth=report.outbox_depth,
        bytes_by_source=tuple(
            (s.source_class[:32], s.blocks, s.bytes) for s in report.sources[:MAX_REPORTED]
        ),
        subscriptions=tuple(
            SubscriptionLag(s.ref[:256], s.wanted, s.held, s.state[:32])
            for s in report.subscriptions[:MAX_REPORTED]
        ),
    )


def _node_info(node: Node) -> fleet_pb2.NodeInfo:
    return fleet_pb2.NodeInfo(node_id=node.node_id, site=node.site, address=node.address)


class FleetService(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self,
        registry: FleetRegistry,
        assignments: AssignmentView | None = None,
        caller: Caller = lambda context: None,
        revoked: RevokedNames | None = None,
    ) -> None:
        """``revoked`` None: no TLS, heartbeat replies carry no fleet view."""
        self.registry = registry
        self.assignments = assignments
        self.caller = caller
        self.revoked = revoked

    def _reader(self, context: grpc.aio.ServicerContext) -> tuple[Callable[[str], bool] | None, bool]:
        """(which layers the caller's listings show, None for all; whether it sees assignments)."""
        principal = self.caller(context)
        if principal is None or reading.sees_everything(principal):
            return None, True
        users_of = self.assignments.users_of if self.assignments else lambda node: frozenset()
        return (lambda layer: reading.may_read_layer(principal, layer, users_of)), False

    def _view(self) -> fleet_pb2.HeartbeatResponse:
        if self.revoked is None:
            return fleet_pb2.HeartbeatResponse()
        reply = fleet_pb2.HeartbeatResponse(trust_view=True)
        for name, at in sorted(self.revoked().items()):
            reply.revoked.add(name=name, revoked_at=at)
        for node, users in (self.assignments.all() if self.assignments else {}).items():
            reply.assignments.add(node_id=node, users=users)
        return reply

    @rpc_errors
    async def Register(  # noqa: N802 - gRPC method name
        self, request: fleet_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RegisterResponse:
        node = request.node
        for name in ("node_id", "site", "address"):
            if not getattr(node, name):
                raise InvalidInput(f"Register: {name} is required")
        await self.registry.register_node(node.node_id, node.site, node.address)
        return fleet_pb2.RegisterResponse(heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)

    @rpc_errors
    async def Heartbeat(  # noqa: N802
        self, request: fleet_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.HeartbeatResponse:
        complete = {_ref_text(ref) for ref in request.complete}
        try:
            await self.registry.record_heartbeat(request.node_id, complete, request.load, _report(request))
        except UnknownNode as err:
            raise UnknownNodeError(request.node_id) from err
        return self._view()

    @rpc_errors
    async def FindPeers(  # noqa: N802
        self, request: fleet_pb2.FindPeersRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.FindPeersResponse:
        ref = _ref_text(request.version) if request.HasField("version") else None
        limit = min(request.limit or MAX_PEERS, MAX_PEERS)
        may_read, _ = self._reader(context)
        if ref is not None and may_read is not None and not may_read(request.version.layer):
            return fleet_pb2.FindPeersResponse()  # as for a version no node holds
        peers = [
            fleet_pb2.Peer(node=_node_info(node), same_site=same, load=node.load)
            for node, same in await self.registry.find_holders(request.requester_id, ref, limit)
        ]
        principal = self.caller(context)
        # With TLS a node announces only its own pulls (as Heartbeat speaks only for itself).
        speaks_for_itself = principal is None or principal.name == request.requester_id
        if request.pulling and ref is not None and speaks_for_itself:
            try:
                await self.registry.record_pulling(request.requester_id, ref)
            except UnknownNode as err:
                raise UnknownNodeError(request.requester_id) from err
            peers += [
                fleet_pb2.Peer(node=_node_info(node), same_site=True, load=node.load, pulling=True)
                for node in (await self.registry.find_pullers(request.requester_id, ref))[
                    : max(limit - len(peers), 0)
                ]
            ]
        return fleet_pb2.FindPeersResponse(peers=peers)

    @rpc_errors
    async def ListNodes(  # noqa: N802
        self, request: fleet_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListNodesResponse:
        now = time.time_ns()
        response = fleet_pb2.ListNodesResponse()
        may_read, all_assignments = self._reader(context)
        principal = self.caller(context)
        for node in sorted(await self.registry.list_nodes(), key=lambda n: (n.site, n.node_id)):
            own = principal is not None and principal.name == node.node_id
            shown = all_assignments or own
            status = response.nodes.add(
                node=_node_info(node),
                last_seen_ns=node.last_seen_ns,
                load=node.load,
                healthy=node.healthy(now),
                users=self.assignments.users_of(node.node_id) if self.assignments and shown else (),
            )
            for ref in sorted(node.complete):
                layer, _, number = ref.rpartition("@")
                if may_read is None or may_read(layer):
                    status.complete.add(layer=layer, number=int(number))
        return response
