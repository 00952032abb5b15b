"""Commands between nodes and the daemon: publish, pull, serve, status, pin."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from cachepoint.blocks import parse_block_size
from cachepoint.blocksource.recode import parse_hot_codec
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
)
from cachepoint.config import parse_byte_size, parse_duration, parse_switch
from cachepoint.console import emit_json, handles_errors, human, json_option, log_format_option
from cachepoint.ids import Ref, validate_layer_name
from cachepoint.layers.unchanged import unchanged_line
from cachepoint.model import LayerKind
from cachepoint.progress import progress_bar


@click.command("publish")
@click.argument("layer")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--coordinator",
    "coordinator",
    default=None,
    metavar="HOST:PORT[,HOST:PORT]",
    help="The coordinator, or its replicas [env CACHEPOINT_COORDINATOR; config coordinator].",
)
@kind_option
@message_option
@block_size_option
@chunking_option
@tag_option
@allow_same_option
@json_option
@pass_ctx
@handles_errors
def publish_cmd(
    ctx: Context,
    layer: str,
    path: Path,
    coordinator: str | None,
    kind: str | None,
    message: str,
    block_size: str | None,
    chunking: str | None,
    tags: tuple[str, ...],
    allow_same: bool,
    as_json: bool,
) -> None:
    """Ingest PATH as a new version of LAYER at the coordinator, sending only the blocks it lacks.
    Content the tag (--tag, else latest) already names there makes no new version (--allow-same does)."""
    from cachepoint.layers.ingest import IngestOptions  # here: the other commands do without it
    from cachepoint.replication.publish import publish

    validate_layer_name(layer)
    coordinator = ctx.coordinator(coordinator, "publish to")
    options = IngestOptions(
        layer=layer,
        kind=LayerKind.parse(kind) if kind else kind_from_name(layer),
        message=message,
        author=ctx.author,
        device=ctx.device,
        block_size=parse_block_size(block_size) if block_size else None,
        new_layer_block_size=parse_block_size(ctx.settings.block_size),
        **chunking_options(ctx.settings, chunking),
        tags=tags,
        allow_same=allow_same,
    )
    with ctx.open(writable=True, create=True) as store:
        with progress_bar(f"publish {layer}", not as_json) as progress:
            result = asyncio.run(publish(store, path, options, coordinator, progress))
    if as_json:
        emit_json(result.as_json())
    elif result.unchanged:
        click.echo(unchanged_line(result.version.ref))
    else:
        click.echo(
            f"{result.version.ref} at {coordinator}: {result.blocks_sent} blocks sent "
            f"({human(result.bytes_sent)}), {human(result.ingest.logical_bytes)} logical"
        )


@click.command("pull")
@click.argument("ref")
@click.option(
    "--from",
    "origin",
    default=None,
    metavar="HOST:PORT",
    help="A coordinator or a peer [the coordinator: env CACHEPOINT_COORDINATOR; config coordinator].",
)
@click.option(
    "--wan-rate", default=None, help="Cap on fetching across the WAN, e.g. 100Mbit [config wan_rate]."
)
@json_option
@pass_ctx
@handles_errors
def pull_cmd(ctx: Context, ref: str, origin: str | None, wan_rate: str | None, as_json: bool) -> None:
    """Fetch REF's missing blocks (nearest sources first, every block verified) and commit it here."""
    from cachepoint.replication.pull import pull
    from cachepoint.replication.ratelimit import class_limits

    origin = ctx.coordinator(origin, "pull from")
    parsed = Ref.parse(ref)
    with ctx.open(writable=True, create=True) as store:
        with progress_bar(f"pull {ref}", not as_json, unit="blocks") as progress:
            limits = class_limits(wan_rate or ctx.settings.wan_rate, ctx.settings.site_rate)
            result = asyncio.run(
                pull(
                    store,
                    parsed,
                    origin,
                    node_id=ctx.device,
                    progress=progress,
                    limits=limits,
                    origin_may_be_node=True,  # --from: "a coordinator or a peer"
                    logged=parse_switch(ctx.settings.pull_wal, "pull_wal"),
                )
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


@click.command("serve")
@click.option("--listen", default=None, metavar="HOST:PORT", help="gRPC address for peers [127.0.0.1:7401].")
@click.option(
    "--coordinator",
    default=None,
    metavar="HOST:PORT[,HOST:PORT]",
    help="The coordinator, or its replicas in the order to try (none: offline).",
)
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
    "--nbd-tls",
    is_flag=True,
    default=None,
    help="NBD over TCP requires TLS and a client certificate of the fleet; needed for a non-loopback "
    "--nbd [config nbd_tls].",
)
@click.option(
    "--http", default=None, metavar="HOST:PORT", help="Serve versions and images over HTTP with Range."
)
@click.option(
    "--http-tls",
    "http_tls",
    is_flag=True,
    default=None,
    help="HTTPS with this node's identity; clients need a certificate or token of the fleet.",
)
@click.option(
    "--min-free",
    "min_free",
    default=None,
    metavar="SIZE|PCT",
    help="Pulls pause while less than this is free on the store's file system: 5% or 2G [config min_free].",
)
@click.option("-v", "--verbose", is_flag=True, help="Log pulls and reconnections.")
@log_format_option
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
    nbd_tls: bool | None,
    http: str | None,
    http_tls: bool | None,
    min_free: str | None,
    verbose: bool,
    log_format: str | None,
) -> None:
    """Run the cachepoint daemon: serve blocks to peers, follow subscriptions, answer `status`."""
    import logging

    from cachepoint import logs
    from cachepoint.capture.watch import parse_watch
    from cachepoint.daemon import Daemon, DaemonSettings
    from cachepoint.disk.nbd import NbdLimits
    from cachepoint.replication.ratelimit import class_limits, parse_rate
    from cachepoint.store.space import SpaceLimit

    s = ctx.settings
    for ref in (*subscribe, *s.subscribe):
        Ref.parse(ref)
    configured_min_free = SpaceLimit.parse(s.min_free, "min_free")  # refused when bad, even under the flag
    settings = DaemonSettings(
        store=ctx.store_path,
        listen=listen or s.listen,
        coordinator=coordinator if coordinator is not None else s.coordinator,
        site=site or s.site,
        node_id=node_id or s.node_id,
        subscribe=list(subscribe) or list(s.subscribe),
        limits=class_limits(s.wan_rate, s.site_rate),
        site_fanout=parse_switch(s.site_fanout, "site_fanout"),
        pull_wal=parse_switch(s.pull_wal, "pull_wal"),
        nbd=nbd or "",
        nbd_socket=nbd_socket or "",
        nbd_tls=nbd_tls or parse_switch(s.nbd_tls, "nbd_tls"),
        http=http or "",
        http_tls=http_tls or parse_switch(s.http_tls, "http_tls"),
        snapshot_every=parse_duration(s.snapshot_every),
        read_cache=parse_byte_size(s.read_cache, "read_cache"),
        hot_codec=parse_hot_codec(s.hot_codec),
        nbd_limits=NbdLimits(
            write_budget=parse_byte_size(s.nbd_write_budget, "nbd_write_budget"),
            idle_timeout=parse_duration(s.nbd_idle_timeout),
        ),
        watches=[parse_watch(text) for text in s.watch],
        watch_interval=parse_duration(s.watch_interval),
        watch_debounce=parse_duration(s.watch_debounce),
        scrub_every=parse_duration(s.scrub_every),
        scrub_rate=parse_rate(s.scrub_rate),
        min_free=SpaceLimit.parse(min_free, "--min-free") if min_free else configured_min_free,
        reserve=parse_byte_size(s.reserve, "reserve"),
        agent_group=s.agent_group,
    )
    logs.configure(logging.INFO if verbose else logging.WARNING, log_format or s.log_format)
    asyncio.run(Daemon(settings).run())


@click.command("status")
@json_option
@pass_ctx
@handles_errors
def status_cmd(ctx: Context, as_json: bool) -> None:
    """What the daemon running on this store is doing: subscriptions, versions, peers, bytes by source."""
    from cachepoint.cli.scrub_commands import scrub_line
    from cachepoint.status import status_of

    data = status_of(ctx.store_path)
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
    click.echo(scrub_line(data["scrub"], data["scrub_running"]))
    if data["space"]:
        click.echo(data["space"]["summary"])


@click.command("pin")
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
    import grpc

    from cachepoint.rpc.agent_socket import agent_channel
    from cachepoint.rpc.client import from_rpc_error
    from cachepoint.status import agent_socket
    from cachepoint.v1 import agent_pb2_grpc

    address = agent_socket(store)
    last = None
    async with agent_channel(address) as ch:
        try:
            async for progress in agent_pb2_grpc.AgentStub(ch).Pull(request, timeout=6 * 3600):
                last = progress
        except grpc.RpcError as err:
            raise from_rpc_error(err, str(address)) from err
    return last


COMMANDS: tuple[click.Command, ...] = (publish_cmd, pull_cmd, serve_cmd, status_cmd, pin_cmd)
