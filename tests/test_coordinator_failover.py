"""Client failover across the coordinator's replicas (`--coordinator a:P,b:P`, cachepoint/rpc/replicas.py).

Today's coordinator keeps its state in one embedded store, so two live replicas would not share it.
The tests stand in for replicas with what is real: a closed loopback port as a replica that is down,
the same data directory served again on another port after a SIGKILL, and, for a commit whose reply
is lost, a gRPC relay that passes every call to the coordinator and then drops the Commit's answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import grpc
import pytest
from click.testing import CliRunner

from cachepoint.cli import cli as cachepoint_cli
from cachepoint.config import load_settings
from cachepoint.errors import EXIT_INVALID
from cachepoint.rpc import replicas
from cachepoint.samples import generate
from coordinator.cli import cli as coordinator_cli
from tests.fleet import (
    LAYER,
    PRODUCTION,
    Fleet,
    cli_json,
    coordinator_versions,
    fleet_nodes,
    free_port,
    publish,
    wait_until,
)

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

IMAGE_SIZE = 2 * 1024 * 1024


def dead_address() -> str:
    """A loopback port nothing listens on: a replica that is down (connections are refused)."""
    return f"127.0.0.1:{free_port()}"


def image(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"v{seed}.img"
    generate(path, IMAGE_SIZE, seed=seed)
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path / "fleet") as running:
        yield running


def test_with_a_dead_first_replica_publish_pull_status_and_the_daemon_use_the_live_one(
    fleet: Fleet, tmp_path: Path
) -> None:
    coordinator = fleet.coordinator()
    replicas = f"{dead_address()},{coordinator.address}"
    node = fleet.cachepoint("n1", replicas)

    published = publish(tmp_path / "admin", replicas, image(tmp_path / "images", 1), "production")
    assert published["version"] == 1

    # The daemon registered, follows the Watch stream and pulled from the live replica.
    status = fleet.wait_holds(node, 1)
    assert status["coordinator"] == replicas and status["coordinator_connected"]
    assert "n1" in fleet_nodes(replicas)  # `cachepoint-coordinator fleet` fails over too

    # A pull that takes the replicas from the config file, as a TOML list.
    puller = tmp_path / "pulling" / "puller"
    config = tmp_path / "pulling" / "xdg-config" / "cachepoint" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'coordinator = ["{dead_address()}", "{coordinator.address}"]\n')
    fleet.identity(puller)
    pulled = cli_json(puller, "pull", PRODUCTION)
    assert pulled["ref"] == f"{LAYER}@1", pulled
    origins = [s["address"] for s in pulled["sources"] if s["name"] == "origin"]  # type: ignore[index]
    assert origins == [coordinator.address], pulled


def test_a_daemon_whose_coordinator_is_killed_resumes_on_the_next_replica_and_nothing_doubles(
    fleet: Fleet, tmp_path: Path
) -> None:
    data = tmp_path / "coordinator-data"
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    replicas = f"{first},{second}"
    coordinator = fleet.coordinator(data=data, listen=first)
    node = fleet.cachepoint("n1", replicas)
    admin, images = tmp_path / "admin", tmp_path / "images"
    assert publish(admin, replicas, image(images, 1), "production")["version"] == 1
    fleet.wait_holds(node, 1)

    coordinator.kill()  # SIGKILL: no goodbye to the daemon's open Watch and heartbeat
    # The same state on another port: the RocksDB lock allows one process per data directory.
    replacement = fleet.coordinator(data=data, listen=second, name="coordinator-2")
    assert publish(admin, replicas, image(images, 2), "production")["version"] == 2

    fleet.wait_holds(node, 2)
    # The replica that is up knows nothing of n1 until n1 registers again, which its next heartbeat
    # does (told NOT_FOUND): a pull of a few blocks may finish first. The daemon's status can still
    # say connected then (its last heartbeat reached the replica that was killed): ask the replica.
    wait_until(
        "n1 to register at the replica that is up",
        lambda: ("n1" in fleet_nodes(replacement.address) and node.status()["coordinator_connected"]) or None,
        30,
        logs=fleet.logs,
    )
    assert [v.number for v in coordinator_versions(replacement.address, LAYER)] == [1, 2]


class LostReply(grpc.GenericRpcHandler):
    """A replica in front of the coordinator: every call is passed on as it is, but the answer to a
    Commit is lost on the way back (the caller sees UNAVAILABLE after the version was made)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = grpc.insecure_channel(upstream)
        self.commits = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method.endswith("/PushBlocks"):
            push = self.upstream.stream_unary(method)
            return grpc.stream_unary_rpc_method_handler(lambda batches, _: push(batches, timeout=60))
        forward: Callable[..., Any] = self.upstream.unary_unary(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            reply = forward(request, timeout=60)
            if method.endswith("/Commit"):
                self.commits += 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "the reply was lost on the way back")
            return bytes(reply)

        return grpc.unary_unary_rpc_method_handler(handle)


