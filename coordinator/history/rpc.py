"""History over gRPC: parse the request, call the shared operation, convert the answer. Status codes
come from the one table in cachepoint/rpc/errors.py. Downloads (GetFile, Export) are streams of
1 MiB chunks, bounded like FetchBlocks (cachepoint/rpc/streams.py): a few at once per peer and per
coordinator, and ended when the caller reads nothing for the stall time."""

from __future__ import annotations

import asyncio

import grpc

from cachepoint.rpc.errors import rpc_errors
from cachepoint.rpc.streams import StreamSlots
from cachepoint.slots import SlotLimits
from cachepoint.v1 import history_pb2, history_pb2_grpc
from cachepoint.wire import ref_from_pb
from coordinator.authz import acting
from coordinator.history import wire
from coordinator.history.files import CHUNK_BYTES
from coordinator.history.service import History

# Evidence downloads are rare and large: a handful at once is plenty, and each holds ~2 chunks while
# its caller is slow to read.
DOWNLOAD_LIMITS = SlotLimits(per_server=16, per_peer=4, wait=5.0, stall=30.0)


class HistoryService(history_pb2_grpc.HistoryServicer):
    def __init__(self, history: History) -> None:
        self.history = history
        self.downloads = StreamSlots("History download", DOWNLOAD_LIMITS)

    @rpc_errors
    async def Timeline(  # noqa: N802 - gRPC method name
        self, request: history_pb2.TimelineRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.TimelineResponse:
        timeline = await self.history.timeline(request.user, request.from_ns, request.to_ns, request.layer)
        return wire.timeline_to_pb(timeline)

    @rpc_errors
    async def FileHistory(  # noqa: N802
        self, request: history_pb2.FileHistoryRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.FileHistoryResponse:
        found = await self.history.file_history(request.user, request.layer, request.path)
        return wire.file_history_to_pb(found)

    @rpc_errors
    async def Diff(  # noqa: N802
        self, request: history_pb2.DiffRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.DiffResponse:
        result = await self.history.diff(ref_from_pb(request.old), ref_from_pb(request.new))
        return wire.diff_to_pb(result)

    @rpc_errors
    async def GetFile(  # noqa: N802
        self, request: history_pb2.GetFileRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self.downloads.admit(context)
        download = await self.history.open_file(
            request.user, request.layer, request.path, request.at_ns, acting(context, request.actor)
        )
        send = self.downloads.write
        await send(context, history_pb2.FileChunk(header=wire.file_version_to_pb(download.header)))
        chunks = download.chunks()
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            await send(context, history_pb2.FileChunk(data=chunk))
        await send(context, history_pb2.FileChunk(sha256=download.sha256))

    @rpc_errors
    async def SetHold(  # noqa: N802
        self, request: history_pb2.HoldRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.Hold:
        return wire.hold_to_pb(
            await self.history.set_hold(request.user, request.reason, acting(context, request.actor))
        )

    @rpc_errors
    async def ReleaseHold(  # noqa: N802
        self, request: history_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.Hold:
        return wire.hold_to_pb(await self.history.release_hold(request.user, acting(context, request.actor)))

    @rpc_errors
    async def ListHolds(  # noqa: N802
        self, request: history_pb2.ListHoldsRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListHoldsResponse:
        holds = await self.history.list_holds()
        return history_pb2.ListHoldsResponse(holds=[wire.hold_to_pb(h) for h in holds])

    @rpc_errors
    async def CollectGarbage(  # noqa: N802
        self, request: history_pb2.CollectRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.CollectResponse:
        return wire.gc_to_pb(await self.history.collect(acting(context, request.actor), request.dry_run))

    @rpc_errors
    async def ListAudit(  # noqa: N802
        self, request: history_pb2.ListAuditRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListAuditResponse:
        records = await self.history.audit_records(request.after, request.limit, request.subject)
        return history_pb2.ListAuditResponse(records=[wire.audit_record_to_pb(r) for r in records])

    @rpc_errors
    async def VerifyAudit(  # noqa: N802
        self, request: history_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.AuditVerdict:
        return wire.verdict_to_pb(await self.history.verify_audit())

    @rpc_errors
    async def Export(  # noqa: N802
        self, request: history_pb2.ExportRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self.downloads.admit(context)
        out, _ = await self.history.export(
            request.user, request.from_ns, request.to_ns, acting(context, request.actor)
        )
        try:
            total = await asyncio.to_thread(out.seek, 0, 2)
            out.seek(0)
            while data := await asyncio.to_thread(out.read, CHUNK_BYTES):
                await self.downloads.write(context, history_pb2.ExportChunk(data=data, total_bytes=total))
                total = 0
        finally:
            out.close()
