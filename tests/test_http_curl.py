"""HTTP with curl as the client: a widely used client written in C, not the library the server uses."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import test_http_ranges as common
from tests.test_http_ranges import DISK, DISK_SIZE, parse_multipart

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (`make test` installs it with apt-get)"
)

# The shared fixtures, found by pytest under these names.
sources = common.sources
store = common.store
base_url = common.base_url


async def curl(*args: str | Path) -> tuple[int, dict[str, str], subprocess.CompletedProcess[bytes]]:
    """Run curl (off the event loop, which serves the request); returns status, last headers, run."""
    command = ["curl", "--silent", "--show-error", "--max-time", "30", "--dump-header", "-", *map(str, args)]
    run = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=60)
    head, _, _ = run.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, run


async def test_curl_downloads_a_disk_version_with_the_same_sha256(base_url, sources, tmp_path):
    out = tmp_path / "disk.img"
    status, headers, run = await curl("--output", out, base_url + DISK)
    assert run.returncode == 0, run.stderr
    assert status == 200 and headers["content-length"] == str(DISK_SIZE)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(sources.disk).hexdigest()


async def test_curl_head_shows_the_headers_of_a_get(base_url):
    status, headers, run = await curl("--head", base_url + DISK)
    assert run.returncode == 0, run.stderr
    assert status == 200
    assert headers["content-length"] == str(DISK_SIZE)
    assert headers["accept-ranges"] == "bytes"
    assert headers["etag"].startswith('"') and headers["cachepoint-ref"] == "os/disk@1"


async def test_curl_single_and_multiple_ranges(base_url, sources, tmp_path):
    out = tmp_path / "part"
    status, headers, run = await curl("--range", "-100", "--output", out, base_url + DISK)
    assert (
        status == 206 and headers["content-range"] == f"bytes {DISK_SIZE - 100}-{DISK_SIZE - 1}/{DISK_SIZE}"
    )
    assert out.read_bytes() == sources.disk[-100:]
    status, headers, run = await curl("--range", "0-99,1048570-1048600", "--output", out, base_url + DISK)
    assert run.returncode == 0, run.stderr
    assert status == 206
    parts = parse_multipart(out.read_bytes(), headers["content-type"])
    assert [data for _, data in parts] == [sources.disk[:100], sources.disk[1048570:1048601]]


async def test_curl_gets_a_304_for_its_etag_and_a_416_past_the_end(base_url):
    _, headers, _ = await curl("--head", base_url + DISK)
    status, _, run = await curl("--header", f"If-None-Match: {headers['etag']}", base_url + DISK)
    assert status == 304 and run.stdout.endswith(b"\r\n\r\n")
    status, headers, _ = await curl("--range", f"{DISK_SIZE}-", base_url + DISK)
    assert status == 416 and headers["content-range"] == f"bytes */{DISK_SIZE}"


async def test_curl_with_path_as_is_cannot_climb_out_of_a_tree(base_url):
    for target in ("/files/../../../../etc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd"):
        status, _, run = await curl("--path-as-is", base_url + "/v1/versions/app%2Ftree@1" + target)
        assert status == 400, target
        assert b"root:" not in run.stdout


async def test_curl_downloads_an_image_disk_whole_and_by_range(base_url, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    status, _, run = await curl("--output", whole, base_url + "/v1/images/alice/disk")
    assert status == 200 and run.returncode == 0, run.stderr
    status, _, run = await curl(
        "--range", "3000000-3400000", "--output", part, base_url + "/v1/images/alice/disk"
    )
    assert status == 206
    assert part.read_bytes() == whole.read_bytes()[3000000:3400001]
