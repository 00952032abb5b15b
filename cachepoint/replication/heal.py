"""Heal: fetch given blocks again from the fleet and write the verified copies over the bad local ones.

The scrub calls it for the blocks it found corrupt or unreadable; `cachepoint repair` may call it for
any list of ids. Sources are found as a pull finds them (cachepoint/replication/pull.py): the
coordinator is asked which nodes hold the versions that use the blocks (peers of this node's site
first, then other peers), and the coordinator itself is the last resort. The fetcher verifies every
block against its id before it writes it, so a bad copy is only ever replaced by a good one.

Overwriting works for both kinds of damage. A value that rotted below RocksDB (its checksums hold,
its SHA-256 does not) is simply replaced. A value inside a data block that RocksDB refuses (a
checksum mismatch in an SST file) cannot be replaced in place: the new value is a newer entry of
the same key, in the memtable and then a new SST, and every read finds it first, so the block reads
well again at once. The damaged data block stays in its old SST file, though, and RocksDB must read
it to compact that file: measured with rocksdict 0.3.29, `compact_range` (GC runs one
after it deletes blocks) or an automatic compaction that picks that file fails with the same
"block checksum mismatch", and the database then refuses every write, to any column family, until it
is reopened (a background error); reads go on working. Reopening clears the error and the next
compaction of that file fails again. Only dropping the SST file ends it: RocksDB's repair
(`Rdict.repair`) moves the whole file to db/lost/ (all of its blocks, not just the damaged one),
after which those blocks are missing and can be fetched again with this function. That is the job of
`cachepoint repair`, offline; heal_blocks does not attempt it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from cachepoint.errors import BlockCorrupt, BlockMissing, BlockUnreadable, CachepointError, PullIncomplete
from cachepoint.ids import BlockId
from cachepoint.model import VersionInfo
from cachepoint.replication.fetcher import Fetcher
from cachepoint.replication.pull import find_peers
from cachepoint.replication.sources import Source, SourceClass
from cachepoint.rpc import channel, replicas
from cachepoint.store.store import Store

log = logging.getLogger("cachepoint.replication")

# Versions whose holders are asked for (the ones using the most of the blocks first): a block in
# hundreds of versions needs a few holders, not hundreds of FindPeers calls.
MAX_VERSIONS_ASKED = 8


@dataclass
class HealResult:
    healed: list[bytes] = field(default_factory=list)  # now read back verified from the store
    missing: list[bytes] = field(default_factory=list)  # no source gave a good copy: still bad here
    sources: list[Source] = field(default_factory=list)  # with their counters (blocks, bytes per source)
    detail: str = ""  # why some are missing

    def by_class(self) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for source in self.sources:
            if source.counters.blocks:
                entry = totals.setdefault(str(source.source_class), {"blocks": 0, "bytes": 0})
                entry["blocks"] += source.counters.blocks
                entry["bytes"] += source.counters.bytes
        return totals


def versions_using(store: Store, digests: Iterable[bytes]) -> list[VersionInfo]:
    """Versions whose manifests name any of ``digests``, those naming the most first (bounded)."""
    wanted = set(digests)
    by_manifest: dict[bytes, list[VersionInfo]] = {}
    for info in store.catalog.all_versions():
        by_manifest.setdefault(info.manifest_digest, []).append(info)
    ranked: list[tuple[int, VersionInfo]] = []
    for digest, infos in by_manifest.items():
        try:
            hits = len(store.catalog.manifest(digest).block_ids() & wanted)
        except (CachepointError, ValueError):  # a damaged manifest is fsck's to report, not ours
            continue
        if hits:
            ranked.append((hits, max(infos, key=lambda i: (i.layer, i.number))))
    ranked.sort(key=lambda pair: -pair[0])
    return [info for _, info in ranked[:MAX_VERSIONS_ASKED]]


async def _peers(
    ch: grpc.aio.Channel, versions: list[VersionInfo], node_id: str, own_address: str, avoid: Iterable[str]
) -> list[Source]:
    avoided = set(avoid)
    nearest: dict[str, Source] = {}
    for info in versions:
        for peer in await find_peers(ch, node_id, info, own_address):
            known = nearest.get(peer.address)
            if peer.address not in avoided and (known is None or peer.source_class < known.source_class):
                nearest[peer.address] = peer
    return list(nearest.values())


def _verified(store: Store, digests: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    good, bad = [], []
    for digest in digests:
        try:
            store.blocks.read(digest)
            good.append(digest)
        except (BlockCorrupt, BlockUnreadable, BlockMissing):
            bad.append(digest)
    return good, bad


async def heal_blocks(
    store: Store,
    digests: list[bytes],
    coordinator: str,
    *,
    node_id: str = "",
    own_address: str = "",
    avoid: Iterable[str] = (),
    limits: dict[SourceClass, float] | None = None,
) -> HealResult:
    """Fetch ``digests`` from the fleet and write each verified copy over the local one.

    ``coordinator``: HOST:PORT of the coordinator (empty: nowhere to heal from, every id is returned
    missing). ``node_id`` and ``own_address``: this node as the fleet knows it, so that peers of its
    site come first and it is not offered to itself (a command without a daemon passes neither and
    gets the other holders as plain peers). ``avoid``: addresses of peers not to ask (e.g. ones that
    recently sent corrupt blocks). ``limits``: bytes per second per class of source.

    Never raises for an unreachable fleet: what could not be healed is in ``missing``, and why in
    ``detail``. Each id counts as healed only once it reads back verified from the store.
    """
    unique = list(dict.fromkeys(digests))
    if not unique:
        return HealResult()
    if not coordinator:
        return HealResult(missing=unique, detail="no coordinator to fetch good copies from")
    result = HealResult()
    versions = await asyncio.to_thread(versions_using, store, unique)
    sources: list[Source] = []
    coordinator = await replicas.reachable(coordinator)
    async with channel.channel(coordinator) as ch:
        try:
            sources = await _peers(ch, versions, node_id, own_address, avoid)
        except grpc.aio.AioRpcError as err:  # the origin below is then asked, and says the same
            result.detail = f"finding peers at {coordinator}: {err.code().name}: {err.details()}"
    sources.append(Source("origin", coordinator, SourceClass.ORIGIN))
    result.sources = sources
    # Asked version by version: a server with TLS answers only for blocks of the version a request names.
    remaining = unique
    incomplete = ""
    for info in versions or [None]:
        try:
            label = f"heal of {len(remaining)} blocks"
            version = info.ref if info else ""
            await Fetcher(store, sources, limits=limits).fetch(remaining, label, version=version)
        except PullIncomplete as err:
            incomplete = str(err)
        remaining = (await asyncio.to_thread(_verified, store, remaining))[1]
        if not remaining:
            break
    if remaining and incomplete:
        result.detail = "; ".join(filter(None, (result.detail, incomplete)))
    result.healed, result.missing = await asyncio.to_thread(_verified, store, unique)
    for digest in result.healed:
        log.info("healed block %s from the fleet", BlockId(digest))
    return result
