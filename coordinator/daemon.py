"""The coordinator daemon: wiring and lifecycle. Startup order: store, services, server; shutdown
reverses it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from cachepoint.rpc.block_exchange import BlockExchangeService, ServeCounters
from cachepoint.rpc.serving import Server, announce, stop_event_on_signals
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2_grpc, catalog_pb2_grpc, fleet_pb2_grpc
from coordinator.catalog.events import EventLog
from coordinator.catalog.service import CatalogService
from coordinator.fleet.registry import Registry
from coordinator.fleet.service import FleetService

log = logging.getLogger("coordinator")
STATE_FILE = "coordinator.json"


async def serve(data: Path, listen: str, stop: asyncio.Event | None = None) -> None:
    store = Store.open(data, writable=True, create=True)
    try:
        counters = ServeCounters()
        events = EventLog(store)
        server = Server(listen, "cachepoint.v1.Catalog")
        server.add(
            lambda s: blocks_pb2_grpc.add_BlockExchangeServicer_to_server(
                BlockExchangeService(store, counters, accepts_pushes=True), s
            )
        )
        server.add(lambda s: catalog_pb2_grpc.add_CatalogServicer_to_server(CatalogService(store, events), s))
        server.add(lambda s: fleet_pb2_grpc.add_FleetServicer_to_server(FleetService(Registry()), s))
        address = await server.start()
        stop = stop or stop_event_on_signals()
        announce(address, data / STATE_FILE, role="coordinator", catalog_position=events.position)
        log.info("coordinator serving %s on %s", data, address)
        try:
            await stop.wait()
        finally:
            events.close()
            await server.stop()
    finally:
        store.close()
