"""Fleet trust for the test harness: the suite runs its coordinators and daemons with mutual TLS unless
``CACHEPOINT_TEST_TLS=0``.

Certificates are issued here, in the test process, straight from the fleet's CA (coordinator/pki/ca.py):
a few milliseconds each, where a join token and a `cachepoint enroll` child per process would add
seconds to every test (the real enrollment is tested in tests/test_trust_fleet.py, and
``Fleet.enroll`` keeps that path at hand). Each address the harness serves TLS on is remembered with
its CA, so that a CLI call or a raw channel to it presents an identity of that fleet:

- a daemon's store gets a node identity (STORE/identity) before the daemon starts;
- a store a CLI command uses to reach a TLS address gets a publisher's identity, unless it has one;
- `cachepoint-coordinator` commands with ``--coordinator`` present an operator (roles auditor and
  admin) named as the login name, the same actor a plaintext run records;
- ``channel(address, ...)`` is a gRPC channel that presents an identity of the roles asked for.
"""

from __future__ import annotations

import getpass
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

ENV_TLS = "CACHEPOINT_TEST_TLS"
ENV_IDENTITY = "CACHEPOINT_IDENTITY"  # = cachepoint.trust.location.ENV_IDENTITY
ENABLED = os.environ.get(ENV_TLS, "1") != "0"
# Longer than any test: a certificate that expires mid-run would fail a test for a reason of its own.
LIFETIME = timedelta(days=2)
PEER_TLS_NAME = "peer.cachepoint.invalid"  # = cachepoint.trust.principal.PEER_TLS_NAME
IDENTITY = "identity"  # STORE/identity
OPERATOR_ROLES = ("auditor", "admin")
CLIENT_ROLES = ("publisher",)


def operator_name() -> str:
    return _principal_name(getpass.getuser())


def _principal_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._@-]", "-", text).lstrip("._@-")[:128]
    return name or "tester"


