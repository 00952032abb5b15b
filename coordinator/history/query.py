"""Reading history at the coordinator: a user's timeline, every version of one file, the file as it was
at a point in time, and the difference between two versions. Reads only; nothing here is audited
(handing out a file's bytes is, by the caller)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cachepoint.errors import InvalidInput, LayerNotFound, NotFound, RefNotFound
from cachepoint.ids import Ref
from cachepoint.layers.diff import Diff, diff_manifests
from cachepoint.model import EntryType, FileEntry, Manifest, VersionInfo, check_relative_path
from cachepoint.store.catalog import LayerRecord
from cachepoint.store.store import Store
from coordinator.history.files import FileReader, content_key
from coordinator.history.times import iso
from coordinator.history.users import layer_prefix, user_layer, validate_user

MAX_PATH = 4096
MANIFEST_CACHE = 64  # parsed manifests kept (a file's history reads one per version)


class UnknownUser(NotFound):
    """user {!r} has no layers at this coordinator (nothing was delivered for user/{}/...)"""


class NoVersionAt(NotFound):
    """{} has no version made at or before {} (its first is from {})"""


class PathNotInVersion(NotFound):
    """{!r} is not in {} (the version at {})"""


def check_path(path: str) -> str:
    if len(path) > MAX_PATH:
        raise InvalidInput(f"path: {len(path)} characters, the limit is {MAX_PATH}")
    try:
        return check_relative_path(path)
    except ValueError as err:
        raise InvalidInput(str(err)) from err


def version_json(info: VersionInfo, tags: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "ref": info.ref,
        "layer": info.layer,
        "version": info.number,
        "parent": info.parent or None,
        "created": iso(info.created_ns),
        "created_ns": info.created_ns,
        "device": info.device,
        "author": info.author,
        "message": info.message,
        "labels": list(info.labels),
        "changes": {
            c.file_class: {"added": c.added, "changed": c.changed, "removed": c.removed} for c in info.changes
        },
        "logical_bytes": info.logical_bytes,
        "digest": info.digest_text,
        "restored_from": info.restored_from or None,
        "tags": list(tags),
        # "created" is on the coordinator's clock; the device's own reading and its skew are kept beside.
        "received": iso(info.received_ns) if info.received_ns else None,
        "device_created": iso(info.device_created_ns) if info.device_created_ns else None,
        "device_created_ns": info.device_created_ns,
        "clock_skew_ns": info.clock_skew_ns,
    }


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    version: VersionInfo
    tags: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return version_json(self.version, self.tags)


@dataclass(frozen=True, slots=True)
class Timeline:
    user: str
    entries: tuple[TimelineEntry, ...]

    def as_json(self) -> dict[str, Any]:
        return {"user": self.user, "versions": [e.as_json() for e in self.entries]}


@dataclass(frozen=True, slots=True)
class FileVersion:
    layer: str
    number: int
    created_ns: int
    device: str
    author: str
    path: str
    type: EntryType
    mode: int
    size: int
    mtime_ns: int
    sha256: str = ""
    target: str = ""
    state: str = ""  # against the version's parent: added, changed, same, or "parent deleted"

    @property
    def ref(self) -> str:
        return f"{self.layer}@{self.number}"

    def as_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "layer": self.layer,
            "version": self.number,
            "created": iso(self.created_ns),
            "created_ns": self.created_ns,
            "device": self.device,
            "author": self.author,
            "path": self.path,
            "type": self.type.name.lower(),
            "mode": oct(self.mode),
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256 or None,
            "target": self.target or None,
            "state": self.state or None,
        }


@dataclass(frozen=True, slots=True)
class FileHistory:
    layer: str
    path: str
    versions: tuple[FileVersion, ...]

    def as_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "path": self.path, "versions": [v.as_json() for v in self.versions]}


@dataclass(frozen=True, slots=True)
class DiffResult:
    old: str
    new: str
    diff: Diff

    def as_json(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, **self.diff.as_json()}


def by_time(versions: list[VersionInfo]) -> list[VersionInfo]:
    """Oldest first by when each version was made on the coordinator's clock (a device's time corrected
    for its skew, coordinator/catalog/clock.py); ties by layer and number, so the order is the same on
    every call."""
    return sorted(versions, key=lambda v: (v.created_ns, v.layer, v.number))


class Queries:
    def __init__(self, store: Store, files: FileReader) -> None:
        self.store = store
        self.files = files
        self._manifests: OrderedDict[bytes, Manifest] = OrderedDict()
        self._lock = threading.Lock()

    def manifest(self, digest: bytes) -> Manifest:
        with self._lock:
            cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        manifest = self.store.catalog.manifest(digest)
        with self._lock:
            self._manifests[digest] = manifest
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return manifest

    def user_layers(self, user: str) -> list[LayerRecord]:
        validate_user(user)
        prefix = layer_prefix(user)
        layers = [layer for layer in self.store.catalog.layers() if layer.name.startswith(prefix)]
        if not layers:
            raise UnknownUser(user, user)
        return layers

    def _layer_versions(self, layer: str) -> list[VersionInfo]:
        try:
            return self.store.catalog.versions(layer)
        except LayerNotFound as err:
            raise NotFound(f"layer {layer!r} does not exist at this coordinator") from err

    def timeline(self, user: str, from_ns: int = 0, to_ns: int = 0, layer: str = "") -> Timeline:
        names = [user_layer(user, layer)] if layer else [r.name for r in self.user_layers(user)]
        entries = []
        for name in names:
            tags: dict[int, list[str]] = {}
            for tag, number in sorted(self.store.catalog.tags(name).items()):
                tags.setdefault(number, []).append(tag)
            for info in self._layer_versions(name):
                if (from_ns and info.created_ns < from_ns) or (to_ns and info.created_ns > to_ns):
                    continue
                entries.append(TimelineEntry(info, tuple(tags.get(info.number, ()))))
        entries.sort(key=lambda e: (e.version.created_ns, e.version.layer, e.version.number))
        return Timeline(user, tuple(entries))

    def describe(
        self, info: VersionInfo, entry: FileEntry, block_size: int, state: str = "", *, digest: bool = True
    ) -> FileVersion:
        sha = self.files.sha256(entry, block_size) if digest and entry.type == EntryType.FILE else ""
        return FileVersion(
            info.layer,
            info.number,
            info.created_ns,
            info.device,
            info.author,
            entry.path,
            entry.type,
            entry.mode,
            entry.size,
            entry.mtime_ns,
            sha,
            entry.target,
            state,
        )

    def _state(self, info: VersionInfo, entry: FileEntry, block_size: int) -> str:
        if not info.parent:
            return "added"
        try:
            parent = self.store.catalog.version(info.layer, info.parent)
        except RefNotFound:
            return "parent deleted"
        parent_manifest = self.manifest(parent.manifest_digest)
        before = parent_manifest.by_path().get(entry.path)
        if before is None:
            return "added"
        same = (
            before.type == entry.type
            and before.target == entry.target
            and content_key(before, parent_manifest.block_size) == content_key(entry, block_size)
        )
        return "same" if same else "changed"

    def file_history(self, user: str, layer: str, path: str) -> FileHistory:
        name = user_layer(user, layer)
        check_path(path)
        found = []
        for info in by_time(self._layer_versions(name)):
            manifest = self.manifest(info.manifest_digest)
            entry = manifest.by_path().get(path)
            if entry is None:
                continue
            state = self._state(info, entry, manifest.block_size)
            found.append(self.describe(info, entry, manifest.block_size, state))
        if not found:
            raise NotFound(f"{path!r} is in no version of {name}")
        return FileHistory(name, path, tuple(found))

    def version_at(self, layer: str, at_ns: int) -> VersionInfo:
        """The newest version made at or before ``at_ns`` (0: the newest of all)."""
        versions = by_time(self._layer_versions(layer))
        candidates = [v for v in versions if not at_ns or v.created_ns <= at_ns]
        if not candidates:
            raise NoVersionAt(layer, iso(at_ns), iso(versions[0].created_ns))
        return candidates[-1]

    def file_at(self, user: str, layer: str, path: str, at_ns: int) -> tuple[FileVersion, FileEntry, int]:
        """The file as it was at ``at_ns``: its description, its entry and its block size."""
        name = user_layer(user, layer)
        check_path(path)
        info = self.version_at(name, at_ns)
        manifest = self.manifest(info.manifest_digest)
        entry = manifest.by_path().get(path)
        if entry is None:
            raise PathNotInVersion(path, info.ref, iso(at_ns) if at_ns else "now")
        if entry.type != EntryType.FILE:
            raise InvalidInput(f"{path!r} in {info.ref} is a {entry.type.name.lower()}, not a regular file")
        # No digest here: the caller computes it while it sends the bytes (one read, not two).
        return self.describe(info, entry, manifest.block_size, digest=False), entry, manifest.block_size

    def diff(self, old: Ref, new: Ref) -> DiffResult:
        a, b = self.store.catalog.resolve(old), self.store.catalog.resolve(new)
        return DiffResult(
            a.ref, b.ref, diff_manifests(self.manifest(a.manifest_digest), self.manifest(b.manifest_digest))
        )
