"""The `cachepoint-coordinator` command."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import click
import grpc

from cachepoint import __version__, logs
from cachepoint.cli.anywhere import OptionsAnywhereGroup
from cachepoint.config import parse_duration, parse_switch
from cachepoint.console import emit_json, handles_errors, json_option, log_format_option, when
from cachepoint.errors import InvalidInput
from cachepoint.rpc import channel, replicas
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.store.store import Store
from cachepoint.trust.identity import activate
from cachepoint.trust.location import ENV_IDENTITY
from cachepoint.v1 import fleet_pb2, fleet_pb2_grpc
from coordinator.backends.cli import migrate_cmd
from coordinator.history.cli import coordinator_option, history_group
from coordinator.pki.bearer import token_cmd
from coordinator.pki.cli import COMMANDS as pki_commands
from coordinator.pki.cli import admin_data_option, admin_writes, catalog_option

CHECK_CONFIG = "check-config"


@click.group(cls=OptionsAnywhereGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--identity",
    "identity",
    metavar="DIR",
    help="Key and certificates to call the coordinator with (fleet, history) [env CACHEPOINT_IDENTITY; "
    "config identity].",
)
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    help="TOML config: serve's settings; coordinator and identity for fleet and history.",
)
@click.version_option(__version__, prog_name="cachepoint-coordinator")
@click.pass_context
@handles_errors
def cli(click_ctx: click.Context, identity: str | None, config: Path | None) -> None:
    """The coordinator: catalog of layers and versions, fleet membership, origin of every block.
    --identity and --config may also follow the command."""
    from coordinator.config import CoordinatorSettings, load

    if click_ctx.invoked_subcommand == CHECK_CONFIG:
        return  # it reads the config itself, and reports every problem rather than the first
    settings = load(config) if click_ctx.invoked_subcommand != "serve" else CoordinatorSettings()
    click_ctx.obj = settings
    activate(identity or os.environ.get(ENV_IDENTITY) or settings.identity or None, None)


@cli.command(CHECK_CONFIG)
@click.argument("file", required=False, type=click.Path(path_type=Path))
@json_option
@click.pass_context
@handles_errors
def check_config_cmd(click_ctx: click.Context, file: Path | None, as_json: bool) -> None:
    """Check FILE (default: --config): unknown keys and values that do not parse are named, each with
    why (exit 4)."""
    from cachepoint.config_check import check_file, report
    from coordinator.config import coordinator_checks

    file = file or click_ctx.find_root().params.get("config")
    if file is None:
        raise InvalidInput("name the config to check: check-config FILE (or --config FILE)")
    report(file, check_file(file, coordinator_checks()), as_json)


@cli.command("serve")
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    help="TOML config (keys: data, listen, http, http_tls, [retention.KIND] tables).",
)
@click.option("--data", "data", type=click.Path(path_type=Path), help="Data directory (an embedded store).")
@click.option(
    "--catalog",
    default=None,
    metavar="URL",
    help="postgresql://… : the catalog in PostgreSQL, for several replicas (with --blocks) [embedded].",
)
@click.option("--blocks", default=None, metavar="URL", help="file:///DIR : blocks every replica mounts.")
@click.option("--listen", default=None, help="HOST:PORT for gRPC (port 0: any) [127.0.0.1:7400].")
@click.option(
    "--http",
    default=None,
    metavar="[HOST:]PORT",
    help="Also serve history, holds and audit as REST/JSON here (a bare PORT: on 127.0.0.1) [none].",
)
@click.option("--tls", is_flag=True, help="Serve mutual TLS, making the fleet's CA in DATA/ca/ if none.")
@click.option(
    "--http-tls",
    "http_tls",
    is_flag=True,
    help="Serve --http with TLS too; clients need a certificate or token of the fleet (implies --tls).",
)
@click.option(
    "--ca-cert", type=click.Path(path_type=Path), help="Import this CA certificate (PEM) into DATA/ca/."
)
@click.option("--ca-key", type=click.Path(path_type=Path), help="The key of --ca-cert (unencrypted PEM).")
@click.option(
    "--tls-name", "tls_names", multiple=True, help="Another name or address in the server certificate."
)
@click.option(
    "--enroll-listen", default=None, help="HOST:PORT of the enrollment port [the port after --listen]."
)
@click.option("-v", "--verbose", is_flag=True, help="Log every commit.")
@log_format_option
@handles_errors
def serve_cmd(
    config: Path | None,
    data: Path | None,
    catalog: str | None,
    blocks: str | None,
    listen: str | None,
    http: str | None,
    tls: bool,
    http_tls: bool,
    ca_cert: Path | None,
    ca_key: Path | None,
    tls_names: tuple[str, ...],
    enroll_listen: str | None,
    verbose: bool,
    log_format: str | None,
) -> None:
    """Serve Catalog, BlockExchange, Fleet, History and health over gRPC until SIGINT or SIGTERM.
    With a CA (--tls, --ca-cert/--ca-key, or DATA/ca/ from an earlier start): mutual TLS, and an
    enrollment port for `cachepoint enroll`."""
    from coordinator.config import backend, load, trust_settings
    from coordinator.daemon import serve

    settings = load(config or click.get_current_context().find_root().params.get("config"))
    data = data or (Path(settings.data) if settings.data else None)
    if data is None:
        raise InvalidInput("say where the coordinator keeps its data: --data DIR or `data` in the config")
    rest = http if http is not None else settings.http
    if rest.isdigit():
        rest = f"127.0.0.1:{rest}"  # loopback unless a host is named (which plaintext refuses)
    level = logging.INFO if verbose else logging.WARNING
    logs.configure(level, log_format or settings.log_format)
    gc_every = parse_duration(settings.gc_every)
    rules = settings.retention_rules
    http_tls = http_tls or parse_switch(settings.http_tls, "http_tls")
    trust = trust_settings(settings, data, tls or http_tls, ca_cert, ca_key, list(tls_names), enroll_listen)
    chosen = backend(settings, data, catalog, blocks)
    asyncio.run(
        serve(
            data,
            listen or settings.listen,
            http=rest,
            retention=rules,
            gc_every=gc_every,
            trust_settings=trust,
            http_tls=http_tls,
            backend=chosen,
        )
    )


async def _list_nodes(address: str) -> fleet_pb2.ListNodesResponse:
    address = await replicas.reachable(address)
    async with channel.channel(address) as ch:
        try:
            return await fleet_pb2_grpc.FleetStub(ch).ListNodes(
                fleet_pb2.ListNodesRequest(), timeout=UNARY_DEADLINE
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, address) from err


@cli.command("fleet")
@coordinator_option
@json_option
@handles_errors
def fleet_cmd(address: str, as_json: bool) -> None:
    """The nodes of the fleet: site, address, last seen, versions held."""
    response = asyncio.run(_list_nodes(address))
    nodes = [
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


@cli.command("assign")
@click.argument("user")
@click.argument("node")
@admin_data_option
@catalog_option
@json_option
@handles_errors
def assign_cmd(user: str, node: str, data: Path | None, catalog: str | None, as_json: bool) -> None:
    """Assign USER to NODE: with mutual TLS, NODE may then read and commit user/USER/... layers.
    Takes effect at once, also at a running coordinator (DATA/assignments.json; with a shared
    catalog, at every replica within a second)."""
    writes = admin_writes(data, catalog)
    try:
        changed = writes.assign(user, node)
    finally:
        writes.close()
    _assignment_changed(changed, user, node, "assigned", as_json)


@cli.command("unassign")
@click.argument("user")
@click.argument("node")
@admin_data_option
@catalog_option
@json_option
@handles_errors
def unassign_cmd(user: str, node: str, data: Path | None, catalog: str | None, as_json: bool) -> None:
    """Take USER from NODE: NODE may no longer read or commit user/USER/... layers."""
    writes = admin_writes(data, catalog)
    try:
        changed = writes.unassign(user, node)
    finally:
        writes.close()
    _assignment_changed(changed, user, node, "unassigned", as_json)


def _assignment_changed(changed: bool, user: str, node: str, what: str, as_json: bool) -> None:
    """What the command prints (the change was audited where it was written: coordinator/pki/state.py)."""
    if as_json:
        emit_json({"user": user, "node": node, what: True, "changed": changed})
    else:
        click.echo(
            f"{user} {what} {'to' if what == 'assigned' else 'from'} {node}"
            + ("" if changed else " (already)")
        )


@cli.command("repair")
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


cli.add_command(history_group)
for _command in pki_commands:
    cli.add_command(_command)
cli.add_command(token_cmd)
cli.add_command(migrate_cmd)


def main() -> None:
    cli(prog_name="cachepoint-coordinator")
