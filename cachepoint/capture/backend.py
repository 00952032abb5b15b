"""Where a capture runs: in this process, on the store opened for writing, or in the daemon that holds
the store (over its Agent API), which then queues the new version for the coordinator.

Commands open a backend for one piece of work and close it after, so a long `watch` does not keep the
store locked between captures.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cachepoint.capture.engine import CaptureOptions, CaptureReport, capture
from cachepoint.console import note
from cachepoint.errors import NotFound, StoreBusy
from cachepoint.layers.ingest import ProgressFn
from cachepoint.store.store import Store

CAPTURE_DEADLINE = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class Where:
    """The store and who is capturing (from the command's settings)."""

    store: Path
    author: str
    device: str
    new_layer_block_size: int


class Captures(Protocol):
    through_daemon: bool

    def capture(
        self, layer: str, root: Path, message: str, force: bool = False, progress: ProgressFn | None = None
    ) -> CaptureReport: ...

    def reading(self) -> contextlib.AbstractContextManager[Store]:
        """The store, for reads that must see every capture made so far through this backend."""
        ...


class LocalCaptures:
    through_daemon = False

    def __init__(self, store: Store, where: Where) -> None:
        self.store = store
        self.where = where

    def capture(
        self, layer: str, root: Path, message: str, force: bool = False, progress: ProgressFn | None = None
    ) -> CaptureReport:
        options = CaptureOptions(
            layer=layer,
            root=root,
            message=message,
            author=self.where.author,
            device=self.where.device,
            force=force,
            new_layer_block_size=self.where.new_layer_block_size,
        )
        return capture(self.store, options, progress)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Store]:
        yield self.store


class DaemonCaptures:
    through_daemon = True

    def __init__(self, socket: Path, where: Where) -> None:
        self.socket = socket
        self.where = where

    def capture(
        self, layer: str, root: Path, message: str, force: bool = False, progress: ProgressFn | None = None
    ) -> CaptureReport:
        # Imported here: a local capture does without them, and start-up time counts in every re-capture.
        import asyncio

        from cachepoint.v1 import agent_pb2

        request = agent_pb2.CaptureRequest(
            layer=layer,
            path=str(root.resolve()),
            message=message,
            author=self.where.author,
            force=force,
            block_size=self.where.new_layer_block_size,
        )
        response = asyncio.run(self._call(request))
        return CaptureReport.from_json(json.loads(response.result_json))

    async def _call(self, request: object) -> object:
        import grpc

        from cachepoint.rpc.agent_socket import agent_channel
        from cachepoint.rpc.client import from_rpc_error
        from cachepoint.v1 import agent_pb2_grpc

        async with agent_channel(self.socket) as ch:
            try:
                return await agent_pb2_grpc.AgentStub(ch).Capture(request, timeout=CAPTURE_DEADLINE)
            except grpc.RpcError as err:
                raise from_rpc_error(err, str(self.socket)) from err

    @contextlib.contextmanager
    def reading(self) -> Iterator[Store]:
        # Opened after the daemon committed: a read-only open sees what was committed when it opened.
        with Store.open(self.where.store) as store:
            yield store


@contextlib.contextmanager
def captures(where: Where) -> Iterator[Captures]:
    """The store opened for writing, or the daemon that holds it; another writer is StoreBusy."""
    from cachepoint.status import agent_socket

    try:
        store = Store.open(where.store, writable=True, create=True)
    except StoreBusy as busy:
        try:
            socket = agent_socket(where.store)
        except NotFound:
            raise busy from None  # another command holds it, not a daemon: nothing to ask
        yield DaemonCaptures(socket, where)
        return
    store.finish_compactions = note  # a command's compactions finish before it exits
    with store:
        yield LocalCaptures(store, where)
