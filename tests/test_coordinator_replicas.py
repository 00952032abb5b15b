"""Several active coordinator replicas over one PostgreSQL catalog and one block directory: concurrent
commits through different replicas, GC on one while another receives a push, Watch across them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, catalog_pb2, catalog_pb2_grpc, version_pb2
from cachepoint.wire import manifest_from_bytes, stored_block_to_pb
from tests import tls
from tests.conftest import REPO, cli_env
from tests.fleet import (
    BLOCK,
    LAYER,
    Fleet,
    cli_json,
    coordinator_cli,
    coordinator_versions,
    publish,
    random_image,
    wait_until,
)
from tests.replicas import open_shared, start_replicas

RACE = "os/race"
COMMITS_EACH = 50


def _manifest(address: str, fleet: Fleet) -> catalog_pb2.ManifestBlob:
    with fleet.channel(address) as ch:
        stub = catalog_pb2_grpc.CatalogStub(ch)
        info = stub.Resolve(
            catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer=LAYER, tag="latest")), timeout=10
        )
        return stub.GetManifest(catalog_pb2.GetManifestRequest(digest=info.manifest_digest), timeout=10)


def _commit_many(
    fleet: Fleet, address: str, who: str, manifest: catalog_pb2.ManifestBlob, made: list[int]
) -> None:
    with fleet.channel(address, "publisher") as ch:
        stub = catalog_pb2_grpc.CatalogStub(ch)
        for i in range(COMMITS_EACH):
            info = stub.Commit(
                catalog_pb2.CommitRequest(
                    layer=RACE,
                    manifest=manifest,
                    author=who,
                    device=who,
                    message=f"{who} {i}",
                    tags=["staging"],
                    commit_id=f"{who}-{i}-{uuid.uuid4()}",
                ),
                timeout=60,
            )
            made.append(info.number)


def test_two_publishers_committing_through_different_replicas_get_versions_1_to_100_once_each(
    tmp_path: Path, postgres_dsn: str
) -> None:
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path) as fleet:
        replicas = start_replicas(fleet, postgres_dsn, blocks, 3)
        admin = tmp_path / "admin"
        fleet.identity(admin, "publisher", "admin")
        image = tmp_path / "image"
        random_image(image, 4 * BLOCK, seed=7)
        publish(admin, replicas[2].address, image)
        manifest = _manifest(replicas[1].address, fleet)

        made_a: list[int] = []
        made_b: list[int] = []
        threads = [
            threading.Thread(
                target=_commit_many, args=(fleet, replicas[0].address, "alice", manifest, made_a)
            ),
            threading.Thread(target=_commit_many, args=(fleet, replicas[1].address, "bob", manifest, made_b)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert len(made_a) == len(made_b) == COMMITS_EACH, (made_a, made_b)
        assert sorted(made_a + made_b) == list(range(1, 2 * COMMITS_EACH + 1))
        # Interleaved, not one after the other: the two really ran at the same time.
        assert max(made_a) > min(made_b) and max(made_b) > min(made_a)

        # Every replica lists the same 100 versions.
        for replica in replicas:
            with fleet.channel(replica.address) as ch:
                listed = catalog_pb2_grpc.CatalogStub(ch).ListVersions(
                    catalog_pb2.ListVersionsRequest(layer=RACE), timeout=10
                )
            assert [v.number for v in listed.versions] == list(range(1, 101)) or sorted(
                v.number for v in listed.versions
            ) == list(range(1, 101))

        # Every tag move once, in the tag history and in the Watch log.
        store = open_shared(postgres_dsn, blocks, tmp_path / "reader")
        try:
            moves = [m for m in store.catalog.tag_history(RACE) if m["tag"] == "staging"]
        finally:
            store.close()
        assert sorted(m["version"] for m in moves) == list(range(1, 101))
        with fleet.channel(replicas[2].address) as ch:
            stream = catalog_pb2_grpc.CatalogStub(ch).Watch(
                catalog_pb2.WatchRequest(layers=[RACE]), timeout=30
            )
            seen: list[catalog_pb2.CatalogEvent] = []
            for event in stream:
                seen.append(event)
                if len([e for e in seen if e.WhichOneof("event") == "tag_moved"]) >= 200:
                    break
            stream.cancel()
        positions = [e.position for e in seen]
        assert positions == sorted(set(positions)), "events out of order or repeated"
        staging = [
            e.tag_moved.number
            for e in seen
            if e.WhichOneof("event") == "tag_moved" and e.tag_moved.tag == "staging"
        ]
        assert sorted(staging) == list(range(1, 101))

        # One audit chain, 100 staging moves in it, verified through any replica.
        verdict = coordinator_cli(
            "history", "audit", "verify", "--coordinator", replicas[0].address, "--json"
        ).json()
        assert verdict["ok"], verdict
        listed = coordinator_cli(
            "history", "audit", "list", "--coordinator", replicas[1].address, "--json", "--limit", "1000"
        ).json()
        records = listed["records"] if isinstance(listed, dict) else listed
        staging_moves = [r for r in records if r["subject"] == f"{RACE}:staging"]
        assert sorted(r["details"]["version"] for r in staging_moves) == list(range(1, 101))


def test_a_replica_serves_watch_events_another_replica_committed(
    tmp_path: Path, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LISTEN/NOTIFY: a Watch stream on one replica wakes for a commit made through another. The
    replicas look at the log on their own only every 10 minutes here, longer than the test may run:
    the event can only come by the notification."""
    monkeypatch.setenv("CACHEPOINT_WATCH_KEEPALIVE", "600")
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path) as fleet:
        first, second = start_replicas(fleet, postgres_dsn, blocks, 2)
        admin = tmp_path / "admin"
        fleet.identity(admin, "publisher", "admin")
        image = tmp_path / "image"
        random_image(image, 2 * BLOCK, seed=3)
        with fleet.channel(first.address) as ch:
            stream = catalog_pb2_grpc.CatalogStub(ch).Watch(
                catalog_pb2.WatchRequest(layers=[LAYER]), timeout=300
            )
            publish(admin, second.address, image)
            event = next(iter(stream))
            stream.cancel()
        assert event.WhichOneof("event") == "version_committed"
        assert event.version_committed.number == 1


