"""Who is calling an HTTP server with TLS, and whether a route's rule lets them: one aiohttp middleware
(``guard``) for the daemon's HTTP server and the coordinator's REST API alike.

Authentication (401, JSON, with ``WWW-Authenticate: Bearer``): a client certificate of the fleet's CA
(the handshake checked the chain, this module its dates: cachepoint/http/tls.py) or an
``Authorization: Bearer TOKEN`` the fleet's CA signed (cachepoint/trust/bearer.py). Every credential a
request carries must be valid, and a certificate and a token together must name the same principal:
a request never passes on its better half. A revoked principal's certificate or token is a 401 too
(the credential is not valid), as far as revocations are known (``revoked``; at the coordinator, the
revocation file; at a node, the view its heartbeat replies bring: cachepoint/trust/fleet_view.py).

Authorization (403, JSON naming principal, route and rule): each route is a key "METHOD PATTERN"
(HEAD as GET) of a table of RouteRule; a route missing from the table is refused; a ``public`` rule
lets anyone in without a credential (the coordinator's dashboard page, which holds no data). ``refused``
is told of every 403 of a rule that changes state (the coordinator audits them as ``access.denied``).
Handlers read the authenticated principal with ``principal_of_request`` and record that, never an
actor the request claims.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import hdrs, web
from cryptography import x509

from cachepoint.http.tls import ServerTls
from cachepoint.logs import refused as log_refused
from cachepoint.trust.bearer import BearerToken, TokenInvalid, TokenNotCurrent
from cachepoint.trust.principal import NotAPrincipal, Principal, principal_of

log = logging.getLogger("cachepoint.http.auth")
PRINCIPAL = "cachepoint.principal"  # request key of the authenticated Principal
CHALLENGE = 'Bearer realm="cachepoint"'
_CACHED = 1024  # parsed certificates and verified tokens kept (keep-alive clients send them again)

Revoked = Callable[[Principal], float | None]  # when the principal was revoked, or None
# A check returns why the request is refused, or "" to allow it.
Check = Callable[[Principal, web.Request], Awaitable[str]]
Refused = Callable[[Principal, str, "RouteRule", str, web.Request], Awaitable[None]]


class Unauthenticated(Exception):
    """Why a request carries no valid credential (the message goes back in the 401)."""


@dataclass(frozen=True)
class RouteRule:
    name: str  # a rule of coordinator/authz.py
    text: str  # as README.md prints it
    check: Check
    changes_state: bool = False
    public: bool = False  # served without a credential (a page that holds no data; the data needs one)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


class Authenticator:
    def __init__(self, ca_pem: bytes, revoked: Revoked | None = None) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self.revoked = revoked
        self._certificates: dict[bytes, Principal | str] = {}
        self._tokens: dict[str, Principal | str] = {}

    def _current(self, principal: Principal, what: str, now: datetime) -> Principal:
        if principal.not_after is not None and principal.not_after <= now:
            raise Unauthenticated(f"{what} of {principal.name!r} expired at {_when(principal.not_after)}")
        if principal.not_before is not None and principal.not_before > now:
            raise Unauthenticated(
                f"{what} of {principal.name!r} is valid only from {_when(principal.not_before)}"
            )
        at = self.revoked(principal) if self.revoked is not None else None
        if at is not None:
            revoked = datetime.fromtimestamp(at, UTC)
            raise Unauthenticated(
                f"{what} of {principal.name!r}: the principal was revoked at {_when(revoked)}"
            )
        return principal

    def _certificate(self, der: bytes, now: datetime) -> Principal:
        known = self._certificates.get(der)
        if known is None:
            try:
                known = principal_of(x509.load_der_x509_certificate(der))
            except (NotAPrincipal, ValueError) as err:
                known = f"the client certificate names no principal: {err}"
            if len(self._certificates) >= _CACHED:
                self._certificates.clear()
            self._certificates[der] = known
        if isinstance(known, str):
            raise Unauthenticated(known)
        return self._current(known, "the client certificate", now)

    def _token(self, header: str, now: datetime) -> Principal:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"Authorization {scheme!r}: only 'Bearer TOKEN' is accepted")
        token = token.strip()
        known = self._tokens.get(token)
        if known is None:
            try:
                known = BearerToken.verify(token, self.ca, now).principal
            except TokenNotCurrent as err:
                raise Unauthenticated(str(err)) from None  # not cached: it was valid, or will be
            except TokenInvalid as err:
                known = str(err)
            if len(self._tokens) >= _CACHED:
                self._tokens.clear()
            self._tokens[token] = known
        if isinstance(known, str):
            raise Unauthenticated(known)
        return self._current(known, "the bearer token", now)

    def principal(self, request: web.Request) -> Principal:
        """The request's principal; Unauthenticated naming what is missing or wrong."""
        now = datetime.now(UTC)
        transport = request.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        header = request.headers.get(hdrs.AUTHORIZATION)
        if der is None and header is None:
            raise Unauthenticated(
                "no credential: present a client certificate of the fleet's CA, or send "
                "'Authorization: Bearer TOKEN' (`cachepoint-coordinator token NAME --role ROLE`)"
            )
        by_certificate = self._certificate(der, now) if der is not None else None
        by_token = self._token(header, now) if header is not None else None
        if by_certificate and by_token and by_certificate.name != by_token.name:
            raise Unauthenticated(
                f"the client certificate names {by_certificate.name!r} and the bearer token "
                f"{by_token.name!r}: send the credential of one principal"
            )
        principal = by_certificate or by_token
        assert principal is not None
        return principal


