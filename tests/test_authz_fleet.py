"""Authorization on the coordinator's mutual-TLS port, end to end: who may commit, tag, read history,
hold and release, and what BlockExchange tells a caller about blocks of versions it may not read.
Real coordinator and CLI processes, real certificates from the fleet's CA over loopback TLS."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachepoint.trust.principal import PEER_TLS_NAME
from cachepoint.v1 import (
    blocks_pb2,
    blocks_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
)
from tests.fleet import Child, Fleet, cachepoint_cli, coordinator_cli, random_image, stored_block_ids
from tests.test_trust_fleet import credentials, data_of, enroll, tls_coordinator, token

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MIB = 1024 * 1024
_seeds = list(range(1000, 1100))


def enrolled(fleet: Fleet, coordinator: Child, root: Path, name: str, *args: str) -> Path:
    """A store whose identity (STORE/identity) the fleet's CA issued to ``name``."""
    store = root / name
    enroll(store, coordinator, token(fleet, name, *args))
    return store


def publish_as(
    store: Path, coordinator: Child, layer: str, image: Path, check: bool = True, fresh: bool = True
) -> Any:
    """Publish from ``store`` as ``layer``: ``image``, or with ``fresh`` an image made next to it with
    other contents (so that no publish is skipped as unchanged)."""
    if fresh:
        image = image.with_name(f"{image.stem}-{_seeds.pop()}.img")
        random_image(image, MIB, seed=len(_seeds))
    return cachepoint_cli(
        store, "publish", layer, image, "--coordinator", coordinator.address, "--json", check=check
    )


def assign(fleet: Fleet, user: str, node: str) -> None:
    coordinator_cli("assign", user, node, "--data", str(data_of(fleet)))


def stub(coordinator: Child, identity: Path, kind: Any) -> Any:
    channel = grpc.secure_channel(coordinator.address, credentials(identity))
    return kind(channel), channel


