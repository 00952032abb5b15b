"""`cachepoint serve --http` serves versions and images with Range, through a real client."""

from __future__ import annotations

import os
import urllib.request

from tests.conftest import daemon, run_cli


def test_the_daemon_serves_a_version_and_an_image_with_ranges_and_health(tmp_path):
    store = tmp_path / "store"
    image = tmp_path / "os.img"
    data = os.urandom(300_000)
    image.write_bytes(data)
    run_cli(store, "ingest", "os/base", image)
    run_cli(store, "image", "create", "desk", "os/base")
    with daemon(store, "--http", "127.0.0.1:0") as ready:
        base = f"http://{ready['http']}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=30) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{base}/readyz", timeout=30) as response:
            assert response.status == 200
        request = urllib.request.Request(
            f"{base}/v1/versions/os%2Fbase@1/file", headers={"Range": "bytes=70000-70999"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 70000-70999/{len(data)}"
            assert response.read() == data[70000:71000]
        with urllib.request.urlopen(f"{base}/v1/images/desk/disk", timeout=30) as response:
            assert response.status == 200 and response.read() == data
