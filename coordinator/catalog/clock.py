"""Placing a device's version in the coordinator's time.

A device stamps a version with its own clock when it makes it (``created_ns``) and every commit with its
clock when it sends it (``sent_ns``). The coordinator measures the device's skew when the commit arrives
(``sent_ns`` minus its own clock) and keeps the version at a time its own clock vouches for:

- within CLOCK_TOLERANCE_NS the device's time is kept as it is: clocks kept by NTP agree to
  milliseconds, and a correction by a reading that includes the network's transit would only blur them;
- beyond it, the device's time minus the skew: when the version was made, on the coordinator's clock
  (logged as a warning naming the device and both clocks);
- beyond MAX_CLOCK_SKEW_NS the commit is refused (FAILED_PRECONDITION, naming the device, both clocks
  and the limit). A clock that far off is not drifting but reset or mistyped, and will be set again at
  any moment: one reading at delivery says nothing reliable about what it said when the version was
  made. The version is not lost: it waits in the device's outbox, which delivers it once the clock is set;
- in every case never after the version arrived, and never before the version it was made from.

The device's own time and the skew stay in the version (``device_created_ns``, ``clock_skew_ns``) and
the timeline shows them. What a single reading cannot catch, a clock set between making a version and
delivering it, is why retention also judges each version by its arrival (history/retention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cachepoint.model import Arrival
from cachepoint.rpc.errors import PreconditionFailed
from coordinator.history.times import iso

SECOND_NS = 1_000_000_000
DAY_NS = 86_400 * SECOND_NS
CLOCK_TOLERANCE_NS = 2 * SECOND_NS
MAX_CLOCK_SKEW_DAYS = 30
MAX_CLOCK_SKEW_NS = MAX_CLOCK_SKEW_DAYS * DAY_NS


class ClockTooFarOff(PreconditionFailed):
    """commit of {} refused: device {!r}'s clock says {}, the coordinator's {} ({} apart; limit {} days)"""


def span(ns: int) -> str:
    """A skew as people read it: ``1 day, 0:00:03 ahead`` or ``0:05:00 behind``."""
    text = str(timedelta(seconds=round(abs(ns) / SECOND_NS)))
    return f"{text} {'ahead' if ns > 0 else 'behind'}"


@dataclass(frozen=True, slots=True)
class Placement:
    created_ns: int
    """The time the coordinator keeps for the version."""
    arrival: Arrival
    corrected: bool
    """The device's clock was off by more than the tolerance, and its time was corrected."""


def place(
    ref: str, device: str, created_ns: int, sent_ns: int, received_ns: int, parent_created_ns: int
) -> Placement:
    """Where a version made on ``device`` goes on the coordinator's clock (see the module docstring).

    ``created_ns``/``sent_ns``: the device's clock when it made the version and when it sent it (0: not
    given); ``received_ns``: the coordinator's clock at arrival; ``parent_created_ns``: the kept time of
    the version it was made from (0: none)."""
    skew = sent_ns - received_ns if sent_ns else 0
    if abs(skew) > MAX_CLOCK_SKEW_NS:
        raise ClockTooFarOff(
            ref, device, iso(sent_ns), iso(received_ns), span(skew).rsplit(" ", 1)[0], MAX_CLOCK_SKEW_DAYS
        )
    claimed = created_ns or received_ns
    corrected = abs(skew) > CLOCK_TOLERANCE_NS
    placed = claimed - skew if corrected else claimed
    placed = max(min(placed, received_ns), parent_created_ns)
    return Placement(placed, Arrival(received_ns, created_ns, skew), corrected)
