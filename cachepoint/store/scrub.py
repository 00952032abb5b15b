"""The store's side of a scrub: checking a batch of stored blocks, and the scrub record.

The record (``meta`` key ``scrub``, see store/format.py) holds the last finished pass's result, the
pass in progress (its cursor, counters and the bad blocks found so far, so that a pass cut short by
a restart goes on from where it stopped instead of from zero), and when scheduling started. The
network side (healing) and the pacing are in cachepoint/scrub.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockCorrupt, BlockUnreadable
from cachepoint.ids import DIGEST_SIZE, BlockId
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

RECORD_FORMAT = 1
CORRUPT = "corrupt-block"  # the same words as fsck's problems
UNREADABLE = "unreadable-block"


@dataclass(frozen=True, slots=True)
class BadBlock:
    digest: bytes
    kind: str  # CORRUPT or UNREADABLE
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"id": str(BlockId(self.digest)), "kind": self.kind, "detail": self.detail}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> BadBlock:
        return cls(BlockId.parse(data["id"]).digest, data["kind"], data["detail"])


@dataclass
class BatchCheck:
    last_key: bytes | None  # the cursor after this batch (None: the batch was empty)
    blocks: int = 0
    bytes: int = 0  # stored bytes read
    bad: list[BadBlock] = field(default_factory=list)
    error: str = ""  # the block family cannot be read past last_key


def check_batch(store: Store, after: bytes | None, limit: int) -> BatchCheck:
    """Read and verify up to ``limit`` blocks after ``after``. A block whose value does not verify is
    read again with RocksDB's checksums on, to tell rot below the database (corrupt: RocksDB returns
    the bytes, they do not hash to the id) from damage RocksDB itself detects (unreadable)."""
    values, error = store.blocks.scan_unchecked(after, limit)
    check = BatchCheck(values[-1][0] if values else None, error=error)
    for digest, value in values:
        if len(digest) != DIGEST_SIZE:  # read without checksums, a damaged data block can yield this
            check.error = f"a damaged key in the blocks family ({len(digest)} bytes: {digest[:40].hex()})"
            break
        check.blocks += 1
        check.bytes += len(value)
        try:
            decode_verified(digest, value)
            continue
        except BlockCorrupt as err:
            detail = str(err)
        try:
            again = store.blocks.raw(digest)
        except BlockUnreadable as err:
            check.bad.append(BadBlock(digest, UNREADABLE, f"the database cannot read it: {err.args[1]}"))
            continue
        if again is None:
            continue  # deleted (by GC) since the batch was read: nothing left to be bad
        try:
            decode_verified(digest, again)
        except BlockCorrupt:
            check.bad.append(BadBlock(digest, CORRUPT, detail))
    return check


@dataclass
class PassState:
    """A pass in progress (or cut short): enough to go on from where it stopped."""

    started_ns: int
    cursor: bytes | None = None
    blocks_checked: int = 0
    bytes_checked: int = 0
    bad: list[BadBlock] = field(default_factory=list)
    resumed: int = 0  # how many times it was taken up again after an interruption

    def as_json(self) -> dict[str, Any]:
        return {
            "started_ns": self.started_ns,
            "cursor": self.cursor.hex() if self.cursor is not None else None,
            "blocks_checked": self.blocks_checked,
            "bytes_checked": self.bytes_checked,
            "bad": [b.as_json() for b in self.bad],
            "resumed": self.resumed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PassState:
        cursor = data.get("cursor")
        return cls(
            started_ns=int(data["started_ns"]),
            cursor=bytes.fromhex(cursor) if cursor else None,
            blocks_checked=int(data["blocks_checked"]),
            bytes_checked=int(data["bytes_checked"]),
            bad=[BadBlock.from_json(b) for b in data.get("bad", [])],
            resumed=int(data.get("resumed", 0)),
        )


@dataclass
class ScrubRecord:
    """``last``: the last finished pass's result as `cachepoint scrub --json` prints it (None: never
    scrubbed). ``current``: a pass in progress or interrupted. ``armed_ns``: when a daemon first
    scheduled scrubs on this store (the first scheduled pass is due one interval later)."""

    last: dict[str, Any] | None = None
    current: PassState | None = None
    armed_ns: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "last": self.last,
            "current": self.current.as_json() if self.current is not None else None,
            "armed_ns": self.armed_ns,
        }


def load_record(store: Store) -> ScrubRecord:
    raw = store.db.meta(fmt.META_SCRUB)
    if raw is None:
        return ScrubRecord()
    data = json.loads(raw)
    if data.get("format") != RECORD_FORMAT:
        # A newer writer's record: not understood, so not used; the next pass starts from zero
        # and writes this format.
        return ScrubRecord()
    current = data.get("current")
    return ScrubRecord(
        last=data.get("last"),
        current=PassState.from_json(current) if current else None,
        armed_ns=int(data.get("armed_ns", 0)),
    )


def save_record(store: Store, record: ScrubRecord, sync: bool = False) -> None:
    batch = store.db.batch()
    batch.put(fmt.META_SCRUB, json.dumps(record.as_json()).encode(), store.db.handle[fmt.CF_META])
    store.db.write(batch, sync=sync)


def arm(store: Store) -> ScrubRecord:
    """Note when scheduling started, once per store; returns the record."""
    record = load_record(store)
    if not record.armed_ns:
        record.armed_ns = time.time_ns()
        save_record(store, record, sync=True)
    return record


def estimated_blocks(store: Store) -> int:
    """RocksDB's estimate of the number of stored blocks (cheap; for a progress bar's end)."""
    try:
        return int(store.db.cf[fmt.CF_BLOCKS].property_int_value("rocksdb.estimate-num-keys") or 0)
    except Exception:  # a property the database cannot give is only a bar without an end
        return 0
