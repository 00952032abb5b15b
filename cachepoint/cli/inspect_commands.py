"""Commands that read the store: ls, log, show, diff, export, fsck, stats."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cachepoint.cli.context import Context, force_option, pass_ctx, version_json
from cachepoint.cli.scrub_commands import scrub_line
from cachepoint.console import emit_json, handles_errors, human, json_option, when
from cachepoint.errors import EXIT_CORRUPT
from cachepoint.ids import validate_layer_name
from cachepoint.layers.diff import diff_manifests
from cachepoint.layers.export import export_manifest
from cachepoint.progress import progress_bar
from cachepoint.store.fsck import fsck
from cachepoint.store.scrub import load_record
from cachepoint.store.stats import store_stats
from cachepoint.store.store import Store


@click.command("ls")
@json_option
@pass_ctx
@handles_errors
def ls_cmd(ctx: Context, as_json: bool) -> None:
    """List layers (and images)."""
    with ctx.open() as store:
        rows = []
        for layer in store.catalog.layers():
            latest = store.catalog.version(layer.name, layer.latest)
            rows.append(
                {
                    "layer": layer.name,
                    "kind": str(layer.kind),
                    "latest": layer.latest,
                    "versions": len(store.catalog.versions(layer.name)),
                    "tags": store.catalog.tags(layer.name),
                    "logical_bytes": latest.logical_bytes,
                    "updated": when(latest.created_ns),
                }
            )
        images = [{"image": i.name, "refs": list(i.refs)} for i in store.catalog.images()]
    if as_json:
        emit_json({"layers": rows, "images": images})
        return
    if not rows:
        click.echo("no layers")
    for r in rows:
        tags = ",".join(t for t in r["tags"] if t != "latest")
        click.echo(
            f"{r['layer']:<32} {r['kind']:<5} @{r['latest']:<5} {human(r['logical_bytes']):>10}  "
            f"{r['updated']}  {tags}"
        )
    for i in images:
        click.echo(f"image {i['image']}: {' '.join(i['refs'])}")


def _tags_by_version(store: Store, layer: str) -> dict[int, list[str]]:
    result: dict[int, list[str]] = {}
    for tag, number in sorted(store.catalog.tags(layer).items()):
        result.setdefault(number, []).append(tag)
    return result


@click.command("log")
@click.argument("layer")
@json_option
@pass_ctx
@handles_errors
def log_cmd(ctx: Context, layer: str, as_json: bool) -> None:
    """The versions of LAYER, newest first."""
    validate_layer_name(layer)
    with ctx.open() as store:
        tags = _tags_by_version(store, layer)
        versions = list(reversed(store.catalog.versions(layer)))
        tag_moves = store.catalog.tag_history(layer)
    if as_json:
        emit_json(
            {
                "layer": layer,
                "versions": [version_json(v, tags.get(v.number, [])) for v in versions],
                "tag_history": tag_moves,
            }
        )
        return
    for v in versions:
        labels = f" ({', '.join(tags[v.number])})" if v.number in tags else ""
        restored = f" [content of @{v.restored_from}]" if v.restored_from else ""
        click.echo(
            f"@{v.number}{labels}  {when(v.created_ns)}  {v.author}@{v.device}  {human(v.logical_bytes)}"
        )
        click.echo(f"    {v.message or '(no message)'}{restored}  {v.digest_text[:19]}")
        for label in v.labels:
            click.echo(f"    {label}")


@click.command("show")
@click.argument("ref")
@click.option("--files", is_flag=True, help="List every entry.")
@json_option
@pass_ctx
@handles_errors
def show_cmd(ctx: Context, ref: str, files: bool, as_json: bool) -> None:
    """Details of one version."""
    with ctx.open() as store:
        info = store.catalog.resolve(ref)
        manifest = store.catalog.manifest(info.manifest_digest)
        tags = _tags_by_version(store, info.layer).get(info.number, [])
    entries = [
        {
            "path": e.path,
            "type": e.type.name.lower(),
            "mode": oct(e.mode),
            "size": e.size,
            "mtime_ns": e.mtime_ns,
            "target": e.target or None,
            "blocks": e.block_count,
        }
        for e in manifest.entries
    ]
    data = version_json(info, tags)
    data.update(
        {
            "single_file": manifest.single_file,
            "entries": len(entries),
            "blocks": sum(e.block_count for e in manifest.entries),
            "holes": sum(e.block_count - len(e.stored_digests()) for e in manifest.entries),
        }
    )
    if as_json:
        if files:
            data["files"] = entries
        emit_json(data)
        return
    for key in (
        "ref",
        "kind",
        "created",
        "author",
        "device",
        "message",
        "digest",
        "parent",
        "restored_from",
        "tags",
        "logical_bytes",
        "block_size",
        "single_file",
        "entries",
        "blocks",
        "holes",
    ):
        click.echo(f"{key + ':':<15}{data[key]}")
    if files:
        for e in entries:
            click.echo(
                f"  {e['type']:<9} {e['mode']:>7} {e['size']:>12}  {e['path']}"
                + (f" -> {e['target']}" if e["target"] else "")
            )


@click.command("export")
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@force_option
@json_option
@pass_ctx
@handles_errors
def export_cmd(ctx: Context, ref: str, dest: Path, force: bool, as_json: bool) -> None:
    """Write REF out to DEST: a disk image file, or a directory tree (DEST must be new or empty unless
    --force). It appears only when complete: a failed export leaves nothing behind."""
    with ctx.open() as store:
        info = store.catalog.resolve(ref)
        manifest = store.catalog.manifest(info.manifest_digest)
        with progress_bar(f"export {info.ref}", not as_json) as progress:
            result = export_manifest(store, manifest, dest, progress, force)
    if as_json:
        emit_json({"ref": info.ref, "digest": info.digest_text, **result.as_json()})
    else:
        click.echo(f"{info.ref} -> {result.path} ({result.files} files, {human(result.logical_bytes)})")


@click.command("diff")
@click.argument("old")
@click.argument("new")
@json_option
@pass_ctx
@handles_errors
def diff_cmd(ctx: Context, old: str, new: str, as_json: bool) -> None:
    """What changed from OLD to NEW: files added, removed, changed (with byte ranges)."""
    with ctx.open() as store:
        a, b = store.catalog.resolve(old), store.catalog.resolve(new)
        result = diff_manifests(
            store.catalog.manifest(a.manifest_digest), store.catalog.manifest(b.manifest_digest)
        )
    if as_json:
        emit_json({"old": a.ref, "new": b.ref, **result.as_json()})
        return
    for path in result.added:
        click.echo(f"+ {path}")
    for path in result.removed:
        click.echo(f"- {path}")
    for change in result.changed:
        changed = sum(e - s for s, e in change.ranges)
        ranges = ", ".join(f"{s}-{e}" for s, e in change.ranges[:8])
        more = f" (+{len(change.ranges) - 8} more)" if len(change.ranges) > 8 else ""
        meta = f" [{', '.join(change.metadata)}]" if change.metadata else ""
        click.echo(f"M {change.path}{meta}  {human(changed)} in {len(change.ranges)} ranges: {ranges}{more}")
    if not (result.added or result.removed or result.changed):
        click.echo("no differences")


@click.command("fsck")
@json_option
@pass_ctx
@handles_errors
def fsck_cmd(ctx: Context, as_json: bool) -> None:
    """Verify every block and every reference; exit 8 when something is wrong."""
    with ctx.open() as store, progress_bar("fsck", not as_json, unit="blocks") as progress:
        report = fsck(store, progress)
        last_scrub = load_record(store).last  # the last scrub pass's result (cachepoint/scrub.py)
    if as_json:
        emit_json({**report.as_json(), "scrub": last_scrub})
    else:
        click.echo(
            f"{report.versions} versions, {report.blocks_checked} blocks "
            f"({human(report.bytes_verified)}) verified, "
            f"{report.unreferenced_blocks} unreferenced blocks"
        )
        for item in report.interrupted_ingests:
            click.echo(f"interrupted ingest: {item} (its blocks are garbage; gc removes them)")
        for p in report.problems:
            versions = f" — touches {', '.join(p.versions)}" if p.versions else ""
            click.echo(f"PROBLEM {p.kind}: {p.subject}: {p.detail}{versions}")
        click.echo(scrub_line(last_scrub))
        click.echo("ok" if report.ok else f"{len(report.problems)} problems")
    if not report.ok:
        sys.exit(EXIT_CORRUPT)


@click.command("stats")
@json_option
@pass_ctx
@handles_errors
def stats_cmd(ctx: Context, as_json: bool) -> None:
    """Space used: logical versus stored bytes, dedup and compression ratios."""
    with ctx.open() as store:
        stats = store_stats(store)
    if as_json:
        emit_json(stats.as_json())
        return
    click.echo(f"layers {stats.layers}, versions {stats.versions}, blocks {stats.blocks}")
    click.echo(
        f"logical {human(stats.logical_bytes)}, stored {human(stats.stored_bytes)} "
        f"(on disk {human(stats.disk_bytes)})"
    )
    click.echo(
        f"dedup {stats.dedup_ratio}x, compression {stats.compression_ratio}x, overall {stats.savings_ratio}x"
    )


COMMANDS: tuple[click.Command, ...] = (ls_cmd, log_cmd, show_cmd, export_cmd, diff_cmd, fsck_cmd, stats_cmd)
