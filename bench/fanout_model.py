"""Fan-out at internet scale, on paper: a discrete-event model of delivering one version to many sites.

THIS IS A MODEL, NOT A MEASUREMENT. It moves pieces of a version through FIFO servers (the origin's
uplink, each site's WAN link, each node's LAN port and intake) and reports when p50 and p99 of the nodes
hold the whole version. The figures that feed it are measured ones where we have them (per-node intake
from the benchmark's delta-sync pull, wire overhead, the fetcher's constants) and named assumptions where
we do not (round-trip times, LAN speed); ``INPUTS`` lists each with where it comes from.

Two policies:

- ``cooperative``: today's site fan-out (docs/design.md, "Site fan-out"). Every node of a site waits
  ``PULLERS_SETTLE``, then fetches its rendezvous share from the origin (each block crosses the site's
  WAN once) and takes every other block from its owner, two streams per source; a request for a piece
  its owner lacks is answered at the first ``OWNER_POLL`` tick after the owner has it.
- ``none``: no cooperation, every node fetches the whole version from the origin.

Left out: TCP dynamics (slow start, loss, fair sharing between flows: links serve pieces first come,
first served), failures and take-over, disk limits and RocksDB compaction, CPU spent serving peers,
site budgets (``wan_rate``/``site_rate`` unset), the control plane (manifest, ``FindPeers``), and the
block-level pipelining inside a piece: blocks are aggregated into pieces of ``piece_blocks`` blocks so
that 2,600 nodes run in seconds, and an owner serves a piece only once all of it arrived.

``python -m bench.fanout_model`` prints the scenario of issue 12 and a sensitivity table;
``fanout_model(bench)`` is the benchmark's section.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace

from bench.harness import Bench, Section, Table
from cachepoint.replication.fetcher import OWNER_POLL, STREAMS_PER_SOURCE, UNIT_BLOCKS
from cachepoint.replication.pull import PULLERS_SETTLE
from cachepoint.samples import BLOCK

# The delta-sync section of bench/report.md (run of 2026-11-26): `pull()` in-process took 0.372 s
# (best of 3) for 37,245,594 B of compressed changed blocks, and 37,837,538 B crossed the wire.
DELTA_PULL_SECONDS = 0.372
DELTA_PULL_BYTES = 37_245_594
DELTA_WIRE_BYTES = 37_837_538
# The ceiling section of the same report: SHA-256 + zstd-1 of 64 KiB blocks on one thread.
CEILING_ONE_THREAD_MIB_S = 595.3
# tests/test_site_fanout.py (docs/design.md, "Site fan-out", measured): WAN bytes / stored new bytes
# for 4 nodes of a site at 100 Mbit/s, 1.01 (32 MiB version) and 1.02 (a node killed mid-fan-out).
MEASURED_FANOUT_WAN_RATIO = (1.01, 1.02)

KRAKEN_SOURCE = "github.com/uber/kraken README.md, section Benchmark"
KRAKEN_P50_S = 10.0
KRAKEN_P99_S = 18.0

MiB = 1 << 20


@dataclass(frozen=True)
class Inputs:
    """What the model takes as given. Each field's source is in ``SOURCES``."""

    block_bytes: int = BLOCK
    node_intake_bytes_s: float = DELTA_PULL_BYTES / DELTA_PULL_SECONDS
    wire_overhead: float = DELTA_WIRE_BYTES / DELTA_PULL_BYTES
    verify_s_per_mib: float = 1 / CEILING_ONE_THREAD_MIB_S
    streams_per_source: int = STREAMS_PER_SOURCE
    unit_blocks: int = UNIT_BLOCKS
    owner_poll_s: float = OWNER_POLL
    pullers_settle_s: float = PULLERS_SETTLE
    wan_rtt_s: float = 0.020
    lan_rtt_s: float = 0.0002
    lan_bits_s: float = 10e9


SOURCES: dict[str, str] = {
    "block_bytes": "measured constant: the store's block size (cachepoint/samples.py BLOCK)",
    "node_intake_bytes_s": "measured: bench/report.md, delta sync, `pull()` in-process best of 3 "
    "(compressed changed blocks / time; request, gRPC, verify, RocksDB write, both ends on 2 shared cores)",
    "wire_overhead": "measured: bench/report.md, delta sync, wire bytes / compressed changed blocks",
    "verify_s_per_mib": "measured: bench/report.md, ceiling, 1 thread SHA-256 + zstd-1; part of the "
    "intake above, shown as its floor (not charged twice)",
    "streams_per_source": "code: cachepoint/replication/fetcher.py STREAMS_PER_SOURCE",
    "unit_blocks": "code: cachepoint/replication/fetcher.py UNIT_BLOCKS (the request unit)",
    "owner_poll_s": "code: cachepoint/replication/fetcher.py OWNER_POLL",
    "pullers_settle_s": "code: cachepoint/replication/pull.py PULLERS_SETTLE (cooperative pulls only)",
    "wan_rtt_s": "assumption (not measured): a continental round trip",
    "lan_rtt_s": "assumption (not measured)",
    "lan_bits_s": "assumption (not measured): node ports and site switch",
}


