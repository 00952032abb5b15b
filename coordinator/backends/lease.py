"""Leases in PostgreSQL: work that one replica does at a time (the scheduled retention GC). A lease is
taken when free or expired and renewed by its holder; a replica that dies lets it expire."""

from __future__ import annotations

from coordinator.backends.records import PgStoreDB

GC_LEASE = "retention-gc"


def take(db: PgStoreDB, name: str, holder: str, seconds: float) -> bool:
    """Whether ``holder`` holds ``name`` for the next ``seconds`` (taken or renewed)."""
    with db.connection() as conn:
        row = conn.execute(
            "INSERT INTO leases (name, holder, expires) VALUES (%s, %s, now() + %s * interval '1 second')"
            " ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires"
            " WHERE leases.expires < now() OR leases.holder = EXCLUDED.holder"
            " RETURNING holder",
            (name, holder, seconds),
        ).fetchone()
    return row is not None


def holder(db: PgStoreDB, name: str) -> str | None:
    with db.connection() as conn:
        row = conn.execute(
            "SELECT holder FROM leases WHERE name = %s AND expires > now()", (name,)
        ).fetchone()
    return str(row[0]) if row else None
