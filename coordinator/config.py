"""Settings of `cachepoint-coordinator`: defaults, then a TOML file, then the environment, then flags.
Read as `cachepoint`'s are (cachepoint/config.py; `check-config` in cachepoint/config_check.py).

data = "/srv/cachepoint/coordinator"   # the embedded store (with a catalog: this replica's own files)
catalog = "postgresql://cp@db.example/cachepoint"  # replicas: the catalog in PostgreSQL
blocks = "file:///mnt/cachepoint-blocks"           # and the blocks in a directory they all mount
block_grace = "1h"                     # blocks younger than this are never swept (see docs/scale-out.md)
listen = "0.0.0.0:7400"
http = "127.0.0.1:7480"                # REST for history, holds and audit (empty: none)
http_tls = true                        # REST with TLS, clients authenticated (plaintext: loopback only)
gc_every = "1d"                        # retention GC on a schedule (default "0": only `history gc`)
node_expiry = "30d"                    # forget nodes silent this long (default; "0": never)
tls = "on"                             # mutual TLS with the fleet's CA in DATA/ca/ (made if missing)
cert_lifetime = "3d"                   # of every certificate the CA issues
enroll_listen = "0.0.0.0:7401"         # the enrollment port (default: the port after listen)
tls_name = "coord.example,10.0.0.5"    # more names in the coordinator's certificate
log_format = "json"                    # or "text" (default: JSON unless stderr is a terminal)
coordinator = "coord.example:7400"     # whom `fleet` and `history` ask (default 127.0.0.1:7400)
identity = "/etc/cachepoint/admin-id"  # key and certificates they present

[retention.user]                       # see coordinator/history/retention.py
keep_last = 10
keep_daily = 7
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cachepoint.config import apply_table, parse_duration, parse_switch
from cachepoint.config_check import Check, optional_address, read_toml, replicas, scalar
from cachepoint.errors import InvalidInput
from cachepoint.logs import check_format
from cachepoint.model import LayerKind
from coordinator.backends.choice import Backend
from coordinator.history.retention import Retention, RetentionPolicy, parse_policies
from coordinator.pki.ca import CertificateAuthority
from coordinator.pki.trust import TrustSettings


@dataclass
class CoordinatorSettings:
    data: str = ""
    """Directory of the embedded store (blocks, catalog, event log, audit log, holds); with ``catalog``,
    this replica's own files (its CA copy, its announce file)."""
    catalog: str = ""
    """postgresql://… : every catalog record in PostgreSQL, so several replicas serve at once (with
    ``blocks``); empty: the embedded store in ``data``."""
    blocks: str = ""
    """file:///DIR : the blocks, a directory every replica mounts (with ``catalog``)."""
    block_grace: str = "1h"
    """With ``blocks``: GC never sweeps a block younger than this (pushed for a commit not made yet)."""
    listen: str = "127.0.0.1:7400"
    """HOST:PORT of the gRPC server (Catalog, BlockExchange, Fleet, History, health)."""
    http: str = ""
    """HOST:PORT of the REST server for history, holds and audit; empty: none."""
    http_tls: str = "false"
    """true: the REST server takes TLS with the coordinator's certificate, and clients authenticate
    with a certificate or a bearer token of the fleet (implies tls); false: plaintext, loopback only."""
    gc_every: str = "0"
    """Run the retention GC this often, e.g. "1d" (0: only when `history gc` asks)."""
    node_expiry: str = "30d"
    """Forget a node (its registry entry: `fleet`, the dashboard, peer discovery) once it has sent no
    heartbeat for this long, e.g. a laptop given back; "0": never. A node that comes back registers
    again by itself."""
    tls: str = "off"
    """"on": serve mutual TLS, making the fleet's CA in DATA/ca/ when there is none (a CA already in
    DATA/ca/ turns TLS on by itself)."""
    cert_lifetime: str = "3d"
    """Lifetime of the certificates the CA issues; holders renew at 2/3 of it."""
    enroll_listen: str = ""
    """HOST:PORT of the enrollment port (TLS, no client certificate); empty: the port after listen."""
    tls_name: str = ""
    """More names or addresses for the coordinator's certificate, comma-separated."""
    log_format: str = ""
    """Log lines as "json" or "text"; empty: JSON unless stderr is a terminal (cachepoint/logs.py)."""
    coordinator: str = ""
    """`fleet`, `history`: HOST:PORT of the coordinator they ask [env CACHEPOINT_COORDINATOR]; empty:
    127.0.0.1:7400."""
    identity: str = ""
    """`fleet`, `history`: key and certificates they present [env CACHEPOINT_IDENTITY]."""
    retention: dict[LayerKind, RetentionPolicy] = field(default_factory=dict)
    """Retention policy per layer kind (the ``[retention.KIND]`` tables); a kind without one keeps
    every version."""

    @property
    def retention_rules(self) -> Retention:
        return Retention(dict(self.retention))


