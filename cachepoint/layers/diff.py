"""Differences between two versions: files added, removed, changed, and the changed byte ranges."""

from __future__ import annotations

from dataclasses import dataclass, field

from cachepoint.model import EntryType, FileEntry, Manifest


@dataclass
class FileChange:
    path: str
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) byte ranges
    metadata: list[str] = field(default_factory=list)  # which attributes changed

    def as_json(self) -> dict[str, object]:
        return {"path": self.path, "ranges": [list(r) for r in self.ranges], "metadata": self.metadata}


@dataclass
class Diff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[FileChange] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": [c.as_json() for c in self.changed],
        }


def changed_ranges(old: FileEntry, new: FileEntry, old_bs: int, new_bs: int) -> list[tuple[int, int]]:
    """Byte ranges of ``new`` that differ from ``old``, adjacent changed blocks merged."""
    if old_bs != new_bs or old.chunked != new.chunked:
        return [(0, new.size)] if new.size else []
    if new.chunked:
        return _changed_chunk_ranges(old, new, new_bs)
    bs = new_bs
    old_ids, new_ids = old.digests(), new.digests()
    ranges: list[tuple[int, int]] = []
    for index, digest in enumerate(new_ids):
        start, end = index * bs, min((index + 1) * bs, new.size)
        # Equal ids mean equal bytes, except for holes, which only say "zeros" and not how many.
        if index < len(old_ids) and old_ids[index] == digest and min((index + 1) * bs, old.size) == end:
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    if new.size < old.size:  # truncated: the tail that is gone is a change too
        if ranges and ranges[-1][1] == new.size:
            ranges[-1] = (ranges[-1][0], old.size)
        else:
            ranges.append((new.size, old.size))
    return ranges


def _changed_chunk_ranges(old: FileEntry, new: FileEntry, bs: int) -> list[tuple[int, int]]:
    """``changed_ranges`` of content-chunked files: a chunk of ``new`` is unchanged where ``old`` has
    the same id over the same bytes (holes: the same extent of zeros)."""
    same = {(*old.span(i, bs), old.digest_at(i)) for i in range(old.block_count)}
    ranges: list[tuple[int, int]] = []
    for index in range(new.block_count):
        start, end = new.span(index, bs)
        if (start, end, new.digest_at(index)) in same:
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    if new.size < old.size:
        if ranges and ranges[-1][1] == new.size:
            ranges[-1] = (ranges[-1][0], old.size)
        else:
            ranges.append((new.size, old.size))
    return ranges


def diff_manifests(old: Manifest, new: Manifest) -> Diff:
    before, after = old.by_path(), new.by_path()
    if old.single_file and new.single_file and len(before) == len(after) == 1:
        # A disk image is the same file even when it was ingested under another name.
        e_old, (path_new, e_new) = next(iter(before.values())), next(iter(after.items()))
        before, after = {path_new: e_old}, {path_new: e_new}
    result = Diff()
    result.added = sorted(p for p in after if p not in before)
    result.removed = sorted(p for p in before if p not in after)
    for path in sorted(p for p in after if p in before):
        a, b = before[path], after[path]
        change = FileChange(path)
        if a.type != b.type:
            change.metadata.append("type")
        for name in ("mode", "mtime_ns", "target"):
            if getattr(a, name) != getattr(b, name):
                change.metadata.append(name)
        if b.type == EntryType.FILE and a.type == EntryType.FILE:
            if a.size != b.size:
                change.metadata.append("size")
            change.ranges = changed_ranges(a, b, old.block_size, new.block_size)
        if change.metadata or change.ranges:
            result.changed.append(change)
    return result
