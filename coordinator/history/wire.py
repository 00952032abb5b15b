"""Where the history's values meet protobuf: the gRPC service sends them, the CLI reads them back."""

from __future__ import annotations

import json

from cachepoint.layers.diff import Diff, FileChange
from cachepoint.model import EntryType
from cachepoint.v1 import history_pb2
from cachepoint.wire import version_from_pb, version_to_pb
from coordinator.history.audit import AuditRecord, Verdict, canonical
from coordinator.history.gc import GcReport
from coordinator.history.holds import Hold
from coordinator.history.query import DiffResult, FileHistory, FileVersion, Timeline, TimelineEntry


def timeline_to_pb(timeline: Timeline) -> history_pb2.TimelineResponse:
    return history_pb2.TimelineResponse(
        user=timeline.user,
        entries=[
            history_pb2.TimelineEntry(version=version_to_pb(e.version), tags=list(e.tags))
            for e in timeline.entries
        ],
    )


def timeline_from_pb(m: history_pb2.TimelineResponse) -> Timeline:
    entries = tuple(TimelineEntry(version_from_pb(e.version), tuple(e.tags)) for e in m.entries)
    return Timeline(m.user, entries)


def file_version_to_pb(v: FileVersion) -> history_pb2.FileVersion:
    return history_pb2.FileVersion(
        layer=v.layer,
        number=v.number,
        created_ns=v.created_ns,
        device=v.device,
        author=v.author,
        path=v.path,
        type=int(v.type),
        mode=v.mode,
        size=v.size,
        mtime_ns=v.mtime_ns,
        sha256=v.sha256,
        target=v.target,
        state=v.state,
    )


def file_version_from_pb(m: history_pb2.FileVersion) -> FileVersion:
    return FileVersion(
        m.layer,
        m.number,
        m.created_ns,
        m.device,
        m.author,
        m.path,
        EntryType(m.type),
        m.mode,
        m.size,
        m.mtime_ns,
        m.sha256,
        m.target,
        m.state,
    )


def file_history_to_pb(h: FileHistory) -> history_pb2.FileHistoryResponse:
    return history_pb2.FileHistoryResponse(
        layer=h.layer, path=h.path, versions=[file_version_to_pb(v) for v in h.versions]
    )


def file_history_from_pb(m: history_pb2.FileHistoryResponse) -> FileHistory:
    return FileHistory(m.layer, m.path, tuple(file_version_from_pb(v) for v in m.versions))


def diff_to_pb(d: DiffResult) -> history_pb2.DiffResponse:
    return history_pb2.DiffResponse(
        old=d.old,
        new=d.new,
        added=d.diff.added,
        removed=d.diff.removed,
        changed=[
            history_pb2.ChangedFile(
                path=c.path,
                ranges=[history_pb2.ByteRange(start=s, end=e) for s, e in c.ranges],
                metadata=c.metadata,
            )
            for c in d.diff.changed
        ],
    )


def diff_from_pb(m: history_pb2.DiffResponse) -> DiffResult:
    changed = [FileChange(c.path, [(r.start, r.end) for r in c.ranges], list(c.metadata)) for c in m.changed]
    return DiffResult(m.old, m.new, Diff(list(m.added), list(m.removed), changed))


def hold_to_pb(h: Hold) -> history_pb2.Hold:
    return history_pb2.Hold(user=h.user, reason=h.reason, actor=h.actor, set_ns=h.set_ns)


def hold_from_pb(m: history_pb2.Hold) -> Hold:
    return Hold(m.user, m.reason, m.actor, m.set_ns)


def gc_to_pb(r: GcReport) -> history_pb2.CollectResponse:
    return history_pb2.CollectResponse(
        deleted=r.deleted,
        held=r.held,
        kept=r.kept,
        blocks_removed=r.blocks_removed,
        bytes_freed=r.bytes_freed,
        dry_run=r.dry_run,
    )


def gc_from_pb(m: history_pb2.CollectResponse) -> GcReport:
    return GcReport(tuple(m.deleted), tuple(m.held), m.kept, m.blocks_removed, m.bytes_freed, m.dry_run)


def audit_record_to_pb(r: AuditRecord) -> history_pb2.AuditRecord:
    return history_pb2.AuditRecord(
        seq=r.seq,
        time_ns=r.time_ns,
        actor=r.actor,
        action=r.action,
        subject=r.subject,
        details_json=canonical(r.details).decode(),
        prev_hash=r.prev_hash,
        hash=r.hash,
        format=r.format,
    )


def audit_record_from_pb(m: history_pb2.AuditRecord) -> AuditRecord:
    return AuditRecord(
        m.seq,
        m.time_ns,
        m.actor,
        m.action,
        m.subject,
        json.loads(m.details_json or "{}"),
        m.prev_hash,
        m.hash,
        m.format,
    )


def verdict_to_pb(v: Verdict) -> history_pb2.AuditVerdict:
    return history_pb2.AuditVerdict(
        ok=v.ok,
        records=v.records,
        first_broken=v.first_broken,
        problem=v.problem,
        head_seq=v.head_seq,
        head_hash=v.head_hash,
    )


def verdict_from_pb(m: history_pb2.AuditVerdict) -> Verdict:
    return Verdict(m.ok, m.records, m.first_broken, m.problem, m.head_seq, m.head_hash)
