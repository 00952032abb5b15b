"""`cachepoint-coordinator serve` takes its data directory and address from a TOML config too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.conftest import REPO, cli_env

MAIN = "from coordinator.cli import main; main()"


def test_the_coordinator_serves_from_its_toml_config(tmp_path):
    config = tmp_path / "coordinator.toml"
    config.write_text(f'data = "{tmp_path / "data"}"\nlisten = "127.0.0.1:0"\n')
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
        assert (tmp_path / "data" / "db").is_dir()
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
