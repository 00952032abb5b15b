"""`cachepoint-coordinator migrate`: an embedded coordinator's whole state copied into the shared
backend (a PostgreSQL catalog and a block directory), then verified from the target's side.

What moves: every record of every family of the store (cachepoint/store/format.py) into ``records``,
as they are, so the target is the same coordinator (its ``store_id`` too, so nodes see no new
origin); the blocks into files (coordinator/backends/fileblocks.py). What does not: the database's own
bookkeeping of the embedded journal and scrub (format.UNJOURNALED_META, meaningless in PostgreSQL),
and the files beside the store in DATA (ca/, assignments.json, audit-queue/): a replica serves with the
same ``--data DATA``, so its CA, join tokens, revocations and assignments are those of before and no
node enrolls again.

Guards: the source is opened for writing, so RocksDB's lock refuses while a coordinator serves it and
keeps one from starting during the copy; the target must hold no coordinator's records (a second run,
or a database a replica already serves, cannot mix two coordinators' state), and is marked taken (meta
``migrated_from``) before the copy starts, so even a coordinator that held nothing else is not copied
over. The one exception is a copy of the same source (its store id) that did not finish: it is
resumed. Records are written again (the same keys, the same values), trust rows that are there stay,
and a block whose file is there at its stored length is not written again (files are renamed into
place whole; the verification re-reads every one). A copy that verified marks its claim
``verified_at`` after the source's note: a target in service is never copied over, even if DATA's
note were lost; the copy runs inside the cluster's write section, so a replica started on the target meanwhile
cannot write between the check and the copy. A source whose audit chain does not verify is refused
before anything is written.

Verification reads both sides again: per family the record count and a SHA-256 over its (key, value)
pairs in key order (length-prefixed), every block re-read from its file and its id checked, and the
audit chain verified on the target with the source's head. Only then is the note DATA/migrated.json
written (coordinator/backends/migrated.py), after which the embedded store is never served again.
Cost: the source is read three times (counting, copy, verify), the target once; every block
file is synced.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachepoint.blocks import decode_verified
from cachepoint.errors import (
    BlockCorrupt,
    BlockUnreadable,
    CachepointError,
    IntegrityFailure,
    InvalidInput,
    NotFound,
    StoreBusy,
    StoreMissing,
)
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB
from coordinator.backends import migrated
from coordinator.backends.choice import Backend
from coordinator.backends.fileblocks import FileBlocks, blocks_root
from coordinator.backends.records import PgStoreDB
from coordinator.backends.section import exclusive
from coordinator.history.audit import AuditLog, Verdict
from coordinator.history.times import iso

RECORDS_PER_TRANSACTION = 1000
BLOCKS_PER_BATCH = 64  # up to 256 MiB at 4 MiB blocks; each file is synced before the next batch
BLOCK_BYTES_PER_BATCH = 64 * 1024 * 1024
PROBLEMS_LISTED = 20  # missing or corrupt blocks named in the report; the counts are whole
# What a new catalog writes for itself at its first open (records.PgStoreDB._initialise): overwritten
# by the source's, so a catalog holding only these is empty.
FRESH_META = (fmt.META_FORMAT_VERSION, fmt.META_STORE_ID, fmt.META_PREFILTER_SEED)
# The target's own record of where its state came from (JSON: store_id, from, at), written before the
# copy: a catalog that holds it is taken, even when the coordinator it came from held nothing else.
META_MIGRATED_FROM = b"migrated_from"
# Meta records that are not copied, and not compared: the embedded database's bookkeeping, and the above.
NOT_COPIED_META = fmt.UNJOURNALED_META | {META_MIGRATED_FROM}
COPIED_FAMILIES = tuple(family for family in fmt.COLUMN_FAMILIES if family != fmt.CF_BLOCKS)
# The CA's key and certificate (each replica is given them); the queue of records the offline commands
# left, which the replica moves into the shared audit chain when it starts.
STAYS_IN_DATA = ("ca/", "audit-queue/")

Progress = Callable[[int, int], None]


class SourceInUse(StoreBusy):
    """coordinator data {} is open for writing by another process (a running coordinator?): stop the
    coordinator first, then migrate ({})"""


class TargetNotEmpty(InvalidInput):
    """the catalog database {} already holds {} records of a coordinator ({}): migrate into a new, empty
    database"""


class AlreadyMigrated(InvalidInput):
    """coordinator data {} was migrated to {} at {}: its replicas serve that catalog; copying the
    embedded store again would make a second coordinator"""


class SourceAuditBroken(IntegrityFailure):
    """the audit log in {} does not verify (record {}: {}): nothing was copied; see `cachepoint-coordinator
    history audit verify --data {}`"""


class MigrationInterrupted(CachepointError):
    """interrupted: the catalog database {} holds a partial copy, and {} was left as it was: run the same
    migrate again to resume it"""

    exit_code = 130  # as any command stopped by Ctrl-C


@dataclass(frozen=True, slots=True)
class FamilyCheck:
    family: str
    source_records: int
    source_sha256: str
    target_records: int
    target_sha256: str

    @property
    def ok(self) -> bool:
        return (self.source_records, self.source_sha256) == (self.target_records, self.target_sha256)

    def as_json(self) -> dict[str, Any]:
        return {
            "records": self.source_records,
            "sha256": self.source_sha256,
            "target_records": self.target_records,
            "target_sha256": self.target_sha256,
            "ok": self.ok,
        }


@dataclass
class BlockCheck:
    blocks: int = 0  # in the source
    bytes: int = 0  # stored bytes copied (as held: compressed where that helped)
    already_there: int = 0  # resumed: blocks an interrupted run had written, not written again
    verified: int = 0  # re-read from the target and matching their ids
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    missing_count: int = 0
    corrupt_count: int = 0

    @property
    def ok(self) -> bool:
        return self.verified == self.blocks and not self.missing_count and not self.corrupt_count

    def as_json(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "bytes": self.bytes,
            "already_there": self.already_there,
            "verified": self.verified,
            "missing": self.missing_count,
            "corrupt": self.corrupt_count,
            "first_missing": self.missing,
            "first_corrupt": self.corrupt,
            "ok": self.ok,
        }


@dataclass
class Report:
    source: Path
    target: str  # without its password
    blocks_url: str
    store_id: str = ""
    families: list[FamilyCheck] = field(default_factory=list)
    blocks: BlockCheck = field(default_factory=BlockCheck)
    source_audit: Verdict | None = None
    target_audit: Verdict | None = None
    trust: dict[str, int] = field(default_factory=dict)  # assignments, revocations, tokens copied
    seconds: float = 0.0
    resumed_from: str = ""  # when the interrupted copy this run resumed had started ("": none)

    @property
    def audit_ok(self) -> bool:
        return (
            self.target_audit is not None and self.target_audit.ok and self.target_audit == self.source_audit
        )

    @property
    def verified(self) -> bool:
        return bool(self.families) and all(f.ok for f in self.families) and self.blocks.ok and self.audit_ok

    @property
    def serve(self) -> str:
        return (
            f"cachepoint-coordinator serve --data {self.source} --catalog {self.target} "
            f"--blocks {self.blocks_url}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "from": str(self.source),
            "to": self.target,
            "blocks_url": self.blocks_url,
            "store_id": self.store_id,
            "families": {f.family: f.as_json() for f in self.families},
            "blocks": self.blocks.as_json(),
            "audit": {
                "source": self.source_audit.as_json() if self.source_audit else None,
                "target": self.target_audit.as_json() if self.target_audit else None,
                "ok": self.audit_ok,
            },
            "trust": self.trust,
            "resumed_from": self.resumed_from or None,
            "verified": self.verified,
            "stays_in_data": [str(self.source / name) for name in STAYS_IN_DATA],
            "serve": self.serve,
            "seconds": round(self.seconds, 3),
        }


def rows_of(db: Any, family: str) -> Iterator[tuple[bytes, bytes]]:
    """A family's records as the migration copies and compares them, in key order."""
    for key, value in db.scan(family):
        if family == fmt.CF_META and key in NOT_COPIED_META:
            continue
        yield bytes(key), bytes(value)


