"""`cachepoint-coordinator token`: a bearer token for the HTTP servers, signed with the fleet's CA key at
the data directory (so it runs beside a running coordinator, like `enroll`). Nothing is stored: a
token is checked by its signature alone, at the coordinator or at a node offline; `revoke NAME` refuses
it with every other credential of NAME issued before the revocation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from cachepoint.config import parse_duration
from cachepoint.console import emit_json, handles_errors, json_option
from cachepoint.errors import InvalidInput, NotFound
from cachepoint.trust.bearer import BearerToken
from cachepoint.trust.principal import Principal, Role, check_name
from coordinator.pki.ca import CertificateAuthority

DEFAULT_TTL = "8h"
MAX_TTL = timedelta(days=30)  # a node cannot learn of a revocation yet: a token's life bounds its use


def issue(data: Path, name: str, role: str, ttl: str, now: float | None = None) -> tuple[str, Principal]:
    try:
        principal = Principal(check_name(name, "name"), (Role.parse(role),))
    except ValueError as err:
        raise InvalidInput(str(err)) from err
    seconds = parse_duration(ttl)
    if not 1 <= seconds <= MAX_TTL.total_seconds():
        raise InvalidInput(f"--ttl {ttl!r}: from 1s to {MAX_TTL.days}d (default {DEFAULT_TTL})")
    if not CertificateAuthority.exists(data):
        raise NotFound(
            f"{data} has no CA yet: start the coordinator once with --tls "
            "(or import one with --ca-cert, --ca-key)"
        )
    ca = CertificateAuthority.load(data)
    return BearerToken.issue(ca.key, principal, timedelta(seconds=seconds), now or time.time()), principal


@click.command("token")
@click.argument("name")
@click.option(
    "--data", "data", type=click.Path(path_type=Path), required=True, help="The coordinator's data directory."
)
@click.option("--role", required=True, help="node, publisher, auditor, admin, monitor or user:NAME.")
@click.option(
    "--ttl", default=DEFAULT_TTL, show_default=True, help="How long the token is valid (at most 30d)."
)
@json_option
@handles_errors
def token_cmd(name: str, data: Path, role: str, ttl: str, as_json: bool) -> None:
    """Print a bearer token naming NAME with ROLE, for the HTTP servers of the fleet (the coordinator's
    REST API, a daemon's `--http-tls`): send it as `Authorization: Bearer TOKEN`."""
    token, principal = issue(data, name, role, ttl)
    if as_json:
        verified = BearerToken.verify(token, CertificateAuthority.load(data).cert)
        expires = datetime.fromtimestamp(verified.expires, UTC)
        emit_json(
            {
                "token": token,
                "name": principal.name,
                "role": str(principal.roles[0]),
                "expires": expires.isoformat(),
                "serial": verified.serial,
            }
        )
        return
    click.echo(token)