def commit_refusal(coordinator: Child, store: Path, layer: str) -> str:
    """The refusal of a Commit of ``layer`` sent with the identity of ``store`` (the rule decides
    before the manifest is looked at: none is sent)."""
    catalog, channel = stub(coordinator, store / "identity", catalog_pb2_grpc.CatalogStub)
    with channel, pytest.raises(grpc.RpcError) as refused:
        catalog.Commit(catalog_pb2.CommitRequest(layer=layer, author="root"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
    return str(refused.value.details())


def audit_records(coordinator: Child, auditor: Path) -> list[history_pb2.AuditRecord]:
    history, channel = stub(coordinator, auditor / "identity", history_pb2_grpc.HistoryStub)
    with channel:
        return list(history.ListAudit(history_pb2.ListAuditRequest(), timeout=10).records)


def test_a_publisher_commits_os_layers_and_a_node_only_user_layers_of_users_assigned_to_it(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    random_image(image, MIB, seed=3)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        publisher = enrolled(fleet, coordinator, tmp_path, "release-bot", "--role", "publisher")
        node = enrolled(fleet, coordinator, tmp_path, "n1")
        auditor = enrolled(fleet, coordinator, tmp_path, "audrey", "--role", "auditor")

        assert publish_as(publisher, coordinator, "os/base", image, fresh=False).json()["version"] == 1
        # A new version is pushed as what changed since the layer's latest: HasBlocks names that
        # version, which the publisher may read, so the coordinator tells it which blocks it has.
        with open(image, "r+b") as f:
            f.write(os.urandom(4096))
        second = publish_as(publisher, coordinator, "os/base", image, fresh=False).json()
        assert (second["version"], second["blocks_sent"]) == (2, 1), second
        refused = publish_as(node, coordinator, "os/base", image, check=False)
        assert refused.code != 0
        assert "'n1' may not call /cachepoint.v1.Catalog/Commit: rule commit" in refused.err, refused.err

        # Unassigned users' layers: the node may not even resolve them (nor learn whether they exist),
        # and a commit naming one is refused by the commit rule.
        for user in ("bob", "alice"):
            refused = publish_as(node, coordinator, f"user/{user}/home", image, check=False)
            assert refused.code != 0 and "'n1' may not call" in refused.err, refused.err
            assert f"may not read user/{user}/home" in refused.err, refused.err
        assert "user 'bob'" in commit_refusal(coordinator, node, "user/bob/home")
        assign(fleet, "alice", "n1")
        assert publish_as(node, coordinator, "user/alice/home", image).json()["version"] == 1
        refused = publish_as(node, coordinator, "user/bob/home", image, check=False)
        assert refused.code != 0 and "may not read user/bob/home" in refused.err, refused.err

        # The refused commits are in the audit log, under the name in the node's certificate.
        denied = [r for r in audit_records(coordinator, auditor) if r.action == "access.denied"]
        assert [r.actor for r in denied] == ["n1", "n1"], denied
        assert {r.subject for r in denied} == {"cachepoint.v1.Catalog/Commit"}
        assert all(json.loads(r.details_json)["rule"] == "commit" for r in denied)

        # The assignment is shown by `fleet` (the node registers when its daemon runs).
        fleet.cachepoint("n1", coordinator.address, store=node)
        out = coordinator_cli(
            "--identity", str(auditor / "identity"), "fleet", "--coordinator", coordinator.address, "--json"
        )
        nodes = {n["node_id"]: n for n in out.json()["nodes"]}  # type: ignore[index]
        assert nodes["n1"]["users"] == ["alice"], nodes


def test_a_users_certificate_reads_its_own_timeline_and_not_another_users(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, MIB, seed=4)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        node = enrolled(fleet, coordinator, tmp_path, "n1")
        assign(fleet, "alice", "n1")
        assign(fleet, "bob", "n1")
        publish_as(node, coordinator, "user/alice/home", image)
        publish_as(node, coordinator, "user/bob/home", image)
        alice = enrolled(fleet, coordinator, tmp_path, "alice", "--role", "user:alice")

        history, channel = stub(coordinator, alice / "identity", history_pb2_grpc.HistoryStub)
        with channel:
            own = history.Timeline(history_pb2.TimelineRequest(user="alice"), timeout=10)
            assert [e.version.layer for e in own.entries] == ["user/alice/home"]
            with pytest.raises(grpc.RpcError) as refused:
                history.Timeline(history_pb2.TimelineRequest(user="bob"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'alice' may not call /cachepoint.v1.History/Timeline: rule own-history" in str(
            refused.value.details()
        )


def test_a_hold_is_released_only_by_an_auditor_other_than_the_one_who_set_it(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, MIB, seed=5)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        node = enrolled(fleet, coordinator, tmp_path, "n1")
        assign(fleet, "bob", "n1")
        publish_as(node, coordinator, "user/bob/home", image)
        first = enrolled(fleet, coordinator, tmp_path, "audrey", "--role", "auditor")
        second = enrolled(fleet, coordinator, tmp_path, "otto", "--role", "auditor")

        history, channel = stub(coordinator, first / "identity", history_pb2_grpc.HistoryStub)
        with channel:
            # The request claims another actor: the audit log names the certificate's principal.
            hold = history.SetHold(
                history_pb2.HoldRequest(user="bob", reason="case 7", actor="somebody-else"), timeout=10
            )
            assert hold.actor == "audrey", hold
            with pytest.raises(grpc.RpcError) as refused:
                history.ReleaseHold(history_pb2.ReleaseRequest(user="bob", actor="otto"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "rule release" in str(refused.value.details()) and "another auditor" in str(
            refused.value.details()
        )

        history, channel = stub(coordinator, second / "identity", history_pb2_grpc.HistoryStub)
        with channel:
            released = history.ReleaseHold(history_pb2.ReleaseRequest(user="bob", actor="x"), timeout=10)
            assert released.actor == "audrey"
            assert not history.ListHolds(history_pb2.ListHoldsRequest(), timeout=10).holds

        records = audit_records(coordinator, second)
        holds = [r for r in records if r.subject == "user/bob" and r.action.startswith("hold.")]
        about_bob = [(r.action, r.actor) for r in holds]
        assert about_bob == [("hold.set", "audrey"), ("hold.release", "otto")], about_bob
        release = next(r for r in records if r.action == "hold.release")
        assert json.loads(release.details_json)["held_by"] == "audrey"
        denied = [r for r in records if r.action == "access.denied"]
        assert [(r.actor, r.subject) for r in denied] == [("audrey", "cachepoint.v1.History/ReleaseHold")]


def _visible_layers(coordinator: Child, identity: Path) -> set[str]:
    """Layers ListLayers names, checked against the layers of every Watch event up to bob's commit."""
    catalog, channel = stub(coordinator, identity, catalog_pb2_grpc.CatalogStub)
    with channel:
        listed = {
            summary.name for summary in catalog.ListLayers(catalog_pb2.ListLayersRequest(), timeout=10).layers
        }
        watched: set[str] = set()
        with pytest.raises(grpc.RpcError) as ended:  # the stream stays open: read what the deadline allows
            for event in catalog.Watch(catalog_pb2.WatchRequest(after=0), timeout=3):
                watched.add(getattr(event, event.WhichOneof("event")).layer)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert watched == listed, (watched, listed)
    return listed


def _answers(
    server: Child | str, identity: Path, block: bytes, version: str, as_peer: bool = False
) -> tuple[bytes, list[bytes]]:
    """(HasBlocks' bitmap, the ids FetchBlocks returned) for one id, asked naming ``version``, of the
    coordinator or (``as_peer``) of a node's peer port at that address."""
    address = server if isinstance(server, str) else server.address
    options = [("grpc.ssl_target_name_override", PEER_TLS_NAME)] if as_peer else []
    channel = grpc.secure_channel(address, credentials(identity), options=options)
    blocks = blocks_pb2_grpc.BlockExchangeStub(channel)
    with channel:
        has = blocks.HasBlocks(blocks_pb2.HasBlocksRequest(ids=block, version=version), timeout=10)
        fetched = [
            b.id
            for batch in blocks.FetchBlocks(
                blocks_pb2.FetchBlocksRequest(ids=block, version=version), timeout=10
            )
            for b in batch.blocks
        ]
    return has.present, fetched


def test_block_exchange_answers_about_a_block_only_bobs_versions_reference_as_about_a_random_id(
    tmp_path: Path,
) -> None:
    alice_image, bob_image = tmp_path / "alice.img", tmp_path / "bob.img"
    random_image(alice_image, MIB, seed=6)
    random_image(bob_image, MIB, seed=7)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        alices_node = enrolled(fleet, coordinator, tmp_path, "n-alice")
        bobs_node = enrolled(fleet, coordinator, tmp_path, "n-bob")
        assign(fleet, "alice", "n-alice")
        assign(fleet, "bob", "n-bob")
        publish_as(alices_node, coordinator, "user/alice/home", alice_image, fresh=False)
        publish_as(bobs_node, coordinator, "user/bob/home", bob_image, fresh=False)
        bobs_block = sorted(stored_block_ids(bob_image) - stored_block_ids(alice_image))[0]
        alices_block = sorted(stored_block_ids(alice_image))[0]
        random_id = os.urandom(32)

        # The block is there: bob's node, naming bob's version, is told so and gets it.
        assert _answers(coordinator, bobs_node / "identity", bobs_block, "user/bob/home@1") == (
            b"\x01",
            [bobs_block],
        )
        # Alice's node learns nothing about it, whichever version it names: as for a random id.
        alice = alices_node / "identity"
        for version in ("user/bob/home@1", "user/alice/home@1", "", "user/nobody/x@9"):
            assert _answers(coordinator, alice, bobs_block, version) == (b"\x00", []), version
            assert _answers(coordinator, alice, random_id, version) == (b"\x00", []), version
        # Its own blocks it is told about.
        assert _answers(coordinator, alice, alices_block, "user/alice/home@1") == (b"\x01", [alices_block])
        # Bob's node's peer port says no more to it than the coordinator; bob himself it answers.
        peer = fleet.cachepoint("n-bob", coordinator.address, store=bobs_node, subscribe=()).address
        bob = enrolled(fleet, coordinator, tmp_path, "bob", "--role", "user:bob") / "identity"
        assert _answers(peer, bob, bobs_block, "user/bob/home@1", as_peer=True) == (b"\x01", [bobs_block])
        for version in ("user/bob/home@1", "user/alice/home@1", ""):
            assert _answers(peer, alice, bobs_block, version, as_peer=True) == (b"\x00", []), version
            assert _answers(peer, alice, random_id, version, as_peer=True) == (b"\x00", []), version
        # Nor do listings name bob's layer to it (a Watch would hand out his manifests' digests).
        assert _visible_layers(coordinator, alice) == {"user/alice/home"}
        assert _visible_layers(coordinator, bobs_node / "identity") == {"user/bob/home"}
