"""Network namespaces for fleet tests: a datacenter and a site joined by a veth pair that plays the WAN.

The test that uses them creates them and removes them on the way out, failed or not (``wan_link`` is a
context manager; deleting a namespace deletes the interfaces in it, so nothing outlives the test). Needs
root and iproute2's `ip`, and `tc` to shape the link; without them the test is skipped with the reason.

Topology (addresses from the private 10.231.0.0/16, and only inside the namespaces)::

    [dc]  wan 10.231.0.1/30  <====== veth (the WAN) ======>  wan 10.231.0.2/30  [site]
                                                             lo 10.231.1.1, 10.231.1.2, ... (nodes)

Each node of the site listens on an address of its own on the site's loopback, so two nodes reach each
other without the WAN, as two hosts on a branch office's LAN do; the datacenter routes the site's /24
over the WAN. Processes are started in a namespace by prefixing their command with ``ns.exec_prefix``
(`ip netns exec NAME`, which execs the command: the pid the test holds is the daemon's own).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

SUBNET = "10.231"
DC_ADDRESS = f"{SUBNET}.0.1"
SITE_WAN_ADDRESS = f"{SUBNET}.0.2"
IP_TIMEOUT = 10.0
WAN_DEVICE = "wan"
_counter = itertools.count(1)


def skip_unless_possible() -> None:
    """Skip the calling test, saying why, when namespaces cannot be made here."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (Debian package {package}; `make test` installs it)")


def ip(*args: str) -> str:
    """Run `ip ARGS`; a failure raises with its stderr."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Namespace:
    name: str

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def run(self, *args: str) -> str:
        """A command inside the namespace (tc, sysctl); a failure raises with its stderr."""
        proc = subprocess.run([*self.exec_prefix, *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} in {self.name} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout


@dataclass
class WanLink:
    """The two namespaces and the veth between them."""

    dc: Namespace
    site: Namespace

    def node_address(self, index: int) -> str:
        """The site-LAN address of the site's ``index``-th node (from 1), added to the site's loopback."""
        return f"{SUBNET}.1.{index}"

    def add_node_address(self, index: int) -> str:
        address = self.node_address(index)
        ip("-n", self.site.name, "addr", "add", f"{address}/32", "dev", "lo")
        return address

    def shape(self, rate: str) -> None:
        """Cap what the datacenter sends to the site (pulls) with a token bucket on its end of the WAN."""
        self.dc.run(
            "tc", "qdisc", "replace", "dev", WAN_DEVICE, "root", "tbf",
            "rate", rate, "burst", "64kb", "latency", "200ms",
        )  # fmt: skip

    def cut(self) -> None:
        """The WAN fails: the site's end goes down (connections across it stall, new ones are refused
        at once: the site has no route to the datacenter any more)."""
        ip("-n", self.site.name, "link", "set", WAN_DEVICE, "down")

    def restore(self) -> None:
        ip("-n", self.site.name, "link", "set", WAN_DEVICE, "up")

    def is_up(self) -> bool:
        (link,) = json.loads(ip("-n", self.site.name, "-j", "link", "show", WAN_DEVICE))
        return "UP" in link["flags"]

    def site_received_bytes(self) -> int:
        """Bytes the site's end of the WAN has received (frames, headers included): what crossed it."""
        (link,) = json.loads(ip("-n", self.site.name, "-j", "-s", "link", "show", WAN_DEVICE))
        return int(link["stats64"]["rx"]["bytes"])


