"""The cachepoint daemon: wiring and lifecycle.

Startup: store, gRPC server for peers (BlockExchange, the Catalog reads, health), the Agent for local
commands on a server of its own on STORE/agent.sock (never on the network: rpc/agent_socket.py),
then background tasks started in one place: the fleet heartbeat and one follower per subscription.
If a task dies the daemon stops; shutdown reverses startup.

A subscription (``os/win10:production``) is kept current through the coordinator's Watch stream:
on every (re)connection the follower first pulls whatever the ref names now, then pulls again on
each event that moves it. Missed events are caught up from the last position seen; no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from cachepoint import __version__, memory
from cachepoint.blocks import DEFAULT_BLOCK_SIZE
from cachepoint.blocksource import BlockSource, TieredSource
from cachepoint.blocksource.recode import Recoder
from cachepoint.capture.engine import CaptureOptions, CaptureReport, capture
from cachepoint.capture.watch import WatchOptions, WatchSpec, watch_in_thread
from cachepoint.disk.exports import Disks
from cachepoint.disk.nbd import NbdLimits, check_exposure
from cachepoint.errors import CachepointError, InvalidInput, NotFound, PullIncomplete, PullsPaused
from cachepoint.ids import LATEST, Ref
from cachepoint.metrics.node import NodeMetrics
from cachepoint.model import Manifest, VersionInfo
from cachepoint.replication import outbox
from cachepoint.replication.arrivals import BlockArrivals
from cachepoint.replication.fetcher import Fetcher
from cachepoint.replication.gate import PullGate
from cachepoint.replication.heal import HealResult, heal_blocks
from cachepoint.replication.pull import PullResult, fetch_manifest, find_peers, pull, resolve
from cachepoint.replication.sources import Source, SourceClass
from cachepoint.rpc import channel, replicas
from cachepoint.rpc.agent import AgentService
from cachepoint.rpc.agent_socket import AgentServer
from cachepoint.rpc.block_access import VersionBlocks, peer_answers
from cachepoint.rpc.block_exchange import BlockExchangeService, ServeCounters
from cachepoint.rpc.catalog_read import CatalogReadService
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.rpc.serving import Server, announce, stop_event_on_signals
from cachepoint.scrub import DEFAULT_EVERY, DEFAULT_RATE, ProgressFn, ScrubProgress, ScrubResult, scrub
from cachepoint.scrub import schedule as scrub_schedule
from cachepoint.store import format as fmt
from cachepoint.store.headroom import DEFAULT_RESERVE, ensure_reserve
from cachepoint.store.space import SpaceLimit
from cachepoint.store.store import Store
from cachepoint.trust.fleet_view import VIEW_FILE, FleetView
from cachepoint.trust.guard import Guard
from cachepoint.trust.location import STORE_IDENTITY
from cachepoint.trust.node import daemon_identity, keep_renewed, names
from cachepoint.trust.peer_authz import PeerAuthorizer, peer_reader
from cachepoint.v1 import (
    agent_pb2_grpc,
    blocks_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
)
from cachepoint.wire import manifest_from_bytes

if TYPE_CHECKING:
    from cachepoint.http.auth import HttpTrust

log = logging.getLogger("cachepoint.daemon")
STATE_FILE = "daemon.json"
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
HEARTBEAT_BACKOFF_MAX = 4.0
REGISTER_WAIT = 5.0
SUSPECT_SECONDS = 600.0
LAZY_FETCH_TIMEOUT = 120.0  # a read waiting on the network longer than this fails with EIO
SCRUB_STOP_WAIT = 10.0  # at shutdown, a scrub's batch in flight is waited for this long at most


@dataclass
class DaemonSettings:
    store: Path
    listen: str = "127.0.0.1:7401"
    """HOST:PORT of this node's gRPC server (peers fetch blocks here; port 0 picks one)."""
    coordinator: str = ""
    """HOST:PORT of the coordinator; empty: serve the local store alone (a laptop offline)."""
    site: str = "default"
    """Locality label: peers of one site fetch from each other before crossing the WAN."""
    node_id: str = ""
    """Name of this node in the fleet. Default: host name and store id."""
    subscribe: list[str] = field(default_factory=list)
    """Refs to keep current, e.g. os/win10:production."""
    limits: dict[SourceClass, float] = field(default_factory=dict)
    """Bytes per second per class of source (see replication/ratelimit.py)."""
    site_fanout: bool = True
    """Share the WAN fetch of a version with the site's other pullers of it (docs/design.md)."""
    pull_wal: bool = False
    """Log each pulled block as it lands (replication/pull.py ``logged``); False: written once."""
    nbd: str = ""
    """HOST:PORT for NBD exports of attached disks, e.g. 127.0.0.1:10809 (empty: no TCP NBD)."""
    nbd_socket: str = ""
    """Unix socket path for NBD exports (empty: none)."""
    nbd_tls: bool = False
    """NBD over TCP requires TLS with a client certificate of the fleet (cachepoint/disk/nbd_access.py);
    without it, ``nbd`` must be a loopback address."""
    http: str = ""
    """HOST:PORT for HTTP (versions' files and images' disks, with Range); empty: no HTTP."""
    http_tls: bool = False
    """Serve HTTP with TLS under the node's identity, clients authenticated (cachepoint/http/auth.py);
    False: plaintext, on loopback only."""
    snapshot_every: float = 0.0
    """Seconds between scheduled snapshots of attached user disks with new writes (0: none)."""
    read_cache: int = 1 << 30
    """Bytes of decoded blocks kept for attached disks (cachepoint/disk/readcache.py; 0: none)."""
    hot_codec: bool = True
    """Blocks the disks and the HTTP reader decode from zstd a second time are re-stored in lz4
    (cachepoint/blocksource/recode.py)."""
    nbd_limits: NbdLimits = field(default_factory=NbdLimits)
    """What the NBD server may hold in memory, and how long a client may stall mid-request."""
    watches: list[WatchSpec] = field(default_factory=list)
    """Directories kept captured into their user layers (cachepoint/capture/watch.py)."""
    watch_interval: float = 5.0
    """Seconds between looks at each watched directory."""
    watch_debounce: float = 2.0
    """Seconds a watched directory must stay unchanged before it is captured."""
    scrub_every: float = DEFAULT_EVERY
    """Seconds between scrubs of the store (0: none; see cachepoint/scrub.py)."""
    scrub_rate: float = DEFAULT_RATE
    """Stored bytes a scrub reads per second (0: unlimited)."""
    min_free: SpaceLimit = field(default_factory=lambda: SpaceLimit.parse("5%", "min_free"))
    """Pulls stop while less than this is free on the store's file system (cachepoint/replication/gate.py)."""
    reserve: int = DEFAULT_RESERVE
    """Bytes held back in STORE/reserve for GC on a full disk (cachepoint/store/headroom.py)."""
    agent_group: str = ""
    """Group whose members may use the Agent socket (mode 0660); empty: the daemon's user only (0600)."""


