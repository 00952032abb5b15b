"""Who a fleet certificate names, and how it says so.

A certificate's subject CN is the principal's name (a node's id, a person's or a tool's name); its
Subject Alternative Names carry URIs in the ``cachepoint:`` scheme, one fact each:

    cachepoint:role:node            the principal's role (node, publisher, auditor, admin, monitor, user)
    cachepoint:site:branch-12       a node's site
    cachepoint:user:alice           the user a ``user`` role acts for (role ``user:alice``)

URIs, not a private extension, because every X.509 tool shows them (openssl x509 -text) and they
need no OID of our own. This module is the only one that reads or writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import NameOID

URI_SCHEME = "cachepoint"
# Every node's certificate also names this DNS name: peers dial each other by address, and no node may
# be given a certificate for an address (it could then pose as the coordinator); a node dialling a peer
# checks this name instead (grpc.ssl_target_name_override), so only a node of the fleet passes.
PEER_TLS_NAME = "peer.cachepoint.invalid"  # = cachepoint.rpc.channel.PEER_TLS_NAME
# Certificates are valid from this long before they are issued, so that a peer whose clock is a little
# behind accepts them at once; the issue time is recovered exactly as not_before + BACKDATE.
BACKDATE = timedelta(minutes=5)
# monitor: scrapes /metrics (a Prometheus server's token), with no other role's rights.
ROLES = ("node", "publisher", "auditor", "admin", "monitor", "user")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


class NotAPrincipal(ValueError):
    """A certificate that does not name a principal of the fleet."""


def check_name(text: str, what: str) -> str:
    if not _NAME_RE.match(text):
        raise ValueError(
            f"{what} {text!r}: 1 to 128 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return text


@dataclass(frozen=True, slots=True)
class Role:
    """``node``, ``publisher``, ``auditor``, ``admin``, ``monitor`` or ``user:NAME``."""

    kind: str
    user: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ROLES:
            raise ValueError(
                f"role {self.kind!r}: one of node, publisher, auditor, admin, monitor, user:NAME"
            )
        if (self.kind == "user") != bool(self.user):
            raise ValueError("role user needs a name (user:NAME), and only role user takes one")
        if self.user:
            check_name(self.user, "user name")

    @classmethod
    def parse(cls, text: str) -> Role:
        kind, _, user = text.partition(":")
        return cls(kind, user)

    def __str__(self) -> str:
        return f"{self.kind}:{self.user}" if self.user else self.kind


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: read from the peer's certificate, never from what the peer says."""

    name: str
    roles: tuple[Role, ...]
    site: str = ""
    serial: int = 0
    not_before: datetime | None = None
    not_after: datetime | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "principal name")
        if not self.roles:
            raise ValueError(f"principal {self.name!r} has no role")
        if self.site:
            check_name(self.site, "site")

    def has(self, kind: str) -> bool:
        return any(role.kind == kind for role in self.roles)

    @property
    def issued(self) -> datetime | None:
        return self.not_before + BACKDATE if self.not_before else None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "roles": [str(r) for r in self.roles],
            "site": self.site or None,
            "not_after": self.not_after.isoformat() if self.not_after else None,
        }


def subject_of(principal: Principal) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, principal.name)])


def uris_of(principal: Principal) -> list[x509.GeneralName]:
    uris = [f"{URI_SCHEME}:role:{role.kind}" for role in principal.roles]
    uris += [f"{URI_SCHEME}:user:{role.user}" for role in principal.roles if role.user]
    if principal.site:
        uris.append(f"{URI_SCHEME}:site:{principal.site}")
    return [x509.UniformResourceIdentifier(uri) for uri in uris]


def principal_of(cert: x509.Certificate) -> Principal:
    """The principal a fleet certificate names; NotAPrincipal when it names none."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise NotAPrincipal(f"certificate {cert.serial_number:x} has {len(names)} common names, not one")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        raise NotAPrincipal(f"certificate of {names[0].value!r} has no cachepoint: names") from err
    kinds: list[str] = []
    users: list[str] = []
    site = ""
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        scheme, _, rest = uri.partition(":")
        key, _, value = rest.partition(":")
        if scheme != URI_SCHEME:
            continue
        if key == "role":
            kinds.append(value)
        elif key == "user":
            users.append(value)
        elif key == "site":
            site = value
    try:
        roles = tuple(Role(kind, users[0] if kind == "user" and users else "") for kind in kinds)
        return Principal(
            str(names[0].value),
            roles,
            site,
            cert.serial_number,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
    except ValueError as err:
        raise NotAPrincipal(f"certificate of {names[0].value!r}: {err}") from err


def principal_of_pem(pem: bytes) -> Principal:
    return principal_of(x509.load_pem_x509_certificate(pem))
