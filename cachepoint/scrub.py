"""Scrub: read every stored block back, check it against its id, and heal the bad ones from the fleet.

A pass walks the blocks family in key order, a batch at a time; reading and hashing run on a worker
thread (RocksDB, SHA-256 and zstd release the GIL), so the daemon's event loop keeps serving peers
and disks while it runs. The stored bytes read are paid to a token bucket (``scrub_rate``,
``--rate``), which is what keeps a scrub from taking the disk away from serving; at the default
50 MiB/s a 1 TiB store takes about six hours. The pass saves its cursor every few seconds and when
it is stopped, so the next pass (after a restart, or the next `cachepoint scrub`) goes on from
there instead of from zero.

When the walk is done, the bad blocks that something still uses (a version, an attached disk's
writes, an ingest in progress) are handed to a heal function (cachepoint/replication/heal.py in a
daemon or with a coordinator); bad blocks that nothing uses are only reported (GC removes them).
The result goes into the store's scrub record, which `cachepoint status` and `cachepoint fsck
--json` show.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from cachepoint.console import when
from cachepoint.errors import BlockUnreadable, CachepointError
from cachepoint.ids import BlockId
from cachepoint.replication.heal import HealResult
from cachepoint.replication.ratelimit import TokenBucket
from cachepoint.store import census
from cachepoint.store.scrub import (
    BadBlock,
    PassState,
    arm,
    check_batch,
    estimated_blocks,
    load_record,
    save_record,
)
from cachepoint.store.store import Store

log = logging.getLogger("cachepoint.scrub")

BATCH_BLOCKS = 64  # 4 MiB of 64 KiB blocks: a short stretch of work between two looks at the stop flag
SAVE_SECONDS = 5.0  # at most this much of a pass is read again after a crash
LISTED = 100  # ids listed in a result (the counts are always complete)
RETRY_SECONDS = 300.0  # after a scheduled pass failed (e.g. the disk was full when saving the record)
LONGEST_SLEEP = 3600.0  # a scheduled wait is re-evaluated at least this often (a manual pass moves it)
DEFAULT_EVERY = 7 * 86400.0
DEFAULT_RATE = 50 * 1024 * 1024

HealFn = Callable[[list[bytes]], Awaitable[HealResult]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ScrubProgress:
    blocks_done: int
    blocks_total: int  # RocksDB's estimate: the end of a progress bar, not a promise
    bytes_done: int
    started_ns: int

    def as_json(self) -> dict[str, Any]:
        return {
            "started": when(self.started_ns),
            "started_ns": self.started_ns,
            "blocks_checked": self.blocks_done,
            "blocks_estimated": self.blocks_total,
            "bytes_checked": self.bytes_done,
        }


ProgressFn = Callable[[ScrubProgress], None]


@dataclass
class ScrubResult:
    started_ns: int
    finished_ns: int = 0
    rate: float = 0.0
    blocks_checked: int = 0
    bytes_checked: int = 0
    bad: list[BadBlock] = field(default_factory=list)  # corrupt or unreadable, as found
    healed: list[bytes] = field(default_factory=list)
    still_bad: list[BadBlock] = field(default_factory=list)  # used by something, and not healed
    unused_bad: list[BadBlock] = field(default_factory=list)  # bad but used by nothing: GC removes them
    healed_from: dict[str, dict[str, int]] = field(default_factory=dict)
    heal_detail: str = ""
    scan_error: str = ""  # the blocks family could not be read past some point: the pass is partial
    resumed: int = 0
    complete: bool = True  # False: stopped before the end (the next pass goes on from there)

    @property
    def ok(self) -> bool:
        return self.complete and not self.still_bad and not self.scan_error

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "complete": self.complete,
            "started": when(self.started_ns),
            "started_ns": self.started_ns,
            "finished": when(self.finished_ns) if self.finished_ns else None,
            "finished_ns": self.finished_ns,
            "resumed": self.resumed,
            "rate": self.rate,
            "blocks_checked": self.blocks_checked,
            "bytes_checked": self.bytes_checked,
            "corrupt_found": len(self.bad),
            "healed": len(self.healed),
            "still_bad": len(self.still_bad),
            "unused_bad": len(self.unused_bad),
            "healed_blocks": [str(BlockId(d)) for d in self.healed[:LISTED]],
            "still_bad_blocks": [b.as_json() for b in self.still_bad[:LISTED]],
            "unused_bad_blocks": [b.as_json() for b in self.unused_bad[:LISTED]],
            "healed_from": self.healed_from,
            "heal_detail": self.heal_detail or None,
            "scan_error": self.scan_error or None,
        }


async def _off_loop(func: Callable[..., T], *args: Any) -> T:
    """``func`` on a worker thread. If the caller is cancelled, the thread is still waited for before
    the cancellation goes on: the store must not be closed under a read in progress."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _split_used(store: Store, bad: list[BadBlock]) -> tuple[list[BadBlock], list[BadBlock]]:
    """(bad blocks something uses, bad blocks nothing uses). Reads every manifest: only called when
    a pass found damage."""
    found = census.take(store)
    if not found.complete:
        # Part of the catalog cannot be read, so "nothing uses it" cannot be proven: heal them all.
        return list(bad), []
    used = found.referenced_blocks() | store.working_block_ids()
    with store.lock:
        pinned = {b.digest for b in bad if store.is_pinned(b.digest)}
    needed = [b for b in bad if b.digest in used or b.digest in pinned]
    return needed, [b for b in bad if b.digest not in used and b.digest not in pinned]


