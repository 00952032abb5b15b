"""The Agent (local control: ingest of a host path, capture, gc, tags...) is served on STORE/agent.sock
only, never on the daemon's network port; the socket is its owner's (0600), or its agent_group's
(0660); a socket left by a killed daemon does not stop the next start, one that still answers does.

Every daemon here is a real `cachepoint serve` child; other users are real uids (setpriv).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cachepoint.v1 import agent_pb2, agent_pb2_grpc, catalog_pb2, catalog_pb2_grpc
from tests import tls
from tests.conftest import REPO, cli_env, daemon, run_cli

EXIT_INVALID, EXIT_BUSY = 4, 5
NOBODY = 65534  # uid and gid of nobody/nogroup on Debian
OTHER_GID = 4242  # a group nobody is in
DEADLINE = 30.0
START_TIMEOUT = 60.0

# Connects to a Unix socket as whatever user runs it; exit 3 when the kernel says permission denied.
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(3)
print("connected")
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700): so only the socket's own
    mode stands between another user and the Agent."""
    path = Path(tempfile.mkdtemp(prefix="cp-agent-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def agent_stub(sock: Path) -> tuple[grpc.Channel, agent_pb2_grpc.AgentStub]:
    ch = grpc.insecure_channel(f"unix:{sock}")
    return ch, agent_pb2_grpc.AgentStub(ch)


def layers(store: Path) -> list[str]:
    return [entry["layer"] for entry in run_cli(store, "ls", "--json").json()["layers"]]  # type: ignore[index]


def probe_as(uid: int, gid: int, sock: Path) -> int:
    """Exit code of PROBE run as ``uid``:``gid`` with no other groups (0 connected, 3 denied)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: `make test` installs it")
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", python, "-I", "-c"]
        if subprocess.run([*command, "pass"], capture_output=True, timeout=30).returncode == 0:
            proc = subprocess.run([*command, PROBE, str(sock)], capture_output=True, text=True, timeout=30)
            assert proc.returncode in (0, 3), proc.stderr
            return proc.returncode
    pytest.skip(f"no Python interpreter that uid {uid} may run")


def test_the_peer_port_does_not_serve_the_agent_so_a_host_file_cannot_be_ingested_from_the_network(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    secret = Path("/etc/shadow") if Path("/etc/shadow").exists() else tmp_path / "secret"
    if not secret.exists():
        secret.write_text("root:$6$not-for-the-network\n")
    harmless = tmp_path / "notes.txt"
    harmless.write_text("the owner's own file\n")
    with daemon(store) as ready:
        peer = str(ready["listening"])
        with tls.channel(peer) as ch:  # a member of the fleet, when the peer port serves TLS
            stub = agent_pb2_grpc.AgentStub(ch)
            calls = {
                "Ingest": lambda: stub.Ingest(
                    agent_pb2.IngestRequest(layer="app/loot", path=str(secret)), timeout=DEADLINE
                ),
                "Capture": lambda: stub.Capture(
                    agent_pb2.CaptureRequest(layer="user/x/home", path=str(tmp_path)), timeout=DEADLINE
                ),
                "SetTag": lambda: stub.SetTag(catalog_pb2.SetTagRequest(), timeout=DEADLINE),
                "CollectGarbage": lambda: stub.CollectGarbage(
                    agent_pb2.CollectGarbageRequest(), timeout=DEADLINE
                ),
                "Status": lambda: stub.Status(agent_pb2.StatusRequest(), timeout=DEADLINE),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, (name, refused.value)
            # The peer services are still there on that port.
            catalog = catalog_pb2_grpc.CatalogStub(ch)
            assert list(catalog.ListLayers(catalog_pb2.ListLayersRequest(), timeout=DEADLINE).layers) == []
        assert layers(store) == []

        # The owner, over the socket, is served.
        sock = store.absolute() / "agent.sock"
        assert ready["agent"] == str(sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        ch, stub = agent_stub(sock)
        with ch:
            reply = stub.Ingest(
                agent_pb2.IngestRequest(layer="app/notes", path=str(harmless)), timeout=DEADLINE
            )
        assert json.loads(reply.result_json)["ref"] == "app/notes@1"
        assert layers(store) == ["app/notes"]
    assert not sock.exists(), "a clean stop removes the socket"


def test_the_agent_socket_is_0600_and_another_user_cannot_connect(open_dir: Path) -> None:
    store = open_dir / "store"
    with daemon(store) as ready:
        sock = Path(str(ready["agent"]))
        info = os.stat(sock)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        assert probe_as(NOBODY, NOBODY, sock) == 3, "another user connected to a 0600 socket"
        # The same user reaches it once the mode allows: the path itself is open to them, so the
        # refusal above was the socket's mode.
        os.chmod(sock, 0o666)
        try:
            assert probe_as(NOBODY, NOBODY, sock) == 0
        finally:
            os.chmod(sock, 0o600)
        assert run_cli(store, "status", "--json").json()["address"] == ready["listening"]  # type: ignore[index]


def test_agent_group_opens_the_socket_to_that_group_only(open_dir: Path) -> None:
    store = open_dir / "store"
    config = open_dir / "config.toml"
    config.write_text(f'agent_group = "{NOBODY}"\n')
    env = cli_env(store)
    env["CACHEPOINT_CONFIG"] = str(config)
    with daemon(store, env=env) as ready:
        sock = Path(str(ready["agent"]))
        info = os.stat(sock)
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == NOBODY
        assert probe_as(NOBODY, NOBODY, sock) == 0, "a member of agent_group was refused"
        assert probe_as(NOBODY, OTHER_GID, sock) == 3, "a user outside agent_group connected"


def test_an_unknown_agent_group_is_refused_before_anything_is_served(tmp_path: Path) -> None:
    store = tmp_path / "store"
    config = tmp_path / "config.toml"
    config.write_text('agent_group = "no-such-group-here"\n')
    env = cli_env(store)
    env["CACHEPOINT_CONFIG"] = str(config)
    proc = serve_once(store, env)
    assert proc.returncode == EXIT_INVALID, proc.stderr
    assert "no-such-group-here" in proc.stderr
    assert not (store / "agent.sock").exists()


def serve_once(store: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`cachepoint serve` expected to refuse to start: its exit and output."""
    return subprocess.run(
        [sys.executable, "-m", "cachepoint", "serve", "--listen", "127.0.0.1:0"],
        env=env or cli_env(store),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )


def test_a_socket_left_by_a_killed_daemon_does_not_stop_the_next_start(tmp_path: Path) -> None:
    store = tmp_path / "store"
    killed = subprocess.Popen(
        [sys.executable, "-m", "cachepoint", "serve", "--listen", "127.0.0.1:0"],
        env=cli_env(store),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert killed.stdout is not None and killed.stdout.readline()
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    sock = store / "agent.sock"
    assert stat.S_ISSOCK(os.lstat(sock).st_mode), "the killed daemon left no socket to test with"
    with daemon(store) as ready:
        assert Path(str(ready["agent"])) == sock.absolute()
        assert run_cli(store, "status", "--json").json()["address"] == ready["listening"]  # type: ignore[index]


def test_a_start_is_refused_while_something_answers_on_the_agent_socket(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cli(store, "init")
    sock = store / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(4)
    try:
        proc = serve_once(store)
        assert proc.returncode == EXIT_BUSY, proc.stderr
        assert str(sock) in proc.stderr and "already serving" in proc.stderr
        # Its socket is left alone: it still answers.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            probe.connect(str(sock))
    finally:
        listener.close()


def test_a_store_directory_other_users_may_write_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cli(store, "init")
    store.chmod(0o777)
    proc = serve_once(store)
    assert proc.returncode == EXIT_INVALID, proc.stderr
    assert "writable by its group or others (mode 0777)" in proc.stderr and "chmod go-w" in proc.stderr
    assert not (store / "agent.sock").exists()
    store.chmod(0o755)
    with daemon(store):
        pass


def test_a_store_path_longer_than_a_socket_address_still_serves_local_commands(tmp_path: Path) -> None:
    store = tmp_path / ("deep-" * 20) / "store"
    assert len(str(store / "agent.sock")) > 107
    image = tmp_path / "img"
    image.write_bytes(os.urandom(100_000))
    with daemon(store) as ready:
        assert Path(str(ready["agent"])) == store / "agent.sock"
        run_cli(store, "ingest", "os/x", image)  # the store is held: this goes through the daemon
        assert run_cli(store, "status", "--json").json()["versions"] == ["os/x@1"]  # type: ignore[index]
