"""Helpers for the history tests: the `cachepoint-coordinator history` commands against a running
coordinator, and user versions made on a device through its running daemon."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import Run
from tests.fleet import Node, cli_json, coordinator_cli, wait_until

USER = "alice"
HOME = f"user/{USER}/home"


def make_version(node: Node, home: Path, message: str) -> dict[str, Any]:
    """A new version of the user's home directory on a device: `cachepoint capture` through the
    device's daemon, which queues it in the outbox for the coordinator. The device is assigned the user
    first (with TLS, the coordinator takes the user's versions only from a device assigned to them)."""
    node.assign(USER)
    return cli_json(node.store, "capture", home, "--user", USER, "-m", message)


def history(address: str, *args: str | Path, check: bool = True) -> Run:
    """`cachepoint-coordinator history ARGS --coordinator ADDRESS`."""
    return coordinator_cli("history", *map(str, args), "--coordinator", address, check=check)


def history_json(address: str, *args: str | Path) -> dict[str, Any]:
    data = history(address, *args, "--json").json()
    assert isinstance(data, dict), data
    return data


def offline(*args: str | Path, check: bool = True) -> Run:
    """A `history` command that needs no coordinator (audit verify --data, verify-export)."""
    return coordinator_cli("history", *map(str, args), check=check)


def sha256_text(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def wait_delivered(node: Node, timeout: float = 60.0) -> None:
    """Until the device's outbox is empty: every version it made is at the coordinator."""
    wait_until(f"{node.name}'s outbox to drain", lambda: node.status()["outbox_depth"] == 0 or None, timeout)


def rest(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One REST call (loopback); returns the status and the decoded JSON (or the raw bytes)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{base}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw
