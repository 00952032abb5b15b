"""The `cachepoint-coordinator` command."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import click

from cachepoint import __version__, logs
from cachepoint.cli.lazy import LazyGroup
from cachepoint.config import parse_duration, parse_switch
from cachepoint.console import handles_errors, json_option, log_format_option
from cachepoint.errors import InvalidInput
from cachepoint.trust.location import ENV_IDENTITY

CHECK_CONFIG = "check-config"
# The commands defined elsewhere, each imported when it runs (cachepoint/cli/lazy.py);
# tests/test_cli_commands.py checks the table.
COMMANDS = {
    "fleet": "coordinator.admin_commands:fleet_cmd",
    "assign": "coordinator.admin_commands:assign_cmd",
    "unassign": "coordinator.admin_commands:unassign_cmd",
    "repair": "coordinator.admin_commands:repair_cmd",
    "history": "coordinator.history.cli:history_group",
    "enroll": "coordinator.pki.cli:enroll_cmd",
    "revoke": "coordinator.pki.cli:revoke_cmd",
    "rotate-ca": "coordinator.pki.cli:rotate_ca_cmd",
    "token": "coordinator.pki.bearer:token_cmd",
    "migrate": "coordinator.backends.cli:migrate_cmd",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
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
    from cachepoint.trust.identity import activate  # cryptography: loaded when a command runs
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
    node_expiry = parse_duration(settings.node_expiry)
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
            node_expiry=node_expiry,
            trust_settings=trust,
            http_tls=http_tls,
            backend=chosen,
        )
    )


def main() -> None:
    cli(prog_name="cachepoint-coordinator")
