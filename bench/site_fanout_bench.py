"""Site fan-out on a fleet in network namespaces (fleetlab/): WAN bytes per site and publish-to-converged
time for N = 1, 2, 4, 8 nodes in one site and for 3 sites x 4 nodes, with cooperative fetch on and off
(the nodes' ``site_fanout`` setting), each site's WAN a veth shaped with tbf at 100 Mbit/s.

Every configuration is a fresh fleet (namespaces, coordinator, stores); the version is a generated
image (cachepoint/samples.py) whose new blocks are all of it. After the 8-node cooperative run one
more node joins the site and takes the version from its peers: its intake (bytes / seconds) is the
measured per-node throughput the model section uses. Plots (matplotlib) go beside the report.

Needs root, iproute2 and tc; without them, or in a --quick run (it takes minutes: ten fleets of up to
12 daemons), the section says so and measures nothing.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from bench.harness import Bench, Check, Section, Table, human_bytes, parse_size, verdict
from cachepoint.samples import generate
from fleetlab import netns
from fleetlab.fanout import Outcome, Plan, run

SIZE = "128M"  # @2: a generated image of this size (its compressed new blocks are what crosses the WAN)
SEED = 12
WAN_RATE = "100mbit"  # tc's notation
WAN_LABEL = "100 Mbit/s"
NODES = (1, 2, 4, 8)
SITES_OF_MANY = (3, 4)  # 3 sites x 4 nodes
WAN_TARGET = 1.1  # WAN bytes per site / the version's compressed new blocks
TIME_TARGET = 1.3  # all of 8 nodes hold it / 1 node holds it
# The 1-node and 8-node cooperative fan-outs run this many times (fresh fleets) and the time target
# compares their medians: one run's time moves by a tenth with what else the two shared cores do.
TIME_REPEATS = 3
WAN_PLOT = "site_fanout_wan.png"
TIME_PLOT = "site_fanout_time.png"
TITLE = "Site fan-out on a fleet in network namespaces"


def _not_run(why: str) -> Section:
    table = Table(["Measured", "Why not"])
    table.add("nothing", why)
    return Section(key="site_fanout", title=TITLE, method=__doc__.split("\n\n")[0].strip(), table=table)


def _plots(outcomes: list[Outcome], directory: Path) -> list[str]:
    """Two PNGs against N (one site): WAN bytes per site over the new blocks, and converge time, with
    cooperative fetch on and off. Returns the names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    one_site = [o for o in outcomes if o.plan.sites == 1]
    written = []
    for name, label, value in (
        (WAN_PLOT, "WAN bytes per site / compressed new blocks", lambda o: o.wan_ratio),
        (TIME_PLOT, "publish to all nodes holding it (s)", lambda o: o.converge_s),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for cooperative, style in ((True, "o-"), (False, "s--")):
            runs = [o for o in one_site if o.plan.cooperative == cooperative]
            runs.sort(key=lambda o: o.plan.nodes)
            ax.plot(
                [o.plan.nodes for o in runs],
                [value(o) for o in runs],
                style,
                label=f"cooperative fetch {'on' if cooperative else 'off'}",
            )
        if name == WAN_PLOT:
            ax.axhline(WAN_TARGET, color="grey", linewidth=0.8, linestyle=":", label=f"target {WAN_TARGET}x")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(NODES), [str(n) for n in NODES])
        ax.set_xlabel(f"nodes in the site (WAN {WAN_LABEL}, tbf)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def site_fanout(bench: Bench) -> Section:
    if bench.quick:
        return _not_run("a --quick run leaves it out: ten fleets of up to 12 daemons take minutes")
    try:
        netns.check_possible()
    except netns.NamespacesUnavailable as err:
        return _not_run(str(err))
    base, version = bench.path("fanout-v1.img"), bench.path("fanout-v2.img")
    base.write_bytes(b"\x01" * 64 * 1024)
    generate(version, parse_size(SIZE), SEED)
    configs = [(1, n, on) for n in NODES for on in (True, False)]
    configs += [(*SITES_OF_MANY, on) for on in (True, False)]
    outcomes: list[Outcome] = []
    times: dict[int, list[float]] = {}  # nodes -> converge times of the repeated cooperative runs
    load = [os.getloadavg()[0]]
    for sites, nodes, cooperative in configs:
        joiner = sites == 1 and nodes == max(NODES) and cooperative
        plan = Plan(sites, nodes, cooperative, base, version, WAN_RATE, joiner=joiner)
        outcomes.append(run(plan, bench.path(f"fanout-{plan.label}"), bench.log))
        load.append(os.getloadavg()[0])
        if sites == 1 and cooperative and nodes in (1, max(NODES)):
            times[nodes] = [outcomes[-1].converge_s]
            for repeat in range(2, TIME_REPEATS + 1):
                again = Plan(sites, nodes, cooperative, base, version, WAN_RATE)
                outcome = run(again, bench.path(f"fanout-{again.label}-{repeat}"), bench.log)
                times[nodes].append(outcome.converge_s)
                load.append(os.getloadavg()[0])
    return _section(bench, outcomes, times, max(load))


def _row(table: Table, o: Outcome, result: str = "") -> None:
    per_node_origin = [n.origin_bytes for n in o.nodes]
    per_node_site = [n.site_bytes for n in o.nodes]
    table.add(
        f"{o.plan.sites} x {o.plan.nodes}",
        "on" if o.plan.cooperative else "off",
        " / ".join(human_bytes(b) for b in o.wan_bytes),
        f"{o.wan_ratio:.3f}×",
        f"{o.converge_s:.2f}",
        f"{human_bytes(min(per_node_origin))} – {human_bytes(max(per_node_origin))}",
        f"{human_bytes(min(per_node_site))} – {human_bytes(max(per_node_site))}",
        result,
    )


def _section(bench: Bench, outcomes: list[Outcome], times: dict[int, list[float]], load: float) -> Section:
    table = Table(
        [
            "Sites x nodes",
            "Cooperative",
            "WAN bytes per site",
            "Busiest site / new blocks",
            "Publish → all hold it (s)",
            "Per node from origin",
            "Per node from site peers",
            "Result",
        ]
    )
    new_bytes = outcomes[0].new_bytes
    coop = {o.plan.nodes: o for o in outcomes if o.plan.sites == 1 and o.plan.cooperative}
    alone = {o.plan.nodes: o for o in outcomes if o.plan.sites == 1 and not o.plan.cooperative}
    many = next(o for o in outcomes if o.plan.sites > 1 and o.plan.cooperative)
    one, eight = coop[1], coop[max(NODES)]
    for o in outcomes:
        graded = o.plan.sites == 1 and o.plan.cooperative
        _row(table, o, f"{verdict(o.wan_ratio <= WAN_TARGET)} (≤ {WAN_TARGET}×)" if graded else "")
    eight_s, one_s = statistics.median(times[max(NODES)]), statistics.median(times[1])
    time_ratio = eight_s / one_s
    runs = " / ".join(", ".join(f"{t:.2f}" for t in times[n]) for n in (max(NODES), 1))
    table.add(
        f"1 x {max(NODES)} vs 1 x 1 (medians of {TIME_REPEATS} runs: {runs})",
        "on",
        "",
        "",
        f"{eight_s:.2f} / {one_s:.2f} = {time_ratio:.2f}×",
        "",
        "",
        f"{verdict(time_ratio <= TIME_TARGET)} (≤ {TIME_TARGET}×)",
    )
    intake = new_bytes / eight.joiner_s if eight.joiner_s > 0 else 0.0
    table.add(
        f"1 x {max(NODES)}, then 1 joins",
        "on",
        human_bytes(eight.joiner_wan_bytes),
        f"{eight.joiner_wan_bytes / new_bytes:.3f}×",
        f"{eight.joiner_s:.2f} (from its start)",
        "–",
        f"{human_bytes(new_bytes)} at {intake / 2**20:.1f} MiB/s",
        "",
    )
    ratios = [coop[n].wan_ratio for n in NODES]
    wan_ok = all(r <= WAN_TARGET for r in ratios)
    checks = [
        Check(
            f"Site fan-out: WAN bytes per site ≤ {WAN_TARGET}× the compressed new blocks, N = "
            + ", ".join(map(str, NODES)),
            " / ".join(f"{r:.3f}×" for r in ratios),
            f"≤ {WAN_TARGET}× each",
            wan_ok,
        ),
        Check(
            f"Site fan-out: time until all {max(NODES)} nodes hold it vs 1 node (medians of {TIME_REPEATS})",
            f"{eight_s:.2f} s / {one_s:.2f} s = {time_ratio:.2f}×",
            f"≤ {TIME_TARGET}×",
            time_ratio <= TIME_TARGET,
        ),
    ]
    plots = _plots(outcomes, bench.report_dir)
    warnings = []
    if not plots:
        warnings.append("matplotlib is not installed: no plots (`make bench` installs it)")
    if load > 2.0:
        warnings.append(
            f"the 1-minute load average reached {load:.1f} on {os.cpu_count()} CPUs during this section: "
            "up to 13 daemons of the fleet share the machine with other work, so the times are the "
            "machine's as much as the fan-out's"
        )
    method = (
        f"{__doc__.split(chr(10) + chr(10))[0].strip()}\n\n"
        f"The version: a {SIZE} generated image (seed {SEED}), {human_bytes(new_bytes)} of compressed new "
        f"blocks; @1 is one block, published first so that every node follows the tag and hears of @2 "
        "from the same Watch event. *WAN bytes* are what the site's end of its WAN veth received from "
        "just before the publish of @2 until every node held it (frames and headers, heartbeats "
        "included). *Publish → all hold it* is from the coordinator's commit of @2 to the last node's "
        "commit, both read from the daemons' log lines (one clock, milliseconds). Per-node bytes are "
        "the daemons' own counters (`status`). Cooperative off is `site_fanout = false`: each node "
        "fetches the whole version from the origin. All daemons share "
        f"{os.cpu_count()} CPUs: eight nodes verify, store and serve eight copies at once, so the "
        "8-node times measure this machine's CPU as much as the protocol. "
        f"3 sites x 4 nodes, cooperative: {many.converge_s:.2f} s from publish to converged, "
        + ", ".join(f"site {i}: {human_bytes(b)}" for i, b in enumerate(many.wan_bytes, start=1))
        + f" on the WAN ({many.wan_ratio:.3f}× the new blocks for the busiest)."
    )
    if plots:
        method += "\n\n" + "  \n".join(f"![{name}]({name})" for name in plots)
    figures = {
        "node_intake_bytes_s": intake,
        "wan_ratio_one_node": one.wan_ratio,
        "converge_one_s": one_s,
        f"converge_{max(NODES)}_s": eight_s,
    }
    figures.update({f"wan_ratio_{n}": coop[n].wan_ratio for n in NODES})
    figures.update({f"wan_ratio_alone_{n}": alone[n].wan_ratio for n in NODES if n in alone})
    return Section(
        key="site_fanout",
        title=TITLE,
        method=method,
        table=table,
        figures=figures,
        checks=checks,
        warnings=warnings,
    )
