"""The authorization table README.md prints is the one the coordinator checks, and it covers every
method the coordinator serves."""

from __future__ import annotations

import re
from pathlib import Path

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from cachepoint.trust.peer_authz import PEER_RULES, peer_table_rows
from cachepoint.v1 import blocks_pb2, catalog_pb2, enrollment_pb2, fleet_pb2, history_pb2
from coordinator.authz import REST_RULES, RULES, http_table_rows, table_rows

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+) \| (.+) \|$")


def readme_rows(table: str = "authz table") -> list[tuple[str, str, str]]:
    text = README.read_text()
    start = text.index(f"<!-- {table}:")
    end = text.index(f"<!-- end {table} -->", start)
    rows = []
    for line in text[start:end].splitlines():
        if match := ROW.match(line):
            method, rule, who = match.groups()
            rows.append((method, rule.strip(), who.strip()))
    return rows


def test_the_readme_prints_exactly_the_table_the_coordinator_checks() -> None:
    assert readme_rows() == table_rows()


def test_every_method_the_coordinator_serves_has_a_rule() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (blocks_pb2, catalog_pb2, enrollment_pb2, fleet_pb2, history_pb2)
        + (health_pb2, reflection_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served - set(RULES) == set()


HTTP_ROW = re.compile(r"^\| (coordinator|daemon) \| `([^`]+)` \| ([^|]+) \| (.+) \|$")


def readme_http_rows() -> list[tuple[str, str, str, str]]:
    text = README.read_text()
    start = text.index("<!-- http authz table:")
    end = text.index("<!-- end http authz table -->", start)
    rows = []
    for line in text[start:end].splitlines():
        if match := HTTP_ROW.match(line):
            server, route, rule, who = match.groups()
            rows.append((server, route, rule.strip(), who.strip()))
    return rows


def _routes(app: object) -> set[str]:
    """ "METHOD PATTERN" of every route of an aiohttp app (HEAD is answered as GET)."""
    return {
        f"{route.method} {route.resource.canonical}"  # type: ignore[attr-defined]
        for route in app.router.routes()  # type: ignore[attr-defined]
        if route.method != "HEAD"
    }


def test_the_readme_prints_exactly_the_http_table_the_servers_check() -> None:
    assert readme_http_rows() == http_table_rows()


def test_every_http_route_of_both_servers_has_a_rule_named_like_one_of_the_coordinators(
    tmp_path: Path,
) -> None:
    from cachepoint.http.access import ROUTES, route_rules
    from cachepoint.http.app import make_app
    from cachepoint.store.store import Store
    from coordinator.history.rest import make_app as make_rest_app

    rest = make_rest_app(None)  # type: ignore[arg-type]
    assert _routes(rest) == set(REST_RULES)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        assert _routes(make_app(store)) == set(ROUTES) == set(route_rules(store, "n1"))
    names = {rule.name for rule in RULES.values()} | {rule.name for rule in REST_RULES.values()}
    assert {rule for rule, _ in ROUTES.values()} <= names


def test_the_readme_prints_exactly_the_table_a_nodes_peer_port_checks() -> None:
    assert readme_rows("peer authz table") == peer_table_rows()


def test_every_method_a_nodes_peer_port_serves_has_a_rule() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (blocks_pb2, catalog_pb2, health_pb2, reflection_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served - set(PEER_RULES) == set()
