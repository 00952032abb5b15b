"""Who may use which NBD export of a daemon with ``--nbd-tls``: the node's own certificate is served,
clients present one of the fleet's CA, and an export is served only to a principal that may read every
layer under it, by the fleet's one layer rule (cachepoint/trust/reading.py):

    os/ and app/ layers          any principal of the fleet
    user/NAME/... layers         user:NAME, role auditor, a node NAME is assigned to, and this node

Revocations and assignments are the ones this node's heartbeats brought (cachepoint/trust/fleet_view.py);
without a coordinator no one is revoked and no user is assigned to another node.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from cryptography import x509

from cachepoint.disk.nbd.tls import NbdTls, server_context
from cachepoint.trust.identity import Identity
from cachepoint.trust.principal import NotAPrincipal, Principal, principal_of
from cachepoint.trust.reading import UsersOf, may_read_layer, owner_of

# The layers an export is made of, or None when no export has that name (any more).
LayersOf = Callable[[str], Sequence[str] | None]
# When a principal was revoked (Unix seconds), or None: the shape HTTP's Authenticator takes too.
Revoked = Callable[[Principal], float | None]


def _nobody(node: str) -> frozenset[str]:
    return frozenset()


def layer_refusal(principal: Principal, layer: str, node: str, users_of: UsersOf = _nobody) -> str:
    """Why ``principal`` may not read ``layer`` at node ``node``; "" when it may. The node serving the
    export may always read it: the disk is attached there."""
    if may_read_layer(principal, layer, users_of) or (principal.has("node") and principal.name == node):
        return ""
    user = owner_of(layer)
    return (
        f"{layer} belongs to user {user}: it is served to user:{user}, auditors, nodes {user} is "
        f"assigned to and node {node}"
    )


class ExportAccess:
    """The ``authorize`` of the daemon's NbdTls."""

    def __init__(
        self,
        node: str,
        layers_of: LayersOf,
        revoked: Revoked | None = None,
        users_of: UsersOf = _nobody,
    ) -> None:
        self.node = node
        self.layers_of = layers_of
        self.revoked = revoked
        self.users_of = users_of

    def __call__(self, certificate: bytes, export: str) -> str:
        try:
            principal = principal_of(x509.load_der_x509_certificate(certificate))
        except (NotAPrincipal, ValueError) as err:
            return f"the client certificate names no principal of the fleet: {err}"
        revoked_at = self.revoked(principal) if self.revoked is not None else None
        if revoked_at is not None:
            when = datetime.fromtimestamp(revoked_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f"the client certificate of {principal.name!r}: the principal was revoked at {when}"
        layers = self.layers_of(export)
        if layers is None:
            return f"no export named {export!r}"
        for layer in layers:
            refusal = layer_refusal(principal, layer, self.node, self.users_of)
            if refusal:
                return f"principal {principal.name!r} may not read export {export!r}: {refusal}"
        return ""


class IdentityContext:
    """Server contexts presenting the node's identity; made again after a renewal (the identity's
    generation moves), so a new certificate is served from the next handshake without a restart."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._lock = threading.Lock()
        self._made: tuple[int, ssl.SSLContext] | None = None

    def __call__(self) -> ssl.SSLContext:
        generation, key, cert = self.identity.current()  # one consistent pair, even mid-renewal
        with self._lock:
            if self._made is None or self._made[0] != generation:
                self._made = (generation, server_context(key, cert, self.identity.ca_pem))
            return self._made[1]


def nbd_tls(
    identity: Identity,
    node: str,
    layers_of: LayersOf,
    revoked: Revoked | None = None,
    users_of: UsersOf = _nobody,
) -> NbdTls:
    return NbdTls(IdentityContext(identity), ExportAccess(node, layers_of, revoked, users_of))
