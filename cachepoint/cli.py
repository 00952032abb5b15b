"""The `cachepoint` command. Handlers parse, call one function that holds the logic, and print.

Exit codes are listed in cachepoint/errors.py and docs/cli.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from cachepoint import __version__
from cachepoint.blocks import parse_block_size
from cachepoint.config import Settings, load_settings, parse_byte_size, parse_duration
from cachepoint.console import emit_json, fail, handles_errors, human, json_option, warn, when
from cachepoint.disk.attach import resolve_stack
from cachepoint.errors import EXIT_CORRUPT, EXIT_FAILURE, CachepointError, InvalidInput, StoreBusy
from cachepoint.ids import Ref, validate_layer_name
from cachepoint.layers.composite import composite
from cachepoint.layers.diff import diff_manifests
from cachepoint.layers.export import export_manifest, export_single, export_tree
from cachepoint.layers.ingest import IngestOptions, default_author, ingest
from cachepoint.layers.rollback import rollback
from cachepoint.model import LayerKind, VersionInfo
from cachepoint.progress import progress_bar
from cachepoint.replication.ratelimit import class_limits
from cachepoint.store.fsck import fsck
from cachepoint.store.gc import collect
from cachepoint.store.stats import store_stats
from cachepoint.store.store import Store

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def store_path(self) -> Path:
        return Path(self.settings.store)

    def open(self, writable: bool = False, create: bool = False) -> Store:
        return Store.open(self.store_path, writable=writable, create=create)

    @property
    def author(self) -> str:
        return self.settings.author or default_author()

    @property
    def device(self) -> str:
        return self.settings.device or os.uname().nodename


pass_ctx = click.make_pass_decorator(Context)
kind_option = click.option(
    "--kind", type=click.Choice(["os", "app", "user"]), default=None, help="Layer kind (new layers)."
)
message_option = click.option("-m", "--message", default="", help="What this version is.")
block_size_option = click.option(
    "--block-size", default=None, help="Block size of a new layer: 4K..4M, a power of two [64K]."
)
tag_option = click.option(
    "--tag", "tags", multiple=True, help="Also point this tag at the new version (repeatable)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store",
    envvar="CACHEPOINT_STORE",
    metavar="DIR",
    help="Store directory [env CACHEPOINT_STORE].",
)
@click.option("--config", "config", metavar="FILE", help="TOML config [env CACHEPOINT_CONFIG].")
@click.version_option(__version__, prog_name="cachepoint")
@click.pass_context
def cli(click_ctx: click.Context, store: str | None, config: str | None) -> None:
    """Versioned, deduplicated, layered disk images.

    Refs name versions: LAYER@N (a number), LAYER:TAG (a tag), LAYER (= LAYER:latest).
    """
    try:
        click_ctx.obj = Context(load_settings(config, store))
    except CachepointError as err:
        fail(str(err), err.exit_code, False)


@cli.command("init")
@json_option
@pass_ctx
@handles_errors
def init_cmd(ctx: Context, as_json: bool) -> None:
    """Create an empty store (ingest creates one too)."""
    with ctx.open(writable=True, create=True) as store:
        result = {"store": str(store.root), "format_version": 1}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"store ready at {ctx.store_path}")


@cli.command("ingest")
@click.argument("layer")
@click.argument("path", type=click.Path(path_type=Path))
@kind_option
@message_option
@block_size_option
@tag_option
@json_option
@pass_ctx
@handles_errors
def ingest_cmd(
    ctx: Context,
    layer: str,
    path: Path,
    kind: str | None,
    message: str,
    block_size: str | None,
    tags: tuple[str, ...],
    as_json: bool,
) -> None:
    """Make a new version of LAYER from PATH (a disk image file or a directory tree)."""
    validate_layer_name(layer)
    requested = parse_block_size(block_size) if block_size else None
    layer_kind = LayerKind.parse(kind) if kind else _kind_from_name(layer)
    options = IngestOptions(
        layer=layer,
        kind=layer_kind,
        message=message,
        author=ctx.author,
        device=ctx.device,
        block_size=requested,
        new_layer_block_size=parse_block_size(ctx.settings.block_size),
        tags=tags,
    )
    try:
        store = ctx.open(writable=True, create=True)
    except StoreBusy:
        # A daemon holds the store: let it do the ingest (and queue a user/ version for the coordinator).
        from cachepoint.status import ingest_via_daemon

        data = asyncio.run(ingest_via_daemon(ctx.store_path, path, options))
        if as_json:
            emit_json(data)
        else:
            click.echo(
                f"{data['ref']}  {human(data['logical_bytes'])} logical, {human(data['new_bytes'])} new "
                f"(through the daemon)"
            )
        return
    with store, progress_bar(f"ingest {layer}", not as_json) as progress:
        result = ingest(store, path, options, progress)
    if result.skipped:
        listed = ", ".join(f"{p} ({why})" for p, why in result.skipped[:10])
        more = f" and {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
        warn(f"skipped {len(result.skipped)} entries of unsupported types: {listed}{more}")
    if as_json:
        emit_json(result.as_json())
        return
    v = result.version
    assert v is not None
    click.echo(
        f"{v.ref}  {human(result.logical_bytes)} logical, {human(result.new_bytes)} new "
        f"({human(result.new_stored_bytes)} stored), {result.reused} unchanged blocks skipped, "
        f"{result.seconds:.2f}s"
    )


def _writable_or_daemon(ctx: Context) -> Store | None:
    """The store opened for writing, or None when a running daemon holds it (then ask the daemon)."""
    from cachepoint.errors import NotFound
    from cachepoint.status import daemon_address

    try:
        return ctx.open(writable=True)
    except StoreBusy as busy:
        try:
            daemon_address(ctx.store_path)
        except NotFound:
            raise busy from None  # another command holds it, not a daemon: nothing to ask
        return None


def _via_daemon(ctx: Context, method: str, request: object) -> Any:
    from cachepoint.status import agent_call

    return asyncio.run(agent_call(ctx.store_path, method, request))


def _kind_from_name(layer: str) -> LayerKind:
    head = layer.split("/", 1)[0]
    return LayerKind.parse(head) if head in ("os", "app", "user") else LayerKind.APP


@cli.command("ls")
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


def _version_json(info: VersionInfo, tags: list[str]) -> dict[str, object]:
    return {
        "ref": info.ref,
        "layer": info.layer,
        "version": info.number,
        "parent": info.parent or None,
        "created": when(info.created_ns),
        "created_ns": info.created_ns,
        "author": info.author,
        "device": info.device,
        "message": info.message,
        "digest": info.digest_text,
        "kind": str(info.kind),
        "logical_bytes": info.logical_bytes,
        "block_size": info.block_size,
        "restored_from": info.restored_from or None,
        "tags": tags,
        "labels": list(info.labels),
        "changes": {
            c.file_class: {"added": c.added, "changed": c.changed, "removed": c.removed} for c in info.changes
        },
    }


def _tags_by_version(store: Store, layer: str) -> dict[int, list[str]]:
    result: dict[int, list[str]] = {}
    for tag, number in sorted(store.catalog.tags(layer).items()):
        result.setdefault(number, []).append(tag)
    return result


@cli.command("log")
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
                "versions": [_version_json(v, tags.get(v.number, [])) for v in versions],
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


@cli.command("show")
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
    data = _version_json(info, tags)
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


@cli.command("tag")
@click.argument("ref")
@click.argument("tag")
@json_option
@pass_ctx
@handles_errors
def tag_cmd(ctx: Context, ref: str, tag: str, as_json: bool) -> None:
    """Point TAG of the layer at REF (every move is recorded)."""
    store = _writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import catalog_pb2
        from cachepoint.wire import ref_to_pb, version_from_pb

        request = catalog_pb2.SetTagRequest(ref=ref_to_pb(Ref.parse(ref)), tag=tag, actor=ctx.author)
        info = version_from_pb(_via_daemon(ctx, "SetTag", request))
    else:
        with store:
            info = store.catalog.set_tag(ref, tag, ctx.author)
    if as_json:
        emit_json({"layer": info.layer, "tag": tag, "version": info.number, "ref": info.ref})
    else:
        click.echo(f"{info.layer}:{tag} -> @{info.number}")


@cli.command("export")
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@json_option
@pass_ctx
@handles_errors
def export_cmd(ctx: Context, ref: str, dest: Path, as_json: bool) -> None:
    """Write REF out to DEST: a disk image file, or a directory tree (DEST must be new or empty)."""
    with ctx.open() as store:
        info = store.catalog.resolve(ref)
        manifest = store.catalog.manifest(info.manifest_digest)
        with progress_bar(f"export {info.ref}", not as_json) as progress:
            result = export_manifest(store, manifest, dest, progress)
    if as_json:
        emit_json({"ref": info.ref, "digest": info.digest_text, **result.as_json()})
    else:
        click.echo(f"{info.ref} -> {result.path} ({result.files} files, {human(result.logical_bytes)})")


@cli.command("diff")
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


@cli.command("rollback")
@click.argument("layer")
@click.option(
    "--to", "to", required=True, help="The version whose content to bring back (LAYER@N or LAYER:TAG)."
)
@click.option("-m", "--message", default="", help="Message of the new version.")
@json_option
@pass_ctx
@handles_errors
def rollback_cmd(ctx: Context, layer: str, to: str, message: str, as_json: bool) -> None:
    """Make a new version of LAYER with the content of an older one (later versions stay listed)."""
    validate_layer_name(layer)
    target = Ref.parse(to)
    if target.layer != layer:
        raise InvalidInput(f"--to {to} names layer {target.layer!r}, not {layer!r}")
    store = _writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2
        from cachepoint.wire import ref_to_pb, version_from_pb

        request = agent_pb2.RollbackRequest(
            layer=layer, to=ref_to_pb(target), message=message, author=ctx.author
        )
        info = version_from_pb(_via_daemon(ctx, "Rollback", request))
    else:
        with store:
            info = rollback(store, layer, target, author=ctx.author, device=ctx.device, message=message)
    if as_json:
        emit_json(_version_json(info, ["latest"]))
    else:
        click.echo(f"{info.ref}: content of @{info.restored_from}")


@cli.command("gc")
@json_option
@pass_ctx
@handles_errors
def gc_cmd(ctx: Context, as_json: bool) -> None:
    """Remove blocks that no version references (through the daemon when it holds the store)."""
    store = _writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2

        reply = _via_daemon(ctx, "CollectGarbage", agent_pb2.CollectGarbageRequest())
        figures = json.loads(reply.result_json)
    else:
        with store:
            figures = collect(store).as_json()
    if as_json:
        emit_json(figures)
    else:
        click.echo(
            f"removed {figures['blocks_removed']} blocks ({human(figures['bytes_freed'])}), "
            f"kept {figures['blocks_kept']}"
        )


@cli.command("fsck")
@json_option
@pass_ctx
@handles_errors
def fsck_cmd(ctx: Context, as_json: bool) -> None:
    """Verify every block and every reference; exit 8 when something is wrong."""
    with ctx.open() as store, progress_bar("fsck", not as_json, unit="blocks") as progress:
        report = fsck(store, progress)
    if as_json:
        emit_json(report.as_json())
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
        click.echo("ok" if report.ok else f"{len(report.problems)} problems")
    if not report.ok:
        sys.exit(EXIT_CORRUPT)


@cli.command("stats")
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


@cli.command("publish")
@click.argument("layer")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--coordinator", "coordinator", required=True, metavar="HOST:PORT", help="The coordinator.")
@kind_option
@message_option
@block_size_option
@tag_option
@json_option
@pass_ctx
@handles_errors
def publish_cmd(
    ctx: Context,
    layer: str,
    path: Path,
    coordinator: str,
    kind: str | None,
    message: str,
    block_size: str | None,
    tags: tuple[str, ...],
    as_json: bool,
) -> None:
    """Ingest PATH as a new version of LAYER at the coordinator, sending only the blocks it lacks."""
    from cachepoint.replication.publish import publish

    validate_layer_name(layer)
    options = IngestOptions(
        layer=layer,
        kind=LayerKind.parse(kind) if kind else _kind_from_name(layer),
        message=message,
        author=ctx.author,
        device=ctx.device,
        block_size=parse_block_size(block_size) if block_size else None,
        new_layer_block_size=parse_block_size(ctx.settings.block_size),
        tags=tags,
    )
    with ctx.open(writable=True, create=True) as store:
        with progress_bar(f"publish {layer}", not as_json) as progress:
            result = asyncio.run(publish(store, path, options, coordinator, progress))
    if as_json:
        emit_json(result.as_json())
    else:
        click.echo(
            f"{result.version.ref} at {coordinator}: {result.blocks_sent} blocks sent "
            f"({human(result.bytes_sent)}), {human(result.ingest.logical_bytes)} logical"
        )


@cli.command("pull")
@click.argument("ref")
@click.option("--from", "origin", required=True, metavar="HOST:PORT", help="A coordinator or a peer.")
@click.option(
    "--wan-rate", default=None, help="Cap on fetching across the WAN, e.g. 100Mbit [config wan_rate]."
)
@json_option
@pass_ctx
@handles_errors
def pull_cmd(ctx: Context, ref: str, origin: str, wan_rate: str | None, as_json: bool) -> None:
    """Fetch REF's missing blocks (nearest sources first, every block verified) and commit it here."""
    from cachepoint.replication.pull import pull

    parsed = Ref.parse(ref)
    with ctx.open(writable=True, create=True) as store:
        with progress_bar(f"pull {ref}", not as_json, unit="blocks") as progress:
            limits = class_limits(wan_rate or ctx.settings.wan_rate, ctx.settings.site_rate)
            result = asyncio.run(
                pull(store, parsed, origin, node_id=ctx.device, progress=progress, limits=limits)
            )
    if as_json:
        emit_json(result.as_json())
        return
    if result.already_local:
        click.echo(f"{result.version.ref} is already here")
        return
    by_source = ", ".join(f"{s.name} ({s.source_class}) {s.counters.blocks}" for s in result.sources)
    click.echo(
        f"{result.version.ref}: {result.fetched.blocks} of {result.planned_blocks} missing blocks fetched "
        f"({human(result.fetched.bytes)}) from {by_source}"
    )


