"""History over REST (aiohttp, JSON), the same operations as the gRPC History service.

Routes (all listed in ``add_routes``); TIME is what the CLI takes (ISO 8601, now, now-2h):

  GET    /healthz
  GET    /metrics                        Prometheus metrics (coordinator/metrics.py)
  GET    /                               the dashboard (coordinator/dashboard/), and its assets:
  GET    /dashboard/{asset}                dashboard.css, dashboard.js, favicon.svg
  GET    /v1/dashboard                   the snapshot the dashboard shows (JSON)
  GET    /v1/history/users/{user}/timeline?from=TIME&to=TIME&layer=home
  GET    /v1/history/users/{user}/files/{path}?layer=home            every version of one file
  GET    /v1/history/users/{user}/content/{path}?at=TIME&layer=home&actor=NAME
                                                                   the file's bytes (audited)
  GET    /v1/history/diff?old=REF&new=REF
  GET    /v1/history/holds
  PUT    /v1/history/holds/{user}        {"reason": ..., "actor": ...}
  DELETE /v1/history/holds/{user}?actor=NAME
  POST   /v1/history/gc                  {"actor": ..., "dry_run": false}
  GET    /v1/history/audit?after=N&limit=N&subject=user/alice
  GET    /v1/history/audit/verify
  POST   /v1/history/users/{user}/export {"from": TIME, "to": TIME, "actor": ...}  an application/x-tar

Errors are JSON ``{"error": message, "type": name}`` with the status of the first matching row of
``ERROR_STATUS``. Without TLS nothing is authenticated and the actor is what the caller says, so
plaintext is served on loopback only. With ``serve --http-tls`` every request is authenticated (client
certificate or bearer token, cachepoint/http/auth.py) and checked against coordinator/authz.py's
REST_RULES before its handler runs, and the actor recorded is the authenticated principal, whatever
``actor`` the request carries.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cachepoint.errors import AlreadyExists, CachepointError, IntegrityFailure, InvalidInput, NotFound
from cachepoint.http.auth import HttpTrust, principal_of_request
from cachepoint.http.metrics import add_metrics_route
from cachepoint.http.tls import check_plaintext_listen
from cachepoint.ids import Ref
from cachepoint.logs import refused_request
from cachepoint.metrics.exposition import Exposition
from cachepoint.rpc.serving import split_address
from coordinator.dashboard import routes as dashboard
from coordinator.dashboard.routes import DASHBOARD
from coordinator.dashboard.view import Dashboard
from coordinator.history.files import CHUNK_BYTES
from coordinator.history.service import History
from coordinator.history.times import parse_time

log = logging.getLogger("coordinator.rest")
HISTORY = web.AppKey("history", History)
SHUTDOWN_TIMEOUT = 2.0
MAX_BODY = 64 * 1024  # a JSON request body (a hold's reason is at most 1000 characters)
HTTP_TLS_OPTION = "--http-tls"

ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (AlreadyExists, 409),
    (NotFound, 404),
    (InvalidInput, 400),
    (ValueError, 400),
    (IntegrityFailure, 500),
    (CachepointError, 500),
)


def status_for(err: Exception) -> int:
    return next((status for kind, status in ERROR_STATUS if isinstance(err, kind)), 500)


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except (CachepointError, ValueError) as err:
        status = status_for(err)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.path, err)
        else:
            refused_request(log, request, status, str(err), type(err).__name__)
        return web.json_response({"error": str(err), "type": type(err).__name__}, status=status)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        refused_request(log, request, err.status, str(err.reason), "HTTPError")
        message = f"{err.reason}: {request.method} {request.path}"
        return web.json_response({"error": message, "type": "HTTPError"}, status=err.status)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/", dashboard.page)
    r.add_get("/dashboard/{asset}", dashboard.asset)
    r.add_get("/v1/dashboard", dashboard.snapshot)
    r.add_get("/v1/history/users/{user}/timeline", timeline)
    r.add_get("/v1/history/users/{user}/files/{path:.+}", file_history)
    r.add_get("/v1/history/users/{user}/content/{path:.+}", file_content)
    r.add_post("/v1/history/users/{user}/export", export)
    r.add_get("/v1/history/diff", diff)
    r.add_get("/v1/history/holds", holds)
    r.add_put("/v1/history/holds/{user}", set_hold)
    r.add_delete("/v1/history/holds/{user}", release_hold)
    r.add_post("/v1/history/gc", collect)
    r.add_get("/v1/history/audit", audit_list)
    r.add_get("/v1/history/audit/verify", audit_verify)


# -- request parsing -------------------------------------------------------------------------------


def _time(request: web.Request, name: str, *, end: bool = False) -> int:
    text = request.query.get(name, "")
    return parse_time(text, name, end=end) if text else 0


def _count(request: web.Request, name: str) -> int:
    text = request.query.get(name, "0")
    if not text.isascii() or not text.isdigit():
        raise InvalidInput(f"{name} {text!r}: a whole number")
    return int(text)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidInput(f"request body: {request.content_length} bytes, the limit is {MAX_BODY}")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise InvalidInput(f"request body: over the limit of {MAX_BODY} bytes")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InvalidInput(f"request body is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string")
    return value


def _actor(request: web.Request, claimed: str) -> str:
    """Who to record: the authenticated principal with TLS; without it, what the caller says."""
    principal = principal_of_request(request)
    return principal.name if principal is not None else claimed


# -- handlers --------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def timeline(request: web.Request) -> web.Response:
    history = request.app[HISTORY]
    found = await history.timeline(
        request.match_info["user"],
        _time(request, "from"),
        _time(request, "to", end=True),
        request.query.get("layer", ""),
    )
    return web.json_response(found.as_json())


async def file_history(request: web.Request) -> web.Response:
    history = request.app[HISTORY]
    found = await history.file_history(
        request.match_info["user"], request.query.get("layer", ""), request.match_info["path"]
    )
    return web.json_response(found.as_json())


async def file_content(request: web.Request) -> web.StreamResponse:
    history = request.app[HISTORY]
    download = await history.open_file(
        request.match_info["user"],
        request.query.get("layer", ""),
        request.match_info["path"],
        _time(request, "at", end=True),
        _actor(request, request.query.get("actor", "")),
    )
    # A header goes out before the body, so the digest is computed first (cached for the next ask).
    sha = await asyncio.to_thread(history.files.sha256, download.entry, download.block_size)
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Cachepoint-Ref": download.header.ref,
            "Cachepoint-Sha256": sha,
            "X-Content-Type-Options": "nosniff",
        }
    )
    response.content_length = download.header.size
    await response.prepare(request)
    chunks = download.chunks()
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        await response.write(chunk)
    await response.write_eof()
    return response


async def diff(request: web.Request) -> web.Response:
    old, new = request.query.get("old", ""), request.query.get("new", "")
    if not old or not new:
        raise InvalidInput("diff needs two refs: ?old=LAYER@N&new=LAYER@M")
    result = await request.app[HISTORY].diff(Ref.parse(old), Ref.parse(new))
    return web.json_response(result.as_json())


async def holds(request: web.Request) -> web.Response:
    found = await request.app[HISTORY].list_holds()
    return web.json_response({"holds": [h.as_json() for h in found]})


async def set_hold(request: web.Request) -> web.Response:
    data = await _body(request)
    hold = await request.app[HISTORY].set_hold(
        request.match_info["user"], _text(data, "reason"), _actor(request, _text(data, "actor"))
    )
    return web.json_response(hold.as_json(), status=201)


async def release_hold(request: web.Request) -> web.Response:
    data = await _body(request)
    actor = _actor(request, request.query.get("actor") or _text(data, "actor"))
    hold = await request.app[HISTORY].release_hold(request.match_info["user"], actor)
    return web.json_response({"released": hold.as_json()})


async def collect(request: web.Request) -> web.Response:
    data = await _body(request)
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidInput("dry_run must be true or false")
    report = await request.app[HISTORY].collect(_actor(request, _text(data, "actor")), dry_run)
    return web.json_response(report.as_json())


async def audit_list(request: web.Request) -> web.Response:
    records = await request.app[HISTORY].audit_records(
        _count(request, "after"), _count(request, "limit"), request.query.get("subject", "")
    )
    return web.json_response({"records": [r.as_json() for r in records]})


async def audit_verify(request: web.Request) -> web.Response:
    verdict = await request.app[HISTORY].verify_audit()
    return web.json_response(verdict.as_json())


async def export(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    from_text, to_text = _text(data, "from"), _text(data, "to")
    out, _ = await request.app[HISTORY].export(
        request.match_info["user"],
        parse_time(from_text, "from") if from_text else 0,
        parse_time(to_text, "to", end=True) if to_text else 0,
        _actor(request, _text(data, "actor")),
    )
    try:
        size = await asyncio.to_thread(lambda: out.seek(0, 2))
        out.seek(0)
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        response.content_length = size
        await response.prepare(request)
        while chunk := await asyncio.to_thread(out.read, CHUNK_BYTES):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        out.close()


# -- app and server --------------------------------------------------------------------------------


def make_app(
    history: History,
    trust: HttpTrust | None = None,
    metrics: Exposition | None = None,
    fleet: Dashboard | None = None,
) -> web.Application:
    middlewares = [errors_as_json] if trust is None else [errors_as_json, trust.middleware()]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[HISTORY] = history
    if fleet is not None:
        app[DASHBOARD] = fleet
    add_routes(app)
    add_metrics_route(app, metrics)
    return app


async def start_rest(
    history: History,
    listen: str,
    trust: HttpTrust | None = None,
    metrics: Exposition | None = None,
    fleet: Dashboard | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve the app on HOST:PORT; returns the runner (``await runner.cleanup()`` stops it) and the
    bound "host:port" (the real port when 0 was asked). Without ``trust``, only on a loopback address
    (PlaintextOffLoopback, before binding)."""
    host, port = split_address(listen)
    if trust is None:
        check_plaintext_listen(listen, HTTP_TLS_OPTION)
    app = make_app(history, trust, metrics, fleet)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        ssl_context = trust.tls.context if trust is not None else None
        await web.TCPSite(runner, host.strip("[]"), port, ssl_context=ssl_context).start()
    except OSError as err:
        await runner.cleanup()
        raise InvalidInput(f"cannot serve REST on {listen}: {err}") from err
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"{bound_host}:{bound_port}"