def _still_here(store: Store, bad: list[BadBlock]) -> list[BadBlock]:
    """Those of ``bad`` still in the store (GC may have removed some while the heal ran)."""
    left = []
    for block in bad:
        try:
            if store.blocks.raw(block.digest) is not None:
                left.append(block)
        except BlockUnreadable:
            left.append(block)
    return left


async def scrub(
    store: Store,
    *,
    rate: float = 0.0,
    heal: HealFn | None = None,
    progress: ProgressFn | None = None,
    stop: asyncio.Event | None = None,
) -> ScrubResult:
    """One pass over every stored block (going on with an interrupted pass, if the record has one).

    ``rate``: stored bytes read per second (0: unlimited). ``heal``: called with the ids of the bad
    blocks something uses (None: report them only). ``stop``: set it to end the pass at the next
    batch; the pass is then saved for the next one and the result has ``complete`` False.
    """
    record = await _off_loop(load_record, store)
    state = record.current
    if state is None:
        state = record.current = PassState(time.time_ns())
    else:
        state.resumed += 1
        log.info("scrub: going on with the pass started %s", when(state.started_ns))
    total = await _off_loop(estimated_blocks, store)
    bucket = TokenBucket(rate) if rate > 0 else None
    result = ScrubResult(state.started_ns, rate=rate, resumed=state.resumed)
    saved = time.monotonic()
    try:
        while True:
            if stop is not None and stop.is_set():
                result.complete = False
                break
            check = await _off_loop(check_batch, store, state.cursor, BATCH_BLOCKS)
            state.blocks_checked += check.blocks
            state.bytes_checked += check.bytes
            state.cursor = check.last_key or state.cursor
            for bad in check.bad:
                log.warning("scrub: %s %s (%s)", bad.kind, BlockId(bad.digest).short(), bad.detail)
            state.bad.extend(check.bad)
            if progress is not None:
                progress(ScrubProgress(state.blocks_checked, total, state.bytes_checked, state.started_ns))
            if check.error:
                result.scan_error = f"the blocks cannot be read past {state.blocks_checked}: {check.error}"
                log.warning("scrub: %s", result.scan_error)
                break
            if check.blocks < BATCH_BLOCKS:
                break
            if bucket is not None:
                await bucket.pay(check.bytes)
            if time.monotonic() - saved >= SAVE_SECONDS:
                await _off_loop(save_record, store, record)
                saved = time.monotonic()
    except asyncio.CancelledError:
        save_record(store, record, sync=True)  # a quick write: the next pass goes on from here
        raise
    result.blocks_checked, result.bytes_checked = state.blocks_checked, state.bytes_checked
    if not result.complete:
        await _off_loop(save_record, store, record, True)
        return result
    result.bad = list({b.digest: b for b in state.bad}.values())
    if result.bad:
        needed, result.unused_bad = await _off_loop(_split_used, store, result.bad)
        result.still_bad = needed
        if needed and heal is not None:
            healed = await heal([b.digest for b in needed])
            missing = set(healed.missing)
            result.healed = healed.healed
            result.healed_from = healed.by_class()
            result.heal_detail = healed.detail
            result.still_bad = await _off_loop(_still_here, store, [b for b in needed if b.digest in missing])
        elif needed:
            result.heal_detail = "no fleet to heal from (no daemon, no coordinator)"
    result.finished_ns = time.time_ns()
    record.last, record.current = result.as_json(), None
    await _off_loop(save_record, store, record, True)
    return result


def seconds_until_due(store: Store, every: float) -> float:
    """When the next scheduled pass is due: now if a pass was interrupted, else ``every`` after the
    last pass finished (or after scheduling started, for a store never scrubbed)."""
    record = load_record(store)
    if record.current is not None:
        return 0.0
    base = int(record.last["finished_ns"]) if record.last else record.armed_ns
    return max(0.0, (base - time.time_ns()) / 1e9 + every)


async def schedule(store: Store, every: float, run: Callable[[], Awaitable[ScrubResult]]) -> None:
    """Run ``run`` whenever a pass is due, forever (a daemon's background task). A failed pass is
    logged and tried again later: a scrub never stops the daemon."""
    await _off_loop(arm, store)
    while True:
        wait = await _off_loop(seconds_until_due, store, every)
        if wait > 0:
            await asyncio.sleep(min(wait, LONGEST_SLEEP))
            continue
        try:
            result = await run()
            log.info(
                "scrub: %d blocks checked, %d bad, %d healed, %d still bad",
                result.blocks_checked,
                len(result.bad),
                len(result.healed),
                len(result.still_bad),
            )
        except (CachepointError, grpc.aio.AioRpcError) as err:
            log.warning("scheduled scrub failed: %s; trying again in %.0fs", err, RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)
