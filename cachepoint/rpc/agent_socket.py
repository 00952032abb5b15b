"""The Agent's Unix socket: local control of a daemon (ingest of a host path, capture, attach, gc...),
never reachable from the network.

The daemon serves the Agent on ``STORE/agent.sock`` only, through a gRPC server of its own; its TCP
port serves peers (BlockExchange, the Catalog reads, health). Who may connect is decided by the
file system: the socket is mode 0600 (the daemon's user), or 0660 and owned by ``agent_group`` when
that is set. Connecting to a Unix socket needs write permission on it, and reaching it needs search
permission on the store directory; a store directory that another user could write is refused,
since that user could replace the socket with one of their own and be handed every local command.

A socket left by a daemon that was killed is removed at the next start; one that still answers is a
live daemon (or another server), and the start is refused. Paths longer than a Unix socket address
holds (107 bytes) are reached through ``/proc/self/fd/N/agent.sock``, N an open descriptor of the
store directory, on both sides.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc

from cachepoint.errors import InvalidInput, StoreBusy, Unreachable
from cachepoint.rpc import channel

log = logging.getLogger("cachepoint.serve")

AGENT_SOCKET = "agent.sock"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its terminating NUL
STOP_GRACE = 5.0


class UnsafeStoreDirectory(InvalidInput):
    """store directory {} is {}: another user could replace the daemon's agent socket there and take
    every local command; {}"""


def socket_path(store: Path) -> Path:
    return store.absolute() / AGENT_SOCKET


@contextlib.contextmanager
def unix_target(path: Path) -> Iterator[str]:
    """A gRPC target naming the Unix socket ``path``, valid while the context lasts."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield f"unix:{path}"
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"unix:/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def check_store_directory(store: Path) -> None:
    """Refuse a store directory that anyone but this user owns or may write (as PostgreSQL refuses a
    data directory with loose permissions): the socket's mode protects it only if it stays ours."""
    info = os.stat(store)
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid():
        raise UnsafeStoreDirectory(
            store,
            f"owned by uid {info.st_uid}, not by this daemon's uid {os.geteuid()}",
            "run the daemon as its owner",
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeStoreDirectory(
            store, f"writable by its group or others (mode {mode:04o})", f"run `chmod go-w {store}`"
        )


def resolve_group(name: str) -> int:
    """The gid of ``agent_group`` (a name or a number)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise InvalidInput(f"agent_group {name!r} is not a group on this host") from None


def _answers(target: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(target)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


def clear_stale_socket(store: Path, path: Path, reach: str) -> None:
    """Remove the socket a killed daemon left at ``path`` (reached as ``reach``); refuse when something
    answers on it, or when it is not a socket (gRPC would delete whatever is there)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidInput(
            f"{path} exists and is not a socket: move it away so the daemon can serve its Agent"
        )
    try:
        live = _answers(reach)
    except OSError as err:
        raise InvalidInput(f"cannot probe the agent socket {path}: {err}") from err
    if live:
        raise StoreBusy(store, f"a daemon is already serving its agent socket {path}")
    log.info("removing the agent socket %s left by a daemon that did not stop cleanly", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(reach)


class AgentServer:
    """A gRPC server on the store's agent socket: the Agent service and nothing else."""

    def __init__(
        self,
        store: Path,
        register: Callable[[grpc.aio.Server], None],
        group: str = "",
        metrics: grpc.aio.ServerInterceptor | None = None,
    ) -> None:
        """``metrics``: counts its calls, as the peer port's (cachepoint/rpc/metrics.py)."""
        self.store = store
        self.metrics = metrics
        self.path = socket_path(store)
        self.register = register
        self.group = group
        self._targets = contextlib.ExitStack()
        self.grpc: grpc.aio.Server | None = None

    async def start(self) -> Path:
        check_store_directory(self.store)
        gid = resolve_group(self.group) if self.group else None
        target = self._targets.enter_context(unix_target(self.path))
        clear_stale_socket(self.store, self.path, target.removeprefix("unix:"))
        server = self.grpc = channel.server(metrics=self.metrics)
        self.register(server)
        # The socket is created (by add_insecure_port) with the umask's bits: 0177 for that moment, so it
        # is never reachable by others, even briefly. The umask is the process's: held only that long.
        previous = os.umask(0o177)
        try:
            bound = server.add_insecure_port(target)
        except RuntimeError as err:
            raise InvalidInput(f"cannot serve the Agent on {self.path}: {err}") from err
        finally:
            os.umask(previous)
        if bound == 0:
            raise InvalidInput(f"cannot serve the Agent on {self.path}")
        if gid is not None:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, 0o600 if gid is None else 0o660)
        await server.start()
        if gid is not None:
            directory = os.stat(self.store)
            searchable = directory.st_mode & stat.S_IXOTH or (
                directory.st_gid == gid and directory.st_mode & stat.S_IXGRP
            )
            if not searchable:
                log.warning(
                    "agent_group %s cannot reach %s: the store directory gives that group no search (x)",
                    self.group,
                    self.path,
                )
        return self.path

    async def stop(self) -> None:
        try:
            if self.grpc is not None:
                await self.grpc.stop(STOP_GRACE)
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.unlink(self.path)
        finally:
            self._targets.close()


@contextlib.asynccontextmanager
async def agent_channel(path: Path) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the daemon's Agent on ``path``. A socket this user may not write is named as such
    here: gRPC would only say it is unavailable."""
    if path.exists() and not os.access(path, os.W_OK):
        raise Unreachable(
            path,
            "permission denied",
            "only the daemon's user (or a member of its agent_group) may use its local control socket",
        )
    with unix_target(path) as target:
        # Plaintext, always: on this socket the file system is the authentication, and the daemon's
        # Agent server has no other kind of port.
        async with grpc.aio.insecure_channel(target, options=channel.OPTIONS) as ch:
            yield ch
