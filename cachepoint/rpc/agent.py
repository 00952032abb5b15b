"""Agent: the daemon's local API, for `cachepoint status` and pulls through a running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from cachepoint.disk.rebuild import rebase, restore
from cachepoint.errors import InvalidInput
from cachepoint.ids import Ref
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.layers.rollback import rollback
from cachepoint.model import LayerKind
from cachepoint.replication import outbox
from cachepoint.replication.ratelimit import parse_rate
from cachepoint.rpc.errors import rpc_errors
from cachepoint.store.gc import GcResult, collect
from cachepoint.store.headroom import headroom, reserve_on_disk
from cachepoint.store.scrub import load_record
from cachepoint.v1 import agent_pb2, agent_pb2_grpc, catalog_pb2, version_pb2
from cachepoint.wire import ref_from_pb, version_to_pb

if TYPE_CHECKING:
    from cachepoint.daemon import Daemon
    from cachepoint.scrub import ScrubProgress


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @rpc_errors
    async def Status(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.StatusResponse:
        d = self.daemon
        assert d.store is not None
        response = agent_pb2.StatusResponse(
            node_id=d.node_id,
            site=d.settings.site,
            address=d.address,
            coordinator=d.settings.coordinator,
            coordinator_connected=d.connected,
            outbox_depth=await asyncio.to_thread(outbox.depth, d.store),
            peers_known=d.peers_known,
            catalog_position=d.catalog_position,
        )
        record = await asyncio.to_thread(load_record, d.store)
        running = d.scrub_progress.as_json() if d.scrub_progress is not None else None
        response.scrub_json = json.dumps({"last": record.last, "running": running})
        for sub in d.subscriptions:
            response.subscriptions.add(
                ref=str(sub.ref), wanted=sub.wanted, held=sub.held, state=sub.state, last_error=sub.last_error
            )
        response.versions.extend(version_to_pb(v) for v in d.store.catalog.all_versions())
        for name, totals in sorted(d.sources.items()):
            response.sources.add(
                source_class=name,
                blocks=totals.blocks,
                bytes=totals.bytes,
                failures=totals.failures,
                corrupt=totals.corrupt,
            )
        if d.gate is not None:
            room = await asyncio.to_thread(d.gate.measure)
            response.space.CopyFrom(
                agent_pb2.DiskSpace(
                    available_bytes=room.available,
                    total_bytes=room.total,
                    free_bytes=room.free,
                    min_free=str(d.gate.min_free),
                    min_free_bytes=d.gate.limit(room),
                    pulls_paused=d.gate.paused is not None,
                    reserve_bytes=reserve_on_disk(d.store.root),
                    reserve_target_bytes=d.gate.reserve_target,
                )
            )
        return response

    @rpc_errors
    async def Ingest(  # noqa: N802
        self, request: agent_pb2.IngestRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.IngestResponse:
        d = self.daemon
        assert d.store is not None
        options = IngestOptions(
            layer=request.layer,
            kind=LayerKind(request.kind) if request.kind else LayerKind.APP,
            message=request.message,
            author=request.author,
            device=d.settings.node_id or os.uname().nodename,
            block_size=request.block_size or None,
            tags=tuple(request.tags),
            allow_same=request.allow_same,
        )
        result = await asyncio.to_thread(ingest, d.store, Path(request.path), options)
        assert result.version is not None
        if result.version.layer.startswith(outbox.USER_PREFIX) and not result.unchanged:
            d.outbox_wakeup.set()
        return agent_pb2.IngestResponse(
            version=version_to_pb(result.version), result_json=json.dumps(result.as_json())
        )

    @rpc_errors
    async def Capture(  # noqa: N802
        self, request: agent_pb2.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.CaptureResponse:
        d = self.daemon
        if not request.layer.startswith(outbox.USER_PREFIX):
            raise InvalidInput(f"capture into {request.layer!r}: file-level captures go to user/ layers")
        report = await asyncio.to_thread(
            d.capture,
            request.layer,
            Path(request.path),
            request.message,
            request.author,
            request.force,
            request.block_size,
        )
        if not report.unchanged:
            d.outbox_wakeup.set()
        return agent_pb2.CaptureResponse(result_json=json.dumps(report.as_json()))

    @rpc_errors
    async def Attach(  # noqa: N802
        self, request: agent_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.AttachResponse:
        name, disk = await self.daemon.disks.attach(request.image, request.user)
        return agent_pb2.AttachResponse(
            export_name=name,
            nbd=self.daemon.disks.uris(name),
            read_only=disk.working is None,
            user_layer=disk.working.layer if disk.working is not None else "",
        )

    @rpc_errors
    async def Detach(  # noqa: N802
        self, request: agent_pb2.DetachRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.DetachResponse:
        await self.daemon.disks.detach(request.export_name, request.discard)
        return agent_pb2.DetachResponse()

    @rpc_errors
    async def Snapshot(  # noqa: N802
        self, request: agent_pb2.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> version_pb2.VersionInfo:
        d = self.daemon
        info = await d.disks.snapshot(request.export_name, request.message, request.author, d.node_id)
        d.outbox_wakeup.set()
        return version_to_pb(info)

    @rpc_errors
    async def CreateImage(  # noqa: N802
        self, request: agent_pb2.CreateImageRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ImageReply:
        store = self.daemon.store
        assert store is not None
        for ref in request.refs:
            Ref.parse(ref)
        spec = await asyncio.to_thread(store.catalog.create_image, request.name, list(request.refs))
        return agent_pb2.ImageReply(name=spec.name, refs=list(spec.refs))

    @rpc_errors
    async def Rebase(  # noqa: N802
        self, request: agent_pb2.RebaseRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ImageReply:
        store = self.daemon.store
        assert store is not None
        spec, replaced = await asyncio.to_thread(rebase, store, request.image, ref_from_pb(request.to))
        return agent_pb2.ImageReply(name=spec.name, refs=list(spec.refs), replaced=replaced)

    @rpc_errors
    async def Restore(  # noqa: N802
        self, request: agent_pb2.RestoreRequest, context: grpc.aio.ServicerContext
    ) -> version_pb2.VersionInfo:
        d = self.daemon
        assert d.store is not None
        info = await asyncio.to_thread(
            lambda: restore(
                d.store,  # type: ignore[arg-type]
                request.image,
                request.user,
                ref_from_pb(request.to),
                author=request.author,
                device=d.node_id,
                message=request.message,
            )
        )
        d.outbox_wakeup.set()
        return version_to_pb(info)

    @rpc_errors
    async def Pull(  # noqa: N802
        self, request: agent_pb2.PullRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.PullProgress]:
        result = await self.daemon.pull(ref_from_pb(request.ref))
        yield agent_pb2.PullProgress(
            blocks_total=result.planned_blocks,
            blocks_done=result.fetched.blocks,
            bytes_done=result.fetched.bytes,
            version=version_to_pb(result.version),
            finished=True,
        )

    @rpc_errors
    async def SetTag(  # noqa: N802
        self, request: catalog_pb2.SetTagRequest, context: grpc.aio.ServicerContext
    ) -> version_pb2.VersionInfo:
        store = self.daemon.store
        assert store is not None
        ref = str(ref_from_pb(request.ref))
        info = await asyncio.to_thread(store.catalog.set_tag, ref, request.tag, request.actor)
        return version_to_pb(info)

    @rpc_errors
    async def Rollback(  # noqa: N802
        self, request: agent_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> version_pb2.VersionInfo:
        d = self.daemon
        assert d.store is not None
        store, target = d.store, ref_from_pb(request.to)
        info = await asyncio.to_thread(
            lambda: rollback(
                store, request.layer, target, author=request.author, device=d.node_id, message=request.message
            )
        )
        d.outbox_wakeup.set()  # a user/ layer's new version goes to the coordinator
        return version_to_pb(info)

    @rpc_errors
    async def CollectGarbage(  # noqa: N802
        self, request: agent_pb2.CollectGarbageRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.CollectGarbageResponse:
        store = self.daemon.store
        assert store is not None
        reserve = self.daemon.settings.reserve

        def collect_with_headroom() -> GcResult:
            with headroom(store.root, reserve):  # the reserve's space lets GC write on a full disk
                return collect(store)

        result = await asyncio.to_thread(collect_with_headroom)
        self.daemon.metrics.collected(result)
        return agent_pb2.CollectGarbageResponse(result_json=json.dumps(result.as_json()))

    @rpc_errors
    async def Scrub(  # noqa: N802
        self, request: agent_pb2.ScrubRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.ScrubProgress]:
        rate = parse_rate(request.rate) if request.rate else None
        updates: asyncio.Queue[ScrubProgress | None] = asyncio.Queue()
        task = asyncio.create_task(self.daemon.scrub(rate, progress=updates.put_nowait))
        task.add_done_callback(lambda _: updates.put_nowait(None))
        try:
            while (update := await updates.get()) is not None:
                if not updates.empty():
                    continue  # the caller only needs the latest figures
                yield agent_pb2.ScrubProgress(
                    blocks_done=update.blocks_done,
                    blocks_total=update.blocks_total,
                    bytes_done=update.bytes_done,
                )
            result = task.result()
        finally:
            if not task.done():  # the caller went away: stop the pass (it resumes next time)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        yield agent_pb2.ScrubProgress(
            blocks_done=result.blocks_checked,
            bytes_done=result.bytes_checked,
            finished=True,
            result_json=json.dumps(result.as_json()),
        )
