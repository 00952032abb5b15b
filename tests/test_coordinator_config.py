"""`cachepoint-coordinator serve` takes its data directory and address from a TOML config too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from cachepoint.store import format as fmt
from tests.conftest import REPO, cli_env
from tests.fleet import open_coordinator_store, shared_catalog

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MAIN = "from coordinator.cli import main; main()"


def test_the_coordinator_serves_from_its_toml_config(tmp_path):
    config = tmp_path / "coordinator.toml"
    text = f'data = "{tmp_path / "data"}"\nlisten = "127.0.0.1:0"\n'
    shared = shared_catalog()
    if shared is not None:  # the backend from the config's keys too
        text += f'catalog = "{shared.dsn}"\nblocks = "{shared.blocks.as_uri()}"\n'
    config.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, "serve", "--config", str(config)],
        env=cli_env(tmp_path / "unused"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["role"] == "coordinator" and ready["listening"].startswith("127.0.0.1:")
        if shared is None:
            assert (tmp_path / "data" / "db").is_dir()
        else:  # the catalog in PostgreSQL: no RocksDB in data, and a store id in the database
            assert not (tmp_path / "data" / "db").exists()
            with open_coordinator_store(tmp_path / "data") as store:
                assert store.db.meta(fmt.META_STORE_ID)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_config_with_unknown_keys_or_no_data_directory_is_refused(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('dta = "x"\n')
    for args, expected in ((["--config", str(config)], "'dta'"), ([], "--data DIR")):
        proc = subprocess.run(
            [sys.executable, "-c", MAIN, "serve", *args],
            env=cli_env(tmp_path / "unused"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 4 and expected in proc.stderr, proc.stderr
