"""The daemon's HTTP server (aiohttp): versions' files and images' composite disks, with ranges.

Routes (GET and HEAD; all listed in ``add_routes``):

  /v1/versions/{ref}/file          the disk image of a single-file layer version
  /v1/versions/{ref}/files/{path}  one regular file of a tree layer version, by its manifest path
  /v1/images/{name}/disk           the composite disk of an image (a stack of disk image layers)
  /healthz                         the process answers
  /readyz                          the store answers a read
  /metrics                         Prometheus metrics (cachepoint/http/metrics.py)

``{ref}`` and ``{name}`` are one path segment each, so the '/' of a layer or image name is
percent-encoded as %2F: ``/v1/versions/os%2Fwin10@7/file`` (os/win10@7),
``/v1/versions/os%2Fwin10:production/file``, ``/v1/versions/os%2Fwin10/file`` (its latest version),
``/v1/images/team%2Falice/disk``. One segment keeps refs unambiguous (a layer segment may itself be
called "files") and lets malformed refs be told apart from unknown ones. ``@`` and ``:`` may be sent
as is or encoded. ``{path}`` is the rest of the URL, '/' as is.

Every response to a served object carries Content-Length, Accept-Ranges: bytes, a strong ETag
(a version's file: its manifest digest, with the path for a tree file; an image: a hash of its
stack's manifest digests) and Cachepoint-Ref (the resolved version or stack). Conditional and range
requests follow RFC 9110: If-None-Match → 304; Range → 206 (one range) or 206 multipart/byteranges;
no range inside the object → 416 with ``Content-Range: bytes */SIZE``; a malformed Range is ignored
(200); If-Range honours Range only for our exact strong ETag. No Last-Modified is sent: a tag moved
back to an older version would make a date-based cache keep stale bytes. Errors are JSON
``{"error": message, "type": name}`` with the status of the first matching row of ``ERROR_STATUS``.

Memory: no route reads a request body (``client_max_size`` is set small all the same); a response
holds ~4 MiB while its client is slow to read (cachepoint/http/reader.py reads ahead), so at most
RESPONSE_LIMITS.per_server are streamed at once, RESPONSE_LIMITS.per_peer per client address (over
a limit: wait up to 5 s, then 503), and a client that takes nothing for 30 s loses its connection.

Without TLS the server listens on loopback only (``check_plaintext_listen``). With TLS
(``serve --http-tls``, cachepoint/http/tls.py) every request is authenticated by a client certificate
or a bearer token and checked against the route table of cachepoint/http/access.py (auth.py's
middleware, before any handler: 401 and 403 are JSON in the shape above).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from cachepoint.errors import (
    BlockCorrupt,
    BlockMissing,
    BlockUnreadable,
    CachepointError,
    InvalidInput,
    NotFound,
)
from cachepoint.http.auth import HttpTrust
from cachepoint.http.metrics import add_metrics_route
from cachepoint.http.objects import Resolver, Served
from cachepoint.http.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    multipart,
    none_match,
    parse_range,
    range_allowed,
)
from cachepoint.http.reader import read_range
from cachepoint.http.tls import check_plaintext_listen
from cachepoint.logs import refused_request
from cachepoint.metrics.exposition import Exposition
from cachepoint.slots import SlotLimits, Slots, TooManyStreams
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

log = logging.getLogger("cachepoint.http")

CONTENT_TYPE = "application/octet-stream"
READY_TIMEOUT = 5.0  # seconds a readiness probe waits for the store before answering 503
# Seconds runner.cleanup() lets responses in flight finish before cancelling them: a download of a
# whole disk may take minutes, and the daemon's shutdown should not wait for it.
SHUTDOWN_TIMEOUT = 2.0
MAX_BODY = 64 * 1024  # no route reads a body; aiohttp's own default would allow 1 MiB
RESPONSE_LIMITS = SlotLimits(per_server=16, per_peer=8, wait=5.0, stall=30.0)
HTTP_TLS_OPTION = "--http-tls (config: http_tls = true)"

STORE = web.AppKey("store", Store)
RESOLVER = web.AppKey("resolver", Resolver)
RESPONSES = web.AppKey("responses", Slots)


class NotReady(CachepointError):
    """the store cannot be read: {}"""


class RefNotEncoded(InvalidInput):
    """{!r}: a ref or image name is one path segment; percent-encode its '/' as %2F (e.g. {})"""


# The status of each kind of error, first match wins: a missing block is a damaged store (the
# version exists), so it comes before NotFound.
ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (BlockMissing, 500),
    (BlockCorrupt, 500),
    (BlockUnreadable, 500),
    (NotReady, 503),
    (TooManyStreams, 503),
    (NotFound, 404),
    (InvalidInput, 400),
    (CachepointError, 500),
)


def status_for(err: Exception) -> int:
    return next((status for kind, status in ERROR_STATUS if isinstance(err, kind)), 500)


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message, "type": kind}, status=status, headers=headers)


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except CachepointError as err:
        status = status_for(err)
        if status >= 500:
            # A damaged store is an error to act on; not ready (starting, stopping) is expected.
            log.log(
                logging.ERROR if status == 500 else logging.WARNING,
                "%s %s: %s",
                request.method,
                request.path,
                err,
            )
        else:
            refused_request(log, request, status, str(err), type(err).__name__)
        return error_response(status, str(err), type(err).__name__)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        refused_request(log, request, err.status, str(err.reason), "HTTPError")
        # aiohttp's own refusals (no such route, wrong method) in the same shape; 405 keeps Allow.
        allow = err.headers.get(hdrs.ALLOW)
        kept = {hdrs.ALLOW: allow} if allow is not None else None
        return error_response(err.status, f"{err.reason}: {request.method} {request.path}", "HTTPError", kept)


# -- routes --------------------------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    """Every route of the server. add_get also answers HEAD with the same handler."""
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/v1/versions/{ref}/file", version_file)
    r.add_get("/v1/versions/{ref}/files/{path:.+}", version_path)
    r.add_get("/v1/images/{name}/disk", image_disk)
    # Last: a ref or name sent with a raw '/' matches none of the above; say how to encode it.
    r.add_get("/v1/versions/{rest:.+}", not_encoded)
    r.add_get("/v1/images/{rest:.+}", not_encoded)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    store = request.app[STORE]

    def probe() -> None:
        if store.db.meta(fmt.META_FORMAT_VERSION) is None:
            raise NotReady("it has no format record")

    try:
        await asyncio.wait_for(asyncio.to_thread(probe), READY_TIMEOUT)
    except NotReady:
        raise
    except TimeoutError as err:
        raise NotReady(f"no answer within {READY_TIMEOUT:g} s") from err
    except Exception as err:  # a closed or failing database raises whatever RocksDB raises
        raise NotReady(f"{type(err).__name__}: {err}") from err
    return web.json_response({"status": "ready"})


async def version_file(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["ref"]
    served = await asyncio.to_thread(request.app[RESOLVER].version_file, ref)
    return await send(request, served)


async def version_path(request: web.Request) -> web.StreamResponse:
    ref, path = request.match_info["ref"], request.match_info["path"]
    served = await asyncio.to_thread(request.app[RESOLVER].version_path, ref, path)
    return await send(request, served)


async def image_disk(request: web.Request) -> web.StreamResponse:
    served = await asyncio.to_thread(request.app[RESOLVER].image_disk, request.match_info["name"])
    return await send(request, served)


async def not_encoded(request: web.Request) -> web.StreamResponse:
    images = request.path.startswith("/v1/images/")
    example = "/v1/images/team%2Falice/disk" if images else "/v1/versions/os%2Fwin10@7/file"
    raise RefNotEncoded(request.match_info["rest"], example)


# -- responses -----------------------------------------------------------------------------------


async def send(request: web.Request, served: Served) -> web.StreamResponse:
    """Answer a GET or HEAD of a served object: conditionals, then ranges, then the bytes."""
    size = served.size
    headers = {
        hdrs.ETAG: served.etag,
        hdrs.ACCEPT_RANGES: "bytes",
        "Cachepoint-Ref": served.resolved,
        "X-Content-Type-Options": "nosniff",
    }
    if none_match(request.headers.get(hdrs.IF_NONE_MATCH), served.etag):
        return web.Response(status=304, headers=headers)
    ranges: list[ByteRange] | None = None
    range_header = request.headers.get(hdrs.RANGE)
    if range_header is not None and range_allowed(request.headers.get(hdrs.IF_RANGE), served.etag):
        try:
            ranges = parse_range(range_header, size)
        except RangeNotSatisfiable as err:
            headers[hdrs.CONTENT_RANGE] = f"bytes */{err.size}"
            return error_response(416, str(err), "RangeNotSatisfiable", headers)

    response = web.StreamResponse(headers=headers)
    parts: list[tuple[bytes, ByteRange]]
    closing = b""
    if ranges is None:
        parts = [(b"", ByteRange(0, size))] if size else []
        response.content_type = CONTENT_TYPE
        response.content_length = size
    elif len(ranges) == 1:
        parts = [(b"", ranges[0])]
        response.set_status(206)
        response.headers[hdrs.CONTENT_RANGE] = ranges[0].content_range(size)
        response.content_type = CONTENT_TYPE
        response.content_length = ranges[0].length
    else:
        body = multipart(ranges, size, CONTENT_TYPE, secrets.token_hex(16))
        parts, closing = body.parts, body.closing
        response.set_status(206)
        response.headers[hdrs.CONTENT_TYPE] = body.content_type
        response.content_length = body.content_length

    if request.method == hdrs.METH_HEAD:
        await response.prepare(request)
        return response
    await stream(request, response, served, parts, closing)
    return response


async def stream(
    request: web.Request,
    response: web.StreamResponse,
    served: Served,
    parts: list[tuple[bytes, ByteRange]],
    closing: bytes,
) -> None:
    """Write each part's head and bytes. The first chunk is read before the headers go out, so a bad
    block there is still a 500 naming it; after that the status is sent, and a bad block can only
    cut the response short (the client sees fewer bytes than Content-Length) and is logged."""
    slots = request.app[RESPONSES]
    peer = request.remote or "unknown"
    # Generators do nothing until iterated: only the part being written reads (and reads ahead).
    readers = [read_range(served.source, served.placed, wanted) for _, wanted in parts]
    sent = 0

    async def write(data: bytes | bytearray | memoryview) -> None:
        try:
            await asyncio.wait_for(response.write(data), slots.limits.stall)
        except TimeoutError:
            # close() would wait for the client to take what is queued: it never will.
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(f"the client read nothing for {slots.limits.stall:g} s") from None

    await slots.acquire(peer)  # before anything is read: over the limit, a 503 that holds nothing
    try:
        first = await anext(readers[0], None) if readers else None  # a failure here is a JSON 500
        await response.prepare(request)
        try:
            for index, (head, _) in enumerate(parts):
                if head:
                    await write(head)
                if index == 0 and first is not None:
                    await write(first)
                    sent += len(first)
                async for chunk in readers[index]:
                    await write(chunk)
                    sent += len(chunk)
            if closing:
                await write(closing)
        except CachepointError as err:
            log.error(
                "%s %s (%s): aborted after %d bytes of data: %s",
                request.method,
                request.path,
                served.resolved,
                sent,
                err,
            )
            # Closing the connection is the only way left to tell the client the body is incomplete.
            response.force_close()
        except ConnectionError as err:
            log.debug(
                "%s %s: the client went away after %d bytes: %s", request.method, request.path, sent, err
            )
    finally:
        for reader in readers:
            await reader.aclose()
        slots.release(peer)


# -- app and server ------------------------------------------------------------------------------


def make_app(
    store: Store,
    response_limits: SlotLimits = RESPONSE_LIMITS,
    trust: HttpTrust | None = None,
    resolver: Resolver | None = None,
    metrics: Exposition | None = None,
) -> web.Application:
    """The HTTP app over an open store; the caller owns the store and closes it after the app.
    ``trust``: every request authenticated and authorized first (None: plaintext, no checks).
    ``resolver``: the daemon's, which reads through its decoded cache and knows its lazy attachments.
    ``metrics``: what /metrics shows (the daemon's; None: an empty registry)."""
    middlewares = [errors_as_json] if trust is None else [errors_as_json, trust.middleware()]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[STORE] = store
    app[RESOLVER] = resolver or Resolver(store)
    app[RESPONSES] = Slots("HTTP responses", response_limits)
    add_routes(app)
    add_metrics_route(app, metrics)
    return app


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise InvalidInput(f"HTTP listen address {listen!r} must be HOST:PORT (port 0 picks a free one)")
    return host.strip("[]"), int(port)


async def start_http(
    store: Store,
    listen: str,
    response_limits: SlotLimits = RESPONSE_LIMITS,
    trust: HttpTrust | None = None,
    resolver: Resolver | None = None,
    metrics: Exposition | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve ``make_app(store)`` on HOST:PORT; returns the runner (``await runner.cleanup()`` stops
    it, before the store is closed) and the bound "host:port" (the real port when 0 was asked).
    Without ``trust``, only on a loopback address (PlaintextOffLoopback, before binding)."""
    host, port = _split_listen(listen)
    if trust is None:
        check_plaintext_listen(listen, HTTP_TLS_OPTION)
    app = make_app(store, response_limits, trust, resolver, metrics)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=trust.tls.context if trust else None)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"{shown}:{bound_port}"
