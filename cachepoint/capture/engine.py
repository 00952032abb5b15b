"""A capture: one new version of a file-level user layer from a live directory tree.

Steps: walk the tree (names and stats only); carry every file whose stats match the stat index over
from the previous version without opening it; read the others through the ingest pipeline (so a
changed large file costs only its changed blocks: the xxh3 pre-filter skips the rest); classify what
was read; compare with the previous version per class and name the apps that came and went; commit
the version with its labels and per-class counts, and in the same batch its file classes and the new
stat index (see ``index``). A tree equal to the latest version makes no version unless ``force``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import rocksdict

from cachepoint.blocks import DEFAULT_BLOCK_SIZE
from cachepoint.capture import classify
from cachepoint.capture.index import (
    RACY_WINDOW_NS,
    STALE_INODE,
    Classes,
    StatIndex,
    load_stat_index,
    stage_classes,
    stage_stat_index,
    write_stat_index,
)
from cachepoint.capture.timeline import Change, app_labels, class_changes, differs
from cachepoint.capture.walk import Walked, identity, no_cyclic_gc, walk
from cachepoint.errors import InvalidInput
from cachepoint.ids import validate_layer_name
from cachepoint.layers.ingest import (
    PREFILTER_MIN_BLOCKS,
    ProgressFn,
    cut_files,
    default_author,
    resolve_block_size,
)
from cachepoint.layers.source import SourceFile
from cachepoint.model import ClassChanges, EntryType, FileEntry, LayerKind, VersionInfo
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.wire import ManifestWriter, StoredManifest, manifest_digest

DEFAULT_LAYER = "home"  # user/NAME/home


def user_layer(user: str, layer: str | None = None) -> str:
    """The layer a capture for ``user`` goes to: ``user/USER/home``, or ``layer`` when it is one of
    the user's own (``user/USER/...``)."""
    if not user or "/" in user:
        raise InvalidInput(f"user name {user!r}: it must be one layer-name segment (e.g. alice)")
    default = validate_layer_name(f"user/{user}/{DEFAULT_LAYER}")
    if layer is None:
        return default
    validate_layer_name(layer)
    if not layer.startswith(f"user/{user}/"):
        raise InvalidInput(
            f"layer {layer!r} is not a layer of user {user!r}: it must start with user/{user}/"
        )
    return layer


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    layer: str
    root: Path
    message: str = ""
    author: str = ""
    device: str = ""
    force: bool = False  # make a version even when nothing changed (restore-dir's result)
    new_layer_block_size: int = DEFAULT_BLOCK_SIZE
    workers: int = 0  # 0: one per core


