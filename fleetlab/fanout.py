"""One site fan-out, measured on a fleet in network namespaces: S sites of N cachepoints behind WAN links
shaped with tbf, a coordinator in the datacenter, a version published, and what it cost.

The nodes follow LAYER:production at @1 (one block), so that all of them hear of @2 from the same
Watch event. Measured: the bytes each site's end of its WAN veth received from before the publish of
@2 until every node holds it (frames, headers and control traffic included), the time from the
coordinator's commit of @2 to each node's commit (both read from the daemons' log lines, one clock),
and the bytes each node took from the origin and from its site peers (its `status`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cachepoint.blocks import block_digest, encode_block, is_hole
from fleetlab.netns import DC_ADDRESS, datacenter
from fleetlab.processes import Child, Processes, cli_json

LAYER = "os/fan"
REF = f"{LAYER}:production"
BLOCK = 64 * 1024  # the default block size of a new layer
CONVERGE_TIMEOUT = 900.0  # a guard against a hang, not a speed limit
LogFn = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    sites: int
    nodes: int  # per site
    cooperative: bool  # the nodes' site_fanout setting
    base: Path  # @1 (small: the nodes' subscriptions are live before @2)
    version: Path  # @2, the image whose fan-out is measured
    wan_rate: str = "100mbit"  # tc's notation, per site
    joiner: bool = False  # then one more node joins site 1 and takes @2 from its site peers

    @property
    def label(self) -> str:
        return f"{self.sites}x{self.nodes}-{'coop' if self.cooperative else 'alone'}"


@dataclass
class NodeOutcome:
    name: str
    site: int
    done_s: float  # from the coordinator's commit of @2 to this node's
    origin_bytes: int
    site_bytes: int
    peer_bytes: int  # from nodes of other sites


@dataclass
class Outcome:
    plan: Plan
    new_bytes: int  # @2's new blocks as stored (compressed): what one crossing of the WAN carries
    wan_bytes: list[int]  # per site
    converge_s: float  # from the coordinator's commit of @2 until the last node held it
    publish_s: float  # the publish command of @2 (ingest, push, commit)
    nodes: list[NodeOutcome] = field(default_factory=list)
    # The joiner: seconds from its announcement to its commit of @2 (Register, Watch, Resolve, the
    # manifest, FindPeers and the fetch), and what site 1's WAN received meanwhile.
    joiner_s: float = 0.0
    joiner_wan_bytes: int = 0

    @property
    def wan_ratio(self) -> float:
        """The busiest site's WAN bytes over the version's compressed new blocks."""
        return max(self.wan_bytes) / self.new_bytes


def new_stored_bytes(base: Path, version: Path) -> int:
    """The stored (zstd) size of the blocks of ``version`` not in ``base`` (holes are never stored)."""

    def blocks(path: Path) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        with open(path, "rb") as f:
            while data := f.read(BLOCK):
                if not is_hole(data):
                    found.setdefault(block_digest(data), data)
        return found

    old = blocks(base).keys()
    return sum(len(encode_block(data)) for digest, data in blocks(version).items() if digest not in old)


def _logged_at(child: Child, marker: str) -> float:
    """The time (epoch seconds) of the child's first log line containing ``marker``."""
    for line in child.stderr().splitlines():
        if marker in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"{child.name} never logged {marker!r}:\n{child.stderr()[-2000:]}")


