"""The transmission phase of one NBD connection: requests served in parallel, replied to as each
completes (the protocol matches replies to requests by handle, and lets a server answer out of order).

qemu-img and the kernel client keep several requests in flight; answering them one at a time would
leave the disk idle while a reply travels, so up to MAX_IN_FLIGHT_BYTES of requests run at once, each
in the device's own threads. Ordering the protocol asks for still holds: a write is replied to only
once applied, so a FLUSH that syncs everything applied covers every write replied to before it.

With structured replies a read is one final OFFSET_DATA chunk (or an error chunk with a message), and
NBD_CMD_BLOCK_STATUS reports which runs read as zeros (``base:allocation``), so a client copying the
disk skips them without reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from cachepoint.disk.nbd import protocol as p
from cachepoint.disk.nbd.protocol import BlockDevice, Violation

log = logging.getLogger(__name__)

MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024  # payloads held at once per connection (reads and writes)
MAX_STATUS_RUNS = 1024  # descriptors in one block status reply (the spec lets a server send fewer)
DRAIN_SECONDS = 30.0  # requests in flight when the client leaves get this long to finish


@dataclass(frozen=True, slots=True)
class Negotiated:
    device: BlockDevice
    structured: bool = False
    allocation: bool = False  # base:allocation selected for this export


class _Budget:
    """Bytes of payload in flight, taken by the one request loop of a connection and given back
    as requests finish. A request larger than the whole budget still runs, alone."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._freed = asyncio.Event()

    async def take(self, amount: int) -> None:
        while self._used and self._used + amount > self._limit:
            self._freed.clear()
            await self._freed.wait()
        self._used += amount

    def give(self, amount: int) -> None:
        self._used -= amount
        self._freed.set()


Reply = list[bytes | bytearray | memoryview]


def _write(writer: asyncio.StreamWriter, reply: Reply) -> None:
    # Each part on its own: before 3.12 writelines joins them, copying every payload again. All
    # on the event loop: a reply thread was tried (the kernel's copy of a payload off the loop) and
    # lost, because each block status round trip then waits for a thread wake-up, and a copying
    # client makes one per extent of the disk.
    for part in reply:
        writer.write(part)