@cli.command("serve")
@click.option("--listen", default=None, metavar="HOST:PORT", help="gRPC address for peers [127.0.0.1:7401].")
@click.option("--coordinator", default=None, metavar="HOST:PORT", help="The coordinator (none: offline).")
@click.option("--site", default=None, help="Locality label [default].")
@click.option("--node-id", default=None, help="Name in the fleet [host name and store id].")
@click.option("--subscribe", "subscribe", multiple=True, metavar="REF", help="Keep REF current (repeatable).")
@click.option(
    "--nbd",
    is_flag=False,
    flag_value="127.0.0.1:10809",
    default=None,
    metavar="[HOST:PORT]",
    help="Serve attached disks over NBD; `--nbd` alone listens on 127.0.0.1:10809.",
)
@click.option(
    "--nbd-socket", default=None, metavar="PATH", help="Serve attached disks over NBD on a Unix socket."
)
@click.option(
    "--http", default=None, metavar="HOST:PORT", help="Serve versions and images over HTTP with Range."
)
@click.option("-v", "--verbose", is_flag=True, help="Log pulls and reconnections.")
@pass_ctx
@handles_errors
def serve_cmd(
    ctx: Context,
    listen: str | None,
    coordinator: str | None,
    site: str | None,
    node_id: str | None,
    subscribe: tuple[str, ...],
    nbd: str | None,
    nbd_socket: str | None,
    http: str | None,
    verbose: bool,
) -> None:
    """Run the cachepoint daemon: serve blocks to peers, follow subscriptions, answer `status`."""
    import logging

    from cachepoint.capture.watch import parse_watch
    from cachepoint.daemon import Daemon, DaemonSettings

    s = ctx.settings
    for ref in (*subscribe, *s.subscribe):
        Ref.parse(ref)
    settings = DaemonSettings(
        store=ctx.store_path,
        listen=listen or s.listen,
        coordinator=coordinator if coordinator is not None else s.coordinator,
        site=site or s.site,
        node_id=node_id or s.node_id,
        subscribe=list(subscribe) or list(s.subscribe),
        limits=class_limits(s.wan_rate, s.site_rate),
        nbd=nbd or "",
        nbd_socket=nbd_socket or "",
        http=http or "",
        snapshot_every=parse_duration(s.snapshot_every),
        read_cache=parse_byte_size(s.read_cache, "read_cache"),
        watches=[parse_watch(text) for text in s.watch],
        watch_interval=parse_duration(s.watch_interval),
        watch_debounce=parse_duration(s.watch_debounce),
    )
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(Daemon(settings).run())


