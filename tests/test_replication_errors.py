"""Malformed requests to a real coordinator and a real cachepoint daemon get the status codes the
protos document, and neither server goes down: after every case a grpc.health.v1 Check still says
SERVING and the process is still running. The `cachepoint pull` command turns the same failures
into its documented exit codes.

The servers are started once for the module (they are only ever asked to refuse things, plus one
small published version to resolve against).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachepoint.model import EntryType, FileEntry, LayerKind, Manifest
from cachepoint.samples import generate
from cachepoint.v1 import (
    blocks_pb2,
    blocks_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    version_pb2,
)
from cachepoint.wire import manifest_digest, manifest_to_bytes
from tests.conftest import coordinator_catalog
from tests.fleet import LAYER, Child, Fleet, cachepoint_cli, free_port, publish

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

EXIT_NOT_FOUND, EXIT_UNREACHABLE = 3, 9
MiB = 1024 * 1024
DEADLINE = 30.0  # seconds; every call is bounded
MAX_MESSAGE = 64 * MiB  # documented in cachepoint/rpc/channel.py


@dataclass
class Servers:
    fleet: Fleet
    coordinator: Child
    cachepoint: Child
    channels: dict[str, grpc.Channel]
    root: Path

    def channel(self, which: str) -> grpc.Channel:
        return self.channels[which]

    def assert_serving(self) -> None:
        """Both servers answer a health check and are still the processes that were started."""
        for name, child in (("coordinator", self.coordinator), ("cachepoint", self.cachepoint)):
            assert child.running(), f"{name} exited:\n{self.fleet.logs()}"
            health = health_pb2_grpc.HealthStub(self.channels[name])
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, coordinator_backend: str
) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("errors")
    with coordinator_catalog(request, coordinator_backend, root), Fleet(root / "fleet") as fleet:
        coordinator = fleet.coordinator()
        # An offline daemon: it serves its (empty) store to peers and needs nothing else here.
        cachepoint = fleet.cachepoint("cp", None, subscribe=())
        image = root / "v1.img"
        generate(image, 8 * MiB, seed=61)
        publish(root / "admin", coordinator.address, image, "production")
        channels = {
            # With TLS: a publisher's identity (it pushes and commits os/ layers), at the peer port too.
            "coordinator": fleet.channel(coordinator.address, "publisher"),
            "cachepoint": fleet.channel(cachepoint.address, "publisher"),
        }
        try:
            yield Servers(fleet, coordinator, cachepoint, channels, root)
        finally:
            for ch in channels.values():
                ch.close()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Run ``call`` and return the RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


BOTH = pytest.mark.parametrize("which", ["coordinator", "cachepoint"])


def blocks(servers: Servers, which: str) -> blocks_pb2_grpc.BlockExchangeStub:
    return blocks_pb2_grpc.BlockExchangeStub(servers.channel(which))


def catalog(servers: Servers, which: str = "coordinator") -> catalog_pb2_grpc.CatalogStub:
    return catalog_pb2_grpc.CatalogStub(servers.channel(which))


def commit_request(layer: str, ids: list[bytes]) -> catalog_pb2.CommitRequest:
    raw = single_file_manifest(ids)
    return catalog_pb2.CommitRequest(
        layer=layer,
        kind=int(LayerKind.OS),
        manifest=catalog_pb2.ManifestBlob(digest=manifest_digest(raw), manifest=raw),
        author="test",
    )


def single_file_manifest(ids: list[bytes]) -> bytes:
    entry = FileEntry("disk.img", EntryType.FILE, 0o644, size=len(ids) * 65536, blocks=b"".join(ids))
    return manifest_to_bytes(Manifest(65536, True, (entry,)))


# -- BlockExchange ------------------------------------------------------------------------------------


@BOTH
def test_has_blocks_with_ids_not_a_multiple_of_32_bytes_is_invalid_argument(
    servers: Servers, which: str
) -> None:
    err = rpc_error(
        lambda: blocks(servers, which).HasBlocks(blocks_pb2.HasBlocksRequest(ids=b"x" * 33), timeout=DEADLINE)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "33 bytes" in err.details()
    servers.assert_serving()


@BOTH
def test_fetch_blocks_with_more_than_4096_ids_is_invalid_argument(servers: Servers, which: str) -> None:
    request = blocks_pb2.FetchBlocksRequest(ids=os.urandom(32) * 4097)
    err = rpc_error(lambda: list(blocks(servers, which).FetchBlocks(request, timeout=DEADLINE)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4097" in err.details() and "4096" in err.details()
    servers.assert_serving()


@BOTH
def test_a_message_over_64_mib_is_resource_exhausted(servers: Servers, which: str) -> None:
    # Well-formed ids, just too many bytes for one message: refused by size before any parsing.
    request = blocks_pb2.HasBlocksRequest(ids=bytes(MAX_MESSAGE + MiB))
    err = rpc_error(lambda: blocks(servers, which).HasBlocks(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Refused by the server on receipt (a client-side refusal would say "Sent message").
    assert "Received message larger than max" in err.details(), err.details()
    servers.assert_serving()


def test_a_pushed_block_whose_bytes_do_not_match_its_id_is_rejected_and_not_stored(servers: Servers) -> None:
    good_raw = os.urandom(4096)
    good_id = hashlib.sha256(good_raw).digest()
    bad_id = hashlib.sha256(os.urandom(4096)).digest()  # an id the pushed bytes do not hash to
    batch = blocks_pb2.BlockBatch(
        blocks=[
            blocks_pb2.StoredBlock(id=good_id, codec=0, raw_size=len(good_raw), payload=good_raw),
            blocks_pb2.StoredBlock(id=bad_id, codec=0, raw_size=4096, payload=os.urandom(4096)),
        ]
    )
    stub = blocks(servers, "coordinator")
    response = stub.PushBlocks(iter([batch]), timeout=DEADLINE)
    assert response.rejected == bad_id
    assert response.accepted == 1
    # A commit names only blocks the coordinator holds (HasBlocks answers, with TLS, only for blocks of
    # a version): one of the two is missing, and the good one alone makes a version.
    both = commit_request("os/pushed-both", [good_id, bad_id])
    err = rpc_error(lambda: catalog(servers).Commit(both, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert err.details().startswith("1 of the blocks"), "a block that failed verification was stored"
    catalog(servers).Commit(commit_request("os/pushed-good", [good_id]), timeout=DEADLINE)
    request = blocks_pb2.HasBlocksRequest(ids=good_id + bad_id, version="os/pushed-good@1")
    present = stub.HasBlocks(request, timeout=DEADLINE).present
    assert present[0] & 0b01, "the good block of the same push was not stored"
    assert not present[0] & 0b10, "a block that failed verification was stored"
    servers.assert_serving()


def test_push_blocks_to_a_cachepoint_is_permission_denied(servers: Servers) -> None:
    raw = os.urandom(1024)
    block = blocks_pb2.StoredBlock(id=hashlib.sha256(raw).digest(), codec=0, raw_size=len(raw), payload=raw)
    stub = blocks(servers, "cachepoint")
    err = rpc_error(lambda: stub.PushBlocks(iter([blocks_pb2.BlockBatch(blocks=[block])]), timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "coordinator" in err.details()
    present = stub.HasBlocks(blocks_pb2.HasBlocksRequest(ids=block.id), timeout=DEADLINE).present
    assert present == b"\x00"
    servers.assert_serving()


# -- Catalog -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        version_pb2.Ref(layer="os/nope", tag="production"),
        version_pb2.Ref(layer=LAYER, number=99),
        version_pb2.Ref(layer=LAYER, tag="nope"),
    ],
    ids=["layer", "version", "tag"],
)
def test_resolve_of_an_unknown_layer_version_or_tag_is_not_found(
    servers: Servers, ref: version_pb2.Ref
) -> None:
    err = rpc_error(lambda: catalog(servers).Resolve(catalog_pb2.ResolveRequest(ref=ref), timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert ref.layer in err.details()
    servers.assert_serving()


def test_resolve_at_a_cachepoint_of_a_layer_it_does_not_hold_is_not_found(servers: Servers) -> None:
    request = catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer=LAYER, tag="production"))
    err = rpc_error(lambda: catalog(servers, "cachepoint").Resolve(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    servers.assert_serving()


@BOTH
def test_resolve_with_a_malformed_layer_name_is_invalid_argument(servers: Servers, which: str) -> None:
    request = catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer="OS/../Bad Name", tag="production"))
    err = rpc_error(lambda: catalog(servers, which).Resolve(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "OS/../Bad Name" in err.details()
    servers.assert_serving()


def test_commit_naming_blocks_the_coordinator_lacks_is_failed_precondition_saying_how_many(
    servers: Servers,
) -> None:
    ids = [hashlib.sha256(os.urandom(64)).digest() for _ in range(3)]
    raw = single_file_manifest(ids)
    request = catalog_pb2.CommitRequest(
        layer="os/missing",
        kind=int(LayerKind.OS),
        manifest=catalog_pb2.ManifestBlob(digest=manifest_digest(raw), manifest=raw),
        author="test",
    )
    err = rpc_error(lambda: catalog(servers).Commit(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("3 of the blocks"), err.details()
    # Nothing was committed.
    unknown = catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer="os/missing", tag="latest"))
    assert (
        rpc_error(lambda: catalog(servers).Resolve(unknown, timeout=DEADLINE)).code()
        == grpc.StatusCode.NOT_FOUND
    )
    servers.assert_serving()


def test_commit_whose_manifest_does_not_match_its_digest_is_invalid_argument(servers: Servers) -> None:
    raw = single_file_manifest([hashlib.sha256(b"block").digest()])
    request = catalog_pb2.CommitRequest(
        layer="os/mismatch",
        kind=int(LayerKind.OS),
        manifest=catalog_pb2.ManifestBlob(digest=manifest_digest(raw + b"\x00"), manifest=raw),
        author="test",
    )
    err = rpc_error(lambda: catalog(servers).Commit(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "digest" in err.details()
    servers.assert_serving()


def test_watch_after_a_position_beyond_the_log_is_out_of_range(servers: Servers) -> None:
    stream = catalog(servers).Watch(catalog_pb2.WatchRequest(after=1_000_000), timeout=DEADLINE)
    err = rpc_error(lambda: next(stream))
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "1000000" in err.details()
    servers.assert_serving()


# -- Fleet -------------------------------------------------------------------------------------------


def test_heartbeat_from_an_unknown_node_is_not_found(servers: Servers) -> None:
    # With TLS a heartbeat comes from a node, here one of the fleet that never registered.
    with servers.fleet.channel(servers.coordinator.address, "node", name="nobody") as ch:
        stub = fleet_pb2_grpc.FleetStub(ch)
        err = rpc_error(
            lambda: stub.Heartbeat(fleet_pb2.HeartbeatRequest(node_id="nobody"), timeout=DEADLINE)
        )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody" in err.details()
    servers.assert_serving()


# -- the pull command --------------------------------------------------------------------------------


def test_pull_of_an_unknown_layer_exits_3_naming_it(servers: Servers, tmp_path: Path) -> None:
    run = cachepoint_cli(
        tmp_path / "store", "pull", "os/nope", "--from", servers.coordinator.address, check=False
    )
    assert run.code == EXIT_NOT_FOUND, run
    assert "os/nope" in run.err and "does not exist" in run.err, run.err
    servers.assert_serving()


def test_pull_from_an_address_where_nothing_listens_exits_9_naming_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    run = cachepoint_cli(tmp_path / "store", "pull", LAYER, "--from", address, check=False)
    assert run.code == EXIT_UNREACHABLE, run
    assert f"cannot reach {address}" in run.err, run.err
