"""The transmission phase of one NBD connection: requests served in parallel, replied to as each
completes (the protocol matches replies to requests by handle, and lets a server answer out of order).

qemu-img and the kernel client keep several requests in flight; answering them one at a time would
leave the disk idle while a reply travels, so up to MAX_IN_FLIGHT_BYTES of requests run at once, each
in the device's own threads. Ordering the protocol asks for still holds: a write is replied to only
once applied, so a FLUSH that syncs everything applied covers every write replied to before it.

With structured replies a read is one final OFFSET_DATA chunk (or an error chunk with a message), and
NBD_CMD_BLOCK_STATUS reports which runs read as zeros (``base:allocation``), so a client copying the
disk skips them without reading.

Memory (limits.py): a WRITE's payload is read in pieces into one buffer of its announced length, only
once the connection's and the server's budgets have room for it; until then the socket is not read.
A WRITE that cannot apply (too large, past the end, read-only export, bad flags) is read and thrown
away piece by piece, then refused: it never holds its payload. Reading a payload and sending a reply
each end the connection when the client makes no progress for the idle timeout.

``observe`` (optional) is told of every request answered: its command, length, the seconds from its
header to its reply being queued, and whether the reply was a success (the daemon's metrics,
cachepoint/metrics/node.py). A request costs one clock read more without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachepoint.disk.nbd import protocol as p
from cachepoint.disk.nbd.limits import Budget, ServerBudgets
from cachepoint.disk.nbd.protocol import BlockDevice, Violation

log = logging.getLogger(__name__)

MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024  # payloads held at once per connection (reads and writes)
PIECE = 1024 * 1024  # a payload is read (or thrown away) this much at a time, at most
MAX_STATUS_RUNS = 1024  # descriptors in one block status reply (the spec lets a server send fewer)
DRAIN_SECONDS = 30.0  # requests in flight when the client leaves get this long to finish
Observe = Callable[[int, int, float, bool], None]  # (command, length, seconds, ok)
Release = Callable[[object], None]  # a read's payload whose reply has left (CompositeDisk.release)


@dataclass(frozen=True, slots=True)
class Negotiated:
    device: BlockDevice
    structured: bool = False
    allocation: bool = False  # base:allocation selected for this export


Buffer = bytes | bytearray | memoryview
Reply = list[Buffer]


class Stalled(Exception):
    """The client sent or read nothing for the idle timeout in the middle of a request."""


class _Output:
    """A connection's replies, counted as they are written, so that waiting for the client to take
    them can tell a slow reader (bytes leave) from a stalled one (nothing leaves)."""

    def __init__(self, writer: asyncio.StreamWriter, idle: float, release: Release | None = None) -> None:
        self.writer = writer
        self.idle = idle
        self.written = 0
        self.release = release

    def write_read(self, reply: Reply) -> None:
        """A READ's reply, whose payload is its last part: once the socket has taken all of it,
        nothing holds the payload's buffer any more, and the device may use it again."""
        self.write(reply)
        if self.release is not None and not self.queued():
            self.release(reply[-1])

    def write(self, reply: Reply) -> None:
        # Each part on its own: before 3.12 writelines joins them, copying every payload again. All
        # on the event loop: a reply thread was tried (the kernel's copy of a payload off the loop)
        # and lost, because each block status round trip then waits for a thread wake-up, and a
        # copying client makes one per extent of the disk.
        for part in reply:
            self.writer.write(part)
            self.written += part.nbytes if isinstance(part, memoryview) else len(part)

    def queued(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Until the transport has taken what was written; Stalled when the client takes nothing
        for the idle timeout (a slow reader that makes progress may take as long as it needs)."""
        if not self.queued():  # the kernel took it all: no timer, no wake-up
            return
        while True:
            sent = self.written - self.queued()
            try:
                await asyncio.wait_for(self.writer.drain(), self.idle)
                return
            except TimeoutError:
                if self.written - self.queued() == sent:
                    message = f"the client read nothing of {self.queued()} bytes for {self.idle:g} s"
                    raise Stalled(message) from None


async def read_payload(reader: asyncio.StreamReader, length: int, idle: float) -> bytearray:
    """``length`` bytes into one buffer, a piece at a time: never the stream's own buffer grown to
    the whole payload and then copied (which held twice the payload)."""
    payload = bytearray(length)
    view = memoryview(payload)
    got = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(idle) as deadline:
            while got < length:
                piece = await reader.read(min(PIECE, length - got))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", length - got)
                view[got : got + len(piece)] = piece
                got += len(piece)
                deadline.reschedule(loop.time() + idle)
    except BaseException as err:
        # Free the buffer now: a connection reset is also kept by the stream reader, and its
        # traceback holds this frame, so the payload would otherwise wait for the cyclic GC (seen:
        # 60 reset clients left 150 MB behind for seconds, well past the budget they had given back).
        view.release()
        payload.clear()
        if isinstance(err, TimeoutError):
            message = f"the client sent {got} of a {length}-byte write, then nothing for {idle:g} s"
            raise Stalled(message) from None
        raise
    return payload


async def discard_payload(reader: asyncio.StreamReader, length: int, idle: float) -> None:
    """Read ``length`` bytes and keep none: a refused WRITE's payload must still leave the socket."""
    loop = asyncio.get_running_loop()
    left = length
    try:
        async with asyncio.timeout(idle) as deadline:
            while left:
                piece = await reader.read(min(PIECE, left))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(piece)
                deadline.reschedule(loop.time() + idle)
    except TimeoutError:
        raise Stalled(
            f"the client sent {length - left} of a refused {length}-byte write, then nothing"
        ) from None


async def transmit(
    chosen: Negotiated,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    shared: ServerBudgets,
    observe: Observe | None = None,
) -> None:
    """Serve requests until NBD_CMD_DISC or the connection ends."""
    budget = Budget(MAX_IN_FLIGHT_BYTES)
    idle = shared.limits.idle_timeout
    # Reply buffers go back to the device only on a plain socket: once written, the transport holds
    # no reference to them. TLS encrypts from a backlog that may still hold one.
    release = getattr(chosen.device, "release", None) if writer.get_extra_info("ssl_object") is None else None
    out = _Output(writer, idle, release)
    running: set[asyncio.Task[None]] = set()
    # Optional: a device that can answer a read from memory without waiting (CompositeDisk).
    read_warm = getattr(chosen.device, "read_warm", None) if chosen.structured else None
    try:
        while True:
            header = await reader.readexactly(p.REQUEST.size)
            magic, flags, command, handle, offset, length = p.REQUEST.unpack(header)
            if magic != p.REQUEST_MAGIC:
                raise Violation(f"bad request magic {magic:#x}")
            if command == p.CMD_DISC:
                break
            request = _Request(chosen, flags, command, handle, offset, length, observe, time.perf_counter())
            if command == p.CMD_WRITE and (refusal := request.refusal()) is not None:
                await discard_payload(reader, length, idle)
                out.write(refusal)
                request.answered()
                await out.drain()
                continue
            if command == p.CMD_BLOCK_STATUS:
                # Answered from block ids in memory, at once: a copying client asks for one extent
                # after another, so this round trip's latency is paid once per extent of the disk.
                out.write(request.block_status())
                request.answered()
                if out.queued() > MAX_IN_FLIGHT_BYTES:
                    await out.drain()  # a client that asks and never reads is held back
                continue
            holds = length if command in (p.CMD_READ, p.CMD_WRITE) and length <= p.MAX_PAYLOAD else 0
            hold = _Hold(budget, shared.writes if command == p.CMD_WRITE else shared.reads)
            if command == p.CMD_READ and read_warm is not None and not out.queued() and hold.try_take(holds):
                # A read the caches hold in memory is answered here, without a task, a thread or
                # a timer (half of the event loop's time per request for a copying client).
                reply = request.warm_read(read_warm)
                if reply is not None:
                    out.write_read(reply)
                    request.answered()
                    if not out.queued():
                        hold.give_back()
                        continue
                    task = asyncio.create_task(_drain(out, hold))
                    task.add_done_callback(hold.give_back)
                    running.add(task)
                    task.add_done_callback(running.discard)
                    continue
                hold.give_back()
                request.warm_tried = True
            try:
                # Taken before the payload is read: while a budget is full this loop reads nothing
                # more from the socket, and the client waits in TCP, not in our memory.
                await hold.take(holds)
                if command == p.CMD_WRITE:
                    request.data = await read_payload(reader, length, idle)
                task = asyncio.create_task(request.serve(out, hold))
            except BaseException:
                hold.give_back()
                raise
            # Given back when the task ends, however it ends: a task cancelled before it first ran
            # never enters its own finally.
            task.add_done_callback(hold.give_back)
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


async def _drain(out: _Output, hold: _Hold) -> None:
    """Until a reply written inline has left, then its budget comes back (by the done callback)."""
    try:
        await out.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    except Stalled as err:
        log.info("nbd: dropping a client: %s", err)
        out.writer.transport.abort()


class _Hold:
    """One request's share of its connection's budget and of the server's."""

    def __init__(self, connection: Budget, server: Budget) -> None:
        self._connection = connection
        self._server = server
        self._on_connection = 0
        self._on_server = 0

    def try_take(self, amount: int) -> bool:
        """Both shares at once without waiting, or neither."""
        if not self._connection.try_take(amount):
            return False
        if not self._server.try_take(amount):
            self._connection.give(amount)
            return False
        self._on_connection = self._on_server = amount
        return True

    async def take(self, amount: int) -> None:
        # The connection's first: a connection waiting for the server holds at most its own share.
        await self._connection.take(amount)
        self._on_connection = amount
        await self._server.take(amount)
        self._on_server = amount

    def give_back_server(self) -> None:
        self._server.give(self._on_server)
        self._on_server = 0

    def give_back(self, _task: object = None) -> None:
        self.give_back_server()
        self._connection.give(self._on_connection)
        self._on_connection = 0


@dataclass(slots=True)
class _Request:
    chosen: Negotiated
    flags: int
    command: int
    handle: int
    offset: int
    length: int
    observe: Observe | None = None
    started: float = 0.0  # time.perf_counter() when its header was read
    data: bytearray | None = None  # a WRITE's payload, once read
    warm_tried: bool = False  # a READ that read_warm could not answer: straight to read_cold
    failed: bool = False  # its reply is an error

    async def serve(self, out: _Output, hold: _Hold) -> None:
        try:
            reply = await self._execute()
            if self.command == p.CMD_WRITE:  # applied: other connections may send their payloads
                self.data = None
                hold.give_back_server()
            if self.command == p.CMD_READ and not self.failed:
                out.write_read(reply)
            else:
                out.write(reply)
            self.answered()
            await out.drain()  # a read's budget comes back once its reply has left
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client is gone; the request loop sees it too
        except Stalled as err:
            log.info("nbd: dropping a client: %s", err)
            out.writer.transport.abort()  # close() would wait, forever, for the client to read
        except Exception:
            log.exception("nbd: command %d failed unexpectedly", self.command)
            out.writer.close()
        finally:
            self.data = None

    def answered(self) -> None:
        if self.observe is not None:
            self.observe(self.command, self.length, time.perf_counter() - self.started, not self.failed)

    def _error(self, code: int, message: str = "") -> Reply:
        self.failed = True
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

    def refusal(self) -> Reply | None:
        """The error reply for a request that must not run, decided from its header alone."""
        device, command, offset, length = self.chosen.device, self.command, self.offset, self.length
        if self.flags & ~self._allowed_flags():
            return self._error(p.EINVAL, f"flags {self.flags:#x} are not valid for command {command}")
        writes = command in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
        known = writes or command in (p.CMD_READ, p.CMD_FLUSH, p.CMD_BLOCK_STATUS)
        if not known:
            return self._error(p.EINVAL, f"unknown command {command}")
        if command in (p.CMD_READ, p.CMD_WRITE) and length > p.MAX_PAYLOAD:
            # The client broke the announced maximum; the spec lets us refuse rather than disconnect.
            return self._error(
                p.EINVAL, f"a {length}-byte request is over the maximum payload {p.MAX_PAYLOAD}"
            )
        if writes and device.read_only:
            return self._error(p.EPERM, "this export is read-only")
        if command != p.CMD_FLUSH and offset + length > device.size:
            # Past the end: the spec asks for ENOSPC on writes, EINVAL otherwise.
            code = p.ENOSPC if command in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
            return self._error(code, f"bytes {offset}..{offset + length} are past the end ({device.size})")
        return None

    async def _execute(self) -> Reply:
        """Run the request: the reply's pieces, in order."""
        device, command, offset, length = self.chosen.device, self.command, self.offset, self.length
        refused = self.refusal()
        if refused is not None:
            return refused
        try:
            if command == p.CMD_READ:
                return await self._read()
            if command == p.CMD_BLOCK_STATUS:
                return self.block_status()
            if command == p.CMD_FLUSH:
                await device.flush()
            elif length:
                if command == p.CMD_WRITE:
                    assert self.data is not None
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
        device = self.chosen.device
        read = getattr(device, "read_cold", device.read) if self.warm_tried else device.read
        payload = await read(self.offset, self.length) if self.length else b""
        if len(payload) != self.length:
            log.error("nbd: device returned %d bytes for a %d-byte read", len(payload), self.length)
            return self._error(p.EIO, "short read")
        if not self.chosen.structured:
            return [p.simple_reply(0, self.handle), payload]
        if not self.length:  # a content chunk must carry at least one byte
            return [p.none_chunk(self.handle)]
        return [p.data_chunk_header(self.handle, self.offset, self.length), payload]

    def warm_read(self, read_warm: Callable[[int, int], Buffer | None]) -> Reply | None:
        """The reply to a READ from what the device holds in memory, or None when it must wait
        (any block not in memory, a refused request, or a failure: the task path answers those)."""
        if not self.length or self.refusal() is not None:
            return None
        try:
            payload = read_warm(self.offset, self.length)
        except Exception:
            return None
        if payload is None or len(payload) != self.length:
            return None
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
