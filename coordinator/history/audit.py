"""The audit log: an append-only, hash-chained record of every admin action at the coordinator.

Each record holds seq (from 1, no gaps), time_ns, actor, action, subject, details (a JSON object),
prev_hash (the hash of record seq-1; 64 zeros for the first) and hash = SHA-256 over the canonical
encoding of all the other fields. Changing, removing or inserting a record therefore breaks either
its own hash or the next record's link, and ``verify`` names the first record where that happens.
A log cut short at its end still verifies: ``verify`` reports the head (last seq and hash) so an
operator can write it down elsewhere and compare later.

Records are written in the same synced batch as the change they describe (a hold, a deletion, a tag
move), so the log never claims what did not happen and never misses what did. The next seq and
prev_hash are read from the database under a lock for every append, not kept in memory: a batch
that fails to write leaves nothing behind to correct.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import rocksdict

from cachepoint.errors import IntegrityFailure, InvalidInput
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB
from coordinator.backends.section import exclusive
from coordinator.history.times import iso
from coordinator.history.users import user_subject

log = logging.getLogger("coordinator.audit")
AUDIT_FORMAT = 1
SUPPORTED_FORMATS = frozenset({1})
GENESIS_HASH = "0" * 64
MAX_ACTOR = 128
MAX_LIST = 10_000

# Actions (the audit log's vocabulary; a record's subject is what the action was about).
HOLD_SET = "hold.set"  # subject user/NAME
HOLD_RELEASE = "hold.release"  # subject user/NAME
EXPORT = "export"  # subject user/NAME
RESTORE_FILE = "restore.file"  # subject LAYER@N (a file of it was handed out by `history get`)
TAG_MOVE = "tag.move"  # subject LAYER:TAG
RETENTION_DELETE = "retention.delete"  # subject LAYER@N
GC_SWEEP = "gc.sweep"  # subject "blocks"


def check_actor(actor: str) -> str:
    if not actor or not actor.strip():
        raise InvalidInput("say who is acting: actor is empty (it is recorded in the audit log)")
    if len(actor) > MAX_ACTOR or any(ord(c) < 32 for c in actor):
        raise InvalidInput(f"actor {actor[:40]!r}: at most {MAX_ACTOR} printable characters")
    return actor


def recorded_actor(name: str) -> str:
    """An actor for a record made on someone's behalf (a commit's author naming a tag): never refused,
    so an odd author name cannot stop a commit; control characters dropped, length capped."""
    return "".join(c for c in name if ord(c) >= 32)[:MAX_ACTOR].strip() or "unknown"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What a caller records; the log adds seq, time and the chain."""

    actor: str
    action: str
    subject: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    time_ns: int
    actor: str
    action: str
    subject: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str
    format: int = AUDIT_FORMAT

    def body(self) -> dict[str, Any]:
        """Every field the hash covers (all but the hash itself)."""
        return {
            "format": self.format,
            "seq": self.seq,
            "time_ns": self.time_ns,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
        }

    def stored(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}

    def as_json(self) -> dict[str, Any]:
        return {**self.stored(), "time": iso(self.time_ns)}

    def hash_matches(self) -> bool:
        return record_hash(self.body()) == self.hash