@dataclass
class Trust:
    """One fleet's CA (in a coordinator's data directory) and the identities the harness issued from it."""

    data: Path
    homes: list[Path] = field(default_factory=list)  # data directories of the coordinators using this CA
    _ca: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # identity directory -> (name, site, roles) of what the harness issued there
    _roles: dict[Path, tuple[str, str, frozenset[str]]] = field(default_factory=dict)

    @classmethod
    def for_data(cls, data: Path) -> Trust:
        """The CA of the coordinator on ``data``, made now when it has none (the coordinator loads it)."""
        from coordinator.pki.ca import CertificateAuthority

        trust = cls(data, [data])
        exists = CertificateAuthority.exists(data)
        trust._ca = CertificateAuthority.load(data) if exists else CertificateAuthority.create(data)
        return trust

    @property
    def ca(self) -> Any:
        return self._ca

    def copy_to(self, data: Path) -> None:
        """The same CA in another coordinator's data directory (one fleet, one CA)."""
        from coordinator.pki.ca import CertificateAuthority

        if data not in self.homes:
            self.homes.append(data)
        if not CertificateAuthority.exists(data):
            ca_dir = data / "ca"
            ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name in ("ca.key", "ca.crt"):
                (ca_dir / name).write_bytes((self.data / "ca" / name).read_bytes())
            os.chmod(ca_dir / "ca.key", 0o600)

    def issue(self, directory: Path, name: str, roles: Iterable[str], site: str = "") -> Path:
        """An identity in ``directory`` for ``name`` with ``roles`` (kept when it already has them; else
        issued again with the roles it had plus these)."""
        from cryptography.hazmat.primitives import serialization

        from cachepoint.trust.identity import Identity, key_pem, new_key
        from cachepoint.trust.principal import Principal, Role

        wanted = frozenset(roles)
        with self._lock:
            held = self._roles.get(directory)
            if held is not None and held[0] == name and wanted <= held[2] and (not site or site == held[1]):
                return directory
            if held is not None and held[0] == name:
                wanted |= held[2]
                site = site or held[1]
            principal = Principal(_principal_name(name), tuple(Role.parse(r) for r in sorted(wanted)), site)
            key = new_key()
            cert = self.ca.issue(key.public_key(), principal, LIFETIME)
            Identity.save(
                directory, key_pem(key), cert.public_bytes(serialization.Encoding.PEM), self.ca.cert_pem
            )
            self._roles[directory] = (name, site, wanted)
            _issuers[directory] = self
            return directory

    def issued(self, directory: Path) -> bool:
        return directory in self._roles

    def node(self, store: Path, node_id: str, site: str) -> Path:
        return self.issue(store / IDENTITY, node_id, ["node"], site)

    def client(self, store: Path, roles: Sequence[str] = ()) -> Path:
        """The identity a CLI command run on ``store`` presents: the one it has when that has ``roles``;
        else one with them added, or a new one named after the store (a publisher's by default)."""
        directory = store / IDENTITY
        held = self._roles.get(directory)
        if (directory / "cert.pem").exists() and (held is None or set(roles) <= held[2]):
            return directory
        return self.issue(directory, held[0] if held else store.name, roles or CLIENT_ROLES)

    def person(self, name: str, roles: Sequence[str]) -> Path:
        """An identity of a person or a tool, kept beside the CA's data directory (not in any store)."""
        tag = "+".join(sorted(roles)).replace(":", "_")
        return self.issue(self.data.parent / "identities" / f"{_principal_name(name)}.{tag}", name, roles)

    def operator(self, name: str | None = None) -> Path:
        return self.person(name or operator_name(), OPERATOR_ROLES)

    def assign(self, user: str, node: str) -> None:
        """``user`` to ``node`` at every coordinator of this CA (what `cachepoint-coordinator assign`
        does; the serving coordinator reads the file again when it changes)."""
        from coordinator.assignments import Assignments
        from tests.fleet import shared_catalog

        shared = shared_catalog()
        if shared is not None:  # the replicas read assignments from the shared catalog
            import psycopg

            from coordinator.backends import trust_tables

            # The row alone, as the file below is written alone: the harness's setup is no admin's
            # act, so neither backend audits it (a test's audit trail then starts with its own acts).
            with psycopg.connect(shared.dsn) as conn, conn.transaction():
                trust_tables.assign(conn, user, node)
            return
        for data in self.homes:
            data.mkdir(parents=True, exist_ok=True)
            Assignments(data).assign(user, node)


# -- which addresses serve TLS ------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    trust: Trust
    peer: bool  # a daemon's peer port: checked for the name every node's certificate carries


_served: dict[str, Served] = {}
_issuers: dict[Path, Trust] = {}  # identity directory -> the fleet that issued it here


def issuers() -> dict[Path, Trust]:
    """The identity directories the harness issued in this process, and by which fleet."""
    return _issuers


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _port_key(address: str) -> str | None:
    """Loopback addresses by port: a daemon on localhost:P is also 127.0.0.1:P and [::1]:P."""
    host, _, port = address.rpartition(":")
    return f"loopback:{port}" if host in LOOPBACK_HOSTS else None


def serve(address: str, trust: Trust, peer: bool) -> None:
    _served[address] = Served(trust, peer)
    key = _port_key(address)
    if key is not None:
        _served[key] = _served[address]


def forget(address: str) -> None:
    """A new listener on ``address`` serves what it was started with, not what a closed server of an
    earlier test on the same port did (the registry lives as long as the test worker)."""
    _served.pop(address, None)
    key = _port_key(address)
    if key is not None:
        _served.pop(key, None)


def served(address: str) -> Served | None:
    """What the harness serves at ``address``; of a list of replicas ("a:P1,b:P2", as --coordinator
    takes it), the first entry it serves."""
    if "," in address:
        return next(filter(None, (served(part.strip()) for part in address.split(","))), None)
    found = _served.get(address)
    key = _port_key(address)
    return found if found is not None or key is None else _served.get(key)


def trust_of(args: Iterable[object]) -> Trust | None:
    """The fleet of the first TLS address among a command's arguments."""
    for arg in args:
        found = served(str(arg))
        if found is not None:
            return found.trust
    return None


