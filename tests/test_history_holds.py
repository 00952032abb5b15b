"""Legal holds and the coordinator's retention GC over real processes: a held user's versions survive a
GC that would otherwise delete them; after release, GC deletes them and the blocks only they used,
keeps the blocks a remaining version shares, audits one record per deleted version and tells Watch
clients."""

from __future__ import annotations

import hashlib
import random

import pytest

from cachepoint.ids import pack_ids
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, catalog_pb2, catalog_pb2_grpc
from coordinator.history.times import iso
from tests import tls
from tests.fleet import BLOCK, Fleet, wait_until
from tests.history import HOME, USER, history, history_json, make_version, sha256_text, wait_delivered

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)


def block_ids(data: bytes) -> set[bytes]:
    """The ids of the blocks ``data`` is cut into (random data: no holes)."""
    return {hashlib.sha256(data[i : i + BLOCK]).digest() for i in range(0, len(data), BLOCK)}


def present(address: str, ids: set[bytes], versions: list[str]) -> set[bytes]:
    """Which of ``ids`` the coordinator holds (BlockExchange.HasBlocks), asked for each of ``versions``:
    with TLS it answers only for blocks of the version a request names (so a block of no version
    left is "missing" whether or not it is still stored; the plaintext run sees the store itself)."""
    ordered = sorted(ids)
    found: set[bytes] = set()
    with tls.channel(address) as ch:
        for version in versions:
            answer = blocks_pb2_grpc.BlockExchangeStub(ch).HasBlocks(
                blocks_pb2.HasBlocksRequest(ids=pack_ids(ordered), version=version), timeout=10
            )
            bits = answer.present
            found |= {d for i, d in enumerate(ordered) if bits[i // 8] >> (i % 8) & 1}
    return found


def deletion_events(address: str, wanted: int) -> list[str]:
    """Refs named by version_deleted events, read from the start of the catalog log."""
    found: list[str] = []
    with tls.channel(address) as ch:
        stream = catalog_pb2_grpc.CatalogStub(ch).Watch(catalog_pb2.WatchRequest(after=0), timeout=10)
        for event in stream:
            if event.WhichOneof("event") == "version_deleted":
                found.append(f"{event.version_deleted.layer}@{event.version_deleted.number}")
                if len(found) == wanted:
                    stream.cancel()
                    break
    return found


def test_a_hold_outlasts_the_policy_and_after_release_gc_deletes_the_versions_and_their_blocks(tmp_path):
    config = tmp_path / "coordinator.toml"
    # Blocks received within block_grace are never swept (a commit may be about to name them): here,
    # the versions' blocks may go at once.
    config.write_text('block_grace = "0s"\n[retention.user]\nkeep_last = 1\n')
    home = tmp_path / "home"
    home.mkdir()
    shared = random.Random(0).randbytes(2 * BLOCK)  # in every version: its blocks must survive
    uniques = [random.Random(n + 1).randbytes(3 * BLOCK) for n in range(3)]
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(extra=["--config", str(config)])
        address = coordinator.address
        desk = fleet.cachepoint("desk", address, subscribe=())
        for n, unique in enumerate(uniques, 1):
            (home / "shared.bin").write_bytes(shared)
            (home / "mine.bin").write_bytes(unique)
            make_version(desk, home, f"version {n}")
        wait_delivered(desk)
        versions = history_json(address, "timeline", USER)["versions"]
        refs = [v["ref"] for v in versions]
        assert refs == [f"{HOME}@{n}" for n in (1, 2, 3)]
        old_blocks = block_ids(uniques[0]) | block_ids(uniques[1])
        kept_blocks = block_ids(uniques[2]) | block_ids(shared)

        hold = history_json(address, "hold", USER, "--reason", "litigation 7", "--actor", "counsel")
        assert (hold["user"], hold["actor"], hold["reason"]) == (USER, "counsel", "litigation 7")
        listed = history_json(address, "holds")["holds"]
        assert [(h["user"], h["actor"], h["reason"]) for h in listed] == [(USER, "counsel", "litigation 7")]
        assert listed[0]["set_ns"] == hold["set_ns"]

        dry = history_json(address, "gc", "--dry-run")
        assert dry["deleted"] == [] and dry["held"] == refs[:2]
        held_gc = history_json(address, "gc", "--actor", "ops")
        assert held_gc["deleted"] == [] and held_gc["held"] == refs[:2] and held_gc["blocks_removed"] == 0
        assert [v["ref"] for v in history_json(address, "timeline", USER)["versions"]] == refs
        assert present(address, old_blocks | kept_blocks, refs) == old_blocks | kept_blocks
        got = tmp_path / "got.bin"
        first = history_json(address, "get", USER, "mine.bin", "--at", versions[0]["created"], "-o", got)
        assert got.read_bytes() == uniques[0], "a held version is still whole"
        assert first["sha256"] == sha256_text(uniques[0])

        # Released by another than the one who set it: with TLS, an auditor may not release their own.
        released = history_json(address, "release", USER, "--actor", "judge")
        assert released["released"]["reason"] == "litigation 7"
        assert history_json(address, "holds")["holds"] == []
        report = history_json(address, "gc", "--actor", "ops")
        assert report["deleted"] == refs[:2] and report["held"] == []
        assert report["blocks_removed"] == len(old_blocks) and report["bytes_freed"] > 0
        assert present(address, old_blocks, refs) == set(), "blocks only the deleted versions used are gone"
        assert present(address, kept_blocks, refs) == kept_blocks, "blocks the remaining version uses stay"
        assert [v["ref"] for v in history_json(address, "timeline", USER)["versions"]] == refs[2:]
        gone = history(address, "get", USER, "mine.bin", "--at", iso(versions[1]["created_ns"]), check=False)
        assert gone.code == 3, gone.err
        history_json(address, "get", USER, "mine.bin", "-o", got, "--force")  # over the earlier one
        assert got.read_bytes() == uniques[2]
        assert history_json(address, "gc")["deleted"] == [], "the latest version always survives"

        records = history_json(address, "audit", "list", "--subject", f"user/{USER}")["records"]
        actions = [(r["action"], r["subject"], r["actor"]) for r in records if r["action"] != "restore.file"]
        assert actions == [
            ("hold.set", f"user/{USER}", "counsel"),
            ("hold.release", f"user/{USER}", "judge"),
            ("retention.delete", refs[0], "ops"),
            ("retention.delete", refs[1], "ops"),
        ]
        assert deletion_events(address, 2) == refs[:2]
        assert history_json(address, "audit", "verify")["ok"]


def test_gc_every_runs_the_retention_gc_on_its_own_and_audits_it(tmp_path):
    config = tmp_path / "coordinator.toml"
    config.write_text('gc_every = "1s"\n[retention.user]\nkeep_last = 1\n')
    home = tmp_path / "home"
    home.mkdir()
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(extra=["--config", str(config)])
        address = coordinator.address
        desk = fleet.cachepoint("desk", address, subscribe=())
        for n in (1, 2):
            (home / "notes.txt").write_text(f"version {n}")
            make_version(desk, home, f"version {n}")
        wait_delivered(desk)

        def only_the_latest() -> list[str] | None:
            refs = [v["ref"] for v in history_json(address, "timeline", USER)["versions"]]
            return refs if refs == [f"{HOME}@2"] else None

        wait_until("the scheduled gc to delete the older version", only_the_latest, 60)
        records = history_json(address, "audit", "list", "--subject", f"{HOME}@1")["records"]
        audited = [(r["action"], r["actor"]) for r in records]
        # (With replicas the actor also names the replica that held the GC lease.)
        assert [(action, actor.split(" on ")[0]) for action, actor in audited] == [
            ("retention.delete", "coordinator (gc_every)")
        ]
