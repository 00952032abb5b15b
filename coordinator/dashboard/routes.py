"""The dashboard's three routes (listed with the others in coordinator/history/rest.py ``add_routes``):
the page, its two assets, and the JSON snapshot the page polls.

The page and its assets are files of this package (package data: they ship in the wheel) and hold no
fleet data, so with ``--http-tls`` they are served without a credential (rule ``page``); the snapshot
needs role auditor or admin (rule ``oversight``), as holds and the audit log do. The Content-Security-
Policy allows nothing but this server: the page fetches no font, script or style from outside.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from cachepoint.errors import NotFound
from coordinator.dashboard.view import Dashboard

DASHBOARD = web.AppKey("dashboard", Dashboard)
ASSETS = {  # the only files served: a fixed table, so no request names a path
    "index.html": "text/html",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class NoDashboard(NotFound):
    """this server has no dashboard: it is served by `cachepoint-coordinator serve --http`"""


def _asset(name: str) -> web.Response:
    kind = ASSETS.get(name)
    if kind is None:
        raise NotFound(f"dashboard asset {name!r}: there is none (assets: {', '.join(sorted(ASSETS))})")
    body = resources.files("coordinator.dashboard").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=kind, charset="utf-8", headers=HEADERS)


async def page(request: web.Request) -> web.Response:
    return _asset("index.html")


async def asset(request: web.Request) -> web.Response:
    return _asset(request.match_info["asset"])


async def snapshot(request: web.Request) -> web.Response:
    dashboard = request.app.get(DASHBOARD)
    if dashboard is None:
        raise NoDashboard()
    return web.json_response(await dashboard.snapshot(), headers={"Cache-Control": "no-store"})
