"""Fleet trust across coordinator replicas on one PostgreSQL catalog: a join token made once is spent
once at any replica, a revocation made once is refused by every replica, an assignment made once
holds at every replica. The admin commands write through the shared config (or --catalog).

The three tests with daemons share two replicas (each about its own principal), which saves their
starts: the suite's time is mostly process starts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, fleet_pb2, fleet_pb2_grpc, version_pb2
from coordinator.backends.records import PgStoreDB
from coordinator.backends.trust_tables import SharedTokens
from coordinator.history.audit import AuditLog
from coordinator.pki.audit_queue import ASSIGNED, REVOKED, TOKEN_ISSUED
from coordinator.pki.state import SharedAdmin
from coordinator.pki.tokens import TokenRecord, TokenRefused
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
from tests.postgres import PostgresServer
from tests.replicas import open_shared, shared_args

SPREAD_S = 15.0  # a bound on how long a change may take to reach every replica, not a speed claim
FOLLOW_BEYOND_S = 600.0


@dataclass
class Replicas:
    fleet: Fleet
    children: list[Child]
    dsn: str
    blocks: Path
    root: Path

    def config(self, name: str, replica: int) -> Path:
        """A replica's config: its data directory, the shared catalog and blocks."""
        path = self.root / f"{name}.toml"
        data = self.root / f"replica{replica}"
        path.write_text(f'data = "{data}"\ncatalog = "{self.dsn}"\nblocks = "{self.blocks.as_uri()}"\n')
        return path

    def audited(self, action: str, subject: str) -> list[str]:
        """The actors of the shared chain's records of ``action`` on ``subject`` (the chain verifies)."""
        store = open_shared(self.dsn, self.blocks, self.root / "reader")
        try:
            log = AuditLog(store.db)
            assert log.verify().ok
            return [r.actor for r in log.records(subject=subject) if r.action == action]
        finally:
            store.close()


