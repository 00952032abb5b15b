"""Settings come from a TOML file, then CACHEPOINT_STORE, then --store."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, cli_env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachepoint", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_a_toml_config_sets_the_store_block_size_author_and_device(tmp_path):
    config = tmp_path / "cachepoint.toml"
    store = tmp_path / "from-config"
    config.write_text(f'store = "{store}"\nblock_size = "16K"\nauthor = "image-team"\ndevice = "build-01"\n')
    env = cli_env(tmp_path / "unused")
    del env["CACHEPOINT_STORE"]
    env["CACHEPOINT_CONFIG"] = str(config)
    (tmp_path / "img").write_bytes(os.urandom(100_000))
    assert run(env, "ingest", "os/x", str(tmp_path / "img")).returncode == 0
    shown = run(env, "show", "os/x", "--json")
    assert '"block_size": 16384' in shown.stdout and '"author": "image-team"' in shown.stdout
    assert '"device": "build-01"' in shown.stdout
    assert (store / "db").is_dir()
    # --store beats the config file.
    other = tmp_path / "flag-store"
    assert run(env, "--store", str(other), "ingest", "os/y", str(tmp_path / "img")).returncode == 0
    assert (other / "db").is_dir()


def test_unknown_config_keys_are_named(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('stor = "/x"\n')
    env = cli_env(tmp_path / "store")
    proc = run(env, "--config", str(config), "ls")
    assert proc.returncode == 4 and "'stor'" in proc.stderr and "unknown keys" in proc.stderr


def test_a_zero_nbd_write_budget_or_idle_timeout_is_refused_naming_the_key(tmp_path):
    for line, key in (
        ('nbd_write_budget = "0"', "nbd_write_budget"),
        ('nbd_idle_timeout = "0s"', "nbd_idle_timeout"),
    ):
        config = tmp_path / "cachepoint.toml"
        config.write_text(line + "\n")
        env = cli_env(tmp_path / "store")
        env["CACHEPOINT_CONFIG"] = str(config)
        proc = run(env, "serve", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0")
        assert proc.returncode == 4 and key in proc.stderr, proc.stderr
