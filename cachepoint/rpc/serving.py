"""Running a grpc.aio server in a daemon: bind, health and reflection for every service it serves,
announce the bound address, stop cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cachepoint.errors import InvalidInput
from cachepoint.rpc import channel
from cachepoint.sdnotify import notify_ready

log = logging.getLogger("cachepoint.serve")
STOP_GRACE = 5.0


def split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInput(f"address {text!r} must look like HOST:PORT (port 0 picks a free one)")
    return host, int(port)


HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = reflection.SERVICE_NAME


class _NamesServices:
    """The grpc.aio server as a generated ``add_*Servicer_to_server`` sees it, noting the fully-qualified
    name of each service it registers (so health and reflection cannot forget a service added later)."""

    def __init__(self, server: grpc.aio.Server, names: list[str]) -> None:
        self._server = server
        self._names = names

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._names.append(service)
        self._server.add_registered_method_handlers(service, handlers)

    def __getattr__(self, name: str) -> object:
        return getattr(self._server, name)


class Server:
    """A grpc.aio server bound to one address, with the standard health service (SERVING for the
    server as a whole and for each service by its full name) and server reflection listing them all."""

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
        self.services: list[str] = [HEALTH_SERVICE]
        self.address = ""

    def add(self, register: Callable[[grpc.aio.Server], None]) -> None:
        register(_NamesServices(self.grpc, self.services))  # type: ignore[arg-type]

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
        reflection.enable_server_reflection([*self.services, REFLECTION_SERVICE], self.grpc)
        await self.grpc.start()
        self.address = f"{host}:{port}"
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(self.name, health_pb2.HealthCheckResponse.SERVING)
        for service in (*self.services, REFLECTION_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
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
    notify_ready()  # Type=notify units: every port is bound by now
