"""Catalog at the coordinator: the reads every node serves, plus commits, tags and Watch."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

import grpc
import rocksdict

from cachepoint.blocks import size_problem
from cachepoint.errors import InvalidInput, RefNotFound
from cachepoint.ids import DIGEST_SIZE, LATEST, BlockId, validate_layer_name, validate_tag
from cachepoint.model import ClassChanges, LayerKind, VersionInfo
from cachepoint.rpc.catalog_read import CatalogReadService
from cachepoint.rpc.errors import MissingBlocks, rpc_errors
from cachepoint.store import format as fmt
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, version_pb2
from cachepoint.wire import manifest_digest, manifest_from_bytes, ref_from_pb, version_to_pb
from coordinator.authz import LayerReader, acting
from coordinator.catalog.clock import Placement, place, span
from coordinator.catalog.events import EventLog
from coordinator.history.audit import TAG_MOVE, AuditAppender, AuditEntry, AuditLog, recorded_actor
from coordinator.history.times import iso

log = logging.getLogger("coordinator.catalog")
# Seconds a quiet Watch stream waits before looking at the log again (it is woken at once by a commit
# here, or by another replica's notification). The environment may set it: a test of notifications
# makes it longer than the test, so that only a notification can deliver its event.
WATCH_KEEPALIVE = float(os.environ.get("CACHEPOINT_WATCH_KEEPALIVE", "15"))
CHECK_CHUNK = 256  # blocks read at once while a commit checks its manifest's blocks


class CatalogService(CatalogReadService):
    def __init__(
        self,
        store: Store,
        events: EventLog,
        audit: AuditLog,
        writes: asyncio.Lock,
        reader: LayerReader = lambda context: None,
        on_commit: Callable[[VersionInfo], None] | None = None,
    ) -> None:
        """``reader``: which layers a call may see in listings (coordinator/authz.py layer_reader).
        ``on_commit``: told of every version committed (the metrics)."""
        super().__init__(store, reader)
        self.on_commit = on_commit
        self.events = events
        self.audit = audit
        # Version numbers and event positions are handed out in order; holds and the history GC take
        # the same lock (coordinator/history/service.py).
        self._commit_lock = writes

    def _earlier_commit(self, commit_id: str) -> VersionInfo | None:
        raw = self.store.db.cf[fmt.CF_COMMIT_IDS].get(commit_id.encode())
        if raw is None:
            return None
        layer, number = fmt.split_version_key(raw)
        return self.store.catalog.version(layer, number)

    def _check_blocks(self, ids: set[bytes], block_size: int) -> tuple[list[bytes], tuple[bytes, str] | None]:
        """The blocks of a manifest that are not here, and the first one that is larger than the
        manifest's block size (pushes are bounded only by the largest block size: a push names no
        layer). Reading each value costs what the presence check did (it read the value too)."""
        missing: list[bytes] = []
        oversized: tuple[bytes, str] | None = None
        ordered = sorted(ids)
        for start in range(0, len(ordered), CHECK_CHUNK):
            chunk = ordered[start : start + CHECK_CHUNK]
            for digest, value in zip(chunk, self.store.blocks.raw_many(chunk), strict=True):
                if value is None:
                    missing.append(digest)
                elif oversized is None and (problem := size_problem(value, block_size)):
                    oversized = (digest, problem)
        return missing, oversized

    def _placement(self, request: catalog_pb2.CommitRequest, received_ns: int) -> Placement:
        """The version's time on this coordinator's clock (clock.py), from the device's two readings."""
        parent = request.parent
        if not parent and not request.no_parent:
            layer = self.store.catalog.layer_or_none(request.layer)
            parent = layer.latest if layer else 0
        try:
            parent_ns = self.store.catalog.version(request.layer, parent).created_ns if parent else 0
        except RefNotFound:  # deleted by retention, or never there (the commit itself says which)
            parent_ns = 0
        placement = place(
            request.layer, request.device, request.created_ns, request.sent_ns, received_ns, parent_ns
        )
        if placement.corrected:
            log.warning(
                "commit of %s from device %r: its clock is %s the coordinator's (it says %s, the "
                "coordinator %s); kept at the coordinator's time",
                request.layer,
                request.device,
                span(placement.arrival.clock_skew_ns),
                iso(request.sent_ns),
                iso(received_ns),
            )
        return placement

    def _commit(self, request: catalog_pb2.CommitRequest, received_ns: int, committer: str) -> VersionInfo:
        """``committer``: who the audit log names for the tags it moves (the certificate's name with
        TLS; without it, the author the request claims)."""
        validate_layer_name(request.layer)
        if len(request.commit_id) > 512:
            raise InvalidInput(f"commit of {request.layer}: commit_id is longer than 512 characters")
        if request.commit_id and (earlier := self._earlier_commit(request.commit_id)) is not None:
            return earlier  # a retry: the version was made the first time
        for tag in request.tags:
            validate_tag(tag)
        raw = request.manifest.manifest
        if len(request.manifest.digest) != DIGEST_SIZE or manifest_digest(raw) != request.manifest.digest:
            raise InvalidInput(f"commit of {request.layer}: the manifest does not match its digest")
        try:
            manifest = manifest_from_bytes(raw)
        except Exception as err:  # protobuf decode errors, bad paths, bad packed ids
            raise InvalidInput(f"commit of {request.layer}: malformed manifest ({err})") from err
        missing, oversized = self._check_blocks(manifest.block_ids(), manifest.block_size)
        if missing:
            raise MissingBlocks(len(missing), BlockId(missing[0]))
        if oversized:
            digest, problem = oversized
            raise InvalidInput(
                f"commit of {request.layer}: block {BlockId(digest)} does not fit the manifest: {problem}"
            )
        placement = self._placement(request, received_ns)
        kind = LayerKind(request.kind) if request.kind else LayerKind.APP
        changes = tuple(ClassChanges(c.file_class, c.added, c.changed, c.removed) for c in request.changes)

        def record(batch: rocksdict.WriteBatch, info: VersionInfo, audit: AuditAppender) -> None:
            if request.commit_id:
                key = fmt.version_key(info.layer, info.number)
                batch.put(request.commit_id.encode(), key, self.store.db.handle[fmt.CF_COMMIT_IDS])
            self.events.stage(batch, catalog_pb2.CatalogEvent(version_committed=version_to_pb(info)))
            for tag in dict.fromkeys((*request.tags, LATEST)):
                move = version_pb2.TagMove(
                    layer=info.layer, tag=tag, number=info.number, moved_ns=info.created_ns, actor=info.author
                )
                self.events.stage(batch, catalog_pb2.CatalogEvent(tag_moved=move))
                if tag != LATEST:  # an admin naming a tag is audited; `latest` follows every commit
                    actor = recorded_actor(committer)
                    audit.stage(
                        batch, AuditEntry(actor, TAG_MOVE, f"{info.layer}:{tag}", {"version": info.number})
                    )

        with self.audit.appending() as audit:
            return self.store.catalog.commit(
                layer=request.layer,
                kind=kind,
                pending=PendingCommit(raw, {}),
                manifest=manifest,
                author=request.author,
                device=request.device,
                message=request.message,
                tags=tuple(request.tags),
                labels=tuple(request.labels),
                changes=changes,
                parent=0 if request.no_parent else (request.parent or None),
                created_ns=placement.created_ns,
                arrival=placement.arrival,
                also=lambda batch, info: record(batch, info, audit),
            )

    @rpc_errors
    async def Commit(  # noqa: N802 - gRPC method name
        self, request: catalog_pb2.CommitRequest, context: grpc.aio.ServicerContext
    ) -> version_pb2.VersionInfo:
        received_ns = time.time_ns()  # before waiting for the lock: the skew reading is the arrival's
        async with self._commit_lock:
            committer = acting(context, request.author)
            info = await asyncio.to_thread(self._commit, request, received_ns, committer)
        await self.events.published()
        if self.on_commit is not None:
            self.on_commit(info)
        log.info("committed %s (%d bytes) by %s@%s", info.ref, info.logical_bytes, info.author, info.device)
        return version_to_pb(info)

    def _move_tag(self, ref_pb: version_pb2.Ref, tag: str, actor: str) -> version_pb2.TagMove:
        validate_tag(tag)
        info = self.store.catalog.resolve(ref_from_pb(ref_pb))
        previous = self.store.catalog.tag_target(info.layer, tag) or 0
        move = version_pb2.TagMove(
            layer=info.layer, tag=tag, number=info.number, previous=previous, actor=actor
        )
        batch = self.store.db.batch()
        self.store.catalog.stage_tag(batch, info.layer, tag, info.number, actor)
        self.events.stage(batch, catalog_pb2.CatalogEvent(tag_moved=move))
        details = {"version": info.number, "previous": previous or None}
        self.audit.append(
            [AuditEntry(recorded_actor(actor), TAG_MOVE, f"{info.layer}:{tag}", details)], batch
        )
        return move

    @rpc_errors
    async def SetTag(  # noqa: N802
        self, request: catalog_pb2.SetTagRequest, context: grpc.aio.ServicerContext
    ) -> version_pb2.TagMove:
        async with self._commit_lock:
            moved = await asyncio.to_thread(
                self._move_tag, request.ref, request.tag, acting(context, request.actor)
            )
        await self.events.published()
        return moved

    @rpc_errors
    async def Watch(  # noqa: N802
        self, request: catalog_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[catalog_pb2.CatalogEvent]:
        if request.after > self.events.visible and request.after > await self.events.catch_up():
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"watch position {request.after} is ahead of the catalog log (at {self.events.visible})",
            )
        layers = set(request.layers)
        may_read = self.reader(context)
        position = request.after
        while not self.events.closing:
            for event in await asyncio.to_thread(self.events.read_after, position):
                position = event.position
                which = event.WhichOneof("event")
                layer = getattr(event, which).layer if which else ""
                if (not layers or layer in layers) and (may_read is None or may_read(layer)):
                    yield event
            await self.events.wait_beyond(position, WATCH_KEEPALIVE)
