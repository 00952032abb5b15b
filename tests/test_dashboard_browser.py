"""The coordinator's dashboard in a real browser: Debian's chromium, driven by selenium through
chromium-driver, loads the page of a running coordinator with two daemons, and the DOM holds the nodes,
the versions they hold and the tags. Then a hold is set whose reason holds markup, and a daemon stops:
the page, refreshing itself, shows the reason as text and marks the node offline. The screenshot is
checked for content (a blank or unstyled page fails) and, with CACHEPOINT_DASHBOARD_SCREENSHOT=PATH
(`make screenshot`), saved there: docs/dashboard.png is one.

That fleet runs in plaintext on loopback (``tls_on=False``), where the coordinator's REST API is open
to anyone, so the browser needs no credential. With ``--http-tls`` (the second test) the page asks for
a bearer token and shows the fleet once an auditor's is given; every rule of the dashboard's routes is
tested with curl in tests/test_dashboard_access.py.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from coordinator.pki.bearer import issue
from tests.fleet import CONVERGE_TIMEOUT, LAYER, Fleet, publish, random_image, wait_until
from tests.test_trust_fleet import data_of, tls_coordinator

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None or webdriver is None,
        reason="needs chromium and chromedriver (`make test` installs chromium and chromium-driver with "
        "apt-get) and selenium (the dev extra)",
    ),
    pytest.mark.coordinator_backends,  # every test runs on both backends (tests/conftest.py)
]
SCREENSHOT_ENV = "CACHEPOINT_DASHBOARD_SCREENSHOT"
MIB = 1024 * 1024
WIDTH = 1440
BROWSER_WAIT = 30.0  # seconds the page may take to show what the coordinator knows: a bound
OFFLINE_WAIT = 40.0  # three missed heartbeats (6 s), then the page's next refresh (4 s), with slack


def snapshot(http: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{http}/v1/dashboard", timeout=10) as reply:
        data = json.load(reply)
    assert isinstance(data, dict), data
    return data


def hold(http: str, user: str, reason: str) -> None:
    body = json.dumps({"reason": reason, "actor": "audrey"}).encode()
    request = urllib.request.Request(
        f"http://{http}/v1/history/holds/{user}",
        data=body,
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 201


def browser(profile: Path, *extra: str) -> Any:
    options = Options()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},1000",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Every name but loopback fails to resolve: a page that fetched from outside would log errors.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        *extra,
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager never downloads a driver
    return webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))


# Read in one script call: the page redraws every few seconds, and an element found in one call may be
# gone (stale) by the next.
def text(driver: Any, css: str) -> str:
    return str(
        driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css
        )
    )


def attribute(driver: Any, css: str, name: str) -> str:
    script = "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null"
    return str(driver.execute_script(script, css, name))


def assert_not_blank(png: bytes) -> None:
    """A rendered dashboard has many colours and no colour covering nearly everything (a blank page,
    or one whose stylesheet did not load, fails)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None
    pixels = image.width * image.height
    commonest = max(count for count, _ in colours)
    assert len(colours) > 200, f"{len(colours)} colours in the screenshot"
    assert commonest < 0.8 * pixels, f"one colour covers {commonest / pixels:.0%} of the screenshot"


