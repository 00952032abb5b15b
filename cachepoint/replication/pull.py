"""Pull a version: resolve it at a catalog, plan the blocks missing here, fetch them from the nearest
sources, verify, and commit the version locally only when it is complete."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from cachepoint.errors import InvalidInput
from cachepoint.ids import Ref
from cachepoint.model import Chunking, Manifest, VersionInfo
from cachepoint.replication.arrivals import BlockArrivals
from cachepoint.replication.fetcher import Fetcher, FetchResult, ProgressFn, RoomFn
from cachepoint.replication.seed import Seed, SeedLoader
from cachepoint.replication.sources import Source, SourceClass
from cachepoint.replication.unitfetch import UnitFetchResult, fetch_by_units
from cachepoint.rpc import channel, replicas
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, fleet_pb2, fleet_pb2_grpc, version_pb2
from cachepoint.wire import manifest_digest, manifest_from_bytes, ref_to_pb, version_from_pb

# Seconds a pull waits, once announced, for the site's other pullers of the version to announce theirs:
# nodes told of a version by the same Watch event start within it of each other (a node that starts
# later still sees the earlier ones; they just do not count on it, and may fetch some of its share).
PULLERS_SETTLE = 1.0
PartialFn = Callable[[VersionInfo, frozenset[bytes] | None], None]


@dataclass
class PullResult:
    version: VersionInfo
    planned_blocks: int = 0  # blocks of the version that were missing here
    already_local: bool = False
    fetched: FetchResult = field(default_factory=FetchResult)
    units: UnitFetchResult | None = None  # a content-chunked version's unit fetch, when one ran
    sources: list[Source] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "ref": self.version.ref,
            "digest": self.version.digest_text,
            "already_local": self.already_local,
            "planned_blocks": self.planned_blocks,
            "fetched_blocks": self.fetched.blocks,
            "fetched_bytes": self.fetched.bytes,
            "bad_blocks": self.fetched.bad_blocks,
            "unit_fetch": self.units.as_json() if self.units is not None else None,
            "sources": [
                {
                    "name": s.name,
                    "address": s.address,
                    "class": str(s.source_class),
                    "blocks": s.counters.blocks,
                    "bytes": s.counters.bytes,
                    "failures": s.counters.failures,
                    "dropped": s.dropped or None,
                }
                for s in self.sources
            ],
        }


async def resolve(catalog: catalog_pb2_grpc.CatalogStub, ref: Ref) -> VersionInfo:
    request = catalog_pb2.ResolveRequest(ref=ref_to_pb(ref))
    return version_from_pb(await catalog.Resolve(request, timeout=UNARY_DEADLINE))


async def fetch_manifest(catalog: catalog_pb2_grpc.CatalogStub, info: VersionInfo, origin: str) -> bytes:
    """The serialized manifest of ``info``, checked against the version's digest."""
    request = catalog_pb2.GetManifestRequest(digest=info.manifest_digest)
    blob = await catalog.GetManifest(request, timeout=UNARY_DEADLINE)
    if manifest_digest(blob.manifest) != info.manifest_digest:
        raise InvalidInput(f"{origin} sent a manifest for {info.ref} that does not match its digest")
    return bytes(blob.manifest)


async def find_peers(ch: grpc.aio.Channel, node_id: str, info: VersionInfo, own_address: str) -> list[Source]:
    """Holders of the version, then holders of its parent, same site first (the fetcher orders them by
    class). A node one version behind holds most of the blocks of the next: its site's nodes take those
    from it instead of the WAN, and while the WAN is down they still can; what it lacks is asked of the
    next source. A catalog without Fleet (a plain peer) has none."""
    found = await _holders(ch, node_id, info.layer, info.number)
    if found is not None and info.parent:
        named = {source.name for source in found}
        parent_holders = await _holders(ch, node_id, info.layer, info.parent) or []
        for source in parent_holders:
            source.holds = f"{info.layer}@{info.parent}"
        found += [source for source in parent_holders if source.name not in named]
    return [source for source in found or [] if source.address != own_address]


async def site_pullers(
    ch: grpc.aio.Channel, node_id: str, info: VersionInfo, own_address: str
) -> list[Source]:
    """The other nodes of this site pulling ``info`` now, as partial holders (docs/design.md "Site
    fan-out"). This node announces its own pull, waits PULLERS_SETTLE for the site's other nodes that
    heard of the version at about the same moment to announce theirs, then asks who they are. The
    wait is paid once per pull that finds no complete holder in its site (a pull with one does not
    share: it takes everything from that holder). None for a catalog without Fleet."""
    try:
        if await _holders(ch, node_id, info.layer, info.number, pulling=True) is None:
            return []
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:  # not registered (yet): fetch alone
            return []
        raise
    await asyncio.sleep(PULLERS_SETTLE)
    found = await _holders(ch, node_id, info.layer, info.number, pulling=True) or []
    return [source for source in found if source.puller and source.address != own_address]