@dataclass
class SubscriptionState:
    ref: Ref
    wanted: int = 0
    held: int = 0
    state: str = "starting"
    last_error: str = ""


@dataclass
class SourceTotals:
    blocks: int = 0
    bytes: int = 0
    failures: int = 0
    corrupt: int = 0  # sources dropped for a block that failed verification


class Daemon:
    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self.address = ""
        self.node_id = settings.node_id
        self.connected = False
        self.catalog_position = 0
        self.peers_known = 0
        self.serve_counters = ServeCounters()
        self.sources: dict[str, SourceTotals] = {}
        self.subscriptions = [SubscriptionState(Ref.parse(text)) for text in settings.subscribe]
        self._pull_lock = asyncio.Lock()  # one pull at a time: two would fetch the same blocks
        self.outbox_wakeup = asyncio.Event()
        self.registered = asyncio.Event()
        # Set by a call that learns the coordinator does not know this node (a replica took over):
        # the heartbeat registers at once rather than after its interval.
        self.heartbeat_now = asyncio.Event()
        # Peers that sent a corrupt block, and until when (monotonic seconds) they are not asked again.
        self.suspects: dict[str, float] = {}
        self.delivered = 0
        # Captures run on worker threads (Agent calls, watches): one at a time, so two of the same layer
        # cannot both take its next version number.
        self.capture_lock = threading.Lock()
        self._scrub_lock = asyncio.Lock()  # one scrub pass at a time, scheduled or asked for
        self.scrub_stop = asyncio.Event()
        self.scrub_progress: ScrubProgress | None = None
        self.gate: PullGate | None = None  # set once the store is open
        # With TLS: the revocations and assignments the coordinator's heartbeat replies hand out, which
        # the peer port applies (cachepoint/trust/fleet_view.py); its guard ends revoked open calls.
        self.fleet_view = FleetView()
        self.peer_guard: Guard | None = None
        self.version_blocks: VersionBlocks | None = None  # what the peer port answers for, with TLS
        self.arrivals = BlockArrivals()  # blocks of a shared pull as they land, for site peers' calls
        self.metrics = NodeMetrics()  # served at /metrics by the HTTP server (cachepoint/metrics/node.py)
        self.metrics.attach(self)

    # -- pulls ---------------------------------------------------------------------------------

    async def pull(self, ref: Ref, progress: object = None) -> PullResult:
        assert self.store is not None
        assert self.gate is not None
        async with self._pull_lock:
            started = time.monotonic()
            try:
                result = await pull(
                    self.store,
                    ref,
                    self.settings.coordinator,
                    node_id=self.node_id,
                    own_address=self.address,
                    progress=progress,  # type: ignore[arg-type]
                    limits=self.settings.limits,
                    avoid=self._avoided(),
                    account=self._account,  # a pull that fails half-way is counted too
                    room=self.gate.check,
                    share=self.settings.site_fanout,  # with the site's other pullers (docs/design.md)
                    partial=self._partial,
                    arrivals=self.arrivals,
                    logged=self.settings.pull_wal,
                )
            except PullsPaused as err:
                self.metrics.pulled("failed", time.monotonic() - started)
                self.gate.note_paused(err)
                await asyncio.to_thread(self.gate.settle)
                raise
            except BaseException:
                self.metrics.pulled("failed", time.monotonic() - started)
                raise
        outcome = "already_local" if result.already_local else "fetched"
        self.metrics.pulled(outcome, time.monotonic() - started)
        self.peers_known = max(self.peers_known, sum(1 for s in result.sources if s.name != "origin"))
        if not result.already_local:
            log.info(
                "pulled %s: %d blocks from %s",
                result.version.ref,
                result.fetched.blocks,
                ", ".join(f"{s.name}={s.counters.blocks}" for s in result.sources),
            )
        return result

    def _partial(self, info: VersionInfo, ids: frozenset[bytes] | None) -> None:
        if self.version_blocks is not None:
            self.version_blocks.pulling(info.layer, info.number, ids)

    async def open_remote(self, ref: Ref) -> tuple[VersionInfo, Manifest, BlockSource]:
        """Resolve ``ref`` at the coordinator for a lazy boot: the version, its manifest, and the
        fleet as a blocking source of its blocks (called from the disk's reader threads)."""
        coordinator = await replicas.reachable(self.settings.coordinator)
        async with channel.channel(coordinator) as ch:
            catalog = catalog_pb2_grpc.CatalogStub(ch)
            try:
                info = await resolve(catalog, ref)
                manifest_raw = await fetch_manifest(catalog, info, coordinator)
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err, coordinator) from err
        manifest = manifest_from_bytes(manifest_raw)

        def fetch(ids: list[bytes]) -> Awaitable[dict[bytes, bytes]]:
            return self._fetch_for(info, ids, manifest.block_size)

        loop = asyncio.get_running_loop()
        return info, manifest, TieredSource(fetch, loop, LAZY_FETCH_TIMEOUT, manifest.block_size)

    async def _fetch_for(self, info: VersionInfo, ids: list[bytes], block_size: int) -> dict[bytes, bytes]:
        """The verified stored values of ``ids`` that some source had (peers first, then the origin)."""
        origin = await replicas.reachable(self.settings.coordinator)
        async with channel.channel(origin) as ch:
            peers = await find_peers(ch, self.node_id, info, self.address)
        avoided = self._avoided()
        sources = [p for p in peers if p.address not in avoided]
        sources.append(Source("origin", origin, SourceClass.ORIGIN))
        got: dict[bytes, bytes] = {}
        try:
            fetcher = Fetcher(
                self.store,  # type: ignore[arg-type]
                sources,
                limits=self.settings.limits,
                block_size=block_size,
                keep=got.update,
            )
            await fetcher.fetch(ids, info.ref, version=info.ref)
        except PullIncomplete as err:  # what no source had is missing: the reader names the block
            log.warning("lazy fetch for %s: %s", info.ref, err)
        finally:
            self._account(sources)
        return got

    def _account(self, sources: list[Source]) -> None:
        """Add a fetch's per-source counters to the daemon's totals, and avoid for a while every
        peer that sent a corrupt block (the origin is never avoided: it is the last resort)."""
        for source in sources:
            if source.sent_corrupt and source.source_class != SourceClass.ORIGIN:
                self.suspects[source.address] = time.monotonic() + SUSPECT_SECONDS
                log.warning("avoiding peer %s for %.0fs: %s", source.address, SUSPECT_SECONDS, source.dropped)
            self.metrics.fetched(source)
            totals = self.sources.setdefault(str(source.source_class), SourceTotals())
            totals.blocks += source.counters.blocks
            totals.bytes += source.counters.bytes
            totals.failures += source.counters.failures
            totals.corrupt += int(source.sent_corrupt)

    def _avoided(self) -> set[str]:
        now = time.monotonic()
        self.suspects = {address: until for address, until in self.suspects.items() if until > now}
        return set(self.suspects)

    def held_refs(self) -> list[tuple[str, int]]:
        assert self.store is not None
        return [(v.layer, v.number) for v in self.store.catalog.all_versions()]

    # -- scrub -----------------------------------------------------------------------------------

    async def heal(self, digests: list[bytes]) -> HealResult:
        """Fetch ``digests`` again from the fleet over the bad local copies (site peers first)."""
        assert self.store is not None
        result = await heal_blocks(
            self.store,
            digests,
            self.settings.coordinator,
            node_id=self.node_id,
            own_address=self.address,
            avoid=self._avoided(),
            limits=self.settings.limits,
        )
        self._account(result.sources)
        return result

    async def scrub(self, rate: float | None = None, progress: ProgressFn | None = None) -> ScrubResult:
        """One scrub pass, healing from the fleet; ``rate`` None: the configured scrub_rate."""
        assert self.store is not None

        def track(now: ScrubProgress) -> None:
            self.scrub_progress = now
            if progress is not None:
                progress(now)

        async with self._scrub_lock:
            try:
                result = await scrub(
                    self.store,
                    rate=self.settings.scrub_rate if rate is None else rate,
                    heal=self.heal,
                    progress=track,
                    stop=self.scrub_stop,
                )
                self.metrics.scrubbed(result)
                return result
            finally:
                self.scrub_progress = None

    # -- background tasks ------------------------------------------------------------------------

    async def _heartbeat_request(self) -> fleet_pb2.HeartbeatRequest:
        assert self.store is not None
        held = await asyncio.to_thread(self.held_refs)
        request = fleet_pb2.HeartbeatRequest(
            node_id=self.node_id, load=min(self.serve_counters.blocks_served // 1000, 2**31)
        )
        for layer, number in held:
            request.complete.add(layer=layer, number=number)
        # For the coordinator's dashboard; the outbox count reads the store again (one scan of the
        # versions' keys per heartbeat, as held_refs does).
        report = request.report
        report.software = __version__
        report.outbox_depth = await asyncio.to_thread(outbox.depth, self.store)
        for name, totals in sorted(self.sources.items()):
            report.sources.add(source_class=name, blocks=totals.blocks, bytes=totals.bytes)
        for sub in self.subscriptions:
            report.subscriptions.add(ref=str(sub.ref), wanted=sub.wanted, held=sub.held, state=sub.state)
        return request

    async def report_inventory(self) -> None:
        """Tell the coordinator at once that a version is complete here, so that the next peer of
        this site that asks for it is sent here rather than across the WAN. Best effort: the regular
        heartbeat repeats it."""
        try:
            request = await self._heartbeat_request()
            reply = await replicas.call(
                self.settings.coordinator,
                lambda ch, _: fleet_pb2_grpc.FleetStub(ch).Heartbeat(request, timeout=UNARY_DEADLINE),
            )
            self.apply_fleet_view(reply)
        except grpc.aio.AioRpcError as err:
            log.info("could not report inventory now: %s", err.details())
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                self.heartbeat_now.set()

    def apply_fleet_view(self, reply: fleet_pb2.HeartbeatResponse) -> None:
        if not self.fleet_view.apply(reply):
            return
        if self.peer_guard is not None:
            self.peer_guard.close_revoked()
        disks: Disks | None = getattr(self, "disks", None)  # made by run()
        if disks is not None and disks.server is not None:
            disks.server.close_refused()  # NBD clients revoked since they attached

    async def heartbeat(self) -> None:
        backoff = BACKOFF_START
        registered = False
        interval = 2.0
        while True:  # a renewed certificate or a replica that is down: the channel is made again
            async with channel.channel(await replicas.reachable(self.settings.coordinator)) as ch:
                fleet = fleet_pb2_grpc.FleetStub(ch)
                made_with = channel.generation()
                while made_with == channel.generation():
                    try:
                        if not registered:
                            node = fleet_pb2.NodeInfo(
                                node_id=self.node_id, site=self.settings.site, address=self.address
                            )
                            response = await fleet.Register(
                                fleet_pb2.RegisterRequest(node=node), timeout=UNARY_DEADLINE
                            )
                            interval = max(response.heartbeat_interval_ms / 1000, 0.2)
                            registered = True
                            self.registered.set()
                        reply = await fleet.Heartbeat(await self._heartbeat_request(), timeout=UNARY_DEADLINE)
                        self.apply_fleet_view(reply)
                        if not self.connected:
                            self.outbox_wakeup.set()  # back online: deliver what waited
                        self.connected = True
                        backoff = BACKOFF_START
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.heartbeat_now.wait(), interval)
                        self.heartbeat_now.clear()
                    except grpc.aio.AioRpcError as err:
                        if err.code() == grpc.StatusCode.NOT_FOUND:
                            registered = False  # the coordinator restarted and forgot us
                            continue
                        self.connected = False
                        registered = False
                        # Heartbeats are cheap: retry often, so a returning coordinator sees us quickly.
                        await asyncio.sleep(backoff * (1 + random.random() / 2))
                        backoff = min(backoff * 2, HEARTBEAT_BACKOFF_MAX)
                        break  # pick a replica again (rpc/replicas.py): this one may be gone

    async def deliver(self) -> None:
        """Drain the outbox whenever there may be something to send; retry with backoff while the
        coordinator is away (the outbox itself is durable: it is the store's own state)."""
        assert self.store is not None
        backoff = BACKOFF_START
        self.outbox_wakeup.set()  # versions made while the daemon was down
        while True:
            try:
                await asyncio.wait_for(
                    self.outbox_wakeup.wait(), timeout=backoff if backoff > BACKOFF_START else None
                )
            except TimeoutError:
                pass
            self.outbox_wakeup.clear()
            try:
                self.delivered += len(await outbox.drain(self.store, self.settings.coordinator))
                backoff = BACKOFF_START
            except (grpc.aio.AioRpcError, CachepointError) as err:
                detail = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
                log.warning(
                    "outbox: %s; %d versions wait, retrying in %.1fs",
                    detail,
                    outbox.depth(self.store),
                    backoff,
                )
                backoff = min(max(backoff, 1.0) * 2, BACKOFF_MAX)

    async def scheduled_snapshots(self) -> None:
        """Every ``snapshot_every`` seconds, freeze each attached user disk that has new writes."""
        while True:
            await asyncio.sleep(self.settings.snapshot_every)
            for name, disk in list(self.disks.attached.items()):
                if disk.working is None or not disk.working.entries:
                    continue
                try:
                    info = await self.disks.snapshot(name, "scheduled snapshot", "cachepoint", self.node_id)
                    log.info("scheduled snapshot of %s: %s", name, info.ref)
                    self.outbox_wakeup.set()
                except CachepointError as err:
                    log.warning("scheduled snapshot of %s failed: %s", name, err)

    def capture(
        self, layer: str, root: Path, message: str, author: str, force: bool = False, block_size: int = 0
    ) -> CaptureReport:
        """A file-level capture into ``layer`` (blocking: call it on a worker thread)."""
        assert self.store is not None
        options = CaptureOptions(
            layer=layer,
            root=root,
            message=message,
            author=author or "cachepoint",
            device=self.node_id,
            force=force,
            new_layer_block_size=block_size or DEFAULT_BLOCK_SIZE,
        )
        with self.capture_lock:
            return capture(self.store, options)

    async def watch(self, spec: WatchSpec) -> None:
        """Keep ``spec.root`` captured; new versions go to the outbox. A failing capture is logged
        and retried at the next look, never fatal to the daemon."""
        loop = asyncio.get_running_loop()

        def capture_now() -> CaptureReport:
            report = self.capture(spec.layer, spec.root, f"watch of {spec.root}", "cachepoint")
            if not report.unchanged:
                log.info("watch: %s captured as %s", spec.root, report.ref)
                loop.call_soon_threadsafe(self.outbox_wakeup.set)
            return report

        def on_error(err: Exception) -> None:
            log.warning("watch of %s: %s; trying again", spec.root, err)

        options = WatchOptions(self.settings.watch_interval, self.settings.watch_debounce)
        await watch_in_thread(spec.root, capture_now, options, on_error, self.settings.store)

    def _moves(self, sub: SubscriptionState, event: catalog_pb2.CatalogEvent) -> bool:
        which = event.WhichOneof("event")
        if which == "tag_moved":
            return event.tag_moved.layer == sub.ref.layer and event.tag_moved.tag == (sub.ref.tag or LATEST)
        return False

    async def _sync(self, sub: SubscriptionState) -> None:
        sub.state = "pulling"
        result = await self.pull(sub.ref)
        sub.wanted = sub.held = result.version.number  # before the report, which says what is held
        if not result.already_local:
            await self.report_inventory()
        sub.state = "current"  # once the coordinator knows (site peers asking now are sent here)
        sub.last_error = ""

    async def follow(self, sub: SubscriptionState) -> None:
        backoff = BACKOFF_START
        position = 0
        with contextlib.suppress(TimeoutError):
            # FindPeers needs to know this node's site: let the first Register land (bounded).
            await asyncio.wait_for(self.registered.wait(), REGISTER_WAIT)
        while True:
            try:
                try:
                    await self._sync(sub)
                except PullsPaused as err:
                    # Not an error to back off from: wait for space, then plan again (only what is missing).
                    sub.state = "paused"
                    sub.last_error = str(err)
                    assert self.gate is not None
                    await self.gate.wait_for_room()
                    continue
                except NotFound as err:
                    # Nothing published under this ref yet: not an error to retry, just wait for it.
                    sub.state = "waiting for a first version"
                    sub.last_error = str(err)
                if sub.ref.number is not None and sub.state == "current":
                    return  # a fixed version never moves
                # After a disconnect, from ``position`` again, on whichever replica is up.
                async with channel.channel(await replicas.reachable(self.settings.coordinator)) as ch:
                    catalog = catalog_pb2_grpc.CatalogStub(ch)
                    stream = catalog.Watch(catalog_pb2.WatchRequest(after=position, layers=[sub.ref.layer]))
                    backoff = BACKOFF_START
                    async for event in stream:
                        position = max(position, event.position)
                        self.catalog_position = max(self.catalog_position, event.position)
                        if self._moves(sub, event):
                            sub.wanted = event.tag_moved.number
                            await self._sync(sub)
            except PullsPaused as err:  # a pull on a moved tag, inside the Watch stream
                sub.state = "paused"
                sub.last_error = str(err)
                assert self.gate is not None
                await self.gate.wait_for_room()
            except (grpc.aio.AioRpcError, CachepointError) as err:
                sub.state = "waiting"
                sub.last_error = str(err.details() if isinstance(err, grpc.aio.AioRpcError) else err)
                log.warning("subscription %s: %s; retrying in %.1fs", sub.ref, sub.last_error, backoff)
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX)

    # -- lifecycle -------------------------------------------------------------------------------

    def http_trust_check(self) -> Callable[..., HttpTrust] | None:
        """Refuse an HTTP setting that cannot be served (plaintext off loopback, TLS without an
        identity); what makes the HTTP server's trust once the store is open, or None: plaintext."""
        if not self.settings.http:
            return None
        from cachepoint.http import tls

        if not self.settings.http_tls:
            tls.check_plaintext_listen(self.settings.http, "--http-tls (config: http_tls = true)")
            return None
        identity = daemon_identity()
        if identity is None:
            raise InvalidInput(
                f"--http-tls serves HTTP on {self.settings.http} with this node's identity, and "
                f"{self.settings.store / STORE_IDENTITY} has none: enroll first (`cachepoint enroll`)"
            )
        from cachepoint.http.access import UsersOf, route_rules
        from cachepoint.http.auth import Authenticator, HttpTrust, Revoked

        def trust(
            store: Store, node: str, revoked: Revoked | None = None, users_of: UsersOf | None = None
        ) -> HttpTrust:
            # ``revoked`` and ``users_of``: the fleet's revocations and assignments as this node
            # knows them. Without them a revoked principal's certificate is served until it expires
            # (cert_lifetime) and its tokens until theirs (--ttl), and only this node reads as a node.
            return HttpTrust(
                tls.ServerTls(identity.current, identity.ca_pem),
                Authenticator(identity.ca_pem, revoked),
                route_rules(store, node, users_of),
            )

        return trust

    async def run(self, stop: asyncio.Event | None = None) -> None:
        http_trust = self.http_trust_check()  # before anything is bound
        memory.keep_reply_buffers()  # replies reuse freed heap instead of faulting in new pages
        if self.settings.nbd:
            check_exposure(self.settings.nbd, self.settings.nbd_tls)  # before anything binds
        if self.settings.nbd_tls and daemon_identity() is None:
            raise InvalidInput(
                "--nbd-tls serves the node's certificate, and this daemon has none: enroll it first "
                f"(`cachepoint enroll`, which keeps it in {self.settings.store / STORE_IDENTITY})"
            )
        # A new store gets a directory no other user may write, whatever the umask: it holds the agent socket.
        self.settings.store.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.store = Store.open(self.settings.store, writable=True, create=True)
        ensure_reserve(self.settings.store, self.settings.reserve)
        self.gate = PullGate(self.store, self.settings.min_free, self.settings.reserve)
        store_id = (self.store.db.meta(fmt.META_STORE_ID) or b"").hex()[:8]
        identity = daemon_identity()
        if identity is not None:
            self.node_id, self.settings.site = names(identity, self.node_id, self.settings.site, "default")
        self.node_id = self.node_id or f"{os.uname().nodename}-{store_id}"
        credentials = identity.server_credentials() if identity is not None else None
        interceptors: list[grpc.aio.ServerInterceptor] = []
        users_of = self.fleet_view.users_of
        if identity is not None:
            self.fleet_view = FleetView(self.settings.store / VIEW_FILE)
            users_of = self.fleet_view.users_of
            self.peer_guard = Guard(self.fleet_view)
            interceptors = [self.peer_guard, PeerAuthorizer(users_of)]
        server = Server(
            self.settings.listen,
            "cachepoint.v1.BlockExchange",
            credentials,
            interceptors,
            node=True,
            metrics=self.metrics.rpc,
        )
        store = self.store
        self.version_blocks = VersionBlocks(store)
        blocks = BlockExchangeService(
            store,
            self.serve_counters,
            accepts_pushes=False,
            fetch_limits=channel.NODE_FETCH_LIMITS,
            answerable=peer_answers(self.version_blocks, users_of),
            arrivals=self.arrivals,
        )
        catalog = CatalogReadService(store, peer_reader(users_of))
        server.add(lambda s: blocks_pb2_grpc.add_BlockExchangeServicer_to_server(blocks, s))
        server.add(lambda s: catalog_pb2_grpc.add_CatalogServicer_to_server(catalog, s))
        tasks: list[asyncio.Task[None]] = []
        remote = self.open_remote if self.settings.coordinator else None
        gate = self.gate
        recoder = (
            Recoder(store, lambda: gate is None or gate.paused is None) if self.settings.hot_codec else None
        )
        self.disks = Disks(store, remote, read_cache=self.settings.read_cache, recoder=recoder)
        agent = AgentServer(
            self.settings.store,
            lambda s: agent_pb2_grpc.add_AgentServicer_to_server(AgentService(self), s),
            self.settings.agent_group,
            self.metrics.rpc,
        )
        http_runner = None
        extra: dict[str, object] = {}
        try:
            self.address = await server.start()
            extra["agent"] = str(await agent.start())
            if self.settings.nbd or self.settings.nbd_socket:
                nbd_tls = None
                if self.settings.nbd_tls and identity is not None:
                    from cachepoint.disk.nbd_access import nbd_tls as make_nbd_tls

                    # The fleet's revocations and assignments as this node's heartbeats brought them.
                    nbd_tls = make_nbd_tls(
                        identity,
                        self.node_id,
                        self.disks.layers_of,
                        lambda principal: self.fleet_view.refuses(principal),
                        lambda node: self.fleet_view.users_of(node),
                    )
                extra["nbd"] = await self.disks.serve(
                    self.settings.nbd or None,
                    self.settings.nbd_socket or None,
                    self.settings.nbd_limits,
                    nbd_tls,
                    self.metrics.nbd.observe,
                )
            if self.settings.http:
                from cachepoint.http.app import start_http
                from cachepoint.http.objects import Resolver

                await self.disks.open_cache()
                resolver = Resolver(store, source=self.disks.local_source(), attached=self.disks.lazy_version)
                trust = None
                if http_trust is not None:
                    # The view heartbeats update in place (the identity's, made above): not a copy.
                    view = self.fleet_view
                    trust = http_trust(store, self.node_id, view.refuses, view.users_of)
                http_runner, extra["http"] = await start_http(
                    store, self.settings.http, trust=trust, resolver=resolver, metrics=self.metrics
                )
            stop = stop or stop_event_on_signals()
            if self.settings.scrub_every > 0:
                task = scrub_schedule(store, self.settings.scrub_every, self.scrub)
                tasks.append(asyncio.create_task(task, name="scrub"))
            if self.settings.snapshot_every > 0:
                tasks.append(asyncio.create_task(self.scheduled_snapshots(), name="snapshots"))
            for spec in self.settings.watches:
                tasks.append(asyncio.create_task(self.watch(spec), name=f"watch {spec.root}"))
            if self.settings.coordinator:
                tasks.append(asyncio.create_task(self.heartbeat(), name="heartbeat"))
                tasks.append(asyncio.create_task(self.deliver(), name="outbox"))
                tasks.append(asyncio.create_task(self.gate.watch(), name="space"))
                for sub in self.subscriptions:
                    tasks.append(asyncio.create_task(self.follow(sub), name=f"follow {sub.ref}"))
                if identity is not None:
                    renewal = keep_renewed(identity, self.settings.coordinator)
                    tasks.append(asyncio.create_task(renewal, name="renew"))
            announce(
                self.address,
                self.settings.store / STATE_FILE,
                role="cachepoint",
                node_id=self.node_id,
                site=self.settings.site,
                **extra,
            )
            stopper = asyncio.create_task(stop.wait(), name="stop")
            pending = {stopper, *tasks}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    break
                for task in done:
                    if task.exception() is not None:
                        log.error("task %s died: %r; stopping", task.get_name(), task.exception())
                        raise task.exception()  # type: ignore[misc]
            stopper.cancel()
        finally:
            self.scrub_stop.set()  # a pass asked for over the Agent stops at its next batch
            await agent.stop()  # no local command starts while the rest stops
            for task in reversed(tasks):
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if http_runner is not None:
                await http_runner.cleanup()
            await self.disks.close()
            await server.stop()
            with contextlib.suppress(TimeoutError):  # the store must not close under a scrub's read
                await asyncio.wait_for(self._scrub_lock.acquire(), SCRUB_STOP_WAIT)
            with contextlib.suppress(OSError):
                (self.settings.store / STATE_FILE).unlink()
            self.store.close()
