"""Wrapping a grpc.aio method handler's behaviour, for server interceptors that run something around
every call (the certificate guard, authorization, the RPC metrics)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]


def around_calls(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Behavior], Behavior],
    stream: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler:
    """The same handler, its behaviour passed through ``unary`` (calls answered once) or ``stream``
    (calls answered with a stream of responses)."""
    args = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), *args)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), *args)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), *args)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), *args)


async def responses(
    behavior: Behavior, request: Any, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """A streaming behaviour's responses, whether it yields them (an async generator) or writes them
    with ``context.write`` (a coroutine)."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that passes every call's behaviour through ``_unary`` or ``_stream`` with the
    call's method name. Subclasses: AuthorizingInterceptor, the certificate Guard, RpcMetrics."""

    def method_of(self, details: grpc.HandlerCallDetails) -> str:
        return str(details.method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = self.method_of(handler_call_details)
        return around_calls(handler, lambda b: self._unary(b, method), lambda b: self._stream(b, method))

    def _unary(self, behavior: Behavior, method: str) -> Callable[..., Awaitable[Any]]:
        raise NotImplementedError

    def _stream(self, behavior: Behavior, method: str) -> Callable[..., AsyncIterator[Any]]:
        raise NotImplementedError


class AuthorizingInterceptor(WrappingInterceptor):
    """A server interceptor that runs ``authorize`` before every call's behaviour (for a call whose
    request is a stream, ``request`` is that stream: its rules look at roles only). Subclasses: the
    coordinator's Authorizer and a node's PeerAuthorizer."""

    async def authorize(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> None:
        raise NotImplementedError

    def _unary(self, behavior: Behavior, method: str) -> Callable[..., Awaitable[Any]]:
        async def authorized(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self.authorize(context, method, request)
            return await behavior(request, context)

        return authorized

    def _stream(self, behavior: Behavior, method: str) -> Callable[..., AsyncIterator[Any]]:
        async def authorized(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self.authorize(context, method, request)
            async for item in responses(behavior, request, context):
                yield item

        return authorized
