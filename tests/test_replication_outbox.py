"""User versions made on a device reach the coordinator through the durable outbox: none lost while
the coordinator is away, none doubled by retries, and two devices that made versions while apart both
keep theirs, with parents that say which line each came from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, version_pb2
from tests.fleet import Fleet, Node, cachepoint_cli, free_port, wait_until
from tests.fleet import coordinator_versions as fleet_versions

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

HOME = "user/alice/home"


def coordinator_versions(address: str, layer: str = HOME) -> list[version_pb2.VersionInfo]:
    return fleet_versions(address, layer)


def write_home(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def ingest_on(node: Node, path: Path, message: str) -> dict[str, object]:
    """`cachepoint ingest` on a store its daemon holds: the command goes through the daemon (whose node
    is assigned the user, with TLS the coordinator's condition for taking the user's versions)."""
    node.assign(HOME.split("/")[1])
    return dict(cachepoint_cli(node.store, "ingest", HOME, path, "-m", message, "--json").json())  # type: ignore[arg-type]


def test_versions_made_while_the_coordinator_is_down_are_delivered_once_it_returns(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(data=tmp_path / "coord", listen=address)
        laptop = fleet.cachepoint("laptop", address, subscribe=())
        first = ingest_on(laptop, write_home(home, {"notes.txt": "monday"}), "online")
        assert first["version"] == 1
        wait_until("v1 at the coordinator", lambda: len(coordinator_versions(address)) == 1 or None, 30)

        coordinator.stop()
        ingest_on(laptop, write_home(home, {"notes.txt": "tuesday, offline"}), "offline 1")
        ingest_on(laptop, write_home(home, {"todo.txt": "more, offline"}), "offline 2")
        assert laptop.status()["outbox_depth"] == 2

        fleet.coordinator(data=tmp_path / "coord", listen=address, name="coordinator-again")
        wait_until(
            "the outbox to drain", lambda: laptop.status()["outbox_depth"] == 0 or None, 90, logs=fleet.logs
        )
        versions = coordinator_versions(address)
        assert [(v.number, v.message) for v in versions] == [
            (1, "online"),
            (2, "offline 1"),
            (3, "offline 2"),
        ]
        assert [v.parent for v in versions] == [0, 1, 2]

        # A restart of the device finds nothing to send again.
        laptop.stop()
        laptop = fleet.cachepoint("laptop", address, subscribe=())
        assert laptop.status()["outbox_depth"] == 0
        assert len(coordinator_versions(address)) == 3


def test_a_retried_commit_returns_the_first_version_instead_of_a_second(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        laptop = fleet.cachepoint("laptop", coordinator.address, subscribe=())
        ingest_on(laptop, write_home(home, {"a": "1"}), "one")
        wait_until("v1 delivered", lambda: len(coordinator_versions(coordinator.address)) == 1 or None, 30)
        v1 = coordinator_versions(coordinator.address)[0]
        with fleet.channel(coordinator.address, "node", name="laptop") as ch:
            catalog = catalog_pb2_grpc.CatalogStub(ch)
            blob = catalog.GetManifest(catalog_pb2.GetManifestRequest(digest=v1.manifest_digest), timeout=10)
            assert hashlib.sha256(blob.manifest).digest() == v1.manifest_digest
            request = catalog_pb2.CommitRequest(
                layer=HOME, manifest=blob, commit_id="device-x:retry-1", message="r"
            )
            first = catalog.Commit(request, timeout=10)
            again = catalog.Commit(request, timeout=10)
        assert first.number == again.number == 2
        assert len(coordinator_versions(coordinator.address)) == 2


def test_two_devices_that_made_versions_apart_both_keep_theirs_with_parents_that_say_which(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    desk, laptop_home = tmp_path / "desk-home", tmp_path / "laptop-home"
    desk.mkdir()
    laptop_home.mkdir()
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(data=tmp_path / "coord", listen=address)
        desk_node = fleet.cachepoint("desk", address, subscribe=())
        ingest_on(desk_node, write_home(desk, {"profile.ini": "theme=dark"}), "from the desk")
        wait_until("v1 delivered", lambda: len(coordinator_versions(address)) == 1 or None, 30)
        # The laptop starts from the coordinator's v1, fetched before its daemon takes the store.
        # (With TLS the pull presents the laptop's node identity: a node assigned alice reads her layer.)
        fleet.identity(tmp_path / "fleet" / "laptop", "node")
        fleet.assign("alice", "laptop")
        cachepoint_cli(tmp_path / "fleet" / "laptop", "pull", f"{HOME}@1", "--from", address)
        laptop = fleet.cachepoint("laptop", address, subscribe=())

        coordinator.stop()  # apart: each device goes on alone
        ingest_on(desk_node, write_home(desk, {"profile.ini": "theme=dark\nfont=large"}), "desk, apart")
        ingest_on(laptop, write_home(laptop_home, {"profile.ini": "theme=light"}), "laptop, apart")

        fleet.coordinator(data=tmp_path / "coord", listen=address, name="coordinator-again")
        for node in (desk_node, laptop):
            wait_until(
                f"{node.name}'s outbox to drain",
                lambda n=node: n.status()["outbox_depth"] == 0 or None,
                90,
                logs=fleet.logs,
            )
        versions = {v.number: v for v in coordinator_versions(address)}
        assert sorted(versions) == [1, 2, 3], "both versions made apart are kept"
        apart = {versions[n].device: versions[n] for n in (2, 3)}
        assert set(apart) == {"desk", "laptop"}
        assert apart["desk"].message == "desk, apart" and apart["laptop"].message == "laptop, apart"
        assert apart["desk"].parent == 1 and apart["laptop"].parent == 1, "each line starts from v1"
        assert versions[1].device == "desk"
