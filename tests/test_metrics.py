"""/metrics of a real coordinator and two real daemons, scraped over HTTP after a publish and two pulls,
parsed with prometheus_client's own parser: the series README.md lists exist, and those a publish, a
pull from the origin, a pull from a site peer, a GC and a scrub must have moved are not zero.

Node a pulls os/x@1 from the coordinator; node b, in a's site, starts once the coordinator lists a
as a holder, so b's blocks come from a (site), and a serves them (FetchBlocks at a's peer port).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cachepoint.disk.nbd import protocol as nbd
from cachepoint.metrics.node import NodeMetrics
from tests.fleet import LAYER, PRODUCTION, Fleet, publish, random_image, stored_block_ids, wait_until
from tests.test_bounded_input import malformed_call
from tests.test_nbd_protocol import MemoryDevice, ServerThread, connect, request, request_disc

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

HTTP = ("--http", "127.0.0.1:0")
SITE = "s1"
# The only label names a series may carry: bounded sets, never a user's name or a block id.
ALLOWED_LABELS = set("method code source_class site outcome op result state subscription root le".split())


def scrape(http: str) -> list[Sample]:
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"]
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), "a family is exposed twice"
    return [sample for family in families for sample in family.samples]


def families(http: str) -> set[str]:
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=30) as response:
        return {family.name for family in text_string_to_metric_families(response.read().decode())}


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``; fails when none is."""
    found = [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no sample {name}{labels} in {sorted({s.name for s in samples})}"
    return sum(s.value for s in found)


def assert_labels_bounded(samples: list[Sample]) -> None:
    for sample in samples:
        assert set(sample.labels) <= ALLOWED_LABELS, sample
        assert "alice" not in str(sample.labels.values()), sample


def test_after_a_publish_and_two_pulls_both_programs_metrics_parse_and_hold_what_moved(
    tmp_path: Path,
) -> None:
    image = tmp_path / "v1.img"
    random_image(image, 2 * 1024 * 1024, seed=41)
    blocks = len(stored_block_ids(image))
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(extra=HTTP)
        published = publish(tmp_path / "admin", coordinator.address, image, "production")
        assert published["version"] == 1
        a = fleet.cachepoint("a", coordinator.address, site=SITE, extra=HTTP)
        fleet.wait_holds(a, 1)
        fleet.wait_fleet_holds(coordinator.address, "a", f"{LAYER}@1")
        b = fleet.cachepoint("b", coordinator.address, site=SITE, extra=HTTP)
        fleet.wait_holds(b, 1)
        a.cli_json("gc")
        a.cli_json("scrub")
        # The image read twice over a's HTTP server: through its decoded-block cache, cold then warm.
        for _ in range(2):
            url = f"http://{a.ready['http']}/v1/versions/os%2Fx@1/file"
            with urllib.request.urlopen(url, timeout=60) as response:
                assert response.read() == image.read_bytes()
        # A call the request guard refuses is counted with its code: the interceptor comes first.
        malformed_call(coordinator.address, "/cachepoint.v1.Catalog/Commit", "unary")

        # -- node a: pulled from the origin, served b, collected and scrubbed ----------------------
        node = scrape(str(a.ready["http"]))
        assert_labels_bounded(node)
        origin = {"source_class": "origin", "site": ""}
        assert value(node, "cachepoint_fetched_blocks_total", **origin) == blocks
        assert value(node, "cachepoint_fetched_bytes_total", **origin) > 0
        assert value(node, "cachepoint_pull_duration_seconds_count", outcome="fetched") >= 1
        assert value(node, "cachepoint_pull_duration_seconds_sum", outcome="fetched") > 0
        assert value(node, "cachepoint_served_blocks_total") == blocks
        assert value(node, "cachepoint_served_bytes_total") > 0
        fetch = "cachepoint.v1.BlockExchange/FetchBlocks"
        assert value(node, "cachepoint_rpcs_total", method=fetch, code="OK") >= 1
        assert value(node, "cachepoint_rpc_duration_seconds_count", method=fetch) >= 1
        assert value(node, "cachepoint_rpcs_in_flight", method=fetch) == 0
        # The Agent socket's calls too: status (the harness's waits), gc, scrub.
        assert value(node, "cachepoint_rpcs_total", method="cachepoint.v1.Agent/Status", code="OK") >= 1
        assert value(node, "cachepoint_rpcs_total", method="cachepoint.v1.Agent/CollectGarbage") == 1
        assert value(node, "cachepoint_subscription_lag_versions", subscription=PRODUCTION) == 0
        assert value(node, "cachepoint_subscriptions", state="current") == 1
        assert value(node, "cachepoint_outbox_versions") == 0
        assert value(node, "cachepoint_store_disk_bytes") > 0
        assert value(node, "cachepoint_store_versions") == 1
        assert value(node, "cachepoint_gc_runs_total") == 1
        assert value(node, "cachepoint_gc_removed_blocks_total") == 0
        assert value(node, "cachepoint_scrub_runs_total", outcome="ok") == 1
        assert value(node, "cachepoint_scrub_checked_blocks_total") == blocks
        assert value(node, "cachepoint_scrub_bad_blocks_total") == 0
        assert value(node, "cachepoint_scrub_last_completion_timestamp_seconds") > 0
        assert value(node, "cachepoint_coordinator_connected") == 1
        # Nothing attached or read over NBD: the series exist, at zero.
        for op in ("read", "write", "flush", "trim", "write_zeroes", "block_status"):
            assert value(node, "cachepoint_nbd_requests_total", op=op) == 0
            assert value(node, "cachepoint_nbd_request_duration_seconds_count", op=op) == 0
        assert value(node, "cachepoint_read_cache_misses_total") >= blocks
        assert value(node, "cachepoint_read_cache_hits_total") >= blocks
        assert 0 < value(node, "cachepoint_read_cache_hit_ratio") < 1

        # -- node b: its blocks came from a, in its own site ----------------------------------------
        peer = scrape(str(b.ready["http"]))
        assert value(peer, "cachepoint_fetched_blocks_total", source_class="site", site=SITE) == blocks
        assert value(peer, "cachepoint_fetched_bytes_total", source_class="site", site=SITE) > 0
        assert value(peer, "cachepoint_served_blocks_total") == 0

        # -- the coordinator --------------------------------------------------------------------------
        def watched() -> list[Sample] | None:
            samples = scrape(str(coordinator.ready["http"]))
            return samples if value(samples, "cachepoint_coordinator_watch_subscribers") == 2 else None

        central = wait_until("both nodes to watch the catalog", watched, 30, logs=fleet.logs)
        assert_labels_bounded(central)
        prefix = "cachepoint_coordinator"
        commit = "cachepoint.v1.Catalog/Commit"
        assert value(central, f"{prefix}_rpcs_total", method=commit, code="OK") == 1
        assert value(central, f"{prefix}_rpcs_total", method=commit, code="INVALID_ARGUMENT") == 1
        assert value(central, f"{prefix}_rpcs_total", method="cachepoint.v1.BlockExchange/PushBlocks") >= 1
        assert value(central, f"{prefix}_rpcs_total", method="cachepoint.v1.Fleet/Heartbeat", code="OK") >= 2
        assert value(central, f"{prefix}_rpc_duration_seconds_count", method=commit) == 2
        assert value(central, f"{prefix}_commits_total", root="os") == 1
        assert value(central, f"{prefix}_commits_total", root="user") == 0
        assert value(central, f"{prefix}_nodes", site=SITE, state="healthy") == 2
        assert value(central, f"{prefix}_catalog_events_total") >= 2  # the commit, the tag move
        assert value(central, f"{prefix}_served_blocks_total") == blocks  # to a only
        assert value(central, f"{prefix}_received_blocks_total") == blocks
        assert value(central, f"{prefix}_store_disk_bytes") > 0
        assert value(central, f"{prefix}_store_versions") == 1


def test_a_scrape_with_openmetrics_in_accept_gets_openmetrics(tmp_path: Path) -> None:
    """A Prometheus server asks for OpenMetrics first; the answer says which format it is."""
    with Fleet(tmp_path / "fleet", tls_on=False) as fleet:
        node = fleet.serve_store("solo", tmp_path / "solo", *HTTP)
        request = urllib.request.Request(
            f"http://{node.ready['http']}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            body = response.read().decode()
        assert body.rstrip().endswith("# EOF")
        assert "cachepoint_rpcs_in_flight" in body
        assert "cachepoint_store_disk_bytes" in families(str(node.ready["http"]))


def test_nbd_requests_are_counted_by_command_and_result_with_their_bytes_and_latency() -> None:
    metrics = NodeMetrics()
    server = ServerThread({"disk": MemoryDevice(65536)}, observe=metrics.nbd.observe)
    try:
        sock, _, _ = connect(server.port, "disk")
        with sock:
            assert request(sock, nbd.CMD_WRITE, 0, data=b"\x01" * 4096) == (0, b"")
            assert request(sock, nbd.CMD_READ, 0, 4096) == (0, b"\x01" * 4096)
            assert request(sock, nbd.CMD_READ, 65536 - 10, 100)[0] == nbd.EINVAL  # past the end
            assert request(sock, nbd.CMD_FLUSH) == (0, b"")
            request_disc(sock)
    finally:
        server.stop()
    text = generate_latest(metrics.registry).decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert value(samples, "cachepoint_nbd_requests_total", op="write", result="ok") == 1
    assert value(samples, "cachepoint_nbd_requests_total", op="read", result="ok") == 1
    assert value(samples, "cachepoint_nbd_requests_total", op="read", result="error") == 1
    assert value(samples, "cachepoint_nbd_requests_total", op="flush", result="ok") == 1
    assert value(samples, "cachepoint_nbd_bytes_total", op="read") == 4096
    assert value(samples, "cachepoint_nbd_bytes_total", op="write") == 4096
    assert value(samples, "cachepoint_nbd_request_duration_seconds_count", op="read") == 2
    assert value(samples, "cachepoint_nbd_request_duration_seconds_sum", op="read") > 0
