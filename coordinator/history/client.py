"""Calling a running coordinator's History service (the `history` commands): deadlines on unary calls,
status codes turned back into our errors, streams checked as they arrive."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import grpc

from cachepoint.errors import CachepointError, IntegrityFailure
from cachepoint.ids import Ref
from cachepoint.rpc import channel
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.v1 import history_pb2, history_pb2_grpc
from cachepoint.wire import ref_to_pb
from coordinator.history import wire
from coordinator.history.audit import AuditRecord, Verdict
from coordinator.history.gc import GcReport
from coordinator.history.holds import Hold
from coordinator.history.query import DiffResult, FileHistory, FileVersion, Timeline

GC_DEADLINE = 3600.0  # a GC of a large store sweeps every block
STREAM_DEADLINE = 6 * 3600.0  # an export of years of a user's files


class HistoryClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = channel.channel(address)
        self._stub = history_pb2_grpc.HistoryStub(self._channel)

    async def __aenter__(self) -> HistoryClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._channel.close()

    def _error(self, err: grpc.RpcError) -> CachepointError:
        return from_rpc_error(err, self.address)

    async def _unary(self, method: str, request: object, deadline: float = UNARY_DEADLINE) -> object:
        try:
            return await getattr(self._stub, method)(request, timeout=deadline)
        except grpc.RpcError as err:
            raise self._error(err) from err

    async def timeline(self, user: str, from_ns: int, to_ns: int, layer: str) -> Timeline:
        request = history_pb2.TimelineRequest(user=user, from_ns=from_ns, to_ns=to_ns, layer=layer)
        response = await self._unary("Timeline", request)
        assert isinstance(response, history_pb2.TimelineResponse)
        return wire.timeline_from_pb(response)

    async def file_history(self, user: str, layer: str, path: str) -> FileHistory:
        response = await self._unary(
            "FileHistory", history_pb2.FileHistoryRequest(user=user, layer=layer, path=path)
        )
        assert isinstance(response, history_pb2.FileHistoryResponse)
        return wire.file_history_from_pb(response)

    async def diff(self, old: Ref, new: Ref) -> DiffResult:
        response = await self._unary("Diff", history_pb2.DiffRequest(old=ref_to_pb(old), new=ref_to_pb(new)))
        assert isinstance(response, history_pb2.DiffResponse)
        return wire.diff_from_pb(response)

    async def set_hold(self, user: str, reason: str, actor: str) -> Hold:
        response = await self._unary(
            "SetHold", history_pb2.HoldRequest(user=user, reason=reason, actor=actor)
        )
        assert isinstance(response, history_pb2.Hold)
        return wire.hold_from_pb(response)

    async def release_hold(self, user: str, actor: str) -> Hold:
        response = await self._unary("ReleaseHold", history_pb2.ReleaseRequest(user=user, actor=actor))
        assert isinstance(response, history_pb2.Hold)
        return wire.hold_from_pb(response)

    async def holds(self) -> list[Hold]:
        response = await self._unary("ListHolds", history_pb2.ListHoldsRequest())
        assert isinstance(response, history_pb2.ListHoldsResponse)
        return [wire.hold_from_pb(h) for h in response.holds]

    async def collect(self, actor: str, dry_run: bool) -> GcReport:
        request = history_pb2.CollectRequest(actor=actor, dry_run=dry_run)
        response = await self._unary("CollectGarbage", request, GC_DEADLINE)
        assert isinstance(response, history_pb2.CollectResponse)
        return wire.gc_from_pb(response)

    async def audit_records(self, after: int, limit: int, subject: str) -> list[AuditRecord]:
        request = history_pb2.ListAuditRequest(after=after, limit=limit, subject=subject)
        response = await self._unary("ListAudit", request)
        assert isinstance(response, history_pb2.ListAuditResponse)
        return [wire.audit_record_from_pb(r) for r in response.records]

    async def verify_audit(self) -> Verdict:
        response = await self._unary("VerifyAudit", history_pb2.VerifyAuditRequest(), GC_DEADLINE)
        assert isinstance(response, history_pb2.AuditVerdict)
        return wire.verdict_from_pb(response)

    async def get_file(
        self, user: str, layer: str, path: str, at_ns: int, actor: str
    ) -> tuple[FileVersion, AsyncIterator[bytes]]:
        """The file's description, and its bytes; the bytes end with an IntegrityFailure if what
        arrived does not hash to what the coordinator sent."""
        request = history_pb2.GetFileRequest(user=user, layer=layer, path=path, at_ns=at_ns, actor=actor)
        stream = self._stub.GetFile(request, timeout=STREAM_DEADLINE)
        try:
            first = await stream.read()
        except grpc.RpcError as err:
            raise self._error(err) from err
        if first is grpc.aio.EOF or first.WhichOneof("part") != "header":
            raise IntegrityFailure(f"{self.address}: the file stream did not start with its header")
        header = wire.file_version_from_pb(first.header)

        async def data() -> AsyncIterator[bytes]:
            digest = hashlib.sha256()
            try:
                # read(), not async-for: the header was taken with read(), and gRPC refuses to mix them.
                while (message := await stream.read()) is not grpc.aio.EOF:
                    part = message.WhichOneof("part")
                    if part == "data":
                        digest.update(message.data)
                        yield message.data
                    elif part == "sha256":
                        if message.sha256 != f"sha256:{digest.hexdigest()}":
                            raise IntegrityFailure(
                                f"{header.path!r} of {header.ref}: received bytes hash to "
                                f"sha256:{digest.hexdigest()}, the coordinator sent {message.sha256}"
                            )
                        return
            except grpc.RpcError as err:
                raise self._error(err) from err
            raise IntegrityFailure(f"{header.path!r} of {header.ref}: the stream ended before its digest")

        return header, data()

    async def export(
        self, user: str, from_ns: int, to_ns: int, actor: str, progress: Callable[[int, int], None] | None
    ) -> AsyncIterator[bytes]:
        """The tar's bytes as they arrive."""
        request = history_pb2.ExportRequest(user=user, from_ns=from_ns, to_ns=to_ns, actor=actor)
        stream = self._stub.Export(request, timeout=STREAM_DEADLINE)
        total = done = 0
        try:
            async for message in stream:
                total = message.total_bytes or total
                done += len(message.data)
                if progress is not None:
                    progress(done, total)
                yield message.data
        except grpc.RpcError as err:
            raise self._error(err) from err