@cli.command("attach")
@click.argument("image")
@click.option("--user", default="", help="Attach writable: writes go into user/USER/IMAGE.")
@json_option
@pass_ctx
@handles_errors
def attach_cmd(ctx: Context, image: str, user: str, as_json: bool) -> None:
    """Export IMAGE as a disk over the daemon's NBD server (read-only without --user)."""
    from cachepoint.status import agent_call
    from cachepoint.v1 import agent_pb2

    response = asyncio.run(
        agent_call(ctx.store_path, "Attach", agent_pb2.AttachRequest(image=image, user=user))
    )
    data = {
        "export": response.export_name,  # type: ignore[attr-defined]
        "nbd": response.nbd[0] if response.nbd else None,  # type: ignore[attr-defined]
        "nbd_uris": list(response.nbd),  # type: ignore[attr-defined]
        "read_only": response.read_only,  # type: ignore[attr-defined]
        "user_layer": response.user_layer or None,  # type: ignore[attr-defined]
    }
    if as_json:
        emit_json(data)
    else:
        mode = "read-only" if data["read_only"] else f"writable into {data['user_layer']}"
        click.echo(f"{data['export']} attached {mode}: {' '.join(data['nbd_uris'])}")


@cli.command("detach")
@click.argument("export")
@click.option("--discard", is_flag=True, help="Drop the writes made since the last snapshot.")
@pass_ctx
@handles_errors
def detach_cmd(ctx: Context, export: str, discard: bool) -> None:
    """Stop exporting EXPORT; its unsnapshotted writes stay for the next attach unless --discard."""
    from cachepoint.status import agent_call
    from cachepoint.v1 import agent_pb2

    asyncio.run(
        agent_call(ctx.store_path, "Detach", agent_pb2.DetachRequest(export_name=export, discard=discard))
    )
    click.echo(f"{export} detached")


