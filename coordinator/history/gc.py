"""The coordinator's GC: delete the versions no retention rule keeps, then the blocks no remaining
version references.

Each deleted version is one synced batch: the version record (and its manifest when no other version
names it), the commit ids that point at it, a ``version_deleted`` event for Watch clients and one
audit record. A crash between two deletions leaves a consistent catalog; run GC again to finish.
The block sweep is the store's mark and sweep (cachepoint/store/gc.py): it keeps every block any
remaining version references, held or not, so a block shared with a kept version is never lost.

The caller holds the catalog write lock (the write section, across replicas) for the whole run: a
commit that checked its blocks are present must not see them swept before its version lands. Blocks
pushed for a commit that has not happened yet are kept for ``block_grace``: embedded, the coordinator
remembers what it received (Store.note_received; a restart forgets, and such a commit then fails with
FAILED_PRECONDITION and is retried after a new push); shared, the block files' own times say it
(coordinator/backends/fileblocks.py).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cachepoint.model import VersionInfo
from cachepoint.store import census
from cachepoint.store import format as fmt
from cachepoint.store.gc import collect
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2
from coordinator.catalog.events import EventLog
from coordinator.history.audit import GC_SWEEP, RETENTION_DELETE, AuditEntry, AuditLog
from coordinator.history.holds import Holds
from coordinator.history.retention import Retention, reasons_to_keep
from coordinator.history.users import owner_of


@dataclass(frozen=True, slots=True)
class Plan:
    delete: tuple[VersionInfo, ...]
    held: tuple[VersionInfo, ...]  # no rule keeps them; their user's hold does
    kept: int


@dataclass(frozen=True, slots=True)
class GcReport:
    deleted: tuple[str, ...]
    held: tuple[str, ...]
    kept: int
    blocks_removed: int = 0
    bytes_freed: int = 0
    dry_run: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "deleted": list(self.deleted),
            "held": list(self.held),
            "kept": self.kept,
            "blocks_removed": self.blocks_removed,
            "bytes_freed": self.bytes_freed,
        }


def plan(store: Store, retention: Retention, held_users: set[str], now_ns: int) -> Plan:
    delete: list[VersionInfo] = []
    held: list[VersionInfo] = []
    kept = 0
    for layer in store.catalog.layers():
        versions = store.catalog.versions(layer.name)
        reasons = reasons_to_keep(versions, retention.for_kind(layer.kind), now_ns)
        # A ref someone can name never dangles: the latest and every tagged version stay.
        protected = set(store.catalog.tags(layer.name).values()) | {layer.latest}
        owner = owner_of(layer.name)
        for info in versions:
            if reasons[info.number] or info.number in protected:
                kept += 1
            elif owner is not None and owner in held_users:
                held.append(info)
                kept += 1
            else:
                delete.append(info)
    return Plan(tuple(delete), tuple(held), kept)


class CoordinatorGc:
    def __init__(
        self, store: Store, events: EventLog, audit: AuditLog, holds: Holds, retention: Retention
    ) -> None:
        self.store = store
        self.events = events
        self.audit = audit
        self.holds = holds
        self.retention = retention

    def run(self, actor: str, dry_run: bool) -> GcReport:
        """Call with the catalog write lock held (see the module docstring); announce the events after.

        Refuses (CatalogUnreadable) unless every catalog record was read: a layer, hold or version
        that reads as absent would be a deletion nobody decided."""
        census.take(self.store).require_complete("history gc", self.store.root)
        planned = plan(self.store, self.retention, self.holds.held_users(), time.time_ns())
        deleted = tuple(info.ref for info in planned.delete)
        held = tuple(info.ref for info in planned.held)
        if dry_run:
            return GcReport(deleted, held, planned.kept, dry_run=True)
        manifest_users = Counter(info.manifest_digest for info in self.store.catalog.all_versions())
        commit_ids = self._commit_ids_by_version()
        for info in planned.delete:
            self._delete(
                info, actor, manifest_users, commit_ids.get(fmt.version_key(info.layer, info.number), [])
            )
        swept = collect(self.store)
        if deleted:
            # The journal would otherwise keep the deleted versions' file lists: retention must forget.
            self.store.db.checkpoint_journal()
        details = {
            "versions_deleted": len(deleted),
            "blocks_removed": swept.blocks_removed,
            "bytes_freed": swept.bytes_freed,
        }
        self.audit.append([AuditEntry(actor, GC_SWEEP, "blocks", details)])
        return GcReport(deleted, held, planned.kept, swept.blocks_removed, swept.bytes_freed)

    def _commit_ids_by_version(self) -> dict[bytes, list[bytes]]:
        found: dict[bytes, list[bytes]] = {}
        for commit_id, version_key in self.store.db.scan(fmt.CF_COMMIT_IDS):
            found.setdefault(version_key, []).append(commit_id)
        return found

    def _delete(
        self, info: VersionInfo, actor: str, manifest_users: Counter[bytes], commit_ids: list[bytes]
    ) -> None:
        owner = owner_of(info.layer)
        if owner is not None and self.holds.get(owner) is not None:
            return  # held since the plan was made (holds take the same lock, so this is belt and braces)
        manifest_users[info.manifest_digest] -= 1
        batch = self.store.db.batch()
        self.store.catalog.stage_version_deletion(
            batch, info, drop_manifest=manifest_users[info.manifest_digest] <= 0
        )
        # A retried commit of this version (a device that never saw the reply) makes a new version
        # rather than pointing at one that is gone.
        for commit_id in commit_ids:
            batch.delete(commit_id, self.store.db.handle[fmt.CF_COMMIT_IDS])
        now = time.time_ns()
        policy = self.retention.for_kind(info.kind)
        event = catalog_pb2.VersionDeleted(
            layer=info.layer, number=info.number, deleted_ns=now, actor=actor, reason="retention"
        )
        self.events.stage(batch, catalog_pb2.CatalogEvent(version_deleted=event))
        details = {
            "created_ns": info.created_ns,
            "device": info.device,
            "manifest": info.digest_text,
            "policy": policy.as_json(),
        }
        self.audit.append([AuditEntry(actor, RETENTION_DELETE, info.ref, details)], batch)
