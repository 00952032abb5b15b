"""Network namespaces for a fleet on one machine: a datacenter and sites joined by veth pairs that play
the WAN, each site a router with a bridged LAN of node namespaces.

Whoever builds them removes them on the way out, failed or not (the builders are context managers;
deleting a namespace deletes the interfaces in it, so nothing outlives them). Needs root and
iproute2's `ip`, and `tc` to shape a link; without them ``NamespacesUnavailable`` says why before
anything is made.

Addresses come from the private 10.231.0.0/16, and exist only inside the namespaces (two builders
running at once do not collide: each namespace has its own stack). Site k (from 1)::

    [dc] wanK 10.231.0.(4k-3)/30 <== veth (the WAN) ==> wan 10.231.0.(4k-2)/30 [site k]
                                                        lan (bridge) 10.231.k.254/24
                                                          |-- veth -- eth0 10.231.k.1 [node 1] ...

The coordinator listens on ``DC_ADDRESS``, the datacenter's end of site 1's WAN (every site routes to
it through its own WAN). Processes are started in a namespace by prefixing their command with
``ns.exec_prefix`` (`ip netns exec NAME`, which execs the command: the pid held is the process's own).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

SUBNET = "10.231"
DC_ADDRESS = f"{SUBNET}.0.1"
SITE_WAN_ADDRESS = f"{SUBNET}.0.2"
IP_TIMEOUT = 10.0
WAN_DEVICE = "wan"
BRIDGE = "lan"
SITE_GATEWAY = f"{SUBNET}.1.254"
MAX_SITES = 60  # the WAN /30s of 10.231.0.0/24; site k's LAN is 10.231.k.0/24
MAX_NODES = 253  # per site (.254 is the router)
PREFIX = "cachepoint"  # every namespace's name starts with it, then the builder's tag
_counter = itertools.count(1)


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, iproute2 missing, no veth support)."""


def check_possible() -> None:
    """Raise NamespacesUnavailable, saying why, when namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise NamespacesUnavailable("network namespaces need root")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            raise NamespacesUnavailable(
                f"`{tool}` is not installed (Debian package {package}; `make test` installs it)"
            )


def ip(*args: str) -> str:
    """Run `ip ARGS`; a failure raises with its stderr."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def new_tag() -> str:
    """A tag no other builder of this machine uses now (this process's pid and a counter)."""
    return f"{os.getpid()}-{next(_counter)}"


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


def _add(ns: Namespace, made: list[Namespace]) -> Namespace:
    ip("netns", "add", ns.name)
    made.append(ns)
    ip("-n", ns.name, "link", "set", "lo", "up")
    return ns


def _remove(namespaces: list[Namespace]) -> None:
    # Processes still inside keep a namespace's network alive but not its name: callers stop their
    # processes first.
    for ns in reversed(namespaces):
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            ip("netns", "del", ns.name)


