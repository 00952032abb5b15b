"""Shared fixtures: a store directory, and the real `cachepoint` command run as a child process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tls
from tests.postgres import PostgresServer
from tests.postgres import available as postgres_unavailable

REPO = Path(__file__).resolve().parent.parent
# The daemons of tests pause their pulls only when their file system is truly short: the default (5%
# of it) would pause them on a host whose disk is merely more than 95% used. The pause itself is
# tested on a small file system of its own (tests/test_disk_headroom.py), with the default.
TEST_MIN_FREE = "256M"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


def cli_env(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CACHEPOINT_STORE"] = str(store)
    env["CACHEPOINT_CONFIG"] = ""
    env["XDG_CONFIG_HOME"] = str(store.parent / "xdg-config")  # no stray user config
    env.pop("CACHEPOINT_DEBUG", None)
    return env


def run_cli(
    store: Path, *args: str | Path, check: bool = True, timeout: float = 300, prefix: Sequence[str] = ()
) -> Run:
    """``prefix``: a command the CLI runs under, e.g. `ip netns exec NAME` (tests/netns.py). A command
    that reaches a TLS address of the harness presents the store's identity (tests/tls.py)."""
    tls.client_identity(store, args)
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "cachepoint", *map(str, args)],
        env=cli_env(store),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    result = Run(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"cachepoint {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return result


@contextlib.contextmanager
def daemon(store: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[dict[str, object]]:
    """A `cachepoint serve` child on ``store`` (gRPC on port 0 plus ``args``): yields its ready line,
    then stops it with SIGTERM and insists on a clean exit. With the harness's TLS on, the store gets a
    node identity first (of the fleet of ``--coordinator``, else of a CA of its own beside the store),
    and its peer port serves mutual TLS (tests.tls.channel dials it)."""
    trust = standalone_node(store, args)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachepoint", "serve", "--listen", "127.0.0.1:0", "--min-free", TEST_MIN_FREE]
        + list(args),
        env=env or cli_env(store),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the daemon did not start: {proc.stderr.read() if proc.stderr else ''}"
        ready = dict(json.loads(line))
        if trust is not None:
            tls.serve(str(ready["listening"]), trust, peer=True)
        else:
            tls.forget(str(ready["listening"]))
        yield ready
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, f"the daemon exited {code}: {proc.stderr.read() if proc.stderr else ''}"


def standalone_node(store: Path, args: Sequence[str]) -> tls.Trust | None:
    """The fleet whose node identity a daemon() child presents (None: plaintext)."""
    if not tls.ENABLED:
        return None
    if (store / tls.IDENTITY / "cert.pem").exists() and store / tls.IDENTITY not in tls.issuers():
        return None  # the test gave the store an identity of its own making: it is the test's to dial
    trust = tls.trust_of(args)
    if trust is None:
        trust = tls.Trust.for_data(store.parent / f"{store.name}-ca")
    name = args[args.index("--node-id") + 1] if "--node-id" in args[:-1] else store.name
    trust.node(store, name, "")
    return trust


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(store_dir: Path):
    def call(*args: str | Path, check: bool = True) -> Run:
        return run_cli(store_dir, *args, check=check)

    return call


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server per pytest worker (tests/postgres.py), stopped and removed at the end
    of the session, failed or interrupted; skips with the reason when PostgreSQL is not installed."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """The DSN (postgresql://...) of a new, empty database of its own for this test, dropped after it."""
    dsn = postgres_server.create_database()
    try:
        yield dsn
    finally:
        postgres_server.drop_database(dsn.rsplit("/", 1)[1])


# -- the coordinator's backend: every test of a marked module runs on both --------------------------

COORDINATOR_BACKENDS = ("embedded", "postgresql")
BACKENDS_MARK = "coordinator_backends"
# Which backends the marked modules run on: CACHEPOINT_TEST_BACKENDS="embedded,postgresql" (the
# default, and `make test`'s) or one of them (the replicas' own tests run on PostgreSQL all the same).
BACKENDS_ENV = "CACHEPOINT_TEST_BACKENDS"


def chosen_backends() -> tuple[str, ...]:
    wanted = [b.strip() for b in os.environ.get(BACKENDS_ENV, ",".join(COORDINATOR_BACKENDS)).split(",")]
    unknown = [b for b in wanted if b and b not in COORDINATOR_BACKENDS]
    if unknown:
        raise pytest.UsageError(f"{BACKENDS_ENV}: unknown backend {unknown[0]!r} (of {COORDINATOR_BACKENDS})")
    return tuple(b for b in COORDINATOR_BACKENDS if b in wanted)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{BACKENDS_MARK}: run each test once per coordinator backend ({', '.join(COORDINATOR_BACKENDS)}); "
        "every coordinator the harness starts runs on it (fixture coordinator_backend)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked ``coordinator_backends`` (``pytestmark``) runs each test once per backend, the
    id in its name (``test_x[postgresql]``). Module scope: a module's shared fleet is started once
    per backend, and pytest runs all of one backend's tests, then the other's."""
    if metafunc.definition.get_closest_marker(BACKENDS_MARK) is None:
        return
    if "coordinator_backend" not in metafunc.fixturenames:
        metafunc.fixturenames.append("coordinator_backend")
    backends = chosen_backends()
    metafunc.parametrize("coordinator_backend", backends, indirect=True, scope="module", ids=backends)


@pytest.fixture(scope="module")
def coordinator_backend(request: pytest.FixtureRequest) -> str:
    """Which backend this test's coordinators run on: "embedded" (RocksDB in DATA; a module that is not
    marked) or "postgresql" (a new database per test and a block directory in its tmp_path)."""
    return str(getattr(request, "param", "embedded"))


@contextlib.contextmanager
def coordinator_catalog(request: pytest.FixtureRequest, backend: str, root: Path) -> Iterator[None]:
    """While in this block, the coordinators the harness starts run on ``backend``: for "postgresql",
    on a new database (dropped after the block) and the block directory ``root``/shared-blocks."""
    from tests.fleet import SharedCatalog, coordinators_on

    if backend != "postgresql":
        with coordinators_on(None):
            yield
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    dsn = server.create_database()
    try:
        with coordinators_on(SharedCatalog(dsn, root / "shared-blocks")):
            yield
    finally:
        server.drop_database(dsn.rsplit("/", 1)[1])


@pytest.fixture(autouse=True)
def _coordinator_catalog_per_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A fresh catalog for each test of a marked module (nothing for the others)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("coordinator_backend") if callspec is not None else None
    if backend is None:
        yield
        return
    with coordinator_catalog(request, backend, request.getfixturevalue("tmp_path")):
        yield
