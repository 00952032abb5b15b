"""Counting every call a gRPC server answers, by method and status code (a server interceptor).

Installed first on a server (cachepoint/rpc/channel.py), outside the request guard and the
authorization interceptors, so that calls they refuse (INVALID_ARGUMENT for a malformed request,
RESOURCE_EXHAUSTED over a peer's stream cap, PERMISSION_DENIED) are counted with their code too.
A method is its full gRPC name without the leading '/' (``cachepoint.v1.Catalog/Commit``): a bounded
set, the methods the server registered; calls to unknown methods are not wrapped (gRPC answers
UNIMPLEMENTED itself) and not counted.

The duration of a call is from the interceptor's first look to its status: for a stream that is the
stream's whole life (a Watch may last days), so compare streams' durations with care. Costs per call:
two clock reads and three metric updates (a few µs), next to a call's own hundreds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cachepoint.rpc.wrapping import Behavior, WrappingInterceptor, responses

# Seconds: a unary call takes milliseconds; FetchBlocks and PushBlocks streams seconds to minutes.
DURATION_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0, 1800.0)


def _code(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    """The status the call ends with: what the servicer (or an interceptor) set, else OK; an
    exception that set none is UNKNOWN, a cancelled call CANCELLED."""
    if isinstance(failed, asyncio.CancelledError | GeneratorExit):  # the caller went away
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code not in (None, 0):
        try:
            return grpc.StatusCode(code).name  # type: ignore[call-arg]
        except ValueError:
            return str(code)
    return "UNKNOWN" if failed is not None and not isinstance(failed, grpc.aio.AbortError) else "OK"


class RpcMetrics(WrappingInterceptor):
    """``PREFIX_rpcs_total{method,code}``, ``PREFIX_rpc_duration_seconds{method}`` and
    ``PREFIX_rpcs_in_flight{method}`` in ``registry``."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.calls = Counter(
            f"{prefix}_rpcs",
            "gRPC calls answered, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{prefix}_rpc_duration_seconds",
            "Time from a gRPC call's arrival to its status (a stream: its whole life).",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_rpcs_in_flight",
            "gRPC calls running now (Watch: open streams).",
            ["method"],
            registry=registry,
        )
        self.open: dict[str, int] = {}  # method -> calls running now, for collectors that read one method

    def method_of(self, details: grpc.HandlerCallDetails) -> str:
        return str(details.method).lstrip("/")

    def _enter(self, method: str) -> float:
        self.in_flight.labels(method).inc()
        self.open[method] = self.open.get(method, 0) + 1
        return time.perf_counter()

    def _leave(
        self, method: str, started: float, context: grpc.aio.ServicerContext, failed: BaseException | None
    ) -> None:
        self.open[method] -= 1
        self.in_flight.labels(method).dec()
        self.calls.labels(method, _code(context, failed)).inc()
        self.duration.labels(method).observe(time.perf_counter() - started)

    def _unary(self, behavior: Behavior, method: str) -> Callable[..., Awaitable[Any]]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = self._enter(method)
            failed: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as err:
                failed = err
                raise
            finally:
                self._leave(method, started, context, failed)

        return counted

    def _stream(self, behavior: Behavior, method: str) -> Callable[..., AsyncIterator[Any]]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = self._enter(method)
            failed: BaseException | None = None
            try:
                async for item in responses(behavior, request, context):
                    yield item
            except BaseException as err:
                failed = err
                raise
            finally:
                self._leave(method, started, context, failed)

        return counted