def test_watch_resumed_on_another_replica_from_a_position_misses_nothing(
    tmp_path: Path, postgres_dsn: str
) -> None:
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path) as fleet:
        first, second = start_replicas(fleet, postgres_dsn, blocks, 2)
        admin = tmp_path / "admin"
        fleet.identity(admin, "publisher", "admin")
        image = tmp_path / "image"
        for seed in range(3):
            random_image(image, 2 * BLOCK, seed=seed)
            publish(admin, first.address, image)
        with fleet.channel(first.address) as ch:
            stream = catalog_pb2_grpc.CatalogStub(ch).Watch(
                catalog_pb2.WatchRequest(layers=[LAYER]), timeout=30
            )
            head = [next(iter(stream)) for _ in range(2)]
            stream.cancel()
        first.kill()
        with fleet.channel(second.address) as ch:
            stub = catalog_pb2_grpc.CatalogStub(ch)
            stream = stub.Watch(catalog_pb2.WatchRequest(layers=[LAYER], after=head[-1].position), timeout=30)
            rest = []
            for event in stream:
                rest.append(event)
                if event.WhichOneof("event") == "version_committed" and event.version_committed.number == 3:
                    break
            stream.cancel()
        committed = [
            e.version_committed.number for e in head + rest if e.WhichOneof("event") == "version_committed"
        ]
        assert committed == [1, 2, 3]
        positions = [e.position for e in head + rest]
        assert positions == sorted(set(positions))

        # A position ahead of the shared log is refused, as on one coordinator.
        with fleet.channel(second.address) as ch:
            stream = catalog_pb2_grpc.CatalogStub(ch).Watch(catalog_pb2.WatchRequest(after=10**6), timeout=10)
            try:
                next(iter(stream))
                raise AssertionError("a position ahead of the log was accepted")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.OUT_OF_RANGE  # type: ignore[attr-defined]


