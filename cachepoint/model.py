"""Domain values: entries, manifests, versions and images. Frozen, validated, no I/O."""

from __future__ import annotations

import array
import bisect
import enum
import sys
from dataclasses import dataclass, field

from cachepoint.ids import DIGEST_SIZE, HOLE_DIGEST, BlockId, validate_layer_name


class EntryType(enum.IntEnum):
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    WHITEOUT = 4


class Chunking(enum.IntEnum):
    """How a layer's files are cut. FIXED: every block is ``block_size`` bytes at offset index ×
    block_size (layers written before content chunking existed, trees, user layers). CONTENT: chunks
    of variable length on ``unit_size`` boundaries chosen by content (cachepoint/chunking.py); each
    file entry then carries its extent index."""

    FIXED = 0
    CONTENT = 1

    @classmethod
    def parse(cls, text: str) -> Chunking:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"chunking {text!r} is not one of: fixed, content") from None

    def __str__(self) -> str:
        return self.name.lower()


EXTENT_SIZE = 8  # one little-endian uint64 per chunk: the byte offset where it ends


def pack_extents(ends: list[int]) -> bytes:
    packed = array.array("Q", ends)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def _unpack_extents(packed: bytes) -> array.array[int]:
    ends = array.array("Q")
    ends.frombytes(packed)
    if sys.byteorder != "little":
        ends.byteswap()
    return ends


class LayerKind(enum.IntEnum):
    OS = 1
    APP = 2
    USER = 3

    @classmethod
    def parse(cls, text: str) -> LayerKind:
        return cls[text.upper()]

    def __str__(self) -> str:
        return self.name.lower()


def check_relative_path(path: str) -> str:
    """Manifest paths are relative and '/'-separated; they can never climb out of a destination."""
    if not path or path.startswith("/") or "\x00" in path:
        raise ValueError(f"manifest path {path!r} must be relative and non-empty")
    # Wrapped in slashes, an empty, "." or ".." segment shows as "//", "/./" or "/../": three substring
    # searches instead of a split (every entry of every manifest read passes here).
    wrapped = f"/{path}/"
    if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
        raise ValueError(f"manifest path {path!r} has an empty, '.' or '..' segment")
    return path


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    type: EntryType
    mode: int
    size: int = 0
    mtime_ns: int = 0
    target: str = ""
    blocks: bytes = b""  # packed 32-byte digests; HOLE_DIGEST for an all-zero block (or run of them)
    # Content-chunked files only: where each block ends (EXTENT_SIZE bytes per block, see
    # pack_extents). Empty: fixed blocks, block i at i × block_size.
    extents: bytes = b""
    _ends: array.array[int] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_relative_path(self.path)
        if len(self.blocks) % DIGEST_SIZE:
            raise ValueError(f"entry {self.path!r}: packed block ids are not a multiple of {DIGEST_SIZE}")
        if self.extents and len(self.extents) != len(self.blocks) // DIGEST_SIZE * EXTENT_SIZE:
            raise ValueError(
                f"entry {self.path!r}: {len(self.extents) // EXTENT_SIZE} extents for "
                f"{len(self.blocks) // DIGEST_SIZE} blocks"
            )

    # -- where each block lies: the one offset <-> block lookup of every reader ------------------

    @property
    def chunked(self) -> bool:
        return bool(self.extents)

    def ends(self) -> array.array[int]:
        """The extent index, decoded once and checked: ends grow strictly and the last is the size."""
        ends = self._ends
        if ends is None:
            ends = _unpack_extents(self.extents)
            previous = 0
            for end in ends:  # once per entry read; a bad index must not become wrong bytes
                if end <= previous:
                    raise ValueError(f"entry {self.path!r}: extent index is not strictly increasing")
                previous = end
            if ends and ends[-1] != self.size:
                raise ValueError(f"entry {self.path!r}: extents end at {ends[-1]}, the size is {self.size}")
            object.__setattr__(self, "_ends", ends)
        return ends

    def span(self, index: int, block_size: int) -> tuple[int, int]:
        """Bytes [start, end) of block ``index``."""
        if self.extents:
            ends = self.ends()
            return (ends[index - 1] if index else 0), ends[index]
        start = index * block_size
        return start, min(start + block_size, self.size)

    def block_at(self, offset: int, block_size: int) -> int:
        """The index of the block that holds byte ``offset`` (binary search of the extent index)."""
        if self.extents:
            return bisect.bisect_right(self.ends(), offset)
        return offset // block_size

    def blocks_between(self, start: int, stop: int, block_size: int) -> range:
        """Indexes of the blocks that hold any of bytes [start, stop) (``stop`` > ``start``), clipped
        to the ids the entry has (a manifest whose ids end before its size reads as zeros there)."""
        first = self.block_at(start, block_size)
        last = self.block_at(stop - 1, block_size)
        return range(first, min(last + 1, self.block_count))

    @property
    def block_count(self) -> int:
        return len(self.blocks) // DIGEST_SIZE

    def digest_at(self, index: int) -> bytes:
        return self.blocks[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def digests(self) -> list[bytes]:
        blocks = self.blocks
        return [blocks[i : i + DIGEST_SIZE] for i in range(0, len(blocks), DIGEST_SIZE)]

    def stored_digests(self) -> list[bytes]:
        return [d for d in self.digests() if d != HOLE_DIGEST]


@dataclass(frozen=True, slots=True)
class Manifest:
    block_size: int  # FIXED: the block size; CONTENT: the longest a chunk may be
    single_file: bool
    entries: tuple[FileEntry, ...] = field(default_factory=tuple)
    chunking: Chunking = Chunking.FIXED
    unit_size: int = 0  # CONTENT: chunks start and end on multiples of it
    chunk_average: int = 0  # CONTENT: the average the chunker aims at (its parameters derive from it)

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.entries if e.type == EntryType.FILE)

    def by_path(self) -> dict[str, FileEntry]:
        return {e.path: e for e in self.entries}

    def block_ids(self) -> set[bytes]:
        ids: set[bytes] = set()
        for entry in self.entries:
            ids.update(entry.stored_digests())
        return ids


