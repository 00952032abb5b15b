"""Who may call what on a node's peer port (with mutual TLS): PEER_RULES, method -> rule, checked for
every call after the Guard (cachepoint/trust/guard.py) has authenticated the caller and checked the
revocations the coordinator handed out. The layer rule is the coordinator's (cachepoint/trust/
reading.py), with the assignments from the node's fleet view. A method missing from the table is
refused. README.md prints the table beside the coordinator's (tests/test_authz_table.py).

Refusals are PERMISSION_DENIED naming the principal, the method and the rule. A node keeps no audit
log: nothing a peer may call here changes state (pushes and commits go to the coordinator), so a
refusal is a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cachepoint.logs import refused
from cachepoint.rpc.catalog_read import LayerReader
from cachepoint.rpc.wrapping import AuthorizingInterceptor
from cachepoint.trust import reading
from cachepoint.trust.guard import Refused, peer_principal
from cachepoint.trust.principal import Principal

log = logging.getLogger("cachepoint.trust")
# A check returns why the call is refused, or "" to allow it.
Check = Callable[[Principal, Any, reading.UsersOf], str]


@dataclass(frozen=True)
class PeerRule:
    name: str
    text: str  # as README.md prints it
    check: Check


def _anyone(principal: Principal, request: Any, users_of: reading.UsersOf) -> str:
    return ""


def _nobody(why: str) -> Check:
    def check(principal: Principal, request: Any, users_of: reading.UsersOf) -> str:
        return why

    return check


def _layer_of(request: Any) -> str:
    return str(request.ref.layer if hasattr(request, "ref") else request.layer)


def _read(principal: Principal, request: Any, users_of: reading.UsersOf) -> str:
    layer = _layer_of(request)
    return "" if reading.may_read_layer(principal, layer, users_of) else f"may not read {layer}"


ANY = PeerRule("any", "any principal of the fleet", _anyone)
READ = PeerRule(
    "read-layer",
    "os/, app/: any principal; user/NAME/...: user:NAME, an auditor, a node NAME is assigned to",
    _read,
)
LISTED = PeerRule("listed", "any principal; names only layers it may read", _anyone)
MANIFEST = PeerRule(
    "manifest", "any principal; answers only for a manifest of a version it may read, else NOT_FOUND", _anyone
)
BLOCKS = PeerRule("blocks", "any principal; answers only for blocks of versions it may read", _anyone)
COORDINATOR_ONLY = PeerRule(
    "coordinator-only",
    "no one (pushes, commits, tags and Watch go to the coordinator)",
    _nobody("not served by a node"),
)

PEER_RULES: dict[str, PeerRule] = {
    "/cachepoint.v1.BlockExchange/HasBlocks": BLOCKS,
    "/cachepoint.v1.BlockExchange/FetchBlocks": BLOCKS,
    "/cachepoint.v1.BlockExchange/PushBlocks": COORDINATOR_ONLY,
    "/cachepoint.v1.Catalog/Resolve": READ,
    "/cachepoint.v1.Catalog/ListLayers": LISTED,
    "/cachepoint.v1.Catalog/ListVersions": READ,
    "/cachepoint.v1.Catalog/GetManifest": MANIFEST,
    "/cachepoint.v1.Catalog/Commit": COORDINATOR_ONLY,
    "/cachepoint.v1.Catalog/SetTag": COORDINATOR_ONLY,
    "/cachepoint.v1.Catalog/Watch": COORDINATOR_ONLY,
    "/grpc.health.v1.Health/Check": ANY,
    "/grpc.health.v1.Health/Watch": ANY,
    "/grpc.health.v1.Health/List": ANY,
    # grpcurl-style tools list the services and read their schemas (public: the .proto files ship
    # in the wheel); a caller still needs a certificate of the fleet to get this far.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY,
}


def peer_table_rows() -> list[tuple[str, str, str]]:
    """(method, rule, who) for README.md."""
    return [(method.lstrip("/"), rule.name, rule.text) for method, rule in PEER_RULES.items()]


def with_tls(context: grpc.aio.ServicerContext) -> bool:
    return bool((context.auth_context() or {}).get("x509_pem_cert"))


def peer_reader(users_of: reading.UsersOf) -> LayerReader:
    """Which layers a call to the peer port may read; None without TLS (all of them)."""

    def reader(context: grpc.aio.ServicerContext) -> Callable[[str], bool] | None:
        if not with_tls(context):
            return None
        principal = peer_principal(context)
        return lambda layer: reading.may_read_layer(principal, layer, users_of)

    return reader


class PeerAuthorizer(AuthorizingInterceptor):
    def __init__(self, users_of: reading.UsersOf) -> None:
        self.users_of = users_of

    def refusal(self, principal: Principal, method: str, request: Any) -> str:
        rule = PEER_RULES.get(method)
        if rule is None:
            return f"principal {principal.name!r} may not call {method} at a node: no rule allows it"
        try:
            why = rule.check(principal, request, self.users_of)
        except ValueError as err:
            why = f"cannot be checked: {err}"
        if not why:
            return ""
        return (
            f"principal {principal.name!r} may not call {method} at a node: "
            f"rule {rule.name} ({rule.text}): {why}"
        )

    async def authorize(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> None:
        if not with_tls(context):
            return  # a plaintext peer port: no principal (as before the fleet had a CA)
        try:
            principal = peer_principal(context)
        except Refused as err:
            message = f"{method} from {context.peer()}: {err}"
            refused(log, logging.WARNING, message, code=err.code.name, method=method, peer=context.peer())
            await context.abort(err.code, str(err))
        message = self.refusal(principal, method, request)
        if message:
            who = principal.name
            refused(log, logging.WARNING, message, code="PERMISSION_DENIED", method=method, principal=who)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
