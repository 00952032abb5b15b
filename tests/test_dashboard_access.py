"""Who may see the coordinator's dashboard with `serve --http-tls`, over real TLS with curl: the page and
its assets are served to anyone, with no credential (they hold no fleet data, and a browser cannot
present a bearer token before the page's script runs); the snapshot they show, only to an auditor or
an admin, by client certificate or bearer token. Also: only the package's own assets are served, each
with a Content-Security-Policy that lets the page fetch nothing from elsewhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coordinator.pki.bearer import issue
from tests.fleet import Fleet
from tests.test_http_trust_fleet import (
    assert_forbidden,
    assert_unauthenticated,
    curl,
    person,
    with_cert,
    with_token,
)
from tests.test_trust_fleet import data_of, tls_coordinator

pytestmark = [
    pytest.mark.skipif(
        shutil.which("curl") is None, reason="curl is not installed (`make test` installs it with apt-get)"
    ),
    pytest.mark.coordinator_backends,  # every test runs on both backends (tests/conftest.py)
]
SNAPSHOT = "/v1/dashboard"


def headers_of(url: str, ca: Path, dump: Path) -> dict[str, str]:
    answer = curl(url, "--cacert", ca, "--dump-header", dump)
    assert answer.exit == 0 and answer.status == 200, answer
    lines = dump.read_text().splitlines()[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines) if v}


def test_with_http_tls_the_dashboard_page_is_open_and_its_snapshot_is_for_auditors_and_admins(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = tls_coordinator(fleet, "--http", "127.0.0.1:0", "--http-tls")
        base = f"https://{coordinator.ready['http']}"
        audrey = person(fleet, tmp_path, "audrey", "auditor")
        n1 = person(fleet, tmp_path, "n1", "node")
        ca = audrey / "ca.pem"

        # The page and its assets: no credential needed, nothing but this server allowed.
        page = curl(base + "/", "--cacert", ca)
        assert page.status == 200 and b"<title>cachepoint fleet</title>" in page.body, page
        for asset, kind in [("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")]:
            headers = headers_of(f"{base}/dashboard/{asset}", ca, tmp_path / f"{asset}.headers")
            assert headers["content-type"].startswith(kind), headers
            assert headers["content-security-policy"].startswith("default-src 'self'"), headers
        missing = curl(base + "/dashboard/secrets.txt", "--cacert", ca)
        assert missing.status == 404 and "secrets.txt" in missing.json()["error"], missing

        # The snapshot: a 401 without a credential, a 403 for a node, the data for an auditor or admin.
        assert_unauthenticated(curl(base + SNAPSHOT, "--cacert", ca), "no credential")
        assert_forbidden(
            curl(base + SNAPSHOT, "--cacert", ca, *with_cert(n1)), "n1", f"GET {SNAPSHOT}", "oversight"
        )
        by_cert = curl(base + SNAPSHOT, "--cacert", ca, *with_cert(audrey))
        assert by_cert.status == 200, by_cert
        assert by_cert.json()["totals"]["nodes"] == 0, by_cert.json()
        admin_token, _ = issue(data_of(fleet), "root", "admin", "1h")  # as `cachepoint-coordinator token`
        by_token = curl(base + SNAPSHOT, "--cacert", ca, *with_token(admin_token))
        assert by_token.status == 200 and "audit" in by_token.json(), by_token
