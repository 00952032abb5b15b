"""The catalog's records in PostgreSQL: the same families, keys and values as the embedded store's
RocksDB (cachepoint/store/format.py), one row each in ``records``, behind the interface the catalog,
history, audit and event code already reads and writes through (``StoreDB``).

Writes that read first (the next version number, the audit chain's head, the next event position)
run inside the cluster's write section (coordinator/backends/section.py): one replica at a time
holds a PostgreSQL advisory lock, and its writes go over that same session, so a replica that lost
its session cannot write behind the next holder's back. Each batch is one transaction. A batch that
adds catalog events notifies every replica's listener (coordinator/backends/notify.py) in it.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool

from cachepoint.errors import StoreBusy
from cachepoint.store import format as fmt
from coordinator.backends import migrations

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "cachepoint_events"
PAGE = 1000  # rows a scan reads per query (keyset pages: no cursor is held between them)
POOL_MAX = 12  # the to_thread workers (min(32, cores + 4)) plus the event loop's own reads


class CatalogDatabaseDown(StoreBusy):
    """the catalog database {} cannot be reached: {}"""


# The connection of the write section this task (and the threads it hands work to) is in, if any.
section_connection: contextvars.ContextVar[psycopg.Connection | None] = contextvars.ContextVar(
    "section_connection", default=None
)


def redact(dsn: str) -> str:
    """A connection string fit for logs and messages: without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql://…"
    info.pop("password", None)
    host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
    return f"postgresql://{host}{':' + str(port) if port else ''}/{db}"


