"""`cachepoint scrub`: read every stored block back, verify it, heal the bad ones from the fleet.

Through the daemon when it holds the store (it heals from its site peers first, then the
coordinator); otherwise in this process, healing from a coordinator when one is given.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from cachepoint.cli.context import Context, pass_ctx, writable_or_daemon
from cachepoint.console import emit_json, fail, handles_errors, human, json_option, warn
from cachepoint.errors import EXIT_CORRUPT, EXIT_UNREACHABLE
from cachepoint.progress import ProgressFn, progress_bar
from cachepoint.store.store import Store

SCRUB_DEADLINE = 7 * 86400.0  # a pass over a large store at a low rate takes hours; this bounds a hang


def scrub_line(last: dict[str, Any] | None, running: dict[str, Any] | None = None) -> str:
    """One line on the last scrub (and the one running), for `status` and `fsck`."""
    if last is None:
        text = "last scrub: never"
    else:
        text = (
            f"last scrub: {last['finished']}, {last['blocks_checked']} blocks "
            f"({human(last['bytes_checked'])}) checked, {last['corrupt_found']} corrupt, "
            f"{last['healed']} healed, {last['still_bad']} still bad"
        )
    if running is not None:
        text += f"; scrub running since {running['started']}: {running['blocks_checked']} blocks checked"
    return text


def _print(data: dict[str, Any]) -> None:
    sources = ", ".join(f"{name} {c['blocks']}" for name, c in data["healed_from"].items())
    click.echo(
        f"{data['blocks_checked']} blocks ({human(data['bytes_checked'])}) checked, "
        f"{data['corrupt_found']} corrupt or unreadable, {data['healed']} healed"
        + (f" (from {sources})" if sources else "")
        + f", {data['still_bad']} still bad"
    )
    for block in data["still_bad_blocks"]:
        click.echo(f"STILL BAD {block['kind']}: {block['id']}: {block['detail']}")
    for block in data["unused_bad_blocks"]:
        click.echo(f"bad but unused {block['kind']}: {block['id']} (gc removes it)")
    if data["heal_detail"] and data["still_bad"]:
        click.echo(f"heal: {data['heal_detail']}")
    if data["scan_error"]:
        click.echo(f"PROBLEM: {data['scan_error']}")
    if data["resumed"]:
        click.echo(f"(went on with the pass started {data['started']})")
    click.echo("ok" if data["ok"] else "problems remain (see `cachepoint fsck` for the versions they touch)")


async def _here(
    store: Store, rate: float, coordinator: str, ctx: Context, progress: ProgressFn | None
) -> dict[str, Any]:
    from cachepoint.replication.heal import HealResult, heal_blocks
    from cachepoint.replication.ratelimit import class_limits  # loads grpc: only when a scrub runs
    from cachepoint.scrub import ScrubProgress, scrub

    limits = class_limits(ctx.settings.wan_rate, ctx.settings.site_rate)

    async def heal(digests: list[bytes]) -> HealResult:
        return await heal_blocks(store, digests, coordinator, node_id=ctx.settings.node_id, limits=limits)

    def show(now: ScrubProgress) -> None:
        if progress is not None:
            progress(now.blocks_done, now.blocks_total)

    result = await scrub(store, rate=rate, heal=heal if coordinator else None, progress=show)
    return result.as_json()


async def _through_daemon(store: Path, rate: str, progress: ProgressFn | None) -> dict[str, Any]:
    import grpc

    from cachepoint.rpc.agent_socket import agent_channel
    from cachepoint.rpc.client import from_rpc_error
    from cachepoint.status import agent_socket
    from cachepoint.v1 import agent_pb2, agent_pb2_grpc

    address = agent_socket(store)
    async with agent_channel(address) as ch:
        call = agent_pb2_grpc.AgentStub(ch).Scrub(agent_pb2.ScrubRequest(rate=rate), timeout=SCRUB_DEADLINE)
        try:
            async for update in call:
                if update.finished:
                    return dict(json.loads(update.result_json))
                if progress is not None:
                    progress(update.blocks_done, update.blocks_total)
        except grpc.RpcError as err:
            raise from_rpc_error(err, str(address)) from err
    raise RuntimeError(f"the daemon at {address} ended the scrub without a result")


@click.command("scrub")
@click.option(
    "--rate",
    default=None,
    help="Stored bytes read per second, e.g. 50MiB/s (0: unlimited) [config scrub_rate].",
)
@click.option(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="Without a daemon: heal bad blocks from this coordinator's fleet [config coordinator].",
)
@json_option
@pass_ctx
@handles_errors
def scrub_cmd(ctx: Context, rate: str | None, coordinator: str | None, as_json: bool) -> None:
    """Read every stored block back, verify it against its id, and fetch bad ones again from the fleet.

    Exits 8 when a bad block remains. A pass that is interrupted goes on from where it stopped next time.
    """
    from cachepoint.replication.ratelimit import parse_rate  # loads grpc: only when a scrub runs

    bytes_per_second = parse_rate(rate or ctx.settings.scrub_rate)
    store = writable_or_daemon(ctx)
    try:
        with progress_bar("scrub", not as_json, unit="blocks") as progress:
            if store is None:
                if coordinator:
                    warn("--coordinator is not used: the daemon heals from its own fleet")
                data = asyncio.run(_through_daemon(ctx.store_path, rate or "", progress))
            else:
                with store:
                    origin = coordinator or ctx.settings.coordinator
                    data = asyncio.run(_here(store, bytes_per_second, origin, ctx, progress))
    except KeyboardInterrupt:
        fail("scrub interrupted; the next `cachepoint scrub` goes on from where it stopped", 130, as_json)
        return
    if not data["complete"]:  # only a daemon shutting down stops a pass it was asked for
        message = "the daemon stopped the scrub before the end; the next scrub goes on from where it stopped"
        fail(message, EXIT_UNREACHABLE, as_json)
    if as_json:
        emit_json(data)
    else:
        _print(data)
    if not data["ok"]:
        sys.exit(EXIT_CORRUPT)


COMMANDS: tuple[click.Command, ...] = (scrub_cmd,)
