"""`cachepoint repair`: salvage a damaged store and say what was recovered and what was lost."""

from __future__ import annotations

import click

from cachepoint.cli.context import Context, pass_ctx
from cachepoint.console import emit_json, handles_errors, json_option
from cachepoint.errors import EXIT_CORRUPT
from cachepoint.progress import progress_bar
from cachepoint.store.repair import HealFn, RepairReport, repair
from cachepoint.store.store import Store


def print_report(report: RepairReport) -> None:
    """The human form of a repair report (shared with `cachepoint-coordinator repair`)."""
    click.echo(f"store {report.store}: database {report.database}")
    for line in report.damage:
        click.echo(f"  damage: {line}")
    for path in report.files_set_aside:
        click.echo(f"  set aside: {path}")
    if report.records_salvaged or report.blocks_salvaged:
        salvaged = f"{report.records_salvaged} records, {report.blocks_salvaged} blocks"
        click.echo(f"  salvaged from damaged files: {salvaged}")
    for family, count in sorted(report.recovered_from_journal.items()):
        click.echo(f"  recovered from the journal: {count} {family} records")
    for family, count in sorted(report.kept_not_in_journal.items()):
        click.echo(f"  kept (not in the journal): {count} {family} records")
    for line in report.fixed:
        click.echo(f"  fixed: {line}")
    click.echo(
        f"  blocks: {report.blocks_checked} checked, {report.blocks_bad} bad or missing, "
        f"{report.blocks_healed} re-fetched"
    )
    for ref in report.lost_versions:
        click.echo(f"  LOST version {ref}")
    for line in report.lost_records:
        click.echo(f"  LOST {line}")
    for block in report.lost_blocks[:20]:
        click.echo(f"  LOST block {block}")
    if len(report.lost_blocks) > 20:
        click.echo(f"  LOST ... and {len(report.lost_blocks) - 20} more blocks")
    for ref, count in sorted(report.incomplete_versions.items()):
        click.echo(f"  INCOMPLETE {ref}: {count} blocks lost (its export fails naming them)")
    if report.journal:
        click.echo(f"  journal {report.journal}")
    click.echo(
        "repaired: nothing lost" if report.ok else "repaired what could be; the losses are listed above"
    )


def heal_from(coordinator: str, ctx: Context) -> HealFn:
    """Re-fetch bad or missing blocks from the fleet behind ``coordinator`` (site peers first)."""

    def heal(store: Store, digests: list[bytes]) -> set[bytes]:
        import asyncio

        from cachepoint.replication.heal import heal_blocks

        result = asyncio.run(heal_blocks(store, digests, coordinator, node_id=ctx.settings.node_id))
        return set(result.healed)

    return heal


@click.command("repair")
@click.option(
    "--coordinator",
    "coordinator",
    metavar="HOST:PORT",
    default=None,
    help="Re-fetch damaged or lost blocks from this coordinator's fleet [config coordinator].",
)
@json_option
@pass_ctx
@handles_errors
def repair_cmd(ctx: Context, coordinator: str | None, as_json: bool) -> None:
    """Salvage a damaged store: rebuild the database from its readable files, the catalog from its
    journal, re-fetch bad blocks from the fleet, and list exactly what was recovered and what was lost
    (exit 8 when anything was lost). Run it with the daemon stopped."""
    origin = coordinator or ctx.settings.coordinator
    heal = heal_from(origin, ctx) if origin else None
    # The reserve is released first, so repair runs on a full disk too (cachepoint/store/headroom.py).
    with ctx.headroom(), progress_bar("repair: verifying blocks", not as_json, unit="blocks") as progress:
        report = repair(ctx.store_path, heal=heal, progress=progress)
    if as_json:
        emit_json(report.as_json())
    else:
        print_report(report)
    if not report.ok:
        raise SystemExit(EXIT_CORRUPT)


COMMANDS: tuple[click.Command, ...] = (repair_cmd,)