def _backdate(blocks: Path, seconds: float) -> int:
    """Age every block file (what an hour of wall time would do), so a GC may sweep the unreferenced."""
    then = time.time() - seconds
    count = 0
    for path in blocks.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))
            count += 1
    return count


@pytest.mark.parametrize("backend", ["postgresql", "embedded"])
def test_gc_on_one_replica_while_another_receives_a_push_keeps_every_block_the_commit_names(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Embedded, one coordinator plays both parts; its memory of what it received stands in for the
    files' ages (a restart forgets it, as an hour would age the files)."""
    blocks = tmp_path / "blocks"
    config = tmp_path / "coordinator.toml"
    config.write_text("[retention.os]\nkeep_last = 1\n")
    with Fleet(tmp_path) as fleet:
        if backend == "postgresql":
            dsn = request.getfixturevalue("postgres_dsn")
            gc_side, push_side = start_replicas(fleet, dsn, blocks, 2, ["--config", str(config)])
        else:
            gc_side = fleet.coordinator(data=tmp_path / "embedded", extra=["--config", str(config)])
            push_side = gc_side
        admin = tmp_path / "admin"
        fleet.identity(admin, "publisher", "admin")
        image = tmp_path / "image"
        for seed in (1, 2):  # v1's blocks become garbage once retention deletes it
            random_image(image, 4 * BLOCK, seed=seed)
            publish(admin, gc_side.address, image)
        if backend == "postgresql":
            assert _backdate(blocks, 2 * 3600) > 0
        else:
            gc_side.stop()
            gc_side = push_side = fleet.coordinator(
                data=tmp_path / "embedded", name="restarted", extra=["--config", str(config)]
            )

        # A publisher's next version: its blocks reach one replica, its commit is not made yet.
        local = tmp_path / "local"
        random_image(image, 6 * BLOCK, seed=3)
        cli_json(local, "ingest", LAYER, image)
        with Store.open(local) as store:
            info = store.catalog.resolve(LAYER)
            raw = store.catalog.manifest_bytes(info.manifest_digest)
            ids = sorted(manifest_from_bytes(raw).block_ids())
            values = store.blocks.raw_many(ids)
        batch = blocks_pb2.BlockBatch(
            blocks=[stored_block_to_pb(d, v) for d, v in zip(ids, values, strict=True) if v is not None]
        )
        with fleet.channel(push_side.address, "publisher") as ch:
            pushed = blocks_pb2_grpc.BlockExchangeStub(ch).PushBlocks(iter([batch]), timeout=30)
        assert pushed.accepted == len(ids)

        # The retention GC runs on the other replica before that commit arrives.
        report = coordinator_cli("history", "gc", "--coordinator", gc_side.address, "--json").json()
        assert report["deleted"] == [f"{LAYER}@1"]
        assert report["blocks_removed"] >= 4, report  # v1's blocks went: the sweep did run

        with fleet.channel(push_side.address, "publisher") as ch:
            made = catalog_pb2_grpc.CatalogStub(ch).Commit(
                catalog_pb2.CommitRequest(
                    layer=LAYER,
                    manifest=catalog_pb2.ManifestBlob(digest=info.manifest_digest, manifest=raw),
                    author="publisher",
                    device="test",
                    commit_id=str(uuid.uuid4()),
                ),
                timeout=30,
            )
        assert made.number == 3
        # Every block it names is there: a node pulls the whole version from the GC's replica.
        cli_json(tmp_path / "node", "pull", f"{LAYER}@3", "--from", gc_side.address)
        exported = tmp_path / "exported"
        cli_json(tmp_path / "node", "export", f"{LAYER}@3", exported)
        assert exported.read_bytes() == image.read_bytes()


def _running_publish(store: Path, layer_image: Path, replicas: str) -> subprocess.Popen[str]:
    args = ["publish", LAYER, str(layer_image), "--coordinator", replicas, "--tag", "production", "--json"]
    tls.client_identity(store, args)
    return subprocess.Popen(
        [sys.executable, "-m", "cachepoint", *args],
        env=cli_env(store),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_replica_killed_mid_publish_and_mid_watch_loses_and_doubles_nothing(
    tmp_path: Path, postgres_dsn: str
) -> None:
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path) as fleet:
        replicas = start_replicas(fleet, postgres_dsn, blocks, 3)
        addresses = ",".join(r.address for r in replicas)
        admin = tmp_path / "admin"
        fleet.identity(admin, "publisher", "admin")
        image = tmp_path / "image"
        random_image(image, 4 * BLOCK, seed=1)
        assert publish(admin, addresses, image, "production")["version"] == 1
        node = fleet.cachepoint("n1", addresses)  # watches through the first replica
        fleet.wait_holds(node, 1)

        random_image(image, 96 * BLOCK, seed=2)
        before = sum(1 for p in blocks.rglob("*") if p.is_file())
        publishing = _running_publish(admin, image, addresses)
        try:
            wait_until(
                "the publish to be pushing blocks",
                lambda: (
                    sum(1 for p in blocks.rglob("*") if p.is_file()) > before + 8
                    or publishing.poll() is not None
                ),
                timeout=120,
                interval=0.02,
            )
            replicas[0].kill()  # SIGKILL: the publish's push and the daemon's Watch both lose it
            out, err = publishing.communicate(timeout=300)
        finally:
            if publishing.poll() is None:
                publishing.kill()
        assert publishing.returncode == 0, err
        assert json.loads(out)["version"] == 2
        for replica in replicas[1:]:
            assert [v.number for v in coordinator_versions(replica.address, LAYER)] == [1, 2]

        fleet.wait_holds(node, 2)  # the daemon resumed its Watch on another replica and pulled v2
        random_image(image, 4 * BLOCK, seed=3)
        assert publish(admin, addresses, image, "production")["version"] == 3
        fleet.wait_holds(node, 3)
        # Its heartbeats moved too (they notice the dead replica on their own schedule).
        wait_until(
            "the daemon's heartbeats to reach a live replica",
            lambda: node.status()["coordinator_connected"] or None,
            30,
            logs=fleet.logs,
        )
        log = node.cli_json("log", LAYER)
        assert sorted(v["version"] for v in log["versions"]) == [1, 2, 3], log


def _sweepers(address: str) -> list[str]:
    listed = coordinator_cli("history", "audit", "list", "--coordinator", address, "--json").json()
    return [r["actor"] for r in listed["records"] if r["action"] == "gc.sweep"]


def test_the_scheduled_gc_runs_on_one_replica_at_a_time_and_moves_on_when_that_one_dies(
    tmp_path: Path, postgres_dsn: str
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text('gc_every = "1s"\n')
    with Fleet(tmp_path) as fleet:
        replicas = start_replicas(fleet, postgres_dsn, tmp_path / "blocks", 2, ["--config", str(config)])
        survivor_address = replicas[1].address
        sweeps = wait_until(
            "three scheduled GC runs", lambda: len(s := _sweepers(survivor_address)) >= 3 and s, 60
        )
        assert len(set(sweeps)) == 1, sweeps  # both replicas tick every second; one holds the lease
        holder = next(r for r in replicas if r.address in sweeps[0])
        other = next(r for r in replicas if r is not holder)
        holder.kill()
        taken = wait_until(
            "another replica to take the GC lease",
            lambda: [a for a in _sweepers(other.address) if other.address in a],
            60,
        )
        assert taken
        assert all(holder.address in a or other.address in a for a in _sweepers(other.address))
