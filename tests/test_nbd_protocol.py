"""The NBD server on its own: handshakes, commands and misbehaving clients, over an in-memory device.

The server runs on an event loop in a background thread (as it does inside the daemon), so the
tests can drive it with plain sockets and real clients as child processes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from cachepoint.disk.nbd import BlockDevice, NbdLimits, NbdServer, NbdTls, start_nbd
from cachepoint.disk.nbd import protocol as nbd
from cachepoint.disk.nbd import server as nbd_server
from cachepoint.disk.nbd.transmission import Observe

TIMEOUT = 30.0


class MemoryDevice:
    """A BlockDevice over a bytearray: the protocol tests need no store."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        self.data = bytearray(size)
        self._read_only = read_only
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        return 4096

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def zero_runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Runs of whole 512-byte sectors that are all zeros, or not."""
        runs: list[tuple[int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            step = min((pos // 512 + 1) * 512, end) - pos
            zeros = not any(self.data[pos : pos + step])
            if runs and runs[-1][1] == zeros:
                runs[-1] = (runs[-1][0] + step, zeros)
            elif len(runs) == limit:
                break
            else:
                runs.append((step, zeros))
            pos += step
        return runs


class WarmMemoryDevice(MemoryDevice):
    """A MemoryDevice whose first ``warm`` bytes are "in memory": reads inside them are answered by
    ``read_warm`` (as CompositeDisk answers from its caches), others only by ``read_cold``; ``read``
    tries one then the other, as CompositeDisk's does. Each call is counted."""

    def __init__(self, size: int, warm: int) -> None:
        super().__init__(size, read_only=True)
        self.warm = warm
        self.calls = {"read_warm": 0, "read_cold": 0, "read": 0}

    def read_warm(self, offset: int, length: int) -> bytes | None:
        self.calls["read_warm"] += 1
        return bytes(self.data[offset : offset + length]) if offset + length <= self.warm else None

    async def read_cold(self, offset: int, length: int) -> bytes:
        self.calls["read_cold"] += 1
        await asyncio.sleep(0.001)  # a thread's answer comes later than the loop's
        return bytes(self.data[offset : offset + length])

    async def read(self, offset: int, length: int) -> bytes:
        self.calls["read"] += 1
        warm = self.read_warm(offset, length)
        return warm if warm is not None else await self.read_cold(offset, length)


class ServerThread:
    """start_nbd on its own event loop in a daemon thread; ``stop`` closes it within bounds."""

    def __init__(
        self,
        exports: dict[str, BlockDevice],
        tcp: str | None = "127.0.0.1:0",
        unix_path: str | None = None,
        limits: NbdLimits | None = None,
        tls: NbdTls | None = None,
        observe: Observe | None = None,
    ) -> None:
        self.exports = exports
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-test-loop", daemon=True)
        self.thread.start()
        self.server: NbdServer = self.call(
            start_nbd(
                self.exports.get,
                lambda: sorted(self.exports),
                tcp=tcp,
                unix_path=unix_path,
                limits=limits,
                tls=tls,
                observe=observe,
            )
        )

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    @property
    def port(self) -> int:
        tcp = [a for a in self.server.addresses if not a.startswith("unix:")]
        return int(tcp[0].rpartition(":")[2])

    def url(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[ServerThread] = []

    def start(exports: dict[str, BlockDevice], **kwargs: Any) -> ServerThread:
        server = ServerThread(exports, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- a minimal raw client --------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"server closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def greet(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    magic, opt_magic, flags = struct.unpack(">QQH", recv_exactly(sock, 18))
    assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    assert flags & nbd.FLAG_FIXED_NEWSTYLE
    sock.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
    return sock


def send_option(sock: socket.socket, option: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data)


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, option, reply, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    assert magic == nbd.OPTION_REPLY_MAGIC
    return option, reply, recv_exactly(sock, length)


def go(sock: socket.socket, name: str, infos: tuple[int, ...] = (nbd.INFO_BLOCK_SIZE,)) -> dict[int, bytes]:
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)
    send_option(sock, nbd.OPT_GO, data)
    replies: dict[int, bytes] = {}
    while True:
        option, reply, payload = read_option_reply(sock)
        assert option == nbd.OPT_GO
        if reply == nbd.REP_ACK:
            return replies
        assert reply == nbd.REP_INFO, f"GO {name!r} answered {reply:#x}: {payload!r}"
        replies[struct.unpack_from(">H", payload)[0]] = payload[2:]


def connect(port: int, name: str) -> tuple[socket.socket, int, int]:
    """Handshake to transmission; returns (socket, export size, transmission flags)."""
    sock = greet(port)
    infos = go(sock, name)
    size, flags = struct.unpack(">QH", infos[nbd.INFO_EXPORT])
    return sock, size, flags


def request(
    sock: socket.socket, command: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
) -> tuple[int, bytes]:
    if command == nbd.CMD_WRITE:
        length = len(data)
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, 7, offset, length) + data)
    magic, error, handle = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert magic == nbd.SIMPLE_REPLY_MAGIC and handle == 7
    payload = recv_exactly(sock, length) if command == nbd.CMD_READ and error == 0 else b""
    return error, payload


