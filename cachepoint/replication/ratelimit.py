"""Rate limits per source class (``wan_rate = "100Mbit"``): a token bucket per class, shared by every
stream of that class, paid after each batch arrives so gRPC flow control slows the sender."""

from __future__ import annotations

import asyncio
import re
import time

from cachepoint.errors import InvalidInput
from cachepoint.replication.sources import SourceClass

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?)(bit|b|byte|bytes)?(?:/s|ps)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
_BINARY_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_rate(text: str) -> float:
    """Bytes per second from ``100Mbit``, ``20MB``, ``1.5Gbit/s``, ``500k`` (bytes), ``50MiB/s``
    (binary). 0 = unlimited."""
    match = _RATE_RE.match(text)
    if not match:
        raise InvalidInput(f"rate {text!r}: write it like 100Mbit, 20MB, 50MiB/s or 0 (unlimited)")
    scale = _BINARY_SCALE if match.group(3) else _SCALE
    value = float(match.group(1)) * scale[match.group(2).lower()]
    unit = (match.group(4) or "b").lower()
    return value / 8 if unit == "bit" else value


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
