"""Calling other nodes: deadlines on every call, and their status codes turned back into our errors."""

from __future__ import annotations

import grpc

from cachepoint.errors import (
    AlreadyExists,
    CachepointError,
    IntegrityFailure,
    InvalidInput,
    NotFound,
    RemoteOutOfSpace,
    RemoteRefused,
    Unreachable,
)
from cachepoint.rpc import channel
from cachepoint.rpc.errors import OUT_OF_SPACE_TRAILER

UNARY_DEADLINE = 30.0  # seconds: a catalog call that takes longer is a sick server, not a slow one

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def _tls_hint(code: grpc.StatusCode, details: str) -> str:
    """A TLS refusal reaches a gRPC client as UNAVAILABLE: say what it most likely means."""
    if code != grpc.StatusCode.UNAVAILABLE or not any(s in details for s in ("Socket closed", "andshake")):
        return ""
    if channel.identity() is None:
        return " (if it serves TLS, this machine must enroll first: `cachepoint enroll`)"
    return (
        " (the TLS handshake failed: it accepts only current certificates of the fleet's CA, "
        "and this identity's CA must be the one that issued its certificate)"
    )


def _trailers(err: grpc.RpcError) -> set[tuple[str, str]]:
    trailing = err.trailing_metadata() if isinstance(err, grpc.aio.AioRpcError | grpc.Call) else None
    return {(str(key), str(value)) for key, value in trailing or ()}


def from_rpc_error(err: grpc.RpcError, address: str) -> CachepointError:
    code = err.code() if isinstance(err, grpc.aio.AioRpcError | grpc.Call) else grpc.StatusCode.UNKNOWN
    details = err.details() if isinstance(err, grpc.aio.AioRpcError | grpc.Call) else str(err)
    if code in _UNREACHABLE:
        return Unreachable(address, code.name, details + _tls_hint(code, details))
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{address}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(f"{address}: {details}")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(f"{address}: {details}")
    if code == grpc.StatusCode.DATA_LOSS:  # the remote found damage in what it holds
        return IntegrityFailure(f"{address}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and OUT_OF_SPACE_TRAILER in _trailers(err):
        return RemoteOutOfSpace(address, code.name, details)
    return RemoteRefused(address, code.name, details)
