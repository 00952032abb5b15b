"""Giving memory back to the system after a burst of load.

glibc's allocator keeps freed memory for reuse unless it sits at the very top of a heap, so after
a burst of large buffers (NBD payloads, gRPC messages) the daemon's resident size stayed high long
after the clients had gone: measured, 200 FetchBlocks streams that were never read left ~150 MB
resident for good, of which malloc_trim(0) gave back ~50 MB at once. So when a burst ends (an NBD
connection closes, the last FetchBlocks stream of a wave ends) ``after_load`` asks for one trim a
moment later, at most one per SETTLE_SECONDS. A trim walks every arena and costs milliseconds, off
the event loop. Without glibc (musl) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

SETTLE_SECONDS = 2.0  # the rest of a burst (other connections closing) lands before the trim


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_malloc_trim = _find_malloc_trim()
_pending: asyncio.Task[None] | None = None


def trim_now() -> None:
    """Give free heap pages back to the system (blocking; glibc only)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def after_load() -> None:
    """Schedule a trim on the running loop, unless one is already due."""
    global _pending
    if _malloc_trim is None or (_pending is not None and not _pending.done()):
        return
    _pending = asyncio.get_running_loop().create_task(_trim_later(), name="malloc_trim")


async def _trim_later() -> None:
    await asyncio.sleep(SETTLE_SECONDS)
    try:
        await asyncio.to_thread(trim_now)
    except Exception:  # never worth more than a log line
        log.exception("malloc_trim failed")