def site_budget(limits: dict[SourceClass, float] | None, pullers: int) -> dict[SourceClass, float] | None:
    """Each of a site's ``pullers`` of a version takes an equal part of the node's rates, so that
    ``wan_rate`` and ``site_rate`` hold for the site as a whole while they pull together (every node
    of a site is meant to have the same settings). A part is not given back when a puller finishes
    early: the last ones finish below the site's rate (the cost of not coordinating live)."""
    if not limits or pullers <= 1:
        return limits
    return {cls: rate / pullers for cls, rate in limits.items()}


async def _site_holds(ch: grpc.aio.Channel, node_id: str, info: VersionInfo) -> bool:
    """Whether a node of this site holds ``info`` complete (holders of its parent do not count: they
    lack its new blocks, which are what the site's pullers share)."""
    found = await _holders(ch, node_id, info.layer, info.number) or []
    return any(source.source_class == SourceClass.SITE for source in found)


async def _holders(
    ch: grpc.aio.Channel, node_id: str, layer: str, number: int, pulling: bool = False
) -> list[Source] | None:
    """Nodes holding ``layer@number`` complete (and with ``pulling``, this node's site peers pulling it
    too, marked ``puller``); None when the catalog has no Fleet service."""
    request = fleet_pb2.FindPeersRequest(
        requester_id=node_id, version=version_pb2.Ref(layer=layer, number=number), pulling=pulling
    )
    try:
        response = await fleet_pb2_grpc.FleetStub(ch).FindPeers(request, timeout=UNARY_DEADLINE)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise
    return [
        Source(
            p.node.node_id,
            p.node.address,
            SourceClass.SITE if p.same_site else SourceClass.PEER,
            puller=p.pulling,
            site=p.node.site,
        )
        for p in response.peers
    ]


