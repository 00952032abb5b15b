"""Giving memory back to the system after a burst of load.

glibc's allocator keeps freed memory for reuse unless it sits at the very top of a heap, so after
a burst of large buffers (NBD payloads, gRPC messages) the daemon's resident size stayed high long
after the clients had gone: measured, 200 FetchBlocks streams that were never read left ~150 MB
resident for good, of which malloc_trim(0) gave back ~50 MB at once. So when a burst ends (an NBD
connection closes, the last FetchBlocks stream of a wave ends) ``after_load`` asks for one trim a
moment later, at most one per SETTLE_SECONDS. A trim walks every arena and costs milliseconds, off
the event loop. Without glibc (musl) it does nothing.

The opposite failure costs speed: glibc also gives memory back on its own, whenever the free space
at the top of a heap exceeds its trim threshold, which it sets to twice the largest freed mmapped
block (about 4 MiB once a 2 MiB NBD reply has been freed). A copying client keeps several 2 MiB
replies in flight, so their buffers, freed together, went back to the kernel again and again and
the next replies faulted their pages in anew: 64,000 minor faults and a quarter more CPU per 1 GiB
`qemu-img convert` of a warm export. ``keep_reply_buffers`` fixes both thresholds, so that a
burst's buffers are reused until ``after_load`` trims them.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

SETTLE_SECONDS = 2.0  # the rest of a burst (other connections closing) lands before the trim
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers below this come from a heap, reused; larger ones (32 MiB WRITE payloads) are mapped and
# unmapped on their own, so that they never pin a heap's top.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free heap top kept between requests: what read replies may hold at once (READ_REPLY_BUDGET in
# cachepoint/disk/nbd/limits.py). Its cost: up to this much resident after a burst, until the trim.
TRIM_THRESHOLD = 64 * 1024 * 1024


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def _find_mallopt() -> Callable[[int, int], int] | None:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]


_malloc_trim = _find_malloc_trim()
_mallopt = _find_mallopt() if _malloc_trim is not None else None  # glibc's, not another libc's
_pending: asyncio.Task[None] | None = None


def keep_reply_buffers() -> bool:
    """Fix glibc's thresholds for a serving process (once, at start): heap memory up to
    TRIM_THRESHOLD freed at its top stays for the next requests instead of going back to the kernel
    after each burst of replies. True when the allocator took them."""
    if _mallopt is None:
        return False
    # Fixing either threshold turns off glibc's dynamic adjustment of both: set both.
    return bool(_mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


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
