"""Commands of `cachepoint-coordinator` that read or change the fleet from outside the server: the
node listing, user assignments, and repair of damaged data (imported when one of them runs:
cachepoint/cli/lazy.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import grpc

from cachepoint.console import emit_json, handles_errors, json_option, when
from cachepoint.rpc import channel, replicas
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.store.store import Store
from cachepoint.v1 import fleet_pb2, fleet_pb2_grpc
from coordinator.history.cli import coordinator_option
from coordinator.pki.cli import admin_data_option, admin_writes, catalog_option


async def _list_nodes(address: str) -> fleet_pb2.ListNodesResponse:
    address = await replicas.reachable(address)
    async with channel.channel(address) as ch:
        try:
            return await fleet_pb2_grpc.FleetStub(ch).ListNodes(
                fleet_pb2.ListNodesRequest(), timeout=UNARY_DEADLINE
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, address) from err


@click.command("fleet")
@coordinator_option
@json_option
@handles_errors
def fleet_cmd(address: str, as_json: bool) -> None:
    """The nodes of the fleet: site, address, last seen, versions held."""
    nodes = nodes_json(asyncio.run(_list_nodes(address)))
    if as_json:
        emit_json({"nodes": nodes})
        return
    if not nodes:
        click.echo("no nodes registered")
    for n in nodes:
        state = "ok" if n["healthy"] else "STALE"
        click.echo(
            f"{n['node_id']:<20} {n['site']:<10} {n['address']:<22} {n['last_seen']} {state:<5} "
            f"{' '.join(n['versions'])}" + (f"  users: {' '.join(n['users'])}" if n["users"] else "")
        )


def nodes_json(response: fleet_pb2.ListNodesResponse) -> list[dict[str, Any]]:
    """The nodes as `fleet --json` prints them."""
    return [
        {
            "node_id": n.node.node_id,
            "site": n.node.site,
            "address": n.node.address,
            "last_seen": when(n.last_seen_ns),
            "healthy": n.healthy,
            "load": n.load,
            "versions": [f"{r.layer}@{r.number}" for r in n.complete],
            "users": sorted(n.users),
        }
        for n in response.nodes
    ]


def _assignment_options(command: Callable[..., None]) -> Callable[..., None]:
    """USER NODE, where the fleet's trust is kept (--data or --catalog), --json."""
    for option in reversed(
        (click.argument("user"), click.argument("node"), admin_data_option, catalog_option, json_option)
    ):
        command = option(command)
    return handles_errors(command)


@click.command("assign")
@_assignment_options
def assign_cmd(user: str, node: str, data: Path | None, catalog: str | None, as_json: bool) -> None:
    """Assign USER to NODE: with mutual TLS, NODE may then read and commit user/USER/... layers.
    Takes effect at once, also at a running coordinator (DATA/assignments.json; with a shared
    catalog, at every replica within a second)."""
    _change_assignment("assigned", user, node, data, catalog, as_json)


@click.command("unassign")
@_assignment_options
def unassign_cmd(user: str, node: str, data: Path | None, catalog: str | None, as_json: bool) -> None:
    """Take USER from NODE: NODE may no longer read or commit user/USER/... layers."""
    _change_assignment("unassigned", user, node, data, catalog, as_json)


def _change_assignment(
    what: str, user: str, node: str, data: Path | None, catalog: str | None, as_json: bool
) -> None:
    """Write the change (audited where it is written: coordinator/pki/state.py) and say what it did."""
    writes = admin_writes(data, catalog)
    try:
        changed = writes.assign(user, node) if what == "assigned" else writes.unassign(user, node)
    finally:
        writes.close()
    if as_json:
        emit_json({"user": user, "node": node, what: True, "changed": changed})
    else:
        click.echo(
            f"{user} {what} {'to' if what == 'assigned' else 'from'} {node}"
            + ("" if changed else " (already)")
        )


@click.command("repair")
@click.option(
    "--data", "data", type=click.Path(path_type=Path), required=True, help="The coordinator's data directory."
)
@json_option
@handles_errors
def repair_cmd(data: Path, as_json: bool) -> None:
    """Salvage damaged coordinator data (run it with the coordinator stopped): the database rebuilt
    from its readable files, the catalog, holds and audit log from the catalog journal; then the audit
    chain is verified. Lists what was recovered and what was lost (exit 8 when anything was lost)."""
    from cachepoint.cli.repair_command import print_report
    from cachepoint.errors import EXIT_CORRUPT
    from cachepoint.store.repair import repair
    from coordinator.history.audit import AuditLog

    report = repair(data)
    with Store.open(data) as store:
        verdict = AuditLog(store.db).verify()
    if as_json:
        emit_json({**report.as_json(), "audit": verdict.as_json()})
    else:
        print_report(report)
        state = "verifies" if verdict.ok else f"is broken at record {verdict.first_broken}: {verdict.problem}"
        click.echo(f"  audit log: {verdict.records} records, the chain {state}")
    if not report.ok or not verdict.ok:
        raise SystemExit(EXIT_CORRUPT)


COMMANDS: tuple[click.Command, ...] = (fleet_cmd, assign_cmd, unassign_cmd, repair_cmd)
