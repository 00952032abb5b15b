"""The coordinator daemon: wiring and lifecycle. Startup order: store, services, gRPC server, then the
REST server; shutdown reverses it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from cachepoint.errors import InvalidInput
from cachepoint.http.tls import check_plaintext_listen
from cachepoint.rpc.block_access import VersionBlocks
from cachepoint.rpc.block_exchange import BlockExchangeService, ServeCounters
from cachepoint.rpc.channel import ORIGIN_FETCH_LIMITS
from cachepoint.rpc.serving import Server, announce, stop_event_on_signals
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2_grpc, catalog_pb2_grpc, fleet_pb2_grpc, history_pb2_grpc
from coordinator.authz import Authorizer, block_answers, caller, layer_reader
from coordinator.backends.choice import Backend, replica_name
from coordinator.backends.section import WriteSection
from coordinator.catalog.events import EventLog
from coordinator.catalog.service import CatalogService
from coordinator.dashboard.view import Dashboard
from coordinator.fleet.registry import FleetRegistry, Registry
from coordinator.fleet.service import FleetService
from coordinator.history.audit import AuditLog
from coordinator.history.retention import Retention
from coordinator.history.rpc import HistoryService
from coordinator.history.service import History
from coordinator.metrics import CoordinatorMetrics
from coordinator.pki import state
from coordinator.pki.audit_queue import keep_draining
from coordinator.pki.trust import FleetTrust, TrustSettings

log = logging.getLogger("coordinator")
STATE_FILE = "coordinator.json"
CATALOG = "cachepoint.v1.Catalog"
SCHEDULED_GC_ACTOR = "coordinator (gc_every)"
HTTP_TLS_OPTION = "--http-tls"
LEASE_SLACK_S = 5.0
DEFAULT_NODE_EXPIRY_S = 30 * 86400.0
EXPIRY_CHECK_MAX_S = 3600.0  # how often silent nodes are looked for, at most


async def serve(
    data: Path,
    listen: str,
    stop: asyncio.Event | None = None,
    http: str = "",
    retention: Retention | None = None,
    gc_every: float = 0.0,
    trust_settings: TrustSettings | None = None,
    http_tls: bool = False,
    backend: Backend | None = None,
    node_expiry: float = DEFAULT_NODE_EXPIRY_S,
) -> None:
    """``trust_settings`` None: plaintext, as before the fleet had a CA. ``http_tls``: the REST API
    with TLS and the authorization table too (it needs the CA); without it, on loopback only.
    ``backend``: where the state lives (default: the embedded store in ``data``)."""
    if http and not http_tls:
        check_plaintext_listen(http, HTTP_TLS_OPTION)  # before anything is bound
    if http_tls and trust_settings is None:
        raise InvalidInput("--http-tls serves the REST API with the fleet's CA: serve with --tls too")
    backend = backend or Backend(data)
    store = backend.open()
    # What this process received is kept from GC for the grace period; shared blocks carry their own
    # age (the files' times, which every replica sees), so the memory of one replica is not needed.
    store.received_grace_s = 0.0 if backend.shared else backend.block_grace_s
    try:
        counters = ServeCounters()
        events = EventLog(store)
        audit = AuditLog(store.db)
        # Commits, tag moves, holds and the history GC, one at a time (across replicas when shared).
        writes = WriteSection(store.db)
        history = History(store, events, audit, writes, retention or Retention({}))
        # Tokens, revocations, assignments: DATA's files, or PostgreSQL's tables shared by the replicas.
        records = state.serving(data, store.db)
        trust = (
            FleetTrust(data, trust_settings, listen, records, audit) if trust_settings is not None else None
        )
        assignments = records.assignments
        authorizer = Authorizer(store, audit, assignments)
        metrics = CoordinatorMetrics(store, events, counters)
        if trust is not None:
            server = trust.main_server(listen, CATALOG, authorizer, metrics.rpc)
        else:
            log.warning("no CA: calls are not authenticated, and every caller may do everything")
            server = Server(listen, CATALOG, metrics=metrics.rpc)
        answerable = block_answers(VersionBlocks(store), authorizer.facts)
        server.add(
            lambda s: blocks_pb2_grpc.add_BlockExchangeServicer_to_server(
                BlockExchangeService(
                    store,
                    counters,
                    accepts_pushes=True,
                    fetch_limits=ORIGIN_FETCH_LIMITS,
                    answerable=answerable,
                ),
                s,
            )
        )
        server.add(
            lambda s: catalog_pb2_grpc.add_CatalogServicer_to_server(
                CatalogService(
                    store, events, audit, writes, layer_reader(authorizer.facts), metrics.committed
                ),
                s,
            )
        )
        registry = await fleet_registry(backend, store)
        metrics.watch(registry)
        fleet = FleetService(registry, assignments, caller, trust.revoked if trust is not None else None)
        server.add(lambda s: fleet_pb2_grpc.add_FleetServicer_to_server(fleet, s))
        server.add(lambda s: history_pb2_grpc.add_HistoryServicer_to_server(HistoryService(history), s))
        address = await server.start()
        rest: web.AppRunner | None = None
        scheduled: asyncio.Task[None] | None = None
        queued: asyncio.Task[None] | None = None
        listening: asyncio.Task[None] | None = None
        following: asyncio.Task[None] | None = None
        expiring: asyncio.Task[None] | None = None
        try:
            extra: dict[str, object] = {}
            if trust is not None:
                extra |= await trust.start()
            if http:
                from cachepoint.http.auth import Authenticator, HttpTrust
                from cachepoint.http.tls import ServerTls
                from coordinator.history.rest import start_rest
                from coordinator.history.rest_access import audited_refusals, rest_rules

                rest_trust = None
                if http_tls and trust is not None:
                    rest_trust = HttpTrust(
                        ServerTls(trust.tls.current, trust.settings.ca.cert_pem),
                        Authenticator(trust.settings.ca.cert_pem, trust.guard.revocations.refuses),
                        rest_rules(authorizer.facts),
                        audited_refusals(audit, store),
                    )
                board = Dashboard(registry, store, authorizer.facts.holds, audit, counters, time.time_ns())
                rest, extra["http"] = await start_rest(history, http, rest_trust, metrics, board)
            stop = stop or stop_event_on_signals()
            announce(
                address, data / STATE_FILE, role="coordinator", catalog_position=events.position, **extra
            )
            log.info("coordinator serving %s on %s", data, address)
            if backend.shared:
                from coordinator.backends.notify import listen

                where = f"catalog {backend_where(store)}"
                listening = asyncio.create_task(
                    listen(backend.catalog, events, where, records.changed), name="notifications"
                )
            if records.follow is not None:
                following = asyncio.create_task(records.follow(), name="trust records")
            if gc_every > 0:
                lease, actor = None, SCHEDULED_GC_ACTOR
                if backend.shared:  # one replica at a time; the audit log says which
                    holder = replica_name(str(address))
                    lease, actor = gc_lease(store, holder, gc_every), f"{SCHEDULED_GC_ACTOR} on {holder}"
                scheduled = asyncio.create_task(scheduled_gc(history, gc_every, lease, actor))
            if node_expiry > 0:
                expiring = asyncio.create_task(forget_silent_nodes(registry, node_expiry), name="node expiry")
            # What `enroll`, `revoke`, `assign` queued for the audit log (coordinator/pki/audit_queue.py).
            queued = asyncio.create_task(keep_draining(data, audit), name="audit queue")
            await stop.wait()
        finally:
            for task in (scheduled, queued, listening, following, expiring):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if rest is not None:
                await rest.cleanup()
            events.close()
            if trust is not None:
                await trust.stop()
            await server.stop()
            if not isinstance(registry, Registry):
                await registry.close()  # type: ignore[attr-defined]  # the shared one: its pending writes
    finally:
        store.close()


async def forget_silent_nodes(registry: FleetRegistry, expiry: float) -> None:
    """Forget, now and then, the nodes silent for ``expiry`` seconds: a fleet's registry would
    otherwise keep every machine that ever joined (a replaced laptop, a blade reinstalled under a
    new name), list them offline forever and count them in the metrics."""
    every = min(expiry / 4, EXPIRY_CHECK_MAX_S)
    while True:
        await asyncio.sleep(every)
        try:
            gone = await registry.forget_silent(time.time_ns() - int(expiry * 1e9))
        except Exception as err:  # a database that is away: the next round tries again
            log.warning("node expiry: %s", err)
            continue
        for node_id in gone:
            log.info("forgot node %r: no heartbeat for %s (node_expiry)", node_id, timedelta(seconds=expiry))


async def fleet_registry(backend: Backend, store: Store) -> FleetRegistry:
    """In memory (embedded), or the one the replicas share in PostgreSQL."""
    if not backend.shared:
        return Registry()
    from coordinator.fleet.shared import SharedRegistry  # psycopg only for a shared backend

    registry = SharedRegistry(backend.catalog, backend_where(store))
    await registry.start()
    return registry


def backend_where(store: Store) -> str:
    return str(getattr(store.db, "where", store.root))


def gc_lease(store: Store, holder: str, every: float) -> Callable[[], bool]:
    """Whether this replica runs the next scheduled GC: the one holding the lease (renewed each
    period, so it stays with one replica while that one lives)."""
    from coordinator.backends import lease

    # Renewed before and after each run; it outlasts two periods plus slack (a slow run, a late timer),
    # and after the holder dies another replica takes it within that.
    seconds = 2 * every + LEASE_SLACK_S

    def held() -> bool:
        return lease.take(store.db, lease.GC_LEASE, holder, seconds)  # type: ignore[arg-type]

    return held


async def scheduled_gc(
    history: History,
    every: float,
    lease: Callable[[], bool] | None = None,
    actor: str = SCHEDULED_GC_ACTOR,
) -> None:
    """The retention GC every ``every`` seconds, audited under the actor SCHEDULED_GC_ACTOR. A run
    that fails is logged and the next one tries again: the coordinator stays up. With replicas, only
    the one holding ``lease`` runs it."""
    while True:
        await asyncio.sleep(every)
        try:
            if lease is not None and not await asyncio.to_thread(lease):
                continue
            report = await history.collect(actor, dry_run=False)
            if lease is not None:
                await asyncio.to_thread(lease)
            log.info("scheduled gc: %d versions deleted", len(report.deleted))
        except Exception:
            log.exception("scheduled gc failed; the next one runs in %.0f s", every)
