"""Who may call which route of the daemon's HTTP server with TLS: the table, ROUTE_RULES, route ->
rule, each rule one of coordinator/authz.py's by name (tests/test_authz_table.py checks it; README.md
prints this table beside the coordinator's).

Where the coordinator lets "a node NAME is assigned to" read user/NAME/... layers, a daemon asks the
assignment list its heartbeats bring (``users_of``: cachepoint/trust/fleet_view.py, the view the peer
port applies too). A node that has no view yet (no heartbeat reply, none kept in STORE/fleet-view.json)
assigns no user to any node: besides the user and auditors only this node itself reads (a tool on
this machine with the store's identity, which could read the store directly anyway).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from cachepoint.errors import CachepointError
from cachepoint.http.auth import Check, RouteRule
from cachepoint.ids import Ref
from cachepoint.store.store import Store
from cachepoint.trust.principal import Principal

USER_ROOT = "user/"


UsersOf = Callable[[str], frozenset[str]]  # node id -> the users assigned to it


def may_read_here(principal: Principal, layer: str, node: str, users_of: UsersOf | None = None) -> bool:
    """os/ and app/ layers: every principal of the fleet; user/NAME/...: user:NAME, an auditor, this
    node itself, and a node NAME is assigned to (when ``users_of`` knows)."""
    parts = layer.split("/")
    if parts[0] + "/" != USER_ROOT or len(parts) < 2:
        return True
    user = parts[1]
    if principal.has("auditor") or any(r.kind == "user" and r.user == user for r in principal.roles):
        return True
    if not principal.has("node"):
        return False
    return principal.name == node or (users_of is not None and user in users_of(principal.name))


async def _anyone(principal: Principal, request: web.Request) -> str:
    return ""


async def _monitor(principal: Principal, request: web.Request) -> str:
    return "" if principal.has("monitor") or principal.has("admin") else "needs role monitor or admin"


def _read_ref(node: str, users_of: UsersOf | None) -> Check:
    async def check(principal: Principal, request: web.Request) -> str:
        try:
            layer = Ref.parse(request.match_info["ref"]).layer
        except CachepointError:
            return ""  # the handler answers 400 for a malformed ref, to anyone
        return "" if may_read_here(principal, layer, node, users_of) else f"may not read {layer}"

    return check


def _read_image(store: Store, node: str, users_of: UsersOf | None) -> Check:
    async def check(principal: Principal, request: web.Request) -> str:
        name = request.match_info["name"]
        try:
            spec = await asyncio.to_thread(store.catalog.image, name)
        except CachepointError:
            return ""  # no such image (or a malformed name): the handler's 404 or 400
        for text in spec.refs:
            layer = Ref.parse(text).layer
            if not may_read_here(principal, layer, node, users_of):
                return f"image {name!r} stacks {layer}, which it may not read"
        return ""

    return check


READ_HERE = (
    "os/, app/: any principal; user/NAME/...: user:NAME, an auditor, this node, a node NAME is assigned to "
    "(as of this node's last heartbeat)"
)
ANY = ("any", "any principal of the fleet")
# route -> (rule, who may call it); "read-layer" here is for every layer the image stacks.
ROUTES: dict[str, tuple[str, str]] = {
    "GET /healthz": ANY,
    "GET /readyz": ANY,
    "GET /metrics": ("metrics", "role monitor or admin"),
    "GET /v1/versions/{ref}/file": ("read-ref", READ_HERE),
    "GET /v1/versions/{ref}/files/{path}": ("read-ref", READ_HERE),
    "GET /v1/images/{name}/disk": ("read-layer", READ_HERE + ", for every layer of the image"),
    # A ref sent with a raw '/': a 400 saying how to encode it.
    "GET /v1/versions/{rest}": ANY,
    "GET /v1/images/{rest}": ANY,
}


def route_rules(store: Store, node: str, users_of: UsersOf | None = None) -> dict[str, RouteRule]:
    """The table's rules for the daemon named ``node`` on ``store``."""
    checks = {
        "any": _anyone,
        "metrics": _monitor,
        "read-ref": _read_ref(node, users_of),
        "read-layer": _read_image(store, node, users_of),
    }
    return {route: RouteRule(rule, who, checks[rule]) for route, (rule, who) in ROUTES.items()}