def test_a_publish_whose_commit_reply_was_lost_retries_on_the_next_replica_without_a_second_version(
    tmp_path: Path,
) -> None:
    # Plaintext: the relay passes bytes on, and a TLS coordinator would see the relay, not the client.
    with Fleet(tmp_path / "fleet", tls_on=False) as fleet:
        coordinator = fleet.coordinator()
        relay = LostReply(coordinator.address)
        server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[relay])
        address = fleet.add_port(server, "relay")
        server.start()
        try:
            replicas = f"{address},{coordinator.address}"
            # --allow-same: the retry must not be saved by the check for unchanged content.
            published = cli_json(
                tmp_path / "admin",
                "publish",
                LAYER,
                image(tmp_path / "images", 1),
                "--coordinator",
                replicas,
                "--allow-same",
            )
        finally:
            server.stop(grace=None)
            relay.upstream.close()
        assert relay.commits == 1  # the first attempt made the version
        assert published["version"] == 1
        assert [v.number for v in coordinator_versions(coordinator.address, LAYER)] == [1]


def test_calls_start_at_the_replica_that_answered_last_and_go_round_the_list() -> None:
    spec = "127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3"
    replicas._sticky.clear()  # this process may have run the test before (once per coordinator backend)
    assert replicas.order(spec) == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    replicas.answered(spec, "127.0.0.1:2")
    assert replicas.order(spec) == ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]
    assert replicas.order(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])[0] == "127.0.0.1:2"


def test_the_config_takes_the_replicas_as_a_list_or_a_string_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('coordinator = ["a.example:7400", "b.example:7400"]\n')
    monkeypatch.delenv("CACHEPOINT_COORDINATOR", raising=False)
    assert load_settings(str(config), str(tmp_path)).coordinator == "a.example:7400,b.example:7400"
    monkeypatch.setenv("CACHEPOINT_COORDINATOR", "c.example:7400,d.example:7400")
    assert load_settings(str(config), str(tmp_path)).coordinator == "c.example:7400,d.example:7400"


@pytest.mark.parametrize("program", [cachepoint_cli, coordinator_cli], ids=["cachepoint", "coordinator"])
def test_check_config_takes_the_replicas_as_a_list_or_a_string_and_names_a_bad_one(
    program: click.Command, tmp_path: Path
) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    for config, text in (
        (good, 'coordinator = ["a.example:7400", "b.example:7400"]\n'),
        (bad, 'coordinator = "a.example:7400,nowhere"\n'),
    ):
        config.write_text(text)
    assert CliRunner().invoke(program, ["check-config", str(good)]).exit_code == 0
    refused = CliRunner().invoke(program, ["check-config", str(bad)])
    assert refused.exit_code == EXIT_INVALID
    assert "coordinator: address 'nowhere' must look like HOST:PORT" in refused.output, refused.output
    (good.with_suffix(".str.toml")).write_text('coordinator = "a.example:7400, b.example:7400"\n')
    assert CliRunner().invoke(program, ["check-config", str(good.with_suffix(".str.toml"))]).exit_code == 0
