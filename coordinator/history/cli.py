"""`cachepoint-coordinator history ...`: ask a running coordinator about users' history, holds, GC and
the audit log. Handlers parse, call the client, and print (JSON with --json). Two commands work
offline: `audit verify --data DIR` on a coordinator's data directory and `verify-export` on a tar."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from cachepoint.atomic import check_destination
from cachepoint.console import emit_json, fail, handles_errors, human, json_option, when
from cachepoint.errors import EXIT_CORRUPT, InvalidInput
from cachepoint.ids import Ref
from cachepoint.layers.ingest import default_author
from cachepoint.progress import progress_bar
from cachepoint.rpc import replicas
from cachepoint.store.store import Store
from coordinator.catalog.clock import CLOCK_TOLERANCE_NS, span
from coordinator.history.audit import AuditLog, AuditRecord, Verdict
from coordinator.history.client import HistoryClient
from coordinator.history.destination import file_target, receive
from coordinator.history.evidence import verify_evidence
from coordinator.history.query import FileVersion, check_path
from coordinator.history.times import iso, parse_time
from coordinator.history.users import validate_user

ENV_COORDINATOR = "CACHEPOINT_COORDINATOR"
DEFAULT_COORDINATOR = "127.0.0.1:7400"
T = TypeVar("T")


def _configured_coordinator(click_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """--coordinator, else the environment, else `coordinator` in the config (--config), else loopback."""
    settings = click_ctx.find_root().obj
    return value or getattr(settings, "coordinator", "") or DEFAULT_COORDINATOR


coordinator_option = click.option(
    "--coordinator",
    "address",
    envvar=ENV_COORDINATOR,
    default=None,
    callback=_configured_coordinator,
    help=f"HOST:PORT of the running coordinator [env {ENV_COORDINATOR}; config coordinator; "
    f"{DEFAULT_COORDINATOR}].",
)
actor_option = click.option(
    "--actor", default=None, help="Who is acting, for the audit log [default: the login name]."
)
layer_option = click.option(
    "--layer", default="home", show_default=True, help="The user's layer: user/USER/LAYER."
)
from_option = click.option(
    "--from", "from_text", default=None, metavar="TIME", help="Versions made at or after TIME."
)
to_option = click.option(
    "--to", "to_text", default=None, metavar="TIME", help="Versions made at or before TIME."
)


def _times(from_text: str | None, to_text: str | None) -> tuple[int, int]:
    from_ns = parse_time(from_text, "--from") if from_text else 0
    to_ns = parse_time(to_text, "--to", end=True) if to_text else 0
    return from_ns, to_ns


def _call(address: str, work: Callable[[HistoryClient], Awaitable[T]]) -> T:
    async def run() -> T:
        async with HistoryClient(await replicas.reachable(address)) as client:
            return await work(client)

    return asyncio.run(run())


@click.group("history")
def history_group() -> None:
    """Users' history at the coordinator: timelines, files, holds, retention GC, audit, evidence.

    TIME is ISO 8601 (2026-11-26T13:54:57Z, 2026-11-26; no offset means UTC), now, or now-DURATION
    (now-2h, now-30d).
    """


# -- reads -----------------------------------------------------------------------------------------


def _changes_text(changes: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{name} +{c['added']} ~{c['changed']} -{c['removed']}" for name, c in changes.items())


@history_group.command("timeline")
@click.argument("user")
@from_option
@to_option
@click.option("--layer", default="", help="Only user/USER/LAYER [every layer of the user].")
@coordinator_option
@json_option
@handles_errors
def timeline_cmd(
    user: str, from_text: str | None, to_text: str | None, layer: str, address: str, as_json: bool
) -> None:
    """Every version of USER's layers from every device, oldest first, with labels and changes."""
    validate_user(user)
    from_ns, to_ns = _times(from_text, to_text)
    found = _call(address, lambda c: c.timeline(user, from_ns, to_ns, layer))
    data = found.as_json()
    if as_json:
        emit_json(data)
        return
    if not data["versions"]:
        click.echo(f"no versions of {user} in that time range")
    for v in data["versions"]:
        tags = f" ({', '.join(v['tags'])})" if v["tags"] else ""
        click.echo(
            f"{when(v['created_ns'])}  {v['ref']}{tags}  {v['device'] or '?'}  {v['author']}  "
            f"{human(v['logical_bytes'])}  {v['message'] or '(no message)'}"
        )
        if abs(v["clock_skew_ns"]) > CLOCK_TOLERANCE_NS:
            click.echo(f"    device clock {span(v['clock_skew_ns'])}: it said {when(v['device_created_ns'])}")
        for label in v["labels"]:
            click.echo(f"    {label}")
        if v["changes"]:
            click.echo(f"    changes: {_changes_text(v['changes'])}")


