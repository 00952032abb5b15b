"""Fleet trust in PostgreSQL, for replicas: join tokens, revocations and user assignments (migration 4),
so that a token made once is spent once at any replica, and a revocation or an assignment made once
holds at every replica.

A call's authorization reads a copy each replica keeps in memory, never the database: ``follow``
reads one row per kind from ``trust_versions`` and reads a table again only when its row moved
(every write bumps it in its own transaction). It looks when a write's notification arrives
(TRUST_CHANNEL, sent at its commit, heard by notify.py: a revocation holds at every replica within
milliseconds) and every FOLLOW_S seconds in any case (the bound when notifications are lost); while
the database cannot be reached, a replica keeps the copy it has (and its catalog calls fail anyway).
Spending a token is one ``UPDATE ... WHERE spent_at IS NULL RETURNING``: of two enrollments racing
with one token, PostgreSQL lets one update the row.

Admin writes (`enroll`, `revoke`, `assign`, `unassign` with a shared catalog) go in one transaction
with their audit record, inside the cluster's write section (the audit chain's head is read there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from cachepoint.errors import StoreBusy
from cachepoint.trust.principal import Principal
from coordinator.backends.records import PgStoreDB, section_connection
from coordinator.backends.section import exclusive
from coordinator.pki.tokens import PURGE_AFTER, TokenRecord, TokenRefused

log = logging.getLogger("coordinator.pki")
# How stale a replica's copy may be (plus one query) when no notification arrives: the bound on a
# revocation's delay (CACHEPOINT_TRUST_FOLLOW: a test's way to show that the notification alone works).
FOLLOW_S = float(os.environ.get("CACHEPOINT_TRUST_FOLLOW", "0.5"))
TRUST_CHANNEL = "cachepoint_trust"  # pg_notify'd with the kind changed, at the commit of every change
REVOCATIONS = "revocations"
ASSIGNMENTS = "assignments"


def _spent_message(spent_at: float) -> str:
    spent = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(spent_at))
    return f"this join token was already used (at {spent} UTC): a token enrolls one machine once"


class SharedTokens:
    """Join tokens in ``join_tokens``: what Enroll spends, at whichever replica it reaches."""

    def __init__(self, db: PgStoreDB) -> None:
        self.db = db

    def spend(self, secret_hash: str, now: float | None = None) -> TokenRecord:
        """The record of a valid token, now spent; TokenRefused when unknown, used or expired."""
        now = time.time() if now is None else now
        with self.db.connection() as conn:
            row = conn.execute(
                "UPDATE join_tokens SET spent_at = to_timestamp(%s)"
                " WHERE secret_hash = %s AND spent_at IS NULL AND expires_at >= to_timestamp(%s)"
                " RETURNING name, role, site, extract(epoch FROM expires_at)::float8,"
                " extract(epoch FROM created_at)::float8",
                (now, secret_hash, now),
            ).fetchone()
            if row is not None:
                return TokenRecord(str(row[0]), str(row[1]), str(row[2]), float(row[3]), float(row[4]))
            why = conn.execute(
                "SELECT name, extract(epoch FROM expires_at)::float8, extract(epoch FROM spent_at)::float8"
                " FROM join_tokens WHERE secret_hash = %s",
                (secret_hash,),
            ).fetchone()
        if why is None:
            raise TokenRefused("this join token is unknown to the coordinator (make one with `enroll`)")
        if why[2] is not None:
            raise TokenRefused(_spent_message(float(why[2])))
        ago = now - float(why[1])
        raise TokenRefused(f"the join token for {str(why[0])!r} expired {ago:.0f} s ago: make a new one")


class SharedRevocations:
    """The revoked names as this replica last read them (``TrustTables.follow`` keeps them current)."""

    def __init__(self) -> None:
        self.revoked: dict[str, float] = {}

    def refresh(self) -> None:
        """Nothing to do per call: the copy is kept current by ``TrustTables.follow``."""

    def refuses(self, principal: Principal) -> float | None:
        at = self.revoked.get(principal.name)
        if at is None or principal.issued is None:
            return None
        return at if principal.issued.timestamp() <= at else None


class SharedAssignments:
    """Node -> users as this replica last read them; changed only by the admin commands.

    ``assigned`` is what a refusal asks: a user assigned a moment ago at another replica (an admin's
    `assign` followed at once by the node's commit) is not refused for the FOLLOW_S the copy may lag.
    On a miss it reads the tables again, at most once per RECHECK_S, so a caller that is refused
    repeatedly costs one small query per interval, not one per call."""

    RECHECK_S = 0.1

    def __init__(self, reload: Callable[[], bool] | None = None) -> None:
        self.by_node: dict[str, frozenset[str]] = {}
        self.reload = reload
        self._rechecked = 0.0

    def users_of(self, node: str) -> frozenset[str]:
        return self.by_node.get(node, frozenset())

    def assigned(self, node: str, user: str) -> bool:
        if user in self.users_of(node):
            return True
        now = time.monotonic()
        if self.reload is None or now - self._rechecked < self.RECHECK_S:
            return False
        self._rechecked = now
        try:
            self.reload()
        except (psycopg.Error, StoreBusy) as err:
            log.warning("reading the assignments again for %r on %r: %s; using the copy", user, node, err)
        return user in self.users_of(node)

    def all(self) -> dict[str, list[str]]:
        return {node: sorted(users) for node, users in sorted(self.by_node.items()) if users}


class TrustTables:
    """A serving replica's view of the shared trust tables: tokens, and cached revocations and
    assignments. Built at start with a first full read, so no call is ever judged on an empty copy."""

    def __init__(self, db: PgStoreDB) -> None:
        self.db = db
        self.tokens = SharedTokens(db)
        self.revocations = SharedRevocations()
        self.assignments = SharedAssignments(self.load)
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._poked: asyncio.Event | None = None  # made in ``follow``, on the serving loop
        self.load()

    def poke(self) -> None:
        """Another replica (or an admin command) changed the tables: look now (notify.py calls it)."""
        if self._poked is not None:
            self._poked.set()

    def revoked_at(self, name: str) -> float | None:
        """When ``name`` was last revoked, read from the database now (enrollment's own check); the
        copy's answer when the database cannot be reached (its token is spent by then)."""
        try:
            with self.db.connection() as conn:
                row = conn.execute(
                    "SELECT extract(epoch FROM revoked_at)::float8 FROM revocations WHERE name = %s", (name,)
                ).fetchone()
        except (psycopg.Error, StoreBusy) as err:
            log.warning(
                "%s: reading the revocation of %r: %s; using this replica's copy", self.db.where, name, err
            )
            return self.revocations.revoked.get(name)
        return float(row[0]) if row else None

    def load(self) -> bool:
        """Read again whatever changed since the last look; whether anything did."""
        with self._lock, self.db.connection() as conn:
            versions = {str(k): int(v) for k, v in conn.execute("SELECT kind, version FROM trust_versions")}
            changed = False
            # The version is read before the rows: a write landing in between is read now and again
            # at the next look, never missed.
            if versions.get(REVOCATIONS) != self._seen.get(REVOCATIONS):
                rows = conn.execute(
                    "SELECT name, extract(epoch FROM revoked_at)::float8 FROM revocations"
                ).fetchall()
                self.revocations.revoked = {str(name): float(at) for name, at in rows}
                changed = True
            if versions.get(ASSIGNMENTS) != self._seen.get(ASSIGNMENTS):
                by_node: dict[str, set[str]] = {}
                for node, user in conn.execute("SELECT node, user_name FROM assignments"):
                    by_node.setdefault(str(node), set()).add(str(user))
                self.assignments.by_node = {node: frozenset(users) for node, users in by_node.items()}
                changed = True
            self._seen = versions
        return changed

    async def follow(self, every: float = FOLLOW_S) -> None:
        """Keep the copies current until cancelled; a failed look is logged and tried again."""
        failing = False
        self._poked = poked = asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poked.wait(), every)
            poked.clear()
            try:
                await asyncio.to_thread(self.load)
                if failing:
                    log.warning("%s: reading revocations and assignments again", self.db.where)
                failing = False
            except Exception as err:
                if not failing:
                    log.warning(
                        "%s: cannot read revocations and assignments (%s); keeping the last copy",
                        self.db.where,
                        err,
                    )
                failing = True


# -- what the admin commands write -----------------------------------------------------------------


@contextlib.contextmanager
def admin_transaction(db: PgStoreDB) -> Iterator[psycopg.Connection]:
    """The write section's session with a transaction open: the change and its audit record (appended
    by AuditLog over the same session, a savepoint inside) commit together or not at all."""
    with exclusive(db):
        conn = section_connection.get()
        assert conn is not None, "exclusive() sets the section's connection"
        with conn.transaction():
            yield conn


def _bump(conn: psycopg.Connection, kind: str) -> None:
    conn.execute("UPDATE trust_versions SET version = version + 1 WHERE kind = %s", (kind,))
    conn.execute("SELECT pg_notify(%s, %s)", (TRUST_CHANNEL, kind))  # delivered when this commits


def record_token(conn: psycopg.Connection, secret_hash: str, entry: TokenRecord) -> None:
    cutoff = entry.created_at - PURGE_AFTER  # spent or expired a week ago: forgotten, as the files are
    conn.execute(
        "DELETE FROM join_tokens WHERE spent_at < to_timestamp(%s) OR expires_at < to_timestamp(%s)",
        (cutoff, cutoff),
    )
    conn.execute(
        "INSERT INTO join_tokens (secret_hash, name, role, site, created_at, expires_at)"
        " VALUES (%s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s))"
        " ON CONFLICT (secret_hash) DO NOTHING",  # a resumed migrate copies it again: the first stays
        (secret_hash, entry.name, entry.role, entry.site, entry.created_at, entry.expires_at),
    )


def revoke(conn: psycopg.Connection, name: str, at: float) -> None:
    conn.execute(
        "INSERT INTO revocations (name, revoked_at) VALUES (%s, to_timestamp(%s))"
        " ON CONFLICT (name) DO UPDATE SET revoked_at = EXCLUDED.revoked_at",
        (name, at),
    )
    _bump(conn, REVOCATIONS)


def assign(conn: psycopg.Connection, user: str, node: str) -> bool:
    """True when the assignment is new."""
    added: Any = conn.execute(
        "INSERT INTO assignments (node, user_name) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING node",
        (node, user),
    ).fetchone()
    if added is not None:
        _bump(conn, ASSIGNMENTS)
    return added is not None


def unassign(conn: psycopg.Connection, user: str, node: str) -> bool:
    """True when there was such an assignment."""
    gone: Any = conn.execute(
        "DELETE FROM assignments WHERE node = %s AND user_name = %s RETURNING node", (node, user)
    ).fetchone()
    if gone is not None:
        _bump(conn, ASSIGNMENTS)
    return gone is not None
