"""The `cachepoint` command. Handlers parse, call one function that holds the logic, and print.

Exit codes are listed in cachepoint/errors.py and README.md.

The group, its table of commands and `main` are here; the commands are in one module per area:

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
    lazy.py              the group that imports a command's module only when the command runs
"""

from __future__ import annotations

import os
import sys

import click

from cachepoint import __version__
from cachepoint.cli.context import Context
from cachepoint.cli.lazy import LazyGroup
from cachepoint.config import load_settings
from cachepoint.console import fail
from cachepoint.errors import EXIT_FAILURE, CachepointError
from cachepoint.trust.location import ENV_IDENTITY, identity_dir

__all__ = ["COMMANDS", "Context", "cli", "main"]

# Each command's module, imported when the command runs (cachepoint/cli/lazy.py);
# tests/test_cli_commands.py checks this table against the modules' own COMMANDS.
COMMANDS = {
    "init": "cachepoint.cli.store_commands:init_cmd",
    "ingest": "cachepoint.cli.store_commands:ingest_cmd",
    "tag": "cachepoint.cli.store_commands:tag_cmd",
    "rollback": "cachepoint.cli.store_commands:rollback_cmd",
    "gc": "cachepoint.cli.store_commands:gc_cmd",
    "ls": "cachepoint.cli.inspect_commands:ls_cmd",
    "log": "cachepoint.cli.inspect_commands:log_cmd",
    "show": "cachepoint.cli.inspect_commands:show_cmd",
    "export": "cachepoint.cli.inspect_commands:export_cmd",
    "diff": "cachepoint.cli.inspect_commands:diff_cmd",
    "fsck": "cachepoint.cli.inspect_commands:fsck_cmd",
    "stats": "cachepoint.cli.inspect_commands:stats_cmd",
    "publish": "cachepoint.cli.fleet_commands:publish_cmd",
    "pull": "cachepoint.cli.fleet_commands:pull_cmd",
    "serve": "cachepoint.cli.fleet_commands:serve_cmd",
    "status": "cachepoint.cli.fleet_commands:status_cmd",
    "pin": "cachepoint.cli.fleet_commands:pin_cmd",
    "attach": "cachepoint.cli.disk_commands:attach_cmd",
    "detach": "cachepoint.cli.disk_commands:detach_cmd",
    "snapshot": "cachepoint.cli.disk_commands:snapshot_cmd",
    "rebase": "cachepoint.cli.disk_commands:rebase_cmd",
    "restore": "cachepoint.cli.disk_commands:restore_cmd",
    "image": "cachepoint.cli.image_commands:image_group",
    "capture": "cachepoint.cli.capture_commands:capture_cmd",
    "watch": "cachepoint.cli.capture_commands:watch_cmd",
    "restore-dir": "cachepoint.cli.capture_commands:restore_dir_cmd",
    "repair": "cachepoint.cli.repair_command:repair_cmd",
    "scrub": "cachepoint.cli.scrub_commands:scrub_cmd",
    "enroll": "cachepoint.cli.trust_commands:enroll_cmd",
    "check-config": "cachepoint.cli.config_command:check_config_cmd",
}
CHECK_CONFIG = "check-config"


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
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
    if click_ctx.invoked_subcommand == CHECK_CONFIG:
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