@history_group.command("file")
@click.argument("user")
@click.argument("path")
@layer_option
@coordinator_option
@json_option
@handles_errors
def file_cmd(user: str, path: str, layer: str, address: str, as_json: bool) -> None:
    """Every version of one file of USER: time, device, size, SHA-256."""
    validate_user(user)
    check_path(path)
    found = _call(address, lambda c: c.file_history(user, layer, path))
    if as_json:
        emit_json(found.as_json())
        return
    for v in found.versions:
        what = v.sha256 or (f"-> {v.target}" if v.target else v.type.name.lower())
        click.echo(
            f"{when(v.created_ns)}  {v.ref}  {v.device or '?':<12} {human(v.size):>10}  {what}  {v.state}"
        )


@history_group.command("diff")
@click.argument("old")
@click.argument("new")
@coordinator_option
@json_option
@handles_errors
def diff_cmd(old: str, new: str, address: str, as_json: bool) -> None:
    """What changed from OLD to NEW (refs: LAYER@N, LAYER:TAG, LAYER)."""
    a, b = Ref.parse(old), Ref.parse(new)
    result = _call(address, lambda c: c.diff(a, b))
    if as_json:
        emit_json(result.as_json())
        return
    for path in result.diff.added:
        click.echo(f"+ {path}")
    for path in result.diff.removed:
        click.echo(f"- {path}")
    for change in result.diff.changed:
        meta = f" [{', '.join(change.metadata)}]" if change.metadata else ""
        changed = sum(e - s for s, e in change.ranges)
        click.echo(f"M {change.path}{meta}  {human(changed)} in {len(change.ranges)} ranges")
    if not (result.diff.added or result.diff.removed or result.diff.changed):
        click.echo("no differences")


@history_group.command("get")
@click.argument("user")
@click.argument("path")
@click.option("--at", "at_text", default=None, metavar="TIME", help="The file as it was then [now].")
@layer_option
@click.option(
    "-o",
    "--output",
    type=click.Path(),  # the text as typed: a trailing slash says "a directory"
    default=None,
    help="A file to write, or a directory to write it into under its own name (DIR/ is made if "
    "missing) [standard output].",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the output file if it exists (it stays as it was until the new one is complete).",
)
@actor_option
@coordinator_option
@json_option
@handles_errors
def get_cmd(
    user: str,
    path: str,
    at_text: str | None,
    layer: str,
    output: str | None,
    force: bool,
    actor: str | None,
    address: str,
    as_json: bool,
) -> None:
    """PATH of USER as it was at TIME, from the newest version made at or before it (audited)."""
    validate_user(user)
    check_path(path)
    if output is None and as_json:
        raise InvalidInput("--json prints a summary: say where the file goes with -o/--output")
    at_ns = parse_time(at_text, "--at", end=True) if at_text else 0
    target = file_target(output, path) if output is not None else None
    if target is not None:
        check_destination(target, tree=False, force=force)  # before the coordinator is asked (and audits)

    async def work(client: HistoryClient) -> tuple[FileVersion, _Tally]:
        header, chunks = await client.get_file(user, layer, path, at_ns, actor or default_author())
        with progress_bar(f"get {path}", not as_json and target is not None) as progress:
            tally = _Tally(header.size, progress)
            if target is None:
                async for chunk in tally.count(chunks):
                    sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            else:
                await receive(tally.count(chunks), target, force=force, mode=header.mode)
        return header, tally

    header, tally = _call(address, work)
    if target is None:
        return
    summary = {
        **header.as_json(),
        "sha256": tally.sha256,  # of the bytes written, which the client checked against the sender's
        "at": iso(at_ns) if at_ns else None,
        "written": str(target),
        "bytes": tally.done,
    }
    written = tally.done
    if as_json:
        emit_json(summary)
    else:
        made = f"{header.device or '?'}, {when(header.created_ns)}"
        click.echo(f"{target}: {human(written)} from {header.ref} ({made})")


