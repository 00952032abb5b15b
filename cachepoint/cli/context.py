"""What the `cachepoint` commands share: the Context (settings, opening the store), the options that
several commands take, going through the daemon that holds the store, and the JSON of a version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cachepoint.config import Settings, parse_byte_size
from cachepoint.console import when
from cachepoint.errors import InvalidInput, StoreBusy
from cachepoint.model import Chunking, LayerKind, VersionInfo

if TYPE_CHECKING:
    from cachepoint.store.store import Store


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def store_path(self) -> Path:
        return Path(self.settings.store)

    def open(self, writable: bool = False, create: bool = False) -> Store:
        from cachepoint.store.store import Store  # here: a command that opens no store never loads it

        reserve = self.reserve_bytes if writable else 0  # a bad setting is refused before the open
        store = Store.open(self.store_path, writable=writable, create=create)
        if writable:
            from cachepoint.console import note
            from cachepoint.store.headroom import ensure_reserve

            store.finish_compactions = note  # a command's compactions finish before it exits
            ensure_reserve(self.store_path, reserve)
        return store

    @property
    def reserve_bytes(self) -> int:
        return parse_byte_size(self.settings.reserve, "reserve")

    @contextlib.contextmanager
    def headroom(self) -> Iterator[int]:
        """Release the store's reserve for a command that frees space (gc, repair), so it runs on a
        full disk; open the store inside. See cachepoint/store/headroom.py."""
        from cachepoint.store.headroom import headroom

        with headroom(self.store_path, self.reserve_bytes) as released:
            yield released

    def coordinator(self, flag: str | None, what: str) -> str:
        """The coordinator a client command asks: its flag, else CACHEPOINT_COORDINATOR or the config's
        ``coordinator`` (load_settings put the environment's over the file's)."""
        address = flag or self.settings.coordinator
        if not address:
            raise InvalidInput(
                f"say which coordinator to {what}: --coordinator HOST:PORT, CACHEPOINT_COORDINATOR, "
                'or coordinator = "HOST:PORT" in the config'
            )
        return address

    @property
    def author(self) -> str:
        from cachepoint.layers.ingest import default_author

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
chunking_option = click.option(
    "--chunking",
    type=click.Choice(["fixed", "content"]),
    default=None,
    help="How a new disk-image layer is cut: fixed blocks, or content-aligned chunks [config: chunking].",
)


def chunking_options(settings: Settings, flag: str | None) -> dict[str, Any]:
    """IngestOptions fields for --chunking and the chunking, chunk_average and chunk_unit settings."""
    from cachepoint.blocks import parse_block_size
    from cachepoint.chunking import ChunkParams

    try:
        default = Chunking.parse(settings.chunking)
    except ValueError as err:
        raise InvalidInput(f"config chunking: {err}") from None
    params = ChunkParams(parse_block_size(settings.chunk_unit), parse_block_size(settings.chunk_average))
    return {
        "chunking": Chunking.parse(flag) if flag else None,
        "new_layer_chunking": default,
        "chunk_params": params,
    }


tag_option = click.option(
    "--tag", "tags", multiple=True, help="Also point this tag at the new version (repeatable)."
)
force_option = click.option(
    "--force",
    is_flag=True,
    help="Replace DEST if it exists (the old one stays until the new one is complete; "
    "a symlink is replaced, never followed).",
)
allow_same_option = click.option(
    "--allow-same",
    is_flag=True,
    help="Make a new version even when the tag (--tag, else latest) already names this content.",
)


def writable_or_daemon(ctx: Context) -> Store | None:
    """The store opened for writing, or None when a running daemon holds it (then ask the daemon)."""
    from cachepoint.errors import NotFound
    from cachepoint.status import agent_socket

    try:
        return ctx.open(writable=True)
    except StoreBusy as busy:
        try:
            agent_socket(ctx.store_path)
        except NotFound:
            raise busy from None  # another command holds it, not a daemon: nothing to ask
        return None


def via_daemon(ctx: Context, method: str, request: object) -> Any:
    from cachepoint.status import agent_call

    return asyncio.run(agent_call(ctx.store_path, method, request))


def kind_from_name(layer: str) -> LayerKind:
    head = layer.split("/", 1)[0]
    return LayerKind.parse(head) if head in ("os", "app", "user") else LayerKind.APP


def version_json(info: VersionInfo, tags: list[str]) -> dict[str, object]:
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
