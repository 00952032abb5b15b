"""`cachepoint check-config [FILE]`: every key read as the commands read it; all problems named, exit 4."""

from __future__ import annotations

import os
from pathlib import Path

import click

from cachepoint.config import ENV_CONFIG, default_config_path
from cachepoint.console import handles_errors, json_option

NAME = "check-config"


@click.command(NAME)
@click.argument("file", required=False, type=click.Path(path_type=Path))
@json_option
@handles_errors
def check_config_cmd(file: Path | None, as_json: bool) -> None:
    """Check FILE (default: the config this cachepoint reads: --config, CACHEPOINT_CONFIG, or
    $XDG_CONFIG_HOME/cachepoint/config.toml): unknown keys and values that do not parse are named,
    each with why (exit 4); `serve`-only keys are checked too."""
    from cachepoint.config_check import cachepoint_checks, check_file, report

    if file is None:
        parent = click.get_current_context().find_root()
        file = Path(parent.params.get("config") or os.environ.get(ENV_CONFIG) or default_config_path())
    report(file, check_file(file, cachepoint_checks()), as_json)


COMMANDS: tuple[click.Command, ...] = (check_config_cmd,)