@cli.command("snapshot")
@click.argument("export")
@message_option
@json_option
@pass_ctx
@handles_errors
def snapshot_cmd(ctx: Context, export: str, message: str, as_json: bool) -> None:
    """Freeze EXPORT's writes into a new version of its user layer (the disk stays attached)."""
    from cachepoint.status import agent_call
    from cachepoint.v1 import agent_pb2
    from cachepoint.wire import version_from_pb

    request = agent_pb2.SnapshotRequest(export_name=export, message=message, author=ctx.author)
    info = version_from_pb(asyncio.run(agent_call(ctx.store_path, "Snapshot", request)))  # type: ignore[arg-type]
    if as_json:
        emit_json(_version_json(info, []))
    else:
        click.echo(f"{info.ref}: snapshot of {export}")


@cli.command("pin")
@click.argument("target")
@json_option
@pass_ctx
@handles_errors
def pin_cmd(ctx: Context, target: str, as_json: bool) -> None:
    """Fetch every block of TARGET (an image, or a ref) through the daemon, for offline use."""
    from cachepoint.errors import ImageNotFound, StoreMissing
    from cachepoint.v1 import agent_pb2
    from cachepoint.wire import ref_to_pb, version_from_pb

    try:
        with ctx.open() as store:
            refs = list(store.catalog.image(target).refs)
    except (ImageNotFound, StoreMissing):
        refs = [target]
    pinned = []
    for ref in refs:
        request = agent_pb2.PullRequest(ref=ref_to_pb(Ref.parse(ref)))
        stream = asyncio.run(_last_progress(ctx.store_path, request))
        pinned.append({"ref": version_from_pb(stream.version).ref, "fetched_blocks": stream.blocks_done})
    if as_json:
        emit_json({"pinned": pinned})
    else:
        for item in pinned:
            click.echo(f"{item['ref']} is here ({item['fetched_blocks']} blocks fetched)")


