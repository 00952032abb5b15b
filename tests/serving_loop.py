"""An event loop on a thread of its own, as the daemon runs its gRPC servers, for tests that serve
from the test process and call from the test's own thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from cachepoint.rpc.serving import Server

TIMEOUT = 30.0


@contextlib.contextmanager
def serving_loop() -> Iterator[tuple[asyncio.AbstractEventLoop, list[Server]]]:
    """Yields (loop, servers): the servers a test adds to the list are stopped on exit, then the loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-test-loop", daemon=True)
    thread.start()
    servers: list[Server] = []
    try:
        yield loop, servers
    finally:
        for server in servers:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
