"""What an NBD server may hold in memory for its clients, and for how long a client may stall.

A WRITE's payload is held from the moment the server starts reading it until the device has applied
it; a READ's reply from the moment it is read from the device until the socket has taken it. Each is
counted twice: against its connection (MAX_IN_FLIGHT_BYTES in transmission.py, so one client keeps
several requests in flight but cannot hold everything) and against the server (``write_budget``,
READ_REPLY_BUDGET), so that many connections together stay under a fixed amount. A connection that
finds the server's budget used up stops reading its socket until another request gives bytes back:
the client is held back by TCP, not buffered. A client that stalls in the middle of a request (a
WRITE header and part of its payload, or a reply it never reads) is cut off after ``idle_timeout``
of no progress, which gives its share of the budget back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

WRITE_BUDGET = 64 * 1024 * 1024  # default `nbd_write_budget`: two 32 MiB writes, or 16 of qemu's 2 MiB
READ_REPLY_BUDGET = 64 * 1024 * 1024  # read replies held at once, all connections together
IDLE_SECONDS = 30.0  # default `nbd_idle_timeout`, as the kernel client's own default timeout


@dataclass(frozen=True, slots=True)
class NbdLimits:
    write_budget: int = WRITE_BUDGET
    """Bytes of WRITE payload all connections together may hold at once."""
    idle_timeout: float = IDLE_SECONDS
    """Seconds a client may send nothing in the middle of a request (or read nothing of a reply it
    is owed) before its connection is dropped. Idle between requests is not limited."""

    def __post_init__(self) -> None:
        if self.write_budget <= 0:
            raise ValueError(f"nbd_write_budget must be positive, got {self.write_budget}")
        if self.idle_timeout <= 0:
            raise ValueError(f"nbd_idle_timeout must be positive, got {self.idle_timeout}")


class Budget:
    """Bytes held, taken before a payload is read or produced and given back once it is gone. A
    request larger than the whole budget still runs, alone (it would otherwise wait forever)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def take(self, amount: int) -> None:
        while self.used and self.used + amount > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += amount

    def try_take(self, amount: int) -> bool:
        """``take`` without waiting: False (and nothing taken) when it would wait."""
        if self.used and self.used + amount > self.limit:
            return False
        self.used += amount
        return True

    def give(self, amount: int) -> None:
        self.used -= amount
        self._freed.set()


class ServerBudgets:
    """The budgets every connection of one server shares."""

    def __init__(self, limits: NbdLimits) -> None:
        self.limits = limits
        self.writes = Budget(limits.write_budget)
        self.reads = Budget(READ_REPLY_BUDGET)
