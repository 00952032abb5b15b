"""The daemons of a fleet on one machine: a coordinator and cachepoints as real child processes, each
under a command prefix (a network namespace, fleetlab/netns.py), each with its own store, in plaintext.

Each child writes its stdout and stderr to files under ``root/logs`` (a chatty child never blocks on a
pipe, and the text outlives it). ``close`` sends SIGTERM to every child this object started (by its
own pid), cachepoints first, waits, and kills only the ones that do not stop in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachepoint.status import status_of

REPO = Path(__file__).resolve().parent.parent
COORDINATOR_MAIN = "from coordinator.cli import main; main()"
READY_TIMEOUT = 120.0  # seconds to import, open a store and bind: generous, the machine may be busy
STOP_TIMEOUT = 15.0  # the daemons' own grace period is 5 s
CLI_TIMEOUT = 600.0
# The daemons' logs go to files, where JSON would be their default: text, whose timestamps
# fleetlab/fanout.py reads (when each node committed and pulled). tests/fleet.py starts its children
# with it too.
LOG_FORMAT = ("--log-format", "text")


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    store: Path
    ready: dict[str, Any] = field(default_factory=dict)
    ready_at: float = 0.0  # epoch seconds when its announcement was read (to 50 ms)

    @property
    def address(self) -> str:
        return str(self.ready["listening"])

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (the daemons' clean shutdown), then SIGKILL if it has not exited by the deadline."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait(timeout)

    def status(self) -> dict[str, Any]:
        """`cachepoint status --json`, asked of the daemon's local socket from here (a Unix socket is
        a file: it is reached from outside the daemon's network namespace)."""
        return status_of(self.store)


def child_env(store: Path, config: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEPOINT_")}
    env["CACHEPOINT_STORE"] = str(store)
    env["CACHEPOINT_CONFIG"] = str(config or "")
    env["XDG_CONFIG_HOME"] = str(store.parent / "xdg-config")  # no stray user config
    return env


class Processes:
    """Starts children under ``root`` and stops all of them on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[Child] = []
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(
        self, name: str, args: list[str], store: Path, prefix: Sequence[str] = (), config: Path | None = None
    ) -> Child:
        """Start a child; ``wait_ready`` reads its announcement."""
        stem = self.root / "logs" / f"{len(self.children) + 1:02d}-{name}"
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(
                [*prefix, *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=child_env(store, config),
            )
        child = Child(name, popen, out_path, err_path, store)
        self.children.append(child)
        return child

    def wait_ready(self, children: Sequence[Child], timeout: float = READY_TIMEOUT) -> None:
        """Until each child has printed its JSON announcement; one that exits first raises with its stderr."""
        deadline = time.monotonic() + timeout
        for child in children:
            while not child.ready:
                text = child.stdout_path.read_text(errors="replace")
                if "\n" in text:
                    child.ready = json.loads(text.split("\n", 1)[0])
                    child.ready_at = time.time()
                elif child.popen.poll() is not None:
                    raise RuntimeError(f"{child.name} exited {child.popen.returncode}:\n{child.stderr()}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} did not announce itself in {timeout:.0f}s")
                else:
                    time.sleep(0.05)

    def coordinator(self, data: Path, listen: str, prefix: Sequence[str] = ()) -> Child:
        args = [sys.executable, "-c", COORDINATOR_MAIN, "serve", "--data", str(data), "--listen", listen]
        args += ["-v", *LOG_FORMAT]
        child = self.spawn("coordinator", args, data, prefix)
        self.wait_ready([child])
        return child

    def cachepoint(
        self,
        name: str,
        store: Path,
        coordinator: str,
        site: str,
        subscribe: str,
        listen: str,
        prefix: Sequence[str] = (),
        config: Path | None = None,
    ) -> Child:
        """A daemon whose node id is ``name`` (not waited for: start several, then ``wait_ready``)."""
        args = [sys.executable, "-m", "cachepoint", "serve", "--listen", listen, "--node-id", name]
        args += ["--site", site, "--coordinator", coordinator, "--subscribe", subscribe, "-v", *LOG_FORMAT]
        return self.spawn(name, args, store, prefix, config)

    def logs(self, lines: int = 20) -> str:
        parts = []
        for child in self.children:
            tail = "\n".join(child.stderr().splitlines()[-lines:])
            state = "running" if child.popen.poll() is None else f"exited {child.popen.returncode}"
            parts.append(f"--- {child.name} (pid {child.popen.pid}, {state}):\n{tail}")
        return "\n".join(parts)

    def close(self) -> None:
        # Cachepoints first: a coordinator with Watch streams still open waits out its grace period.
        nodes = [c for c in self.children if c.name != "coordinator"]
        for child in nodes:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        for child in [*nodes, *(c for c in self.children if c.name == "coordinator")]:
            with contextlib.suppress(Exception):
                child.stop()


def cli_json(store: Path, *args: str | Path, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """A `cachepoint` command on ``store`` that must succeed, with --json; what it printed."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "cachepoint", *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=REPO,
        env=child_env(store),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cachepoint {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    data = json.loads(proc.stdout)
    assert isinstance(data, dict), data
    return data
