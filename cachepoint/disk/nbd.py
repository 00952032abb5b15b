"""An asyncio NBD server: the fixed newstyle handshake and simple replies, over any BlockDevice.

Protocol only: it knows nothing of stores or layers. Exports are looked up by name when a client
chooses one (NBD_OPT_GO, NBD_OPT_INFO or the old NBD_OPT_EXPORT_NAME), so the daemon can attach
and detach disks while the server runs. Structured replies, metadata contexts and TLS are not
offered (a client is told NBD_REP_ERR_UNSUP and goes on without them); qemu and the kernel client
work with simple replies.

A misbehaving client only ever loses its own connection: every read from a socket is bounded (the
handshake by a deadline, a request by its declared length, which is capped), and a write applies
only once its whole payload has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

# Magic numbers and constants of doc/proto.md in the NBD project.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TX_HAS_FLAGS = 1 << 0
TX_READ_ONLY = 1 << 1
TX_SEND_FLUSH = 1 << 2
TX_SEND_FUA = 1 << 3
TX_SEND_TRIM = 1 << 5
TX_SEND_WRITE_ZEROES = 1 << 6
TX_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

# Error values are the protocol's own (they match Linux errno, but are defined by the spec).
EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28

HANDSHAKE_SECONDS = 30.0  # a client that neither chooses an export nor leaves loses its connection
MAX_OPTIONS = 64  # per connection; a client looping on options is cut off
MAX_OPTION_DATA = 8192  # names are at most 4096 bytes; nothing we accept needs more
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ or WRITE, announced as NBD_INFO_BLOCK_SIZE's maximum
CLOSE_SECONDS = 5.0

_HELLO = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class BlockDevice(Protocol):
    """What an export serves. Offsets and lengths are checked against ``size`` before a call."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def block_size(self) -> int:
        """The preferred I/O size (a hint to clients; any byte range is accepted)."""
        ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...


class NbdError(Exception):
    """Raised by a device to answer a request with a given NBD error value."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.code = code


class _Violation(Exception):
    """The client broke the protocol: its connection is dropped (a hard disconnect)."""


def error_code(err: BaseException) -> int:
    """The NBD error value for an exception raised by a device."""
    if isinstance(err, NbdError):
        return err.code
    if isinstance(err, PermissionError):
        return EPERM
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ENOSPC
    if isinstance(err, OSError) and err.errno == errno.EINVAL:
        return EINVAL
    if isinstance(err, ValueError):
        return EINVAL
    return EIO


ExportLookup = Callable[[str], BlockDevice | None]
ExportList = Callable[[], list[str]]


class NbdServer:
    """Listening sockets and the connections they accepted. Made by ``start_nbd``."""

    def __init__(self, exports: ExportLookup, list_exports: ExportList) -> None:
        self._exports = exports
        self._list_exports = list_exports
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.addresses: list[str] = []

    # -- listening ------------------------------------------------------------------------------

    async def listen_tcp(self, spec: str) -> None:
        host, port = parse_host_port(spec)
        server = await asyncio.start_server(self._accept, host, port)
        self._servers.append(server)
        for sock in server.sockets:
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self.addresses.append(f"{shown}:{bound_port}")

    async def listen_unix(self, path: str) -> None:
        _remove_stale_socket(path)
        server = await asyncio.start_unix_server(self._accept, path)
        self._servers.append(server)
        self._unix_paths.append(path)
        # A writable export is a raw disk: only its owner may connect.
        os.chmod(path, 0o600)
        self.addresses.append(f"unix:{path}")

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()  # the client sees its connection end even if its task were slow to stop
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=CLOSE_SECONDS)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), CLOSE_SECONDS)
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._servers.clear()
        self._unix_paths.clear()

    # -- one connection -------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername") or "unix client"
        self._writers.add(writer)
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancellation that arrives as
            # the handshake completes, and close() would then leave this connection running.
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                device = await self._handshake(reader, writer)
            if device is not None:
                await self._transmit(device, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as err:
            log.debug("nbd client %s went away: %r", peer, err)
        except _Violation as err:
            log.info("nbd client %s dropped: %s", peer, err)
        except asyncio.CancelledError:
            pass  # the server is closing
        except Exception:
            log.exception("nbd client %s: unexpected failure", peer)
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_SECONDS)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> BlockDevice | None:
        """Option haggling. Returns the chosen export, or None when the client aborted."""
        writer.write(_HELLO.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _Violation(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = _OPTION.unpack(await reader.readexactly(_OPTION.size))
            if magic != IHAVEOPT:
                raise _Violation(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise _Violation(f"option {option} carries {length} bytes")
            data = await reader.readexactly(length)
            if option == OPT_EXPORT_NAME:
                name = _decode_name(data)
                device = None if name is None else self._lookup(name)
                if device is None:
                    # This option cannot answer with an error: the spec says to drop the session.
                    raise _Violation(f"no export named {name!r}")
                tail = b"" if no_zeroes else bytes(124)
                writer.write(struct.pack(">QH", device.size, _transmission_flags(device)) + tail)
                await writer.drain()
                return device
            if option == OPT_ABORT:
                await _option_reply(writer, option, REP_ACK)
                return None
            if option == OPT_LIST:
                await self._list(writer, data)
            elif option in (OPT_INFO, OPT_GO):
                device = await self._info(writer, option, data)
                if device is not None and option == OPT_GO:
                    return device
            else:  # structured replies, TLS, metadata contexts and anything newer
                await _option_reply(writer, option, REP_ERR_UNSUP, b"not supported by this server")
        raise _Violation(f"more than {MAX_OPTIONS} options")

    def _lookup(self, name: str) -> BlockDevice | None:
        try:
            return self._exports(name)
        except Exception:
            log.exception("nbd: looking up export %r failed", name)
            return None

    async def _list(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if data:
            await _option_reply(writer, OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for name in self._list_exports():
            raw = name.encode()
            await _option_reply(writer, OPT_LIST, REP_SERVER, struct.pack(">I", len(raw)) + raw)
        await _option_reply(writer, OPT_LIST, REP_ACK)

    async def _info(self, writer: asyncio.StreamWriter, option: int, data: bytes) -> BlockDevice | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            await _option_reply(writer, option, REP_ERR_INVALID, b"malformed export name or info list")
            return None
        name, requests = parsed
        device = self._lookup(name)
        if device is None:
            await _option_reply(writer, option, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        export = struct.pack(">HQH", INFO_EXPORT, device.size, _transmission_flags(device))
        await _option_reply(writer, option, REP_INFO, export)
        if INFO_BLOCK_SIZE in requests:
            preferred = min(max(device.block_size, 512), MAX_PAYLOAD)
            if preferred & (preferred - 1):  # the spec wants a power of two
                preferred = 4096
            sizes = struct.pack(">HIII", INFO_BLOCK_SIZE, 1, preferred, MAX_PAYLOAD)
            await _option_reply(writer, option, REP_INFO, sizes)
        await _option_reply(writer, option, REP_ACK)
        return device

    async def _transmit(
        self, device: BlockDevice, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Requests one at a time: a reply is sent before the next request is read."""
        while True:
            header = await reader.readexactly(_REQUEST.size)
            magic, flags, command, handle, offset, length = _REQUEST.unpack(header)
            if magic != REQUEST_MAGIC:
                raise _Violation(f"bad request magic {magic:#x}")
            data = b""
            if command == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    raise _Violation(f"a {length}-byte write is over the announced maximum")
                data = await reader.readexactly(length)
            if command == CMD_DISC:
                return
            code, payload = await _execute(device, command, flags, offset, length, data)
            writer.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, code, handle))
            if payload:
                writer.write(payload)
            await writer.drain()


