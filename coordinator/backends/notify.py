"""Wake this replica's Watch streams when any replica writes catalog events: LISTEN on the channel
every batch with events notifies (records.EVENTS_CHANNEL, sent in the batch's transaction, so it
arrives only once the events can be read). The same connection hears changes of fleet trust
(trust_tables.TRUST_CHANNEL), which make this replica read its revocations and assignments again.
A lost connection is made again, and what was notified meanwhile is read from the log
(``catch_up``) and the trust tables (read again); Watch streams also look at the log every
keepalive, and the trust copies are read every FOLLOW_S whatever is heard."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

from coordinator.backends.records import EVENTS_CHANNEL
from coordinator.backends.trust_tables import TRUST_CHANNEL
from coordinator.catalog.events import EventLog

log = logging.getLogger(__name__)
RETRY_S = 1.0


async def listen(
    dsn: str, events: EventLog, where: str, trust_changed: Callable[[], None] | None = None
) -> None:
    """Run until cancelled. ``trust_changed``: called when fleet trust changed (trust_tables.py)."""
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                if trust_changed is not None:
                    await conn.execute(f"LISTEN {TRUST_CHANNEL}")
                    trust_changed()  # what changed before the LISTEN took effect
                await events.catch_up()  # what was written before the LISTEN took effect
                async for note in conn.notifies():
                    if note.channel == TRUST_CHANNEL:
                        if trust_changed is not None:
                            trust_changed()
                        continue
                    try:
                        events.seen_elsewhere(int(note.payload))
                    except ValueError:
                        log.warning("%s: notification %r is not a position", where, note.payload)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the database restarted, failed over, or is unreachable: try again
            log.warning("%s: catalog notifications lost (%s); listening again in %.0f s", where, err, RETRY_S)
            await asyncio.sleep(RETRY_S)
