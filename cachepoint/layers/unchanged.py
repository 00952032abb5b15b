"""When a new version would only repeat the one its tag already names: `publish` and `ingest` make none.

The target tags are the ``--tag``s given, else ``latest``; every one of them must name the same
version, or the commit would move a tag and is made as usual. That version's content is the same as
the new manifest's when, in manifest order, the entries have the same path, type, mode, size, block
ids and symlink target, cut at the same block size. Modification times are not compared (a rebuilt
tree or a copied disk image has new mtimes and the same bytes), and neither is the file name of a disk
image (a renamed image is the same disk, as ingest's pre-filter already treats it). Comparing block ids
compares bytes: an id is the SHA-256 of its block.
"""

from __future__ import annotations

from collections.abc import Iterable

from cachepoint.ids import LATEST
from cachepoint.model import FileEntry, Manifest, VersionInfo


def target_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """The tags a commit would move besides ``latest``, or ``latest`` alone when none is given."""
    return tuple(dict.fromkeys(tags)) or (LATEST,)


def named_by_all(versions: Iterable[VersionInfo | None]) -> VersionInfo | None:
    """The one version every target tag names; None when a tag names nothing or they disagree."""
    found = list(versions)
    if not found or any(v is None for v in found):
        return None
    first = found[0]
    assert first is not None
    return first if all(v is not None and v.number == first.number for v in found) else None


def _entry_content(entry: FileEntry, single_file: bool) -> tuple[object, ...]:
    path = "" if single_file else entry.path
    return (path, entry.type, entry.mode, entry.size, entry.blocks, entry.extents, entry.target)


def same_content(old: Manifest, new: Manifest) -> bool:
    """Whether exporting ``old`` and ``new`` writes the same bytes, modes and names (mtimes aside)."""
    if (old.block_size, old.chunking, old.single_file, len(old.entries)) != (
        new.block_size,
        new.chunking,
        new.single_file,
        len(new.entries),
    ):
        return False
    return all(
        _entry_content(a, old.single_file) == _entry_content(b, new.single_file)
        for a, b in zip(old.entries, new.entries, strict=True)
    )


def unchanged_line(ref: str) -> str:
    """What `publish` and `ingest` print when they made no version."""
    return f"unchanged: {ref} already has this content (--allow-same makes a new version anyway)"