@dataclass(frozen=True)
class Scenario:
    version_bytes: int = 3_000_000_000  # stored (compressed) new blocks, what crosses the wire
    sites: int = 50
    nodes_per_site: int = 52  # 2,600 nodes
    wan_bits_s: float = 1e9
    origin_bits_s: float = 40e9
    piece_blocks: int = 512  # 32 MiB of 64 KiB blocks per simulated piece
    seed: int = 12


@dataclass
class Outcome:
    policy: str
    nodes: int
    p50_s: float
    p99_s: float
    last_s: float
    wan_bytes_per_site: float  # the busiest site
    origin_bytes: float
    events: int
    wall_s: float
    done_s: list[float] = field(repr=False, default_factory=list)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank: the smallest value that at least p% of the values do not exceed."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class _Server:
    """A first-come, first-served server (a link direction or a node's intake) of fixed rate."""

    __slots__ = ("rate", "free_at")

    def __init__(self, bytes_s: float) -> None:
        self.rate = bytes_s
        self.free_at = 0.0

    def serve(self, arrival: float, nbytes: float) -> float:
        start = arrival if arrival > self.free_at else self.free_at
        self.free_at = start + nbytes / self.rate
        return self.free_at


def _shares(blocks: int, owners: int, rng: random.Random) -> list[int]:
    """Blocks per owner under rendezvous hashing: a multinomial draw (normal approximation), as hashing
    45,000 ids over each site's nodes would take longer than the rest of the model."""
    if owners == 1:
        return [blocks]
    mean = blocks / owners
    sd = math.sqrt(mean * (1 - 1 / owners))
    raw = [max(0.0, rng.gauss(mean, sd)) for _ in range(owners)]
    scale = blocks / sum(raw)
    counts = [int(x * scale) for x in raw]
    for i in range(blocks - sum(counts)):
        counts[i % owners] += 1
    return counts


def _cut(blocks: int, piece_blocks: int) -> list[int]:
    return [min(piece_blocks, blocks - start) for start in range(0, blocks, piece_blocks)]


# Event kinds. Origin: a request reaches the origin. Owner: a request reaches a site peer (the owner).
# Answer: an owner answers a request it could not answer before. Intake: a piece reaches a node.
_ORIGIN, _OWNER, _ANSWER, _INTAKE = range(4)


