"""`cachepoint-coordinator enroll` and `revoke`: they work on DATA/ca/ directly, so they run beside a
running coordinator (which reads what they write at its next enrollment or call). Each leaves an audit
record for the coordinator to append (coordinator/pki/audit_queue.py). With a shared catalog (replicas:
``catalog`` in the config, or --catalog), tokens and revocations are written to PostgreSQL instead,
with their audit record in the shared chain (coordinator/pki/state.py)."""

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
from coordinator.pki import audit_queue, rotation, state, tokens
from coordinator.pki.ca import CertificateAuthority

data_option = click.option(
    "--data", "data", type=click.Path(path_type=Path), required=True, help="The coordinator's data directory."
)
admin_data_option = click.option(
    "--data",
    "data",
    type=click.Path(path_type=Path),
    help="The coordinator's data directory (a replica's: where its CA is) [config data].",
)
catalog_option = click.option(
    "--catalog",
    default=None,
    metavar="URL",
    help="postgresql://… : write to the replicas' shared catalog [config catalog; none: files in --data].",
)


def admin_target(data: Path | None, catalog: str | None) -> tuple[Path | None, str]:
    """(data directory, catalog URL) of an admin command: its options over the config's keys."""
    settings = click.get_current_context().find_root().obj
    if data is None and getattr(settings, "data", ""):
        data = Path(settings.data)
    if catalog is None:
        catalog = str(getattr(settings, "catalog", "") or "")
    return data, catalog


def admin_writes(data: Path | None, catalog: str | None) -> state.AdminWrites:
    return state.admin(*admin_target(data, catalog))


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
@admin_data_option
@catalog_option
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
def enroll_cmd(
    name: str, data: Path | None, catalog: str | None, site: str, role: str, ttl: str, as_json: bool
) -> None:
    """Print a one-time join token for NAME (a node's id, a person's or a tool's name); spend it on
    that machine with `cachepoint enroll --coordinator HOST:PORT --token TOKEN`. With a shared
    catalog, at any replica."""
    data, catalog = admin_target(data, catalog)
    if data is None:
        raise InvalidInput(
            "say where the fleet's CA is: --data DIR (a coordinator's), or `data` in the config"
        )
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
    writes = state.admin(data, catalog)
    try:
        writes.issue_token(token.secret_hash, entry)
    finally:
        writes.close()
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
@admin_data_option
@catalog_option
@json_option
@handles_errors
def revoke_cmd(name: str, data: Path | None, catalog: str | None, as_json: bool) -> None:
    """Refuse NAME's certificates from now on: its new calls at once, its open streams within a
    heartbeat interval (with a shared catalog: at every replica, within a second). Enrolling NAME
    again with a new token gives it a certificate that works."""
    _checked(name, "name")
    writes = admin_writes(data, catalog)
    try:
        at = writes.revoke(name)
    finally:
        writes.close()
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
