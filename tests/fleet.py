"""Daemon-process fixtures for the replication tests: a coordinator and cachepoints as real child
processes on loopback, each asked for port 0 and read back from the JSON line it prints when ready.

Every wait polls a condition against a deadline and, when it times out, says what it last saw and
shows the stderr of every child. Teardown sends SIGTERM to each child this module started (by its
own pid), waits, and kills only the ones that do not stop in time.

Children log as text (``--log-format text``, LOG_FORMAT): their stderr is a file, where the daemons
would write JSON lines, and tests grep it for phrases and show it in failure messages. A test of the
JSON logs passes ``--log-format json`` in ``extra`` (the last one given wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cachepoint.blocks import is_hole
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, fleet_pb2, fleet_pb2_grpc, version_pb2
from fleetlab.ports import quiet_port
from fleetlab.processes import LOG_FORMAT  # text, not JSON: the tests read the logs
from tests import tls
from tests.conftest import REPO, TEST_MIN_FREE, Run, cli_env, run_cli, sha256_file

LAYER = "os/x"
PRODUCTION = "os/x:production"
BLOCK = 64 * 1024  # the default block size of a new layer
# Seconds a child may take to import, open its store and bind: a bound, not a speed claim.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0  # the daemons' own grace period is 5 s
CLI_TIMEOUT = 120.0
CONVERGE_TIMEOUT = 90.0  # a subscription retrying a missing layer backs off up to 30 s (+50% jitter)
COORDINATOR_MAIN = "from coordinator.cli import main; main()"
LOG_TAIL = 40  # lines of each child's stderr shown in a failure message

T = TypeVar("T")


# -- the coordinator's backend ------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedCatalog:
    """The shared backend a test's coordinators run on (conftest's ``coordinator_backend`` "postgresql"):
    a database of the test's own and a block directory beside its files."""

    dsn: str
    blocks: Path

    def args(self) -> list[str]:
        return ["--catalog", self.dsn, "--blocks", self.blocks.as_uri()]


_shared_catalog: SharedCatalog | None = None
# Offline commands that change the fleet's trust: on a shared backend they write to its catalog.
SHARED_ADMIN_COMMANDS = frozenset({"enroll", "revoke", "assign", "unassign"})


@contextlib.contextmanager
def coordinators_on(shared: SharedCatalog | None) -> Iterator[None]:
    """Every coordinator started in this block runs on ``shared`` (None: the embedded store)."""
    global _shared_catalog
    before, _shared_catalog = _shared_catalog, shared
    try:
        yield
    finally:
        _shared_catalog = before


def shared_catalog() -> SharedCatalog | None:
    return _shared_catalog


def backend_args(extra: Sequence[str] = ()) -> list[str]:
    """What `cachepoint-coordinator serve` is given to run on the test's backend: nothing embedded, or
    ``--catalog DSN --blocks URL`` (unless ``extra`` names a catalog of its own)."""
    if _shared_catalog is None or "--catalog" in extra:
        return []
    return _shared_catalog.args()


def open_coordinator_store(data: Path) -> Store:
    """The coordinator's state as the coordinator itself opens it, on the test's backend (a test that
    reads or seeds it in-process)."""
    from coordinator.backends.choice import Backend

    if _shared_catalog is None:
        return Store.open(data, writable=True, create=True)
    return Backend(data, _shared_catalog.dsn, _shared_catalog.blocks.as_uri()).open()


# -- small helpers ----------------------------------------------------------------------------------


def stored_block_ids(image: Path, block: int = BLOCK) -> set[bytes]:
    """The ids of the blocks a version of ``image`` is made of (holes are never stored or sent)."""
    ids = set()
    with open(image, "rb") as f:
        while data := f.read(block):
            if not is_hole(data):
                ids.add(hashlib.sha256(data).digest())
    return ids