@dataclass
class CaptureReport:
    """What a capture did, as `cachepoint capture --json` prints it (and the daemon sends it)."""

    layer: str
    version: int
    digest: str
    parent: int
    unchanged: bool  # the tree equals the latest version: no version was made
    entries: int
    files: int
    files_read: int  # opened and read; the other files were carried over by their stats
    bytes_read: int
    logical_bytes: int
    new_blocks: int = 0
    new_bytes: int = 0
    new_stored_bytes: int = 0
    reused_blocks: int = 0
    changes: tuple[ClassChanges, ...] = ()
    labels: tuple[str, ...] = ()
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.layer}@{self.version}"

    def as_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "version": self.version,
            "ref": self.ref,
            "digest": self.digest,
            "parent": self.parent or None,
            "unchanged": self.unchanged,
            "entries": self.entries,
            "files": self.files,
            "files_read": self.files_read,
            "files_unchanged": self.files - self.files_read,
            "bytes_read": self.bytes_read,
            "logical_bytes": self.logical_bytes,
            "new_blocks": self.new_blocks,
            "new_bytes": self.new_bytes,
            "new_stored_bytes": self.new_stored_bytes,
            "reused_blocks": self.reused_blocks,
            "changes": {
                c.file_class: {"added": c.added, "changed": c.changed, "removed": c.removed}
                for c in self.changes
            },
            "labels": list(self.labels),
            "seconds": round(self.seconds, 3),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> CaptureReport:
        changes = data.get("changes") or {}
        assert isinstance(changes, dict)
        skipped = data.get("skipped") or []
        assert isinstance(skipped, list)
        return cls(
            layer=str(data["layer"]),
            version=int(data["version"]),  # type: ignore[call-overload]
            digest=str(data["digest"]),
            parent=int(data.get("parent") or 0),  # type: ignore[call-overload]
            unchanged=bool(data["unchanged"]),
            entries=int(data["entries"]),  # type: ignore[call-overload]
            files=int(data["files"]),  # type: ignore[call-overload]
            files_read=int(data["files_read"]),  # type: ignore[call-overload]
            bytes_read=int(data["bytes_read"]),  # type: ignore[call-overload]
            logical_bytes=int(data["logical_bytes"]),  # type: ignore[call-overload]
            new_blocks=int(data.get("new_blocks") or 0),  # type: ignore[call-overload]
            new_bytes=int(data.get("new_bytes") or 0),  # type: ignore[call-overload]
            new_stored_bytes=int(data.get("new_stored_bytes") or 0),  # type: ignore[call-overload]
            reused_blocks=int(data.get("reused_blocks") or 0),  # type: ignore[call-overload]
            changes=tuple(ClassChanges(name, **counts) for name, counts in changes.items()),
            labels=tuple(str(label) for label in data.get("labels") or []),  # type: ignore[attr-defined]
            seconds=float(data.get("seconds") or 0.0),  # type: ignore[arg-type]
            skipped=[(str(s["path"]), str(s["reason"])) for s in skipped],
        )


@dataclass(frozen=True, slots=True)
class _Figures:
    """What the commit needs to know of the new manifest (it is never decoded whole: see wire.py)."""

    block_size: int
    logical_bytes: int


@dataclass
class _Previous:
    """The layer's latest version, kept in wire form, with the columns the stat check reads."""

    info: VersionInfo
    manifest: StoredManifest
    paths: list[str]
    types: list[int]
    modes: list[int]
    sizes: list[int]
    mtimes: list[int]
    by_path: dict[str, int]
    index: StatIndex | None  # usable for this capture, or None
    classes: Classes

    def tree(self) -> list[tuple[str, int]]:
        return list(zip(self.paths, self.types, strict=True))


def _previous(store: Store, layer: str, root: str) -> _Previous | None:
    record = store.catalog.layer_or_none(layer)
    if record is None:
        return None
    info = store.catalog.version(layer, record.latest)
    manifest = StoredManifest(store.catalog.manifest_bytes(info.manifest_digest))
    paths, types, modes, sizes, mtimes = manifest.columns()
    index = load_stat_index(store, layer)
    if index is not None and (
        index.manifest_digest != info.manifest_digest or index.root != root or len(index.inodes) != len(paths)
    ):
        index = None
    # Paths of the stored manifest are compared with walked paths only (valid by construction), and
    # an entry is decoded, and so validated, before anything else uses it.
    by_path = {path: i for i, path in enumerate(paths)}
    classes = Classes(store, info.manifest_digest, manifest.entries)
    return _Previous(info, manifest, paths, types, modes, sizes, mtimes, by_path, index, classes)


@dataclass
class _Assembly:
    """The new version, entry by entry in walk order: a new FileEntry, or the index of the previous
    version's entry carried over unchanged (never decoded)."""

    parts: list[FileEntry | int] = field(default_factory=list)
    codes: bytearray = field(default_factory=bytearray)
    previous: list[int] = field(default_factory=list)  # the previous version's entry at the path, or -1
    inodes: list[int] = field(default_factory=list)
    devices: list[int] = field(default_factory=list)
    ctimes: list[int] = field(default_factory=list)
    files: list[SourceFile] = field(default_factory=list)  # to read
    carried_prefilter: dict[int, bytes] = field(default_factory=dict)
    file_count: int = 0
    logical_bytes: int = 0

    def tree(self, prev: _Previous | None) -> list[tuple[str, int]]:
        result: list[tuple[str, int]] = []
        for part in self.parts:
            if isinstance(part, int):
                assert prev is not None
                result.append((prev.paths[part], prev.types[part]))
            else:
                result.append((part.path, part.type))
        return result