def simulate(scenario: Scenario, inputs: Inputs, policy: str) -> Outcome:
    """Deliver ``scenario``'s version to all its nodes under ``policy`` ("cooperative" or "none")."""
    if policy not in ("cooperative", "none"):
        raise ValueError(f"policy {policy!r}: expected 'cooperative' or 'none'")
    started = time.perf_counter()
    s, n = scenario.sites, scenario.nodes_per_site
    blocks = math.ceil(scenario.version_bytes / inputs.block_bytes)
    bytes_per_block = scenario.version_bytes / blocks * inputs.wire_overhead
    wan_half, lan_half = inputs.wan_rtt_s / 2, inputs.lan_rtt_s / 2
    poll = inputs.owner_poll_s
    streams = inputs.streams_per_source
    rng = random.Random(scenario.seed)
    cooperative = policy == "cooperative"
    start = inputs.pullers_settle_s if cooperative else 0.0

    origin = _Server(scenario.origin_bits_s / 8)
    wan = [_Server(scenario.wan_bits_s / 8) for _ in range(s)]
    nodes = s * n
    intake = [_Server(min(inputs.node_intake_bytes_s, inputs.lan_bits_s / 8)) for _ in range(nodes)]
    lan_out = [_Server(inputs.lan_bits_s / 8) for _ in range(nodes)]
    wan_bytes = [0.0] * s
    origin_bytes = 0.0

    # Pieces: bytes, owner (the node whose copy peers ask for), when the owner has it, who waits for it.
    piece_bytes: list[float] = []
    piece_owner: list[int] = []
    # queues[node][k]: the pieces node asks of source k, in order (k = 0 is the origin); the source of
    # queue k is sources[node][k] (-1 for the origin).
    queues: list[list[list[int]]] = []
    sources: list[list[int]] = []
    for site in range(s):
        first = site * n
        if cooperative:
            counts = _shares(blocks, n, rng)
        else:
            counts = [blocks]
        owned: list[list[int]] = []
        for j, count in enumerate(counts):
            ids = []
            for size in _cut(count, scenario.piece_blocks):
                ids.append(len(piece_bytes))
                piece_bytes.append(size * bytes_per_block)
                piece_owner.append(first + j if cooperative else -1)
            owned.append(ids)
        for i in range(n):
            if cooperative:
                queues.append([owned[i]] + [owned[j] for j in range(n) if j != i])
                sources.append([-1] + [first + j for j in range(n) if j != i])
            else:
                queues.append([owned[0]])
                sources.append([-1])
    pieces = len(piece_bytes)
    available_at = [math.inf] * pieces
    waiters: list[list[tuple[int, int, float]]] = [[] for _ in range(pieces)]
    cursor = [[0] * len(q) for q in queues]
    remaining = [sum(len(q) for q in node_queues) for node_queues in queues]
    done_s = [start] * nodes

    heap: list[tuple[float, int, int, int, int, int]] = []
    seq = 0

    def ask(node: int, k: int, now: float) -> None:
        nonlocal seq
        queue = queues[node][k]
        c = cursor[node][k]
        if c == len(queue):
            return
        cursor[node][k] = c + 1
        source = sources[node][k]
        if source < 0:
            event = (now + wan_half, seq, _ORIGIN, node, k, queue[c])
        else:
            event = (now + lan_half, seq, _OWNER, node, k, queue[c])
        seq += 1
        heapq.heappush(heap, event)

    def send_from_owner(owner: int, node: int, k: int, piece: int, now: float) -> None:
        nonlocal seq
        sent = lan_out[owner].serve(now, piece_bytes[piece])
        heapq.heappush(heap, (sent + lan_half, seq, _INTAKE, node, k, piece))
        seq += 1

    # Everyone asks at once; the asks are interleaved across sites so that the origin, serving requests
    # in the order they come, shares its uplink between sites as TCP would rather than finish site 0
    # first.
    # The first asks to owners all find nothing (no piece is anywhere before an origin round trip), so
    # they wait for their piece at once rather than through the heap, which they would make ten times
    # larger and the model several times slower.
    early = lan_half < inputs.wan_rtt_s
    for _ in range(streams):
        for i in range(n):
            for site in range(s):
                node = site * n + i
                for k in range(len(queues[node])):
                    if k > 0 and early:
                        c = cursor[node][k]
                        if c < len(queues[node][k]):
                            cursor[node][k] = c + 1
                            waiters[queues[node][k][c]].append((node, k, start + lan_half))
                    else:
                        ask(node, k, start)

    events = 0
    while heap:
        now, _, kind, node, k, piece = heapq.heappop(heap)
        events += 1
        if kind == _ORIGIN:
            nbytes = piece_bytes[piece]
            site = node // n
            origin_bytes += nbytes
            wan_bytes[site] += nbytes
            # The site's WAN link takes arrivals only from the origin, whose departures are in order, so
            # its departure can be settled now rather than by an event of its own.
            left = origin.serve(now, nbytes)
            crossed = wan[site].serve(left + wan_half, nbytes)
            heapq.heappush(heap, (crossed, seq, _INTAKE, node, k, piece))
            seq += 1
        elif kind == _OWNER:
            owner = piece_owner[piece]
            ready = available_at[piece]
            if ready <= now:
                send_from_owner(owner, node, k, piece, now)
            elif ready < math.inf:
                answer = now + math.ceil((ready - now) / poll) * poll
                heapq.heappush(heap, (answer, seq, _ANSWER, node, k, piece))
                seq += 1
            else:
                waiters[piece].append((node, k, now))
        elif kind == _ANSWER:
            send_from_owner(piece_owner[piece], node, k, piece, now)
        else:  # _INTAKE
            finished = intake[node].serve(now, piece_bytes[piece])
            if piece_owner[piece] == node:
                available_at[piece] = finished
                for waiter, wk, asked in waiters[piece]:
                    answer = asked + math.ceil((finished - asked) / poll) * poll
                    heapq.heappush(heap, (answer, seq, _ANSWER, waiter, wk, piece))
                    seq += 1
                waiters[piece].clear()
            remaining[node] -= 1
            if remaining[node] == 0:
                done_s[node] = finished
            # The stream that brought this piece asks for the next once it is stored.
            ask(node, k, finished)

    ordered = sorted(done_s)
    return Outcome(
        policy=policy,
        nodes=nodes,
        p50_s=percentile(ordered, 50),
        p99_s=percentile(ordered, 99),
        last_s=ordered[-1],
        wan_bytes_per_site=max(wan_bytes),
        origin_bytes=origin_bytes,
        events=events,
        wall_s=time.perf_counter() - started,
        done_s=done_s,
    )


