"""The fleet registry that coordinator replicas share, in PostgreSQL's ``nodes`` table (migration 3 in
coordinator/backends/migrations.py): a node that registers and heartbeats through one replica is found
by FindPeers, listed and shown by every other.

Heartbeats are the load: every node every 2 s, 5,000 a second at 10,000 nodes. Their answer does not
depend on their write, so a replica keeps the latest heartbeat of each node in memory and writes all
of them every FLUSH_S in one UPDATE over UNNESTed arrays (one statement, one round trip, one commit),
instead of a transaction per heartbeat. The cost: another replica sees a heartbeat up to FLUSH_S late,
well inside the 6 s a node may go unheard before it is called stale. A flush that fails (the database
restarted) keeps what it had, and the next one writes it with what came since.

Registrations and pull announcements are written at once (a node's next call may reach another
replica). FindPeers reads the healthy holders of a ref through the GIN index on ``complete`` and
keeps them HOLDERS_CACHE_S, by site and load, so the many nodes of a rollout asking for one ref cost
one read a second per replica; a site's pullers are read through the index on ``site``, the
listings read the table. Health is judged against this replica's clock, as the heartbeat times were
written by the replicas' clocks: replicas keep their clocks in step (NTP), as TLS already requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool

from coordinator.backends.records import CatalogDatabaseDown
from coordinator.fleet.registry import (
    PULLING_TTL_NS,
    STALE_AFTER_NS,
    Node,
    NodeReport,
    SubscriptionLag,
    UnknownNode,
)

log = logging.getLogger(__name__)

FLUSH_S = 0.25  # heartbeats are written this often, all at once
# How long a replica answers FindPeers for a ref from the holders it last read. A rollout is the hot
# case: thousands of nodes ask for the same ref within seconds, and every one of them would otherwise
# read all its holders (10,000 rows when all hold it) to pick 64. The cost: a node that just completed
# the ref is offered up to this much (plus FLUSH_S) later by the other replicas; the replica that
# writes its heartbeat drops the answer at once (``_note_grown``). Health is checked again at each
# answer.
HOLDERS_CACHE_S = 1.0
HOLDERS_CACHED = 256  # refs kept at most (a rollout concerns a few)
SITE_CACHE_S = 60.0  # how long a replica trusts the site it read for a node (it changes on re-registration)
POOL_MAX = 4  # the registry's own connections, apart from the catalog's pool
CONNECT_S = 10.0  # how long a call waits for a connection before it is answered UNAVAILABLE

_NODE_COLUMNS = "node_id, site, address, registered_ns, last_seen_ns, load, complete, pulling, report"

_FLUSH = """
UPDATE nodes AS n SET
    last_seen_ns = u.seen,
    load = u.load,
    complete = u.complete,
    pulling = n.pulling - u.complete,
    report = coalesce(u.report, n.report)
FROM (
    SELECT b.node_id, b.seen, b.load, b.report,
        ARRAY(SELECT jsonb_array_elements_text(b.complete)) AS complete
    FROM unnest(%s::text[], %s::bigint[], %s::integer[], %s::jsonb[], %s::jsonb[])
        AS b(node_id, seen, load, complete, report)
) AS u
WHERE n.node_id = u.node_id
RETURNING n.node_id
"""

# The requester's site, read in the same statement (one round trip).
_REQUESTER_SITE = "(SELECT site FROM nodes WHERE node_id = %(requester)s)"

# Every healthy holder of a ref, least loaded first: what a replica keeps for HOLDERS_CACHE_S.
_HOLDERS = """
SELECT node_id, site, address, registered_ns, last_seen_ns, load FROM nodes
WHERE complete @> ARRAY[%(ref)s]::text[] AND last_seen_ns > %(fresh)s
ORDER BY load, node_id COLLATE "C"
"""

_ANY_HEALTHY = f"""
SELECT {_NODE_COLUMNS}, site = {_REQUESTER_SITE} FROM nodes
WHERE node_id <> %(requester)s AND last_seen_ns > %(fresh)s
ORDER BY site IS DISTINCT FROM {_REQUESTER_SITE}, load, node_id COLLATE "C"
LIMIT %(limit)s
"""

_PULLERS = f"""
SELECT {_NODE_COLUMNS} FROM nodes
WHERE site = {_REQUESTER_SITE} AND node_id <> %(requester)s AND last_seen_ns > %(fresh)s
    AND NOT complete @> ARRAY[%(ref)s]::text[] AND (pulling ->> %(ref)s)::bigint > %(recent)s
