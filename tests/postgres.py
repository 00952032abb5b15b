"""A real, throwaway PostgreSQL server for tests: Debian's binaries (the newest installed major), a data
directory under a temporary directory, a free loopback port, trust authentication on 127.0.0.1 only.

As root (the test suite's case) the server runs as the `postgres` system user, which the server insists
on: the temporary directory is chowned to it. One server serves a whole pytest worker; each test gets a
database of its own (``create_database``), so a server is started once and tests stay isolated."""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from fleetlab.ports import quiet_port

SYSTEM_USER = "postgres"
SUPERUSER = "postgres"
# 3 coordinator replicas x their pool, with room for the test's own connections; each connection slot
# costs the server a few hundred KiB of shared memory, nothing more until used.
MAX_CONNECTIONS = 200
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_DIR_PREFIX = "cachepoint-pg-"
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# The tests' data does not have to survive a power loss or an OS crash, only a server that stays up:
# skipping fsync, commit flushes and full-page images saves the disk writes that dominate a test's time.
# wal_level=minimal (no WAL senders) skips WAL for data loaded in the transaction that creates a table.
_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_connections": str(MAX_CONNECTIONS),
    "shared_buffers": "32MB",
    "listen_addresses": "'127.0.0.1'",
    "log_min_messages": "warning",
}


def binaries() -> Path | None:
    """The bin directory of the newest PostgreSQL installed (Debian: /usr/lib/postgresql/<major>/bin;
    else the one a `pg_ctl` on PATH links into)."""
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if Path(d).parent.name.isdigit()]
    found.sort(key=lambda d: int(d.parent.name))
    candidates = list(reversed(found))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "postgres")):
            return directory
    return None


def available() -> str | None:
    """Why a server cannot be started here (a test's skip reason), or None when it can."""
    if binaries() is None:
        return "PostgreSQL is not installed (Debian package postgresql; `make test` installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"no `{SYSTEM_USER}` system user to run PostgreSQL as (Debian package postgresql makes it)"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed (Debian package util-linux)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(parent: Path) -> None:
    """Remove the temporary directories of servers whose test process died without cleaning up (killed
    with SIGKILL: the server itself died with it, see ``_run_as``). The owner's pid is in the name."""
    for leftover in parent.glob(f"{_DIR_PREFIX}*-*"):
        owner = leftover.name[len(_DIR_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(leftover, ignore_errors=True)


class PostgresServer:
    """One PostgreSQL server in a temporary directory: ``start()``, then ``create_database()`` per
    test, ``stop()`` at the end (it always removes the directory, also after a failed start)."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.port = 0
        self._postmaster: subprocess.Popen[bytes] | None = None
        self._databases = 0

    @property
    def data(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "data"

    @property
    def log(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        reason = available()
        if reason is not None:
            raise RuntimeError(reason)
        parent = Path(tempfile.gettempdir())
        _remove_leftovers(parent)
        self.root = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=parent))
        # The server only runs as its own user, which must reach the directory: mkdtemp makes it 0700.
        if os.geteuid() == 0:
            account = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        atexit.register(self.stop)
        try:
            self._initdb()
            # Another worker may take the port between our probe and the server's bind: try a fresh one.
            for _ in range(3):
                self.port = quiet_port()
                if self._launch():
                    break
            else:
                raise RuntimeError(f"PostgreSQL did not start:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _run_as(self, argv: list[str]) -> list[str]:
        """``argv`` as the server's user. setpriv execs in place (runuser would fork), so the pdeathsig
        reaches the postmaster itself: it shuts down (SIGQUIT: immediate) when the test process dies,
        however it dies, and leaves no orphan server. The signal follows the thread that started the
        server: start it from a thread that lives as long as the server (pytest's)."""
        user = ["--reuid", SYSTEM_USER, "--regid", SYSTEM_USER, "--init-groups"] if os.geteuid() == 0 else []
        return ["setpriv", *user, "--pdeathsig", "QUIT", "--", *argv]

    def _initdb(self) -> None:
        bin_dir = binaries()
        assert bin_dir is not None
        proc = subprocess.run(
            self._run_as(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"initdb exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        # Trust over TCP from 127.0.0.1 only: no Unix-socket and no IPv6 logins.
        (self.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        sockets = self.data.parent / "sockets"
        sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(sockets, SYSTEM_USER, SYSTEM_USER)
        settings = {**_SETTINGS, "unix_socket_directories": f"'{sockets}'"}
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("".join(f"{key} = {value}\n" for key, value in settings.items()))

    def _launch(self) -> bool:
        """Start the postmaster on ``self.port`` and wait until it accepts connections; False when it
        exited instead (the port was taken)."""
        bin_dir = binaries()
        assert bin_dir is not None
        with open(self.log, "ab") as log:
            postmaster = subprocess.Popen(
                self._run_as([str(bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port)]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C is for pytest, which then stops the server in order
            )
        deadline = time.monotonic() + START_TIMEOUT
        pid_file = self.data / "postmaster.pid"
        while time.monotonic() < deadline:
            if postmaster.poll() is not None:
                return False
            # The postmaster's status is the pid file's last line (what `pg_ctl -w` waits for).
            with contextlib.suppress(FileNotFoundError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    self._postmaster = postmaster
                    return True
            time.sleep(0.05)
        postmaster.kill()
        postmaster.wait()
        raise RuntimeError(f"PostgreSQL was not ready within {START_TIMEOUT:.0f} s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return "(no server log)"

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are cut) and remove its directory. Safe to call
        twice and after a failed start."""
        postmaster, self._postmaster = self._postmaster, None
        if postmaster is not None and postmaster.poll() is None:
            postmaster.send_signal(signal.SIGINT)
            try:
                postmaster.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                postmaster.send_signal(signal.SIGQUIT)  # immediate shutdown: it also ends the backends
                try:
                    postmaster.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    postmaster.kill()
                    postmaster.wait()
        root, self.root = self.root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        atexit.unregister(self.stop)

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database (``name``, else the next ``test_<n>``); returns its DSN."""
        if name is None:
            self._databases += 1
            name = f"test_{self._databases}"
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} is not [a-z_][a-z0-9_]{{0,62}}")
        with self._admin() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, cutting the sessions a test left open (pools that were not closed)."""
        with self._admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