class _Tally:
    """Counts and hashes the bytes of a transfer as they pass, and shows progress."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.progress = progress
        self.done = 0
        self._digest = hashlib.sha256()

    async def count(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.done += len(chunk)
            self._digest.update(chunk)
            if self.progress is not None:
                self.progress(self.done, self.total)
            yield chunk

    @property
    def sha256(self) -> str:
        return f"sha256:{self._digest.hexdigest()}"


# -- holds and GC ----------------------------------------------------------------------------------


@history_group.command("hold")
@click.argument("user")
@click.option("--reason", required=True, help="Why (recorded with the hold and in the audit log).")
@actor_option
@coordinator_option
@json_option
@handles_errors
def hold_cmd(user: str, reason: str, actor: str | None, address: str, as_json: bool) -> None:
    """Put USER on legal hold: none of their versions or blocks is deleted until it is released."""
    validate_user(user)
    hold = _call(address, lambda c: c.set_hold(user, reason, actor or default_author()))
    if as_json:
        emit_json(hold.as_json())
    else:
        click.echo(f"{hold.user} on hold since {when(hold.set_ns)} by {hold.actor}: {hold.reason}")


@history_group.command("release")
@click.argument("user")
@actor_option
@coordinator_option
@json_option
@handles_errors
def release_cmd(user: str, actor: str | None, address: str, as_json: bool) -> None:
    """Release USER's legal hold (retention applies again at the next GC)."""
    validate_user(user)
    hold = _call(address, lambda c: c.release_hold(user, actor or default_author()))
    if as_json:
        emit_json({"released": hold.as_json()})
    else:
        click.echo(f"released {hold.user} (held since {when(hold.set_ns)} by {hold.actor}: {hold.reason})")


@history_group.command("holds")
@coordinator_option
@json_option
@handles_errors
def holds_cmd(address: str, as_json: bool) -> None:
    """Every legal hold: user, who set it, when, why."""
    found = _call(address, lambda c: c.holds())
    if as_json:
        emit_json({"holds": [h.as_json() for h in found]})
        return
    if not found:
        click.echo("no holds")
    for h in found:
        click.echo(f"{h.user:<20} {when(h.set_ns)}  {h.actor:<16} {h.reason}")


@history_group.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@actor_option
@coordinator_option
@json_option
@handles_errors
def gc_cmd(dry_run: bool, actor: str | None, address: str, as_json: bool) -> None:
    """Delete the versions no retention policy keeps (never a held user's), then unreferenced blocks."""
    report = _call(address, lambda c: c.collect(actor or default_author(), dry_run))
    if as_json:
        emit_json(report.as_json())
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(report.deleted)} versions, kept {report.kept}")
    for ref in report.deleted:
        click.echo(f"  - {ref}")
    if report.held:
        click.echo(f"kept only by a legal hold: {' '.join(report.held)}")
    if not dry_run:
        click.echo(f"removed {report.blocks_removed} blocks, freed {human(report.bytes_freed)}")


# -- audit -----------------------------------------------------------------------------------------


@history_group.group("audit")
def audit_group() -> None:
    """The coordinator's hash-chained audit log."""


def _offline_verdict(data: Path) -> Verdict:
    with Store.open(data) as store:  # read-only: works next to a running coordinator too
        return AuditLog(store.db).verify()


