"""The command tables of `cachepoint` and `cachepoint-coordinator` (cachepoint/cli/lazy.py): every
command a module defines is listed under its own name, every listed command loads, and starting
either program loads none of the heavy modules a command may never need."""

from __future__ import annotations

import importlib
import subprocess
import sys

import click
import pytest

import cachepoint.cli
import coordinator.cli
from cachepoint.cli.lazy import LazyGroup

CACHEPOINT_MODULES = [
    "cachepoint.cli.store_commands",
    "cachepoint.cli.inspect_commands",
    "cachepoint.cli.fleet_commands",
    "cachepoint.cli.disk_commands",
    "cachepoint.cli.image_commands",
    "cachepoint.cli.capture_commands",
    "cachepoint.cli.repair_command",
    "cachepoint.cli.scrub_commands",
    "cachepoint.cli.trust_commands",
    "cachepoint.cli.config_command",
]
COORDINATOR_MODULES = ["coordinator.admin_commands", "coordinator.pki.cli"]


def _defined(modules: list[str]) -> dict[str, str]:
    """Command name -> module, from each module's own COMMANDS."""
    found: dict[str, str] = {}
    for name in modules:
        for command in importlib.import_module(name).COMMANDS:
            assert command.name not in found, f"{command.name} is defined twice"
            found[str(command.name)] = name
    return found


@pytest.mark.parametrize(
    ("table", "modules", "extra"),
    [
        (cachepoint.cli.COMMANDS, CACHEPOINT_MODULES, {}),
        (
            coordinator.cli.COMMANDS,
            COORDINATOR_MODULES,
            {
                "history": "coordinator.history.cli",
                "token": "coordinator.pki.bearer",
                "migrate": "coordinator.backends.cli",
            },
        ),
    ],
    ids=["cachepoint", "coordinator"],
)
def test_every_command_a_module_defines_is_in_its_programs_table(
    table: dict[str, str], modules: list[str], extra: dict[str, str]
) -> None:
    listed = {name: target.partition(":")[0] for name, target in table.items()}
    assert listed == {**_defined(modules), **extra}
    # The group's callback names check-config without importing its module: the same name.
    assert cachepoint.cli.CHECK_CONFIG == importlib.import_module("cachepoint.cli.config_command").NAME


@pytest.mark.parametrize(
    "group", [cachepoint.cli.cli, coordinator.cli.cli], ids=["cachepoint", "coordinator"]
)
def test_every_listed_command_loads_under_its_name(group: click.Group) -> None:
    assert isinstance(group, LazyGroup)
    with click.Context(group) as ctx:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None and command.name == name, name


def test_a_table_entry_that_names_another_command_is_an_error_naming_both() -> None:
    group = LazyGroup(lazy={"ls": "cachepoint.cli.inspect_commands:log_cmd"})
    wrong = "log_cmd is not the click command 'ls'"
    with click.Context(group) as ctx, pytest.raises(RuntimeError, match=wrong):
        group.get_command(ctx, "ls")


@pytest.mark.parametrize(
    "program",
    ["from cachepoint.cli import cli", "from coordinator.cli import cli"],
    ids=["cachepoint", "coordinator"],
)
def test_starting_a_program_loads_no_store_rpc_or_database_module(program: str) -> None:
    heavy = [
        "cachepoint.store.store",
        "cachepoint.capture.engine",
        "cachepoint.layers.ingest",
        "grpc",
        "psycopg",
        "cryptography",
    ]
    probe = f"import sys; {program}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [], f"{program} loaded {loaded.stdout.strip()}"
