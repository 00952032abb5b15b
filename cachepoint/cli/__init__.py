"""The `cachepoint` command. Handlers parse, call one function that holds the logic, and print.

Exit codes are listed in cachepoint/errors.py and README.md.

The group and `main` are here; the commands are in one module per area:

    context.py           the Context (settings, the store), shared options, going through the daemon
    store_commands.py    init, ingest, tag, rollback, gc: new versions and tags
    inspect_commands.py  ls, log, show, diff, export, fsck, stats: reading the store
    image_commands.py    image create, ls, export
    fleet_commands.py    publish, pull, serve, status, pin: other nodes and the daemon
    disk_commands.py     attach, detach, snapshot, rebase, restore: composite disks
    capture_commands.py  capture, watch, restore-dir: file-level capture
    repair_command.py    repair: salvage a damaged store
    scrub_commands.py    scrub: verify every stored block, heal bad ones from the fleet
    trust_commands.py    enroll: join the fleet's PKI with a one-time token
    config_command.py    check-config: every key of a config file read as the commands read it
    anywhere.py          the group whose options (--store, --config, --identity) may follow the command
"""

from __future__ import annotations

import os
import sys

import click

from cachepoint import __version__
from cachepoint.cli import (
    capture_commands,
    config_command,
    disk_commands,
    fleet_commands,
    image_commands,
    inspect_commands,
    repair_command,
    scrub_commands,
    store_commands,
    trust_commands,
)
from cachepoint.cli.anywhere import OptionsAnywhereGroup
from cachepoint.cli.context import Context
from cachepoint.config import load_settings
from cachepoint.console import fail
from cachepoint.errors import EXIT_FAILURE, CachepointError
from cachepoint.trust.location import ENV_IDENTITY, identity_dir

__all__ = ["Context", "cli", "main"]


@click.group(cls=OptionsAnywhereGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store",
    envvar="CACHEPOINT_STORE",
    metavar="DIR",
    help="Store directory [env CACHEPOINT_STORE].",
)
@click.option("--config", "config", metavar="FILE", help="TOML config [env CACHEPOINT_CONFIG].")
@click.option(
    "--identity",
    "identity",
    metavar="DIR",
    help="Key and certificates to call the fleet with [env CACHEPOINT_IDENTITY; else STORE/identity].",
)
@click.version_option(__version__, prog_name="cachepoint")
@click.pass_context
def cli(click_ctx: click.Context, store: str | None, config: str | None, identity: str | None) -> None:
    """Versioned, deduplicated, layered disk images.

    Refs name versions: LAYER@N (a number), LAYER:TAG (a tag), LAYER (= LAYER:latest).
    --store, --config and --identity may also follow the command.
    """
    if click_ctx.invoked_subcommand == config_command.NAME:
        return  # it reads the config itself, and reports every problem rather than the first
    try:
        click_ctx.obj = Context(load_settings(config, store))
        identity = identity or os.environ.get(ENV_IDENTITY) or click_ctx.obj.settings.identity or None
        if click_ctx.invoked_subcommand != "enroll":  # enroll makes the identity: nothing to present yet
            if identity_dir(identity, click_ctx.obj.store_path) is not None:
                # grpc and cryptography load only for a command that has an identity to present.
                from cachepoint.trust.identity import activate

                activate(identity, click_ctx.obj.store_path)
    except CachepointError as err:
        fail(str(err), err.exit_code, False)


for _module in (
    store_commands,
    inspect_commands,
    fleet_commands,
    disk_commands,
    image_commands,
    capture_commands,
    repair_command,
    scrub_commands,
    trust_commands,
    config_command,
):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    try:
        cli(prog_name="cachepoint")
    except Exception as err:  # a bug, not bad input: say so plainly, keep the traceback for reports
        if os.environ.get("CACHEPOINT_DEBUG"):
            raise
        click.echo(
            f"cachepoint: internal error: {type(err).__name__}: {err} (set CACHEPOINT_DEBUG=1 for details)",
            err=True,
        )
        sys.exit(EXIT_FAILURE)