@audit_group.command("verify")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Verify the log in this coordinator data directory, without a running coordinator.",
)
@coordinator_option
@json_option
@handles_errors
def audit_verify_cmd(data: Path | None, address: str, as_json: bool) -> None:
    """Recompute the chain; name the first record that does not verify (exit 8)."""
    verdict = _offline_verdict(data) if data is not None else _call(address, lambda c: c.verify_audit())
    if as_json:
        emit_json(verdict.as_json())
    elif verdict.ok:
        head = f"; head: record {verdict.head_seq} sha256:{verdict.head_hash}" if verdict.head_seq else ""
        click.echo(f"audit log ok: {verdict.records} records{head}")
    if not verdict.ok:
        fail(
            f"audit record {verdict.first_broken} does not verify: {verdict.problem} "
            f"({verdict.records} records before it verify)",
            EXIT_CORRUPT,
            False,
        )


@audit_group.command("list")
@click.option("--after", default=0, show_default=True, help="Records after this seq.")
@click.option("--limit", default=1000, show_default=True, help="At most this many (up to 10000).")
@click.option("--subject", default="", help="Only about this subject or below it, e.g. user/alice.")
@coordinator_option
@json_option
@handles_errors
def audit_list_cmd(after: int, limit: int, subject: str, address: str, as_json: bool) -> None:
    """Audit records, oldest first: who did what to what, and when."""
    records: list[AuditRecord] = _call(address, lambda c: c.audit_records(after, limit, subject))
    if as_json:
        emit_json({"records": [r.as_json() for r in records]})
        return
    for r in records:
        details = ", ".join(f"{k}={v}" for k, v in r.details.items())
        click.echo(f"{r.seq:>6}  {when(r.time_ns)}  {r.actor:<14} {r.action:<17} {r.subject}  {details}")


# -- evidence --------------------------------------------------------------------------------------


@history_group.command("export")
@click.argument("user")
@click.argument("out", type=click.Path(path_type=Path))
@from_option
@to_option
@actor_option
@coordinator_option
@json_option
@handles_errors
def export_cmd(
    user: str,
    out: Path,
    from_text: str | None,
    to_text: str | None,
    actor: str | None,
    address: str,
    as_json: bool,
) -> None:
    """Write OUT (a new tar): USER's file versions in the range, their SHA-256 manifest, the timeline and
    the audit records about USER. Check it with `verify-export`."""
    validate_user(user)
    from_ns, to_ns = _times(from_text, to_text)
    if out.is_dir() or not out.parent.is_dir():
        raise InvalidInput(f"cannot write {out}: name a new file in an existing directory")
    check_destination(out, tree=False, force=False)

    async def work(client: HistoryClient) -> int:
        with progress_bar(f"export {user}", not as_json) as progress:
            chunks = client.export(user, from_ns, to_ns, actor or default_author(), progress)
            return await receive(chunks, out, force=False)  # evidence is never written over

    written = _call(address, work)
    check = verify_evidence(str(out))  # what arrived is what the coordinator built
    if not check.ok:
        fail(f"{out} was written but does not verify: {check.problems[0]}", EXIT_CORRUPT, as_json)
    summary = {"export": str(out), "bytes": written, **check.as_json()}
    if as_json:
        emit_json(summary)
    else:
        click.echo(
            f"{out}: {human(written)}, {check.files} file versions, {check.audit_records} audit records"
        )


@history_group.command("verify-export")
@click.argument("tar", type=click.Path(path_type=Path))
@json_option
@handles_errors
def verify_export_cmd(tar: Path, as_json: bool) -> None:
    """Check an export on its own (no coordinator): every digest, member and audit record (exit 8)."""
    check = verify_evidence(str(tar))
    if as_json:
        emit_json(check.as_json())
    elif check.ok:
        click.echo(
            f"{tar}: ok ({check.user}: {check.files} file versions, {check.members} members, "
            f"{check.audit_records} audit records)"
        )
    if not check.ok:
        more = f" (and {len(check.problems) - 1} more problems)" if len(check.problems) > 1 else ""
        fail(f"{tar} does not verify: {check.problems[0]}{more}", EXIT_CORRUPT, False)