def canonical(data: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, ASCII only: the same bytes on every machine and Python version."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(seq: int, time_ns: int, entry: AuditEntry, prev_hash: str) -> AuditRecord:
    unsealed = AuditRecord(
        seq, time_ns, entry.actor, entry.action, entry.subject, dict(entry.details), prev_hash, ""
    )
    return dataclasses.replace(unsealed, hash=record_hash(unsealed.body()))


def subject_matches(subject: str, wanted: str) -> bool:
    """``wanted`` itself or anything below it: user/alice covers user/alice/home@3; os/x covers os/x@2
    and os/x:production."""
    return subject == wanted or (subject.startswith(wanted) and subject[len(wanted)] in "/@:")


def record_from_json(data: Any) -> AuditRecord:
    """A record from its stored (or exported) JSON form; ValueError names what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kinds = {
        "format": int,
        "seq": int,
        "time_ns": int,
        "actor": str,
        "action": str,
        "subject": str,
        "details": dict,
        "prev_hash": str,
        "hash": str,
    }
    for name, kind in kinds.items():
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise ValueError(f"field {name!r} is missing or not a {kind.__name__}")
    if data["format"] not in SUPPORTED_FORMATS:
        raise ValueError(f"format {data['format']}, supported {sorted(SUPPORTED_FORMATS)}")
    return AuditRecord(**{name: data[name] for name in kinds})


def decode(raw: bytes) -> AuditRecord:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON ({err})") from err
    return record_from_json(data)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    records: int
    first_broken: int = 0
    problem: str = ""
    head_seq: int = 0
    head_hash: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_broken": self.first_broken or None,
            "problem": self.problem or None,
            "head": {"seq": self.head_seq, "hash": self.head_hash} if self.head_seq else None,
        }


def verify_records(items: Iterator[tuple[bytes, bytes]]) -> Verdict:
    """Walk (key, value) pairs in seq order and recompute the chain; stop at the first broken record."""
    expected, prev_hash = 1, GENESIS_HASH

    def broken(seq: int, problem: str) -> Verdict:
        return Verdict(False, expected - 1, seq, problem, expected - 1, prev_hash)

    for key, raw in items:
        if len(key) != 8:
            return broken(expected, f"key {key.hex()} is not an 8-byte seq")
        seq = fmt.read_u64(key)
        if seq != expected:
            gap = (
                f"records {expected}..{seq - 1} are missing"
                if seq > expected
                else f"seq {seq} is out of order"
            )
            return broken(expected, gap)
        try:
            record = decode(raw)
        except ValueError as err:
            return broken(seq, f"record does not parse: {err}")
        if record.seq != seq:
            return broken(seq, f"stored under seq {seq} but says {record.seq}")
        if not record.hash_matches():
            return broken(seq, "its contents do not match its hash (changed after it was written)")
        if record.prev_hash != prev_hash:
            return broken(
                seq, f"its prev_hash does not match the hash of record {seq - 1} (a record was replaced)"
            )
        prev_hash, expected = record.hash, expected + 1
    return Verdict(True, expected - 1, head_seq=expected - 1, head_hash=prev_hash if expected > 1 else "")


class AuditAppender:
    """Stages records into one batch; valid only inside ``AuditLog.appending()`` (which holds the lock
    until the caller has written the batch)."""

    def __init__(self, log: AuditLog, seq: int, prev_hash: str) -> None:
        self._log = log
        self._seq = seq
        self._prev = prev_hash
        self.staged: list[AuditRecord] = []

    def stage(self, batch: rocksdict.WriteBatch, entry: AuditEntry) -> AuditRecord:
        check_actor(entry.actor)
        record = seal(self._seq + 1, time.time_ns(), entry, self._prev)
        batch.put(fmt.u64(record.seq), canonical(record.stored()), self._log.db.handle[fmt.CF_AUDIT])
        self._seq, self._prev = record.seq, record.hash
        self.staged.append(record)
        return record


class AuditLog:
    def __init__(self, db: StoreDB) -> None:
        self.db = db
        self._lock = threading.Lock()

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record; (0, GENESIS_HASH) for an empty log.

        A last record that cannot be read (damaged on disk) is chained onto by the SHA-256 of its raw
        bytes, and logged: commits and holds go on, and `audit verify` still names that record."""
        if fmt.CF_AUDIT not in self.db.cf:  # a read-only open of a store that predates the log
            return 0, GENESIS_HASH
        for key, raw in self.db.cf[fmt.CF_AUDIT].items(backwards=True):
            seq = fmt.read_u64(key)
            try:
                return seq, decode(raw).hash
            except ValueError as err:
                log.error(
                    "audit record %d cannot be read (%s); the next record chains onto its raw bytes", seq, err
                )
                return seq, hashlib.sha256(raw).hexdigest()
        return 0, GENESIS_HASH

    @contextlib.contextmanager
    def appending(self) -> Iterator[AuditAppender]:
        """Hold the log while the caller stages records and writes its batch (synced). With replicas the
        chain's head is read and extended inside the cluster's write section (taken first, always:
        a caller already in it holds it, and this lock after it), so the chain stays one line."""
        with exclusive(self.db), self._lock:
            yield AuditAppender(self, *self.head())

    def append(
        self, entries: list[AuditEntry], batch: rocksdict.WriteBatch | None = None
    ) -> list[AuditRecord]:
        """Write the entries (with the caller's other writes in ``batch``, if any) in one synced batch."""
        batch = batch if batch is not None else self.db.batch()
        with self.appending() as appender:
            for entry in entries:
                appender.stage(batch, entry)
            self.db.write(batch, sync=True)
            return appender.staged

    def records(self, after: int = 0, limit: int = 1000, subject: str = "") -> list[AuditRecord]:
        """Records after ``after``, oldest first; with ``subject`` only those about it or below it."""
        if limit > MAX_LIST:
            raise InvalidInput(f"audit list: limit {limit} is over the maximum of {MAX_LIST}")
        found: list[AuditRecord] = []
        if fmt.CF_AUDIT not in self.db.cf:
            return found
        for key, raw in self.db.cf[fmt.CF_AUDIT].items(from_key=fmt.u64(after + 1)):
            record = _readable(key, raw)
            if subject and not subject_matches(record.subject, subject):
                continue
            found.append(record)
            if len(found) >= limit:
                break
        return found

    def about_user(self, user: str) -> list[AuditRecord]:
        own = user_subject(user)
        records = (_readable(key, raw) for key, raw in self.db.scan(fmt.CF_AUDIT))
        return [record for record in records if subject_matches(record.subject, own)]

    def verify(self) -> Verdict:
        return verify_records(self.db.scan(fmt.CF_AUDIT))


def _readable(key: bytes, raw: bytes) -> AuditRecord:
    try:
        return decode(raw)
    except ValueError as err:
        seq = fmt.read_u64(key) if len(key) == 8 else key.hex()
        raise IntegrityFailure(
            f"audit record {seq} cannot be read ({err}); run `cachepoint-coordinator history audit verify`"
        ) from err
