"""What a capture changed, per class of file, and the software timeline: apps that came and went.

Counted entries are files, symlinks and whiteouts (directories are structure, not content). A path
present in both versions is *changed* when its type, permission bits, size, symlink target or blocks
differ (a new mtime alone is not a change); a path whose class changed counts as removed from the
old class and added to the new one.

App directory rule (what ``app installed: DIR`` names): for a binary that appeared, DIR is the
topmost directory on its path that did not exist in the previous version (the directory the
installation created), descending through directories that hold nothing but one subdirectory (a
``Programs/`` created together with its only child ``Editor/`` gives ``Programs/Editor``). A binary
dropped into a directory that already existed is named itself (``.local/bin/tool``). Removals are
the mirror image: the topmost directory on the path that is gone in the new version. The first
capture of a layer is the baseline: it has no parent to compare with, so it is not labelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachepoint.capture import classify
from cachepoint.model import ClassChanges, EntryType, FileEntry

INSTALLED = "app installed: "
REMOVED = "app removed: "
_APPS = classify.CODES[classify.APPS]


@dataclass(frozen=True, slots=True)
class Change:
    """One counted entry that differs between two versions, with its class code in each (0: absent)."""

    path: str
    before: int
    after: int


def differs(a: FileEntry, b: FileEntry) -> bool:
    """Whether two entries at one path differ in what counts (a new mtime alone does not)."""
    return (a.type, a.mode, a.size, a.target, a.blocks) != (b.type, b.mode, b.size, b.target, b.blocks)


def class_changes(changes: Iterable[Change]) -> tuple[ClassChanges, ...]:
    """Added, changed and removed entries per class: one record for each class, in CLASSES order."""
    counts = {code: [0, 0, 0] for code in classify.NAMES}
    for c in changes:
        if c.before == c.after:
            counts[c.after][1] += 1
            continue
        if c.after:
            counts[c.after][0] += 1
        if c.before:
            counts[c.before][2] += 1
    return tuple(ClassChanges(name, *counts[classify.CODES[name]]) for name in classify.CLASSES)


# A version's tree as (path, entry type) pairs, in manifest order.
Tree = list[tuple[str, int]]
_DIRECTORY = int(EntryType.DIRECTORY)


def _directories(tree: Tree) -> set[str]:
    return {path for path, kind in tree if kind == _DIRECTORY}


def _children(tree: Tree) -> dict[str, list[tuple[str, int]]]:
    children: dict[str, list[tuple[str, int]]] = {}
    for path, kind in tree:
        children.setdefault(path.rpartition("/")[0], []).append((path, kind))
    return children


def app_directory(path: str, existed: set[str], children: dict[str, list[tuple[str, int]]]) -> str:
    """The app directory of the binary at ``path`` (see the module docstring): ``existed`` are the
    directories of the other version, ``children`` the entries of this one by parent."""
    parts = path.split("/")
    for depth in range(1, len(parts)):
        candidate = "/".join(parts[:depth])
        if candidate in existed:
            continue
        while depth < len(parts) - 1:
            kids = children.get(candidate, [])
            if len(kids) != 1 or kids[0][1] != _DIRECTORY:
                break
            depth += 1
            candidate = "/".join(parts[:depth])
        return candidate
    return path


def _named(paths: list[str], existed: set[str], tree: Tree) -> list[str]:
    children = _children(tree)
    return sorted({app_directory(p, existed, children) for p in paths})


def app_labels(
    changes: list[Change], prev_tree: Callable[[], Tree] | None, new_tree: Callable[[], Tree]
) -> tuple[str, ...]:
    """``app installed: DIR`` and ``app removed: DIR`` for the apps that appeared and disappeared.
    The trees are asked for only when some app did (they cost a pass over every entry)."""
    if prev_tree is None:
        return ()
    installed = [c.path for c in changes if c.after == _APPS and c.before != _APPS]
    removed = [c.path for c in changes if c.before == _APPS and c.after != _APPS]
    if not installed and not removed:
        return ()
    before, after = prev_tree(), new_tree()
    labels: list[str] = []
    if installed:
        labels += [INSTALLED + d for d in _named(installed, _directories(before), after)]
    if removed:
        labels += [REMOVED + d for d in _named(removed, _directories(after), before)]
    return tuple(labels)