def _wait_all_hold(nodes: list[Child], number: int, procs: Processes, timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    statuses: dict[str, dict] = {}
    while True:
        for node in nodes:
            if node.name in statuses:
                continue
            try:
                status = node.status()
            except Exception:  # not answering yet (starting): ask again
                continue
            sub = next(s for s in status["subscriptions"] if s["ref"] == REF)
            if sub["held"] == number and sub["state"] == "current":
                statuses[node.name] = status
        if len(statuses) == len(nodes):
            return statuses
        if time.monotonic() > deadline:
            late = [n.name for n in nodes if n.name not in statuses]
            raise TimeoutError(f"{late} did not hold @{number} in {timeout:.0f}s\n{procs.logs()}")
        time.sleep(0.5)


def _bytes(now: dict, was: dict, cls: str) -> int:
    """Bytes taken from ``cls`` between two statuses (the counters are totals since the daemon started)."""

    def total(status: dict) -> int:
        return int(status["bytes_by_source"].get(cls, {}).get("bytes", 0))

    return total(now) - total(was)


def run(plan: Plan, work: Path, log: LogFn = print, tag: str = "") -> Outcome:
    """Build the namespaces (named with ``tag``), start the fleet, publish @1 then @2, measure;
    everything is stopped and removed on the way out, failed or not."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "nodes.toml"
    config.write_text(f"site_fanout = {'true' if plan.cooperative else 'false'}\n")
    admin = work / "admin"
    with datacenter(plan.sites, plan.nodes, tag) as net, Processes(work) as procs:
        for site in net.sites:
            site.wan.shape(plan.wan_rate)
        dc = net.dc.exec_prefix
        coordinator = procs.coordinator(work / "coordinator", f"{DC_ADDRESS}:0", prefix=dc).address

        def publish(image: Path) -> int:
            done = cli_json(admin, "publish", LAYER, image, "--coordinator", coordinator,
                            "--tag", "production", prefix=dc)  # fmt: skip
            return int(done["version"])

        publish(plan.base)
        nodes: list[tuple[int, Child]] = []
        for index, site in enumerate(net.sites, start=1):
            for number, ns in enumerate(site.nodes, start=1):
                name = f"s{index}n{number}"
                listen = f"{site.node_address(number)}:0"
                child = procs.cachepoint(
                    name, work / name, coordinator, f"site{index}", REF, listen, ns.exec_prefix, config
                )
                nodes.append((index, child))
        children = [child for _, child in nodes]
        procs.wait_ready(children)
        at_v1 = _wait_all_hold(children, 1, procs, CONVERGE_TIMEOUT)
        log(f"{plan.label}: {len(children)} nodes hold @1; publishing @2")
        before = [site.wan.site_received_bytes() for site in net.sites]
        started = time.monotonic()
        publish(plan.version)
        publish_s = time.monotonic() - started
        statuses = _wait_all_hold(children, 2, procs, CONVERGE_TIMEOUT)
        wan = [site.wan.site_received_bytes() - was for site, was in zip(net.sites, before, strict=True)]
        committed = _logged_at(procs.children[0], f"committed {LAYER}@2 ")
        joiner_s, joiner_wan = 0.0, 0
        if plan.joiner:
            site = net.sites[0]
            ns, address = site.add_node()
            was = site.wan.site_received_bytes()
            late = procs.cachepoint(
                "joiner", work / "joiner", coordinator, "site1", REF, f"{address}:0", ns.exec_prefix, config
            )
            procs.wait_ready([late])
            _wait_all_hold([late], 2, procs, CONVERGE_TIMEOUT)
            joiner_s = _logged_at(late, f"pulled {LAYER}@2:") - late.ready_at
            joiner_wan = site.wan.site_received_bytes() - was
        outcomes = [
            NodeOutcome(
                child.name,
                index,
                _logged_at(child, f"pulled {LAYER}@2:") - committed,
                _bytes(statuses[child.name], at_v1[child.name], "origin"),
                _bytes(statuses[child.name], at_v1[child.name], "site"),
                _bytes(statuses[child.name], at_v1[child.name], "peer"),
            )
            for index, child in nodes
        ]
    outcome = Outcome(
        plan,
        new_stored_bytes(plan.base, plan.version),
        wan,
        max(n.done_s for n in outcomes),
        publish_s,
        outcomes,
        joiner_s,
        joiner_wan,
    )
    log(
        f"{plan.label}: converged in {outcome.converge_s:.2f} s, WAN per site "
        f"{', '.join(f'{b / 2**20:.1f} MiB' for b in wan)} ({outcome.wan_ratio:.3f}x the new blocks)"
    )
    return outcome