@pytest.fixture(scope="module")
def replicas(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two replicas as on separate machines: the same ports, each on a loopback address of its own (so
    a token's enrollment-port hint, made at one, is right for the other)."""
    root = tmp_path_factory.mktemp("trust-replicas")
    dsn = postgres_server.create_database()
    try:
        with Fleet(root, tls_on=True) as fleet, pytest.MonkeyPatch.context() as env:
            # The replicas' periodic look at the trust tables is put beyond every wait of this module:
            # a change reaches them by its notification (trust_tables.TRUST_CHANNEL), or not in time.
            env.setenv("CACHEPOINT_TRUST_FOLLOW", str(FOLLOW_BEYOND_S))
            port = free_port()
            children = [
                fleet.coordinator(
                    data=root / f"replica{i}",
                    name=f"replica{i}",
                    listen=f"127.0.0.{i + 2}:{port}",
                    extra=shared_args(dsn, root / "blocks"),
                )
                for i in range(2)
            ]
            yield Replicas(fleet, children, dsn, root / "blocks", root)
    finally:
        postgres_server.drop_database(dsn.rsplit("/", 1)[1])


def test_of_eight_enrollments_racing_with_one_shared_token_at_two_replicas_exactly_one_wins(
    tmp_path: Path, postgres_dsn: str
) -> None:
    now = time.time()
    admin = SharedAdmin(postgres_dsn, tmp_path / "admin")
    admin.issue_token("h" * 64, TokenRecord("n1", "node", "", now + 60, now))
    admin.close()
    stores = [PgStoreDB(postgres_dsn, tmp_path / f"replica{i}") for i in range(2)]
    results: list[str] = []

    def spend(db: PgStoreDB) -> None:
        try:
            results.append(SharedTokens(db).spend("h" * 64).name)
        except TokenRefused as err:
            results.append(str(err))

    threads = [threading.Thread(target=spend, args=(stores[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for db in stores:
        db.close()
    assert results.count("n1") == 1, results
    assert all("already used" in r for r in results if r != "n1"), results


def test_a_token_made_through_the_shared_config_is_spent_at_another_replica_and_only_once(
    replicas: Replicas, tmp_path: Path
) -> None:
    a, b = replicas.children
    config = replicas.config("a", 0)
    made = coordinator_cli("--config", str(config), "enroll", "n1", "--site", "s1", "--json").json()
    token = str(made["token"])  # type: ignore[index]
    assert not (replicas.root / "replica0" / "ca" / "tokens").exists()  # in PostgreSQL, not A's files

    enrolled = cli_json(tmp_path / "n1", "enroll", "--coordinator", b.address, "--token", token)
    assert enrolled["roles"] == ["node"] and enrolled["site"] == "s1", enrolled
    assert "enrolled n1" in b.stderr()

    again = cachepoint_cli(
        tmp_path / "n1b", "enroll", "--coordinator", a.address, "--token", token, check=False
    )
    assert again.code != 0 and "PERMISSION_DENIED" in again.err and "already used" in again.err, again.err
    assert replicas.audited(TOKEN_ISSUED, "n1")


def _list_nodes(replica: Child, identity: Path) -> grpc.StatusCode:
    with tls.channel(replica.address, identity=identity) as ch:
        try:
            fleet_pb2_grpc.FleetStub(ch).ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_a_name_revoked_once_is_refused_by_every_replica(replicas: Replicas, tmp_path: Path) -> None:
    assert replicas.fleet.trust is not None
    node = replicas.fleet.trust.issue(tmp_path / "n2-id", "n2", ["node"])
    assert all(_list_nodes(r, node) == grpc.StatusCode.OK for r in replicas.children)

    started = time.monotonic()
    coordinator_cli("revoke", "n2", "--catalog", replicas.dsn)
    revoked = time.monotonic()
    waits = []
    for replica in replicas.children:
        wait_until(
            f"{replica.name} to refuse n2",
            lambda r=replica: _list_nodes(r, node) == grpc.StatusCode.PERMISSION_DENIED,
            SPREAD_S,
            interval=0.1,
            logs=replicas.fleet.logs,
        )
        waits.append(time.monotonic() - revoked)
    print(f"`revoke` took {revoked - started:.2f} s; every replica refused n2 {waits[-1]:.2f} s after")
    assert replicas.audited(REVOKED, "n2")


def _commit(replica: Child, identity: Path, manifest: catalog_pb2.ManifestBlob) -> grpc.StatusCode:
    with tls.channel(replica.address, identity=identity) as ch:
        try:
            catalog_pb2_grpc.CatalogStub(ch).Commit(
                catalog_pb2.CommitRequest(
                    layer="user/alice/home", manifest=manifest, author="n3", device="n3", message="home"
                ),
                timeout=30,
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_an_assignment_made_once_lets_the_node_commit_its_users_layer_through_every_replica(
    replicas: Replicas, tmp_path: Path
) -> None:
    assert replicas.fleet.trust is not None
    first = replicas.children[0]
    image = tmp_path / "image"
    random_image(image, 2 * BLOCK, seed=3)
    publish(tmp_path / "admin", first.address, image)
    with tls.channel(first.address) as ch:
        stub = catalog_pb2_grpc.CatalogStub(ch)
        info = stub.Resolve(
            catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer=LAYER, tag="latest")), timeout=10
        )
        digest = info.manifest_digest
        manifest = stub.GetManifest(catalog_pb2.GetManifestRequest(digest=digest), timeout=10)
    node = replicas.fleet.trust.issue(tmp_path / "n3-id", "n3", ["node"])
    assert _commit(replicas.children[1], node, manifest) == grpc.StatusCode.PERMISSION_DENIED

    config = replicas.config("b", 1)
    assigned = coordinator_cli("--config", str(config), "assign", "alice", "n3", "--json").json()
    assert assigned["changed"] is True, assigned  # type: ignore[index]
    assert not (replicas.root / "replica1" / "assignments.json").exists()
    for replica in replicas.children:
        wait_until(
            f"{replica.name} to let n3 commit user/alice/home",
            lambda r=replica: _commit(r, node, manifest) == grpc.StatusCode.OK,
            SPREAD_S,
            interval=0.2,
            logs=replicas.fleet.logs,
        )
    assert replicas.audited(ASSIGNED, "user/alice")
