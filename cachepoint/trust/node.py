"""A daemon with an identity: its names come from its certificate, and it renews that certificate
at 2/3 of its lifetime, without a restart (the server serves the new pair from its next handshake,
channels made afterwards present it)."""

from __future__ import annotations

import asyncio
import logging

from cachepoint.errors import CachepointError, InvalidInput
from cachepoint.rpc import channel, replicas
from cachepoint.trust.enroll import renew
from cachepoint.trust.identity import Identity

log = logging.getLogger("cachepoint.trust")
RETRY_MAX = 30.0


def daemon_identity() -> Identity | None:
    """The identity this process presents, if any (set by the command line)."""
    identity = channel.identity()
    return identity if isinstance(identity, Identity) else None


def names(identity: Identity, node_id: str, site: str, default_site: str) -> tuple[str, str]:
    """(node id, site) of a daemon: the certificate's, which a configured value may repeat but not
    contradict (the coordinator would know the node by a name its certificate does not give)."""
    principal = identity.principal
    if not principal.has("node"):
        raise InvalidInput(
            f"identity {identity.directory} is {principal.name!r} with roles "
            f"{[str(r) for r in principal.roles]}: a daemon needs a node's (enroll with --role node)"
        )
    if node_id and node_id != principal.name:
        raise InvalidInput(
            f"node_id {node_id!r} is configured, but the certificate in {identity.directory} names "
            f"{principal.name!r}: drop node_id or enroll under that name"
        )
    if principal.site and site not in (principal.site, default_site):
        raise InvalidInput(
            f"site {site!r} is configured, but the certificate in {identity.directory} names site "
            f"{principal.site!r}: drop site or enroll again with --site"
        )
    return principal.name, principal.site or site


async def keep_renewed(identity: Identity, coordinator: str) -> None:
    lifetime = (identity.not_after - identity.renew_at()).total_seconds() * 3  # the whole lifetime
    retry = min(RETRY_MAX, max(1.0, lifetime / 20))
    while True:
        wait = identity.seconds_to_renewal()
        if wait > 0:
            await asyncio.sleep(wait)
            continue
        try:
            await renew(identity, await replicas.reachable(coordinator))
            log.info("certificate of %s renewed until %s", identity.principal.name, identity.not_after)
        except CachepointError as err:
            log.warning(
                "could not renew the certificate of %s (valid until %s): %s; retrying in %.0fs",
                identity.principal.name,
                identity.not_after,
                err,
                retry,
            )
            await asyncio.sleep(retry)
