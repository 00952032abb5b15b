"""A census of the catalog: every layer, version, tag and manifest record read with checks, cross-
checked against each other and against the catalog journal.

Anything that deletes (local GC, the coordinator's retention GC) first takes a census and refuses
unless it is ``complete``: a family RocksDB cannot read, a layer whose latest version has no record,
a tag pointing nowhere, a manifest that is missing or does not match its digest, or a version the
journal holds and the database does not, all mean that "no version references this block" cannot be
proven. fsck reports the same findings, each with what it concerns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cachepoint.blocks import decode_block
from cachepoint.errors import CatalogUnreadable, RecordsUnreadable
from cachepoint.ids import BlockId
from cachepoint.model import Manifest, VersionInfo
from cachepoint.store import format as fmt
from cachepoint.store import journal as jr
from cachepoint.store.db import StoreDB
from cachepoint.store.store import Store
from cachepoint.wire import manifest_digest, manifest_from_bytes, version_from_bytes

# Every family whose loss would make a GC delete what it must keep or lose history: the journaled
# ones, and the working maps of attached disks (blocks GC must keep). Read in this order, which
# matters next to a writer: layers and tags before versions (a record they name was committed before
# them), manifests before versions (a version's manifest missing from the scan is looked up again).
CATALOG_FAMILIES = (*sorted(fmt.JOURNALED_FAMILIES - {fmt.CF_VERSIONS}), fmt.CF_VERSIONS, fmt.CF_WORKING)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # unreadable-records, layer, tag, manifest, missing-record, journal
    subject: str
    detail: str
    versions: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind} {self.subject}: {self.detail}"


@dataclass
class Census:
    versions: list[VersionInfo] = field(default_factory=list)
    manifests: dict[bytes, Manifest] = field(default_factory=dict)  # readable ones, by digest
    users: dict[bytes, list[str]] = field(default_factory=dict)  # manifest digest -> refs using it
    findings: list[Finding] = field(default_factory=list)
    journal_records: int = 0

    @property
    def complete(self) -> bool:
        return not self.findings

    def referenced_blocks(self) -> set[bytes]:
        blocks: set[bytes] = set()
        for manifest in self.manifests.values():
            blocks |= manifest.block_ids()
        return blocks

    def require_complete(self, action: str, root: object) -> None:
        if self.findings:
            shown = "; ".join(str(f) for f in self.findings[:5])
            more = f" and {len(self.findings) - 5} more" if len(self.findings) > 5 else ""
            raise CatalogUnreadable(action, root, shown + more)


def _read_family(db: StoreDB, family: str, census: Census) -> dict[bytes, bytes] | None:
    try:
        return dict(db.scan(family))
    except RecordsUnreadable as err:
        census.findings.append(Finding("unreadable-records", family, str(err.args[2])))
        return None


def _get_or_finding(db: StoreDB, family: str, key: bytes, census: Census) -> bytes | None:
    try:
        return db.get(family, key)
    except RecordsUnreadable as err:
        census.findings.append(Finding("unreadable-records", family, str(err.args[2])))
        return b""


def take(store: Store, *, with_journal: bool = True) -> Census:
    """Read the whole catalog; never raises for damage, records it as findings."""
    db = store.db
    census = Census()
    if db.salvaged:
        census.findings.append(Finding("database", str(store.root), db.salvaged))
    try:
        # Read before the families: every journal record up to it is in what the scans will see.
        db_seq = db.journal_seq()
    except RecordsUnreadable as err:
        census.findings.append(Finding("unreadable-records", fmt.CF_META, str(err.args[2])))
        db_seq = None
    families = {family: _read_family(db, family, census) for family in CATALOG_FAMILIES}
    layers = families[fmt.CF_LAYERS] or {}
    versions_raw = families[fmt.CF_VERSIONS] or {}
    tags = families[fmt.CF_TAGS] or {}
    manifests_raw = families[fmt.CF_MANIFESTS]

    numbers: dict[str, set[int]] = {}
    for key, raw in versions_raw.items():
        try:
            info = version_from_bytes(raw)
        except Exception as err:
            census.findings.append(Finding("unreadable-records", fmt.CF_VERSIONS, f"{key!r}: {err}"))
            continue
        census.versions.append(info)
        numbers.setdefault(info.layer, set()).add(info.number)
        census.users.setdefault(info.manifest_digest, []).append(info.ref)
    if families[fmt.CF_LAYERS] is not None and families[fmt.CF_VERSIONS] is not None:
        for key, raw in layers.items():
            name = key.decode(errors="replace")
            latest = json.loads(raw).get("latest", 0)
            held = numbers.get(name, set())
            if latest not in held:
                census.findings.append(
                    Finding("layer", name, f"records latest version {latest}, which has no version record")
                )
        for name in numbers.keys() - {k.decode(errors="replace") for k in layers}:
            # (versions are read after layers: a layer made in between has its record by now)
            if _get_or_finding(db, fmt.CF_LAYERS, name.encode(), census) is None:
                census.findings.append(Finding("layer", name, "has versions but no layer record"))
    if families[fmt.CF_TAGS] is not None and families[fmt.CF_VERSIONS] is not None:
        for key, raw in tags.items():
            layer, _, tag = key.partition(fmt.SEP)
            number = fmt.read_u64(raw)
            if number not in numbers.get(layer.decode(errors="replace"), set()):
                census.findings.append(
                    Finding(
                        "tag",
                        f"{layer.decode(errors='replace')}:{tag.decode(errors='replace')}",
                        f"points at version {number}, which has no version record",
                    )
                )
    for digest, refs in census.users.items():
        subject = str(BlockId(digest))
        try:
            stored = manifests_raw.get(digest) if manifests_raw is not None else None
            if stored is None:  # (manifests are read before versions: one committed in between)
                stored = db.get(fmt.CF_MANIFESTS, digest)
            if stored is None:
                raise ValueError("no manifest record")
            raw = decode_block(stored)
            if manifest_digest(raw) != digest:
                raise ValueError("its bytes do not match its digest")
            census.manifests[digest] = manifest_from_bytes(raw)
        except RecordsUnreadable as err:
            census.findings.append(Finding("manifest", subject, f"unreadable: {err.args[2]}", tuple(refs)))
        except Exception as err:
            census.findings.append(Finding("manifest", subject, str(err), tuple(refs)))
    if with_journal and db.journaled and db_seq is not None:
        versions = versions_raw if families[fmt.CF_VERSIONS] is not None else None
        _compare_with_journal(store, census, db_seq, versions)
    return census


def read_journal(store: Store, upto_seq: int | None = None) -> jr.JournalState:
    """The journal's state, read under the journal's lock when this process writes the store (so a
    record being appended is not mistaken for damage)."""
    path = store.root / jr.FILE_NAME
    store_id = store.db.meta(fmt.META_STORE_ID)
    journal = store.db.journal
    if journal is None:
        return jr.read_state(path, store_id, upto_seq=upto_seq, writer_may_append=True)
    with journal.lock:
        return jr.read_state(path, store_id, upto_seq=upto_seq)


def _applied_meanwhile(db: StoreDB, state: jr.JournalState) -> bool:
    """Whether the journal records beyond the census's first look at the database were written by this
    process while the census read (a commit landing mid-census), not lost: in the process that writes
    the store, a record reaches the journal and the database under the journal's lock, so once
    ``read_journal`` has let it go the database holds every record it saw. Such a commit's blocks are
    its writer's pins, which a running GC keeps (Store.end_ingest); the census need not have seen them."""
    return db.writable and db.journal is not None and db.journal_seq() >= state.seen_seq


