"""What a node's peer port knows of the fleet's rules beyond certificates: the revoked principals and
the assignments of users to nodes, both handed out by the coordinator in every heartbeat reply (over
the node's mutual-TLS channel to it: authenticated by the fleet's CA, like everything else it says).

The node applies a reply at once: new calls of a revoked principal are refused from then on and its
open streams are ended (Guard.close_revoked), so a revocation reaches every peer port within one
heartbeat interval. The last view is kept in STORE/fleet-view.json, so a node restarted while the
coordinator is away does not forget a revocation; until a first view arrives, no one is revoked and no
user is assigned to anyone (a user's layers go to that user and auditors only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cachepoint.trust.identity import write_file
from cachepoint.trust.principal import Principal
from cachepoint.v1 import fleet_pb2

log = logging.getLogger("cachepoint.trust")
VIEW_FILE = "fleet-view.json"


class FleetView:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.revoked: dict[str, float] = {}
        self.by_node: dict[str, frozenset[str]] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_text())
            self.revoked = {str(k): float(v) for k, v in raw["revoked"].items()}
            self.by_node = {str(k): frozenset(map(str, v)) for k, v in raw["assignments"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            log.warning("%s is unreadable (%s): waiting for the coordinator's next heartbeat", path, err)

    def apply(self, reply: fleet_pb2.HeartbeatResponse) -> bool:
        """Take the view of a heartbeat reply; True when it changed. A reply of a coordinator without
        TLS (trust_view unset) changes nothing."""
        if not reply.trust_view:
            return False
        revoked = {r.name: r.revoked_at for r in reply.revoked}
        by_node = {a.node_id: frozenset(a.users) for a in reply.assignments if a.users}
        if revoked == self.revoked and by_node == self.by_node:
            return False
        # Replaced whole: a reader on another thread sees the old view or the new one.
        self.revoked, self.by_node = revoked, by_node
        if self.path is not None:
            record = {"revoked": revoked, "assignments": {n: sorted(u) for n, u in by_node.items()}}
            try:
                write_file(self.path, json.dumps(record, sort_keys=True).encode(), 0o644)
            except OSError as err:
                log.warning("could not keep the fleet view in %s: %s", self.path, err)
        return True

    def refuses(self, principal: Principal) -> float | None:
        """As coordinator/pki/revocation.py: certificates issued up to the revocation are refused."""
        at = self.revoked.get(principal.name)
        if at is None or principal.issued is None:
            return None
        return at if principal.issued.timestamp() <= at else None

    def users_of(self, node: str) -> frozenset[str]:
        return self.by_node.get(node, frozenset())