def _assemble(
    store: Store, root: str, walked: list[Walked], prev: _Previous | None, started_ns: int, block_size: int
) -> _Assembly:
    out = _Assembly()
    parts, codes, previous = out.parts, out.codes, out.previous
    inodes, devices, ctimes = out.inodes, out.devices, out.ctimes
    racy_from = started_ns - RACY_WINDOW_NS
    prefilter_from = PREFILTER_MIN_BLOCKS * block_size - block_size + 1  # smallest size with that many blocks
    by_path = prev.by_path if prev is not None else {}
    index = prev.index if prev is not None else None
    file_type, directory = int(EntryType.FILE), int(EntryType.DIRECTORY)
    class_codes = classify.CODES
    # Carried files keep their recorded class (derived, entry by entry, only without a record).
    recorded = prev.classes.recorded if prev is not None else None
    for w in walked:
        i = by_path.get(w.path, -1)
        previous.append(i)
        if w.type == file_type:
            out.file_count += 1
            out.logical_bytes += w.size
            inodes.append(STALE_INODE if w.mtime_ns >= racy_from else w.ino)
            devices.append(w.dev)
            ctimes.append(w.ctime_ns)
            if (
                i >= 0
                and index is not None
                and prev is not None
                and prev.types[i] == file_type
                and prev.sizes[i] == w.size
                and prev.mtimes[i] == w.mtime_ns
                and prev.modes[i] == w.mode
                and index.inodes[i] == w.ino
                and index.devices[i] == w.dev
                and index.ctimes[i] == w.ctime_ns
            ):
                parts.append(i)
                codes.append(recorded[i] if recorded is not None else prev.classes.code(i))
                if w.size >= prefilter_from:
                    packed = store.catalog.prefilter(prev.info.manifest_digest, i)
                    if packed is not None:
                        out.carried_prefilter[len(parts) - 1] = packed
                continue
            # Classified once read (the reader keeps each file's first bytes); the reader also checks
            # that it opens the very file the walk saw.
            parts.append(FileEntry(w.path, EntryType.FILE, w.mode, w.size, w.mtime_ns))
            codes.append(0)
            out.files.append(SourceFile(len(parts) - 1, os.path.join(root, w.path), w.size, (w.ino, w.dev)))
            continue
        inodes.append(0)
        devices.append(0)
        ctimes.append(0)
        same = (
            i >= 0
            and prev is not None
            and (prev.types[i], prev.modes[i], prev.mtimes[i], prev.sizes[i])
            == (w.type, w.mode, w.mtime_ns, w.size)
        )
        if w.type == directory:
            parts.append(i if same else FileEntry(w.path, EntryType.DIRECTORY, w.mode, 0, w.mtime_ns))
            codes.append(0)
            continue
        # Symlinks and whiteouts: no content to read, classified by name (there are few of them).
        entry = FileEntry(w.path, w.type, w.mode, w.size, w.mtime_ns, w.target)
        parts.append(i if same and prev is not None and prev.manifest.entries[i] == entry else entry)
        codes.append(class_codes[classify.classify(w.path, None)])
    return out


def _differences(out: _Assembly, prev: _Previous | None) -> list[Change]:
    """The counted entries (not directories) that differ from the previous version."""
    directory = int(EntryType.DIRECTORY)
    changes: list[Change] = []
    matched = bytearray(len(prev.paths)) if prev is not None else bytearray()
    for at, part in enumerate(out.parts):
        i = out.previous[at]
        if i >= 0:
            matched[i] = 1
        if isinstance(part, int) or part.type == EntryType.DIRECTORY:
            continue  # carried over unchanged, or structure
        if i < 0 or prev is None or prev.types[i] == directory:
            changes.append(Change(part.path, 0, out.codes[at]))
        elif differs(prev.manifest.entries[i], part):
            changes.append(Change(part.path, prev.classes.code(i), out.codes[at]))
    if prev is not None:
        for i, seen in enumerate(matched):
            if not seen and prev.types[i] != directory:
                changes.append(Change(prev.paths[i], prev.classes.code(i), 0))
    return changes


