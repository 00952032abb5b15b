"""What the site fan-out tests share (tests/test_site_fanout.py, tests/test_site_fanout_faults.py): a
fleet in network namespaces (tests/netns.py ``site_lan``), the coordinator in a datacenter namespace, one
cachepoint per node namespace on a site's bridge, the site's WAN a veth shaped with tbf; a version
published to them all at once, and what their counters and stores say of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachepoint.store.store import Store
from tests.fleet import LAYER, Fleet, Node, cli_json, coordinator_cli, random_image, stored_block_ids
from tests.netns import DC_ADDRESS, SiteLan, site_lan

MiB = 1024 * 1024
NODES = 4
SITE = "branch"
WAN_RATE = "100mbit"
WAN_FACTOR = 1.1  # the acceptance bound: WAN bytes per site per version / the version's stored new bytes


@contextlib.contextmanager
def site_fleet(root: Path) -> Iterator[tuple[SiteLan, Fleet]]:
    """The namespaces and the fleet in them; the fleet stops before the namespaces go, failed or not.
    Skipped, saying why, without root or iproute2."""
    with site_lan(NODES) as made, Fleet(root / "fleet") as fleet:
        yield made, fleet


def stored_bytes(store: Path, ids: set[bytes]) -> int:
    """The stored (compressed) size of ``ids``: what a fetch of them carries."""
    with Store.open(store) as opened:
        values = opened.blocks.raw_many(sorted(ids))
    assert all(value is not None for value in values)
    return sum(len(value) for value in values if value is not None)


def by_source(status: dict[str, Any], field: str) -> dict[str, int]:
    return {name: int(totals[field]) for name, totals in status["bytes_by_source"].items()}


def held(store: Path, ids: set[bytes]) -> set[bytes]:
    """Which of ``ids`` the store holds (read-only, beside its running daemon)."""
    with Store.open(store) as opened:
        return {digest for digest in ids if opened.blocks.has(digest)}


# For nodes whose stores a test reads while they pull (``held``, ``present``): each block is logged as
# it lands. By default a daemon writes pulled blocks once, without the WAL, and another process sees
# them only at the next flush (every 16 MiB and before the commit).
PEEKABLE = "pull_wal = true\n"


def present(store: Path, ids: set[bytes]) -> int:
    """How many of ``ids`` the store holds (read-only, beside its running daemon)."""
    with Store.open(store) as opened:
        return sum(1 for digest in ids if opened.blocks.has(digest))


@dataclass
class Published:
    """The fleet at @1 everywhere, and @2 just published: what the nodes' counters said before it."""

    coordinator: str
    admin: Path
    image: Path
    new_ids: set[bytes]
    nodes: list[Node]
    before: list[dict[str, Any]]
    received_before: int


def enroll(
    fleet: Fleet, store: Path, coordinator: str, name: str, prefix: tuple[str, ...], *args: str
) -> None:
    """A one-time token for ``name`` from the coordinator's data, spent from ``prefix``'s namespace."""
    made = coordinator_cli("enroll", name, "--data", str(fleet.root / "coordinator"), *args, "--json").json()
    assert isinstance(made, dict), made
    cli_json(store, "enroll", "--coordinator", coordinator, "--token", str(made["token"]), prefix=prefix)


def publish_to_the_site(
    site: SiteLan,
    fleet: Fleet,
    tmp_path: Path,
    rate: str,
    size: int,
    tls: bool = False,
    config: Path | None = None,
    before_publish: Callable[[str, list[Node], set[bytes]], list[Node]] | None = None,
) -> Published:
    """The coordinator in the datacenter, one node per node namespace following os/x:production at @1
    (one block), then @2 (``size`` bytes of distinct random blocks) published from the datacenter,
    so that every node hears of it from the same Watch event. ``tls``: the coordinator serves mutual
    TLS and every node and the publisher are enrolled (peers dial each other by address); ``config``:
    the nodes' settings file; ``before_publish``: given the coordinator, the nodes once they hold @1
    and @2's new block ids, returns the nodes to publish to (e.g. one restarted with a damaged store)."""
    dc = site.dc.exec_prefix
    site.wan.shape(rate)
    extra = ["--tls"] if tls else []
    coordinator = fleet.coordinator(listen=f"{DC_ADDRESS}:0", prefix=dc, extra=extra).address
    admin = tmp_path / "admin"  # the publisher works in the datacenter: its pushes never cross the WAN
    if tls:
        enroll(fleet, admin, coordinator, "release-bot", dc, "--role", "publisher")
        for index, ns in enumerate(site.nodes, start=1):
            enroll(fleet, fleet.root / f"n{index}", coordinator, f"n{index}", ns.exec_prefix, "--site", SITE)

    def publish(image: Path) -> int:
        done = cli_json(admin, "publish", LAYER, image, "--coordinator", coordinator, "--tag", "production",
                        prefix=dc)  # fmt: skip
        return int(done["version"])

    v1, v2 = tmp_path / "v1.img", tmp_path / "v2.img"
    random_image(v1, 64 * 1024, seed=71)
    random_image(v2, size, seed=72)
    assert publish(v1) == 1
    nodes: list[Node] = []
    for index, ns in enumerate(site.nodes, start=1):
        listen = f"{site.node_address(index)}:0"
        node = fleet.cachepoint(
            f"n{index}", coordinator, site=SITE, listen=listen, prefix=ns.exec_prefix, config=config
        )
        nodes.append(node)
    before = [fleet.wait_holds(node, 1) for node in nodes]
    new_ids = stored_block_ids(v2) - stored_block_ids(v1)
    if before_publish is not None:
        nodes = before_publish(coordinator, nodes, new_ids)
        before = [fleet.wait_holds(node, 1) for node in nodes]
    received_before = site.wan.site_received_bytes()
    assert publish(v2) == 2
    return Published(coordinator, admin, v2, new_ids, nodes, before, received_before)


def grown(before: dict[str, Any], now: dict[str, Any]) -> dict[str, int]:
    """Blocks fetched per class of source between two statuses (the counters are totals since start)."""
    was = by_source(before, "blocks")
    return {cls: count - was.get(cls, 0) for cls, count in by_source(now, "blocks").items()}
