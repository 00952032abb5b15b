"""Where the fleet's trust records live: join tokens, revocations and user assignments. Embedded,
files in DATA that the admin commands write beside a running coordinator (tokens.py, revocation.py,
coordinator/assignments.py; their audit records queued in DATA/audit-queue/). With a shared catalog,
PostgreSQL tables every replica reads (coordinator/backends/trust_tables.py; the audit records go
straight into the shared chain). The CA's key and certificate are files each replica is given, either way.

``serving`` is what a coordinator reads while it serves; ``admin`` is what `enroll`, `revoke`,
`assign` and `unassign` write through.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cachepoint.errors import InvalidInput
from cachepoint.trust.guard import RevocationList
from coordinator.assignments import Assignments, AssignmentView
from coordinator.pki import audit_queue, revocation, tokens
from coordinator.pki.revocation import Revocations
from coordinator.pki.tokens import TokenRecord


class TokenBook(Protocol):
    def spend(self, secret_hash: str) -> TokenRecord:
        """The record of a valid token, now spent; tokens.TokenRefused when unknown, used or expired."""


class RevocationView(RevocationList, Protocol):
    revoked: dict[str, float]

    def refresh(self) -> None: ...


@dataclass(frozen=True)
class TrustRecords:
    tokens: TokenBook
    revocations: RevocationView
    assignments: AssignmentView
    revoked_at: Callable[[str], float | None]
    """When a name was last revoked, read now (enrollment waits out that second)."""
    follow: Callable[[], Awaitable[None]] | None = None
    """The task that keeps a replica's copies current (shared only)."""
    changed: Callable[[], None] | None = None
    """Told that another replica changed them: the copies are read again now (shared only)."""


def serving(data: Path, db: Any) -> TrustRecords:
    """The records of the coordinator whose store is on ``db``: shared when ``db`` is PostgreSQL's."""
    if getattr(db, "shared", False):
        from coordinator.backends.trust_tables import TrustTables

        tables = TrustTables(db)
        return TrustRecords(
            tables.tokens,
            tables.revocations,
            tables.assignments,
            tables.revoked_at,
            tables.follow,
            tables.poke,
        )
    revocations = Revocations(data)
    return TrustRecords(tokens.FileTokens(data), revocations, Assignments(data), revocations.revoked_at)


# -- the admin commands ------------------------------------------------------------------------------


class AdminWrites(Protocol):
    def issue_token(self, secret_hash: str, entry: TokenRecord) -> None: ...
    def revoke(self, name: str) -> float: ...
    def assign(self, user: str, node: str) -> bool: ...
    def unassign(self, user: str, node: str) -> bool: ...
    def close(self) -> None: ...


def _token_details(entry: TokenRecord) -> dict[str, Any]:
    return {"role": entry.role, "site": entry.site or None, "expires_at": entry.expires_at}


class FileAdmin:
    """Embedded: the files in DATA, and an audit record queued for the coordinator to append."""

    def __init__(self, data: Path) -> None:
        self.data = data

    def issue_token(self, secret_hash: str, entry: TokenRecord) -> None:
        tokens.record(self.data, secret_hash, entry)
        audit_queue.queue(self.data, audit_queue.TOKEN_ISSUED, entry.name, _token_details(entry))

    def revoke(self, name: str) -> float:
        at = revocation.revoke(self.data, name)
        audit_queue.queue(self.data, audit_queue.REVOKED, name, {"revoked_at": at})
        return at

    def assign(self, user: str, node: str) -> bool:
        return self._queued(Assignments(self.data).assign(user, node), audit_queue.ASSIGNED, user, node)

    def unassign(self, user: str, node: str) -> bool:
        return self._queued(Assignments(self.data).unassign(user, node), audit_queue.UNASSIGNED, user, node)

    def _queued(self, changed: bool, action: str, user: str, node: str) -> bool:
        if changed:
            audit_queue.queue(self.data, action, f"user/{user}", {"node": node})
        return changed

    def close(self) -> None:
        pass


class SharedAdmin:
    """Shared: the PostgreSQL tables, each change in one transaction with its audit record."""

    def __init__(self, catalog: str, data: Path | None) -> None:
        from coordinator.backends.records import PgStoreDB
        from coordinator.history.audit import AuditLog

        # PgStoreDB's root is a replica's own directory; these commands keep nothing there.
        self.db = PgStoreDB(catalog, data or Path.cwd(), pool_size=2)
        self.audit = AuditLog(self.db)

    def _audited(
        self, write: Callable[[Any], Any], action: str, subject: str, details: dict[str, Any]
    ) -> Any:
        from coordinator.backends.trust_tables import admin_transaction
        from coordinator.history.audit import AuditEntry

        with admin_transaction(self.db) as conn:
            result = write(conn)
            if result is not False:  # an assignment already there (or already gone) changes nothing
                entry = AuditEntry(audit_queue.os_actor(), action, subject, {**details, "at": time.time()})
                self.audit.append([entry])
        return result

    def issue_token(self, secret_hash: str, entry: TokenRecord) -> None:
        from coordinator.backends import trust_tables

        self._audited(
            lambda conn: trust_tables.record_token(conn, secret_hash, entry),
            audit_queue.TOKEN_ISSUED,
            entry.name,
            _token_details(entry),
        )

    def revoke(self, name: str) -> float:
        from coordinator.backends import trust_tables

        at = time.time()
        self._audited(
            lambda conn: trust_tables.revoke(conn, name, at), audit_queue.REVOKED, name, {"revoked_at": at}
        )
        return at

    def assign(self, user: str, node: str) -> bool:
        from coordinator.backends import trust_tables

        return self._assignment(trust_tables.assign, audit_queue.ASSIGNED, user, node)

    def unassign(self, user: str, node: str) -> bool:
        from coordinator.backends import trust_tables

        return self._assignment(trust_tables.unassign, audit_queue.UNASSIGNED, user, node)

    def _assignment(self, change: Callable[[Any, str, str], bool], action: str, user: str, node: str) -> bool:
        self._check(user, node)
        written = self._audited(lambda conn: change(conn, user, node), action, f"user/{user}", {"node": node})
        return bool(written)

    @staticmethod
    def _check(user: str, node: str) -> None:
        from cachepoint.trust.principal import check_name
        from coordinator.history.users import validate_user

        validate_user(user)
        try:
            check_name(node, "node name")
        except ValueError as err:
            raise InvalidInput(str(err)) from err

    def close(self) -> None:
        self.db.close()


def admin(data: Path | None, catalog: str) -> AdminWrites:
    """Where the admin commands write: ``catalog`` (postgresql://…) when named, else the files in ``data``."""
    if catalog:
        if not catalog.startswith(("postgresql://", "postgres://")):
            raise InvalidInput(f"catalog {catalog!r}: write a postgresql:// connection string")
        return SharedAdmin(catalog, data)
    if data is None:
        raise InvalidInput(
            "say where the coordinator keeps its data: --data DIR or `data` in the config "
            "(replicas: --catalog URL or `catalog` in the config)"
        )
    return FileAdmin(data)
