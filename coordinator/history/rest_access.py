"""The REST API's routes checked by coordinator/authz.py's rules (REST_RULES): each rule sees a RestCall
with the fields its gRPC request has (``user``; ``old``/``new`` for a diff), and refusals of routes
that change state go into the audit log as ``access.denied`` under the authenticated principal, as the
gRPC ones do."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from cachepoint.errors import CachepointError, InvalidInput
from cachepoint.http.auth import Refused, RouteRule
from cachepoint.ids import Ref
from cachepoint.store.store import Store
from cachepoint.trust.principal import Principal
from coordinator.authz import ACCESS_DENIED, REST_RULES, Facts, Rule
from coordinator.history.audit import AuditEntry, AuditLog, recorded_actor


@dataclass(frozen=True)
class RestCall:
    user: str = ""
    old: Ref | None = None
    new: Ref | None = None

    @classmethod
    def of(cls, request: web.Request) -> RestCall:
        """What the rules read of a request; InvalidInput when it is malformed (the handler then
        answers 400, to anyone: nothing is read)."""
        old, new = request.query.get("old"), request.query.get("new")
        if request.path == "/v1/history/diff" and (not old or not new):
            raise InvalidInput("diff needs two refs")
        return cls(
            request.match_info.get("user", ""),
            Ref.parse(old) if old else None,
            Ref.parse(new) if new else None,
        )


def _route_rule(rule: Rule, facts: Facts) -> RouteRule:
    async def check(principal: Principal, request: web.Request) -> str:
        try:
            call = RestCall.of(request)
        except CachepointError:
            return ""
        try:
            return rule.check(principal, call, facts)
        except CachepointError as err:
            return f"cannot be checked: {err}"

    return RouteRule(rule.name, rule.text, check, rule.changes_state, rule.public)


def rest_rules(facts: Facts) -> dict[str, RouteRule]:
    return {route: _route_rule(rule, facts) for route, rule in REST_RULES.items()}


def audited_refusals(audit: AuditLog, store: Store) -> Refused:
    async def refused(
        principal: Principal, route: str, rule: RouteRule, message: str, request: web.Request
    ) -> None:
        details = {"rule": rule.name, "refusal": message, "path": request.path}
        entry = AuditEntry(recorded_actor(principal.name), ACCESS_DENIED, route, details)
        await asyncio.to_thread(audit.append, [entry], store.db.batch())

    return refused
