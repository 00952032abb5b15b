"""The PostgreSQL schema, as numbered migrations applied in order at start (and by `migrate`).

A migration is never edited once released: a change is a new one. Replicas starting at the same time
apply them one at a time under an advisory lock, and each is recorded in ``schema_migrations`` in the
same transaction as its statements, so a crash leaves the schema at a whole migration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from cachepoint.errors import IncompatibleFormat

log = logging.getLogger(__name__)

# pg_advisory_lock keys of this program (one bigint namespace per database).
MIGRATION_LOCK = 0x63_70_6D_69_67  # "cpmig"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "records",
        """
        -- Every record the embedded store keeps in a RocksDB column family, one row each: the same
        -- keys and values (cachepoint/store/format.py), so the catalog, history, audit and event
        -- code is one code path on both backends. bytea compares bytewise, as RocksDB's keys do.
        CREATE TABLE records (
            family text NOT NULL,
            key bytea NOT NULL,
            value bytea NOT NULL,
            PRIMARY KEY (family, key)
        );
        """,
    ),
    Migration(
        2,
        "leases",
        """
        -- Work one replica does at a time (the retention GC): held until it expires or is renewed.
        CREATE TABLE leases (
            name text PRIMARY KEY,
            holder text NOT NULL,
            expires timestamptz NOT NULL
        );
        """,
    ),
    Migration(
        3,
        "nodes",
        """
        -- The fleet registry the replicas share (coordinator/fleet/shared.py): one row per node.
        -- Times are the receiving replica's clock in ns since the epoch, as the in-memory registry
        -- keeps them. complete: refs "layer@N" held whole, sorted; pulling: {"layer@N": ns announced}.
        -- Heartbeats (every node every 2 s) rewrite last_seen_ns and load only, mostly with complete
        -- unchanged: neither is indexed and pages keep room (fillfactor), so those updates are HOT
        -- (no index entries written), which is what lets 10,000 nodes heartbeat.
        CREATE TABLE nodes (
            node_id text PRIMARY KEY,
            site text NOT NULL,
            address text NOT NULL,
            registered_ns bigint NOT NULL,
            last_seen_ns bigint NOT NULL,
            load integer NOT NULL DEFAULT 0,
            complete text[] NOT NULL DEFAULT '{}',
            pulling jsonb NOT NULL DEFAULT '{}',
            report jsonb
        ) WITH (fillfactor = 70);
        -- FindPeers: the holders of one ref (then filtered by health, ordered by site and load).
        CREATE INDEX nodes_complete ON nodes USING gin (complete);
        -- FindPeers(pulling): the nodes of the requester's site (then filtered by the ref pulled).
        CREATE INDEX nodes_site ON nodes (site);
        """,
    ),
    Migration(
        4,
        "fleet trust",
        """
        -- What every replica must agree on about the fleet's members (coordinator/backends/
        -- trust_tables.py): join tokens, revocations, user assignments. The CA's key and certificate
        -- stay files each replica is given. Times are the writer's clock, as the embedded files keep them.
        CREATE TABLE join_tokens (
            secret_hash text PRIMARY KEY,  -- SHA-256 of the token's secret in hex; the secret is never kept
            name text NOT NULL,
            role text NOT NULL,
            site text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            spent_at timestamptz  -- NULL until the one enrollment that spends it
        );
        CREATE TABLE revocations (
            name text PRIMARY KEY,
            revoked_at timestamptz NOT NULL  -- certificates of name issued up to here are refused
        );
        CREATE TABLE assignments (
            node text NOT NULL,
            user_name text NOT NULL,
            assigned_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (node, user_name)
        );
        -- Bumped in the transaction of every change to revocations or assignments: replicas poll this
        -- one small table and read the other again only when its row moved.
        CREATE TABLE trust_versions (
            kind text PRIMARY KEY,
            version bigint NOT NULL
        );
        INSERT INTO trust_versions (kind, version) VALUES ('revocations', 0), ('assignments', 0);
        """,
    ),
)

LATEST = MIGRATIONS[-1].version


def applied(conn: psycopg.Connection) -> int:
    """The schema version of the database (0: none of ours)."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection, where: str) -> list[int]:
    """Bring the schema up to LATEST; returns the versions applied. Refuses a database whose schema
    is newer than this program (an older replica must not write to a newer schema)."""
    done: list[int] = []
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        with conn.transaction():
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        current = applied(conn)
        if current > LATEST:
            raise IncompatibleFormat(
                where, current, list(range(1, LATEST + 1)), "the schema is newer: upgrade the coordinator"
            )
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            with conn.transaction():
                conn.execute(migration.sql)  # type: ignore[arg-type]  # our own literal text
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            log.warning("%s: applied schema migration %d (%s)", where, migration.version, migration.name)
            done.append(migration.version)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return done
