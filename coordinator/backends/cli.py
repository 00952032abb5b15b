"""`cachepoint-coordinator migrate`: parse, run the steps of coordinator/backends/embedded_to_shared.py
with a progress bar each, print the report (JSON with --json)."""

from __future__ import annotations

from pathlib import Path

import click

from cachepoint.console import emit_json, fail, handles_errors, human, json_option
from cachepoint.errors import EXIT_CORRUPT, InvalidInput
from cachepoint.progress import progress_bar
from coordinator.backends.embedded_to_shared import STAYS_IN_DATA, Migration, MigrationInterrupted, Report


@click.command("migrate")
@click.option(
    "--from-data",
    "from_data",
    metavar="DIR",
    type=click.Path(path_type=Path),
    required=True,
    help="The data directory of the embedded coordinator (stopped).",
)
@click.option(
    "--to", "to", default=None, metavar="URL", help="postgresql://… : an empty database [config catalog]."
)
@click.option(
    "--blocks",
    default=None,
    metavar="URL",
    help="file:///DIR : the replicas' block directory [config blocks].",
)
@json_option
@click.pass_context
@handles_errors
def migrate_cmd(
    click_ctx: click.Context, from_data: Path, to: str | None, blocks: str | None, as_json: bool
) -> None:
    """Copy a stopped embedded coordinator's whole state (records and blocks) into a PostgreSQL catalog
    and a block directory, then verify it: counts and SHA-256 per family, every block's id, the audit
    chain. Assignments, revocations and unspent join tokens go into the shared trust tables; the CA
    stays in DIR: serve it again with
    `serve --data DIR --catalog URL --blocks URL`, and no node enrolls again. Exit 5 while a coordinator
    serves DIR, 4 when the database already holds another coordinator's records (or this one's, verified),
    8 when the copy does not verify. An interrupted or unverified run of the same DIR into the same
    database is resumed by running it again: blocks already copied are not written again."""
    settings = click_ctx.find_root().obj
    catalog = to or getattr(settings, "catalog", "")
    target_blocks = blocks or getattr(settings, "blocks", "")
    if not catalog or not target_blocks:
        raise InvalidInput("say where the state goes: --to postgresql://... and --blocks file:///DIR")
    migration = Migration(from_data.absolute(), catalog, target_blocks)
    try:
        migration.open()
        try:
            report = _run(migration, as_json)
        except KeyboardInterrupt as err:
            raise MigrationInterrupted(migration.report.target, from_data) from err
    finally:
        migration.close()
    if as_json:
        emit_json(report.as_json())
    else:
        _print(report)
    if not report.verified:
        fail(
            f"the copy in {report.target} does not verify (listed above); {from_data} was left as it was "
            "and is not marked migrated: migrate again to write the records and the missing or corrupt "
            "blocks again (drop the database first if it holds records the source does not)",
            EXIT_CORRUPT,
            False,
        )


def _run(migration: Migration, as_json: bool) -> Report:
    """The steps after ``open``, each with its progress bar on a terminal."""
    records, block_count = migration.record_total, migration.totals["blocks"]
    with progress_bar(f"copy {records} records", not as_json, unit="records") as progress:
        migration.copy_records(progress)
    migration.copy_trust()
    with progress_bar(f"copy {block_count} blocks", not as_json, unit="blocks") as progress:
        migration.copy_blocks(progress)
    with progress_bar("verify", not as_json, unit="records") as progress:
        report = migration.verify(progress)
    migration.finish()
    return report


def _print(report: Report) -> None:
    click.echo(f"{report.source} -> {report.target}, blocks in {report.blocks_url}")
    if report.resumed_from:
        click.echo(
            f"  resumed the copy begun at {report.resumed_from}: {report.blocks.already_there} blocks "
            "were there already"
        )
    for family in report.families:
        state = (
            "ok"
            if family.ok
            else (f"DIFFERS: target {family.target_records} records {family.target_sha256[:19]}…")
        )
        click.echo(f"  {family.family:<14} {family.source_records:>9} records  {state}")
    b = report.blocks
    state = "ok" if b.ok else f"DIFFERS: {b.missing_count} missing, {b.corrupt_count} corrupt"
    click.echo(
        f"  {'blocks':<14} {b.blocks:>9} blocks   {human(b.bytes)}, each re-read and its id checked: {state}"
    )
    audit = report.target_audit
    if audit is not None:
        head = f", head record {audit.head_seq} sha256:{audit.head_hash}" if audit.head_seq else ""
        state = "verifies on the target" if report.audit_ok else f"DIFFERS: {audit.problem or 'another head'}"
        click.echo(f"  {'audit log':<14} {audit.records:>9} records{head}: {state}")
    if not report.verified:
        return
    kept = ", ".join(STAYS_IN_DATA)
    click.echo(
        f"verified in {report.seconds:.1f} s. {report.source}/migrated.json says where the state went: the "
        "embedded store is not served again.\n"
        f"Assignments, revocations and unspent join tokens are in the catalog now; the CA stays in "
        f"{report.source} ({kept}), so nodes keep their identities and need not enroll again. Serve it "
        f"as a replica:\n  {report.serve}\n"
        "(the catalog URL is shown without its user and password). For more replicas, copy ca/ into each "
        "one's data directory."
    )