# --- tables -------------------------------------------------------------------------------------------

HEADERS = [
    "Origin uplink",
    "Sites × nodes",
    "Node intake",
    "Policy",
    "p50 (s)",
    "p99 (s)",
    "All (s)",
    "WAN bytes per site / version",
    "Origin bytes",
]


def _gbit(bits_s: float) -> str:
    return f"{bits_s / 1e9:g} Gbit/s"


def _row(table: Table, scenario: Scenario, inputs: Inputs, outcome: Outcome) -> None:
    table.add(
        _gbit(scenario.origin_bits_s),
        f"{scenario.sites} × {scenario.nodes_per_site}",
        f"{inputs.node_intake_bytes_s / MiB:.0f} MiB/s",
        outcome.policy,
        f"{outcome.p50_s:.1f}",
        f"{outcome.p99_s:.1f}",
        f"{outcome.last_s:.1f}",
        f"{outcome.wan_bytes_per_site / scenario.version_bytes:.2f}×",
        f"{outcome.origin_bytes / 1e12:.2f} TB",
    )


def runs(base: Scenario, inputs: Inputs) -> list[tuple[Scenario, Inputs]]:
    """The scenario of issue 12 at three origin uplinks, then fewer nodes per site, then what a faster
    node intake would change (Kraken's agents were limited to 300 MB/s)."""
    out: list[tuple[Scenario, Inputs]] = []
    for uplink in (10e9, 40e9, 100e9):
        out.append((replace(base, origin_bits_s=uplink), inputs))
    for per_site in (1, 8, 26):
        out.append((replace(base, nodes_per_site=per_site), inputs))
    out.append((replace(base, origin_bits_s=100e9), replace(inputs, node_intake_bytes_s=300e6)))
    return out


def model_table(base: Scenario, inputs: Inputs, policies: tuple[str, ...] = ("cooperative", "none")) -> Table:
    table = Table(HEADERS)
    for scenario, these in runs(base, inputs):
        for policy in policies:
            _row(table, scenario, these, simulate(scenario, these, policy))
    table.add(
        "5 origins",
        "one cluster, 2,600 hosts",
        "300 MB/s limit",
        "Kraken, published (not modelled)",
        f"{KRAKEN_P50_S:g}",
        f"{KRAKEN_P99_S:g}",
        "p99.9 22",
        "no WAN between hosts",
        "",
    )
    return table


def inputs_text(inputs: Inputs, sources: dict[str, str] | None = None) -> list[str]:
    """``sources``: where this run took inputs from, over ``SOURCES``."""
    lines = []
    for name, source in {**SOURCES, **(sources or {})}.items():
        value = getattr(inputs, name)
        lines.append(f"- `{name}` = {value:,.6g}: {source}")
    lines.append(
        f"- check, not an input: the model's cooperative WAN bytes per site come to the wire overhead × the "
        f"version; measured on the namespace fleet (tests/test_site_fanout.py): "
        f"{MEASURED_FANOUT_WAN_RATIO[0]}–{MEASURED_FANOUT_WAN_RATIO[1]}× for 4 nodes at 100 Mbit/s"
    )
    return lines


