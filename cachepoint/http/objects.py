"""What a URL names: a ref, a path or an image resolved to one file's blocks and its ETag.

Refs and tags are resolved on every request (tags move); everything derived from a manifest digest
(the parsed manifest, a tree's path index, a composite disk) is immutable and kept in a small cache,
because rebuilding it per request dominates small range requests: a 10 GiB disk of 64 KiB blocks has
163,840 ids, and compositing a stack walks every id of every layer in Python.

A ref this store does not hold but the daemon has attached lazily (`cachepoint attach os/x:tag`) is
served from that attachment's version and block source: HTTP reads fetch through the fleet too.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar, cast

from cachepoint.blocksource import BlockSource, StoreSource
from cachepoint.errors import InvalidInput, LayerNotFound, NotFound, RefNotFound
from cachepoint.ids import DIGEST_SIZE, Ref, validate_layer_name
from cachepoint.layers.composite import composite_disks
from cachepoint.layers.export import PlacedFile
from cachepoint.model import EntryType, FileEntry, Manifest, VersionInfo, check_relative_path
from cachepoint.store.store import Store

CACHE_BYTES = 64 * 1024 * 1024
_ENTRY_OVERHEAD = 256  # rough bytes of Python objects around one entry's packed ids

V = TypeVar("V")

# A ref's lazily attached version, its manifest and the source its disk reads through; None when the
# daemon has no such attachment (cachepoint/disk/exports.py ``Disks.lazy_version``).
Attached = Callable[[str], tuple[VersionInfo, Manifest, BlockSource] | None]


class WrongKind(InvalidInput):
    """{} is {}: {}"""


class PathNotFound(NotFound):
    """{} has no file {!r}"""


class NotAFile(NotFound):
    """{!r} in {} is a {}, not a regular file"""


class InvalidPath(InvalidInput):
    """invalid file path {!r}: {}"""


@dataclass(frozen=True, slots=True)
class Served:
    """One byte stream the HTTP app serves."""

    placed: PlacedFile
    etag: str
    """Quoted strong entity tag: the bytes are a function of the manifest digests it is derived from."""
    resolved: str
    """The versions behind the URL (``os/win10@7``, or an image's stack), sent as Cachepoint-Ref."""
    source: BlockSource
    """Where the bytes come from."""

    @property
    def size(self) -> int:
        return self.placed.entry.size


def _etag(*parts: bytes) -> str:
    # Length-prefixed, so no two different lists of parts hash alike.
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return f'"{h.hexdigest()}"'


def _weight(entries: tuple[FileEntry, ...] | list[FileEntry]) -> int:
    return sum(len(e.blocks) + len(e.path) + _ENTRY_OVERHEAD for e in entries)


def _placed_weight(placed: PlacedFile) -> int:
    # A piece: four list slots and its block id (an estimate, like _ENTRY_OVERHEAD).
    pieces = len(placed.pieces) * (4 * 8 + DIGEST_SIZE + 64) if placed.pieces is not None else 0
    return _weight([placed.entry]) + pieces


class DerivedCache:
    """Values derived from immutable manifests, least recently used dropped first, bounded by an
    estimate of their bytes. Thread-safe: resolvers run in worker threads."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self._budget = budget
        self._used = 0
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], V], weigh: Callable[[V], int]) -> V:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return cast(V, hit[0])
        # Built outside the lock: two threads may build the same value, which is harmless.
        value = make()
        weight = weigh(value)
        if weight > self._budget:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, weight)
                self._used += weight
            while self._used > self._budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self._used -= dropped
        return value


class Resolver:
    """Blocking catalog look-ups for the HTTP handlers (run them in a worker thread)."""

    def __init__(
        self,
        store: Store,
        cache: DerivedCache | None = None,
        source: BlockSource | None = None,
        attached: Attached | None = None,
    ) -> None:
        """``source``: where the store's blocks are read (default: the store itself; the daemon's:
        through its decoded cache). ``attached``: lazily attached refs the store does not hold."""
        self._store = store
        self._cache = cache or DerivedCache()
        self.source = source or StoreSource(store)
        self._attached = attached

    def _manifest(self, digest: bytes) -> Manifest:
        return self._cache.get(
            ("manifest", digest), lambda: self._store.catalog.manifest(digest), lambda m: _weight(m.entries)
        )

    def _version(self, ref: str) -> tuple[VersionInfo, Manifest]:
        info = self._store.catalog.resolve(Ref.parse(ref))
        return info, self._manifest(info.manifest_digest)

    def _served_version(self, ref: str) -> tuple[VersionInfo, Manifest, BlockSource]:
        """A version of this store, else one the daemon attached lazily."""
        try:
            return (*self._version(ref), self.source)
        except (LayerNotFound, RefNotFound):
            found = self._attached(ref) if self._attached is not None else None
            if found is None:
                raise
            return found

    def version_file(self, ref: str) -> Served:
        """The disk image of a single-file layer version."""
        info, manifest, source = self._served_version(ref)
        if not manifest.single_file:
            raise WrongKind(info.ref, "a tree layer", "ask for one of its files under .../files/PATH")
        placed = PlacedFile(manifest.entries[0], manifest.block_size)
        return Served(placed, f'"{info.manifest_digest.hex()}"', info.ref, source)

    def version_path(self, ref: str, path: str) -> Served:
        """A regular file of a tree layer version, found by its manifest path (never on a filesystem)."""
        try:
            check_relative_path(path)
        except ValueError as err:
            raise InvalidPath(path, err) from err
        info, manifest, source = self._served_version(ref)
        if manifest.single_file:
            raise WrongKind(info.ref, "a disk image layer", "ask for its bytes at .../file")
        index = self._cache.get(
            ("paths", info.manifest_digest), manifest.by_path, lambda d: _weight(list(d.values()))
        )
        entry = index.get(path)
        if entry is None:
            raise PathNotFound(info.ref, path)
        if entry.type != EntryType.FILE:
            raise NotAFile(path, info.ref, entry.type.name.lower())
        etag = _etag(b"file", info.manifest_digest, path.encode())
        return Served(PlacedFile(entry, manifest.block_size), etag, info.ref, source)

    def image_disk(self, name: str) -> Served:
        """The composite disk of an image: each block from the topmost layer that has data there."""
        validate_layer_name(name)
        spec = self._store.catalog.image(name)
        stack = [self._version(ref) for ref in spec.refs]
        trees = [info.ref for info, manifest in stack if not manifest.single_file]
        if trees or not stack:
            what = f"a stack with tree layers ({', '.join(trees)})" if trees else "an empty stack"
            raise WrongKind(f"image {name!r}", what, "only a stack of disk image layers has a disk")
        digests = tuple(info.manifest_digest for info, _ in stack)
        placed = self._cache.get(("disk", digests), lambda: composite_disks(stack), _placed_weight)
        resolved = " ".join(info.ref for info, _ in stack)
        return Served(placed, _etag(b"image", *digests), resolved, self.source)
