"""The catalog's event log: every commit and tag move, numbered, durable, and waitable.

Events are written in the same RocksDB batch as the change they describe (see
cachepoint/store/format.py, family ``events``), so a Watch client that resumes from its last
position misses nothing and sees nothing that did not happen.
"""

from __future__ import annotations

import asyncio
import bisect
import threading

import rocksdict

from cachepoint.store import format as fmt
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2

RECENT_EVENTS = 4096  # events a shared log keeps in memory for the Watch streams (~1 MiB)


class EventLog:
    """``position`` is the last position handed out; ``visible`` the last one written and announced.

    Watchers wait on an asyncio.Event that is replaced at every announcement, not on a Condition:
    a watcher cancelled while it re-acquires a Condition's lock can leave that lock broken for
    every later commit (seen when the coordinator stops with Watch streams open).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        last = self._last_written()
        self.position = last
        self.visible = last
        self._announced: asyncio.Event | None = None
        self._recent: list[catalog_pb2.CatalogEvent] = []  # shared: the newest events read, in order
        self._recent_base = self._recent_top = last  # it holds every event in (base, top]
        self._recent_lock = threading.Lock()
        self.closing = False

    def _last_written(self) -> int:
        for key in self.store.db.cf[fmt.CF_EVENTS].keys(backwards=True):
            return fmt.read_u64(key)
        return 0

    def _event(self) -> asyncio.Event:
        # Created lazily: it must belong to the running event loop.
        if self._announced is None:
            self._announced = asyncio.Event()
        return self._announced

    def stage(self, batch: rocksdict.WriteBatch, event: catalog_pb2.CatalogEvent) -> None:
        """Number the event and add it to the batch of the change it records (under the commit lock)."""
        with self._lock:
            if self.store.db.shared:  # other replicas number events too (in the same write section)
                self.position = max(self.position, self._last_written())
            self.position += 1
            event.position = self.position
        batch.put(fmt.u64(event.position), event.SerializeToString(), self.store.db.handle[fmt.CF_EVENTS])

    async def published(self) -> None:
        """Wake the watchers after a batch with events was written."""
        self.visible = self.position
        announced, self._announced = self._event(), asyncio.Event()
        announced.set()

    def seen_elsewhere(self, position: int) -> None:
        """Another replica wrote events up to ``position`` (its notification, backends/notify.py)."""
        if position > self.visible:
            # (``position`` is not touched: stage() reads the log's end itself, under the write section.)
            self.visible = position
            announced, self._announced = self._event(), asyncio.Event()
            announced.set()

    async def catch_up(self) -> int:
        """``visible`` as the shared log has it now (a Watch resuming with a position it got from another
        replica, maybe ahead of this one's last notification)."""
        if self.store.db.shared:
            self.seen_elsewhere(await asyncio.to_thread(self._last_written))
        return self.visible

    def close(self) -> None:
        """End every Watch stream (they check ``closing`` when woken), so the server stops at once."""
        self.closing = True
        self._event().set()

    def read_after(self, after: int, limit: int = 1000) -> list[catalog_pb2.CatalogEvent]:
        """Events after ``after``, oldest first. Shared, the newest events are kept in memory: a commit
        wakes every Watch stream of the replica at once, and one query then serves them all."""
        if not self.store.db.shared:
            return self._read(after, limit)
        with self._recent_lock:
            # Invariant: _recent holds every event with _recent_base < position <= _recent_top.
            if after < self._recent_base:
                return self._read(after, limit)  # older than what is kept
            if self._recent_top < self.visible:
                more = self._read(self._recent_top, RECENT_EVENTS)
                if more:
                    self._recent.extend(more)
                    self._recent_top = more[-1].position
                excess = len(self._recent) - RECENT_EVENTS
                if excess > 0:
                    self._recent_base = self._recent[excess - 1].position
                    del self._recent[:excess]
                if after < self._recent_base:
                    return self._read(after, limit)
            start = bisect.bisect_right([event.position for event in self._recent], after)
            return self._recent[start : start + limit]

    def _read(self, after: int, limit: int) -> list[catalog_pb2.CatalogEvent]:
        events = []
        for _, raw in self.store.db.cf[fmt.CF_EVENTS].items(from_key=fmt.u64(after + 1)):
            event = catalog_pb2.CatalogEvent()
            event.ParseFromString(raw)
            events.append(event)
            if len(events) >= limit:
                break
        return events

    async def wait_beyond(self, position: int, timeout: float) -> None:
        """Return when an event after ``position`` is visible, or after ``timeout`` seconds."""
        if self.visible > position or self.closing:
            return
        try:
            await asyncio.wait_for(self._event().wait(), timeout)
        except TimeoutError:
            pass