def load(path: Path | None) -> CoordinatorSettings:
    settings = CoordinatorSettings()
    if path is None:
        return settings
    data = read_toml(path)
    if "retention" in data:
        settings.retention = parse_policies(data.pop("retention"), str(path))
    for key, value in data.items():
        if isinstance(value, dict | list):
            raise InvalidInput(f"config {path}: {key} must be a string")
    apply_table(settings, data, path)
    return settings


def _http(text: str) -> object:
    return None if not text or text.isdigit() else optional_address(text)


def _catalog(text: str) -> object:
    if text and not text.startswith(("postgresql://", "postgres://")):
        raise InvalidInput(f"catalog = {text!r}: write a postgresql:// connection string (or nothing)")
    return text


def _blocks(text: str) -> object:
    from coordinator.backends.fileblocks import blocks_root

    return blocks_root(text) if text else text


def backend(settings: CoordinatorSettings, data: Path, catalog: str | None, blocks: str | None) -> Backend:
    """Flags over the config (`serve --catalog/--blocks`)."""
    chosen = Backend(
        data,
        catalog if catalog is not None else settings.catalog,
        blocks if blocks is not None else settings.blocks,
        parse_duration(settings.block_grace),
    )
    chosen.check()
    return chosen


def _tls(text: str) -> object:
    if text not in ("on", "off"):
        raise InvalidInput(f'tls = {text!r}: write "on" or "off"')
    return text


def _lifetime(text: str) -> object:
    if parse_duration(text) < 1:
        raise InvalidInput(f"cert_lifetime {text!r}: at least 1s (default 3d)")
    return text


def coordinator_checks() -> dict[str, Check]:
    """How `cachepoint-coordinator` reads each key of its config (`check-config`)."""
    return {
        "data": scalar(),
        "catalog": scalar(_catalog),
        "blocks": scalar(_blocks),
        "block_grace": scalar(parse_duration),
        "listen": scalar(optional_address),
        "http": scalar(_http),
        "http_tls": scalar(lambda text: parse_switch(text, "http_tls")),
        "gc_every": scalar(parse_duration),
        "node_expiry": scalar(parse_duration),
        "tls": scalar(_tls),
        "cert_lifetime": scalar(_lifetime),
        "enroll_listen": scalar(optional_address),
        "tls_name": scalar(),
        "coordinator": replicas,
        "identity": scalar(),
        "log_format": scalar(check_format),
        "retention": lambda value: parse_policies(value, "retention"),
    }


def trust_settings(
    settings: CoordinatorSettings,
    data: Path,
    tls_flag: bool,
    ca_cert: Path | None,
    ca_key: Path | None,
    tls_names: list[str],
    enroll_listen: str | None,
) -> TrustSettings | None:
    """The fleet's trust for `serve`, or None (plaintext) when there is no CA and none is asked for."""
    if settings.tls not in ("on", "off"):
        raise InvalidInput(f'config tls = {settings.tls!r}: write "on" or "off"')
    ca = CertificateAuthority.for_serve(data, ca_cert, ca_key, tls_flag or settings.tls == "on")
    if ca is None:
        return None
    lifetime = parse_duration(settings.cert_lifetime)
    if lifetime < 1:
        raise InvalidInput(f"cert_lifetime {settings.cert_lifetime!r}: at least 1s (default 3d)")
    names = [n.strip() for n in settings.tls_name.split(",") if n.strip()] + tls_names
    return TrustSettings(ca, timedelta(seconds=lifetime), enroll_listen or settings.enroll_listen, names)
