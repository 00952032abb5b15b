"""`make fleet`: a demo fleet in network namespaces on this machine, one version fanned out to it.

A datacenter namespace with the coordinator; SITES sites, each a router namespace behind a WAN veth
shaped with tbf at WAN_RATE and a bridge with NODES node namespaces, a cachepoint in each. A small @1
is published and pulled everywhere, then @2 (a generated image of SIZE); the table shows, per node,
what it took from the origin (across its site's WAN) and from its site peers, and per site what
crossed its WAN. Everything it started is stopped and removed when it ends, fails or is interrupted
(``--cleanup TAG`` removes what a killed run left behind: `make fleet`'s trap).

    python -m fleetlab.demo --sites 2 --nodes 3 --size 64M --wan-rate 100mbit
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from cachepoint.samples import generate
from fleetlab import netns
from fleetlab.fanout import Outcome, Plan, run

MiB = 1 << 20
SEED = 12


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in units else (text, "")
    try:
        size = int(number) * units.get(unit, 1)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size {text!r}: write it like 64M or 1G") from err
    if size <= 0 or size % (64 * 1024):
        raise argparse.ArgumentTypeError(f"size {text!r}: a positive multiple of 64K")
    return size


def _switch(text: str) -> bool:
    if text.lower() in ("true", "on", "1", "yes"):
        return True
    if text.lower() in ("false", "off", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: write true or false")


def render(outcome: Outcome) -> str:
    plan = outcome.plan
    lines = [
        f"{plan.sites} sites x {plan.nodes} nodes, WAN {plan.wan_rate} per site, site_fanout = "
        f"{str(plan.cooperative).lower()}; @2's new blocks: {outcome.new_bytes / MiB:.1f} MiB stored "
        f"(compressed); published in {outcome.publish_s:.1f} s, every node held it "
        f"{outcome.converge_s:.2f} s after the commit",
        "",
        f"{'node':<8} {'site':>4} {'from origin (WAN)':>18} {'from site peers':>16} "
        f"{'other sites':>12} {'done':>8}",
    ]
    for node in outcome.nodes:
        lines.append(
            f"{node.name:<8} {node.site:>4} {node.origin_bytes / MiB:>14.1f} MiB "
            f"{node.site_bytes / MiB:>12.1f} MiB {node.peer_bytes / MiB:>8.1f} MiB {node.done_s:>7.2f}s"
        )
    lines.append("")
    for index, wan in enumerate(outcome.wan_bytes, start=1):
        lines.append(
            f"site {index}: {wan / MiB:.1f} MiB crossed its WAN "
            f"({wan / outcome.new_bytes:.3f}x the version's new blocks)"
        )
    return "\n".join(lines)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the builders' cleanup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlab.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=3, help="nodes per site")
    parser.add_argument("--size", type=_size, default=_size("64M"), help="@2's image size, e.g. 64M")
    parser.add_argument("--wan-rate", default="100mbit", help="each site's WAN, in tc's notation")
    parser.add_argument("--site-fanout", type=_switch, default=True, help="the nodes' site_fanout setting")
    parser.add_argument("--work", type=Path, help="directory for stores and logs (default: a temporary one)")
    parser.add_argument("--tag", default="", help="names the namespaces (default: this process's pid)")
    parser.add_argument("--cleanup", metavar="TAG", help="only remove what a run with TAG left behind")
    args = parser.parse_args(argv)
    if args.cleanup:
        removed = netns.remove_tagged(args.cleanup)
        if removed:
            print(f"removed {len(removed)} namespaces left by fleet {args.cleanup}", file=sys.stderr)
        return 0
    try:
        netns.check_possible()
    except netns.NamespacesUnavailable as err:
        print(f"make fleet: {err}", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)
    with tempfile.TemporaryDirectory(prefix="cachepoint-fleet-") as scratch:
        work = args.work or Path(scratch)
        base, version = work / "v1.img", work / "v2.img"
        work.mkdir(parents=True, exist_ok=True)
        base.write_bytes(b"\x01" * 64 * 1024)
        generate(version, args.size, SEED)
        plan = Plan(args.sites, args.nodes, args.site_fanout, base, version, args.wan_rate)

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        log(f"building {args.sites} sites x {args.nodes} nodes in network namespaces ...")
        outcome = run(plan, work / "fleet", log, tag=args.tag)
        print(render(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
