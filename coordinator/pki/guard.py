"""The coordinator's certificate guard: cachepoint/trust/guard.py, checking the revocations (of
DATA/ca/revoked.json, or with replicas the shared table's copy) every half heartbeat interval."""

from __future__ import annotations

from cachepoint.trust.guard import Guard, OpenCall, Refused, RevocationList, peer_principal
from coordinator.fleet.registry import HEARTBEAT_INTERVAL_MS

REVOKE_CHECK = HEARTBEAT_INTERVAL_MS / 1000 / 2  # open calls of a revoked principal end within this

__all__ = ["Guard", "OpenCall", "Refused", "coordinator_guard", "peer_principal"]


def coordinator_guard(revocations: RevocationList) -> Guard:
    return Guard(revocations, REVOKE_CHECK)
