"""The file-level capture commands of `cachepoint`: capture, watch, restore-dir.

Each runs here on the store, or through the daemon that holds it (cachepoint/capture/backend.py),
which queues new user/ versions for the coordinator.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click

from cachepoint.blocks import parse_block_size
from cachepoint.capture.backend import Where, captures
from cachepoint.capture.classify import parse_classes
from cachepoint.capture.engine import CaptureReport, user_layer
from cachepoint.capture.restore import RestoreResult, restore_dir
from cachepoint.capture.watch import WatchOptions, watch
from cachepoint.cli.context import Context, message_option
from cachepoint.config import parse_duration
from cachepoint.console import emit_json, handles_errors, human, json_option, warn
from cachepoint.ids import Ref
from cachepoint.progress import progress_bar

directory_argument = click.argument("directory", type=click.Path(path_type=Path))
user_option = click.option("--user", required=True, help="Whose layer: user/USER/home unless --layer says.")
layer_option = click.option(
    "--layer", default=None, metavar="LAYER", help="One of USER's layers instead, e.g. user/USER/profile."
)


def _where(ctx: Context) -> Where:
    return Where(ctx.store_path, ctx.author, ctx.device, parse_block_size(ctx.settings.block_size))


def _warn_skipped(report: CaptureReport) -> None:
    if report.skipped:
        listed = ", ".join(f"{p} ({why})" for p, why in report.skipped[:10])
        more = f" and {len(report.skipped) - 10} more" if len(report.skipped) > 10 else ""
        warn(f"skipped {len(report.skipped)} entries: {listed}{more}")


def _changes_text(report: CaptureReport) -> str:
    parts = []
    for c in report.changes:
        if c.added or c.changed or c.removed:
            parts.append(f"{c.file_class} +{c.added} ~{c.changed} -{c.removed}")
    return ", ".join(parts) or "no file changed"


def _report_line(report: CaptureReport) -> str:
    if report.unchanged:
        return f"{report.ref} unchanged ({report.files} files, none changed since)"
    return (
        f"{report.ref}  {report.files} files, {report.files_read} read ({human(report.bytes_read)}), "
        f"{report.new_blocks} new blocks ({human(report.new_stored_bytes)} stored); {_changes_text(report)}"
    )


@click.command("capture")
@directory_argument
@user_option
@layer_option
@message_option
@json_option
@click.pass_obj
@handles_errors
def capture_cmd(
    ctx: Context, directory: Path, user: str, layer: str | None, message: str, as_json: bool
) -> None:
    """Snapshot DIRECTORY (a home directory, a profile) as a new version of a user layer.

    Files unchanged since the last capture (size, mtime, inode) are not read again; a changed large
    file costs only its changed blocks. Files are sorted into apps, config and data; apps that appear
    or disappear label the version ("app installed: DIR"). Nothing changed: no new version.
    """
    target = user_layer(user, layer)
    with captures(_where(ctx)) as backend:
        with progress_bar(f"capture {target}", not as_json and not backend.through_daemon) as progress:
            report = backend.capture(target, directory, message, progress=progress)
    _warn_skipped(report)
    if as_json:
        emit_json(report.as_json())
        return
    click.echo(_report_line(report))
    for label in report.labels:
        click.echo(f"  {label}")


@click.command("watch")
@directory_argument
@user_option
@layer_option
@message_option
@click.option("--interval", default="5s", show_default=True, help="How often to look at the tree.")
@click.option("--debounce", default="2s", show_default=True, help="Quiet time before a capture.")
@click.option("--max-captures", type=int, default=0, help="Stop after this many new versions (0: never).")
@click.option("--for", "run_for", default="0", metavar="DURATION", help="Stop after this long (0: never).")
@json_option
@click.pass_obj
@handles_errors
def watch_cmd(
    ctx: Context,
    directory: Path,
    user: str,
    layer: str | None,
    message: str,
    interval: str,
    debounce: str,
    max_captures: int,
    run_for: str,
    as_json: bool,
) -> None:
    """Capture DIRECTORY whenever it has changed and then stayed quiet for --debounce.

    Stops on SIGINT or SIGTERM (a capture in progress finishes first), after --max-captures new
    versions, or after --for. With --json, one line of JSON per capture.
    """
    target = user_layer(user, layer)
    options = WatchOptions(
        parse_duration(interval), parse_duration(debounce), max_captures, parse_duration(run_for)
    )
    where = _where(ctx)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    def capture_now() -> CaptureReport:
        with captures(where) as backend:
            report = backend.capture(target, directory, message)
        _warn_skipped(report)
        if not report.unchanged:
            if as_json:
                click.echo(json.dumps(report.as_json()))
            else:
                click.echo(_report_line(report) + "".join(f"; {label}" for label in report.labels))
        return report

    def on_error(err: Exception) -> None:
        warn(f"capture of {directory} failed, will try again: {err}")

    made = watch(directory, capture_now, options, stop, on_error, where.store)
    if not as_json:
        click.echo(f"watch of {directory} ended: {made} new versions of {target}")


def _restore_ref(layer: str, to: str) -> Ref:
    """``--to`` takes a full ref, or ``@N`` / ``N`` for a version of the layer being restored."""
    if to.startswith("@"):
        to = layer + to
    elif to.isdigit():
        to = f"{layer}@{to}"
    return Ref.parse(to)


@click.command("restore-dir")
@directory_argument
@user_option
@layer_option
@click.option("--to", "to", required=True, metavar="REF", help="The version to go back to (REF, @N or N).")
@click.option(
    "--only",
    "only",
    required=True,
    metavar="CLASSES",
    help="What to bring back: apps, config, data (comma-separated).",
)
@message_option
@json_option
@click.pass_obj
@handles_errors
def restore_dir_cmd(
    ctx: Context,
    directory: Path,
    user: str,
    layer: str | None,
    to: str,
    only: str,
    message: str,
    as_json: bool,
) -> None:
    """Bring the --only classes of files in DIRECTORY back to REF; keep the other classes as today.

    `--only apps,config` undoes software installs and settings but keeps today's data files; `--only
    data` does the reverse. Today's state is captured first, and the result is always a new version.
    Nothing is ever written outside DIRECTORY or through a symlink.
    """
    target = user_layer(user, layer)
    classes = parse_classes(only)
    ref = _restore_ref(target, to)
    with captures(_where(ctx)) as backend:
        with progress_bar(f"restore-dir {target}", not as_json) as progress:
            result = restore_dir(backend, target, directory, ref, classes, message, progress)
    _print_restore(result, as_json)


def _print_restore(result: RestoreResult, as_json: bool) -> None:
    if as_json:
        emit_json(result.as_json())
        return
    kept = ", ".join(c for c in ("apps", "config", "data") if c not in result.only)
    click.echo(
        f"{result.result.ref}: {', '.join(result.only)} from {result.to}"
        + (f", {kept} kept as they were" if kept else "")
        + f"; {result.written} entries written, {result.removed} removed"
        + f" (today's state saved as {result.saved.ref})"
    )
    for label in result.result.labels:
        click.echo(f"  {label}")
    if result.kept:
        warn(
            f"kept today's entry at {len(result.kept)} paths that changed class or type: "
            + ", ".join(result.kept[:10])
        )
    if result.left_in_place:
        warn(f"left in place (files were added while restoring): {', '.join(result.left_in_place[:10])}")


COMMANDS: tuple[click.Command, ...] = (capture_cmd, watch_cmd, restore_dir_cmd)
