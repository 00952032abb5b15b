"""``GET /metrics``: the Prometheus text exposition (or OpenMetrics, when the scraper asks for it in
Accept) of the server's Exposition, for the daemon's HTTP server and the coordinator's REST API alike.

Who may scrape: on a plaintext server (loopback only) anyone who can connect; with TLS, the rule
``metrics`` of the route tables (role monitor or admin): a Prometheus server scrapes with a bearer
token of role monitor (`cachepoint-coordinator token prometheus --role monitor`), which has no other
role's rights.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from cachepoint.metrics.exposition import Exposition

METRICS = web.AppKey("metrics", Exposition)
ROUTE = "/metrics"


def add_metrics_route(app: web.Application, exposition: Exposition | None) -> None:
    """Serve ``exposition`` at /metrics (an empty one when None: the route exists either way, so the
    route tables list it once for every server)."""
    app[METRICS] = exposition or Exposition()
    app.router.add_get(ROUTE, metrics)


async def metrics(request: web.Request) -> web.Response:
    exposition = request.app[METRICS]
    await exposition.refresh()
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(exposition.registry), headers={"Content-Type": content_type})
