"""Points in time as users write them (``--at``, ``--from``, ``--to``) and as records keep them (ns)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from cachepoint.config import parse_duration
from cachepoint.errors import InvalidInput

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HELP = "write it as ISO 8601 (2026-11-26T13:54:57Z; no offset means UTC), 'now' or now-DURATION (now-2h)"


def parse_time(text: str, what: str = "time", *, end: bool = False) -> int:
    """Nanoseconds since the epoch from ``2026-11-26T13:54:57.123456Z``, ``2026-11-26``, ``now`` or
    ``now-30d``. ISO times carry at most microseconds; ``end`` gives the last nanosecond of the named
    microsecond, so ``--at`` or ``--to`` with a time printed by the timeline includes that version."""
    text = text.strip()
    if text == "now":
        return time.time_ns()
    if text.startswith("now-"):
        return time.time_ns() - int(parse_duration(text[4:]) * 1e9)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise InvalidInput(f"{what} {text!r}: {_HELP}") from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    start = (moment - _EPOCH) // timedelta(microseconds=1) * 1000
    return start + 999 if end else start


def iso(ns: int) -> str:
    """ISO 8601 in UTC with microseconds: what parse_time reads back to the same microsecond."""
    moment = _EPOCH + timedelta(microseconds=ns // 1000)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_range(from_ns: int, to_ns: int) -> None:
    if from_ns and to_ns and from_ns > to_ns:
        raise InvalidInput(f"time range: from ({iso(from_ns)}) is after to ({iso(to_ns)})")