async def _last_progress(store: Path, request: object) -> Any:
    from cachepoint.rpc import channel
    from cachepoint.rpc.client import from_rpc_error
    from cachepoint.status import daemon_address
    from cachepoint.v1 import agent_pb2_grpc

    address = daemon_address(store)
    last = None
    async with channel.channel(address) as ch:
        try:
            async for progress in agent_pb2_grpc.AgentStub(ch).Pull(request, timeout=6 * 3600):
                last = progress
        except grpc.RpcError as err:
            raise from_rpc_error(err, address) from err
    return last


@cli.command("rebase")
@click.argument("image")
@click.option(
    "--layer", "to", required=True, metavar="REF", help="The base layer version to move to, e.g. os/win10@7."
)
@json_option
@pass_ctx
@handles_errors
def rebase_cmd(ctx: Context, image: str, to: str, as_json: bool) -> None:
    """Move one base layer of IMAGE to another version; users' layers are kept as they are."""
    from cachepoint.disk.rebuild import rebase

    target = Ref.parse(to)
    store = _writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2
        from cachepoint.wire import ref_to_pb

        reply = _via_daemon(ctx, "Rebase", agent_pb2.RebaseRequest(image=image, to=ref_to_pb(target)))
        name, refs, replaced = reply.name, list(reply.refs), reply.replaced
    else:
        with store:
            spec, replaced = rebase(store, image, target)
        name, refs = spec.name, list(spec.refs)
    if as_json:
        emit_json({"image": name, "refs": refs, "replaced": replaced})
    else:
        click.echo(f"image {name}: {replaced} -> {to} ({' '.join(refs)})")