async def pull(
    store: Store,
    ref: Ref,
    origin: str,
    *,
    node_id: str = "",
    own_address: str = "",
    progress: ProgressFn | None = None,
    extra_sources: list[Source] | None = None,
    limits: dict[SourceClass, float] | None = None,
    avoid: set[str] | frozenset[str] = frozenset(),
    account: Callable[[list[Source]], None] | None = None,
    room: RoomFn | None = None,
    origin_may_be_node: bool = False,
    node_origin: bool = False,
    share: bool = False,
    partial: PartialFn | None = None,
    arrivals: BlockArrivals | None = None,
    logged: bool = True,
) -> PullResult:
    """``avoid``: addresses of peers not to use (e.g. ones that recently sent corrupt blocks).
    ``account`` is handed the sources once the fetch ends, complete or not: their counters say what
    was fetched from each, and a pull that fails half-way has still moved those bytes.
    ``room``: asked before each batch is stored (see Fetcher); what it raises ends the pull, which
    unpins its blocks: a later GC may collect them, and the next pull fetches only what is missing.
    With TLS ``origin`` is checked as the coordinator (its certificate names the address dialled).
    ``origin_may_be_node``: the user named it (`pull --from`, "a coordinator or a peer"), so one whose
    certificate does not name the address is asked again as a node of the fleet (``node_origin``:
    checked for the name every node's certificate carries). Never for a daemon's own coordinator,
    where a node of the fleet at its address must not pass for it.
    ``share``: when no node of this site holds the version complete, share its WAN fetch with the
    site's other pullers of it (docs/design.md "Site fan-out"); False: fetch alone, as a CLI pull.
    ``arrivals``: told of each block a shared fetch stores, for the calls of site peers held open
    for them (the daemon's BlockExchange, cachepoint/replication/arrivals.py).
    ``logged``: blocks are written with the WAL, each durable as soon as it is written (config
    ``pull_wal = true``). False: written once, flushed every 16 MiB and before the commit
    (BlockStore.put_fetched): a killed pull then fetches its last few MiB again. Until a flush,
    only this process reads them (site peers are served from it), not another that opens the store."""
    origin = await replicas.reachable(origin, peer=node_origin)  # of several replicas, one that is up
    try:
        async with channel.channel(origin, peer=node_origin) as ch:
            catalog = catalog_pb2_grpc.CatalogStub(ch)
            info = await resolve(catalog, ref)
            tags = (ref.tag,) if ref.tag else ()
            if await asyncio.to_thread(store.catalog.has_version, info.layer, info.number):
                manifest_raw = await asyncio.to_thread(store.catalog.manifest_bytes, info.manifest_digest)
                await asyncio.to_thread(
                    store.catalog.import_version, info, PendingCommit(manifest_raw, {}), tags
                )
                return PullResult(info, already_local=True)
            manifest_raw = await fetch_manifest(catalog, info, origin)
            manifest = manifest_from_bytes(manifest_raw)
            # Pinned before asking what is missing: a GC in this process (the daemon's) then keeps
            # both the blocks found here and the ones fetched, until the version references them.
            pins = store.register_pins(info.layer)
            committed = False
            sharing: PartialFn | None = None
            shared = False  # with the site's other pullers
            # A content-chunked version's unit fetch needs the seed; it is placed from now on, while
            # the pull asks what is missing here and for the first unit digests.
            seeding = None
            if _units_apply(manifest):
                seeding = SeedLoader(Seed(store, manifest.unit_size), info.layer)
            try:
                block_ids = manifest.block_ids()
                store.pin(pins, block_ids)
                missing = await asyncio.to_thread(store.absent, sorted(block_ids), info.layer)
                sources = list(extra_sources or [])
                if missing:
                    peers = await find_peers(ch, node_id, info, own_address)
                    if node_id and share and not await _site_holds(ch, node_id, info):
                        shared = True
                        if partial is not None:
                            partial(info, frozenset(block_ids))
                            sharing = partial
                        pullers = await site_pullers(ch, node_id, info, own_address)
                        # One source per node (the fetcher keys what each lacked by name): a puller
                        # that also holds the parent is asked for its share only.
                        named = {source.name for source in pullers}
                        peers = [peer for peer in peers if peer.name not in named] + pullers
                        limits = site_budget(limits, len(pullers) + 1)
                    sources += [peer for peer in peers if peer.address not in avoid]
                sources.append(Source("origin", origin, SourceClass.ORIGIN, node_origin=node_origin))
                result = PullResult(info, planned_blocks=len(missing), sources=sources)
                try:
                    units = await fetch_by_units(
                        store, manifest, missing, sources, info, progress, limits, room, seeding, logged
                    )
                    if units is not None:
                        result.units, done = units
                        missing = [digest for digest in missing if digest not in done]
                        progress = _after(progress, len(done))
                    fetcher = Fetcher(
                        store,
                        sources,
                        progress,
                        limits=limits,
                        room=room,
                        block_size=manifest.block_size,
                        node_id=node_id,
                        unit_size=manifest.unit_size if manifest.chunking == Chunking.CONTENT else 0,
                        arrivals=arrivals if shared else None,
                        logged=logged,
                    )
                    result.fetched = await fetcher.fetch(missing, info.ref, version=info.ref)
                    if result.units is not None:  # the chunks assembled from units were fetched too
                        result.fetched.blocks += result.units.chunks + result.units.whole_blocks
                        result.fetched.bytes += result.units.bytes
                finally:
                    for source in sources:  # the fetcher closes them; not when the unit fetch failed
                        await source.close()
                    if account is not None:
                        account(sources)
                pending = PendingCommit(manifest_raw, {})
                if not logged:  # the version's blocks are durable before it is
                    await asyncio.to_thread(store.blocks.persist)
                await asyncio.to_thread(store.catalog.import_version, info, pending, tags)
                committed = True
            finally:
                if seeding is not None:  # a load not needed (nothing missing, a shared fetch) stops
                    await seeding.close()
                store.end_ingest(pins, committed=committed)
                if sharing is not None:  # committed, the catalog answers for it; failed, nobody asks
                    sharing(info, None)
            return result
    except grpc.RpcError as err:
        # (The handshake fails at the first call, Resolve: nothing was done yet.)
        if origin_may_be_node and not node_origin and _not_the_coordinators_name(err):
            return await pull(
                store,
                ref,
                origin,
                node_id=node_id,
                own_address=own_address,
                progress=progress,
                extra_sources=extra_sources,
                limits=limits,
                avoid=avoid,
                account=account,
                room=room,
                share=share,
                partial=partial,
                node_origin=True,
                logged=logged,
            )
        raise from_rpc_error(err, origin) from err


def _units_apply(manifest: Manifest) -> bool:
    return manifest.chunking == Chunking.CONTENT and manifest.unit_size > 0


def _after(progress: ProgressFn | None, done: int) -> ProgressFn | None:
    """The fetcher's progress, counted after the chunks a unit fetch already brought."""
    if progress is None or not done:
        return progress

    def report(fetched: int, total: int) -> None:
        progress(done + fetched, done + total)

    return report


def _not_the_coordinators_name(err: grpc.RpcError) -> bool:
    """With TLS: the origin's certificate does not name the address dialled (it is no coordinator)."""
    if channel.identity() is None or not isinstance(err, grpc.aio.AioRpcError):
        return False
    return err.code() == grpc.StatusCode.UNAVAILABLE and "Hostname Verification" in (err.details() or "")
