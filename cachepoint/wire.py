"""The one place where domain values meet protobuf (on the wire and in the store's records)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, overload

from cachepoint.blocks import raw_size
from cachepoint.ids import Ref
from cachepoint.model import Chunking, ClassChanges, EntryType, FileEntry, LayerKind, Manifest, VersionInfo
from cachepoint.v1 import blocks_pb2, manifest_pb2, version_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

MANIFEST_FORMAT = 1  # fixed blocks: byte for byte what every version before content chunking wrote
MANIFEST_FORMAT_CHUNKED = 2  # content chunks with an extent index per file
SUPPORTED_MANIFEST_FORMATS = (MANIFEST_FORMAT, MANIFEST_FORMAT_CHUNKED)


def _format_of(chunking: Chunking) -> int:
    return MANIFEST_FORMAT_CHUNKED if chunking == Chunking.CONTENT else MANIFEST_FORMAT


def _entry_to_pb(e: FileEntry) -> manifest_pb2.FileEntry:
    return manifest_pb2.FileEntry(
        path=e.path,
        type=int(e.type),
        mode=e.mode,
        size=e.size,
        mtime_ns=e.mtime_ns,
        symlink_target=e.target,
        blocks=e.blocks,
        extents=e.extents,
    )


def manifest_to_bytes(manifest: Manifest) -> bytes:
    # Fields at their defaults are not serialized: a fixed manifest's bytes, and so its digest, are
    # the same as before these fields existed.
    message = manifest_pb2.Manifest(
        format=_format_of(manifest.chunking),
        block_size=manifest.block_size,
        single_file=manifest.single_file,
        entries=[_entry_to_pb(e) for e in manifest.entries],
        chunking=int(manifest.chunking),
        unit_size=manifest.unit_size,
        chunk_average=manifest.chunk_average,
    )
    return message.SerializeToString(deterministic=True)


def manifest_digest(serialized: bytes) -> bytes:
    return hashlib.sha256(serialized).digest()


_ENTRY_TYPES = {int(t): t for t in EntryType}


def _entry_type(value: int) -> EntryType:
    # A dict lookup: EntryType(value) costs about a microsecond, paid by every entry of every manifest.
    try:
        return _ENTRY_TYPES[value]
    except KeyError:
        raise ValueError(f"{value} is not a valid EntryType") from None


def _parse_manifest(serialized: bytes) -> manifest_pb2.Manifest:
    message = manifest_pb2.Manifest()
    message.ParseFromString(serialized)
    if message.format not in SUPPORTED_MANIFEST_FORMATS:
        raise ValueError(
            f"manifest format {message.format} is not supported (this version reads "
            f"{', '.join(map(str, SUPPORTED_MANIFEST_FORMATS))})"
        )
    try:
        chunking = Chunking(message.chunking)
    except ValueError:
        raise ValueError(f"manifest chunking {message.chunking} is not supported") from None
    if message.format != _format_of(chunking):
        raise ValueError(f"manifest format {message.format} does not go with {chunking} chunking")
    if chunking == Chunking.CONTENT and not message.unit_size:
        raise ValueError("a content-chunked manifest must name its unit size")
    return message


def _entry_from_pb(e: manifest_pb2.FileEntry) -> FileEntry:
    return FileEntry(
        path=e.path,
        type=_entry_type(e.type),
        mode=e.mode,
        size=e.size,
        mtime_ns=e.mtime_ns,
        target=e.symlink_target,
        blocks=e.blocks,
        extents=e.extents,
    )


def manifest_from_bytes(serialized: bytes) -> Manifest:
    message = _parse_manifest(serialized)
    chunking = Chunking(message.chunking)
    entries = tuple(_entry_from_pb(e) for e in message.entries)
    for entry in entries:
        if bool(entry.extents) != (chunking == Chunking.CONTENT and entry.block_count > 0):
            raise ValueError(f"entry {entry.path!r}: an extent index goes with content chunking only")
    return Manifest(
        block_size=message.block_size,
        single_file=message.single_file,
        entries=entries,
        chunking=chunking,
        unit_size=message.unit_size,
        chunk_average=message.chunk_average,
    )


class _LazyEntries(Sequence[FileEntry]):
    """A stored manifest's entries, each decoded (and validated) when it is asked for."""

    def __init__(self, entries: RepeatedCompositeFieldContainer[manifest_pb2.FileEntry]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> FileEntry: ...
    @overload
    def __getitem__(self, index: slice) -> list[FileEntry]: ...
    def __getitem__(self, index: int | slice) -> FileEntry | list[FileEntry]:
        if isinstance(index, slice):
            return [_entry_from_pb(e) for e in self._entries[index]]
        return _entry_from_pb(self._entries[index])


class StoredManifest:
    """A manifest kept in its wire form: entries are decoded one at a time when asked for, and can be
    carried into a new manifest without being decoded at all (``ManifestWriter.carry``). A
    re-capture of 50,000 unchanged files would otherwise spend most of its time converting every
    entry to a FileEntry and back."""

    def __init__(self, serialized: bytes) -> None:
        self._message = _parse_manifest(serialized)
        self.block_size: int = self._message.block_size
        self.single_file: bool = self._message.single_file
        self.chunking = Chunking(self._message.chunking)
        self.entries: Sequence[FileEntry] = _LazyEntries(self._message.entries)

    def columns(self) -> tuple[list[str], list[int], list[int], list[int], list[int]]:
        """Every entry's path, type, mode, size and mtime, without decoding the entries (paths are not
        validated here: decode an entry before trusting its path)."""
        entries = self._message.entries
        return (
            [e.path for e in entries],
            [e.type for e in entries],
            [e.mode for e in entries],
            [e.size for e in entries],
            [e.mtime_ns for e in entries],
        )


class ManifestWriter:
    """Builds a manifest's wire form from new entries and entries carried over unchanged, in order."""

    def __init__(self, block_size: int, single_file: bool = False) -> None:
        self.block_size = block_size
        self.single_file = single_file
        self._entries: list[manifest_pb2.FileEntry] = []

    def add(self, entry: FileEntry) -> None:
        self._entries.append(_entry_to_pb(entry))

    def carry(self, source: StoredManifest, index: int) -> None:
        self._entries.append(source._message.entries[index])

    def to_bytes(self) -> bytes:
        message = manifest_pb2.Manifest(
            format=MANIFEST_FORMAT,
            block_size=self.block_size,
            single_file=self.single_file,
            entries=self._entries,
        )
        return message.SerializeToString(deterministic=True)


def version_to_bytes(info: VersionInfo) -> bytes:
    return version_to_pb(info).SerializeToString(deterministic=True)


def version_to_pb(info: VersionInfo) -> version_pb2.VersionInfo:
    return version_pb2.VersionInfo(
        layer=info.layer,
        number=info.number,
        parent=info.parent,
        created_ns=info.created_ns,
        author=info.author,
        device=info.device,
        message=info.message,
        manifest_digest=info.manifest_digest,
        kind=int(info.kind),
        logical_bytes=info.logical_bytes,
        restored_from=info.restored_from,
        block_size=info.block_size,
        labels=list(info.labels),
        changes=[
            version_pb2.ClassChanges(
                file_class=c.file_class, added=c.added, changed=c.changed, removed=c.removed
            )
            for c in info.changes
        ],
        received_ns=info.received_ns,
        device_created_ns=info.device_created_ns,
        clock_skew_ns=info.clock_skew_ns,
    )


def version_from_bytes(raw: bytes) -> VersionInfo:
    m = version_pb2.VersionInfo()
    m.ParseFromString(raw)
    return version_from_pb(m)


def version_from_pb(m: version_pb2.VersionInfo) -> VersionInfo:
    return VersionInfo(
        layer=m.layer,
        number=m.number,
        parent=m.parent,
        created_ns=m.created_ns,
        author=m.author,
        device=m.device,
        message=m.message,
        manifest_digest=m.manifest_digest,
        kind=LayerKind(m.kind),
        logical_bytes=m.logical_bytes,
        block_size=m.block_size,
        restored_from=m.restored_from,
        labels=tuple(m.labels),
        changes=tuple(
            ClassChanges(file_class=c.file_class, added=c.added, changed=c.changed, removed=c.removed)
            for c in m.changes
        ),
        received_ns=m.received_ns,
        device_created_ns=m.device_created_ns,
        clock_skew_ns=m.clock_skew_ns,
    )


def tag_move_to_bytes(layer: str, tag: str, number: int, previous: int, moved_ns: int, actor: str) -> bytes:
    return version_pb2.TagMove(
        layer=layer, tag=tag, number=number, previous=previous, moved_ns=moved_ns, actor=actor
    ).SerializeToString()


def tag_move_from_bytes(raw: bytes) -> version_pb2.TagMove:
    m = version_pb2.TagMove()
    m.ParseFromString(raw)
    return m


def ref_to_pb(ref: Ref) -> version_pb2.Ref:
    if ref.number is not None:
        return version_pb2.Ref(layer=ref.layer, number=ref.number)
    return version_pb2.Ref(layer=ref.layer, tag=ref.tag or "")


def ref_from_pb(m: version_pb2.Ref) -> Ref:
    """Validates like Ref.parse, so a malformed ref on the wire is refused with the same message."""
    which = m.WhichOneof("selector")
    if which == "number":
        return Ref.parse(f"{m.layer}@{m.number}")
    if which == "tag":
        return Ref.parse(f"{m.layer}:{m.tag}")
    return Ref.parse(m.layer)


def stored_block_to_pb(digest: bytes, value: bytes) -> blocks_pb2.StoredBlock:
    """A block as stored (codec byte + payload) on the wire: no decompression, no recompression."""
    return blocks_pb2.StoredBlock(id=digest, codec=value[0], raw_size=raw_size(value), payload=value[1:])


def stored_value_from_pb(block: blocks_pb2.StoredBlock) -> bytes:
    if block.codec > 255:
        raise ValueError(f"block {block.id.hex()[:12]}: codec {block.codec} is not a byte")
    return bytes((block.codec,)) + block.payload