def test_a_browser_shows_the_fleets_nodes_versions_and_tags_and_marks_a_stopped_node_offline(
    tmp_path: Path,
) -> None:
    first_image, second_image = tmp_path / "v1.img", tmp_path / "v2.img"
    random_image(first_image, 2 * MIB, seed=71)
    random_image(second_image, 2 * MIB, seed=72)
    admin = tmp_path / "admin"
    with Fleet(tmp_path / "fleet", tls_on=False) as fleet:
        coordinator = fleet.coordinator(extra=["--http", "127.0.0.1:0"])
        http = coordinator.ready["http"]
        fleet.cachepoint("blade-01", coordinator.address, site="branch-a")
        publish(admin, coordinator.address, first_image, "production")

        # Waited for in the dashboard's own snapshot (a CLI call per probe would cost seconds each).
        def nodes_holding(*names: str) -> dict[str, Any] | None:
            data = snapshot(http)
            nodes = {n["node_id"]: n for site in data["sites"] for n in site["nodes"]}
            held = all(f"{LAYER}@1" in nodes[name]["held"] for name in names if name in nodes)
            return data if held and set(names) <= set(nodes) else None

        wait_until(
            "blade-01 to report os/x@1", lambda: nodes_holding("blade-01"), CONVERGE_TIMEOUT, logs=fleet.logs
        )
        laptop = fleet.cachepoint("laptop-07", coordinator.address, site="branch-a")  # fetches from blade-01
        publish(admin, coordinator.address, second_image, "staging")
        hold(http, "alice", "litigation 2026-114")

        def reported() -> dict[str, Any] | None:
            data = nodes_holding("blade-01", "laptop-07")
            nodes = {n["node_id"]: n for site in data["sites"] for n in site["nodes"]} if data else {}
            ready = all(n["software"] and not n["lag"] for n in nodes.values())
            return data if data and ready and nodes["laptop-07"]["site_bytes"] > 0 else None

        data = wait_until(
            "both nodes to report os/x@1 and their traffic", reported, CONVERGE_TIMEOUT, logs=fleet.logs
        )
        assert data["totals"]["online"] == 2 and data["totals"]["holds"] == 1, data["totals"]

        driver = browser(tmp_path / "chromium")
        try:
            driver.set_page_load_timeout(BROWSER_WAIT)
            driver.get(f"http://{http}/")
            wait = WebDriverWait(driver, BROWSER_WAIT)
            node = "tr[data-node-id='{}']".format
            wait.until(lambda d: text(d, node("laptop-07")))
            # Green once their heartbeats agree (one in flight may still say what was true before).
            wait.until(
                lambda d: all(attribute(d, node(n), "class") == "online" for n in ("blade-01", "laptop-07"))
            )
            for name in ("blade-01", "laptop-07"):
                row = text(driver, node(name))
                assert f"{LAYER}@1" in row and "os/x:production" in row, row
            layer = text(driver, f"[data-layer='{LAYER}']")
            assert "production" in layer and "staging" in layer, layer
            newest = text(driver, f"[data-layer='{LAYER}'] tr[data-ref='{LAYER}@2']")
            assert "staging" in newest and "0/2 nodes" in newest, newest
            assert "litigation 2026-114" in text(driver, "#holds")
            assert "hold.set" in text(driver, "#audit")
            # The whole page in one image: the viewport made as tall as the document.
            height = int(driver.execute_script("return document.documentElement.scrollHeight"))
            metrics = {"width": WIDTH, "height": min(height, 4000), "deviceScaleFactor": 1, "mobile": False}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            png = driver.get_screenshot_as_png()
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
            (tmp_path / "dashboard.png").write_bytes(png)
            assert_not_blank(png)
            if target := os.environ.get(SCREENSHOT_ENV):
                Path(target).write_bytes(png)

            # What users typed is shown as text, never run as markup; the page picks it up by itself.
            hold(http, "mallory", "order <i id='injected'>7</i>")
            WebDriverWait(driver, BROWSER_WAIT).until(
                lambda d: "order <i id='injected'>7</i>" in text(d, "#holds")
            )
            assert driver.find_elements(By.ID, "injected") == []

            laptop.stop()
            WebDriverWait(driver, OFFLINE_WAIT).until(
                lambda d: attribute(d, node("laptop-07"), "class") == "offline"
            )
            offline = text(driver, "[data-stat='offline'] .value")
            assert offline == "1", offline
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], errors  # no script error, no resource the CSP or the resolver refused
        finally:
            driver.quit()


def test_with_http_tls_the_page_asks_for_a_token_and_shows_the_fleet_to_an_auditors_only(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = tls_coordinator(fleet, "--http", "127.0.0.1:0", "--http-tls")
        # Tokens as `cachepoint-coordinator token` makes them, minted here (a CLI call costs seconds).
        node_token, _ = issue(data_of(fleet), "n1", "node", "1h")
        auditor_token, _ = issue(data_of(fleet), "audrey", "auditor", "1h")
        # The fleet's own CA signed the server's certificate: this browser profile does not know it.
        driver = browser(tmp_path / "chromium", "--ignore-certificate-errors")
        try:
            driver.set_page_load_timeout(BROWSER_WAIT)
            driver.get(f"https://{coordinator.ready['http']}/")  # the page itself needs no credential
            wait = WebDriverWait(driver, BROWSER_WAIT)
            notice = driver.find_element(By.ID, "notice")
            wait.until(lambda d: notice.is_displayed() and "Not authenticated" in notice.text)

            def give(token: str) -> None:
                driver.find_element(By.ID, "token").send_keys(token)
                driver.find_element(By.CSS_SELECTOR, "#token-form button").click()

            give(node_token)
            wait.until(lambda d: "403" in notice.text and "oversight" in notice.text)
            give(auditor_token)
            wait.until(lambda d: not notice.is_displayed())
            wait.until(lambda d: text(d, "[data-stat='nodes'] .value") == "0")
            assert "no node has registered yet" in text(driver, "#sites")
        finally:
            driver.quit()