def random_image(path: Path, size: int, seed: int) -> None:
    """Incompressible data with no holes: every block is distinct, so a pull has many to fetch."""
    rng = random.Random(seed)
    with open(path, "wb") as out:
        for _ in range(size // BLOCK):
            out.write(rng.randbytes(BLOCK))


def free_port() -> int:
    """A loopback port that nothing listens on right now, for a server that must come back at the same
    address after a restart: below the ephemeral range, where no client's source port lands
    (fleetlab/ports.py)."""
    return quiet_port()


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.25,
    logs: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` and the logs at the deadline.

    A probe that raises AssertionError (e.g. a CLI call that failed) counts as "not yet", and its
    message is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            value = probe()
            if value:
                return value
            last = repr(value)
        except AssertionError as err:
            last = str(err)
        if time.monotonic() >= deadline:
            extra = f"\n{logs()}" if logs else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}{extra}")
        time.sleep(interval)


def cachepoint_cli(
    store: Path,
    *args: str | Path,
    check: bool = True,
    timeout: float = CLI_TIMEOUT,
    prefix: Sequence[str] = (),
) -> Run:
    """``prefix``: run it under a command, e.g. inside a network namespace (tests/netns.py)."""
    return run_cli(store, *args, check=check, timeout=timeout, prefix=prefix)


def cli_json(store: Path, *args: str | Path, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """Run a `cachepoint` command that must succeed with --json, and return what it printed."""
    data = cachepoint_cli(store, *args, "--json", prefix=prefix).json()
    assert isinstance(data, dict), data
    return data


def coordinator_cli(
    *args: str,
    check: bool = True,
    timeout: float = CLI_TIMEOUT,
    prefix: Sequence[str] = (),
    identity: Path | None = None,
) -> Run:
    """``identity``: the one to present (CACHEPOINT_IDENTITY); by default, when ``--coordinator`` names
    a TLS coordinator of the harness and the environment names none, an operator's (tests/tls.py)."""
    env = {k: v for k, v in os.environ.items() if k != "CACHEPOINT_DEBUG"}
    shared = shared_catalog()
    if shared is not None and args and args[0] in SHARED_ADMIN_COMMANDS and "--catalog" not in args:
        args = (*args, "--catalog", shared.dsn)  # the fleet's trust is in the shared catalog there
    if identity is None and tls.ENV_IDENTITY not in env:  # a test's own CACHEPOINT_IDENTITY is kept
        identity = tls.operator_identity(args)
    if identity is not None:
        env[tls.ENV_IDENTITY] = str(identity)
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", COORDINATOR_MAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    result = Run(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"cachepoint-coordinator {args} exited {proc.returncode}:\n{proc.stderr}")
    return result


def publish(admin: Path, coordinator: str, image: Path, *tags: str) -> dict[str, Any]:
    tag_args = [a for tag in tags for a in ("--tag", tag)]
    return cli_json(admin, "publish", LAYER, image, "--coordinator", coordinator, *tag_args)


def export_digest(store: Path, ref: str, dest: Path) -> str:
    cli_json(store, "export", ref, dest)
    return sha256_file(dest)


def coordinator_versions(address: str, layer: str) -> list[version_pb2.VersionInfo]:
    """The versions of ``layer`` the coordinator lists (none when it does not know the layer)."""
    with tls.channel(address) as ch:
        try:
            response = catalog_pb2_grpc.CatalogStub(ch).ListVersions(
                catalog_pb2.ListVersionsRequest(layer=layer), timeout=10
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return []
            raise
    return list(response.versions)


def fleet_nodes(coordinator: str, prefix: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The coordinator's view of the fleet, by node id, as `cachepoint-coordinator fleet --json` prints
    it: asked from this process (wait loops poll it) unless the coordinator is reached from a
    namespace or is a list of replicas, where the command runs."""
    if prefix or "," in coordinator:
        data = coordinator_cli("fleet", "--coordinator", coordinator, "--json", prefix=prefix).json()
        assert isinstance(data, dict), data
        return {n["node_id"]: n for n in data["nodes"]}
    from coordinator.admin_commands import nodes_json

    with tls.channel(coordinator) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        response = stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=CLI_TIMEOUT)
    return {n["node_id"]: n for n in json.loads(json.dumps(nodes_json(response)))}


# -- child processes --------------------------------------------------------------------------------


@dataclass
class Child:
    """One daemon process and the files its output goes to (files, not pipes: a chatty child can
    never block on a full pipe, and the text outlives the process for assertion messages)."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    ready: dict[str, Any] = field(default_factory=dict)
    prefix: tuple[str, ...] = ()  # the command it runs under (a network namespace); so do CLI calls to it
    trust: tls.Trust | None = None  # the fleet CA whose identity it presents; None: plaintext

    @property
    def address(self) -> str:
        return str(self.ready["listening"])

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (the daemons' clean shutdown), then SIGKILL if it has not exited by the deadline."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(timeout)

    def kill(self) -> int:
        if self.popen.poll() is None:
            self.popen.kill()
        return self.popen.wait(STOP_TIMEOUT)


@dataclass
class Node(Child):
    """A cachepoint daemon with its store."""

    store: Path = Path()
    node_id: str = ""
    site: str = ""

    def status(self) -> dict[str, Any]:
        """What `cachepoint status --json` prints, asked from here over the daemon's Agent socket, the
        call the command makes (a Unix socket is a file: reached from outside the daemon's network
        namespace too). Wait loops poll it four times a second, and a new interpreter per poll cost
        more CPU than the daemons under test; tests of `status` itself run the command
        (test_lazy_boot, test_disk_headroom, test_http_lazy)."""
        return local_status(self.store)

    def cli_json(self, *args: str | Path) -> dict[str, Any]:
        """A `cachepoint` command on this node's store, where the node runs (its namespace)."""
        return cli_json(self.store, *args, prefix=self.prefix)

    def subscription(self, status: dict[str, Any], ref: str = PRODUCTION) -> dict[str, Any]:
        return next(s for s in status["subscriptions"] if s["ref"] == ref)

    def assign(self, user: str) -> None:
        """Assign ``user`` to this node at its coordinator, so that it may commit and read the user's
        layers (coordinator/authz.py); nothing to do in plaintext."""
        if self.trust is not None:
            self.trust.assign(user, self.node_id)


def local_status(store: Path) -> dict[str, Any]:
    """`cachepoint status --json` of the daemon serving ``store``, asked from this process."""
    from cachepoint.status import status_of

    return json.loads(json.dumps(status_of(store)))  # as the command prints it: JSON types only


def _wait_ready(child: Child, timeout: float) -> dict[str, Any]:
    """The first stdout line is the JSON announcement; the child dying first is a failure with its stderr."""

    def probe() -> dict[str, Any] | None:
        text = child.stdout_path.read_text(errors="replace")
        if "\n" in text:
            ready = json.loads(text.split("\n", 1)[0])
            assert isinstance(ready, dict), ready
            return ready
        if child.popen.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited {child.popen.returncode} before announcing:\n{child.stderr()}"
            )
        return None

    return wait_until(
        f"{child.name} to announce its address", probe, timeout, interval=0.05, logs=child.stderr
    )


class Fleet:
    """Starts children under ``root`` and stops all of them on exit."""

    def __init__(self, root: Path, tls_on: bool | None = None) -> None:
        """``tls_on``: run this fleet with mutual TLS (default: unless CACHEPOINT_TEST_TLS=0). A
        coordinator started with an explicit ``--tls`` (or an operator's CA) is the test's own: the
        harness then issues nothing for it, and the test enrolls what it needs."""
        self.root = root
        self.children: list[Child] = []
        self._starts = 0
        self.tls_on = tls.ENABLED if tls_on is None else tls_on
        self.trust: tls.Trust | None = None
        self._enroll_target: tuple[Child, Path] | None = None  # the last coordinator the harness set up
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        kind: type[Child],
        prefix: Sequence[str] = (),
        **extra: Any,
    ) -> Any:
        self._starts += 1
        stem = self.root / "logs" / f"{self._starts:02d}-{name}"
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(
                [*prefix, *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO, env=env
            )
        child = kind(name, popen, out_path, err_path, prefix=tuple(prefix), **extra)
        self.children.append(child)
        child.ready = _wait_ready(child, READY_TIMEOUT)
        if "listening" in child.ready:
            tls.forget(child.address)  # the caller registers it again when it serves TLS
        return child

    def coordinator(
        self,
        data: Path | None = None,
        listen: str = "127.0.0.1:0",
        name: str = "coordinator",
        extra: Iterable[str] = (),
        prefix: Sequence[str] = (),
    ) -> Child:
        """A coordinator on ``data``; ``extra`` adds options of `serve` (``--config FILE``, ``--http 0``);
        ``prefix`` runs it under a command (`ip netns exec NAME`)."""
        data = data or self.root / name
        extra = list(extra)
        managed = self.tls_on and not any(a == "--tls" or a.startswith("--ca-") for a in extra)
        trust = None
        if managed:
            trust = self._trust(data)
            extra.insert(0, "--tls")
        args = [
            sys.executable,
            "-c",
            COORDINATOR_MAIN,
            "serve",
            "--data",
            str(data),
            "--listen",
            listen,
            "-v",
            *LOG_FORMAT,
            *backend_args(extra),
            *extra,
        ]
        child: Child = self._spawn(name, args, cli_env(data), Child, prefix, trust=trust)
        assert child.ready.get("role") == "coordinator", child.ready
        if trust is not None:
            tls.serve(child.address, trust, peer=False)
            self._enroll_target = (child, data)
        return child

    def _trust(self, data: Path | None = None) -> tls.Trust:
        """The fleet's CA, made in ``data`` (a coordinator's data directory; the default coordinator's
        when none is named) the first time, and copied into each other coordinator's data."""
        if self.trust is None:
            self.trust = tls.Trust.for_data(data or self.root / "coordinator")
        elif data is not None:
            self.trust.copy_to(data)
        return self.trust

    def _node_trust(self, coordinator: str | None) -> tls.Trust | None:
        """Whose node identity a daemon presents: its coordinator's fleet when the harness serves TLS
        there; a daemon without a coordinator, the fleet's; None: plaintext."""
        if not self.tls_on:
            return None
        if coordinator is None:
            return self._trust()
        served = tls.served(coordinator)
        return served.trust if served is not None else None

    def identity(self, store: Path, *roles: str) -> Path | None:
        """Give ``store`` an identity with ``roles`` (publisher, auditor, admin, user:NAME; added to what
        the harness gave it before), as CLI commands on it present; None in plaintext."""
        if not self.tls_on:
            return None
        return self._trust().client(store, roles)

    def assign(self, user: str, node: str) -> None:
        """Assign ``user`` to the node ``node`` at the fleet's coordinators (`cachepoint-coordinator
        assign`): it may then commit and read user/USER/... layers."""
        if self.trust is not None:
            self.trust.assign(user, node)

    def add_port(self, server: grpc.Server, name: str) -> str:
        """Bind an in-process gRPC server (a test's own peer) to a loopback port, serving mutual TLS as
        the node ``name`` of this fleet when the fleet runs TLS; its address."""
        if not self.tls_on:
            address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            tls.forget(address)
            return address
        trust = self._trust()
        identity = trust.node(self.root / "peers" / name, name, "")
        credentials = grpc.ssl_server_credentials(
            [((identity / "key.pem").read_bytes(), (identity / "cert.pem").read_bytes())],
            root_certificates=(identity / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
        tls.serve(address, trust, peer=True)
        return address

    def channel(self, address: str, *roles: str, name: str | None = None) -> grpc.Channel:
        """A raw gRPC channel to a coordinator or a daemon's peer port (tests.tls.channel)."""
        return tls.channel(address, *roles, name=name)

    def enroll(self, store: Path, name: str, *args: str) -> dict[str, Any]:
        """The real enrollment: a join token from the coordinator's data, then `cachepoint enroll` on
        ``store`` (``args``: --site S, --role R of the token). Slower than what the harness issues."""
        assert self._enroll_target is not None, "enroll needs a coordinator the harness set up with TLS"
        coordinator, data = self._enroll_target
        token = coordinator_cli("enroll", name, "--data", str(data), *args, "--json").json()
        assert isinstance(token, dict), token
        return cli_json(store, "enroll", "--coordinator", coordinator.address, "--token", token["token"])

    def cachepoint(
        self,
        name: str,
        coordinator: str | None,
        site: str = "default",
        subscribe: Iterable[str] = (PRODUCTION,),
        store: Path | None = None,
        listen: str = "127.0.0.1:0",
        prefix: Sequence[str] = (),
        config: Path | None = None,
        env: dict[str, str] | None = None,
        extra: Iterable[str] = (),
        min_free: str | None = TEST_MIN_FREE,
    ) -> Node:
        """A daemon whose node id is ``name``; its store defaults to ``root/name`` (so a restart under
        the same name comes back with what it held). ``prefix`` runs it (and CLI calls to it) under a
        command, e.g. `ip netns exec NAME`; ``config`` is its own TOML settings file (wan_rate,
        site_rate...); ``env`` adds variables (e.g. libfaketime's); ``extra`` adds options of `serve`
        (``--http ADDR --http-tls``); ``min_free`` None leaves the daemon's own setting (5% by default).
        """
        store = store or self.root / name
        trust = self._node_trust(coordinator)
        if trust is not None and not _enrolled_elsewhere(store, trust):
            trust.node(store, name, site)
            for user in _watched_users(config or store.parent / "xdg-config" / "cachepoint" / "config.toml"):
                trust.assign(user, name)
        else:
            trust = None
        args = [sys.executable, "-m", "cachepoint", "serve", "--listen", listen, "--node-id", name]
        args += ["--site", site, "-v", *LOG_FORMAT, *extra]
        if min_free is not None:
            args += ["--min-free", min_free]
        if coordinator:
            args += ["--coordinator", coordinator]
        for ref in subscribe:
            args += ["--subscribe", ref]
        child_env = cli_env(store)
        if config is not None:
            child_env["CACHEPOINT_CONFIG"] = str(config)
        child_env.update(env or {})
        node: Node = self._spawn(
            name, args, child_env, Node, prefix, store=store, node_id=name, site=site, trust=trust
        )
        assert node.ready.get("node_id") == name, node.ready
        if trust is not None:
            tls.serve(node.address, trust, peer=True)
        return node

    def serve_store(self, name: str, store: Path, *args: str, config: Path | None = None) -> Node:
        """`cachepoint serve` on ``store`` with its gRPC port on 127.0.0.1:0 and ``args`` as given (no
        coordinator, node id or subscription unless ``args`` names them): for a daemon whose node id
        comes from its identity, or one that serves NBD or HTTP."""
        command = [sys.executable, "-m", "cachepoint", "serve", "--listen", "127.0.0.1:0", "-v", *LOG_FORMAT]
        command += ["--min-free", TEST_MIN_FREE, *args]
        env = cli_env(store)
        if config is not None:
            env["CACHEPOINT_CONFIG"] = str(config)
        node: Node = self._spawn(name, command, env, Node, store=store)
        node.node_id = str(node.ready.get("node_id", ""))
        return node

    def logs(self) -> str:
        parts = []
        for child in self.children:
            lines = child.stderr().splitlines()[-LOG_TAIL:]
            state = "running" if child.running() else f"exited {child.popen.returncode}"
            parts.append(f"--- {child.name} (pid {child.pid}, {state}) stderr:\n" + "\n".join(lines))
        return "\n".join(parts)

    def close(self) -> None:
        # Cachepoints first: a coordinator with Watch streams still open waits out its whole grace period.
        order = sorted(reversed(self.children), key=lambda child: not isinstance(child, Node))
        for child in order:
            with contextlib.suppress(Exception):
                child.stop()
        # Shown by pytest under "Captured stdout teardown" when the test failed.
        print(self.logs())

    # -- waits --------------------------------------------------------------------------------------

    def wait_holds(
        self, node: Node, number: int, ref: str = PRODUCTION, timeout: float = CONVERGE_TIMEOUT
    ) -> dict[str, Any]:
        """Until the daemon's subscription to ``ref`` is current at version ``number``; returns its status."""

        def probe() -> dict[str, Any] | None:
            status = node.status()
            sub = node.subscription(status, ref)
            done = (
                sub["held"] == number
                and sub["state"] == "current"
                and f"{LAYER}@{number}" in status["versions"]
            )
            return status if done else None

        return wait_until(f"{node.name} to hold {ref} at @{number}", probe, timeout, logs=self.logs)

    def wait_until_state(self, node: Node, state: str, ref: str = PRODUCTION, timeout: float = 30.0) -> None:
        """Until the daemon's subscription to ``ref`` reports ``state``."""
        wait_until(
            f"{node.name}'s {ref} to be {state!r}",
            lambda: node.subscription(node.status(), ref)["state"] == state or None,
            timeout,
            logs=self.logs,
        )

    def wait_fleet_holds(
        self,
        coordinator: str,
        node_id: str,
        version: str,
        timeout: float = 30.0,
        prefix: Sequence[str] = (),
    ) -> None:
        """Until the coordinator offers ``node_id`` as a healthy holder of ``version`` (its heartbeat
        has reported it), so that a pull starting now will find it through FindPeers."""

        def probe() -> bool:
            node = fleet_nodes(coordinator, prefix).get(node_id)
            return bool(node and node["healthy"] and version in node["versions"])

        wait_until(f"the coordinator to list {node_id} holding {version}", probe, timeout, logs=self.logs)


def _enrolled_elsewhere(store: Path, trust: tls.Trust) -> bool:
    """A store the test enrolled itself (an identity the harness did not issue): left as it is."""
    directory = store / tls.IDENTITY
    return (directory / "cert.pem").exists() and not trust.issued(directory)


def _watched_users(config: Path | None) -> list[str]:
    """The users whose directories a daemon's settings file watches (``watch = ["alice=/home/alice",
    "user/bob/profile=/srv/p"]``): its node must be assigned them to commit their versions."""
    if config is None or not config.exists():
        return []
    try:
        settings = tomllib.loads(config.read_text())
    except (OSError, ValueError):
        return []
    users = []
    for entry in settings.get("watch", []):
        target = str(entry).partition("=")[0]
        parts = target.split("/")
        users.append(parts[1] if parts[0] == "user" and len(parts) > 1 else target)
    return [u for u in users if u]


# -- a bandwidth-capped loopback proxy ---------------------------------------------------------------


class ThrottledProxy:
    """A loopback TCP proxy that forwards bytes unchanged both ways and caps the upstream-to-client
    direction at ``bytes_per_second`` (over all connections), so a transfer lasts long enough to be
    interrupted in the middle. Runs its own event loop in a thread of the test process."""

    def __init__(self, upstream: str, bytes_per_second: int) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.rate = bytes_per_second
        self.forwarded = 0  # bytes sent to clients
        self.address = ""
        self._started: float | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="throttled-proxy", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> ThrottledProxy:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"proxy did not start: {self._error!r}")
        # TLS passes through unchanged: a client of the proxy presents what the upstream asks for.
        upstream = tls.served(f"{self.upstream[0]}:{self.upstream[1]}")
        if upstream is not None:
            tls.serve(self.address, upstream.trust, upstream.peer)
        else:
            tls.forget(self.address)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # reported by __enter__ (or lost after it: the test then times out)
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        writers: set[asyncio.StreamWriter] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.close()
                return
            writers.add(up_writer)
            await asyncio.gather(
                self._pump(reader, up_writer, throttle=False),
                self._pump(up_reader, writer, throttle=True),
                return_exceptions=True,
            )

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        await self._stop.wait()
        server.close()
        for writer in writers:
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, throttle: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(16 * 1024):
                writer.write(data)
                await writer.drain()
                if throttle:
                    if self._started is None:
                        self._started = loop.time()
                    self.forwarded += len(data)
                    # Pacing, not synchronisation: stay behind the byte budget of the elapsed time.
                    ahead = self.forwarded / self.rate - (loop.time() - self._started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


# -- identities issued directly by a CA, and the files NBD clients read ------------------------------


def issue_identity(ca_data: Path, directory: Path, name: str, *roles: str, days: int = 2) -> Path:
    """An identity (key.pem, cert.pem, ca.pem) for principal ``name`` with ``roles`` ("node",
    "user:alice"...), issued by the CA in ``ca_data``/ca (made there when missing), as enrollment would
    issue it; ``directory`` may be STORE/identity for a daemon."""
    from datetime import timedelta

    from cryptography.hazmat.primitives import serialization

    from cachepoint.trust.identity import key_pem, new_key
    from cachepoint.trust.principal import Principal, Role
    from coordinator.pki.ca import CertificateAuthority

    ca = (
        CertificateAuthority.load(ca_data)
        if CertificateAuthority.exists(ca_data)
        else CertificateAuthority.create(ca_data)
    )
    key = new_key()
    principal = Principal(name, tuple(Role.parse(role) for role in roles))
    cert = ca.issue(key.public_key(), principal, timedelta(days=days))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(key_pem(key))
    (directory / "key.pem").chmod(0o600)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    return directory


def nbd_client_credentials(identity: Path, directory: Path) -> Path:
    """The files qemu's tls-creds-x509 (endpoint=client) and libnbd's tls-certificates= read, made from
    an identity: ca-cert.pem, client-cert.pem, client-key.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes((identity / "ca.pem").read_bytes())
    (directory / "client-cert.pem").write_bytes((identity / "cert.pem").read_bytes())
    (directory / "client-key.pem").write_bytes((identity / "key.pem").read_bytes())
    (directory / "client-key.pem").chmod(0o600)
    return directory
