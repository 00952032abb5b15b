"""Captures through a running daemon reach the coordinator through the outbox, with their timeline;
the daemon keeps configured directories captured; `cachepoint watch` captures on change and stops by
itself or on a signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cachepoint.v1 import version_pb2
from tests.conftest import REPO, cli_env, run_cli
from tests.fleet import Fleet, cachepoint_cli, coordinator_versions, wait_until

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(24)
WATCH_TIMEOUT = 60.0  # a bound for the watch to notice a change: it looks every 0.1-0.2 s


def local_versions(store: Path, layer: str) -> list[dict]:
    result = run_cli(store, "log", layer, "--json", check=False)
    return list(result.json()["versions"]) if result.code == 0 else []  # type: ignore[index]


def test_captures_through_the_daemon_and_its_watches_reach_the_coordinator_with_their_labels(tmp_path):
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    (alice / "Documents").mkdir(parents=True)
    (alice / "Documents" / "notes.txt").write_text("monday")
    (bob / "Desktop").mkdir(parents=True)
    (bob / "Desktop" / "todo.txt").write_text("call alice")
    root = tmp_path / "fleet"
    # The daemon's config (cli_env points XDG_CONFIG_HOME next to the stores): it watches bob's home.
    config = root / "xdg-config" / "cachepoint" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'watch = ["bob={bob}"]\nwatch_interval = "0.1s"\nwatch_debounce = "0.2s"\n')
    with Fleet(root) as fleet:
        coordinator = fleet.coordinator()
        laptop = fleet.cachepoint("laptop", coordinator.address, subscribe=())

        # The daemon holds the store: `capture` goes through it.
        first = cachepoint_cli(laptop.store, "capture", alice, "--user", "alice", "--json").json()
        assert first["version"] == 1  # type: ignore[index]
        (alice / "Apps" / "Editor").mkdir(parents=True)
        (alice / "Apps" / "Editor" / "editor").write_bytes(ELF)
        second = cachepoint_cli(laptop.store, "capture", alice, "--user", "alice", "--json").json()
        assert second["labels"] == ["app installed: Apps/Editor"]  # type: ignore[index]

        def delivered() -> list[version_pb2.VersionInfo] | None:
            versions = coordinator_versions(coordinator.address, "user/alice/home")
            return versions if len(versions) == 2 else None

        versions = wait_until("alice's captures at the coordinator", delivered, 60, logs=fleet.logs)
        assert list(versions[1].labels) == ["app installed: Apps/Editor"]
        assert {c.file_class: c.added for c in versions[1].changes}["apps"] == 1
        assert versions[1].parent == 1

        # restore-dir through the daemon: the command writes the directory (reading the store
        # read-only) and the daemon captures before and after.
        restored = cachepoint_cli(
            laptop.store, "restore-dir", alice, "--user", "alice", "--to", "@1", "--only", "apps", "--json"
        ).json()
        assert restored["ref"] == "user/alice/home@3"  # type: ignore[index]
        assert not (alice / "Apps").exists() and (alice / "Documents" / "notes.txt").read_text() == "monday"
        wait_until(
            "the restore's version at the coordinator",
            lambda: (
                [list(v.labels) for v in coordinator_versions(coordinator.address, "user/alice/home")][2:]
                == [["app removed: Apps/Editor"]]
                or None
            ),
            60,
            logs=fleet.logs,
        )

        # The configured watch captured bob's home on its own, and captures his next change.
        wait_until(
            "the daemon's watch to capture bob's home",
            lambda: len(coordinator_versions(coordinator.address, "user/bob/home")) == 1 or None,
            WATCH_TIMEOUT,
            logs=fleet.logs,
        )
        (bob / "Desktop" / "todo.txt").write_text("call alice, then bob")
        wait_until(
            "the watch to capture bob's change and deliver it",
            lambda: len(coordinator_versions(coordinator.address, "user/bob/home")) == 2 or None,
            WATCH_TIMEOUT,
            logs=fleet.logs,
        )
        assert laptop.status()["outbox_depth"] == 0


def _watch(store: Path, home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cachepoint", "watch", str(home), "--user", "alice", *args],
        env=cli_env(store),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_captures_each_change_and_stops_after_max_captures(tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("one")
    proc = _watch(store, home, "--interval", "0.1s", "--debounce", "0.2s", "--max-captures", "2", "--json")
    try:
        wait_until(
            "the first capture", lambda: len(local_versions(store, "user/alice/home")) == 1 or None, 60
        )
        (home / "notes.txt").write_text("one, two")
        out, err = proc.communicate(timeout=WATCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["version"] for line in lines] == [1, 2]
    assert lines[1]["changes"]["data"] == {"added": 0, "changed": 1, "removed": 0}
    assert len(local_versions(store, "user/alice/home")) == 2


def test_watch_stops_cleanly_on_sigterm_and_does_not_hold_the_store_between_captures(tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("one")
    proc = _watch(store, home, "--interval", "0.1s", "--debounce", "0s")
    try:
        wait_until(
            "the first capture", lambda: len(local_versions(store, "user/alice/home")) == 1 or None, 60
        )
        # Between captures the store is free for other writers.
        run_cli(store, "tag", "user/alice/home@1", "monday")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "watch of" in out and "ended" in out


def test_a_daemon_config_with_a_malformed_watch_is_refused_before_it_starts(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('watch = ["/home/alice"]\n')
    result = run_cli(tmp_path / "store", "--config", config, "serve", "--listen", "127.0.0.1:0", check=False)
    assert result.code == 4 and "USER=DIR" in result.err