def capture(store: Store, options: CaptureOptions, progress: ProgressFn | None = None) -> CaptureReport:
    with no_cyclic_gc():  # see walk.no_cyclic_gc: the assembly allocates per file too
        return _capture(store, options, progress)


def _capture(store: Store, options: CaptureOptions, progress: ProgressFn | None) -> CaptureReport:
    started = time.monotonic()
    validate_layer_name(options.layer)
    root = os.path.realpath(options.root)
    started_ns = time.time_ns()
    store_identity = identity(store.root)
    walked = walk(Path(root), skip=[store_identity] if store_identity else [])
    block_size = resolve_block_size(store, options.layer, None, options.new_layer_block_size)
    prev = _previous(store, options.layer, root)
    out = _assemble(store, root, walked.entries, prev, started_ns, block_size)

    def previous_file(path: str) -> tuple[int, bytes] | None:
        i = prev.by_path.get(path, -1) if prev is not None else -1
        if i < 0 or prev is None or prev.types[i] != EntryType.FILE:
            return None
        return i, prev.manifest.entries[i].blocks

    cut = cut_files(
        store,
        options.layer,
        out.files,
        lambda at: walked.entries[at].path,
        previous_file,
        prev.info.manifest_digest if prev is not None else b"",
        block_size,
        options.workers,
        progress,
    )
    committed = False
    try:
        for source in out.files:
            at = source.entry_index
            entry = out.parts[at]
            assert isinstance(entry, FileEntry)
            out.parts[at] = replace(entry, blocks=cut.digests[at])
            out.codes[at] = classify.CODES[classify.classify(entry.path, cut.heads.get(at, b""))]
        writer = ManifestWriter(block_size)
        for part in out.parts:
            if isinstance(part, int):
                assert prev is not None
                writer.carry(prev.manifest, part)
            else:
                writer.add(part)
        manifest_bytes = writer.to_bytes()
        digest = manifest_digest(manifest_bytes)
        codes = bytes(out.codes)

        def stat_index(for_digest: bytes) -> StatIndex:
            return StatIndex(for_digest, root, out.inodes, out.devices, out.ctimes)

        if prev is not None and digest == prev.info.manifest_digest and not options.force:
            write_stat_index(store, options.layer, stat_index(digest))
            info = prev.info
            changes: tuple[ClassChanges, ...] = tuple(ClassChanges(name) for name in classify.CLASSES)
            labels: tuple[str, ...] = ()
        else:
            differences = _differences(out, prev)
            changes = class_changes(differences)
            labels = app_labels(differences, prev.tree if prev is not None else None, lambda: out.tree(prev))

            def also(batch: rocksdict.WriteBatch, info: VersionInfo) -> None:
                stage_classes(batch, store, info.manifest_digest, codes)
                stage_stat_index(batch, store, options.layer, stat_index(info.manifest_digest))

            info = store.catalog.commit(
                layer=options.layer,
                kind=LayerKind.USER,
                pending=PendingCommit(
                    manifest_bytes, {**out.carried_prefilter, **cut.prefilter}, cut.pins.ingest_id
                ),
                manifest=_Figures(block_size, out.logical_bytes),
                author=options.author or default_author(),
                device=options.device or os.uname().nodename,
                message=options.message or f"capture of {root}",
                labels=labels,
                changes=changes,
                also=also,
            )
            committed = True
    finally:
        cut.release(store, committed)
    stats = cut.result
    return CaptureReport(
        layer=options.layer,
        version=info.number,
        digest=info.digest_text,
        parent=info.parent,
        unchanged=not committed,
        entries=len(out.parts),
        files=out.file_count,
        files_read=len(out.files),
        bytes_read=stats.bytes_read,
        logical_bytes=out.logical_bytes,
        new_blocks=stats.new_blocks,
        new_bytes=stats.new_bytes,
        new_stored_bytes=stats.new_stored_bytes,
        reused_blocks=stats.reused,
        changes=changes,
        labels=labels,
        seconds=time.monotonic() - started,
        skipped=walked.skipped,
    )
