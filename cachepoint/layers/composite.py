"""Compositing an image: an ordered stack of layer versions, lowest first, seen as one tree or disk.

Trees: an upper layer's entry replaces the same path below (a non-directory also hides what was
below it), and a whiteout hides the path and everything under it. Disk images: each byte comes
from the topmost layer that holds data there; a hole in an upper layer lets the data below show.
Layers on one fixed grid composite block by block; a stack with content-chunked layers composites
at extent level (cachepoint/layers/pieces.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from cachepoint.blocks import DEFAULT_BLOCK_SIZE
from cachepoint.errors import InvalidInput
from cachepoint.ids import DIGEST_SIZE, HOLE_DIGEST
from cachepoint.layers.export import PlacedFile
from cachepoint.layers.pieces import Pieces
from cachepoint.model import Chunking, EntryType, FileEntry, Manifest, VersionInfo


@dataclass(frozen=True, slots=True)
class Composite:
    single_file: bool
    entries: list[PlacedFile]


def _drop_subtree(merged: dict[str, PlacedFile], path: str) -> None:
    prefix = path + "/"
    for key in [k for k in merged if k == path or k.startswith(prefix)]:
        del merged[key]


def composite_trees(stack: list[tuple[VersionInfo, Manifest]]) -> list[PlacedFile]:
    merged: dict[str, PlacedFile] = {}
    for _, manifest in stack:
        for entry in manifest.entries:
            if entry.type == EntryType.WHITEOUT:
                _drop_subtree(merged, entry.path)
                continue
            below = merged.get(entry.path)
            if below is not None and (
                entry.type != EntryType.DIRECTORY or below.entry.type != EntryType.DIRECTORY
            ):
                _drop_subtree(merged, entry.path)
            merged[entry.path] = PlacedFile(entry, manifest.block_size)
    # Parents before children: sorting by path segments keeps "a" < "a/b" < "a-b".
    return [merged[k] for k in sorted(merged, key=lambda p: p.split("/"))]


def grid_size(stack: list[tuple[VersionInfo, Manifest]]) -> int:
    """The block size a disk of ``stack`` is written in (its working layer's grid): the topmost
    fixed-size layer's, else the default (content chunks have no grid of their own)."""
    for _, manifest in reversed(stack):
        if manifest.chunking == Chunking.FIXED:
            return manifest.block_size
    return DEFAULT_BLOCK_SIZE


def composite_disks(stack: list[tuple[VersionInfo, Manifest]]) -> PlacedFile:
    """The disk of a stack: its blocks on one grid, or its pieces (cachepoint/layers/pieces.py)
    when a content-chunked layer has others above or below it."""
    chunked = any(manifest.chunking == Chunking.CONTENT for _, manifest in stack)
    if chunked and len(stack) == 1:
        return PlacedFile(stack[0][1].entries[0], stack[0][1].block_size)
    if chunked:
        pieces = Pieces.compose([(m.entries[0], m.block_size) for _, m in stack])
        top = stack[-1][1].entries[0]
        entry = FileEntry(top.path, EntryType.FILE, top.mode, pieces.size, top.mtime_ns)
        return PlacedFile(entry, max(m.block_size for _, m in stack), pieces)
    block_size = stack[0][1].block_size
    for info, manifest in stack:
        if manifest.block_size != block_size:
            raise InvalidInput(
                f"cannot composite {info.ref}: its blocks are {manifest.block_size} bytes, "
                f"the layers below use {block_size}"
            )
    top_entry = stack[-1][1].entries[0]
    size = max(m.entries[0].size for _, m in stack)
    count = -(-size // block_size)
    blocks = bytearray(HOLE_DIGEST * count)
    for _, manifest in stack:
        entry = manifest.entries[0]
        for index, digest in enumerate(entry.digests()):
            if digest != HOLE_DIGEST:
                blocks[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
    entry = FileEntry(
        top_entry.path, EntryType.FILE, top_entry.mode, size, top_entry.mtime_ns, blocks=bytes(blocks)
    )
    return PlacedFile(entry, block_size)


def composite(stack: list[tuple[VersionInfo, Manifest]]) -> Composite:
    if not stack:
        raise InvalidInput("an image needs at least one layer")
    kinds = {m.single_file for _, m in stack}
    if len(kinds) > 1:
        names = ", ".join(f"{i.ref} ({'disk' if m.single_file else 'tree'})" for i, m in stack)
        raise InvalidInput(f"an image stacks either disk images or trees, not both: {names}")
    if kinds == {True}:
        return Composite(True, [composite_disks(stack)])
    return Composite(False, composite_trees(stack))
