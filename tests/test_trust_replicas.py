"""Fleet trust across coordinator replicas on one PostgreSQL catalog: a join token made once is spent
once at any replica, a revocation made once is refused by every replica, an assignment made once
holds at every replica. The admin commands write through the shared config (or --catalog)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, fleet_pb2, fleet_pb2_grpc, version_pb2
from coordinator.history.audit import AuditLog
from coordinator.pki.audit_queue import ASSIGNED, REVOKED, TOKEN_ISSUED
from tests import tls
from tests.fleet import (
    BLOCK,
    LAYER,
    Child,
    Fleet,
    cachepoint_cli,
    cli_json,
    coordinator_cli,
    free_port,
    publish,
    random_image,
    wait_until,
)
from tests.replicas import open_shared, shared_args

SPREAD_S = 15.0  # a bound on how long a change may take to reach every replica, not a speed claim


def _replicas(fleet: Fleet, dsn: str, blocks: Path, count: int = 2) -> list[Child]:
    """Replicas as on separate machines: the same ports, each on a loopback address of its own (so a
    token's enrollment-port hint, made at one, is right for the others)."""
    port = free_port()
    return [
        fleet.coordinator(
            data=fleet.root / f"replica{i}",
            name=f"replica{i}",
            listen=f"127.0.0.{i + 2}:{port}",
            extra=shared_args(dsn, blocks),
        )
        for i in range(count)
    ]


def _config(path: Path, data: Path, dsn: str, blocks: Path) -> Path:
    path.write_text(f'data = "{data}"\ncatalog = "{dsn}"\nblocks = "{blocks.as_uri()}"\n')
    return path


def _audited(dsn: str, blocks: Path, root: Path, action: str, subject: str) -> list[str]:
    """The actors of the shared audit chain's records of ``action`` on ``subject`` (the chain verifies)."""
    store = open_shared(dsn, blocks, root / "reader")
    try:
        log = AuditLog(store.db)
        assert log.verify().ok
        return [r.actor for r in log.records(subject=subject) if r.action == action]
    finally:
        store.close()


def test_a_token_made_through_the_shared_config_is_spent_at_another_replica_and_only_once(
    tmp_path: Path, postgres_dsn: str
) -> None:
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path, tls_on=True) as fleet:
        a, b = _replicas(fleet, postgres_dsn, blocks)
        config = _config(tmp_path / "a.toml", tmp_path / "replica0", postgres_dsn, blocks)
        made = coordinator_cli("--config", str(config), "enroll", "n1", "--site", "s1", "--json").json()
        token = str(made["token"])  # type: ignore[index]
        assert not (tmp_path / "replica0" / "ca" / "tokens").exists()  # in PostgreSQL, not A's files

        enrolled = cli_json(tmp_path / "n1", "enroll", "--coordinator", b.address, "--token", token)
        assert enrolled["roles"] == ["node"] and enrolled["site"] == "s1", enrolled
        assert "enrolled n1" in b.stderr()

        again = cachepoint_cli(
            tmp_path / "n1b", "enroll", "--coordinator", a.address, "--token", token, check=False
        )
        assert again.code != 0 and "PERMISSION_DENIED" in again.err and "already used" in again.err, again.err
        assert _audited(postgres_dsn, blocks, tmp_path, TOKEN_ISSUED, "n1")


def _list_nodes(fleet: Fleet, replica: Child, identity: Path) -> grpc.StatusCode:
    with tls.channel(replica.address, identity=identity) as ch:
        try:
            fleet_pb2_grpc.FleetStub(ch).ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_a_name_revoked_once_is_refused_by_every_replica(tmp_path: Path, postgres_dsn: str) -> None:
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path, tls_on=True) as fleet:
        replicas = _replicas(fleet, postgres_dsn, blocks)
        assert fleet.trust is not None
        node = fleet.trust.issue(tmp_path / "n1-id", "n1", ["node"])
        assert all(_list_nodes(fleet, r, node) == grpc.StatusCode.OK for r in replicas)

        started = time.monotonic()
        coordinator_cli("revoke", "n1", "--catalog", postgres_dsn)
        revoked = time.monotonic()
        waits = []
        for replica in replicas:
            wait_until(
                f"{replica.name} to refuse n1",
                lambda r=replica: _list_nodes(fleet, r, node) == grpc.StatusCode.PERMISSION_DENIED,
                SPREAD_S,
                interval=0.1,
                logs=fleet.logs,
            )
            waits.append(time.monotonic() - revoked)
        print(f"`revoke` took {revoked - started:.2f} s; every replica refused n1 {waits[-1]:.2f} s after")
        assert _audited(postgres_dsn, blocks, tmp_path, REVOKED, "n1")


def _commit(
    fleet: Fleet, replica: Child, identity: Path, manifest: catalog_pb2.ManifestBlob
) -> grpc.StatusCode:
    with tls.channel(replica.address, identity=identity) as ch:
        try:
            catalog_pb2_grpc.CatalogStub(ch).Commit(
                catalog_pb2.CommitRequest(
                    layer="user/alice/home", manifest=manifest, author="n1", device="n1", message="home"
                ),
                timeout=30,
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_an_assignment_made_once_lets_the_node_commit_its_users_layer_through_every_replica(
    tmp_path: Path, postgres_dsn: str
) -> None:
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path, tls_on=True) as fleet:
        replicas = _replicas(fleet, postgres_dsn, blocks)
        assert fleet.trust is not None
        image = tmp_path / "image"
        random_image(image, 2 * BLOCK, seed=3)
        publish(tmp_path / "admin", replicas[0].address, image)
        with fleet.channel(replicas[0].address) as ch:
            stub = catalog_pb2_grpc.CatalogStub(ch)
            info = stub.Resolve(
                catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer=LAYER, tag="latest")), timeout=10
            )
            digest = info.manifest_digest
            manifest = stub.GetManifest(catalog_pb2.GetManifestRequest(digest=digest), timeout=10)
        node = fleet.trust.issue(tmp_path / "n1-id", "n1", ["node"])
        assert _commit(fleet, replicas[1], node, manifest) == grpc.StatusCode.PERMISSION_DENIED

        config = _config(tmp_path / "b.toml", tmp_path / "replica1", postgres_dsn, blocks)
        assigned = coordinator_cli("--config", str(config), "assign", "alice", "n1", "--json").json()
        assert assigned["changed"] is True, assigned  # type: ignore[index]
        assert not (tmp_path / "replica1" / "assignments.json").exists()
        for replica in replicas:
            wait_until(
                f"{replica.name} to let n1 commit user/alice/home",
                lambda r=replica: _commit(fleet, r, node, manifest) == grpc.StatusCode.OK,
                SPREAD_S,
                interval=0.2,
                logs=fleet.logs,
            )
        assert _audited(postgres_dsn, blocks, tmp_path, ASSIGNED, "user/alice")
