"""Commands on composite disks: attach, detach, snapshot (through the daemon), rebase, restore."""

from __future__ import annotations

import asyncio

import click

from cachepoint.cli.context import (
    Context,
    message_option,
    pass_ctx,
    version_json,
    via_daemon,
    writable_or_daemon,
)
from cachepoint.console import emit_json, handles_errors, json_option
from cachepoint.ids import Ref


@click.command("attach")
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


@click.command("detach")
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


@click.command("snapshot")
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
        emit_json(version_json(info, []))
    else:
        click.echo(f"{info.ref}: snapshot of {export}")


@click.command("rebase")
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
    store = writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2
        from cachepoint.wire import ref_to_pb

        reply = via_daemon(ctx, "Rebase", agent_pb2.RebaseRequest(image=image, to=ref_to_pb(target)))
        name, refs, replaced = reply.name, list(reply.refs), reply.replaced
    else:
        with store:
            spec, replaced = rebase(store, image, target)
        name, refs = spec.name, list(spec.refs)
    if as_json:
        emit_json({"image": name, "refs": refs, "replaced": replaced})
    else:
        click.echo(f"image {name}: {replaced} -> {to} ({' '.join(refs)})")


@click.command("restore")
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
    store = writable_or_daemon(ctx)
    if store is None:
        from cachepoint.v1 import agent_pb2
        from cachepoint.wire import ref_to_pb, version_from_pb

        request = agent_pb2.RestoreRequest(
            image=image, user=user, to=ref_to_pb(target), message=message, author=ctx.author
        )
        info = version_from_pb(via_daemon(ctx, "Restore", request))
    else:
        with store:
            info = restore(store, image, user, target, author=ctx.author, device=ctx.device, message=message)
    if as_json:
        emit_json(version_json(info, ["latest"]))
    else:
        click.echo(f"{info.ref}: content of @{info.restored_from}")


COMMANDS: tuple[click.Command, ...] = (attach_cmd, detach_cmd, snapshot_cmd, rebase_cmd, restore_cmd)
