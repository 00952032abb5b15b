"""The `image` group: create, ls, export."""

from __future__ import annotations

from pathlib import Path

import click

from cachepoint.cli.context import Context, force_option, pass_ctx, via_daemon, writable_or_daemon
from cachepoint.console import emit_json, handles_errors, json_option
from cachepoint.disk.attach import resolve_stack
from cachepoint.ids import Ref
from cachepoint.layers.composite import composite
from cachepoint.layers.export import export_single, export_tree
from cachepoint.progress import progress_bar


@click.group("image")
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
    store = writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2

        reply = via_daemon(ctx, "CreateImage", agent_pb2.CreateImageRequest(name=name, refs=list(refs)))
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
@force_option
@json_option
@pass_ctx
@handles_errors
def image_export(ctx: Context, name: str, dest: Path, force: bool, as_json: bool) -> None:
    """Composite image NAME into DEST (upper layers win; whiteouts hide lower paths). DEST must be new
    or empty unless --force; it appears only when complete."""
    with ctx.open() as store:
        stack = resolve_stack(store, store.catalog.image(name).refs)
        merged = composite(stack)
        with progress_bar(f"export {name}", not as_json) as progress:
            if merged.single_file:
                result = export_single(store, merged.entries[0], dest, progress, force)
            else:
                result = export_tree(store, merged.entries, dest, progress, force)
    resolved = [info.ref for info, _ in stack]
    if as_json:
        emit_json({"image": name, "layers": resolved, **result.as_json()})
    else:
        click.echo(f"{name} ({' + '.join(resolved)}) -> {result.path}")


COMMANDS: tuple[click.Command, ...] = (image_group,)