async def _execute(
    device: BlockDevice, command: int, flags: int, offset: int, length: int, data: bytes
) -> tuple[int, bytes]:
    """Run one request: (error value, read payload)."""
    allowed = CMD_FLAG_FUA | (CMD_FLAG_NO_HOLE if command == CMD_WRITE_ZEROES else 0)
    if flags & ~allowed:
        return EINVAL, b""
    writes = command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
    if command not in (CMD_READ, CMD_FLUSH) and not writes:
        return EINVAL, b""
    if writes and device.read_only:
        return EPERM, b""
    if command != CMD_FLUSH and offset + length > device.size:
        # Past the end: the spec asks for ENOSPC on writes, EINVAL otherwise.
        return (ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL), b""
    try:
        if command == CMD_READ:
            if length > MAX_PAYLOAD:
                return EINVAL, b""
            payload = await device.read(offset, length) if length else b""
            if len(payload) != length:
                log.error("nbd: device returned %d bytes for a %d-byte read", len(payload), length)
                return EIO, b""
            return 0, payload
        if command == CMD_FLUSH:
            await device.flush()
            return 0, b""
        if length:
            if command == CMD_WRITE:
                await device.write(offset, data)
            elif command == CMD_TRIM:
                await device.trim(offset, length)
            else:
                await device.write_zeroes(offset, length)
        if flags & CMD_FLAG_FUA:
            await device.flush()
        return 0, b""
    except Exception as err:
        code = error_code(err)
        if code == EIO:
            log.error("nbd: command %d at %d+%d failed: %s", command, offset, length, err)
        return code, b""


def _transmission_flags(device: BlockDevice) -> int:
    flags = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA
    if device.read_only:
        return flags | TX_READ_ONLY
    # Every connection to an export shares one device and one store, and FLUSH syncs that store: a
    # client may spread its requests over several connections.
    return flags | TX_SEND_TRIM | TX_SEND_WRITE_ZEROES | TX_CAN_MULTI_CONN


async def _option_reply(writer: asyncio.StreamWriter, option: int, reply: int, payload: bytes = b"") -> None:
    writer.write(_OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload)
    await writer.drain()


def _decode_name(raw: bytes) -> str | None:
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        return None
    return None if "\x00" in name else name


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count x u16 info types."""
    if len(data) < 6:
        return None
    (name_length,) = struct.unpack_from(">I", data)
    if 4 + name_length + 2 > len(data):
        return None
    name = _decode_name(data[4 : 4 + name_length])
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    rest = data[4 + name_length + 2 :]
    if name is None or len(rest) != 2 * count:
        return None
    return name, set(struct.unpack(f">{count}H", rest))


def parse_host_port(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``; port 0 lets the system choose (see NbdServer.addresses)."""
    host, sep, port_text = spec.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"NBD address {spec!r} must look like HOST:PORT (e.g. 127.0.0.1:10809)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port_text)


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a server that died is removed; one a live server answers on is not."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError:
        return  # let the bind report what is wrong
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening there", path)


async def start_nbd(
    exports: ExportLookup,
    list_exports: ExportList,
    tcp: str | None = "127.0.0.1:10809",
    unix_path: str | None = None,
) -> NbdServer:
    """Listen on TCP and/or a Unix socket; ``exports(name)`` is asked when a client picks an export."""
    if tcp is None and unix_path is None:
        raise ValueError("the NBD server needs a TCP address or a Unix socket path")
    server = NbdServer(exports, list_exports)
    try:
        if tcp is not None:
            await server.listen_tcp(tcp)
        if unix_path is not None:
            await server.listen_unix(unix_path)
    except BaseException:
        await server.close()
        raise
    return server
