"""The daemon's pulls stop at ``min_free`` and start again when space returns.

``check`` runs before every batch of fetched blocks is written (and before a pull starts): when the
batch would leave less than ``min_free`` available (cachepoint/store/space.py says what counts), it
first flushes the memtables (blocks received from peers are in the WAL and in a memtable until a
flush; after it the WAL is deleted, so they count once), and if that is not enough raises
PullsPaused. When the pull has stopped, ``settle`` flushes what the batches still in flight left in
the WAL, room permitting, so a paused store's WAL holds (nearly) nothing: reopening it (a GC after
the daemon stopped, on a disk someone else filled meanwhile) does not have to write a large memtable
out first. A batch counts twice until a flush (in the WAL and in a memtable), and batches of other
streams being written count too, so a pull pauses up to a few batches before ``min_free`` is reached.

The pull then gives up and unpins what it fetched (a GC may collect it); the next pull plans again
and fetches only what is missing. ``watch`` measures on a timer and opens the gate again once
``min_free`` plus a margin is available, so a pull that resumes has room for more than a batch.

Not guarded: reads of lazily attached disks (a read never fails because of ``min_free``; it fetches
only what it reads) and RocksDB's own compactions, which need room for what they rewrite.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from cachepoint.console import human
from cachepoint.errors import PullsPaused
from cachepoint.store.headroom import ensure_reserve, reserve_size
from cachepoint.store.space import Room, SpaceLimit, measure
from cachepoint.store.store import Store

log = logging.getLogger("cachepoint.daemon")

CHECK_SECONDS = 2.0
RESUME_SHARE = 100  # pulls resume once min_free plus 1% of the file system...
RESUME_MIN = 16 << 20  # ...but at least this much more (several batches in flight pause it earlier)...
RESUME_MAX = 1 << 30  # ...and at most this much more is available


class PullGate:
    def __init__(self, store: Store, min_free: SpaceLimit, reserve: int) -> None:
        self.store = store
        self.min_free = min_free
        self.reserve = reserve  # as configured; the reserve's size follows the store's (headroom.py)
        self.reserve_target = reserve_size(store.root, reserve)
        self.paused: PullsPaused | None = None
        self.last: Room | None = None
        self._open = asyncio.Event()
        self._open.set()
        # One check at a time, and no measurement while a check flushes: mid-flush the memtable is both
        # in the new SST file and still counted as unflushed, so the disk would look full.
        self._lock = threading.Lock()

    def measure(self) -> Room:
        with self._lock:
            return self._measure()

    def _measure(self) -> Room:
        self.last = measure(self.store, self.reserve_target)
        return self.last

    def limit(self, room: Room) -> int:
        return self.min_free.of(room.total)

    def _paused(self, room: Room) -> PullsPaused:
        limit = self.limit(room)
        return PullsPaused(human(room.available), self.min_free, human(limit), self.store.root)

    def check(self, incoming: int = 0) -> None:
        """Raise PullsPaused unless ``incoming`` more bytes leave ``min_free`` available (blocking:
        call it on a worker thread)."""
        with self._lock:
            room = self._measure()
            # Until the next flush, received blocks take their size twice: in the WAL and in a memtable.
            if room.available - 2 * incoming >= self.limit(room):
                return
            if self._flush_if_room(room):
                room = self._measure()
                if room.available - 2 * incoming >= self.limit(room):
                    return
            raise self._paused(room)

    def settle(self) -> None:
        """After a pull paused: flush what the batches still being written when it stopped left in
        the WAL, when there is room (blocking: call it on a worker thread)."""
        with self._lock:
            self._flush_if_room(self._measure())

    def _flush_if_room(self, room: Room) -> bool:
        # The flush writes the memtables out before the WAL goes, so it needs them free once more.
        if not room.unflushed or room.free - room.reserve_missing < room.unflushed:
            return False
        for family in list(self.store.db.cf):
            self.store.db.flush(family)
        return True

    def note_paused(self, err: PullsPaused) -> None:
        """Record a pause a pull ran into (call on the event loop)."""
        if self.paused is None:
            log.warning("%s", err)
        self.paused = err
        self._open.clear()

    async def wait_for_room(self) -> None:
        await self._open.wait()

    async def watch(self) -> None:
        """Every CHECK_SECONDS: grow the reserve with the store when space allows, then pause pulls
        when space runs low and resume them when it is back."""
        while True:
            self.reserve_target = await asyncio.to_thread(reserve_size, self.store.root, self.reserve)
            await asyncio.to_thread(ensure_reserve, self.store.root, self.reserve)
            room = await asyncio.to_thread(self.measure)
            limit = self.limit(room)
            if self.paused is not None:
                margin = min(max(room.total // RESUME_SHARE, RESUME_MIN), RESUME_MAX)
                if room.available >= limit + margin:
                    log.warning(
                        "pulls resumed: %s free, min_free %s (%s)",
                        human(room.available),
                        self.min_free,
                        human(limit),
                    )
                    self.paused = None
                    self._open.set()
            elif room.available < limit:
                self.note_paused(self._paused(room))
            await asyncio.sleep(CHECK_SECONDS)