class PgBatch:
    """Puts and deletes in order; the last write to a key wins, as in a RocksDB write batch."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, bytes], bytes | None] = {}

    def put(self, key: bytes, value: bytes, handle: str) -> None:
        self.ops[(handle, bytes(key))] = bytes(value)

    def delete(self, key: bytes, handle: str) -> None:
        self.ops[(handle, bytes(key))] = None

    def __len__(self) -> int:
        return len(self.ops)


class PgFamily:
    """One family read like a rocksdict column family (the calls the coordinator's code makes)."""

    def __init__(self, db: PgStoreDB, name: str) -> None:
        self._db = db
        self.name = name

    def get(self, key: bytes | list[bytes]) -> Any:
        if isinstance(key, list):
            found = self._db.get_many(self.name, key)
            return [found.get(bytes(k)) for k in key]
        return self._db.get(self.name, key)

    def items(self, from_key: bytes | None = None, backwards: bool = False) -> Iterator[tuple[bytes, bytes]]:
        return self._db.range(self.name, from_key, backwards)

    def keys(self, from_key: bytes | None = None, backwards: bool = False) -> Iterator[bytes]:
        return (key for key, _ in self._db.range(self.name, from_key, backwards))


class PgStoreDB:
    """A StoreDB whose families live in PostgreSQL. ``root`` is the replica's own data directory
    (its announce file, its CA copy); nothing of the catalog is kept there."""

    journal = None
    shared = True  # other replicas write the same records: read, never remember, what they may change
    journaled = False  # no catalog journal: PostgreSQL's WAL (and its replicas) are the durability
    salvaged = ""
    writable = True

    def __init__(self, dsn: str, root: Path, pool_size: int = POOL_MAX) -> None:
        self.dsn = dsn
        self.where = redact(dsn)
        self.root = Path(root)
        self.path = self.root
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                migrations.migrate(conn, self.where)
        except psycopg.OperationalError as err:
            raise CatalogDatabaseDown(self.where, _first_line(err)) from err
        self.pool = psycopg_pool.ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            open=True,
            name="catalog",
            timeout=30,
        )
        self.cf = {name: PgFamily(self, name) for name in fmt.COLUMN_FAMILIES}
        self.handle = {name: name for name in fmt.COLUMN_FAMILIES}
        if self.get(fmt.CF_META, fmt.META_STORE_ID) is None:
            self._initialise()

    def _initialise(self) -> None:
        import secrets

        batch = self.batch()
        meta = fmt.CF_META
        batch.put(fmt.META_FORMAT_VERSION, fmt.u32(fmt.FORMAT_VERSION), meta)
        batch.put(fmt.META_STORE_ID, secrets.token_bytes(16), meta)
        batch.put(fmt.META_PREFILTER_SEED, fmt.u64(secrets.randbits(64)), meta)
        with self.connection() as conn, conn.transaction():
            # Two replicas starting on an empty database: the first one's identity stays.
            for (family, key), value in batch.ops.items():
                conn.execute(
                    "INSERT INTO records (family, key, value) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (family, key, value),
                )

    # -- connections -------------------------------------------------------------------------

    def connection(self) -> PooledOrSection:
        return PooledOrSection(self)

    def close(self) -> None:
        self.pool.close()

    # -- StoreDB's interface -----------------------------------------------------------------

    def batch(self) -> PgBatch:
        return PgBatch()

    def write(self, batch: Any, *, sync: bool = False, wal: bool = True) -> None:
        """One transaction; ``sync``/``wal`` are the server's business here (synchronous_commit)."""
        ops: dict[tuple[str, bytes], bytes | None] = batch.ops
        if not ops:
            return
        puts = [(family, key, value) for (family, key), value in ops.items() if value is not None]
        deletes = [(family, key) for (family, key), value in ops.items() if value is None]
        events = [fmt.read_u64(key) for family, key, _ in puts if family == fmt.CF_EVENTS]
        with self.connection() as conn, conn.transaction():
            cursor = conn.cursor()
            if puts:
                cursor.executemany(
                    "INSERT INTO records (family, key, value) VALUES (%s, %s, %s)"
                    " ON CONFLICT (family, key) DO UPDATE SET value = EXCLUDED.value",
                    puts,
                )
            if deletes:
                cursor.executemany("DELETE FROM records WHERE family = %s AND key = %s", deletes)
            if events:
                # Delivered at commit, to every replica's listener (notify.py), in commit order.
                cursor.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(max(events))))

    def flush(self, family: str) -> None:
        """Nothing to flush: every batch is committed when ``write`` returns."""

    def checkpoint_journal(self) -> None:
        """No journal to rewrite: deleted rows are gone from the table (VACUUM reclaims them)."""

    def journal_seq(self) -> int:
        return 0

    def get(self, family: str, key: bytes) -> bytes | None:
        with self.connection() as conn:
            row = conn.execute(
                "SELECT value FROM records WHERE family = %s AND key = %s", (family, bytes(key))
            ).fetchone()
        return bytes(row[0]) if row else None

    def get_many(self, family: str, keys: list[bytes]) -> dict[bytes, bytes]:
        if not keys:
            return {}
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT key, value FROM records WHERE family = %s AND key = ANY(%s)",
                (family, [bytes(k) for k in keys]),
            ).fetchall()
        return {bytes(k): bytes(v) for k, v in rows}

    def meta(self, key: bytes) -> bytes | None:
        return self.get(fmt.CF_META, key)

    def range(
        self, family: str, from_key: bytes | None, backwards: bool, prefix: bytes = b""
    ) -> Iterator[tuple[bytes, bytes]]:
        """Rows of a family in key order (descending with ``backwards``) from ``from_key`` on,
        read a page at a time; only keys starting with ``prefix``."""
        bound: bytes | None = from_key
        inclusive = True
        while True:
            clauses = ["family = %s"]
            params: list[Any] = [family]
            if prefix:
                clauses.append("key >= %s")
                params.append(prefix)
                end = _prefix_end(prefix)
                if end is not None:
                    clauses.append("key < %s")
                    params.append(end)
            if bound is not None:
                op = (">=" if inclusive else ">") if not backwards else ("<=" if inclusive else "<")
                clauses.append(f"key {op} %s")
                params.append(bound)
            order = "DESC" if backwards else "ASC"
            where = " AND ".join(clauses)
            query = f"SELECT key, value FROM records WHERE {where} ORDER BY key {order} LIMIT {PAGE}"
            with self.connection() as conn:
                rows = conn.execute(query, params).fetchall()  # type: ignore[arg-type]  # built from literals
            for key, value in rows:
                yield bytes(key), bytes(value)
            if len(rows) < PAGE:
                return
            bound, inclusive = bytes(rows[-1][0]), False

    def scan(self, family: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        return self.range(family, prefix or None, False, prefix)

    def scan_keys(self, family: str, prefix: bytes = b"") -> Iterator[bytes]:
        return (key for key, _ in self.scan(family, prefix))

    def last_key(self, family: str) -> bytes | None:
        with self.connection() as conn:
            row = conn.execute(
                "SELECT key FROM records WHERE family = %s ORDER BY key DESC LIMIT 1", (family,)
            ).fetchone()
        return bytes(row[0]) if row else None


class PooledOrSection:
    """The write section's connection when this context is in one, else one from the pool; a lost
    database becomes CatalogDatabaseDown (UNAVAILABLE to gRPC callers, who try another replica)."""

    def __init__(self, db: PgStoreDB) -> None:
        self._db = db
        self._pooled: Any = None

    def __enter__(self) -> psycopg.Connection:
        held = section_connection.get()
        if held is not None:
            return held
        try:
            self._pooled = self._db.pool.connection()
            return self._pooled.__enter__()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as err:
            self._pooled = None
            raise CatalogDatabaseDown(self._db.where, _first_line(err)) from err

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if self._pooled is not None:
            self._pooled.__exit__(kind, value, traceback)
        if isinstance(value, psycopg.OperationalError):
            raise CatalogDatabaseDown(self._db.where, _first_line(value)) from value


def _prefix_end(prefix: bytes) -> bytes | None:
    """The least key greater than every key starting with ``prefix`` (None: no such key)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
