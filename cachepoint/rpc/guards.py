"""What every server refuses before a servicer sees the call: requests whose bytes are not the
message they claim to be, and more block streams from one peer than its share.

One interceptor, installed on every server (cachepoint/rpc/channel.py):

- A request that does not parse is answered INVALID_ARGUMENT with one log line. gRPC alone would
  log a traceback and answer UNKNOWN for it, which says nothing to the caller and buries the log.
- ``FetchBlocks`` and ``PushBlocks`` are capped at PEER_STREAMS streams at once per peer address
  (the IP from ``context.peer()``, whatever its port: a peer cannot get more by opening
  connections), each method on its own. One more is refused at once with RESOURCE_EXHAUSTED; the
  fetcher takes that as "busy" and asks again a little later. A FetchBlocks stream costs the server
  about two batches (~2 MiB) while it runs, so one address holds at most ~16 MiB of a node's memory
  in fetches; a PushBlocks stream holds the batch being checked (~1 MiB from an honest pusher, the
  server's message limit at most). A site behind one NAT address shares one share.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cachepoint.logs import refused
from cachepoint.rpc.streams import peer_host

log = logging.getLogger("cachepoint.rpc")

PEER_STREAMS = 8
BUSY_KEY = "cachepoint-busy"  # trailing metadata of a refusal for the cap: the caller may ask again soon
CAPPED_METHODS = frozenset(
    {"/cachepoint.v1.BlockExchange/FetchBlocks", "/cachepoint.v1.BlockExchange/PushBlocks"}
)


class _Malformed:
    """What a request that did not parse becomes, so the call can be refused from inside it."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class PeerStreams:
    """How many streams of one method each peer address runs now; refusal past ``limit``."""

    def __init__(self, method: str, limit: int) -> None:
        self.method = method.rpartition("/")[2]
        self.limit = limit
        self.open: dict[str, int] = {}

    async def enter(self, context: grpc.aio.ServicerContext) -> str:
        peer = peer_host(context.peer() or "")
        count = self.open.get(peer, 0)
        if count >= self.limit:
            refused(
                log,
                logging.INFO,
                f"{self.method}: refused a stream from {peer}, which has {count} open (the limit per peer)",
                code="RESOURCE_EXHAUSTED",
                method=self.method,
                peer=peer,
            )
            context.set_trailing_metadata(((BUSY_KEY, str(self.limit)),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.method}: {count} streams from {peer} are open, the limit per peer is "
                f"{self.limit}; try again when one ends",
            )
        self.open[peer] = count + 1
        return peer

    def leave(self, peer: str) -> None:
        left = self.open[peer] - 1
        if left:
            self.open[peer] = left
        else:
            del self.open[peer]


class RequestGuard(grpc.aio.ServerInterceptor):
    """Refuses malformed requests (every method) and caps block streams per peer (CAPPED_METHODS)."""

    def __init__(self, peer_streams: int = PEER_STREAMS) -> None:
        self.streams = {method: PeerStreams(method, peer_streams) for method in CAPPED_METHODS}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # an unknown method: gRPC answers UNIMPLEMENTED
        method = str(handler_call_details.method)
        return _guarded(handler, method, self.streams.get(method))


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as err:  # DecodeError, or anything a hand-written deserializer raises
            return _Malformed(err)

    return parse


async def _refuse(context: grpc.aio.ServicerContext, method: str, malformed: _Malformed) -> None:
    refused(
        log,
        logging.WARNING,
        f"{method}: refused a malformed request from {context.peer()}: {malformed.error}",
        code="INVALID_ARGUMENT",
        method=method,
        peer=context.peer(),
    )
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request is not a valid message ({malformed.error})"
    )


def _checked_stream(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str
) -> AsyncIterator[Any]:
    async def checked() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Malformed):
                await _refuse(context, method, request)
            yield request

    return checked()


def _guarded(
    handler: grpc.RpcMethodHandler, method: str, streams: PeerStreams | None
) -> grpc.RpcMethodHandler:
    """The same handler, its requests parsed tolerantly and checked, and its body run under the
    per-peer cap when ``streams`` is given. Async generator bodies stay generators, coroutines stay
    coroutines: grpc.aio serves the two differently."""
    if handler.request_streaming:
        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary

        def arguments(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return _checked_stream(request, context, method)

    else:
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

        def arguments(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return request

    async def admit(request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, str | None]:
        if isinstance(request, _Malformed):
            await _refuse(context, method, request)
        peer = await streams.enter(context) if streams is not None else None
        return arguments(request, context), peer

    if not (inspect.isasyncgenfunction(inner) or inspect.iscoroutinefunction(inner)):
        return handler  # a synchronous handler (none of ours): left as gRPC serves it
    if inspect.isasyncgenfunction(inner):

        async def behaviour_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            checked, peer = await admit(request, context)
            try:
                async for response in inner(checked, context):
                    yield response
            finally:
                if peer is not None and streams is not None:
                    streams.leave(peer)

        behaviour: Callable[..., Any] = behaviour_stream
    else:

        async def behaviour_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            checked, peer = await admit(request, context)
            try:
                return await inner(checked, context)
            finally:
                if peer is not None and streams is not None:
                    streams.leave(peer)

        behaviour = behaviour_call

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour,
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )
