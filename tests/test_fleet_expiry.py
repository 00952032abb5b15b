"""`node_expiry`: the coordinator forgets nodes that stopped sending heartbeats, and a node that comes
back registers again by itself. Real coordinator and daemons, on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet import Fleet, fleet_nodes, wait_until

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

# Heartbeats come every 2 s: a node that runs is never this silent, even on a loaded machine.
EXPIRY_S = 10


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as running:
        yield running


def test_a_node_silent_for_node_expiry_is_forgotten_and_registers_again_when_it_comes_back(
    fleet: Fleet, tmp_path: Path
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(f'node_expiry = "{EXPIRY_S}s"\n')
    coordinator = fleet.coordinator(extra=["--config", str(config)])
    address = coordinator.address
    staying = fleet.cachepoint("n1", address, subscribe=())
    leaving = fleet.cachepoint("n2", address, subscribe=())

    def listed() -> set[str]:
        return set(fleet_nodes(address))

    wait_until("both nodes to register", lambda: listed() >= {"n1", "n2"} or None, 30, logs=fleet.logs)
    leaving.stop()  # a laptop given back: it never says goodbye
    wait_until("n2 to be forgotten", lambda: "n2" not in listed() or None, 6 * EXPIRY_S, logs=fleet.logs)
    assert "n1" in listed() and staying.running(), fleet.logs()
    assert "forgot node 'n2'" in coordinator.stderr(), fleet.logs()

    # The same machine back: its first heartbeat is refused (NOT_FOUND) and it registers again.
    back = fleet.cachepoint("n2", address, subscribe=())
    wait_until("n2 to register again", lambda: "n2" in listed() or None, 30, logs=fleet.logs)
    wait_until(
        "n2's heartbeats to reach the coordinator",
        lambda: back.status()["coordinator_connected"] or None,
        30,
        logs=fleet.logs,
    )
