"""Coordinator replicas over one PostgreSQL: commits per second, `FindPeers` latency with 10,000
registered nodes and `Watch` delivery latency to 1,000 subscribers, for 1 and 3 replicas (METHOD says
how). Bounded to a few minutes in all: a fixed duration for the commits, fixed call counts elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.harness import Bench, Section, Table, cli_env, remove
from bench.replication_bench import CACHEPOINT, COORDINATOR, _announcement, _run, _spawn
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, fleet_pb2, fleet_pb2_grpc, version_pb2
from coordinator.fleet.shared import SharedRegistry

TITLE = "Coordinator replicas over PostgreSQL"
REPLICAS = (1, 3)
NODES = 10_000
SITES = 100
SUBSCRIBERS = 1_000
CHANNELS = 20  # connections the Watch streams share (50 streams each)
WATCH_COMMITS = 5
COMMITTERS = 8
COMMIT_SECONDS = 15.0
FINDPEERS_CALLS = 2_000
FINDPEERS_CONCURRENCY = 4
REGISTER_CONCURRENCY = 64
FLUSH_ROUNDS = 3
DELIVERY_TIMEOUT = 60.0  # a stream that has not received a commit's event by then counts as missed
SUBSCRIBE_TIMEOUT = 120.0
CALL_TIMEOUT = 60.0
PUBLISHED = "os/bench-replicas"  # the layer published first: its manifest is what every commit names
COMMITTED = "os/bench-commits"
WATCHED = "os/bench-watch"
IMAGE_BYTES = 256 * 1024
# One connection per channel (grpc would otherwise share one subchannel between equal channels).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Outcome:
    replicas: int
    watch_ms: list[float] = field(default_factory=list)
    watch_missed: int = 0
    watch_commit_ms: list[float] = field(default_factory=list)
    commits: int = 0
    commit_seconds: float = 0.0
    commit_ms: list[float] = field(default_factory=list)
    register_seconds: float = 0.0
    heartbeats: int = 0
    heartbeat_seconds: float = 0.0
    flush_seconds: list[float] = field(default_factory=list)
    find_ms: list[float] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)


METHOD = (
    "Set-up, untimed, per replica count: a fresh database in one PostgreSQL server the benchmark starts "
    "(tests/postgres.py: Debian's binaries, a temporary data directory, loopback; with the test suite's "
    "settings, `fsync`, `synchronous_commit` and `full_page_writes` off, so the figures are of the "
    "coordinator's and PostgreSQL's work, not of a disk's flushes), a shared block directory, and that many "
    "`cachepoint-coordinator serve --catalog … --blocks file://…` children (plaintext, `--http` on loopback "
    f"for their metrics); a {IMAGE_BYTES // 1024} KiB image published through the first replica gives the "
    "manifest every commit names. One client process (the benchmark's, gRPC asyncio) then runs, in order: "
    f"**Watch**: {SUBSCRIBERS:,} `Watch` streams on a layer of their own, spread round robin over the "
    f"replicas on {CHANNELS} connections, open once the replicas' `watch_subscribers` gauges count them all; "
    f"{WATCH_COMMITS} commits to that layer through the first replica, one at a time; a delivery's latency "
    "runs from the moment the `Commit` call is sent to the moment a stream receives the version's event "
    "(so it includes the commit, shown apart). **Commits**: "
    f"{COMMITTERS} concurrent committers, round robin over the replicas, each sending `Commit` of the small "
    f"manifest (a new version of one layer, a fresh commit id each) one after the other for "
    f"{COMMIT_SECONDS:.0f} s. **FindPeers**: {NODES:,} nodes in {SITES} sites registered with `Register` "
    f"(round robin over the replicas, {REGISTER_CONCURRENCY} calls in flight), then heartbeating through the "
    "same replica, all reporting the one version complete (the worst case for the lookup: every node is "
    "a holder); while those heartbeats keep going round, as fast as the one client sends them (below a "
    "real fleet's 5,000 a second: the rate is in the table), "
    f"{FINDPEERS_CALLS:,} `FindPeers` calls for that version from random nodes, {FINDPEERS_CONCURRENCY} in "
    "flight, round robin over the replicas; a call's latency is the client's, from send to reply. Last, "
    f"the write capacity behind the registry: the benchmark writes one heartbeat of each of the {NODES:,} "
    "nodes the way a replica's flush does (`SharedRegistry.flush`, one statement), best of "
    f"{FLUSH_ROUNDS}, to compare with the 5,000 heartbeats a second that 10,000 nodes send. The "
    "server, the replicas and the client share the machine's cores: the figures are of the whole system "
    "on this machine."
)


def _not_run(why: str) -> Section:
    table = Table(["Measured", "Why not"])
    table.add("nothing", why)
    return Section(key="replicas", title=TITLE, method=METHOD, table=table)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{_pct(values, 0.5):.1f} / {_pct(values, 0.99):.1f} / {max(values):.1f}"


# -- the replicas ----------------------------------------------------------------------------------


class Cluster:
    def __init__(self, bench: Bench, stack: contextlib.ExitStack, root: Path, dsn: str, count: int) -> None:
        self.bench = bench
        self.root = root
        root.mkdir(parents=True)
        self.config_home = root / "xdg-config"
        self.config_home.mkdir()
        blocks = root / "blocks"
        self.grpc: list[str] = []
        self.http: list[str] = []
        for i in range(count):
            data = root / f"replica{i}"
            out, log = root / f"replica{i}.out", root / f"replica{i}.log"
            with open(out, "wb") as stdout:
                proc = _spawn(
                    stack,
                    [
                        *COORDINATOR,
                        "serve",
                        "--data",
                        str(data),
                        "--listen",
                        "127.0.0.1:0",
                        "--http",
                        "127.0.0.1:0",
                        "--catalog",
                        dsn,
                        "--blocks",
                        blocks.as_uri(),
                    ],
                    log,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    env=self.env(data),
                )
            announced = _announcement(proc, out, log, f"replica{i}")
            self.grpc.append(str(announced["listening"]))
            self.http.append(str(announced["http"]))

    def env(self, store: Path) -> dict[str, str]:
        return cli_env(store, self.config_home)

    def manifest(self) -> catalog_pb2.ManifestBlob:
        image = self.root / "image"
        image.write_bytes(random.Random(13).randbytes(IMAGE_BYTES))
        publisher = self.root / "publisher"
        _run(
            [*CACHEPOINT, "publish", PUBLISHED, str(image), "--coordinator", self.grpc[0], "--json"],
            "cachepoint publish",
            env=self.env(publisher),
        )
        with grpc.insecure_channel(self.grpc[-1]) as ch:
            stub = catalog_pb2_grpc.CatalogStub(ch)
            info = stub.Resolve(
                catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer=PUBLISHED, number=1)), timeout=30
            )
            return stub.GetManifest(catalog_pb2.GetManifestRequest(digest=info.manifest_digest), timeout=30)

    def watchers(self) -> int:
        """Open Watch streams, summed over the replicas (their metrics)."""
        total = 0
        for address in self.http:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith("cachepoint_coordinator_watch_subscribers "):
                        total += int(float(line.split()[1]))
        return total


def _commit(layer: str, manifest: catalog_pb2.ManifestBlob, who: str) -> catalog_pb2.CommitRequest:
    return catalog_pb2.CommitRequest(
        layer=layer, manifest=manifest, author=who, device=who, message="bench", commit_id=str(uuid.uuid4())
    )


# -- Watch -----------------------------------------------------------------------------------------


async def _watch(cluster: Cluster, manifest: catalog_pb2.ManifestBlob, outcome: Outcome) -> None:
    channels = [
        grpc.aio.insecure_channel(cluster.grpc[i % len(cluster.grpc)], options=OWN_CONNECTION)
        for i in range(CHANNELS)
    ]
    received: dict[int, list[float]] = {}

    async def follow(call: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for event in call:
                if event.WhichOneof("event") == "version_committed":
                    received.setdefault(event.version_committed.number, []).append(time.perf_counter())

    calls = [
        catalog_pb2_grpc.CatalogStub(channels[i % CHANNELS]).Watch(catalog_pb2.WatchRequest(layers=[WATCHED]))
        for i in range(SUBSCRIBERS)
    ]
    readers = [asyncio.create_task(follow(call)) for call in calls]
    try:
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        while await asyncio.to_thread(cluster.watchers) < SUBSCRIBERS:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"replicas: {SUBSCRIBERS} Watch streams not open in {SUBSCRIBE_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.5)
        stub = catalog_pb2_grpc.CatalogStub(channels[0])
        for _ in range(WATCH_COMMITS):
            sent = time.perf_counter()
            info = await stub.Commit(_commit(WATCHED, manifest, "watch"), timeout=CALL_TIMEOUT)
            outcome.watch_commit_ms.append((time.perf_counter() - sent) * 1000)
            deadline = time.monotonic() + DELIVERY_TIMEOUT
            while len(received.get(info.number, ())) < SUBSCRIBERS and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            arrivals = received.get(info.number, [])
            outcome.watch_ms += [(at - sent) * 1000 for at in arrivals]
            outcome.watch_missed += SUBSCRIBERS - len(arrivals)
            await asyncio.sleep(0.5)
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close()


# -- commits ---------------------------------------------------------------------------------------


async def _commits(cluster: Cluster, manifest: catalog_pb2.ManifestBlob, outcome: Outcome) -> None:
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for address in cluster.grpc]
    start = time.perf_counter()
    stop = start + COMMIT_SECONDS

    async def committer(i: int) -> None:
        stub = catalog_pb2_grpc.CatalogStub(channels[i % len(channels)])
        while time.perf_counter() < stop:
            sent = time.perf_counter()
            await stub.Commit(_commit(COMMITTED, manifest, f"committer{i}"), timeout=CALL_TIMEOUT)
            outcome.commit_ms.append((time.perf_counter() - sent) * 1000)
            outcome.commits += 1

    try:
        await asyncio.gather(*(committer(i) for i in range(COMMITTERS)))
        outcome.commit_seconds = time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()


# -- FindPeers at 10,000 nodes ---------------------------------------------------------------------


async def _find_peers(cluster: Cluster, outcome: Outcome, log: Any) -> None:
    channels = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for address in cluster.grpc]
    stubs = [fleet_pb2_grpc.FleetStub(ch) for ch in channels]
    held = [version_pb2.Ref(layer=COMMITTED, number=1)]
    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

    def node_id(i: int) -> str:
        return f"bench-{i:05d}"

    async def register(i: int) -> None:
        info = fleet_pb2.NodeInfo(
            node_id=node_id(i), site=f"site-{i % SITES:03d}", address=f"127.0.0.2:{i + 1}"
        )
        async with gate:
            await stubs[i % len(stubs)].Register(fleet_pb2.RegisterRequest(node=info), timeout=CALL_TIMEOUT)

    async def heartbeat(i: int) -> None:
        async with gate:
            await stubs[i % len(stubs)].Heartbeat(
                fleet_pb2.HeartbeatRequest(node_id=node_id(i), complete=held, load=i % 7),
                timeout=CALL_TIMEOUT,
            )
        outcome.heartbeats += 1

    try:
        start = time.perf_counter()
        await asyncio.gather(*(register(i) for i in range(NODES)))
        outcome.register_seconds = time.perf_counter() - start
        log(f"replicas x{outcome.replicas}: {NODES} nodes registered in {outcome.register_seconds:.1f} s")
        done = asyncio.Event()

        async def keep_beating() -> None:
            while not done.is_set():
                await asyncio.gather(*(heartbeat(i) for i in range(NODES)))

        beat_start = time.perf_counter()
        await asyncio.gather(*(heartbeat(i) for i in range(NODES)))  # every node heard once
        beating = asyncio.create_task(keep_beating())
        await asyncio.sleep(1.0)  # the replicas' flushes of that first round are written
        rng = random.Random(7)
        calls = iter(range(FINDPEERS_CALLS))

        async def finder() -> None:
            for n in calls:
                request = fleet_pb2.FindPeersRequest(
                    requester_id=node_id(rng.randrange(NODES)), version=held[0]
                )
                sent = time.perf_counter()
                reply = await stubs[n % len(stubs)].FindPeers(request, timeout=CALL_TIMEOUT)
                outcome.find_ms.append((time.perf_counter() - sent) * 1000)
                outcome.peers.append(len(reply.peers))

        await asyncio.gather(*(finder() for _ in range(FINDPEERS_CONCURRENCY)))
        done.set()
        await beating
        outcome.heartbeat_seconds = time.perf_counter() - beat_start
    finally:
        for channel in channels:
            await channel.close()


async def _flushes(dsn: str, outcome: Outcome) -> None:
    """What PostgreSQL takes to write one heartbeat of every node, as a replica's flush writes them
    (one statement), with the replicas still running: the write capacity behind the registry."""
    registry = SharedRegistry(dsn, "bench", flush_s=3600)
    await registry.start()
    try:
        registry.known.update(f"bench-{i:05d}" for i in range(NODES))
        for round_ in range(FLUSH_ROUNDS):
            for i in range(NODES):
                await registry.record_heartbeat(f"bench-{i:05d}", {f"{COMMITTED}@1"}, (i + round_) % 7, None)
            start = time.perf_counter()
            written = await registry.flush()
            outcome.flush_seconds.append(time.perf_counter() - start)
            if written != NODES:
                raise RuntimeError(f"replicas: a flush wrote {written} heartbeats of {NODES}")
    finally:
        await registry.close()


# -- the section -----------------------------------------------------------------------------------


def _measure(bench: Bench, stack: contextlib.ExitStack, root: Path, dsn: str, count: int) -> Outcome:
    outcome = Outcome(count)
    cluster = Cluster(bench, stack, root, dsn, count)
    manifest = cluster.manifest()
    bench.log(f"replicas x{count}: {', '.join(cluster.grpc)} up; Watch to {SUBSCRIBERS} streams")
    asyncio.run(_watch(cluster, manifest, outcome))
    bench.log(f"replicas x{count}: {COMMITTERS} committers for {COMMIT_SECONDS:.0f} s")
    asyncio.run(_commits(cluster, manifest, outcome))
    bench.log(f"replicas x{count}: {NODES} nodes, FindPeers")
    asyncio.run(_find_peers(cluster, outcome, bench.log))
    bench.log(f"replicas x{count}: flushes of {NODES} heartbeats")
    asyncio.run(_flushes(dsn, outcome))
    return outcome


def replicas(bench: Bench) -> Section:
    if bench.quick:
        return _not_run("a --quick run leaves it out: 10,000 nodes and 1,000 Watch streams take minutes")
    from tests.postgres import PostgresServer, available

    reason = available()
    if reason is not None:
        return _not_run(reason)
    root = bench.path("replicas")
    remove(root)
    server = PostgresServer()
    server.start()
    outcomes: list[Outcome] = []
    try:
        for count in REPLICAS:
            dsn = server.create_database(f"bench_replicas_{count}")
            with contextlib.ExitStack() as stack:
                outcomes.append(_measure(bench, stack, root / f"x{count}", dsn, count))
    finally:
        server.stop()
        remove(root)
    return _section(outcomes)


def _section(outcomes: list[Outcome]) -> Section:
    table = Table(["Measure", *(f"{o.replicas} replica{'s' if o.replicas > 1 else ''}" for o in outcomes)])
    figures: dict[str, float] = {}
    for o in outcomes:
        key = f"x{o.replicas}"
        figures[f"{key}_commits_per_s"] = o.commits / o.commit_seconds if o.commit_seconds else 0.0
        figures[f"{key}_findpeers_p99_ms"] = _pct(o.find_ms, 0.99)
        figures[f"{key}_watch_p99_ms"] = _pct(o.watch_ms, 0.99)

    def row(name: str, cell: Any) -> None:
        table.add(name, *(cell(o) for o in outcomes))

    row(
        f"Commits per second ({COMMITTERS} concurrent committers, {COMMIT_SECONDS:.0f} s)",
        lambda o: f"{o.commits / o.commit_seconds:.1f} ({o.commits} commits)" if o.commit_seconds else "—",
    )
    row("Commit call latency, p50 / p99 / max (ms)", lambda o: _ms(o.commit_ms))
    row(
        f"`FindPeers` latency with {NODES:,} registered nodes, p50 / p99 / max (ms)", lambda o: _ms(o.find_ms)
    )
    row(
        "`FindPeers` calls / peers per answer (median)",
        lambda o: f"{len(o.find_ms)} / {statistics.median(o.peers) if o.peers else 0:.0f}",
    )
    row(
        f"Registering {NODES:,} nodes (`Register`, {REGISTER_CONCURRENCY} in flight), s",
        lambda o: (
            f"{o.register_seconds:.1f} ({NODES / o.register_seconds:.0f}/s)" if o.register_seconds else "—"
        ),
    )
    row(
        "Heartbeats sent meanwhile (one client), per second",
        lambda o: f"{o.heartbeats / o.heartbeat_seconds:.0f}" if o.heartbeat_seconds else "—",
    )
    row(
        f"One flush of {NODES:,} heartbeats (one `UPDATE … unnest`), best of {FLUSH_ROUNDS}: s, heartbeats/s",
        lambda o: (
            f"{min(o.flush_seconds):.2f} ({NODES / min(o.flush_seconds):,.0f}/s)" if o.flush_seconds else "—"
        ),
    )
    row(
        f"`Watch` delivery to {SUBSCRIBERS:,} streams x {WATCH_COMMITS} commits, p50 / p99 / max (ms)",
        lambda o: _ms(o.watch_ms),
    )
    row(
        "… of which the commit call itself, p50 / max (ms)",
        lambda o: f"{_pct(o.watch_commit_ms, 0.5):.1f} / {max(o.watch_commit_ms, default=0):.1f}",
    )
    row(f"Deliveries missed (none within {DELIVERY_TIMEOUT:.0f} s)", lambda o: str(o.watch_missed))
    warnings = [
        f"{o.replicas} replica(s): {o.watch_missed} Watch deliveries missed"
        for o in outcomes
        if o.watch_missed
    ]
    return Section(
        key="replicas", title=TITLE, method=METHOD, table=table, figures=figures, warnings=warnings
    )