def _compare_with_journal(
    store: Store, census: Census, db_seq: int, versions_raw: dict[bytes, bytes] | None
) -> None:
    db = store.db
    path = store.root / jr.FILE_NAME
    if not path.exists():
        if db.writable or db_seq:
            census.findings.append(Finding("journal", str(path), "the catalog journal is missing"))
        return  # a read-only look at a store from before the journal
    try:
        state = read_journal(store, upto_seq=db_seq)
    except (jr.JournalError, RecordsUnreadable) as err:
        census.findings.append(Finding("journal", str(path), str(err)))
        return
    census.journal_records = state.records
    for damage in state.damage:
        census.findings.append(Finding("journal", str(path), f"damaged: {damage}"))
    for first, last in state.gaps:
        census.findings.append(Finding("journal", str(path), f"records {first}..{last} are missing"))
    if db_seq > state.last_seq:
        census.findings.append(
            Finding("journal", str(path), f"ends at record {state.last_seq}, the database is at {db_seq}")
        )
    elif (
        db_seq < state.seen_seq
        and (db.writable or not db.writer_active())
        and not _applied_meanwhile(db, state)
    ):
        # (A read-only open next to a writer may just be older than the journal: not a finding there.)
        census.findings.append(
            Finding(
                "missing-record",
                "database",
                f"is at journal record {db_seq}, the journal at {state.seen_seq} "
                "(a writable open or `cachepoint repair` applies the rest)",
            )
        )
    if versions_raw is None:
        return
    for key in state.families.get(fmt.CF_VERSIONS, {}):
        if key not in versions_raw:
            layer, number = fmt.split_version_key(key)
            census.findings.append(
                Finding("missing-record", f"{layer}@{number}", "in the journal but not in the database")
            )
