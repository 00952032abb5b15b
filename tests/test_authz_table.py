"""The authorization table README.md prints is the one the coordinator checks, and it covers every
method the coordinator serves."""

from __future__ import annotations

import re
from pathlib import Path

from grpc_health.v1 import health_pb2

from cachepoint.trust.peer_authz import PEER_RULES, peer_table_rows
from cachepoint.v1 import blocks_pb2, catalog_pb2, enrollment_pb2, fleet_pb2, history_pb2
from coordinator.authz import RULES, table_rows

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
        for module in (blocks_pb2, catalog_pb2, enrollment_pb2, fleet_pb2, history_pb2, health_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served - set(RULES) == set()


def test_the_readme_prints_exactly_the_table_a_nodes_peer_port_checks() -> None:
    assert readme_rows("peer authz table") == peer_table_rows()


def test_every_method_a_nodes_peer_port_serves_has_a_rule() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (blocks_pb2, catalog_pb2, health_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served - set(PEER_RULES) == set()
