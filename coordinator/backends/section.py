"""The catalog's write section: where commits, tag moves, holds, the retention GC and audit appends
read what is there and write what follows from it, one at a time across every replica.

Embedded, one process writes the store and an asyncio lock is the whole section. Shared, a replica
enters by taking PostgreSQL's advisory lock WRITE_LOCK on a session of its own and writes over that
same session (records.section_connection, inherited by the threads the section hands work to); a
replica that dies or loses its session loses the lock with it, and cannot write after losing it.
``lock_timeout`` bounds the wait behind a replica that hangs: the caller gets UNAVAILABLE and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg

from coordinator.backends.records import CatalogDatabaseDown, PgStoreDB, _first_line, section_connection

WRITE_LOCK = 0x63_70_77_72_74  # "cpwrt": pg_advisory_lock key of the write section
LOCK_TIMEOUT = "60s"


def _take(db: PgStoreDB) -> Any:
    """A pooled connection holding WRITE_LOCK (blocks this thread until it is granted)."""
    try:
        pooled = db.pool.connection()
        conn = pooled.__enter__()
    except Exception as err:
        raise CatalogDatabaseDown(db.where, _first_line(err)) from err
    try:
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        conn.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK,))
    except psycopg.Error as err:
        pooled.__exit__(type(err), err, None)
        raise CatalogDatabaseDown(db.where, f"waiting for the write section: {_first_line(err)}") from err
    return pooled, conn


def _give_back(held: Any) -> None:
    pooled, conn = held
    try:
        if not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK,))
    finally:
        pooled.__exit__(None, None, None)


@contextlib.contextmanager
def exclusive(db: Any) -> Iterator[None]:
    """The section, for code running in a thread (the audit log's appends); re-entrant: a caller
    already in the section (its task took ``WriteSection``) just goes on."""
    if not getattr(db, "shared", False) or section_connection.get() is not None:
        yield
        return
    held = _take(db)
    token = section_connection.set(held[1])
    try:
        yield
    finally:
        section_connection.reset(token)
        _give_back(held)


class WriteSection:
    """``async with section:`` around the work (handed to threads) that must not interleave with
    another writer's: the coordinator's catalog write lock, across replicas when the catalog is shared."""

    def __init__(self, db: Any) -> None:
        self._local = asyncio.Lock()  # one task of this replica at a time; PostgreSQL orders the replicas
        self._db: PgStoreDB | None = db if getattr(db, "shared", False) else None
        self._held: Any = None
        self._token: Any = None

    def locked(self) -> bool:
        return self._local.locked()

    async def __aenter__(self) -> None:
        await self._local.acquire()
        if self._db is None:
            return
        db = self._db
        taking = asyncio.ensure_future(asyncio.to_thread(_take, db))
        try:
            self._held = await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The thread may still be granted the lock: give it back before this replica's next
            # writer may enter (the local lock stays held until then).
            async def undo() -> None:
                try:
                    await asyncio.to_thread(_give_back, await taking)
                finally:
                    self._local.release()

            asyncio.ensure_future(undo())
            raise
        except BaseException:
            self._local.release()
            raise
        self._token = section_connection.set(self._held[1])

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._db is not None:
                section_connection.reset(self._token)
                held, self._held = self._held, None
                await asyncio.shield(asyncio.to_thread(_give_back, held))
        finally:
            self._local.release()