@cli.command("restore")
@click.argument("image")
@click.option("--user", required=True, help="Whose layer: user/USER/IMAGE.")
@click.option(
    "--to", "to", required=True, metavar="REF", help="The version to bring back, e.g. user/alice/desk@3."
)
@message_option
@json_option
@pass_ctx
@handles_errors
def restore_cmd(ctx: Context, image: str, user: str, to: str, message: str, as_json: bool) -> None:
    """Bring a user's layer of IMAGE back to an earlier version, as a new version (later ones stay)."""
    from cachepoint.disk.rebuild import restore

    target = Ref.parse(to)
    store = _writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2
        from cachepoint.wire import ref_to_pb, version_from_pb

        request = agent_pb2.RestoreRequest(
            image=image, user=user, to=ref_to_pb(target), message=message, author=ctx.author
        )
        info = version_from_pb(_via_daemon(ctx, "Restore", request))
    else:
        with store:
            info = restore(store, image, user, target, author=ctx.author, device=ctx.device, message=message)
    if as_json:
        emit_json(_version_json(info, ["latest"]))
    else:
        click.echo(f"{info.ref}: content of @{info.restored_from}")


@cli.command("status")
@json_option
@pass_ctx
@handles_errors
def status_cmd(ctx: Context, as_json: bool) -> None:
    """What the daemon running on this store is doing: subscriptions, versions, peers, bytes by source."""
    from cachepoint.status import daemon_status, status_json

    data = status_json(asyncio.run(daemon_status(ctx.store_path)))
    if as_json:
        emit_json(data)
        return
    link = "connected" if data["coordinator_connected"] else "NOT connected"
    click.echo(f"node {data['node_id']} (site {data['site']}) at {data['address']}")
    click.echo(f"coordinator {data['coordinator'] or '(none)'}: {link}; peers known {data['peers_known']}")
    for sub in data["subscriptions"]:
        lag = f", lag {sub['lag']}" if sub["lag"] else ""
        error = f" ({sub['last_error']})" if sub["last_error"] else ""
        click.echo(f"  {sub['ref']}: {sub['state']}, holds @{sub['held']}{lag}{error}")
    for name, totals in data["bytes_by_source"].items():
        blocks, size, failures = totals["blocks"], human(totals["bytes"]), totals["failures"]
        click.echo(f"  from {name}: {blocks} blocks, {size}, {failures} failures")
    click.echo(f"versions held: {len(data['versions'])}; outbox depth {data['outbox_depth']}")


