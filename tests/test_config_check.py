"""One configuration model for both programs: `check-config` reads every key as the program would and
names every problem (exit 4); the example configs under docs/ pass it; the programs' own options may
follow the subcommand; client commands find the coordinator and identity in the environment or the
config. The commands run in-process through click (fast), except where a real coordinator answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cachepoint.cli import cli as cachepoint_cli
from cachepoint.config import Settings
from cachepoint.config_check import cachepoint_checks
from cachepoint.errors import EXIT_INVALID
from coordinator.cli import cli as coordinator_cli
from coordinator.config import CoordinatorSettings, coordinator_checks
from tests.conftest import REPO, cli_env
from tests.fleet import Fleet

DOCS = REPO / "docs"
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.MULTILINE | re.DOTALL)


def run(program: object, *args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(program, [str(a) for a in args], env=env)  # type: ignore[arg-type]


def example_configs() -> list[Path]:
    return sorted(DOCS.rglob("*.toml"))


def test_the_docs_hold_example_configs_of_both_programs() -> None:
    names = [path.name for path in example_configs()]
    assert any("coordinator" in name for name in names), names
    assert any("coordinator" not in name for name in names), names


@pytest.mark.parametrize("path", example_configs(), ids=lambda p: str(p.relative_to(DOCS)))
def test_check_config_accepts_every_example_config_under_docs(path: Path) -> None:
    # A coordinator's example says so in its name; every other one is cachepoint's.
    program = coordinator_cli if "coordinator" in path.name else cachepoint_cli
    result = run(program, "check-config", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"file": str(path), "ok": True, "problems": []}


def test_check_config_accepts_every_toml_block_of_the_docs(tmp_path: Path) -> None:
    for document in sorted(DOCS.rglob("*.md")):
        for number, block in enumerate(TOML_BLOCK.findall(document.read_text())):
            path = tmp_path / f"{document.stem}-{number}.toml"
            path.write_text(block)
            programs = (cachepoint_cli, coordinator_cli)
            codes = {run(program, "check-config", path).exit_code for program in programs}
            assert 0 in codes, f"{document} block {number} is neither program's config:\n{block}"


@pytest.mark.parametrize("program", [cachepoint_cli, coordinator_cli], ids=["cachepoint", "coordinator"])
def test_an_unknown_key_and_a_bad_value_are_named_with_exit_4(program: object, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('lisen = "0.0.0.0:7400"\nlisten = "nowhere"\n')
    text = run(program, "check-config", config)
    assert text.exit_code == EXIT_INVALID
    assert "lisen: unknown key (did you mean 'listen'?)" in text.output
    assert "listen: address 'nowhere' must look like HOST:PORT" in text.output
    as_json = run(program, "check-config", config, "--json")
    assert as_json.exit_code == EXIT_INVALID
    assert [p["key"] for p in json.loads(as_json.output)["problems"]] == ["lisen", "listen"]


def test_check_config_reads_each_cachepoint_key_as_the_commands_do(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'wan_rate = "fast"\nsubscribe = ["os/x:"]\nread_cache = "lots"\nnbd_tls = "maybe"\n'
        'watch = "alice=/home/alice"\nmin_free = "5 percent"\nchunking = "wavy"\nscrub_every = "weekly"\n'
    )
    problems = json.loads(run(cachepoint_cli, "check-config", config, "--json").output)["problems"]
    named = [p["key"] for p in problems]
    assert sorted(named) == sorted(
        ["wan_rate", "subscribe", "read_cache", "nbd_tls", "watch", "min_free", "chunking", "scrub_every"]
    )


def test_every_settings_field_of_both_programs_has_a_check() -> None:
    assert {f.name for f in fields(Settings)} == set(cachepoint_checks())
    assert {f.name for f in fields(CoordinatorSettings)} == set(coordinator_checks())


def test_the_programs_options_may_follow_the_subcommand(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert run(cachepoint_cli, "init", "--store", store).exit_code == 0
    listed = run(cachepoint_cli, "ls", "--json", f"--store={store}")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == {"layers": [], "images": []}
    config = tmp_path / "coordinator.toml"
    config.write_text('coordinator = "127.0.0.1:1"\n')  # nothing listens there: the error names it
    for args in (["fleet", "--config", config], ["--config", config, "fleet"]):
        result = run(coordinator_cli, *args, env={"CACHEPOINT_COORDINATOR": ""})
        assert "cannot reach 127.0.0.1:1" in result.output, result.output
    checked = run(coordinator_cli, "check-config", "--config", config)
    assert checked.exit_code == 0, checked.output


def test_the_identity_comes_from_the_config_when_no_flag_or_environment_names_one(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'identity = "{tmp_path / "no-such-identity"}"\n')
    result = run(
        cachepoint_cli, "ls", "--config", config, "--store", tmp_path / "s", env={"CACHEPOINT_IDENTITY": ""}
    )
    assert result.exit_code != 0
    assert "no-such-identity" in result.output
    coordinator_config = tmp_path / "coordinator.toml"
    coordinator_config.write_text(f'identity = "{tmp_path / "no-such-admin"}"\n')
    fleet = run(coordinator_cli, "fleet", "--config", coordinator_config, env={"CACHEPOINT_IDENTITY": ""})
    assert fleet.exit_code != 0
    assert "no-such-admin" in fleet.output


def cachepoint(store: Path, *args: str | Path, **env: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "cachepoint", *map(str, args), "--json"],
        env=cli_env(store) | env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_publish_and_pull_find_the_coordinator_in_the_environment_or_the_config(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"cachepoint" * 10000)
    with Fleet(tmp_path / "fleet", tls_on=False) as fleet:
        coordinator = fleet.coordinator()
        published = cachepoint(
            tmp_path / "admin", "publish", "os/x", image, CACHEPOINT_COORDINATOR=coordinator.address
        )
        assert published["ref"] == "os/x@1"
        config = tmp_path / "node.toml"
        config.write_text(f'coordinator = "{coordinator.address}"\n')
        pulled = cachepoint(tmp_path / "node", "pull", "os/x@1", CACHEPOINT_CONFIG=str(config))
        assert pulled["ref"] == "os/x@1" and pulled["fetched_blocks"] == 2