def users_named(words: Sequence[str]) -> list[str]:
    """The users a command acts for: ``--user NAME``, and layers ``user/NAME/...`` among its arguments."""
    users = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--user"]
    for word in words:
        parts = word.split("/")
        if parts[0] == "user" and len(parts) > 2 and parts[1]:
            users.append(parts[1])
    return users


def assign_users(store: Path, args: Sequence[object]) -> None:
    """A command on a node's store that makes or reads a user's versions (capture, ingest, attach,
    restore-dir with ``--user``): the node is assigned those users at its coordinator first, as an
    admin would have done (`cachepoint-coordinator assign`)."""
    directory = store / IDENTITY
    trust = _issuers.get(directory)
    held = trust._roles.get(directory) if trust is not None else None
    if trust is None or held is None or "node" not in held[2]:
        return
    for user in users_named([str(a) for a in args]):
        trust.assign(user, held[0])


def client_identity(store: Path, args: Sequence[object]) -> Path | None:
    """Before a `cachepoint` command on ``store``: the identity it needs to reach a TLS address among
    its arguments (issued when the store has none, or has one without the role the command needs:
    publisher for a publish or a tag, node, assigned the user, for a user's layers). Enrollment is
    left alone: it makes the identity itself."""
    words = [str(a) for a in args]
    if "enroll" in words[:3] or "--identity" in words:
        return None
    assign_users(store, words)
    trust = trust_of(words)
    if trust is None:
        return None
    directory = store / IDENTITY
    if (directory / "cert.pem").exists() and not trust.issued(directory):
        return directory  # enrolled by the test itself: what it holds is what it presents
    users = users_named(words)
    if users:
        # A user's layers are committed and read by a node assigned to the user (coordinator/authz.py).
        roles: tuple[str, ...] = ("node",)
    else:
        roles = ("publisher",) if ("publish" in words or "tag" in words) else ()
    identity = trust.client(store, roles)
    assign_users(store, words)
    return identity


def operator_identity(args: Sequence[object]) -> Path | None:
    """For a `cachepoint-coordinator` command: the operator's identity when it calls a TLS coordinator
    and names no identity of its own. With ``--actor NAME``, an operator of that name, so the audit
    log names whom a plaintext run would."""
    words = [str(a) for a in args]
    if "--identity" in words or "enroll" in words[:1]:
        return None
    trust = trust_of(words)
    if trust is None:
        return None
    name = words[words.index("--actor") + 1] if "--actor" in words[:-1] else None
    return trust.operator(name)


# -- raw channels ---------------------------------------------------------------------------------------


def credentials(directory: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (directory / "ca.pem").read_bytes(),
        (directory / "key.pem").read_bytes(),
        (directory / "cert.pem").read_bytes(),
    )


def _target(
    address: str, roles: Sequence[str], name: str | None, identity: Path | None, options: Sequence[Any]
) -> tuple[grpc.ChannelCredentials | None, list[Any]]:
    found = served(address)
    if found is None:
        return None, list(options)
    if identity is None:
        if name is None:
            name = operator_name() if tuple(roles) == OPERATOR_ROLES else f"tester-{'-'.join(roles)}"
        identity = found.trust.person(name.replace(":", "-"), roles)
    extra = [("grpc.ssl_target_name_override", PEER_TLS_NAME)] if found.peer else []
    return credentials(identity), [*options, *extra]


def channel(
    address: str,
    *roles: str,
    name: str | None = None,
    identity: Path | None = None,
    options: Sequence[Any] = (),
) -> grpc.Channel:
    """A channel to ``address``: mutual TLS with an identity of ``roles`` (by default the operator's,
    auditor and admin, who may read everything), as ``name`` or ``identity`` when given, if the
    harness serves TLS there; plaintext otherwise."""
    creds, opts = _target(address, roles or OPERATOR_ROLES, name, identity, options)
    if creds is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, creds, options=opts)


def aio_channel(
    address: str,
    *roles: str,
    name: str | None = None,
    identity: Path | None = None,
    options: Sequence[Any] = (),
) -> grpc.aio.Channel:
    creds, opts = _target(address, roles or OPERATOR_ROLES, name, identity, options)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, creds, options=opts)