@cli.group("image")
def image_group() -> None:
    """Images: ordered stacks of layer refs, lowest first."""


@image_group.command("create")
@click.argument("name")
@click.argument("refs", nargs=-1, required=True)
@json_option
@pass_ctx
@handles_errors
def image_create(ctx: Context, name: str, refs: tuple[str, ...], as_json: bool) -> None:
    """Record image NAME as the stack REFS (lowest first)."""
    for ref in refs:
        Ref.parse(ref)
    store = _writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2

        reply = _via_daemon(ctx, "CreateImage", agent_pb2.CreateImageRequest(name=name, refs=list(refs)))
        result = {"image": reply.name, "refs": list(reply.refs)}
    else:
        with store:
            spec = store.catalog.create_image(name, list(refs))
        result = {"image": spec.name, "refs": list(spec.refs)}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"image {result['image']}: {' '.join(result['refs'])}")


@image_group.command("ls")
@json_option
@pass_ctx
@handles_errors
def image_ls(ctx: Context, as_json: bool) -> None:
    """List images."""
    with ctx.open() as store:
        images = [{"image": i.name, "refs": list(i.refs)} for i in store.catalog.images()]
    if as_json:
        emit_json({"images": images})
    else:
        for i in images:
            click.echo(f"{i['image']}: {' '.join(i['refs'])}")


@image_group.command("export")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@json_option
@pass_ctx
@handles_errors
def image_export(ctx: Context, name: str, dest: Path, as_json: bool) -> None:
    """Composite image NAME into DEST (upper layers win; whiteouts hide lower paths)."""
    with ctx.open() as store:
        stack = resolve_stack(store, store.catalog.image(name).refs)
        merged = composite(stack)
        with progress_bar(f"export {name}", not as_json) as progress:
            if merged.single_file:
                result = export_single(store, merged.entries[0], dest, progress)
            else:
                result = export_tree(store, merged.entries, dest, progress)
    resolved = [info.ref for info, _ in stack]
    if as_json:
        emit_json({"image": name, "layers": resolved, **result.as_json()})
    else:
        click.echo(f"{name} ({' + '.join(resolved)}) -> {result.path}")


# capture, watch and restore-dir live in their own module (this one is long enough).
from cachepoint.cli_capture import register as _register_capture_commands  # noqa: E402

_register_capture_commands(cli)


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