@dataclass(frozen=True, slots=True)
class ClassChanges:
    """Files of one class (``apps``, ``config``, ``data``) a capture saw appear, change or go."""

    file_class: str
    added: int = 0
    changed: int = 0
    removed: int = 0


@dataclass(frozen=True, slots=True)
class Arrival:
    """How a coordinator placed a device's version in its own time (coordinator/catalog/clock.py)."""

    received_ns: int
    """The coordinator's clock when the version arrived."""
    device_created_ns: int
    """What the device's clock said when it made the version (0: it did not say)."""
    clock_skew_ns: int
    """The device's clock minus the coordinator's, measured at arrival (0: not measured)."""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    layer: str
    number: int
    parent: int
    created_ns: int
    author: str
    device: str
    message: str
    manifest_digest: bytes
    kind: LayerKind
    logical_bytes: int
    block_size: int
    restored_from: int = 0
    labels: tuple[str, ...] = ()  # the software timeline: "app installed: DIR", "app removed: DIR"
    changes: tuple[ClassChanges, ...] = ()  # per class of file, for file-level captures
    # Set by a coordinator when it records a device's version (see Arrival); 0 everywhere else.
    received_ns: int = 0
    device_created_ns: int = 0
    clock_skew_ns: int = 0

    def __post_init__(self) -> None:
        validate_layer_name(self.layer)
        if self.number < 1:
            raise ValueError("version numbers start at 1")

    @property
    def ref(self) -> str:
        return f"{self.layer}@{self.number}"

    @property
    def digest_text(self) -> str:
        return str(BlockId(self.manifest_digest))


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """An ordered stack of refs, lowest first (OS, apps…, then the user's layer)."""

    name: str
    refs: tuple[str, ...]
    created_ns: int