def digest_rows(
    rows: Iterable[tuple[bytes, bytes]], progress: Callable[[], None] | None = None
) -> tuple[int, str]:
    """(count, SHA-256 over u32 length + key + u32 length + value of each record, in order)."""
    sha = hashlib.sha256()
    count = 0
    for key, value in rows:
        sha.update(fmt.u32(len(key)))
        sha.update(key)
        sha.update(fmt.u32(len(value)))
        sha.update(value)
        count += 1
        if progress is not None:
            progress()
    return count, f"sha256:{sha.hexdigest()}"


class Migration:
    """Open both sides (``open``), then ``copy_records``, ``copy_blocks``, ``verify``, ``finish``;
    ``close`` in any case. The CLI runs the steps one after the other, each with its progress bar."""

    def __init__(self, source: Path, catalog: str, blocks: str) -> None:
        Backend(source, catalog, blocks).check()  # the same rules as `serve --catalog --blocks`
        self.source_dir = source
        self.catalog = catalog
        self.blocks_url = blocks
        self.source: StoreDB | None = None
        self.target: PgStoreDB | None = None
        self.files: FileBlocks | None = None
        self._section: Any = None
        self.report = Report(source, "", blocks)
        self.totals: dict[str, int] = {}  # records per family of the source, blocks under "blocks"
        self._started = time.monotonic()

    # -- opening ---------------------------------------------------------------------------------

    def open(self) -> None:
        note = migrated.read(self.source_dir)
        if note is not None:
            raise AlreadyMigrated(self.source_dir, note.catalog, note.at)
        if not (self.source_dir / "db" / "CURRENT").exists():
            raise NotFound(f"no embedded coordinator store in {self.source_dir} (no db/ there)")
        try:
            # Writable: RocksDB's lock keeps a coordinator from serving it during the copy, and the
            # catalog journal's tail (records a crash kept from the database) is applied first.
            self.source = StoreDB(self.source_dir, writable=True)
        except StoreMissing as err:
            raise NotFound(f"no embedded coordinator store in {self.source_dir}") from err
        except StoreBusy as err:
            raise SourceInUse(self.source_dir, err.args[-1] if err.args else "") from err
        verdict = AuditLog(self.source).verify()  # type: ignore[arg-type]
        if not verdict.ok:
            raise SourceAuditBroken(self.source_dir, verdict.first_broken, verdict.problem, self.source_dir)
        self.report.source_audit = verdict
        store_id = self.source.meta(fmt.META_STORE_ID) or b""
        self.report.store_id = store_id.hex()
        for family in COPIED_FAMILIES:
            self.totals[family] = sum(1 for _ in rows_of(self.source, family))
        self.totals[fmt.CF_BLOCKS] = sum(1 for _ in self.source.scan_keys(fmt.CF_BLOCKS))

        self.target = PgStoreDB(self.catalog, self.source_dir)  # the schema's migrations run here
        self.report.target = self.target.where
        self.files = FileBlocks(blocks_root(self.blocks_url))
        # Held until close: a replica that starts on the target now waits to write until the copy is
        # verified, and a second migrate into it waits, then finds it not empty.
        self._section = exclusive(self.target)
        self._section.__enter__()
        held = self._foreign_records()
        if held:
            claim = self._claim()
            if claim is None or claim.get("store_id") != self.report.store_id:
                raise TargetNotEmpty(self.target.where, held, "another coordinator's")
            if claim.get("verified_at"):
                raise TargetNotEmpty(
                    self.target.where, held, f"this one's, copied and verified at {claim['verified_at']}"
                )
            self.report.resumed_from = str(claim.get("at", ""))
            return
        claim = {"store_id": self.report.store_id, "from": str(self.source_dir), "at": iso(time.time_ns())}
        self._write_claim(claim)

    def _claim(self) -> dict[str, Any] | None:
        assert self.target is not None
        raw = self.target.meta(META_MIGRATED_FROM)
        try:
            claim = json.loads(raw) if raw else None
        except ValueError:
            return None
        return claim if isinstance(claim, dict) else None

    def _write_claim(self, claim: dict[str, Any]) -> None:
        assert self.target is not None
        batch = self.target.batch()
        batch.put(META_MIGRATED_FROM, json.dumps(claim).encode(), fmt.CF_META)
        self.target.write(batch)

    def _foreign_records(self) -> int:
        assert self.target is not None
        with self.target.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM records WHERE NOT (family = %s AND key = ANY(%s))",
                (fmt.CF_META, list(FRESH_META)),
            ).fetchone()
        return int(row[0]) if row else 0

    @property
    def record_total(self) -> int:
        return sum(n for family, n in self.totals.items() if family != fmt.CF_BLOCKS)

    # -- copying ---------------------------------------------------------------------------------

    def copy_trust(self) -> dict[str, int]:
        """The fleet's trust state that replicas share (coordinator/backends/trust_tables.py): user
        assignments, revocations, and join tokens not spent and not expired (spent ones stay in DIR's
        files, for who enrolled when)."""
        from coordinator.assignments import Assignments
        from coordinator.backends import trust_tables
        from coordinator.pki import revocation, tokens

        assert self.target is not None
        counts = {"assignments": 0, "revocations": 0, "tokens": 0}
        now = time.time()
        with trust_tables.admin_transaction(self.target) as conn:
            for node, users in Assignments(self.source_dir).all().items():
                for user in users:
                    counts["assignments"] += trust_tables.assign(conn, user, node)
            for name, at in revocation.read(self.source_dir).items():
                trust_tables.revoke(conn, name, at)
                counts["revocations"] += 1
            for path in sorted(tokens.token_dir(self.source_dir).glob("*.json")):
                entry = tokens.read_record(path)
                if entry.expires_at >= now:
                    trust_tables.record_token(conn, path.stem, entry)
                    counts["tokens"] += 1
        self.report.trust = counts
        return counts

    def copy_records(self, progress: Progress | None = None) -> int:
        """Every family but blocks, RECORDS_PER_TRANSACTION records per transaction."""
        assert self.source is not None and self.target is not None
        done, total = 0, self.record_total
        for family in COPIED_FAMILIES:
            batch = self.target.batch()
            for key, value in rows_of(self.source, family):
                batch.put(key, value, family)
                if len(batch) >= RECORDS_PER_TRANSACTION:
                    self.target.write(batch)
                    done += len(batch)
                    batch = self.target.batch()
                    if progress is not None:
                        progress(done, total)
            if len(batch):
                self.target.write(batch)
                done += len(batch)
                if progress is not None:
                    progress(done, total)
        return done

    def copy_blocks(self, progress: Progress | None = None) -> int:
        """Every block into its file, as stored (each synced, then renamed into place)."""
        assert self.source is not None and self.files is not None
        done, total = 0, self.totals[fmt.CF_BLOCKS]
        pending: list[tuple[bytes, bytes]] = []
        pending_bytes = 0
        for digest, value in self.source.scan(fmt.CF_BLOCKS):
            pending.append((bytes(digest), bytes(value)))
            pending_bytes += len(value)
            if len(pending) >= BLOCKS_PER_BATCH or pending_bytes >= BLOCK_BYTES_PER_BATCH:
                done = self._put_blocks(pending, done, total, progress)
                pending, pending_bytes = [], 0
        if pending:
            done = self._put_blocks(pending, done, total, progress)
        return done

    def _put_blocks(
        self, values: list[tuple[bytes, bytes]], done: int, total: int, progress: Progress | None
    ) -> int:
        assert self.files is not None
        done += len(values)
        if self.report.resumed_from:
            missing = [(digest, value) for digest, value in values if not self._there(digest, len(value))]
            self.report.blocks.already_there += len(values) - len(missing)
            values = missing
        self.files.put_many(values)
        self.report.blocks.bytes += sum(len(value) for _, value in values)
        if progress is not None:
            progress(done, total)
        return done

    def _there(self, digest: bytes, length: int) -> bool:
        """Whether an earlier run wrote this block's file (renamed into place whole, so its length
        is all there is to check here; the verification reads it)."""
        assert self.files is not None
        try:
            return self.files.path(digest).stat().st_size == length
        except FileNotFoundError:
            return False

    # -- verifying -------------------------------------------------------------------------------

    def verify(self, progress: Progress | None = None) -> Report:
        """Both sides read again: counts and digests per family, every block's id, the audit chain."""
        assert self.source is not None and self.target is not None and self.files is not None
        total = 2 * self.record_total + self.totals[fmt.CF_BLOCKS]
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None and (done % RECORDS_PER_TRANSACTION == 0 or done == total):
                progress(done, total)

        self.report.families = []
        for family in COPIED_FAMILIES:
            source_count, source_sha = digest_rows(rows_of(self.source, family), step)
            target_count, target_sha = digest_rows(rows_of(self.target, family), step)
            self.report.families.append(
                FamilyCheck(family, source_count, source_sha, target_count, target_sha)
            )
        checked = self.report.blocks
        checked.blocks = checked.verified = checked.missing_count = checked.corrupt_count = 0
        checked.missing, checked.corrupt = [], []
        for digest in self.source.scan_keys(fmt.CF_BLOCKS):
            checked.blocks += 1
            self._check_block(bytes(digest), checked)
            step()
        self.report.target_audit = AuditLog(self.target).verify()  # type: ignore[arg-type]
        self.report.seconds = time.monotonic() - self._started
        return self.report

    def _check_block(self, digest: bytes, checked: BlockCheck) -> None:
        assert self.files is not None
        name = f"sha256:{digest.hex()}"
        try:
            raw = self.files.raw(digest)
            if raw is None:
                checked.missing_count += 1
                if len(checked.missing) < PROBLEMS_LISTED:
                    checked.missing.append(name)
                return
            decode_verified(digest, raw)
        except (BlockCorrupt, BlockUnreadable):
            checked.corrupt_count += 1
            if len(checked.corrupt) < PROBLEMS_LISTED:
                checked.corrupt.append(name)
            # A bad copy of ours in a target no replica serves yet: gone, so the next run writes it.
            self.files.path(digest).unlink(missing_ok=True)
            return
        checked.verified += 1

    def finish(self) -> None:
        """After a verified copy: the note that keeps the embedded store from being served again."""
        if not self.report.verified:
            return
        at = iso(time.time_ns())
        migrated.write(
            self.source_dir, migrated.Migrated(self.report.target, self.blocks_url, self.report.store_id, at)
        )
        # Then the target's own word (after the note: an interruption between the two leaves a source
        # that says migrated, which is true): this copy is done and may be in service, never resumed.
        claim = self._claim() or {"store_id": self.report.store_id, "from": str(self.source_dir)}
        self._write_claim(claim | {"verified_at": at})

    def close(self) -> None:
        try:
            if self._section is not None:
                section, self._section = self._section, None
                section.__exit__(None, None, None)
        finally:
            if self.target is not None:
                self.target.close()
            if self.source is not None:
                self.source.close()
