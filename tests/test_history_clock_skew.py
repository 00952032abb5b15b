"""Devices with wrong clocks (libfaketime under their `cachepoint serve` daemons) capture one user's home
through their daemons to a real coordinator. The coordinator keeps each version on its own clock
(coordinator/catalog/clock.py): the timeline follows the order the versions were made in, retention
judges their age by times it trusts, and a clock too far off is refused by name until it is set."""

from __future__ import annotations

import glob
import re
import time
from pathlib import Path

import grpc
import pytest

from cachepoint.model import LayerKind, Manifest
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc
from cachepoint.wire import manifest_digest, manifest_to_bytes
from coordinator.catalog.clock import MAX_CLOCK_SKEW_DAYS, ClockTooFarOff, place
from coordinator.history.times import iso
from tests.fleet import Fleet, Node, wait_until
from tests.history import HOME, USER, history, history_json, make_version, wait_delivered

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

SECOND = 10**9
DAY = 86_400 * SECOND
MINUTE = 60 * SECOND
# Plaintext fleets: a device whose clock is a day or more behind takes every certificate of the fleet
# for one not yet valid (they are valid from 5 minutes before issue, cachepoint/trust/principal.py
# BACKDATE), so with TLS its handshake fails before the coordinator sees what it sends, and what these
# tests are about (placing and refusing by the coordinator's clock) is never reached.
PLAINTEXT = False
FAKETIME_LIBRARIES = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))


