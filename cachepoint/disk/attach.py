"""Attach: build a CompositeDisk from refs, with the user's working layer when it is writable.

The daemon calls ``open_disk`` (or ``open_image``) and hands the result to the NBD server; it
calls ``CompositeDisk.close`` on detach. Opening needs the store open for writing when a user
layer is named (the working map lives in it).
"""

from __future__ import annotations

from collections.abc import Sequence

from cachepoint.blocksource import BlockSource
from cachepoint.disk.composite import CompositeDisk, Stack
from cachepoint.disk.readcache import DecodedCache
from cachepoint.disk.working import WorkingLayer
from cachepoint.errors import InvalidInput
from cachepoint.ids import validate_layer_name
from cachepoint.layers.composite import grid_size
from cachepoint.store.store import Store


def resolve_stack(store: Store, refs: Sequence[str]) -> Stack:
    stack: Stack = []
    for ref in refs:
        info = store.catalog.resolve(ref)
        stack.append((info, store.catalog.manifest(info.manifest_digest)))
    return stack


def open_disk(
    store: Store,
    refs: Sequence[str],
    *,
    user_layer: str | None = None,
    name: str | None = None,
    decoded: DecodedCache | None = None,
    source: BlockSource | None = None,
) -> CompositeDisk:
    """The disk of ``refs`` (lowest first); writable into ``user_layer`` when one is named. Its
    blocks come from ``source`` (default: the store).

    The user layer's latest version goes on top of the stack unless ``refs`` already ends with a
    version of it. ``name`` names the working map (default: the user layer), so one user layer
    could back several disks.
    """
    stack = resolve_stack(store, refs)
    if user_layer is None:
        return CompositeDisk(store, stack, decoded=decoded, source=source)
    validate_layer_name(user_layer)
    if not stack:
        raise InvalidInput("a disk needs at least one layer under the user's")
    if stack[-1][0].layer != user_layer and store.catalog.layer_or_none(user_layer) is not None:
        stack += resolve_stack(store, [user_layer])
    top = stack[-1][0]
    base = top.number if top.layer == user_layer else 0
    working = WorkingLayer.open(store, name or user_layer, user_layer, grid_size(stack), base)
    try:
        return CompositeDisk(store, stack, working, decoded=decoded, source=source)
    except BaseException:
        working.close()
        raise


def open_image(
    store: Store,
    image: str,
    *,
    user_layer: str | None = None,
    name: str | None = None,
    decoded: DecodedCache | None = None,
) -> CompositeDisk:
    """``open_disk`` over an image's refs (``cachepoint image create``)."""
    refs = store.catalog.image(image).refs
    return open_disk(store, refs, user_layer=user_layer, name=name, decoded=decoded)
