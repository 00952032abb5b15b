"""Who may call what on the coordinator's mutual-TLS port: one table, RULES, method -> rule, checked by
the Authorizer interceptor (after the Guard has authenticated the caller) for every call. A method
missing from the table is refused. README.md prints the table (tests/test_authz_table.py keeps the two
in step).

Refusals are PERMISSION_DENIED and name the principal, the method and the rule; refusals of methods
that change state are also written to the audit log (action ``access.denied``). Without TLS there is no
principal and nothing here runs: the coordinator logs once at start that calls are not authenticated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cachepoint.errors import CachepointError
from cachepoint.logs import refused
from cachepoint.rpc.block_access import VersionBlocks
from cachepoint.rpc.block_exchange import Answerable
from cachepoint.rpc.wrapping import AuthorizingInterceptor
from cachepoint.store.store import Store
from cachepoint.trust import reading
from cachepoint.trust.principal import Principal
from coordinator.assignments import AssignmentView
from coordinator.history.audit import AuditEntry, AuditLog, recorded_actor
from coordinator.history.holds import Holds
from coordinator.pki.guard import Refused, peer_principal

log = logging.getLogger("coordinator.authz")
ACCESS_DENIED = "access.denied"  # audit action; subject: the method
GUARD_AUDIT_EVERY = 600.0  # seconds: repeated certificate refusals of one principal and method
PUBLISHED_ROOTS = ("os/", "app/")


@dataclass(frozen=True)
class Facts:
    """What rules look at besides the principal and the request."""

    assignments: AssignmentView
    holds: Holds


LayerReader = Callable[[grpc.aio.ServicerContext], Callable[[str], bool] | None]
# A check returns why the call is refused, or "" to allow it.
Check = Callable[[Principal, Any, Facts], str]


@dataclass(frozen=True)
class Rule:
    name: str
    text: str  # as README.md prints it
    check: Check
    changes_state: bool = False
    public: bool = False  # REST only: served without a credential (a page that holds no data)


def may_read_layer(principal: Principal, layer: str, facts: Facts) -> bool:
    """cachepoint/trust/reading.py's rule, with the coordinator's assignments."""
    owner = reading.owner_of(layer)

    def users_of(node: str) -> frozenset[str]:  # asked only about the layer's owner
        return frozenset({owner}) if owner and facts.assignments.assigned(node, owner) else frozenset()

    return reading.may_read_layer(principal, layer, users_of)


def _anyone(principal: Principal, request: Any, facts: Facts) -> str:
    return ""


def _role(*kinds: str) -> Check:
    def check(principal: Principal, request: Any, facts: Facts) -> str:
        if any(principal.has(kind) for kind in kinds):
            return ""
        return f"needs role {' or '.join(kinds)}"

    return check


def _commit(principal: Principal, request: Any, facts: Facts) -> str:
    layer: str = request.layer
    if layer.startswith(PUBLISHED_ROOTS):
        return "" if principal.has("publisher") else f"{layer} is an os/ or app/ layer: needs role publisher"
    user = reading.owner_of(layer)
    if user is not None:
        if principal.has("node") and facts.assignments.assigned(principal.name, user):
            return ""
        return f"{layer} is user {user!r}'s: needs a node {user!r} is assigned to"
    return f"{layer}: only os/, app/ and user/NAME/ layers are committed"


def _set_tag(principal: Principal, request: Any, facts: Facts) -> str:
    layer: str = request.ref.layer
    if layer.startswith(PUBLISHED_ROOTS) and principal.has("publisher"):
        return ""
    return f"tags of {layer or 'a layer'}: needs role publisher, on an os/ or app/ layer"


def _read_layer(field: str) -> Check:
    def check(principal: Principal, request: Any, facts: Facts) -> str:
        layer = getattr(request, field)
        layer = layer if isinstance(layer, str) else layer.layer
        return "" if may_read_layer(principal, layer, facts) else f"may not read {layer}"

    return check


def _own_node(field: str) -> Check:
    """A node speaks for itself only: Register and Heartbeat under the id its certificate names."""

    def check(principal: Principal, request: Any, facts: Facts) -> str:
        if not principal.has("node"):
            return "needs role node"
        node_id = request.node.node_id if field == "node" else request.node_id
        if node_id != principal.name:
            return f"node id {node_id!r} is not the certificate's {principal.name!r}"
        return ""

    return check


def _diff(principal: Principal, request: Any, facts: Facts) -> str:
    for ref in (request.old, request.new):
        if not may_read_layer(principal, ref.layer, facts):
            return f"may not read {ref.layer}"
    return ""


def _own_history(principal: Principal, request: Any, facts: Facts) -> str:
    if principal.has("auditor") or any(r.kind == "user" and r.user == request.user for r in principal.roles):
        return ""
    return f"history of user {request.user!r}: needs role auditor or user:{request.user}"


def _release_hold(principal: Principal, request: Any, facts: Facts) -> str:
    if not principal.has("auditor"):
        return "needs role auditor"
    hold = facts.holds.get(request.user) if request.user else None
    if hold is not None and hold.actor == principal.name:
        return f"the hold on {request.user!r} was set by {principal.name!r}: another auditor releases it"
    return ""


ANY = Rule("any", "any principal of the fleet", _anyone)
REGISTER = Rule(
    "own-node", "role node, under the node id its certificate names", _own_node("node"), changes_state=True
)
HEARTBEAT = Rule(
    "own-node", "role node, under the node id its certificate names", _own_node("node_id"), changes_state=True
)
HOLDINGS = Rule(
    "holdings",
    "any principal; shows holdings only of layers it may read (admin, auditor: all, and assignments)",
    _anyone,
)
LISTED = Rule("listed", "any principal; names only layers it may read (Watch: their events)", _anyone)
MANIFEST = Rule(
    "manifest",
    "any principal; answers only for a manifest of a version it may read, else NOT_FOUND",
    _anyone,
)
ADMIN = Rule("admin", "role admin", _role("admin"), changes_state=True)
AUDITOR = Rule("auditor", "role auditor", _role("auditor"))
OVERSIGHT = Rule("oversight", "role auditor or admin", _role("auditor", "admin"))
READ_LAYER = Rule(
    "read-layer",
    "os/, app/: any principal; user/NAME/...: user:NAME, an auditor, a node NAME is assigned to",
    _read_layer("layer"),
)
READ_REF = Rule("read-ref", "as read-layer, for the ref's layer", _read_layer("ref"))
READ_DIFF = Rule("read-diff", "as read-layer, for both refs' layers", _diff)
BLOCKS = Rule("blocks", "any principal; answers only for blocks of versions it may read", _anyone)
PUSH = Rule("push", "role publisher or node", _role("publisher", "node"), changes_state=True)
COMMIT = Rule(
    "commit",
    "os/, app/: role publisher; user/NAME/...: a node NAME is assigned to",
    _commit,
    changes_state=True,
)
TAG = Rule("tag", "role publisher, on an os/ or app/ layer", _set_tag, changes_state=True)
OWN_HISTORY = Rule("own-history", "user:NAME for user NAME, or role auditor", _own_history)
RESTORE = Rule("restore", "user:NAME for user NAME, or role auditor", _own_history, changes_state=True)
HOLD = Rule("hold", "role auditor", _role("auditor"), changes_state=True)
EXPORT = Rule("export", "role auditor", _role("auditor"), changes_state=True)
RELEASE = Rule("release", "role auditor, not the one who set the hold", _release_hold, changes_state=True)
GC = Rule("gc", "role admin", _role("admin"), changes_state=True)
METRICS = Rule("metrics", "role monitor or admin", _role("monitor", "admin"))
PAGE = Rule(
    "page", "anyone, no credential: the dashboard's page and assets hold no fleet data", _anyone, public=True
)
ENROLL = Rule("enroll", "any principal (the join token or the own certificate decides)", _anyone)

RULES: dict[str, Rule] = {
    "/cachepoint.v1.Catalog/Resolve": READ_REF,
    "/cachepoint.v1.Catalog/ListLayers": LISTED,
    "/cachepoint.v1.Catalog/ListVersions": READ_LAYER,
    "/cachepoint.v1.Catalog/GetManifest": MANIFEST,
    "/cachepoint.v1.Catalog/Commit": COMMIT,
    "/cachepoint.v1.Catalog/SetTag": TAG,
    "/cachepoint.v1.Catalog/Watch": LISTED,
    "/cachepoint.v1.BlockExchange/HasBlocks": BLOCKS,
    "/cachepoint.v1.BlockExchange/FetchBlocks": BLOCKS,
    "/cachepoint.v1.BlockExchange/PushBlocks": PUSH,
    "/cachepoint.v1.Fleet/Register": REGISTER,
    "/cachepoint.v1.Fleet/Heartbeat": HEARTBEAT,
    "/cachepoint.v1.Fleet/FindPeers": HOLDINGS,
    "/cachepoint.v1.Fleet/ListNodes": HOLDINGS,
    "/cachepoint.v1.History/Timeline": OWN_HISTORY,
    "/cachepoint.v1.History/FileHistory": OWN_HISTORY,
    "/cachepoint.v1.History/Diff": READ_DIFF,
    "/cachepoint.v1.History/GetFile": RESTORE,
    "/cachepoint.v1.History/SetHold": HOLD,
    "/cachepoint.v1.History/ReleaseHold": RELEASE,
    "/cachepoint.v1.History/ListHolds": OVERSIGHT,
    "/cachepoint.v1.History/CollectGarbage": GC,
    "/cachepoint.v1.History/ListAudit": OVERSIGHT,
    "/cachepoint.v1.History/VerifyAudit": OVERSIGHT,
    "/cachepoint.v1.History/Export": EXPORT,
    "/cachepoint.v1.Enrollment/Enroll": ENROLL,
    "/cachepoint.v1.Enrollment/Renew": ENROLL,
    "/grpc.health.v1.Health/Check": ANY,
    "/grpc.health.v1.Health/Watch": ANY,
    "/grpc.health.v1.Health/List": ANY,
    # grpcurl-style tools list the services and read their schemas (public: the .proto files ship
    # in the wheel); a caller still needs a certificate of the fleet to get this far.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY,
}
# The coordinator's REST API (coordinator/history/rest.py, with --http-tls): route -> the same rules.
# A rule's check sees a RestCall (coordinator/history/rest_access.py) with the fields it reads.
REST_RULES: dict[str, Rule] = {
    "GET /healthz": ANY,
    "GET /metrics": METRICS,
    "GET /": PAGE,
    "GET /dashboard/{asset}": PAGE,
    "GET /v1/dashboard": OVERSIGHT,
    "GET /v1/history/users/{user}/timeline": OWN_HISTORY,
    "GET /v1/history/users/{user}/files/{path}": OWN_HISTORY,
    "GET /v1/history/users/{user}/content/{path}": RESTORE,
    "POST /v1/history/users/{user}/export": EXPORT,
    "GET /v1/history/diff": READ_DIFF,
    "GET /v1/history/holds": OVERSIGHT,
    "PUT /v1/history/holds/{user}": HOLD,
    "DELETE /v1/history/holds/{user}": RELEASE,
    "POST /v1/history/gc": GC,
    "GET /v1/history/audit": OVERSIGHT,
    "GET /v1/history/audit/verify": OVERSIGHT,
}
# Outside the gRPC table: enrolling (`cachepoint-coordinator enroll`), assignments, retention and GC
# settings are changed by an admin at the coordinator's data directory, which only they can write.


def table_rows() -> list[tuple[str, str, str]]:
    """(method, rule, who) for README.md."""
    return [(method.lstrip("/"), rule.name, rule.text) for method, rule in RULES.items()]


def http_table_rows() -> list[tuple[str, str, str, str]]:
    """(server, route, rule, who) for README.md: the coordinator's REST API, then a daemon's HTTP
    server, whose rules (cachepoint/http/access.py) are these rules by name, checked at a node."""
    from cachepoint.http.access import ROUTES

    rows = [("coordinator", route, rule.name, rule.text) for route, rule in REST_RULES.items()]
    return rows + [("daemon", route, rule, who) for route, (rule, who) in ROUTES.items()]


def acting(context: grpc.aio.ServicerContext, claimed: str) -> str:
    """Who to record as acting: the name in the caller's certificate when the call has one, never what
    the request claims; the claim only without TLS (where nothing is authenticated)."""
    if (context.auth_context() or {}).get("x509_pem_cert"):
        return peer_principal(context).name
    return claimed


class Authorizer(AuthorizingInterceptor):
    def __init__(self, store: Store, audit: AuditLog, assignments: AssignmentView) -> None:
        self.audit = audit
        self.facts = Facts(assignments, Holds(store.db, audit))
        self.store = store
        self._guard_audited: dict[tuple[str, str], float] = {}  # (actor, method) -> when, monotonic

    def refusal(self, principal: Principal, method: str, request: Any) -> tuple[Rule | None, str]:
        rule = RULES.get(method)
        if rule is None:
            return None, f"principal {principal.name!r} may not call {method}: no rule allows it"
        try:
            why = rule.check(principal, request, self.facts)
        except CachepointError as err:
            why = f"cannot be checked: {err}"
        if not why:
            return rule, ""
        return (
            rule,
            f"principal {principal.name!r} may not call {method}: rule {rule.name} ({rule.text}): {why}",
        )

    async def authorize(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> None:
        try:
            principal = peer_principal(context)
        except Refused as err:
            message = f"{method} from {context.peer()}: {err}"
            refused(log, logging.WARNING, message, code=err.code.name, method=method, peer=context.peer())
            await context.abort(err.code, str(err))
        rule, message = self.refusal(principal, method, request)
        if not message:
            return
        if rule is None or rule.changes_state:
            await self._audit_refusal(principal.name, method, rule.name if rule else None, message)
        refused(
            log,
            logging.WARNING,
            message,
            code="PERMISSION_DENIED",
            method=method,
            principal=principal.name,
            rule=rule.name if rule else None,
        )
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def _audit_refusal(self, actor: str, method: str, rule: str | None, message: str) -> None:
        entry = AuditEntry(
            recorded_actor(actor), ACCESS_DENIED, method.lstrip("/"), {"rule": rule, "refusal": message}
        )
        await asyncio.to_thread(self.audit.append, [entry], self.store.db.batch())

    async def guard_refused(
        self, context: grpc.aio.ServicerContext, method: str, principal: Principal | None, message: str
    ) -> None:
        """The Guard's refusals (a revoked principal, a certificate expired on an open connection) of
        calls that would change state are audited too, under rule ``certificate``."""
        rule = RULES.get(method)
        if rule is not None and not rule.changes_state:
            return
        actor = principal.name if principal else "unauthenticated"
        # A revoked daemon left running retries its heartbeat every few seconds: one record per
        # principal and method per GUARD_AUDIT_EVERY, not one per attempt.
        now = time.monotonic()
        key = (actor, method)
        if now - self._guard_audited.get(key, -GUARD_AUDIT_EVERY) < GUARD_AUDIT_EVERY:
            return
        if len(self._guard_audited) > 10_000:
            self._guard_audited.clear()
        self._guard_audited[key] = now
        await self._audit_refusal(actor, method, "certificate", message)


def caller(context: grpc.aio.ServicerContext) -> Principal | None:
    """The call's principal (the Guard has checked it), None without TLS."""
    if not (context.auth_context() or {}).get("x509_pem_cert"):
        return None
    return peer_principal(context)


def layer_reader(facts: Facts) -> LayerReader:
    """For listings (Watch, ListLayers): which layers the call's principal may see; None without TLS
    (every layer). A node watching everything sees only the events of layers it may read."""

    def reader(context: grpc.aio.ServicerContext) -> Callable[[str], bool] | None:
        principal = caller(context)
        if principal is None:
            return None
        return lambda layer: may_read_layer(principal, layer, facts)

    return reader


def block_answers(blocks: VersionBlocks, facts: Facts) -> Answerable:
    """BlockExchange's filter at the coordinator: with a client certificate, only blocks of the named
    version, when its principal may read it; without TLS, every block."""

    def answerable(context: grpc.aio.ServicerContext, version: str) -> frozenset[bytes] | None:
        if not (context.auth_context() or {}).get("x509_pem_cert"):
            return None
        principal = peer_principal(context)
        return blocks.readable(version, lambda layer: may_read_layer(principal, layer, facts))

    return answerable