def clock_off(offset: str) -> dict[str, str]:
    """The environment that runs a process with its clock ``offset`` from the real one (``+1d``)."""
    if not FAKETIME_LIBRARIES:
        pytest.skip("libfaketime is not installed (Debian package faketime; `make test` installs it)")
    # The monotonic clock stays real: timers and deadlines are not what is under test.
    return {"LD_PRELOAD": FAKETIME_LIBRARIES[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def test_a_version_is_placed_on_the_coordinators_clock_never_after_arrival_nor_before_its_parent() -> None:
    now = 1_800_000_000 * SECOND
    ago = now - 10 * SECOND  # when each version below was really made

    def placed(created: int, sent: int, parent: int = 0) -> tuple[int, bool]:
        placement = place("user/alice/home", "desk", created, sent, now, parent)
        assert placement.arrival.received_ns == now and placement.arrival.device_created_ns == created
        return placement.created_ns, placement.corrected

    assert placed(ago + SECOND, now + SECOND) == (ago + SECOND, False), "a second off: kept as it is"
    assert placed(ago + DAY, now + DAY) == (ago, True)
    assert placed(ago - DAY, now - DAY) == (ago, True)
    assert placed(now + 3600 * SECOND, 0) == (now, False), "unmeasured, and in the future: arrival"
    assert placed(0, 0) == (now, False), "no time given: arrival"
    assert placed(now - 3600 * SECOND, now, parent=ago) == (ago, False), "not before its parent"
    assert place("l", "d", ago, now + DAY, now, 0).arrival.clock_skew_ns == DAY
    with pytest.raises(ClockTooFarOff, match=r"device 'desk''s clock says .* \(31 days, 0:00:00 apart"):
        placed(ago - 31 * DAY, now - 31 * DAY)


def retention_config(tmp_path: Path) -> Path:
    """Keep every user version made in the last day (and the latest): all of this test's versions."""
    config = tmp_path / "coordinator.toml"
    config.write_text("[retention.user]\nkeep_days = 1\n")
    return config


def capture(node: Node, home: Path, text: str) -> None:
    (home / "notes.txt").write_text(text)
    make_version(node, home, text)


def test_devices_a_day_ahead_and_a_day_behind_keep_the_order_they_made_versions_in_and_retention_keeps_them(
    tmp_path: Path,
) -> None:
    ahead_home, behind_home = tmp_path / "ahead-home", tmp_path / "behind-home"
    ahead_home.mkdir()
    behind_home.mkdir()
    made: list[tuple[str, str]] = []
    started = time.time_ns()
    with Fleet(tmp_path / "fleet", tls_on=PLAINTEXT) as fleet:
        coordinator = fleet.coordinator(extra=["--config", str(retention_config(tmp_path))])
        address = coordinator.address
        ahead = fleet.cachepoint("ahead", address, subscribe=(), env=clock_off("+1d"))
        behind = fleet.cachepoint("behind", None, subscribe=(), env=clock_off("-1d"))  # offline at first

        def make(node: Node, home: Path, text: str) -> None:
            capture(node, home, text)
            made.append((node.name, text))

        make(ahead, ahead_home, "1: ahead, online")
        wait_delivered(ahead)
        make(behind, behind_home, "2: behind, offline")
        make(ahead, ahead_home, "3: ahead, online")
        wait_delivered(ahead)
        behind.stop()
        behind = fleet.cachepoint("behind", address, subscribe=(), env=clock_off("-1d"))  # its outbox drains
        wait_delivered(behind)
        make(behind, behind_home, "4: behind, online")
        wait_delivered(behind)
        finished = time.time_ns()

        versions = history_json(address, "timeline", USER)["versions"]
        # The order made, although the device times say 2, 4, 1, 3 and the arrivals 1, 3, 2, 4.
        assert [(v["device"], v["message"]) for v in versions] == made
        assert [v["version"] for v in versions] == [1, 3, 2, 4]
        for v in versions:
            skew = DAY if v["device"] == "ahead" else -DAY
            assert started <= v["created_ns"] <= finished, "kept on the coordinator's clock"
            assert abs(v["clock_skew_ns"] - skew) < MINUTE, v
            assert abs(v["device_created_ns"] - v["created_ns"] - skew) < MINUTE, (
                "the device's own time is kept"
            )
        rows = history_json(address, "file", USER, "notes.txt")["versions"]
        assert [r["ref"] for r in rows] == [v["ref"] for v in versions]

        shown = history(address, "timeline", USER).out
        assert len(re.findall(r"device clock (1 day, 0:00:0\d|23:59:5\d) ahead: it said", shown)) == 2, shown
        assert len(re.findall(r"device clock (1 day, 0:00:0\d|23:59:5\d) behind: it said", shown)) == 2, shown
        assert "commit of user/alice/home from device 'behind': its clock is" in coordinator.stderr()

        # keep_days = 1 on the coordinator's clock: every version was made minutes ago, none is deleted
        # (on the device's clock, the behind device's versions are a day and some seconds old).
        report = history_json(address, "gc")
        assert report["deleted"] == [] and report["kept"] == 4, report
        assert len(history_json(address, "timeline", USER)["versions"]) == 4


def test_a_device_whose_clock_is_months_off_is_refused_by_name_and_delivers_once_its_clock_is_set(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with Fleet(tmp_path / "fleet", tls_on=PLAINTEXT) as fleet:
        coordinator = fleet.coordinator(extra=["--config", str(retention_config(tmp_path))])
        address = coordinator.address
        stale = fleet.cachepoint("stale", address, subscribe=(), env=clock_off("-60d"))
        capture(stale, home, "made while the clock said two months ago")

        # The refusal reaches the device's log with the coordinator's words; the version waits.
        def refusal() -> str | None:
            found = [line for line in stale.stderr().splitlines() if "refused" in line]
            return found[-1] if found else None

        line = wait_until("the coordinator's refusal in the device's log", refusal, 30, logs=fleet.logs)
        assert "commit of user/alice/home refused: device 'stale''s clock says" in line, line
        assert f"the coordinator's {iso(time.time_ns())[:10]}" in line, line
        assert re.search(rf"\(60 days, 0:00:0\d apart; limit {MAX_CLOCK_SKEW_DAYS} days\)", line), line
        assert iso(time.time_ns() - 60 * DAY)[:10] in line, "the device's clock is named"
        status = stale.status()
        assert status["outbox_depth"] == 1 and stale.running()
        assert history(address, "timeline", USER, check=False).code == 3, "nothing was recorded"

        # On the wire the refusal is FAILED_PRECONDITION.
        manifest = manifest_to_bytes(Manifest(65536, False, ()))
        request = catalog_pb2.CommitRequest(
            layer=HOME,
            kind=int(LayerKind.USER),
            manifest=catalog_pb2.ManifestBlob(digest=manifest_digest(manifest), manifest=manifest),
            device="desk",
            created_ns=time.time_ns() + 40 * DAY,
            sent_ns=time.time_ns() + 40 * DAY,
        )
        fleet.assign(USER, "desk")  # with TLS, the device is the node the certificate names
        with fleet.channel(address, "node", name="desk") as ch, pytest.raises(grpc.RpcError) as refused:
            catalog_pb2_grpc.CatalogStub(ch).Commit(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "device 'desk'" in refused.value.details()

        # The clock is set (the daemon runs again without libfaketime): the version is delivered.
        stale.stop()
        stale = fleet.cachepoint("stale", address, subscribe=())
        wait_delivered(stale)
        capture(stale, home, "made once the clock was set")
        wait_delivered(stale)
        first, second = history_json(address, "timeline", USER)["versions"]
        # One reading at delivery cannot tell that the clock was wrong when the version was made: the
        # timeline keeps the device's time (and says it)...
        assert first["message"] == "made while the clock said two months ago"
        assert abs(first["created_ns"] - (time.time_ns() - 60 * DAY)) < DAY
        assert abs(first["clock_skew_ns"]) < MINUTE
        # ...but retention also judges by arrival, minutes ago: keep_days = 1 keeps it.
        report = history_json(address, "gc")
        assert report["deleted"] == [] and report["kept"] == 2, report
        assert [v["version"] for v in history_json(address, "timeline", USER)["versions"]] == [1, 2]
        assert second["message"] == "made once the clock was set"
