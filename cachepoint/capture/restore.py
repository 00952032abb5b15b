"""restore-dir: bring chosen classes of files back to an earlier version, keep the others as today.

1. Capture the directory first, so today's state is a version (nothing is lost, and the restore
   composes from exactly what is on disk).
2. Plan the result: the entries of the restored classes as they were at REF, plus the entries of the
   other classes as they are today, plus the directories that hold them (and today's empty ones).
   Where the two disagree about a path (a path that changed class, a file where the other side has
   a directory) today's entry is kept, and the path is reported.
3. Apply it under the directory with ``SafeDir`` (never outside it, never through a symlink):
   remove what the result does not have (files of restored classes that did not exist at REF),
   create directories, write files and symlinks under temporary names and rename them into place,
   then set directories' modes and mtimes, deepest first.
4. Capture the result as a new version, always (even when nothing had to change).

Running it again after a crash finishes the job: step 1 captures the half-restored tree, whose kept
classes are still today's, so the plan is the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cachepoint.capture import classify
from cachepoint.capture.backend import Captures
from cachepoint.capture.engine import CaptureReport
from cachepoint.capture.index import Classes
from cachepoint.capture.safedir import SafeDir, TempFile
from cachepoint.capture.walk import check_root
from cachepoint.errors import InvalidInput
from cachepoint.ids import Ref
from cachepoint.layers.export import PlacedFile, write_open_files
from cachepoint.layers.ingest import ProgressFn
from cachepoint.layers.source import WHITEOUT_PREFIX
from cachepoint.model import EntryType, FileEntry, Manifest
from cachepoint.store.store import Store

log = logging.getLogger("cachepoint.restore")
WRITE_BATCH_FILES = 64  # files open at once while their blocks are written
DIRECTORY = EntryType.DIRECTORY


def _order(entry: FileEntry) -> list[str]:
    # Manifest order: names sorted within a directory, parents before children.
    return entry.path.split("/")


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def on_disk(entry: FileEntry) -> str:
    """Where an entry lives in the directory: a whiteout of NAME is the file ``.wh.NAME``."""
    if entry.type != EntryType.WHITEOUT:
        return entry.path
    parent, _, name = entry.path.rpartition("/")
    return f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name


@dataclass
class RestorePlan:
    entries: list[FileEntry]  # the result, in manifest order
    write: list[FileEntry]  # files, symlinks and whiteouts to put in place (from REF)
    remove: list[FileEntry]  # today's entries the result does not have, deepest first
    make_directories: list[FileEntry]  # directories of the result that are not directories today
    kept: list[str] = field(default_factory=list)  # paths where today's entry won over REF's


def plan_restore(
    current: Manifest, current_codes: bytes, target: Manifest, target_codes: bytes, restore: frozenset[str]
) -> RestorePlan:
    """The result tree: ``restore`` classes from ``target``, the other classes from ``current``."""
    wanted = {classify.CODES[name] for name in restore}
    result: dict[str, FileEntry] = {}
    holders: set[str] = set()  # directories that hold an entry of the result

    def take(entry: FileEntry) -> None:
        result[entry.path] = entry
        holders.update(_ancestors(entry.path))

    current_dirs = {e.path: e for e in current.entries if e.type == DIRECTORY}
    nonempty = {e.path.rpartition("/")[0] for e in current.entries}
    for entry, code in zip(current.entries, current_codes, strict=True):
        if entry.type != DIRECTORY and code not in wanted:
            take(entry)
    # Today's empty directories stay (nothing of a restored class was in them).
    empty = {path for path in current_dirs if path not in nonempty}
    kept: list[str] = []
    for entry, code in zip(target.entries, target_codes, strict=True):
        if entry.type == DIRECTORY or code not in wanted:
            continue
        path = entry.path
        if path in result or path in holders or path in empty or any(a in result for a in _ancestors(path)):
            kept.append(path)
            continue
        take(entry)
    target_dirs = {e.path: e for e in target.entries if e.type == DIRECTORY}
    directories = []
    for path in holders | empty:
        directory = current_dirs.get(path) or target_dirs.get(path)
        if directory is None:  # only a manifest that was not made by a walk can lack a parent
            raise InvalidInput(f"manifest directory {path!r} is missing: its entries have no parent")
        directories.append(directory)
    entries = sorted([*result.values(), *directories], key=_order)
    final = {e.path: e for e in entries}
    before = current.by_path()
    write = [e for e in result.values() if before.get(e.path) != e]  # new, or differs (mtime included)
    remove = [
        e
        for e in reversed(current.entries)
        if (then := final.get(e.path)) is None or (then.type == DIRECTORY) != (e.type == DIRECTORY)
    ]
    make = [
        e
        for e in entries
        if e.type == DIRECTORY and ((now := before.get(e.path)) is None or now.type != DIRECTORY)
    ]
    return RestorePlan(entries, sorted(write, key=_order), remove, make, sorted(kept))


@dataclass(frozen=True, slots=True)
class Applied:
    written: int
    removed: int
    left_in_place: list[str]  # directories that were to go but held something new


def _write_files(
    store: Store, tree: SafeDir, files: list[FileEntry], block_size: int, progress: ProgressFn | None
) -> None:
    total = sum(e.size for e in files)
    overall = None if progress is None else lambda done, _: progress(done, total)
    done = 0
    for start in range(0, len(files), WRITE_BATCH_FILES):
        batch = files[start : start + WRITE_BATCH_FILES]
        temps: list[TempFile] = []
        try:
            for entry in batch:
                temps.append(tree.create_temp(entry.path))
            placed = [(PlacedFile(e, block_size), t.fd) for e, t in zip(batch, temps, strict=True)]
            done += write_open_files(store, placed, overall, done)
        except BaseException:
            for temp in temps:
                tree.discard_temp(temp)
            raise
        for index, (entry, temp) in enumerate(zip(batch, temps, strict=True)):
            try:
                tree.finish_temp(temp, entry.mode, entry.mtime_ns)  # removes its temporary if it fails
            except BaseException:
                for rest in temps[index + 1 :]:
                    tree.discard_temp(rest)
                raise


def apply_plan(
    store: Store, root: Path, plan: RestorePlan, block_size: int, progress: ProgressFn | None = None
) -> Applied:
    left: list[str] = []
    with SafeDir(root) as tree:
        for entry in plan.remove:
            if not tree.remove(on_disk(entry)):
                left.append(entry.path)
        for entry in plan.make_directories:
            tree.mkdir(entry.path)
        files = [e for e in plan.write if e.type == EntryType.FILE]
        _write_files(store, tree, files, block_size, progress)
        for entry in plan.write:
            if entry.type == EntryType.SYMLINK:
                tree.symlink(entry.path, entry.target, entry.mtime_ns)
            elif entry.type == EntryType.WHITEOUT:
                tree.finish_temp(tree.create_temp(on_disk(entry)), 0o600, entry.mtime_ns)
        for entry in reversed(plan.entries):  # deepest first: filling a directory moves its mtime
            if entry.type == DIRECTORY:
                tree.set_directory(entry.path, entry.mode, entry.mtime_ns)
        tree.sync()
    return Applied(len(plan.write), len(plan.remove) - len(left), left)


@dataclass
class RestoreResult:
    layer: str
    to: str
    only: list[str]
    saved: CaptureReport  # the capture of today's state, before anything was changed
    result: CaptureReport  # the new version
    written: int
    removed: int
    kept: list[str]
    left_in_place: list[str]

    def as_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "to": self.to,
            "only": self.only,
            "saved_before": self.saved.ref,
            "version": self.result.version,
            "ref": self.result.ref,
            "written": self.written,
            "removed": self.removed,
            "kept_today": self.kept,
            "left_in_place": self.left_in_place,
            "labels": list(self.result.labels),
            "changes": self.result.as_json()["changes"],
        }


def restore_dir(
    backend: Captures,
    layer: str,
    root: Path,
    to: Ref,
    restore: frozenset[str],
    message: str = "",
    progress: ProgressFn | None = None,
) -> RestoreResult:
    if to.layer != layer:
        raise InvalidInput(f"--to {to} names layer {to.layer!r}, not {layer!r}")
    check_root(root)
    only = [name for name in classify.CLASSES if name in restore]
    kept_classes = [name for name in classify.CLASSES if name not in restore]
    saved = backend.capture(layer, root, f"before restore-dir of {','.join(only)} from {to}")
    with backend.reading() as store:
        current_info = store.catalog.version(layer, saved.version)
        target_info = store.catalog.resolve(to)
        current = store.catalog.manifest(current_info.manifest_digest)
        target = store.catalog.manifest(target_info.manifest_digest)
        current_codes = Classes(store, current_info.manifest_digest, current.entries).all()
        target_codes = Classes(store, target_info.manifest_digest, target.entries).all()
        plan = plan_restore(current, current_codes, target, target_codes, restore)
        applied = apply_plan(store, root, plan, current.block_size, progress)
    for path in applied.left_in_place:
        log.warning("%s holds files added during the restore: left in place", path)
    default = f"restore-dir: {', '.join(only)} from {target_info.ref}"
    if kept_classes:
        default += f", {', '.join(kept_classes)} kept from @{current_info.number}"
    result = backend.capture(layer, root, message or default, force=True)
    return RestoreResult(
        layer=layer,
        to=target_info.ref,
        only=only,
        saved=saved,
        result=result,
        written=applied.written,
        removed=applied.removed,
        kept=plan.kept,
        left_in_place=applied.left_in_place,
    )