def method_text(base: Scenario, inputs: Inputs, sources: dict[str, str] | None = None) -> str:
    wire = base.version_bytes * inputs.wire_overhead
    floor_wan = wire * 8 / base.wan_bits_s
    floor_node = wire / inputs.node_intake_bytes_s
    return "\n".join(
        [
            "**This is a model, not a measurement** (`bench/fanout_model.py`, plain Python, a heap of "
            "events): "
            f"a {base.version_bytes / 1e9:g} GB version (stored bytes, what crosses the wire) delivered to "
            f"{base.sites * base.nodes_per_site:,} nodes in {base.sites} sites, each site behind a "
            f"{_gbit(base.wan_bits_s)} WAN link. Links and each node's intake are first-come, first-served "
            "servers; blocks travel in pieces of "
            f"{base.piece_blocks} blocks ({base.piece_blocks * inputs.block_bytes // MiB} MiB; the fetcher's "
            f"unit is {inputs.unit_blocks}) so that the model runs in seconds. *cooperative* is today's site "
            "fan-out (rendezvous shares, each piece crosses a site's WAN once, peers poll owners every "
            f"{inputs.owner_poll_s:g} s, {inputs.streams_per_source} streams per source, after the "
            f"{inputs.pullers_settle_s:g} s settle); *none* has every node fetch from the origin. Times are "
            "from the publish until p50 / p99 / all of the nodes hold the whole version. Floors: a site's "
            f"WAN takes {floor_wan:.0f} s for the version, a node's intake {floor_node:.0f} s. Kraken's "
            f"figures ({KRAKEN_SOURCE}) are for a 3G image with 2 layers pulled by 2,600 hosts of one "
            "cluster, 300 MB/s limit per agent, 5 trackers and 5 origins: no WAN link between them.",
            "",
            "Left out: TCP dynamics (slow start, loss, per-flow fairness), failures and take-over, disk "
            "limits and compaction, CPU spent serving peers, site budgets, the control plane, and the "
            "pipelining of blocks inside a piece. Inputs:",
            "",
            *inputs_text(inputs, sources),
        ]
    )


FLEET_SOURCES = {
    "node_intake_bytes_s": "measured: this run's site fan-out section, a daemon joining a site of 8 "
    "in network namespaces and taking the whole version from its peers over the bridge (version bytes / "
    "seconds from its start to its commit; 2 shared cores)",
    "wire_overhead": "measured: this run's site fan-out section, one node's WAN bytes (frames, headers, "
    "control traffic) / the version's stored bytes",
}


def _inputs_from(bench: Bench) -> tuple[Inputs, list[str], dict[str, str]]:
    """This run's figures when their sections ran (the site fan-out's over the delta sync's), else the
    committed ones."""
    inputs = Inputs()
    notes: list[str] = []
    sources: dict[str, str] = {}
    delta = bench.sections.get("delta_sync")
    if delta and {"api_best_seconds", "changed_at_rest_bytes", "wire_ratio"} <= delta.figures.keys():
        f = delta.figures
        inputs = replace(
            inputs,
            node_intake_bytes_s=f["changed_at_rest_bytes"] / f["api_best_seconds"],
            wire_overhead=f["wire_ratio"],
        )
        notes.append("node intake and wire overhead from this run's delta sync")
    fleet = bench.sections.get("site_fanout")
    if fleet and fleet.figures.get("node_intake_bytes_s", 0) > 0:
        # The fleet in namespaces measures what the model needs most directly: a daemon taking a
        # version from its site peers over a bridge (intake), and a single node's WAN bytes over the
        # version's stored bytes (frames, headers, control traffic: the wire overhead).
        inputs = replace(
            inputs,
            node_intake_bytes_s=fleet.figures["node_intake_bytes_s"],
            wire_overhead=fleet.figures["wan_ratio_one_node"],
        )
        notes.append(
            "node intake (a daemon joining a site of 8 and taking the version from its peers) and wire "
            "overhead (one node's WAN bytes / stored bytes) from this run's site fan-out section"
        )
        sources = FLEET_SOURCES
    ceiling = bench.sections.get("ceiling")
    if ceiling and "t1_all_mib_s" in ceiling.figures:
        inputs = replace(inputs, verify_s_per_mib=1 / ceiling.figures["t1_all_mib_s"])
        notes.append("verify floor from this run's ceiling")
    return inputs, notes, sources


def fanout_model(bench: Bench) -> Section:
    inputs, notes, sources = _inputs_from(bench)
    base = Scenario()
    table = model_table(base, inputs)
    method = method_text(base, inputs, sources)
    if notes:
        method += "\n\n(" + "; ".join(notes) + "; otherwise the figures of the report of 2026-11-26.)"
    return Section(key="fanout_model", title="Fan-out at scale (a model)", method=method, table=table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_model", description=__doc__.split("\n")[0])
    parser.add_argument("--piece-blocks", type=int, default=Scenario.piece_blocks, help="blocks per piece")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    base = replace(Scenario(), piece_blocks=args.piece_blocks)
    inputs = Inputs()
    print("# Fan-out at scale (a model)\n")
    print(method_text(base, inputs))
    print()
    table = model_table(base, inputs)
    print("| " + " | ".join(table.headers) + " |")
    print("|" + "---|" * len(table.headers))
    for row in table.rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n(model run time {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