@dataclass
class WanLink:
    """The datacenter, one site's router and the veth between them (site ``index``, from 1)."""

    dc: Namespace
    site: Namespace
    index: int = 1

    @property
    def dc_device(self) -> str:
        return WAN_DEVICE if self.index == 1 else f"{WAN_DEVICE}{self.index}"

    @property
    def dc_address(self) -> str:
        return f"{SUBNET}.0.{4 * self.index - 3}"

    @property
    def site_address(self) -> str:
        return f"{SUBNET}.0.{4 * self.index - 2}"

    @property
    def lan(self) -> str:
        return f"{SUBNET}.{self.index}.0/24"

    def node_address(self, index: int) -> str:
        """The site-LAN address of the site's ``index``-th node (from 1)."""
        return f"{SUBNET}.{self.index}.{index}"

    def add_node_address(self, index: int) -> str:
        """``node_address(index)`` on the site's own loopback (a site without a bridge)."""
        address = self.node_address(index)
        ip("-n", self.site.name, "addr", "add", f"{address}/32", "dev", "lo")
        return address

    def shape(self, rate: str) -> None:
        """Cap what the datacenter sends to the site (pulls) with a token bucket on its end of the WAN."""
        self.dc.run(
            "tc", "qdisc", "replace", "dev", self.dc_device, "root", "tbf",
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


def _join(dc: Namespace, site: Namespace, index: int) -> WanLink:
    """The WAN veth between ``dc`` and ``site``, addressed and routed (made inside the namespaces
    directly: the host's own interfaces never see it)."""
    link = WanLink(dc, site, index)
    try:
        ip("link", "add", link.dc_device, "netns", dc.name, "type", "veth",
           "peer", "name", WAN_DEVICE, "netns", site.name)  # fmt: skip
    except RuntimeError as err:
        raise NamespacesUnavailable(f"cannot create a veth pair here: {err}") from err
    ip("-n", dc.name, "addr", "add", f"{link.dc_address}/30", "dev", link.dc_device)
    ip("-n", site.name, "addr", "add", f"{link.site_address}/30", "dev", WAN_DEVICE)
    ip("-n", dc.name, "link", "set", link.dc_device, "up")
    ip("-n", site.name, "link", "set", WAN_DEVICE, "up")
    ip("-n", dc.name, "route", "add", link.lan, "via", link.site_address)
    # Everything beyond the site (DC_ADDRESS, other sites) is through the datacenter.
    ip("-n", site.name, "route", "add", "default", "via", link.dc_address)
    return link


@contextlib.contextmanager
def wan_link(tag: str = "") -> Iterator[WanLink]:
    """A datacenter namespace and a site namespace joined by a veth; both removed on exit."""
    check_possible()
    tag = tag or new_tag()
    made: list[Namespace] = []
    try:
        dc = _add(Namespace(f"{PREFIX}-dc-{tag}"), made)
        site = _add(Namespace(f"{PREFIX}-site-{tag}"), made)
        yield _join(dc, site, 1)
    finally:
        _remove(made)


# -- a site with a LAN: a bridge and one namespace per node ---------------------------------------------


@dataclass
class SiteLan:
    """A site router joined to the datacenter by its WAN veth, and node namespaces on the site's bridge
    (each with its own veth and address, the router as gateway). Traffic between nodes crosses only
    the bridge; everything between a node and the datacenter (or another site) crosses the WAN veth,
    whose counters are the site's WAN bytes."""

    wan: WanLink
    nodes: list[Namespace] = field(default_factory=list)

    @property
    def dc(self) -> Namespace:
        return self.wan.dc

    @property
    def gateway(self) -> str:
        return f"{SUBNET}.{self.wan.index}.254"

    def node_address(self, index: int) -> str:
        """The LAN address of node ``index`` (from 1)."""
        return self.wan.node_address(index)

    def add_node(self) -> tuple[Namespace, str]:
        """One more node namespace on the bridge (a node that joins the site later); removed with the
        site."""
        index = len(self.nodes) + 1
        if index > MAX_NODES:
            raise ValueError(f"a site holds at most {MAX_NODES} nodes, asked for node {index}")
        ns = Namespace(f"{self.wan.site.name}-n{index}")
        _add(ns, self.nodes)
        port = f"n{index}"
        ip("link", "add", "eth0", "netns", ns.name, "type", "veth", "peer", "name", port,
           "netns", self.wan.site.name)  # fmt: skip
        ip("-n", self.wan.site.name, "link", "set", port, "master", BRIDGE, "up")
        address = self.node_address(index)
        ip("-n", ns.name, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns.name, "link", "set", "eth0", "up")
        ip("-n", ns.name, "route", "add", "default", "via", self.gateway)
        return ns, address


def _bridge(link: WanLink, site: SiteLan, nodes: int) -> None:
    router = link.site
    ip("-n", router.name, "link", "add", BRIDGE, "type", "bridge")
    ip("-n", router.name, "addr", "add", f"{site.gateway}/24", "dev", BRIDGE)
    ip("-n", router.name, "link", "set", BRIDGE, "up")
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    for _ in range(nodes):
        site.add_node()


@contextlib.contextmanager
def site_lan(nodes: int, tag: str = "") -> Iterator[SiteLan]:
    """``wan_link`` plus a bridged LAN of ``nodes`` node namespaces behind the site's end; every
    namespace is removed on exit, failed or not (the caller stops its processes first)."""
    with wan_link(tag) as link:
        lan = SiteLan(link)
        try:
            _bridge(link, lan, nodes)
            yield lan
        finally:
            _remove(lan.nodes)


# -- a datacenter and several sites ---------------------------------------------------------------------


@dataclass
class Datacenter:
    """The datacenter namespace (the coordinator's) and its sites, each behind a WAN veth of its own."""

    dc: Namespace
    sites: list[SiteLan]
    tag: str

    def namespaces(self) -> list[Namespace]:
        return [self.dc, *(ns for site in self.sites for ns in (site.wan.site, *site.nodes))]


@contextlib.contextmanager
def datacenter(sites: int, nodes: int, tag: str = "") -> Iterator[Datacenter]:
    """A datacenter and ``sites`` sites of ``nodes`` node namespaces each (site k's WAN is the
    datacenter's device ``wan`` for k = 1, ``wanK`` after); the datacenter forwards between sites.
    Every namespace is removed on exit, failed or not (the caller stops its processes first)."""
    if not 1 <= sites <= MAX_SITES:
        raise ValueError(f"sites must be 1 to {MAX_SITES}, got {sites}")
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes per site must be 1 to {MAX_NODES}, got {nodes}")
    check_possible()
    tag = tag or new_tag()
    made: list[Namespace] = []
    lans: list[SiteLan] = []
    try:
        dc = _add(Namespace(f"{PREFIX}-dc-{tag}"), made)
        dc.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for index in range(1, sites + 1):
            router = _add(Namespace(f"{PREFIX}-s{index}-{tag}"), made)
            lan = SiteLan(_join(dc, router, index))
            lans.append(lan)
            _bridge(lan.wan, lan, nodes)
        yield Datacenter(dc, lans, tag)
    finally:
        for lan in lans:
            _remove(lan.nodes)
        _remove(made)


def remove_tagged(tag: str) -> list[str]:
    """Kill the processes inside every namespace this module made under ``tag`` and delete the
    namespaces: the cleanup of a builder whose process was killed before its own ran (`make fleet`'s
    trap). Returns the names removed."""
    removed = []
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        ours = name.startswith(f"{PREFIX}-") and (name.endswith(f"-{tag}") or f"-{tag}-" in name)
        if not ours:
            continue
        for pid in ip("netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            ip("netns", "del", name)
            removed.append(name)
    return removed
