"""The one place where domain values meet protobuf (on the wire and in the store's records)."""

from __future__ import annotations

import hashlib

from cachepoint.blocks import raw_size
from cachepoint.ids import Ref
from cachepoint.model import ClassChanges, EntryType, FileEntry, LayerKind, Manifest, VersionInfo
from cachepoint.v1 import blocks_pb2, manifest_pb2, version_pb2

MANIFEST_FORMAT = 1


def manifest_to_bytes(manifest: Manifest) -> bytes:
    message = manifest_pb2.Manifest(
        format=MANIFEST_FORMAT,
        block_size=manifest.block_size,
        single_file=manifest.single_file,
        entries=[
            manifest_pb2.FileEntry(
                path=e.path,
                type=int(e.type),
                mode=e.mode,
                size=e.size,
                mtime_ns=e.mtime_ns,
                symlink_target=e.target,
                blocks=e.blocks,
            )
            for e in manifest.entries
        ],
    )
    return message.SerializeToString(deterministic=True)


def manifest_digest(serialized: bytes) -> bytes:
    return hashlib.sha256(serialized).digest()


def manifest_from_bytes(serialized: bytes) -> Manifest:
    message = manifest_pb2.Manifest()
    message.ParseFromString(serialized)
    if message.format != MANIFEST_FORMAT:
        raise ValueError(f"manifest format {message.format} is not supported (expected {MANIFEST_FORMAT})")
    return Manifest(
        block_size=message.block_size,
        single_file=message.single_file,
        entries=tuple(
            FileEntry(
                path=e.path,
                type=EntryType(e.type),
                mode=e.mode,
                size=e.size,
                mtime_ns=e.mtime_ns,
                target=e.symlink_target,
                blocks=e.blocks,
            )
            for e in message.entries
        ),
    )


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
