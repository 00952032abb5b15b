"""Rate limits per source class (``wan_rate = "100Mbit"``): a token bucket per class, shared by every
stream of that class, paid after each batch arrives so gRPC flow control slows the sender."""

from __future__ import annotations

import asyncio
import re
import time

from cachepoint.errors import InvalidInput
from cachepoint.replication.sources import SourceClass

# NUMBER, a prefix (SI k M G T, or binary Ki Mi Gi Ti), a unit, then "/s" or "ps". A lower-case b is a
# bit and an upper-case B a byte, as on every network datasheet ("10Mbps" is ten megabits, "10MBps" ten
# megabytes); bit(s) and byte(s) may be spelled out in any case; no unit means bytes.
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(i?))?((?i:bits?|bytes?)|[bB])?(/s|ps)?\s*$")
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
RATE_EXAMPLES = "100Mbit or 10Mbps (bits/s), 12MiB/s or 20MB/s (bytes/s), or 0 (unlimited)"


def parse_rate(text: str) -> float:
    """Bytes per second from a rate in bits (``100Mbit``, ``10Mbps``, ``1.5Gbit/s``) or in bytes
    (``12MiB/s``, ``20MB``, ``500k``). 0 = unlimited."""
    match = _RATE_RE.match(text)
    if not match:
        raise InvalidInput(f"rate {text!r}: write it like {RATE_EXAMPLES}")
    number, prefix, binary, unit = match.group(1), match.group(2) or "", match.group(3), match.group(4) or "B"
    value = float(number) * (_BINARY_SCALE if binary else _SCALE)[prefix.lower()]
    in_bits = unit == "b" or unit.lower().startswith("bit")
    return value / 8 if in_bits else value


class TokenBucket:
    def __init__(self, rate: float, burst_seconds: float = 0.25) -> None:
        self.rate = rate
        self.capacity = max(rate * burst_seconds, 1.0)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def pay(self, amount: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            self.tokens -= amount
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)


def class_limits(wan_rate: str, site_rate: str) -> dict[SourceClass, float]:
    """The WAN rate applies to peers of other sites and to the origin; the site rate to site peers."""
    wan = parse_rate(wan_rate or "0")
    return {SourceClass.SITE: parse_rate(site_rate or "0"), SourceClass.PEER: wan, SourceClass.ORIGIN: wan}