async def transmit(chosen: Negotiated, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve requests until NBD_CMD_DISC or the connection ends."""
    budget = _Budget(MAX_IN_FLIGHT_BYTES)
    running: set[asyncio.Task[None]] = set()
    try:
        while True:
            header = await reader.readexactly(p.REQUEST.size)
            magic, flags, command, handle, offset, length = p.REQUEST.unpack(header)
            if magic != p.REQUEST_MAGIC:
                raise Violation(f"bad request magic {magic:#x}")
            if command == p.CMD_DISC:
                break
            holds = length if command in (p.CMD_READ, p.CMD_WRITE) else 0
            if holds > p.MAX_PAYLOAD:
                if command == p.CMD_WRITE:
                    raise Violation(f"a {length}-byte write is over the announced maximum")
                holds = 0  # refused without reading (EINVAL)
            await budget.take(holds)
            data = await reader.readexactly(length) if command == p.CMD_WRITE else b""
            request = _Request(chosen, flags, command, handle, offset, length, data)
            if command == p.CMD_BLOCK_STATUS:
                # Answered from block ids in memory, at once: a copying client asks for one extent
                # after another, so this round trip's latency is paid once per extent of the disk.
                _write(writer, request.block_status())
                if writer.transport.get_write_buffer_size() > MAX_IN_FLIGHT_BYTES:
                    await writer.drain()  # a client that asks and never reads is held back
                continue
            task = asyncio.create_task(request.serve(writer, budget, holds))
            running.add(task)
            task.add_done_callback(running.discard)
        # NBD_CMD_DISC: the spec asks the server to finish what is outstanding first.
        if running:
            await asyncio.wait(list(running), timeout=DRAIN_SECONDS)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    finally:
        for task in running:
            task.cancel()


@dataclass(slots=True)
class _Request:
    chosen: Negotiated
    flags: int
    command: int
    handle: int
    offset: int
    length: int
    data: bytes

    async def serve(self, writer: asyncio.StreamWriter, budget: _Budget, holds: int) -> None:
        try:
            reply = await self._execute()
            _write(writer, reply)
            await writer.drain()  # the budget comes back once the reply has left, not before
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client is gone; the request loop sees it too
        except Exception:
            log.exception("nbd: command %d failed unexpectedly", self.command)
            writer.close()
        finally:
            budget.give(holds)

    def _error(self, code: int, message: str = "") -> Reply:
        # With structured replies a read must not get a simple reply; errors there carry a message.
        if self.chosen.structured and (self.command == p.CMD_READ or message):
            return [p.error_chunk(self.handle, code, message or "request refused")]
        return [p.simple_reply(code, self.handle)]

    def _allowed_flags(self) -> int:
        allowed = p.CMD_FLAG_FUA  # clients set it on any command; harmless
        if self.command == p.CMD_WRITE_ZEROES:
            allowed |= p.CMD_FLAG_NO_HOLE
        elif self.command == p.CMD_READ and self.chosen.structured:
            allowed |= p.CMD_FLAG_DF
        elif self.command == p.CMD_BLOCK_STATUS:
            allowed |= p.CMD_FLAG_REQ_ONE
        return allowed

    async def _execute(self) -> Reply:
        """Run the request: the reply's pieces, in order."""
        device, command, offset, length = self.chosen.device, self.command, self.offset, self.length
        if self.flags & ~self._allowed_flags():
            return self._error(p.EINVAL, f"flags {self.flags:#x} are not valid for command {command}")
        writes = command in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
        known = writes or command in (p.CMD_READ, p.CMD_FLUSH, p.CMD_BLOCK_STATUS)
        if not known:
            return self._error(p.EINVAL, f"unknown command {command}")
        if writes and device.read_only:
            return self._error(p.EPERM, "this export is read-only")
        if command != p.CMD_FLUSH and offset + length > device.size:
            # Past the end: the spec asks for ENOSPC on writes, EINVAL otherwise.
            code = p.ENOSPC if command in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
            return self._error(code, f"bytes {offset}..{offset + length} are past the end ({device.size})")
        try:
            if command == p.CMD_READ:
                return await self._read()
            if command == p.CMD_BLOCK_STATUS:
                return self.block_status()
            if command == p.CMD_FLUSH:
                await device.flush()
            elif length:
                if command == p.CMD_WRITE:
                    await device.write(offset, self.data)
                elif command == p.CMD_TRIM:
                    await device.trim(offset, length)
                else:
                    await device.write_zeroes(offset, length)
            if self.flags & p.CMD_FLAG_FUA and command != p.CMD_FLUSH:
                await device.flush()
            return [p.simple_reply(0, self.handle)]
        except Exception as err:
            code = p.error_code(err)
            if code == p.EIO:
                log.error("nbd: command %d at %d+%d failed: %s", command, offset, length, err)
            return self._error(code, str(err))

    async def _read(self) -> Reply:
        if self.length > p.MAX_PAYLOAD:
            return self._error(p.EINVAL, f"a read of {self.length} bytes is over {p.MAX_PAYLOAD}")
        payload = await self.chosen.device.read(self.offset, self.length) if self.length else b""
        if len(payload) != self.length:
            log.error("nbd: device returned %d bytes for a %d-byte read", len(payload), self.length)
            return self._error(p.EIO, "short read")
        if not self.chosen.structured:
            return [p.simple_reply(0, self.handle), payload]
        if not self.length:  # a content chunk must carry at least one byte
            return [p.none_chunk(self.handle)]
        return [p.data_chunk_header(self.handle, self.offset, self.length), payload]

    def block_status(self) -> Reply:
        """The reply to NBD_CMD_BLOCK_STATUS (checked like any request; never blocks)."""
        if self.flags & ~self._allowed_flags() or self.offset + self.length > self.chosen.device.size:
            return self._error(p.EINVAL, f"bad flags or range {self.offset}+{self.length}")
        if not self.chosen.allocation:
            return self._error(p.EINVAL, "no metadata context was selected (base:allocation)")
        if not self.length:
            return self._error(p.EINVAL, "a block status request needs a length")
        limit = 1 if self.flags & p.CMD_FLAG_REQ_ONE else MAX_STATUS_RUNS
        try:
            runs = self.chosen.device.zero_runs(self.offset, self.length, limit)
        except Exception as err:  # answered inline: a device's failure must not end the connection
            log.error("nbd: block status at %d+%d failed: %s", self.offset, self.length, err)
            return self._error(p.error_code(err), str(err))
        status = [(n, p.STATE_HOLE | p.STATE_ZERO if zeros else 0) for n, zeros in runs]
        return [p.block_status_chunk(self.handle, p.BASE_ALLOCATION_ID, status)]