@contextlib.contextmanager
def wan_link() -> Iterator[WanLink]:
    """A datacenter namespace and a site namespace joined by a veth; both removed on exit."""
    skip_unless_possible()
    tag = f"{os.getpid()}-{next(_counter)}"
    dc, site = Namespace(f"cachepoint-dc-{tag}"), Namespace(f"cachepoint-site-{tag}")
    created: list[Namespace] = []
    try:
        for ns in (dc, site):
            ip("netns", "add", ns.name)
            created.append(ns)
            ip("-n", ns.name, "link", "set", "lo", "up")
        # Made inside the namespaces directly: the host's own interfaces never see it.
        try:
            ip("link", "add", WAN_DEVICE, "netns", dc.name, "type", "veth",
               "peer", "name", WAN_DEVICE, "netns", site.name)  # fmt: skip
        except RuntimeError as err:
            pytest.skip(f"cannot create a veth pair here: {err}")
        ip("-n", dc.name, "addr", "add", f"{DC_ADDRESS}/30", "dev", WAN_DEVICE)
        ip("-n", site.name, "addr", "add", f"{SITE_WAN_ADDRESS}/30", "dev", WAN_DEVICE)
        for ns in (dc, site):
            ip("-n", ns.name, "link", "set", WAN_DEVICE, "up")
        ip("-n", dc.name, "route", "add", f"{SUBNET}.1.0/24", "via", SITE_WAN_ADDRESS)
        yield WanLink(dc, site)
    finally:
        # Processes still inside keep a namespace's network alive but not its name: the caller stops
        # its daemons first (the Fleet is closed inside this block).
        for ns in reversed(created):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                ip("netns", "del", ns.name)


# -- a site with a LAN: a bridge and one namespace per node ---------------------------------------------

SITE_GATEWAY = f"{SUBNET}.1.254"
BRIDGE = "lan"


@dataclass
class SiteLan:
    """A datacenter, a site router joined to it by the WAN veth, and ``nodes`` node namespaces on the
    site's bridge (each with its own veth and address, the router as gateway)::

        [dc] wan 10.231.0.1 <== WAN veth (tbf) ==> wan 10.231.0.2 [router] lan (bridge) 10.231.1.254
                                                                      |-- veth -- eth0 10.231.1.1 [node 1]
                                                                      |-- veth -- eth0 10.231.1.2 [node 2] ...

    Traffic between nodes crosses only the bridge; everything between a node and the datacenter crosses
    the WAN veth, whose counters are the site's WAN bytes."""

    wan: WanLink
    nodes: list[Namespace]

    @property
    def dc(self) -> Namespace:
        return self.wan.dc

    def node_address(self, index: int) -> str:
        """The LAN address of node ``index`` (from 1)."""
        return f"{SUBNET}.1.{index}"

    def add_node(self) -> tuple[Namespace, str]:
        """One more node namespace on the bridge (a node that joins the site later); removed on exit."""
        index = len(self.nodes) + 1
        ns = Namespace(f"{self.wan.site.name}-n{index}")
        ip("netns", "add", ns.name)
        self.nodes.append(ns)
        ip("-n", ns.name, "link", "set", "lo", "up")
        port = f"n{index}"
        ip("link", "add", "eth0", "netns", ns.name, "type", "veth", "peer", "name", port,
           "netns", self.wan.site.name)  # fmt: skip
        ip("-n", self.wan.site.name, "link", "set", port, "master", BRIDGE, "up")
        address = self.node_address(index)
        ip("-n", ns.name, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns.name, "link", "set", "eth0", "up")
        ip("-n", ns.name, "route", "add", "default", "via", SITE_GATEWAY)
        return ns, address


@contextlib.contextmanager
def site_lan(nodes: int) -> Iterator[SiteLan]:
    """``wan_link`` plus a bridged LAN of ``nodes`` node namespaces behind the site's end; every
    namespace is removed on exit, failed or not (the caller stops its daemons first)."""
    with wan_link() as link:
        lan = SiteLan(link, [])
        try:
            router = link.site
            ip("-n", router.name, "link", "add", BRIDGE, "type", "bridge")
            ip("-n", router.name, "addr", "add", f"{SITE_GATEWAY}/24", "dev", BRIDGE)
            ip("-n", router.name, "link", "set", BRIDGE, "up")
            router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            for _ in range(nodes):
                lan.add_node()
            yield lan
        finally:
            for ns in reversed(lan.nodes):
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    ip("netns", "del", ns.name)
