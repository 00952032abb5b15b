"""The history operations of a running coordinator, shared by its gRPC service and its REST app: each
checks its input, takes the locks it needs, runs the store work in a thread and audits what it did.

Locks: ``writes`` is the coordinator's catalog write lock (commits and tag moves take it too); holds
and GC take it, so a GC never deletes a version of a user held while it runs and never sweeps the
blocks of a commit in progress. Exports take ``exports`` with GC (not with commits), so an export
never sees a version's blocks swept while it reads them.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from cachepoint.blocksource import StoreSource, VerifiedSource
from cachepoint.ids import Ref
from cachepoint.model import FileEntry
from cachepoint.store import format as fmt
from cachepoint.store.store import Store
from coordinator.catalog.events import EventLog
from coordinator.history.audit import (
    EXPORT,
    RESTORE_FILE,
    AuditEntry,
    AuditLog,
    AuditRecord,
    Verdict,
    check_actor,
)
from coordinator.history.evidence import ExportRequest, ExportSummary, write_evidence
from coordinator.history.files import FileReader
from coordinator.history.gc import CoordinatorGc, GcReport
from coordinator.history.holds import Hold, Holds
from coordinator.history.query import DiffResult, FileHistory, FileVersion, Queries, Timeline, check_path
from coordinator.history.retention import Retention
from coordinator.history.times import check_range, iso
from coordinator.history.users import user_subject, validate_user

SPOOL_DIR = "spool"  # under the data directory: exports are built here before they are sent


@dataclass
class FileDownload:
    """A file handed out by ``get``: its description, then its bytes, then the SHA-256 of those bytes."""

    header: FileVersion
    entry: FileEntry
    block_size: int
    files: FileReader
    _digest: Any = field(default_factory=hashlib.sha256)

    def chunks(self) -> Iterator[bytes]:
        for chunk in self.files.chunks(self.entry, self.block_size):
            self._digest.update(chunk)
            yield chunk
        self.files.remember(self.entry, self.block_size, self._digest.hexdigest())

    @property
    def sha256(self) -> str:
        return f"sha256:{self._digest.hexdigest()}"


class History:
    def __init__(
        self, store: Store, events: EventLog, audit: AuditLog, writes: asyncio.Lock, retention: Retention
    ) -> None:
        self.store = store
        self.events = events
        self.audit = audit
        self.writes = writes
        self.retention = retention
        # Evidence states each file's SHA-256: its blocks are checked as they are read.
        self.files = FileReader(VerifiedSource(StoreSource(store)))
        self.queries = Queries(store, self.files)
        self.holds = Holds(store.db, audit)
        self.gc = CoordinatorGc(store, events, audit, self.holds, retention)
        self.exports = asyncio.Lock()

    # -- reads ---------------------------------------------------------------------------------

    async def timeline(self, user: str, from_ns: int = 0, to_ns: int = 0, layer: str = "") -> Timeline:
        check_range(from_ns, to_ns)
        return await asyncio.to_thread(self.queries.timeline, user, from_ns, to_ns, layer)

    async def file_history(self, user: str, layer: str, path: str) -> FileHistory:
        return await asyncio.to_thread(self.queries.file_history, user, layer, path)

    async def diff(self, old: Ref, new: Ref) -> DiffResult:
        return await asyncio.to_thread(self.queries.diff, old, new)

    async def open_file(self, user: str, layer: str, path: str, at_ns: int, actor: str) -> FileDownload:
        """The file as it was at ``at_ns``; handing it out is audited as a restore (before any byte)."""
        check_actor(actor)
        check_path(path)
        header, entry, block_size = await asyncio.to_thread(self.queries.file_at, user, layer, path, at_ns)
        details = {"path": path, "at": iso(at_ns) if at_ns else "latest", "size": entry.size}
        await asyncio.to_thread(self.audit.append, [AuditEntry(actor, RESTORE_FILE, header.ref, details)])
        return FileDownload(header, entry, block_size, self.files)

    # -- holds and GC --------------------------------------------------------------------------

    async def set_hold(self, user: str, reason: str, actor: str) -> Hold:
        async with self.writes:
            return await asyncio.to_thread(self.holds.set, user, reason, actor)

    async def release_hold(self, user: str, actor: str) -> Hold:
        async with self.writes:
            return await asyncio.to_thread(self.holds.release, user, actor)

    async def list_holds(self) -> list[Hold]:
        return await asyncio.to_thread(self.holds.all)

    async def collect(self, actor: str, dry_run: bool) -> GcReport:
        check_actor(actor)
        async with self.exports, self.writes:
            report = await asyncio.to_thread(self.gc.run, actor, dry_run)
        if report.deleted and not dry_run:
            await self.events.published()  # version_deleted events for Watch clients
        return report

    # -- audit ---------------------------------------------------------------------------------

    async def audit_records(self, after: int, limit: int, subject: str) -> list[AuditRecord]:
        return await asyncio.to_thread(self.audit.records, after, limit or 1000, subject)

    async def verify_audit(self) -> Verdict:
        return await asyncio.to_thread(self.audit.verify)

    # -- evidence ------------------------------------------------------------------------------

    async def export(
        self, user: str, from_ns: int, to_ns: int, actor: str
    ) -> tuple[IO[bytes], ExportSummary]:
        """Build the evidence tar in an unnamed temporary file under the data directory (nothing is
        left behind if the coordinator stops) and return it positioned at its start; the caller
        sends it and closes it."""
        validate_user(user)
        check_actor(actor)
        check_range(from_ns, to_ns)
        async with self.exports:
            timeline = await self.timeline(user, from_ns, to_ns)
            details = {
                "from": iso(from_ns) if from_ns else None,
                "to": iso(to_ns) if to_ns else None,
                "versions": [e.version.ref for e in timeline.entries],
            }
            entry = AuditEntry(actor, EXPORT, user_subject(user), details)
            await asyncio.to_thread(self.audit.append, [entry])
            return await asyncio.to_thread(self._build, user, from_ns, to_ns, actor, timeline)

    def _build(
        self, user: str, from_ns: int, to_ns: int, actor: str, timeline: Timeline
    ) -> tuple[IO[bytes], ExportSummary]:
        spool = self.store.root / SPOOL_DIR
        spool.mkdir(exist_ok=True)
        out = tempfile.TemporaryFile(dir=spool)
        try:
            store_id = (self.store.db.meta(fmt.META_STORE_ID) or b"").hex()
            request = ExportRequest(user, from_ns, to_ns, actor, time.time_ns(), store_id)
            records = self.audit.about_user(user)
            summary = write_evidence(out, request, timeline, records, self.queries, self.files)
            out.seek(0)
            return out, summary
        except BaseException:
            out.close()
            raise
