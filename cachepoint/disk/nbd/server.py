"""An asyncio NBD server over any BlockDevice: listening sockets and the option haggling.

Protocol only: it knows nothing of stores or layers. Exports are looked up by name when a client
chooses one (NBD_OPT_GO, NBD_OPT_INFO or the old NBD_OPT_EXPORT_NAME), so the daemon can attach
and detach disks while the server runs. After the handshake a connection is served by
transmission.py (requests in parallel, structured replies and block status when negotiated).

With TLS (tls.py) a TCP client must upgrade with NBD_OPT_STARTTLS before anything else and present a
certificate; each export it names is then checked against that certificate. Refusals are NBD errors
and one log line per connection.

A misbehaving client only ever loses its own connection: every read from a socket is bounded (the
handshake by a deadline, a request by its declared length, which is capped), and a write applies
only once its whole payload has arrived. What all connections together hold in memory is bounded
too, and a client stalled in the middle of a request is dropped (limits.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import struct
from collections.abc import Callable

from cachepoint import memory
from cachepoint.disk.nbd import protocol as p
from cachepoint.disk.nbd.limits import NbdLimits, ServerBudgets
from cachepoint.disk.nbd.protocol import BlockDevice, Violation
from cachepoint.disk.nbd.tls import NbdTls
from cachepoint.disk.nbd.transmission import Negotiated, Observe, Stalled, transmit

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 30.0  # a client that neither chooses an export nor leaves loses its connection
MAX_OPTIONS = 64  # per connection; a client looping on options is cut off
CLOSE_SECONDS = 5.0
SEND_BUFFER = 4 * 1024 * 1024  # the kernel caps it at net.core.wmem_max

ExportLookup = Callable[[str], BlockDevice | None]
ExportList = Callable[[], list[str]]


class NbdServer:
    """Listening sockets and the connections they accepted. Made by ``start_nbd``."""

    def __init__(
        self,
        exports: ExportLookup,
        list_exports: ExportList,
        limits: NbdLimits | None = None,
        tls: NbdTls | None = None,
        observe: Observe | None = None,
    ) -> None:
        self._exports = exports
        self.observe = observe  # told of every request answered (transmission.py)
        self._list_exports = list_exports
        self.tls = tls
        self.budgets = ServerBudgets(limits or NbdLimits())
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        # TLS connections in transmission: (peer, client certificate, export), checked again by
        # close_refused when what the server knows of the fleet changes (a revocation).
        self._authorized: dict[asyncio.StreamWriter, tuple[str, bytes, str]] = {}
        self._closing = False
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
        self._closing = True
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
        sock = writer.get_extra_info("socket")
        local = sock is not None and sock.family == socket.AF_UNIX
        if sock is not None:
            # A Unix socket's send buffer does not grow by itself: at the default 208 KiB a 2 MiB
            # read reply took ten wake-ups, and copies were 2x slower than over TCP. TCP's grows,
            # but from 16 KiB, and a reply the kernel does not take whole is copied into the
            # transport's buffer first (3.11).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancellation that arrives as
            # the handshake completes, and close() would then leave this connection running.
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                tls = None if local else self.tls
                handshake = _Handshake(self, reader, writer, tls, str(peer))
                chosen = await handshake.run()
            if chosen is not None:
                if handshake.certificate is not None:
                    self._authorized[writer] = (str(peer), handshake.certificate, handshake.export)
                await transmit(chosen, reader, writer, self.budgets, self.observe)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as err:
            log.debug("nbd client %s went away: %r", peer, err)
        except Violation as err:
            log.info("nbd client %s dropped: %s", peer, err)
        except TlsFailed as err:
            log.warning("nbd client %s refused: %s", peer, err)
        except Stalled as err:
            log.info("nbd client %s dropped: %s", peer, err)
            writer.transport.abort()  # what is queued for it would never leave
        except asyncio.CancelledError:
            pass  # the server is closing
        except Exception:
            log.exception("nbd client %s: unexpected failure", peer)
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            self._authorized.pop(writer, None)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), CLOSE_SECONDS)
            except Exception:
                # A client that reads nothing never lets close() flush what is queued for it: drop
                # the queue with the connection.
                writer.transport.abort()
            if not self._closing:
                memory.after_load()  # its buffers are free now: give them back to the system soon

    def close_refused(self) -> int:
        """End the TLS connections whose client may no longer use the export it chose (its principal
        was revoked since): asked when what the server's ``authorize`` knows changes. Returns how
        many ended."""
        if self.tls is None:
            return 0
        ended = 0
        for writer, (peer, certificate, export) in list(self._authorized.items()):
            try:
                why = self.tls.authorize(certificate, export)
            except Exception:
                log.exception("nbd: checking access to export %r failed", export)
                continue
            if why:
                log.warning("nbd client %s disconnected from %r: %s", peer, export, why)
                self._authorized.pop(writer, None)
                writer.transport.abort()
                ended += 1
        return ended

    def lookup(self, name: str) -> BlockDevice | None:
        try:
            return self._exports(name)
        except Exception:
            log.exception("nbd: looking up export %r failed", name)
            return None

    def export_names(self) -> list[str]:
        return self._list_exports()


class TlsFailed(Exception):
    """The client's TLS handshake failed (no certificate, another CA's, expired...): the
    connection ends, as the spec says, since STARTTLS was already acknowledged."""


class _Handshake:
    """Option haggling for one connection; ``run`` returns what transmission needs, or None when
    the client aborted. With ``tls``, the connection must upgrade first (FORCEDTLS)."""

    def __init__(
        self,
        server: NbdServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: NbdTls | None = None,
        peer: str = "",
    ):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.peer = peer
        self.certificate: bytes | None = None  # the client's, in DER, once TLS is up
        self.export = ""  # the export chosen
        self.refusal_logged = False
        self.structured = False
        self.contexts_for: str | None = None  # the export base:allocation was selected for

    async def reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self.writer.write(p.option_reply(option, reply, payload))
        await self.writer.drain()

    async def run(self) -> Negotiated | None:
        writer, reader = self.writer, self.reader
        writer.write(p.HELLO.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        await writer.drain()
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        if client_flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise Violation(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = p.OPTION.unpack(await reader.readexactly(p.OPTION.size))
            if magic != p.IHAVEOPT:
                raise Violation(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_DATA:
                raise Violation(f"option {option} carries {length} bytes")
            data = await reader.readexactly(length)
            if option == p.OPT_STARTTLS:
                await self._starttls(data)
                continue
            if self.tls is not None and self.certificate is None and option != p.OPT_ABORT:
                if option == p.OPT_EXPORT_NAME:
                    # It cannot be answered with an error: the spec says to end the session.
                    self.refused("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: this server requires TLS")
                    return None
                self.refused("plaintext option before NBD_OPT_STARTTLS: this server requires TLS")
                await self.reply(
                    option,
                    p.REP_ERR_TLS_REQD,
                    b"this server requires TLS: send NBD_OPT_STARTTLS (nbds:// URIs, qemu's tls-creds) "
                    b"with a client certificate of the fleet",
                )
                continue
            if option == p.OPT_EXPORT_NAME:
                name = p.decode_name(data)
                device = None if name is None else self.server.lookup(name)
                if device is None:
                    # This option cannot answer with an error: the spec says to drop the session.
                    raise Violation(f"no export named {name!r}")
                refusal = self.refusal(name or "")
                if refusal:
                    self.refused(refusal)
                    return None
                tail = b"" if no_zeroes else bytes(124)
                flags = p.transmission_flags(device, self.structured)
                writer.write(struct.pack(">QH", device.size, flags) + tail)
                await writer.drain()
                return self._negotiated(device, name or "")
            if option == p.OPT_ABORT:
                await self.reply(option, p.REP_ACK)
                return None
            if option == p.OPT_LIST:
                await self._list(data)
            elif option in (p.OPT_INFO, p.OPT_GO):
                chosen = await self._info(option, data)
                if chosen is not None and option == p.OPT_GO:
                    return self._negotiated(*chosen)
            elif option == p.OPT_STRUCTURED_REPLY:
                await self._structured_reply(data)
            elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                await self._meta_context(option, data)
            else:  # extended headers and anything newer
                await self.reply(option, p.REP_ERR_UNSUP, b"not supported by this server")
        raise Violation(f"more than {MAX_OPTIONS} options")

    # -- TLS and who may use an export ----------------------------------------------------------

    async def _starttls(self, data: bytes) -> None:
        if self.tls is None:
            # NOTLS mode (no TLS configured, or a Unix socket connection): the client goes on without.
            await self.reply(p.OPT_STARTTLS, p.REP_ERR_UNSUP, b"TLS is not configured on this connection")
            return
        if self.certificate is not None:
            await self.reply(p.OPT_STARTTLS, p.REP_ERR_INVALID, b"TLS is already up")
            return
        if data:
            await self.reply(p.OPT_STARTTLS, p.REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return
        await self.reply(p.OPT_STARTTLS, p.REP_ACK)
        try:
            await self.writer.start_tls(self.tls.context())
        except ssl.SSLError as err:
            why = getattr(err, "verify_message", None) or getattr(err, "reason", None) or str(err)
            raise TlsFailed(f"TLS handshake failed: {why}") from err
        tls_object = self.writer.get_extra_info("ssl_object")
        certificate = tls_object.getpeercert(binary_form=True) if tls_object is not None else None
        if not certificate:  # CERT_REQUIRED makes this unreachable; never serve without one
            raise TlsFailed("no client certificate after the TLS handshake")
        self.certificate = certificate

    def refusal(self, name: str) -> str:
        """Why this connection may not use export ``name``; "" when it may (always, without TLS)."""
        if self.tls is None or self.certificate is None:
            return ""
        try:
            return self.tls.authorize(self.certificate, name)
        except Exception:
            log.exception("nbd: checking access to export %r failed", name)
            return f"access to export {name!r} could not be checked"

    def refused(self, why: str) -> None:
        """One log line per connection, however many options the client tries."""
        if not self.refusal_logged:
            self.refusal_logged = True
            log.warning("nbd client %s refused: %s", self.peer, why)

    def _negotiated(self, device: BlockDevice, name: str) -> Negotiated:
        self.export = name
        # Contexts chosen for another export than the one entered do not apply (the spec ties a
        # NBD_OPT_SET_META_CONTEXT to the export it names).
        allocation = self.contexts_for is not None and self.contexts_for == name
        return Negotiated(device, structured=self.structured, allocation=allocation)

    async def _list(self, data: bytes) -> None:
        if data:
            await self.reply(p.OPT_LIST, p.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for name in self.server.export_names():
            if self.refusal(name):
                continue  # a client is not shown what it may not use
            raw = name.encode()
            await self.reply(p.OPT_LIST, p.REP_SERVER, struct.pack(">I", len(raw)) + raw)
        await self.reply(p.OPT_LIST, p.REP_ACK)

    async def _info(self, option: int, data: bytes) -> tuple[BlockDevice, str] | None:
        parsed = p.parse_info_request(data)
        if parsed is None:
            await self.reply(option, p.REP_ERR_INVALID, b"malformed export name or info list")
            return None
        name, requests = parsed
        device = self.server.lookup(name)
        if device is None:
            await self.reply(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        refusal = self.refusal(name)
        if refusal:
            self.refused(refusal)
            await self.reply(option, p.REP_ERR_POLICY, refusal.encode()[: p.MAX_MESSAGE])
            return None
        flags = p.transmission_flags(device, self.structured)
        await self.reply(option, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, device.size, flags))
        if p.INFO_BLOCK_SIZE in requests:
            preferred = min(max(device.block_size, 512), p.MAX_PAYLOAD)
            if preferred & (preferred - 1):  # the spec wants a power of two
                preferred = 4096
            sizes = struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, preferred, p.MAX_PAYLOAD)
            await self.reply(option, p.REP_INFO, sizes)
        await self.reply(option, p.REP_ACK)
        return device, name

    async def _structured_reply(self, data: bytes) -> None:
        if data:
            await self.reply(
                p.OPT_STRUCTURED_REPLY, p.REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data"
            )
            return
        self.structured = True
        await self.reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)

    async def _meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            await self.reply(option, p.REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        parsed = p.parse_meta_context_request(data)
        if parsed is None:
            await self.reply(option, p.REP_ERR_INVALID, b"malformed export name or query list")
            return
        name, queries = parsed
        if self.server.lookup(name) is None:
            await self.reply(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        refusal = self.refusal(name)
        if refusal:
            self.refused(refusal)
            await self.reply(option, p.REP_ERR_POLICY, refusal.encode()[: p.MAX_MESSAGE])
            return
        listing = option == p.OPT_LIST_META_CONTEXT
        found = p.matching_contexts(queries, listing)
        if not listing:
            self.contexts_for = name if found else None
        for context in found:
            # Ids in a listing are reserved and sent as 0, by the spec.
            context_id = 0 if listing else p.BASE_ALLOCATION_ID
            self.writer.write(p.meta_context_reply(option, context_id, context))
        await self.reply(option, p.REP_ACK)


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
    limits: NbdLimits | None = None,
    tls: NbdTls | None = None,
    observe: Observe | None = None,
) -> NbdServer:
    """Listen on TCP and/or a Unix socket; ``exports(name)`` is asked when a client picks an export.
    With ``tls``, TCP clients must upgrade to TLS first (tls.py)."""
    if tcp is None and unix_path is None:
        raise ValueError("the NBD server needs a TCP address or a Unix socket path")
    server = NbdServer(exports, list_exports, limits, tls, observe)
    try:
        if tcp is not None:
            await server.listen_tcp(tcp)
        if unix_path is not None:
            await server.listen_unix(unix_path)
    except BaseException:
        await server.close()
        raise
    return server