def meta_context_query(name: str, *queries: str) -> bytes:
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        data += struct.pack(">I", len(query)) + query.encode()
    return data


def negotiate_structured(sock: socket.socket, name: str) -> int:
    """Structured replies and base:allocation for ``name``; returns the context id."""
    send_option(sock, nbd.OPT_STRUCTURED_REPLY)
    assert read_option_reply(sock)[:2] == (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK)
    send_option(sock, nbd.OPT_SET_META_CONTEXT, meta_context_query(name, nbd.BASE_ALLOCATION))
    option, reply, payload = read_option_reply(sock)
    assert (option, reply) == (nbd.OPT_SET_META_CONTEXT, nbd.REP_META_CONTEXT)
    context_id = struct.unpack_from(">I", payload)[0]
    assert payload[4:] == nbd.BASE_ALLOCATION.encode() and context_id != 0
    assert read_option_reply(sock)[:2] == (nbd.OPT_SET_META_CONTEXT, nbd.REP_ACK)
    return context_id


def send_request(
    sock: socket.socket, command: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0
) -> None:
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, handle, offset, length))


def read_chunk(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One structured reply chunk: (flags, type, handle, payload)."""
    magic, flags, kind, handle, length = struct.unpack(">IHHQI", recv_exactly(sock, 20))
    assert magic == nbd.STRUCTURED_REPLY_MAGIC
    return flags, kind, handle, recv_exactly(sock, length)


def still_serves(port: int, name: str) -> bool:
    sock, size, _ = connect(port, name)
    with sock:
        error, payload = request(sock, nbd.CMD_READ, 0, 512)
        request_disc(sock)
    return error == 0 and len(payload) == 512


def request_disc(sock: socket.socket) -> None:
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 8, 0, 0))


def assert_closed_by_server(sock: socket.socket) -> None:
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


# -- tests -----------------------------------------------------------------------------------------


def test_a_client_reads_and_writes_an_export_it_chose_with_nbd_opt_go(serve):
    device = MemoryDevice(1 << 20)
    server = serve({"disk": device})
    assert server.server.addresses[0].startswith("127.0.0.1:") and server.port != 0
    sock, size, flags = connect(server.port, "disk")
    with sock:
        assert size == 1 << 20
        assert flags & nbd.TX_HAS_FLAGS and not flags & nbd.TX_READ_ONLY
        assert flags & nbd.TX_SEND_FLUSH and flags & nbd.TX_SEND_TRIM and flags & nbd.TX_SEND_WRITE_ZEROES
        assert request(sock, nbd.CMD_WRITE, 1000, data=b"\xab" * 3000) == (0, b"")
        assert request(sock, nbd.CMD_READ, 1000, 3000) == (0, b"\xab" * 3000)
        assert request(sock, nbd.CMD_WRITE_ZEROES, 1500, 100)[0] == 0
        assert request(sock, nbd.CMD_TRIM, 2000, 100)[0] == 0
        assert request(sock, nbd.CMD_FLUSH)[0] == 0
        assert request(sock, nbd.CMD_WRITE, 0, data=b"x", flags=nbd.CMD_FLAG_FUA)[0] == 0
        request_disc(sock)
    assert device.data[1000:1500] == b"\xab" * 500 and device.data[1500:1600] == bytes(100)
    assert device.data[2000:2100] == bytes(100) and device.data[2100:4000] == b"\xab" * 1900
    assert device.flushes == 2


def test_nbd_opt_go_reports_block_sizes_with_no_alignment_required(serve):
    server = serve({"disk": MemoryDevice(65536)})
    sock = greet(server.port)
    with sock:
        infos = go(sock, "disk")
        minimum, preferred, maximum = struct.unpack(">III", infos[nbd.INFO_BLOCK_SIZE])
        assert (minimum, preferred, maximum) == (1, 4096, nbd.MAX_PAYLOAD)


def test_nbd_opt_list_names_every_export_and_info_leaves_the_client_in_negotiation(serve):
    server = serve({"a": MemoryDevice(4096), "b/c": MemoryDevice(8192, read_only=True)})
    sock = greet(server.port)
    with sock:
        send_option(sock, nbd.OPT_LIST)
        names = []
        while True:
            _, reply, payload = read_option_reply(sock)
            if reply == nbd.REP_ACK:
                break
            assert reply == nbd.REP_SERVER
            (length,) = struct.unpack_from(">I", payload)
            names.append(payload[4 : 4 + length].decode())
        assert names == ["a", "b/c"]
        raw = b"b/c"
        send_option(sock, nbd.OPT_INFO, struct.pack(">I", 3) + raw + struct.pack(">H", 0))
        _, reply, payload = read_option_reply(sock)
        assert reply == nbd.REP_INFO
        _, size, flags = struct.unpack(">HQH", payload)
        assert size == 8192 and flags & nbd.TX_READ_ONLY
        assert read_option_reply(sock)[1] == nbd.REP_ACK
        infos = go(sock, "a")  # still negotiating after INFO
        assert struct.unpack(">QH", infos[nbd.INFO_EXPORT])[0] == 4096


def test_unknown_options_and_unknown_exports_get_error_replies_and_abort_is_acknowledged(serve):
    server = serve({"disk": MemoryDevice(4096)})
    sock = greet(server.port)
    with sock:
        for option in (nbd.OPT_STARTTLS, 11, 0xDEAD):  # TLS, extended headers, unknown
            send_option(sock, option, b"some data")
            assert read_option_reply(sock)[:2] == (option, nbd.REP_ERR_UNSUP)
        # Known options with wrong data, or out of order: refused as invalid, negotiation goes on.
        send_option(sock, nbd.OPT_STRUCTURED_REPLY, b"some data")
        assert read_option_reply(sock)[:2] == (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_INVALID)
        send_option(sock, nbd.OPT_SET_META_CONTEXT, meta_context_query("disk", nbd.BASE_ALLOCATION))
        assert read_option_reply(sock)[:2] == (nbd.OPT_SET_META_CONTEXT, nbd.REP_ERR_INVALID)
        send_option(sock, nbd.OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
        _, reply, message = read_option_reply(sock)
        assert reply == nbd.REP_ERR_UNKNOWN and b"nope" in message
        send_option(sock, nbd.OPT_GO, b"\x00\x00\x00\x09short")
        assert read_option_reply(sock)[1] == nbd.REP_ERR_INVALID
        send_option(sock, nbd.OPT_ABORT)
        assert read_option_reply(sock)[:2] == (nbd.OPT_ABORT, nbd.REP_ACK)
        assert_closed_by_server(sock)
    assert still_serves(server.port, "disk")


def test_the_old_export_name_option_enters_transmission(serve):
    server = serve({"disk": MemoryDevice(8192)})
    sock = greet(server.port)
    with sock:
        send_option(sock, nbd.OPT_EXPORT_NAME, b"disk")
        size, flags = struct.unpack(">QH", recv_exactly(sock, 10))  # NO_ZEROES: no 124-byte padding
        assert size == 8192 and flags & nbd.TX_HAS_FLAGS
        assert request(sock, nbd.CMD_READ, 0, 8192) == (0, bytes(8192))


def test_reads_past_the_end_writes_to_read_only_exports_and_unknown_commands_get_errors(serve):
    server = serve({"rw": MemoryDevice(65536), "ro": MemoryDevice(65536, read_only=True)})
    sock, _, flags = connect(server.port, "ro")
    with sock:
        assert flags & nbd.TX_READ_ONLY
        assert request(sock, nbd.CMD_READ, 65536 - 100, 200) == (nbd.EINVAL, b"")
        assert request(sock, nbd.CMD_WRITE, 0, data=b"\x01" * 4096) == (nbd.EPERM, b"")
        assert request(sock, nbd.CMD_TRIM, 0, 4096) == (nbd.EPERM, b"")
        assert request(sock, nbd.CMD_WRITE_ZEROES, 0, 4096) == (nbd.EPERM, b"")
        assert request(sock, nbd.CMD_READ, 0, 4096) == (0, bytes(4096))  # the connection goes on
    sock, _, _ = connect(server.port, "rw")
    with sock:
        assert request(sock, nbd.CMD_WRITE, 65536 - 10, data=b"\x01" * 20) == (nbd.ENOSPC, b"")
        assert request(sock, nbd.CMD_READ, 2**63, 10) == (nbd.EINVAL, b"")
        assert request(sock, 5, 0, 10)[0] == nbd.EINVAL  # NBD_CMD_CACHE: not offered
        assert request(sock, nbd.CMD_READ, 0, 10, flags=1 << 9)[0] == nbd.EINVAL
        assert request(sock, nbd.CMD_READ, 0, nbd.MAX_PAYLOAD + 1)[0] == nbd.EINVAL
        assert request(sock, nbd.CMD_READ, 0, 10) == (0, bytes(10))


@pytest.mark.parametrize(
    "garbage",
    [
        b"",  # connects and closes at once
        b"\xff\xff\xff\xff",  # unknown client flags
        struct.pack(">I", 1) + b"GET / HTTP/1.1\r\n\r\n",  # not an option at all
        struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 1 << 30),  # huge option
        struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 4) + b"nope",
        struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 100) + b"cut short",
    ],
)
def test_malformed_handshakes_lose_only_their_own_connection(serve, garbage):
    server = serve({"disk": MemoryDevice(4096)})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    with sock:
        recv_exactly(sock, 18)
        sock.sendall(garbage)
        if garbage.endswith(b"cut short") or not garbage:
            sock.shutdown(socket.SHUT_WR)
        assert_closed_by_server(sock)
    assert still_serves(server.port, "disk")


def test_a_client_that_never_finishes_its_handshake_is_dropped_at_the_deadline(serve, monkeypatch):
    monkeypatch.setattr(nbd_server, "HANDSHAKE_SECONDS", 0.5)
    server = serve({"disk": MemoryDevice(4096)})
    sock = greet(server.port)  # then silence: no option ever comes
    with sock:
        assert_closed_by_server(sock)  # bounded by TIMEOUT, long before which the deadline hits
    assert still_serves(server.port, "disk")


def test_a_client_that_disconnects_mid_write_leaves_the_export_unchanged_and_the_server_up(serve):
    device = MemoryDevice(1 << 20)
    server = serve({"disk": device})
    sock, _, _ = connect(server.port, "disk")
    header = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 65536)
    sock.sendall(header + b"\xee" * 30000)
    sock.close()
    second, _, _ = connect(server.port, "disk")
    with second:
        # The half-sent write never applies: no byte of it shows.
        assert request(second, nbd.CMD_READ, 0, 65536) == (0, bytes(65536))
    assert still_serves(server.port, "disk")


def test_a_write_over_the_maximum_payload_is_refused_and_the_connection_goes_on(serve):
    device = MemoryDevice(1 << 20)
    server = serve({"disk": device})
    sock, _, _ = connect(server.port, "disk")
    with sock:
        # The payload is read and thrown away (never held whole), then the write is refused.
        error, _ = request(sock, nbd.CMD_WRITE, 0, data=b"\xee" * (nbd.MAX_PAYLOAD + 1))
        assert error == nbd.EINVAL
        assert request(sock, nbd.CMD_READ, 0, 4096) == (0, bytes(4096))
    assert not any(device.data)


def test_a_client_stalled_in_the_middle_of_a_write_is_dropped_after_the_idle_timeout(serve):
    server = serve({"disk": MemoryDevice(1 << 20)}, limits=NbdLimits(idle_timeout=0.5))
    sock, _, _ = connect(server.port, "disk")
    with sock:
        sock.sendall(
            struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 65536) + b"\xee" * 1000
        )
        assert_closed_by_server(sock)  # bounded by TIMEOUT, long before which the idle timeout hits
    assert server.server.budgets.writes.used == 0
    assert still_serves(server.port, "disk")


def test_writes_beyond_the_servers_budget_wait_unread_until_it_drains(serve):
    device = MemoryDevice(1 << 20)
    server = serve({"disk": device}, limits=NbdLimits(write_budget=65536))
    stalled, _, _ = connect(server.port, "disk")
    waiting, _, _ = connect(server.port, "disk")
    with stalled, waiting:
        header = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 65536)
        stalled.sendall(header + b"\x01" * 1000)  # holds the whole budget, sends no more for now
        deadline = time.monotonic() + TIMEOUT
        while server.server.budgets.writes.used < 65536 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.server.budgets.writes.used == 65536
        send_request(waiting, nbd.CMD_WRITE, 2, 65536, 4096)
        waiting.sendall(b"\x02" * 4096)
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no reply while the budget is held: not even read
            waiting.recv(16)
        stalled.sendall(b"\x01" * (65536 - 1000))
        assert struct.unpack(">IIQ", recv_exactly(stalled, 16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 1)
        waiting.settimeout(TIMEOUT)
        assert struct.unpack(">IIQ", recv_exactly(waiting, 16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 2)
    assert device.data[:4096] == b"\x01" * 4096 and device.data[65536 : 65536 + 4096] == b"\x02" * 4096


def test_a_client_that_never_reads_its_replies_is_dropped_and_gives_the_budget_back(serve):
    server = serve({"disk": MemoryDevice(8 << 20)}, limits=NbdLimits(idle_timeout=0.5))
    budget = server.server.budgets.reads
    sock, _, _ = connect(server.port, "disk")
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        for handle in range(32):  # 128 MiB of reads asked for, none of the replies read
            send_request(sock, nbd.CMD_READ, handle, 0, 4 << 20)
        deadline = time.monotonic() + TIMEOUT
        while not budget.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 0 < budget.used <= budget.limit
        while budget.used and time.monotonic() < deadline:  # reading nothing, until it is dropped
            time.sleep(0.05)
        assert budget.used == 0
        assert_closed_by_server(sock)
    assert still_serves(server.port, "disk")


def test_a_bad_request_magic_drops_that_connection_only(serve):
    server = serve({"disk": MemoryDevice(4096)})
    sock, _, _ = connect(server.port, "disk")
    with sock:
        sock.sendall(b"\x00" * 28)
        assert_closed_by_server(sock)
    assert still_serves(server.port, "disk")


def test_several_clients_use_several_exports_at_once_over_tcp_and_a_unix_socket(serve, tmp_path: Path):
    devices = {f"d{i}": MemoryDevice(65536) for i in range(3)}
    path = tmp_path / "nbd.sock"
    server = serve(devices, unix_path=str(path))
    assert f"unix:{path}" in server.server.addresses
    socks = [connect(server.port, name)[0] for name in devices]
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.settimeout(TIMEOUT)
    unix.connect(str(path))
    try:
        for i, sock in enumerate(socks):
            assert request(sock, nbd.CMD_WRITE, 0, data=bytes([i + 1]) * 100)[0] == 0
        recv_exactly(unix, 18)
        unix.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
        go(unix, "d1")
        assert request(unix, nbd.CMD_READ, 0, 100) == (0, b"\x02" * 100)
        for i, sock in enumerate(socks):
            assert request(sock, nbd.CMD_READ, 0, 100) == (0, bytes([i + 1]) * 100)
    finally:
        unix.close()
        for sock in socks:
            sock.close()


def test_closing_the_server_ends_open_connections_and_removes_its_socket(tmp_path: Path):
    path = tmp_path / "nbd.sock"
    server = ServerThread({"disk": MemoryDevice(4096)}, unix_path=str(path))
    sock, _, _ = connect(server.port, "disk")
    server.stop()
    with sock:
        assert_closed_by_server(sock)
    assert not path.exists()


def test_a_stale_unix_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path):
    path = tmp_path / "nbd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    first = ServerThread({"disk": MemoryDevice(4096)}, tcp=None, unix_path=str(path))
    try:
        with pytest.raises(OSError, match="another server"):
            ServerThread({"disk": MemoryDevice(4096)}, tcp=None, unix_path=str(path))
    finally:
        first.stop()


def test_structured_replies_carry_reads_errors_and_block_status_of_base_allocation(serve):
    device = MemoryDevice(1 << 20)
    device.data[8192:12288] = b"\x5a" * 4096  # data in 8 KiB..12 KiB, zeros elsewhere
    device.data[600000:600001] = b"\x01"
    server = serve({"disk": device})
    sock = greet(server.port)
    with sock:
        send_option(sock, nbd.OPT_STRUCTURED_REPLY)
        assert read_option_reply(sock)[:2] == (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK)
        for queries in ((), ("base:",)):  # listing: every context, ids reserved as 0
            send_option(sock, nbd.OPT_LIST_META_CONTEXT, meta_context_query("disk", *queries))
            assert read_option_reply(sock) == (
                nbd.OPT_LIST_META_CONTEXT,
                nbd.REP_META_CONTEXT,
                struct.pack(">I", 0) + nbd.BASE_ALLOCATION.encode(),
            )
            assert read_option_reply(sock)[:2] == (nbd.OPT_LIST_META_CONTEXT, nbd.REP_ACK)
        send_option(sock, nbd.OPT_SET_META_CONTEXT, meta_context_query("disk", "x-other:thing"))
        assert read_option_reply(sock)[:2] == (nbd.OPT_SET_META_CONTEXT, nbd.REP_ACK)  # none selected
        context = negotiate_structured(sock, "disk")
        flags = struct.unpack(">QH", go(sock, "disk")[nbd.INFO_EXPORT])[1]
        assert flags & nbd.TX_SEND_DF

        send_request(sock, nbd.CMD_READ, 1, 8000, 5000, flags=nbd.CMD_FLAG_DF)
        chunk_flags, kind, handle, payload = read_chunk(sock)
        assert (chunk_flags, kind, handle) == (nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_OFFSET_DATA, 1)
        assert payload == struct.pack(">Q", 8000) + bytes(192) + b"\x5a" * 4096 + bytes(712)

        send_request(sock, nbd.CMD_READ, 5, 100, 0)  # nothing to carry: a NONE chunk ends the reply
        assert read_chunk(sock) == (nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_NONE, 5, b"")

        send_request(sock, nbd.CMD_READ, 2, (1 << 20) - 10, 20)  # past the end: an error chunk
        chunk_flags, kind, handle, payload = read_chunk(sock)
        assert (chunk_flags, kind, handle) == (nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_ERROR, 2)
        code, length = struct.unpack_from(">IH", payload)
        assert code == nbd.EINVAL and b"past the end" in payload[6 : 6 + length]

        send_request(sock, nbd.CMD_BLOCK_STATUS, 3, 0, 1 << 20)
        chunk_flags, kind, handle, payload = read_chunk(sock)
        assert (chunk_flags, kind, handle) == (nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_BLOCK_STATUS, 3)
        assert struct.unpack_from(">I", payload)[0] == context
        runs = [struct.unpack_from(">II", payload, at) for at in range(4, len(payload), 8)]
        zero = nbd.STATE_HOLE | nbd.STATE_ZERO
        sector = 600000 // 512 * 512  # the device reports whole 512-byte sectors
        assert runs == [
            (8192, zero),
            (4096, 0),
            (sector - 12288, zero),
            (512, 0),
            ((1 << 20) - sector - 512, zero),
        ]

        send_request(sock, nbd.CMD_BLOCK_STATUS, 4, 9000, 100000, flags=nbd.CMD_FLAG_REQ_ONE)
        payload = read_chunk(sock)[3]
        assert struct.unpack_from(">II", payload, 4) == (12288 - 9000, 0) and len(payload) == 12

        request_disc(sock)


def test_block_status_without_a_selected_context_is_refused(serve):
    server = serve({"disk": MemoryDevice(1 << 16), "other": MemoryDevice(1 << 16)})
    sock = greet(server.port)
    with sock:
        negotiate_structured(sock, "other")  # selected for an export this client does not enter
        go(sock, "disk")
        send_request(sock, nbd.CMD_BLOCK_STATUS, 9, 0, 4096)
        _, kind, handle, payload = read_chunk(sock)
        assert (kind, handle) == (nbd.REPLY_TYPE_ERROR, 9) and struct.unpack_from(">I", payload)[
            0
        ] == nbd.EINVAL
        request_disc(sock)
    assert still_serves(server.port, "disk")


def test_requests_in_flight_are_all_answered_by_handle(serve):
    device = MemoryDevice(1 << 20)
    device.data[:] = bytes(range(256)) * 4096
    server = serve({"disk": device})
    sock, _, _ = connect(server.port, "disk")
    with sock:
        wanted = {handle: (handle * 10000, 4096 + handle) for handle in range(1, 33)}
        for handle, (offset, length) in wanted.items():  # all sent before any reply is read
            send_request(sock, nbd.CMD_READ, handle, offset, length)
        for _ in range(len(wanted)):
            magic, error, handle = struct.unpack(">IIQ", recv_exactly(sock, 16))
            offset, length = wanted.pop(handle)
            assert magic == nbd.SIMPLE_REPLY_MAGIC and error == 0
            assert recv_exactly(sock, length) == device.data[offset : offset + length]
        assert not wanted
        request_disc(sock)


def test_reads_in_memory_are_answered_at_once_and_others_go_to_the_thread_path_once(serve):
    device = WarmMemoryDevice(1 << 20, warm=1 << 19)
    device.data[:] = bytes(range(256)) * 4096
    server = serve({"disk": device})
    sock = greet(server.port)
    with sock:
        negotiate_structured(sock, "disk")
        go(sock, "disk")
        # Alternating: half in the warm first 512 KiB, half past it, all sent before any reply is read.
        wanted = {h: ((h % 2) * (1 << 19) + h * 4000, 4096 + h) for h in range(1, 33)}
        for handle, (offset, length) in wanted.items():
            send_request(sock, nbd.CMD_READ, handle, offset, length)
        for _ in range(len(wanted)):
            flags, kind, handle, payload = read_chunk(sock)
            offset, length = wanted.pop(handle)
            assert (flags, kind) == (nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_OFFSET_DATA)
            assert payload == struct.pack(">Q", offset) + device.data[offset : offset + length]
        assert not wanted
        request_disc(sock)
        assert_closed_by_server(sock)
    # The first read at least was answered by the request loop itself (nothing was queued before it),
    # not through ``read``; each read asked memory once, never again on its way to the thread path.
    assert device.calls["read"] < 32
    assert device.calls["read_warm"] == 32 and device.calls["read_cold"] == 16
    assert server.server.budgets.reads.used == 0


@pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed (apt-get install qemu-utils)"
)
def test_qemu_img_map_sees_the_zero_runs_through_block_status(serve):
    device = MemoryDevice(1 << 20)
    device.data[65536:131072] = b"\x77" * 65536
    server = serve({"mem": device})
    proc = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", server.url("mem")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    extents = [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(proc.stdout)]
    assert extents == [(0, 65536, False, True), (65536, 65536, True, False), (131072, 917504, False, True)]


@pytest.mark.skipif(
    shutil.which("qemu-io") is None, reason="qemu-io is not installed (apt-get install qemu-utils)"
)
def test_qemu_io_writes_and_reads_back_through_the_server(serve):
    device = MemoryDevice(1 << 20)
    server = serve({"mem": device})
    commands = ["write -P 0xab 4096 8192", "read -P 0xab 4096 8192", "write -P 0x11 1000 3000"]
    args = ["qemu-io", "-f", "raw"]
    for command in commands + ["read -P 0x11 1000 3000", "write -z 20000 5000", "discard 40000 4096"]:
        args += ["-c", command]
    proc = subprocess.run([*args, server.url("mem")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Pattern verification failed" not in proc.stdout
    assert device.data[1000:4000] == b"\x11" * 3000 and device.data[4096:12288] == b"\xab" * 8192
