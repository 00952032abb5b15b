"""Both servers tell systemd they are ready (READY=1 on $NOTIFY_SOCKET) once their ports are bound,
so a `Type=notify` unit starts only when it can serve (ansible/roles/*/templates/service.j2)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env
from tests.fleet import COORDINATOR_MAIN, backend_args

READY_TIMEOUT = 120.0  # a loaded CI machine starts Python slowly


@contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(READY_TIMEOUT)
        yield sock
    finally:
        sock.close()


def started_then_notified(argv: list[str], env: dict[str, str], sock: socket.socket) -> None:
    """Runs the server, waits for its datagram, and checks that the port it announced takes connections
    by then; stops it."""
    pipe = subprocess.PIPE
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=pipe, stderr=pipe, text=True)
    try:
        try:
            message = sock.recv(4096)
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"no READY=1 within {READY_TIMEOUT:.0f}s: {proc.communicate()[1]}") from None
        assert message == b"READY=1"
        assert proc.stdout is not None
        host, _, port = json.loads(proc.stdout.readline())["listening"].rpartition(":")
        socket.create_connection((host, int(port)), timeout=10).close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""


@pytest.mark.coordinator_backends  # on both backends (tests/conftest.py)
def test_a_coordinator_says_ready_on_an_abstract_notify_socket_once_listening(tmp_path: Path) -> None:
    name = f"cachepoint-notify-{os.getpid()}-{tmp_path.name}"
    env = {**cli_env(tmp_path / "store"), "NOTIFY_SOCKET": "@" + name}
    argv = [sys.executable, "-c", COORDINATOR_MAIN, "serve", "--data", str(tmp_path / "data")]
    argv += backend_args()
    with notify_socket("\0" + name) as sock:
        started_then_notified([*argv, "--listen", "127.0.0.1:0"], env, sock)


def test_a_cachepoint_daemon_says_ready_on_a_notify_socket_path_once_listening(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    env = {**cli_env(tmp_path / "store"), "NOTIFY_SOCKET": str(path)}
    argv = [sys.executable, "-m", "cachepoint", "serve", "--listen", "127.0.0.1:0"]
    with notify_socket(str(path)) as sock:
        started_then_notified(argv, env, sock)
