"""`cachepoint enroll`: join the fleet's PKI with a one-time token (cachepoint/trust/enroll.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from cachepoint.cli.context import Context, pass_ctx
from cachepoint.console import emit_json, handles_errors, json_option


@click.command("enroll")
@click.option(
    "--coordinator", default=None, metavar="HOST:PORT", help="The coordinator [config coordinator]."
)
@click.option("--token", required=True, help="The join token `cachepoint-coordinator enroll` printed.")
@click.option(
    "--identity",
    "directory",
    metavar="DIR",
    help="Keep key and certificates here [env CACHEPOINT_IDENTITY; else STORE/identity].",
)
@json_option
@pass_ctx
@handles_errors
def enroll_cmd(
    ctx: Context, coordinator: str | None, token: str, directory: str | None, as_json: bool
) -> None:
    """Make a key here (it never leaves this machine) and get it certified by the coordinator with a
    one-time TOKEN: a node keeps it in STORE/identity, a person or a tool in --identity DIR."""
    from cachepoint.trust.enroll import enroll
    from cachepoint.trust.token import JoinToken

    parsed = JoinToken.parse(token)
    address = ctx.coordinator(coordinator, "enroll with")
    from cachepoint.trust.location import STORE_IDENTITY, identity_dir

    configured = Path(ctx.settings.identity) if ctx.settings.identity else None
    target = identity_dir(directory, None) or configured or ctx.store_path / STORE_IDENTITY
    identity = asyncio.run(enroll(address, parsed, Path(target)))
    data = {**identity.principal.as_json(), "identity": str(identity.directory), "coordinator": address}
    if as_json:
        emit_json(data)
        return
    roles = ", ".join(data["roles"])  # type: ignore[arg-type]
    click.echo(f"enrolled as {data['name']} ({roles}) until {data['not_after']}: identity in {target}")


COMMANDS: tuple[click.Command, ...] = (enroll_cmd,)
