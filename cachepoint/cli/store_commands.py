"""Commands that make versions and tags in the store: init, ingest, tag, rollback, gc.

ingest, tag, rollback and gc go through the daemon when it holds the store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from cachepoint.blocks import parse_block_size
from cachepoint.cli.context import (
    Context,
    allow_same_option,
    block_size_option,
    chunking_option,
    chunking_options,
    kind_from_name,
    kind_option,
    message_option,
    pass_ctx,
    tag_option,
    version_json,
    via_daemon,
    writable_or_daemon,
)
from cachepoint.console import emit_json, handles_errors, human, json_option, warn
from cachepoint.errors import InvalidInput, StoreBusy
from cachepoint.ids import Ref, validate_layer_name
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.layers.rollback import rollback
from cachepoint.layers.unchanged import unchanged_line
from cachepoint.model import LayerKind
from cachepoint.progress import progress_bar
from cachepoint.store.gc import collect


@click.command("init")
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


@click.command("ingest")
@click.argument("layer")
@click.argument("path", type=click.Path(path_type=Path))
@kind_option
@message_option
@block_size_option
@chunking_option
@tag_option
@allow_same_option
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
    chunking: str | None,
    tags: tuple[str, ...],
    allow_same: bool,
    as_json: bool,
) -> None:
    """Make a new version of LAYER from PATH (a disk image file or a directory tree). Content the tag
    (--tag, else latest) already names makes no new version (--allow-same does)."""
    validate_layer_name(layer)
    requested = parse_block_size(block_size) if block_size else None
    layer_kind = LayerKind.parse(kind) if kind else kind_from_name(layer)
    options = IngestOptions(
        layer=layer,
        kind=layer_kind,
        message=message,
        author=ctx.author,
        device=ctx.device,
        block_size=requested,
        new_layer_block_size=parse_block_size(ctx.settings.block_size),
        **chunking_options(ctx.settings, chunking),
        tags=tags,
        allow_same=allow_same,
    )
    try:
        store = ctx.open(writable=True, create=True)
    except StoreBusy:
        # A daemon holds the store: let it do the ingest (and queue a user/ version for the coordinator).
        from cachepoint.status import ingest_via_daemon

        data = asyncio.run(ingest_via_daemon(ctx.store_path, path, options))
        if as_json:
            emit_json(data)
        elif data.get("unchanged"):
            click.echo(unchanged_line(str(data["ref"])) + " (through the daemon)")
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
    if result.unchanged:
        click.echo(unchanged_line(v.ref))
        return
    click.echo(
        f"{v.ref}  {human(result.logical_bytes)} logical, {human(result.new_bytes)} new "
        f"({human(result.new_stored_bytes)} stored), {result.reused} unchanged blocks skipped, "
        f"{result.seconds:.2f}s"
    )


@click.command("tag")
@click.argument("ref")
@click.argument("tag")
@json_option
@pass_ctx
@handles_errors
def tag_cmd(ctx: Context, ref: str, tag: str, as_json: bool) -> None:
    """Point TAG of the layer at REF (every move is recorded)."""
    store = writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import catalog_pb2
        from cachepoint.wire import ref_to_pb, version_from_pb

        request = catalog_pb2.SetTagRequest(ref=ref_to_pb(Ref.parse(ref)), tag=tag, actor=ctx.author)
        info = version_from_pb(via_daemon(ctx, "SetTag", request))
    else:
        with store:
            info = store.catalog.set_tag(ref, tag, ctx.author)
    if as_json:
        emit_json({"layer": info.layer, "tag": tag, "version": info.number, "ref": info.ref})
    else:
        click.echo(f"{info.layer}:{tag} -> @{info.number}")


@click.command("rollback")
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
    store = writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2
        from cachepoint.wire import ref_to_pb, version_from_pb

        request = agent_pb2.RollbackRequest(
            layer=layer, to=ref_to_pb(target), message=message, author=ctx.author
        )
        info = version_from_pb(via_daemon(ctx, "Rollback", request))
    else:
        with store:
            info = rollback(store, layer, target, author=ctx.author, device=ctx.device, message=message)
    if as_json:
        emit_json(version_json(info, ["latest"]))
    else:
        click.echo(f"{info.ref}: content of @{info.restored_from}")


@click.command("gc")
@json_option
@pass_ctx
@handles_errors
def gc_cmd(ctx: Context, as_json: bool) -> None:
    """Remove blocks that no version references (through the daemon when it holds the store)."""
    # The store's reserve is released first: on a full disk RocksDB needs room to open and log deletions.
    with ctx.headroom():
        store = writable_or_daemon(ctx)
        if store is None:
            from cachepoint.v1 import agent_pb2

            reply = via_daemon(ctx, "CollectGarbage", agent_pb2.CollectGarbageRequest())
            figures = json.loads(reply.result_json)
        else:
            with store:
                figures = collect(store).as_json()
    compaction = figures.get("compaction")
    if compaction and not compaction["ran"]:
        warn(f"space not given back yet: {compaction['reason']}")
    if as_json:
        emit_json(figures)
    else:
        click.echo(
            f"removed {figures['blocks_removed']} blocks ({human(figures['bytes_freed'])}), "
            f"kept {figures['blocks_kept']}"
        )


COMMANDS: tuple[click.Command, ...] = (init_cmd, ingest_cmd, tag_cmd, rollback_cmd, gc_cmd)
