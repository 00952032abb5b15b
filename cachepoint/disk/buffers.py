"""Reply buffers of a disk's reads, used again once their reply has left.

A read's reply is one buffer of the range's length. A new bytearray is zero-filled by Python before
a byte of it is written, and a copying client reads a whole disk in such replies: on the benchmark's
image that memset was 6% of the daemon's CPU. The NBD server gives a reply's buffer back once the
socket has taken all of it (nothing else holds it then), and the next read of that size takes it as
it is, so the reader writes every byte of it itself, zeros included (``CompositeDisk._fill``).

Buffers never given back (a reader that keeps its bytes, a reply that had to wait in the transport,
TLS) are simply left to the garbage collector: giving back is an optimisation, never an obligation.
"""

from __future__ import annotations

import threading

# Kept per disk, at most: a daemon with many attached disks keeps this much for each of them, idle
# or not. A copying client has a few replies of one size in flight, and each comes back as its reply
# leaves, so a few buffers per size are enough to serve nearly every read (measured: 1,615 of 1,635
# reads of a qemu-img copy of a 1 GiB disk took a used buffer).
KEPT_BYTES = 16 * 1024 * 1024
KEPT_PER_SIZE = 4


class ReplyBuffers:
    def __init__(self, kept_bytes: int = KEPT_BYTES) -> None:
        self.kept_bytes = kept_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> tuple[bytearray, bool]:
        """A buffer of ``size`` bytes, and whether it is new (zero-filled); one given back holds
        whatever its last reply held."""
        with self._lock:
            free = self._free.get(size)
            if free:
                buffer = free.pop()
                self._kept -= size
                return buffer, False
        return ReplyBuffer(size), True

    def give(self, payload: object) -> None:
        """The buffer under a reply's payload (itself, or a memoryview of it), once the reply has
        left: no one reads or writes it any more. Anything not taken here is ignored."""
        buffer = payload.obj if isinstance(payload, memoryview) else payload
        if not isinstance(buffer, ReplyBuffer):
            return
        size = len(buffer)
        with self._lock:
            free = self._free.setdefault(size, [])
            if len(free) >= KEPT_PER_SIZE or self._kept + size > self.kept_bytes:
                return
            if any(kept is buffer for kept in free):  # given back twice: kept once
                return
            free.append(buffer)
            self._kept += size


class ReplyBuffer(bytearray):
    """A buffer of the pool: its type says where it may go back to (no other bytearray does)."""

    __slots__ = ()
