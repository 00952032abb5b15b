"""Cancelling Watch streams must leave the coordinator's event log usable.

Every Watch handler at the coordinator parks in ``EventLog.wait_beyond`` and every Commit wakes them
through ``EventLog.published``. When the coordinator stops, gRPC cancels the parked handlers, and a
handler can be cancelled a second time while the first cancellation is still unwinding. With the
first implementation (an asyncio.Condition behind ``asyncio.wait_for``) that sequence was seen with
real daemons: the coordinator logged ``CatalogService.Watch failed ... RuntimeError: Lock is not
acquired.`` on SIGTERM, answered the stream with INTERNAL, and left the Condition's lock taken by no
one, so while serving the next Commit would never have returned.

This drives the real EventLog through that sequence in one event loop, without processes, so it
happens every time, and then checks that a commit still reaches a new watcher.

The loop runs in a thread of its own: a task wedged on a lock can refuse cancellation, and a loop
that is torn down by cancelling its tasks (as pytest's would be) would then never finish. Here a
wedge is a failed assertion, not a hung test run.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, version_pb2
from coordinator.catalog.events import EventLog
from tests.fleet import open_coordinator_store

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

WAIT = 15.0  # the handlers' keepalive wait: far longer than this test runs
BOUND = 5.0  # seconds allowed for anything that should be immediate
TURNS = 20  # event-loop turns that let a new task reach its first await (no wall clock involved)


async def let_tasks_park() -> None:
    for _ in range(TURNS):
        await asyncio.sleep(0)


async def settle(tasks: list[asyncio.Task[None]], what: str) -> None:
    """Wait for ``tasks`` to end without cancelling them on timeout; fail if any is still running."""
    _, pending = await asyncio.wait(tasks, timeout=BOUND)
    assert not pending, f"{len(pending)} of {len(tasks)} tasks still running {BOUND:.0f}s after {what}"


async def commit_event(store: Store, events: EventLog) -> int:
    """Record one tag move the way a Commit does: staged in a batch, written, then announced."""
    batch = store.db.batch()
    move = version_pb2.TagMove(layer="os/x", tag="production", number=1)
    events.stage(batch, catalog_pb2.CatalogEvent(tag_moved=move))
    store.db.write(batch, sync=True)
    announce = asyncio.create_task(events.published())
    await settle([announce], "announcing a commit (a Commit RPC would hang here)")
    announce.result()
    return events.position


async def cancel_twice_then_commit(store: Store) -> None:
    events = EventLog(store)
    start = events.position
    watchers = [asyncio.create_task(events.wait_beyond(start, WAIT)) for _ in range(3)]
    await let_tasks_park()
    assert not any(task.done() for task in watchers), "a watcher returned with nothing to see"

    # What a server shutdown delivers: a cancellation, then another before the first has unwound.
    for task in watchers:
        task.cancel()
    await asyncio.sleep(0)
    for task in watchers:
        task.cancel()
    await settle(watchers, "cancelling the watchers (wedged on a lock?)")
    outcomes = ["cancelled" if task.cancelled() else repr(task.exception()) for task in watchers]
    assert outcomes == ["cancelled"] * len(watchers), (
        f"a cancelled watcher must end cancelled (its stream then ends CANCELLED, not INTERNAL): {outcomes}"
    )

    # The log still works: a new watcher hears of the next commit, whose announcement does not block.
    watcher = asyncio.create_task(events.wait_beyond(start, WAIT))
    await let_tasks_park()
    assert not watcher.done()
    position = await commit_event(store, events)
    assert position == start + 1
    await settle([watcher], "the commit that should wake the watcher")
    watcher.result()
    assert [e.position for e in events.read_after(start)] == [position]


def test_watchers_cancelled_twice_end_cancelled_and_a_later_commit_still_reaches_a_new_watcher(
    tmp_path: Path,
) -> None:
    store = open_coordinator_store(tmp_path / "store")
    failure: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(cancel_twice_then_commit(store))
        except BaseException as err:  # handed to the test thread
            failure.append(err)
        # The loop is left unclosed on purpose: closing it would try to finish wedged tasks.

    thread = threading.Thread(target=run, name="event-log", daemon=True)
    thread.start()
    thread.join(4 * BOUND)
    try:
        assert not thread.is_alive(), f"the event log's loop did not finish within {4 * BOUND:.0f}s"
        if failure:
            raise failure[0]
    finally:
        if not thread.is_alive():
            store.close()