def principal_of_request(request: web.Request) -> Principal | None:
    """The authenticated principal of a request to a server with TLS; None without TLS."""
    found = request.get(PRINCIPAL)
    return found if isinstance(found, Principal) else None


def route_of(request: web.Request) -> str | None:
    """ "METHOD PATTERN" of the route the request matched (HEAD as GET); None when it matched none."""
    resource = request.match_info.route.resource
    if resource is None or request.match_info.http_exception is not None:
        return None
    method = hdrs.METH_GET if request.method == hdrs.METH_HEAD else request.method
    return f"{method} {resource.canonical}"


def _json(status: int, message: str, kind: str, **extra: object) -> web.Response:
    headers = {hdrs.WWW_AUTHENTICATE: CHALLENGE} if status == 401 else None
    return web.json_response({"error": message, "type": kind, **extra}, status=status, headers=headers)


def guard(
    rules: dict[str, RouteRule], authenticator: Authenticator, refused: Refused | None = None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware: authenticate, then check the route's rule, then call the handler."""

    @web.middleware
    async def authorized(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = route_of(request)
        public = rules.get(route) if route is not None else None
        if public is not None and public.public:
            return await handler(request)  # a credential the request carries is not even read
        try:
            principal = authenticator.principal(request)
        except Unauthenticated as err:
            log_refused(
                log,
                logging.INFO,
                f"{request.method} {request.path} from {request.remote}: 401: {err}",
                status=401,
                method=request.method,
                path=request.path,
                remote=request.remote,
            )
            return _json(401, str(err), "Unauthenticated")
        request[PRINCIPAL] = principal
        if route is None:
            return await handler(request)  # no such route or method: the handler's 404/405
        rule = rules.get(route)
        fields = {"status": 403, "principal": principal.name, "route": route, "remote": request.remote}
        if rule is None:
            message = f"principal {principal.name!r} may not call {route}: no rule allows it"
            log_refused(log, logging.WARNING, message, rule=None, **fields)
            return _json(403, message, "Forbidden", principal=principal.name, route=route, rule=None)
        why = await rule.check(principal, request)
        if not why:
            return await handler(request)
        message = f"principal {principal.name!r} may not call {route}: rule {rule.name} ({rule.text}): {why}"
        log_refused(log, logging.WARNING, message, rule=rule.name, **fields)
        if rule.changes_state and refused is not None:
            await refused(principal, route, rule, message, request)
        return _json(403, message, "Forbidden", principal=principal.name, route=route, rule=rule.name)

    return authorized


@dataclass(frozen=True)
class HttpTrust:
    """What an HTTP server with TLS needs: its TLS context, who is calling, and the route table."""

    tls: ServerTls
    authenticator: Authenticator
    rules: dict[str, RouteRule]
    refused: Refused | None = None

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        return guard(self.rules, self.authenticator, self.refused)
