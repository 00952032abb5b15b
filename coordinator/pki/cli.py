"""`cachepoint-coordinator enroll` and `revoke`: they work on DATA/ca/ directly, so they run beside a
running coordinator (which reads what they write at its next enrollment or call). Each leaves an audit
record for the coordinator to append (coordinator/pki/audit_queue.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from cachepoint.config import parse_duration
from cachepoint.console import emit_json, handles_errors, json_option, when
from cachepoint.errors import InvalidInput, NotFound
from cachepoint.rpc.serving import split_address
from cachepoint.trust.principal import Role, check_name
from cachepoint.trust.token import JoinToken
from coordinator.pki import audit_queue, revocation, rotation, tokens
from coordinator.pki.ca import CertificateAuthority

data_option = click.option(
    "--data", "data", type=click.Path(path_type=Path), required=True, help="The coordinator's data directory."
)


def _enroll_port(data: Path) -> int:
    """The running coordinator's enrollment port, as it announced it (0: not known)."""
    from coordinator.daemon import STATE_FILE

    try:
        return split_address(str(json.loads((data / STATE_FILE).read_text())["enroll"]))[1]
    except (OSError, ValueError, KeyError, InvalidInput):
        return 0


def _checked(name: str, what: str) -> str:
    try:
        return check_name(name, what)
    except ValueError as err:
        raise InvalidInput(str(err)) from err


@click.command("enroll")
@click.argument("name")
@data_option
@click.option("--site", default="", help="The site of a node (its locality label).")
@click.option(
    "--role",
    default="node",
    show_default=True,
    help="node, publisher, auditor, admin, monitor or user:NAME.",
)
@click.option("--ttl", default="1h", show_default=True, help="How long the token can be used (once).")
@json_option
@handles_errors
def enroll_cmd(name: str, data: Path, site: str, role: str, ttl: str, as_json: bool) -> None:
    """Print a one-time join token for NAME (a node's id, a person's or a tool's name); spend it on
    that machine with `cachepoint enroll --coordinator HOST:PORT --token TOKEN`."""
    _checked(name, "name")
    if site:
        _checked(site, "site")
    try:
        parsed_role = Role.parse(role)
    except ValueError as err:
        raise InvalidInput(str(err)) from err
    seconds = parse_duration(ttl)
    if seconds <= 0:
        raise InvalidInput(f"--ttl {ttl!r}: a token must live a while, e.g. 10m or 1h")
    if not CertificateAuthority.exists(data):
        raise NotFound(
            f"{data} has no CA yet: start the coordinator once with --tls "
            "(or import one with --ca-cert, --ca-key)"
        )
    # The token pins the CA the enrollment port presents: during a rotation, the retiring one.
    token = JoinToken.new(rotation.Authorities.load(data).serving.fingerprint, _enroll_port(data))
    now = time.time()
    entry = tokens.TokenRecord(name, str(parsed_role), site, now + seconds, now)
    tokens.record(data, token.secret_hash, entry)
    audit_queue.queue(
        data,
        audit_queue.TOKEN_ISSUED,
        name,
        {"role": str(parsed_role), "site": site or None, "expires_at": entry.expires_at},
    )
    if as_json:
        emit_json(
            {
                "token": token.encode(),
                "name": name,
                "role": str(parsed_role),
                "site": site or None,
                "expires": when(int(entry.expires_at * 1e9)),
            }
        )
        return
    click.echo(token.encode())


@click.command("revoke")
@click.argument("name")
@data_option
@json_option
@handles_errors
def revoke_cmd(name: str, data: Path, as_json: bool) -> None:
    """Refuse NAME's certificates from now on: its new calls at once, its open streams within a
    heartbeat interval. Enrolling NAME again with a new token gives it a certificate that works."""
    _checked(name, "name")
    at = revocation.revoke(data, name)
    audit_queue.queue(data, audit_queue.REVOKED, name, {"revoked_at": at})
    if as_json:
        emit_json({"revoked": name, "at": when(int(at * 1e9))})
        return
    click.echo(f"revoked {name} at {when(int(at * 1e9))} UTC")


@click.command("rotate-ca")
@data_option
@click.option("--finish", is_flag=True, help="Retire the old CA: its certificates are refused from now on.")
@click.option("--ca-cert", type=click.Path(path_type=Path), help="Rotate to this CA certificate (PEM).")
@click.option("--ca-key", type=click.Path(path_type=Path), help="The key of --ca-cert (unencrypted PEM).")
@json_option
@handles_errors
def rotate_ca_cmd(data: Path, finish: bool, ca_cert: Path | None, ca_key: Path | None, as_json: bool) -> None:
    """Start a rotation of the fleet's CA: a new CA (or --ca-cert/--ca-key) issues every certificate
    from now on, both are trusted, and daemons move onto it at their next renewal. After at least one
    cert_lifetime, `rotate-ca --finish` retires the old CA. A running coordinator follows at once."""
    if finish:
        if ca_cert or ca_key:
            raise InvalidInput("--finish takes no --ca-cert/--ca-key: it only retires the old CA")
        retired = rotation.finish(data)
        audit_queue.queue(data, audit_queue.CA_RETIRED, "ca", {"retired": retired})
        if as_json:
            emit_json({"retired": retired})
        else:
            click.echo(f"retired CA {retired[:16]}…: its certificates are refused from now on")
        return
    started = rotation.rotate(data, ca_cert, ca_key)
    retiring = started.retiring.fingerprint if started.retiring else None
    audit_queue.queue(
        data, audit_queue.CA_ROTATED, "ca", {"new": started.issuing.fingerprint, "retiring": retiring}
    )
    if as_json:
        emit_json({"new": started.issuing.fingerprint, "retiring": retiring})
        return
    click.echo(
        f"new CA {started.issuing.fingerprint[:16]}… issues from now on; {str(retiring)[:16]}… is trusted "
        "until `rotate-ca --finish` (wait at least one cert_lifetime)"
    )


COMMANDS = (enroll_cmd, revoke_cmd, rotate_ca_cmd)