ORDER BY node_id COLLATE "C"
"""


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def report_json(report: NodeReport) -> str:
    return json.dumps(
        {
            "software": report.software,
            "outbox_depth": report.outbox_depth,
            "sources": [list(source) for source in report.bytes_by_source],
            "subscriptions": [[s.ref, s.wanted, s.held, s.state] for s in report.subscriptions],
        }
    )


def report_from(data: Any) -> NodeReport:
    if not data:
        return NodeReport()
    return NodeReport(
        software=str(data.get("software", "")),
        outbox_depth=int(data.get("outbox_depth", 0)),
        bytes_by_source=tuple((str(c), int(b), int(n)) for c, b, n in data.get("sources", ())),
        subscriptions=tuple(
            SubscriptionLag(str(r), int(w), int(h), str(s)) for r, w, h, s in data.get("subscriptions", ())
        ),
    )


def _node(row: tuple[Any, ...]) -> Node:
    node_id, site, address, registered_ns, last_seen_ns, load, complete, pulling, report = row
    return Node(
        node_id,
        site,
        address,
        registered_ns,
        last_seen_ns,
        load,
        set(complete),
        {ref: int(at) for ref, at in (pulling or {}).items()},
        report_from(report),
    )


# A heartbeat waiting to be written: (seen, refs held complete, load, report JSON).
_Heartbeat = tuple[int, list[str], int, str | None]


@dataclass(frozen=True, slots=True)
class _Holders:
    read_at: float  # time.monotonic()
    ordered: list[Node]  # healthy holders by (load, node id), without their holdings
    by_site: dict[str, list[Node]]  # the same, by site


def _holders(rows: list[tuple[Any, ...]], read_at: float) -> _Holders:
    ordered = [
        Node(node_id, site, address, reg, seen, load) for node_id, site, address, reg, seen, load in rows
    ]
    by_site: dict[str, list[Node]] = {}
    for node in ordered:
        by_site.setdefault(node.site, []).append(node)
    return _Holders(read_at, ordered, by_site)


class SharedRegistry:
    """A FleetRegistry over PostgreSQL (``dsn``: the catalog's). ``start`` opens it and starts the
    flusher; ``close`` writes what is pending and closes it."""

    def __init__(self, dsn: str, where: str, flush_s: float = FLUSH_S) -> None:
        self.where = where
        self.flush_s = flush_s
        self.pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=1, max_size=POOL_MAX, kwargs={"autocommit": True}, open=False, name="registry"
        )
        # node id -> (seen ns, sorted complete, load, report as JSON or None): the last heartbeat of each
        # node not written yet.
        self.pending: dict[str, _Heartbeat] = {}
        self.known: set[str] = set()  # registered: not asked again (until a flush finds the row gone)
        self._flusher: asyncio.Task[None] | None = None
        self._holders: dict[str, _Holders] = {}
        # A ref whose holders grew in a heartbeat this replica wrote: a cached answer read before
        # then is stale (the next puller of a site would go past its new holder to the origin).
        self._grown: dict[str, float] = {}  # ref -> time.monotonic() of the write
        self._reading: dict[str, asyncio.Future[_Holders]] = {}  # one read per ref at a time
        self._sites: dict[str, tuple[str, float]] = {}  # node id -> (site, when read)
        self.flushed = 0  # heartbeats written, for the logs and the benchmark

    async def start(self) -> None:
        await self.pool.open(wait=True, timeout=30)
        self._flusher = asyncio.create_task(self._keep_flushing(), name="registry flush")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        with contextlib.suppress(Exception):
            await self.flush()
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; a lost database is CatalogDatabaseDown (UNAVAILABLE: the node's call
        goes to another replica, or is tried again)."""
        try:
            async with self.pool.connection(timeout=CONNECT_S) as conn:
                yield conn
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as err:
            raise CatalogDatabaseDown(self.where, first_line(err)) from err

    # -- writes --------------------------------------------------------------------------------

    async def register_node(self, node_id: str, site: str, address: str) -> None:
        now = time.time_ns()
        async with self._connection() as conn:
            # Registering again keeps what the node held and was pulling, as in memory.
            await conn.execute(
                "INSERT INTO nodes (node_id, site, address, registered_ns, last_seen_ns)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (node_id) DO UPDATE SET site = EXCLUDED.site,"
                " address = EXCLUDED.address, registered_ns = EXCLUDED.registered_ns,"
                " last_seen_ns = EXCLUDED.last_seen_ns",
                (node_id, site, address, now, now),
            )
        self.pending.pop(node_id, None)  # older than the registration
        self.known.add(node_id)
        self._sites[node_id] = (site, time.monotonic())

    async def record_heartbeat(
        self, node_id: str, complete: set[str], load: int, report: NodeReport | None
    ) -> None:
        if node_id not in self.known:
            async with self._connection() as conn:
                cursor = await conn.execute("SELECT 1 FROM nodes WHERE node_id = %s", (node_id,))
                if await cursor.fetchone() is None:
                    raise UnknownNode(node_id)
            self.known.add(node_id)
        previous = self.pending.get(node_id)
        # A heartbeat without a report keeps the last one (also one still waiting to be written).
        text = report_json(report) if report is not None else previous[3] if previous else None
        self.pending[node_id] = (time.time_ns(), sorted(complete), load, text)

    async def record_pulling(self, node_id: str, ref: str) -> None:
        now = time.time_ns()
        async with self._connection() as conn:
            # Pulls announced longer ago than PULLING_TTL_NS are dropped as the new one is added.
            cursor = await conn.execute(
                "UPDATE nodes SET pulling = coalesce((SELECT jsonb_object_agg(key, value)"
                " FROM jsonb_each(pulling) WHERE value::bigint > %s::bigint), '{}')"
                " || jsonb_build_object(%s::text, %s::bigint)"
                " WHERE node_id = %s",
                (now - PULLING_TTL_NS, ref, now, node_id),
            )
            if cursor.rowcount == 0:
                raise UnknownNode(node_id)

    async def flush(self) -> int:
        """Write the pending heartbeats in one statement; returns how many."""
        if not self.pending:
            return 0
        batch, self.pending = self.pending, {}
        ids = sorted(batch)  # one order for every replica: two flushes never wait on each other in a cycle
        rows = [batch[node_id] for node_id in ids]
        try:
            async with self._connection() as conn:
                cursor = await conn.execute(
                    _FLUSH,
                    (
                        ids,
                        [row[0] for row in rows],
                        [row[2] for row in rows],
                        [json.dumps(row[1]) for row in rows],
                        [row[3] for row in rows],
                    ),
                )
                written = {row[0] for row in await cursor.fetchall()}
        except BaseException:
            for node_id, row in batch.items():  # what came since is newer: it stays
                self.pending.setdefault(node_id, row)
            raise
        self.flushed += len(written)
        self._note_grown(batch, written)
        # Rows gone (the table was restored from before they registered): their next heartbeat is
        # refused, and the node registers again, as after a restart of an embedded coordinator.
        self.known.difference_update(set(ids) - written)
        return len(written)

    def _note_grown(self, batch: dict[str, _Heartbeat], written: set[str]) -> None:
        """Refs whose cached holders lack a node that just reported holding them complete."""
        now = time.monotonic()
        cached_ids: dict[str, set[str]] = {}
        for node_id in written:
            for ref in batch[node_id][1]:
                cached = self._holders.get(ref)
                if cached is None:
                    continue
                if ref not in cached_ids:
                    cached_ids[ref] = {node.node_id for node in cached.ordered}
                if node_id not in cached_ids[ref]:
                    self._grown[ref] = now
        for ref in [r for r, at in self._grown.items() if now - at > HOLDERS_CACHE_S]:
            del self._grown[ref]  # older than any answer still cached

    async def _keep_flushing(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception as err:  # the database restarted or is unreachable: the next flush tries again
                log.warning("%s: heartbeats not written yet (%s); trying again", self.where, err)

    # -- reads ---------------------------------------------------------------------------------

    async def _fetch(self, query: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            cursor = await conn.execute(query, params)  # type: ignore[arg-type]  # our own literals
            return await cursor.fetchall()

    async def find_holders(self, requester_id: str, ref: str | None, limit: int) -> list[tuple[Node, bool]]:
        now = time.time_ns()
        if ref is None:  # any healthy node: rare, read as asked
            params = {"requester": requester_id, "fresh": now - STALE_AFTER_NS, "limit": limit or None}
            rows = await self._fetch(_ANY_HEALTHY, params)
            return [(_node(row[:-1]), bool(row[-1])) for row in rows]
        site = await self._site_of(requester_id)
        holders = await self._holders_of(ref)
        wanted = limit or len(holders.ordered)
        same_site = holders.by_site.get(site, []) if site is not None else []
        found = [(n, True) for n in same_site if n.node_id != requester_id and n.healthy(now)][:wanted]
        for node in holders.ordered:
            if len(found) >= wanted:
                break
            if node.site != site and node.node_id != requester_id and node.healthy(now):
                found.append((node, False))
        return found

    async def _site_of(self, node_id: str) -> str | None:
        cached = self._sites.get(node_id)
        if cached is not None and time.monotonic() - cached[1] < SITE_CACHE_S:
            return cached[0]
        rows = await self._fetch("SELECT site FROM nodes WHERE node_id = %(node)s", {"node": node_id})
        if not rows:
            return None
        self._sites[node_id] = (str(rows[0][0]), time.monotonic())
        return str(rows[0][0])

    async def _holders_of(self, ref: str) -> _Holders:
        cached = self._holders.get(ref)
        fresh = cached is not None and time.monotonic() - cached.read_at < HOLDERS_CACHE_S
        if cached is not None and fresh and cached.read_at > self._grown.get(ref, float("-inf")):
            return cached
        reading = self._reading.get(ref)
        if reading is None:  # the first asker reads; the others wait for its answer
            reading = asyncio.ensure_future(self._read_holders(ref))
            self._reading[ref] = reading
            reading.add_done_callback(lambda _: self._reading.pop(ref, None))
        return await asyncio.shield(reading)

    async def _read_holders(self, ref: str) -> _Holders:
        started = time.monotonic()  # its answer is as old as the read, not as its end
        rows = await self._fetch(_HOLDERS, {"ref": ref, "fresh": time.time_ns() - STALE_AFTER_NS})
        holders = _holders(rows, started)
        if len(self._holders) >= HOLDERS_CACHED:
            oldest = min(self._holders, key=lambda r: self._holders[r].read_at)
            del self._holders[oldest]
        self._holders[ref] = holders
        read_at = time.monotonic()
        for node in holders.ordered:
            self._sites[node.node_id] = (node.site, read_at)
        return holders

    async def find_pullers(self, requester_id: str, ref: str) -> list[Node]:
        now = time.time_ns()
        params = {
            "requester": requester_id,
            "fresh": now - STALE_AFTER_NS,
            "ref": ref,
            "recent": now - PULLING_TTL_NS,
        }
        return [_node(row) for row in await self._fetch(_PULLERS, params)]

    async def list_nodes(self) -> list[Node]:
        return [_node(row) for row in await self._fetch(f"SELECT {_NODE_COLUMNS} FROM nodes", {})]

    async def forget_silent(self, before_ns: int) -> list[str]:
        """Delete the rows of nodes last heard from before ``before_ns`` (every replica may run it:
        a row two replicas delete goes once); returns their ids."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM nodes WHERE last_seen_ns < %s RETURNING node_id", (before_ns,)
            )
            gone = sorted(str(row[0]) for row in await cursor.fetchall())
        # As for rows a flush finds gone: a forgotten node's next heartbeat is refused (NOT_FOUND),
        # and it registers again.
        self.known.difference_update(gone)
        for node_id in gone:
            self._sites.pop(node_id, None)
        return gone

    async def count_by_state(self) -> Counter[tuple[str, str]]:
        async with self._connection() as conn:
            cursor = await conn.execute("SELECT site, last_seen_ns FROM nodes")
            rows = await cursor.fetchall()
        fresh = time.time_ns() - STALE_AFTER_NS
        return Counter((site, "healthy" if seen > fresh else "stale") for site, seen in rows)
