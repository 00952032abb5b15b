"""The outbox: local versions of user/ layers that the coordinator does not have yet.

It is derived, not queued: a local version of a ``user/`` layer without a ``pushed`` record is in the
outbox, so it survives restarts and offline periods by construction and cannot drift from the store.
Draining pushes each one's missing blocks, then commits it at the coordinator with a commit id made
of this store's id, the local ref and the manifest digest: a retry after a crash or a lost reply
returns the version the first attempt made, so nothing is lost and nothing doubled. Local parents
are translated to the coordinator's numbers, so two devices that made versions while apart both keep
theirs, and each version's parent says which line it came from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from cachepoint.model import VersionInfo
from cachepoint.replication.publish import push_blocks
from cachepoint.rpc import channel, replicas
from cachepoint.rpc.client import UNARY_DEADLINE
from cachepoint.store import format as fmt
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc
from cachepoint.wire import version_from_pb, version_to_pb

log = logging.getLogger("cachepoint.outbox")
USER_PREFIX = "user/"


@dataclass(frozen=True, slots=True)
class Delivered:
    local: VersionInfo
    number: int  # at the coordinator
    blocks_sent: int
    bytes_sent: int


def pushed_number(store: Store, layer: str, local_number: int) -> int | None:
    raw = store.db.cf[fmt.CF_PUSHED].get(fmt.version_key(layer, local_number))
    return None if raw is None else int(json.loads(raw)["number"])


def pending(store: Store) -> list[VersionInfo]:
    """Local user/ versions the coordinator does not have, oldest first within each layer."""
    return [
        info
        for info in store.catalog.all_versions()
        if info.layer.startswith(USER_PREFIX) and pushed_number(store, info.layer, info.number) is None
    ]


def depth(store: Store) -> int:
    return len(pending(store))


def _mark_pushed(store: Store, info: VersionInfo, number: int) -> None:
    batch = store.db.batch()
    record = json.dumps({"number": number, "pushed_ns": time.time_ns()}).encode()
    batch.put(fmt.version_key(info.layer, info.number), record, store.db.handle[fmt.CF_PUSHED])
    store.db.write(batch, sync=True)


def commit_id(store: Store, info: VersionInfo) -> str:
    store_id = (store.db.meta(fmt.META_STORE_ID) or b"").hex()
    return f"{store_id}:{info.ref}:{info.manifest_digest.hex()}"


async def drain(store: Store, coordinator: str) -> list[Delivered]:
    """Deliver every pending version, in order; stops at the first failure (the rest stay queued)."""
    delivered: list[Delivered] = []
    queue = await asyncio.to_thread(pending, store)
    if not queue:
        return delivered
    # A replica that fails half-way fails this drain; the daemon's next one starts at the next replica.
    async with channel.channel(await replicas.reachable(coordinator)) as ch:
        catalog = catalog_pb2_grpc.CatalogStub(ch)
        for info in queue:
            manifest_raw = await asyncio.to_thread(store.catalog.manifest_bytes, info.manifest_digest)
            manifest = await asyncio.to_thread(store.catalog.manifest, info.manifest_digest)
            blocks, size = await push_blocks(store, ch, sorted(manifest.block_ids()), info.layer)
            parent = pushed_number(store, info.layer, info.parent) if info.parent else None
            request = catalog_pb2.CommitRequest(
                layer=info.layer,
                kind=int(info.kind),
                manifest=catalog_pb2.ManifestBlob(digest=info.manifest_digest, manifest=manifest_raw),
                parent=parent or 0,
                no_parent=parent is None,
                author=info.author,
                device=info.device,
                message=info.message,
                created_ns=info.created_ns,
                commit_id=commit_id(store, info),
                # The software timeline of a capture travels with the version.
                labels=list(info.labels),
                changes=version_to_pb(info).changes,
                # This device's clock now: the coordinator measures its skew and places the version in
                # its own time (a device a day off still lands in the right order).
                sent_ns=time.time_ns(),
            )
            remote = version_from_pb(await catalog.Commit(request, timeout=UNARY_DEADLINE))
            await asyncio.to_thread(_mark_pushed, store, info, remote.number)
            log.info("delivered %s as %s (%d blocks sent)", info.ref, remote.ref, blocks)
            delivered.append(Delivered(info, remote.number, blocks, size))
    return delivered
