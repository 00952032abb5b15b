"""Running a grpc.aio server in a daemon: bind, health, announce the bound address, stop cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cachepoint.errors import InvalidInput
from cachepoint.rpc import channel

log = logging.getLogger("cachepoint.serve")
STOP_GRACE = 5.0


def split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInput(f"address {text!r} must look like HOST:PORT (port 0 picks a free one)")
    return host, int(port)


class Server:
    """A grpc.aio server with the standard health service, bound to one address."""

    def __init__(
        self,
        listen: str,
        name: str,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        node: bool = False,
        metrics: grpc.aio.ServerInterceptor | None = None,
    ) -> None:
        split_address(listen)
        self.listen = listen
        self.name = name
        self.credentials = credentials  # None: plaintext
        self.grpc = channel.server(interceptors, node, metrics)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.address = ""

    def add(self, register: Callable[[grpc.aio.Server], None]) -> None:
        register(self.grpc)

    async def start(self) -> str:
        host, _ = split_address(self.listen)
        try:
            if self.credentials is None:
                port = self.grpc.add_insecure_port(self.listen)
            else:
                port = self.grpc.add_secure_port(self.listen, self.credentials)
        except RuntimeError as err:
            raise InvalidInput(f"cannot listen on {self.listen}: {err}") from err
        if port == 0:
            raise InvalidInput(f"cannot listen on {self.listen}: the address is in use or not local")
        await self.grpc.start()
        self.address = f"{host}:{port}"
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(self.name, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(STOP_GRACE)


def stop_event_on_signals() -> asyncio.Event:
    """SIGINT and SIGTERM set the event; the daemon then shuts down in reverse order of startup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def announce(address: str, state_file: Path | None, **extra: object) -> None:
    """Print the bound address as one JSON line (tests and scripts read it when they ask for port 0)
    and record it next to the data, so local commands can find the running daemon."""
    record = {"listening": address, "pid": os.getpid(), **extra}
    if state_file is not None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(state_file)
    print(json.dumps(record), flush=True)
