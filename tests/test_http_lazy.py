"""HTTP serves a lazily attached ref: a version this store does not hold is read through the same
source as its NBD disk, its blocks fetched from a peer of the site as the ranges need them."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from cachepoint.samples import generate
from tests.conftest import daemon, run_cli
from tests.fleet import LAYER, PRODUCTION, Fleet, publish

BS = 65536


def get(url: str, byte_range: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Range": byte_range} if byte_range else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_a_lazily_attached_ref_is_served_over_http_with_its_blocks_fetched_from_a_peer(
    tmp_path: Path,
) -> None:
    image = tmp_path / "os.img"
    generate(image, 4 * 1024 * 1024, seed=41)
    data = image.read_bytes()
    stored_blocks = len({data[i : i + BS] for i in range(0, len(data), BS)} - {bytes(BS)})
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        publish(tmp_path / "admin", coordinator.address, image, "production")
        peer = fleet.cachepoint("peer", coordinator.address)
        fleet.wait_holds(peer, 1)
        fleet.wait_fleet_holds(coordinator.address, "peer", f"{LAYER}@1")
        store = tmp_path / "blade"
        args = ("--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", "--coordinator", coordinator.address)
        with daemon(store, *args) as ready:
            url = f"http://{ready['http']}/v1/versions/{PRODUCTION.replace('/', '%2F')}/file"
            status, _ = get(url)
            assert status == 404, "not held here and not attached: not served"

            run_cli(store, "attach", PRODUCTION, "--json")
            start = len(data) // 3
            status, body = get(url, f"bytes={start}-{start + 3 * BS}")
            assert status == 206 and body == data[start : start + 3 * BS + 1]
            by_number = url.replace("production", "").replace("%2Fx:", "%2Fx@1")
            status, body = get(by_number)
            assert status == 200 and body == data

            sources = run_cli(store, "status", "--json").json()["bytes_by_source"]
            from_peers = sum(sources.get(kind, {}).get("blocks", 0) for kind in ("site", "peer"))
            assert from_peers == stored_blocks, sources
            assert sources.get("origin", {}).get("blocks", 0) == 0, sources
            assert run_cli(store, "log", LAYER, "--json", check=False).code != 0, "no version was pulled"
