"""The check of every call on a mutual-TLS port (the coordinator's, and a node's peer port): who is
calling (read from the peer certificate in the call's auth context), whether that certificate is
still current, and whether its principal was revoked. Calls of a principal revoked while they are open
(a Watch, a FetchBlocks) are ended by ``close_revoked``: the coordinator runs it every half heartbeat
interval, a node each time its heartbeat brings the revocation list (cachepoint/trust/fleet_view.py).

UNAUTHENTICATED: no certificate, one that names no principal, or one expired since its connection
was made (TLS checks expiry only at the handshake). PERMISSION_DENIED: a revoked principal.
A certificate of another CA, or an expired one on a new connection, never gets this far: the TLS
handshake refuses it, and the client sees UNAVAILABLE (grpc's Python server cannot ask for a client
certificate without also requiring and verifying it; see docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc

from cachepoint.logs import refused as log_refused
from cachepoint.rpc.wrapping import WrappingInterceptor, responses
from cachepoint.trust.principal import NotAPrincipal, Principal, principal_of_pem

log = logging.getLogger("cachepoint.trust")
_PARSED_MAX = 4096


# (call, method, principal when the certificate names one, the refusal's message)
RefusalHook = Callable[[grpc.aio.ServicerContext, str, Principal | None, str], Awaitable[None]]


class RevocationList(Protocol):
    def refuses(self, principal: Principal) -> float | None:
        """When ``principal``'s certificate was revoked, or None when it stands."""


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_parsed: dict[bytes, Principal | str] = {}


def peer_principal(context: grpc.aio.ServicerContext) -> Principal:
    """The principal of the call's client certificate; Refused(UNAUTHENTICATED) without one."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    if not pems:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "a client certificate of the fleet's CA is required")
    pem = pems[0]
    known = _parsed.get(pem)
    if known is None:
        try:
            known = principal_of_pem(pem)
        except (NotAPrincipal, ValueError) as err:
            known = str(err)
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()  # certificates are renewed every few days: an old one rarely returns
        _parsed[pem] = known
    if isinstance(known, str):
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"the client certificate names no principal: {known}")
    return known


@dataclass
class OpenCall:
    principal: Principal
    ended_because: str = ""  # set when the call is ended for a revocation


class Guard(WrappingInterceptor):
    def __init__(self, revocations: RevocationList, check_every: float = 1.0) -> None:
        self.revocations = revocations
        self.check_every = check_every
        # Told of each refusal here (the coordinator audits those of calls that would change state).
        self.on_refusal: RefusalHook | None = None
        self.open: dict[asyncio.Task[Any], OpenCall] = {}  # by the task that runs the call

    def check(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = peer_principal(context)
        if principal.not_after is not None and principal.not_after < datetime.now(UTC):
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the certificate of {principal.name!r} expired at "
                f"{principal.not_after:%Y-%m-%d %H:%M:%S} UTC",
            )
        at = self.revocations.refuses(principal)
        if at is not None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, _revoked_message(principal, at))
        return principal

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._tracked(context, method):
                return await behavior(request, context)

        return guarded

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., AsyncIterator[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._tracked(context, method):
                async for item in responses(behavior, request, context):
                    yield item

        return guarded

    @contextlib.asynccontextmanager
    async def _tracked(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        """Checked on entry, known as open while it runs; a call cancelled by close_revoked ends
        with PERMISSION_DENIED, any other cancellation (the client went away) stays a cancellation."""
        call = await self._enter(context, method)
        try:
            yield
        except asyncio.CancelledError:
            if call.ended_because:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, call.ended_because)
            raise
        finally:
            self.open.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def _enter(self, context: grpc.aio.ServicerContext, method: str) -> OpenCall:
        try:
            call = OpenCall(self.check(context))
        except Refused as err:
            message = f"{method} from {context.peer()}: {err}"
            log_refused(log, logging.WARNING, message, code=err.code.name, method=method, peer=context.peer())
            if self.on_refusal is not None:
                try:
                    principal: Principal | None = peer_principal(context)
                except Refused:
                    principal = None
                await self.on_refusal(context, method, principal, str(err))
            await context.abort(err.code, str(err))
        task = asyncio.current_task()
        if task is not None:
            self.open[task] = call
        return call

    def close_revoked(self) -> int:
        """End the open calls of revoked principals; returns how many."""
        closed = 0
        for task, call in list(self.open.items()):
            at = self.revocations.refuses(call.principal)
            if at is not None and not call.ended_because:
                call.ended_because = _revoked_message(call.principal, at)
                task.cancel()
                closed += 1
        if closed:
            log.warning("ended %d open calls of revoked principals", closed)
        return closed

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            try:
                self.close_revoked()
            except Exception:
                log.exception("checking open calls against revocations failed; trying again")


def _revoked_message(principal: Principal, at: float) -> str:
    when = datetime.fromtimestamp(at, UTC)
    return f"principal {principal.name!r} was revoked at {when:%Y-%m-%d %H:%M:%S} UTC"
