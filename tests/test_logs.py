"""Logs as JSON lines (cachepoint/logs.py): every line a daemon writes parses and carries time, level,
logger, message and fields; a refused request (an authorization refusal, bad input) is one line
marked refused, never a traceback; JSON is the default when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachepoint import logs
from cachepoint.errors import EXIT_INVALID
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, version_pb2
from tests.conftest import REPO, cli_env, run_cli
from tests.fleet import LAYER, Child, Fleet, backend_args, publish, random_image, wait_until

KEYS = {"time", "level", "logger", "message", "fields"}
# gRPC's C core writes to stderr itself, in absl's format ("W0000 00:00:..."), past Python's logging.
GRPC_CORE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl)")
JSON_LOGS = ("--log-format", "json")


def json_lines(child: Child, since: int = 0) -> list[dict[str, Any]]:
    """Every line of the child's stderr after the first ``since`` characters, each parsed (a line that
    is not a JSON object fails the test, naming it)."""
    parsed = []
    for line in child.stderr()[since:].splitlines():
        if GRPC_CORE.match(line):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"{child.name} wrote a line that is not JSON: {line!r}")
        assert isinstance(entry, dict) and KEYS <= set(entry), entry
        assert entry["level"] in ("debug", "info", "warning", "error", "critical"), entry
        assert entry["time"].endswith("Z") and "T" in entry["time"], entry
        assert isinstance(entry["fields"], dict), entry
        parsed.append(entry)
    return parsed


def refusals(child: Child, since: int, word: str) -> list[dict[str, Any]] | None:
    found = [e for e in json_lines(child, since) if e["fields"].get("refused") and word in e["message"]]
    return found or None


@pytest.mark.coordinator_backends  # on both backends (tests/conftest.py)
def test_both_daemons_write_json_lines_and_one_line_per_refused_request(tmp_path: Path) -> None:
    image = tmp_path / "v1.img"
    random_image(image, 256 * 1024, seed=7)
    with Fleet(tmp_path / "fleet", tls_on=True) as fleet:
        coordinator = fleet.coordinator(extra=JSON_LOGS)
        publish(tmp_path / "admin", coordinator.address, image, "production")
        node = fleet.serve_store("n1", tmp_path / "n1", "--http", "127.0.0.1:0", *JSON_LOGS)

        # An authorization refusal at the coordinator: a user may not move an os/ layer's tag.
        before = len(coordinator.stderr())
        with fleet.channel(coordinator.address, "user:bob", name="bob") as ch:
            request = catalog_pb2.SetTagRequest(ref=version_pb2.Ref(layer=LAYER, number=1), tag="evil")
            with pytest.raises(grpc.RpcError) as refused:
                catalog_pb2_grpc.CatalogStub(ch).SetTag(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        lines = wait_until(
            "the coordinator to log the refusal", lambda: refusals(coordinator, before, "SetTag"), 10
        )
        assert len(lines) == 1, lines
        assert lines[0]["level"] == "warning" and lines[0]["logger"] == "coordinator.authz"
        fields = lines[0]["fields"]
        assert (fields["code"], fields["principal"], fields["rule"]) == ("PERMISSION_DENIED", "bob", "tag")
        assert fields["method"] == "/cachepoint.v1.Catalog/SetTag"

        # Bad input at the daemon's HTTP server: a ref that does not parse is a 400 and one line.
        before = len(node.stderr())
        url = f"http://{node.ready['http']}/v1/versions/os%2Fx@seven/file"
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(url, timeout=30)
        assert bad.value.code == 400
        lines = wait_until("the daemon to log the 400", lambda: refusals(node, before, "os/x@seven"), 10)
        assert len(lines) == 1, lines
        assert lines[0]["logger"] == "cachepoint.http"
        assert lines[0]["fields"]["status"] == 400 and lines[0]["fields"]["method"] == "GET"
        assert lines[0]["fields"]["path"] == "/v1/versions/os/x@seven/file"

        for child in (coordinator, node):
            entries = json_lines(child)
            assert entries, f"{child.name} logged nothing"
            assert not [e for e in entries if "exception" in e], "a client's error logged a traceback"
            assert "Traceback" not in child.stderr()


@pytest.mark.coordinator_backends  # on both backends (tests/conftest.py)
def test_a_coordinator_whose_stderr_is_not_a_terminal_logs_json_by_default(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from coordinator.cli import main; main()", "serve"]
        + ["--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0", *backend_args()],
        env=cli_env(tmp_path / "unused"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["role"] == "coordinator"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    entries = [json.loads(line) for line in err.splitlines()]  # every line (a migration's too) is JSON
    # Without a CA it warns that nothing is authenticated.
    warning = next((e for e in entries if "not authenticated" in e["message"]), None)
    assert warning is not None and warning["level"] == "warning", entries


def test_a_log_format_other_than_json_or_text_in_the_config_is_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('log_format = "xml"\n')
    refused = run_cli(tmp_path / "store", "--config", config, "serve", "--listen", "127.0.0.1:0", check=False)
    assert refused.code == EXIT_INVALID, refused
    assert "'xml'" in refused.err and "log_format" in refused.err, refused.err


def test_a_json_line_holds_the_fields_and_a_traceback_stays_in_its_line() -> None:
    out = io.StringIO()  # not a terminal: JSON
    assert logs.configure(logging.INFO, "", out) == "json"
    try:
        log = logging.getLogger("cachepoint.test")
        log.info("pulled %s", "os/x@1", extra={"blocks": 3, "path": Path("/srv")})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("a bug of ours")
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        assert first["message"] == "pulled os/x@1" and first["level"] == "info"
        assert first["logger"] == "cachepoint.test" and first["fields"] == {"blocks": 3, "path": "/srv"}
        assert second["level"] == "error" and "ValueError: boom" in second["exception"]

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        shown = Terminal()
        assert logs.configure(logging.INFO, "", shown) == "text"
        log.warning("pulls paused")
        assert " WARNING cachepoint.test pulls paused" in shown.getvalue()
    finally:
        logs.configure(logging.WARNING, "text", sys.stderr)
