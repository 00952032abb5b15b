"""Layers, versions, manifests, tags and images in the store."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import rocksdict

from cachepoint.blocks import decode_block, encode_block
from cachepoint.errors import ImageNotFound, InvalidInput, LayerNotFound, RefNotFound
from cachepoint.ids import LATEST, Ref, validate_layer_name, validate_tag
from cachepoint.model import Arrival, ClassChanges, ImageSpec, LayerKind, Manifest, VersionInfo
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB
from cachepoint.wire import (
    manifest_digest,
    manifest_from_bytes,
    tag_move_from_bytes,
    tag_move_to_bytes,
    version_from_bytes,
    version_to_bytes,
)


@dataclass(frozen=True, slots=True)
class LayerRecord:
    name: str
    kind: LayerKind
    latest: int
    created_ns: int


class ManifestFigures(Protocol):
    """What a commit needs to know about a manifest besides its bytes (a ``Manifest`` has both; a
    capture that never decodes its whole manifest gives just these)."""

    @property
    def block_size(self) -> int: ...

    @property
    def logical_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PendingCommit:
    """What a commit needs besides the version fields (built by ingest or rollback)."""

    manifest_bytes: bytes
    prefilter: dict[int, bytes]  # entry index -> packed xxh3 digests
    ingest_id: bytes | None = None


class Catalog:
    def __init__(self, db: StoreDB) -> None:
        self._db = db
        # Commits and tag moves read what is there (the latest number, the tag log's next record)
        # and then write: in a daemon several run at once (ingest, capture, snapshot, pull), and two
        # commits to one layer must not both become version N.
        self.writing = threading.RLock()

    # -- layers and versions -------------------------------------------------------------------

    def layer(self, name: str) -> LayerRecord:
        raw = self._db.cf[fmt.CF_LAYERS].get(name.encode())
        if raw is None:
            raise LayerNotFound(name)
        data = json.loads(raw)
        return LayerRecord(name, LayerKind.parse(data["kind"]), data["latest"], data["created_ns"])

    def layer_or_none(self, name: str) -> LayerRecord | None:
        try:
            return self.layer(name)
        except LayerNotFound:
            return None

    def layers(self) -> list[LayerRecord]:
        return [self.layer(key.decode()) for key in self._db.scan_keys(fmt.CF_LAYERS)]

    def version(self, layer: str, number: int) -> VersionInfo:
        raw = self._db.cf[fmt.CF_VERSIONS].get(fmt.version_key(layer, number))
        if raw is None:
            self.layer(layer)  # a missing layer is named as such
            raise RefNotFound(f"{layer}@{number}", f"layer {layer!r} has no version {number}")
        return version_from_bytes(raw)

    def versions(self, layer: str) -> list[VersionInfo]:
        self.layer(layer)
        return [version_from_bytes(v) for _, v in self._db.scan(fmt.CF_VERSIONS, fmt.layer_prefix(layer))]

    def all_versions(self) -> list[VersionInfo]:
        return [version_from_bytes(v) for _, v in self._db.scan(fmt.CF_VERSIONS)]

    def resolve(self, ref: Ref | str) -> VersionInfo:
        if isinstance(ref, str):
            ref = Ref.parse(ref)
        if ref.number is not None:
            return self.version(ref.layer, ref.number)
        assert ref.tag is not None
        self.layer(ref.layer)
        number = self.tag_target(ref.layer, ref.tag)
        if number is None:
            raise RefNotFound(str(ref), f"layer {ref.layer!r} has no tag {ref.tag!r}")
        return self.version(ref.layer, number)

    # -- manifests -----------------------------------------------------------------------------

    def manifest_bytes(self, digest: bytes) -> bytes:
        raw = self._db.cf[fmt.CF_MANIFESTS].get(digest)
        if raw is None:
            raise RefNotFound(f"manifest {digest.hex()[:12]}", "it is not in this store")
        return decode_block(raw)

    def manifest(self, digest: bytes) -> Manifest:
        return manifest_from_bytes(self.manifest_bytes(digest))

    def prefilter(self, digest: bytes, entry_index: int) -> bytes | None:
        return self._db.cf[fmt.CF_PREFILTER].get(fmt.prefilter_key(digest, entry_index))

    # -- tags ----------------------------------------------------------------------------------

    def tag_target(self, layer: str, tag: str) -> int | None:
        raw = self._db.cf[fmt.CF_TAGS].get(fmt.tag_key(layer, tag))
        return None if raw is None else fmt.read_u64(raw)

    def tags(self, layer: str) -> dict[str, int]:
        prefix = fmt.layer_prefix(layer)
        return {k[len(prefix) :].decode(): fmt.read_u64(v) for k, v in self._db.scan(fmt.CF_TAGS, prefix)}

    def tag_history(self, layer: str) -> list[dict[str, object]]:
        moves = []
        for _, raw in self._db.scan(fmt.CF_TAG_LOG, fmt.layer_prefix(layer)):
            m = tag_move_from_bytes(raw)
            moves.append(
                {
                    "tag": m.tag,
                    "version": m.number,
                    "previous": m.previous or None,
                    "moved_ns": m.moved_ns,
                    "actor": m.actor,
                }
            )
        moves.sort(key=lambda m: m["moved_ns"])  # type: ignore[arg-type,return-value]
        return moves

    def _stage_tag(
        self, batch: rocksdict.WriteBatch, layer: str, tag: str, number: int, actor: str, now: int
    ) -> None:
        previous = self.tag_target(layer, tag) or 0
        batch.put(fmt.tag_key(layer, tag), fmt.u64(number), self._db.handle[fmt.CF_TAGS])
        seq = self._next_tag_seq(layer, tag)
        batch.put(
            fmt.tag_log_key(layer, tag, seq),
            tag_move_to_bytes(layer, tag, number, previous, now, actor),
            self._db.handle[fmt.CF_TAG_LOG],
        )

    def _next_tag_seq(self, layer: str, tag: str) -> int:
        prefix = fmt.tag_key(layer, tag) + fmt.SEP
        last = 0
        for key in self._db.scan_keys(fmt.CF_TAG_LOG, prefix):
            last = fmt.read_u64(key[-8:])
        return last + 1

    def stage_tag(self, batch: rocksdict.WriteBatch, layer: str, tag: str, number: int, actor: str) -> None:
        """Add a tag move (and its log record) to a caller's batch."""
        self._stage_tag(batch, layer, tag, number, actor, time.time_ns())

    def set_tag(self, ref: Ref | str, tag: str, actor: str) -> VersionInfo:
        validate_tag(tag)
        with self.writing:
            info = self.resolve(ref)
            batch = self._db.batch()
            self._stage_tag(batch, info.layer, tag, info.number, actor, time.time_ns())
            self._db.write(batch, sync=True)
        return info

    # -- commit --------------------------------------------------------------------------------

    def commit(
        self,
        *,
        layer: str,
        kind: LayerKind,
        pending: PendingCommit,
        manifest: ManifestFigures,
        author: str,
        device: str,
        message: str,
        tags: tuple[str, ...] = (),
        restored_from: int = 0,
        labels: tuple[str, ...] = (),
        changes: tuple[ClassChanges, ...] = (),
        parent: int | None = None,
        created_ns: int | None = None,
        arrival: Arrival | None = None,
        also: Callable[[rocksdict.WriteBatch, VersionInfo], None] | None = None,
    ) -> VersionInfo:
        """Record a new version in one synced batch. Its blocks must already be persisted.

        ``parent`` defaults to the layer's latest version (a publisher may name another, e.g. the
        version a device started from); ``also`` adds more writes to the same batch (the
        coordinator's event log), so they land with the version or not at all."""
        validate_layer_name(layer)
        for tag in tags:
            validate_tag(tag)
        with self.writing:
            existing = self.layer_or_none(layer)
            now = time.time_ns()
            number = (existing.latest if existing else 0) + 1
            digest = manifest_digest(pending.manifest_bytes)
            if parent is None:
                parent = existing.latest if existing else 0
            elif parent and (existing is None or parent > existing.latest):
                raise RefNotFound(f"{layer}@{parent}", "the parent named for the new version does not exist")
            info = VersionInfo(
                layer=layer,
                number=number,
                parent=parent,
                created_ns=created_ns or now,
                author=author,
                device=device,
                message=message,
                manifest_digest=digest,
                kind=existing.kind if existing else kind,
                logical_bytes=manifest.logical_bytes,
                block_size=manifest.block_size,
                restored_from=restored_from,
                labels=labels,
                changes=changes,
                **(asdict(arrival) if arrival else {}),
            )
            h = self._db.handle
            batch = self._db.batch()
            batch.put(digest, encode_block(pending.manifest_bytes), h[fmt.CF_MANIFESTS])
            for index, packed in pending.prefilter.items():
                batch.put(fmt.prefilter_key(digest, index), packed, h[fmt.CF_PREFILTER])
            batch.put(fmt.version_key(layer, number), version_to_bytes(info), h[fmt.CF_VERSIONS])
            record = {
                "kind": str(info.kind),
                "latest": number,
                "created_ns": existing.created_ns if existing else now,
            }
            batch.put(layer.encode(), json.dumps(record).encode(), h[fmt.CF_LAYERS])
            for tag in dict.fromkeys((LATEST, *tags)):
                self._stage_tag(batch, layer, tag, number, author, now)
            if pending.ingest_id is not None:
                batch.delete(pending.ingest_id, h[fmt.CF_INGESTS])
            if also is not None:
                also(batch, info)
            self._db.write(batch, sync=True)
        return info

    def import_version(
        self, info: VersionInfo, pending: PendingCommit, tags: tuple[str, ...] = ()
    ) -> VersionInfo:
        """Record a version made elsewhere (at the coordinator), keeping its number and metadata.

        Its blocks must be durable here. Numbers may arrive out of order or with gaps (a
        cachepoint holds only the versions it follows); the layer's latest is the highest held."""
        if manifest_digest(pending.manifest_bytes) != info.manifest_digest:
            raise ValueError(f"manifest of {info.ref} does not match its digest")
        with self.writing:
            raw = self._db.cf[fmt.CF_VERSIONS].get(fmt.version_key(info.layer, info.number))
            if raw is not None and version_from_bytes(raw).manifest_digest != info.manifest_digest:
                # A local version holds this number (made on this device, not yet renumbered): never
                # overwrite it.
                raise InvalidInput(
                    f"{info.ref} here is a different local version; it is not replaced by the coordinator's"
                )
            existing = self.layer_or_none(info.layer)
            now = time.time_ns()
            h = self._db.handle
            batch = self._db.batch()
            batch.put(info.manifest_digest, encode_block(pending.manifest_bytes), h[fmt.CF_MANIFESTS])
            for index, packed in pending.prefilter.items():
                batch.put(fmt.prefilter_key(info.manifest_digest, index), packed, h[fmt.CF_PREFILTER])
            batch.put(fmt.version_key(info.layer, info.number), version_to_bytes(info), h[fmt.CF_VERSIONS])
            latest = max(info.number, existing.latest if existing else 0)
            record = {
                "kind": str(existing.kind if existing else info.kind),
                "latest": latest,
                "created_ns": existing.created_ns if existing else now,
            }
            batch.put(info.layer.encode(), json.dumps(record).encode(), h[fmt.CF_LAYERS])
            names = (*tags, LATEST) if latest == info.number else tags
            for tag in dict.fromkeys(names):
                if self.tag_target(info.layer, tag) != info.number:
                    self._stage_tag(batch, info.layer, tag, info.number, info.author, now)
            if pending.ingest_id is not None:
                batch.delete(pending.ingest_id, h[fmt.CF_INGESTS])
            # It came from the coordinator, so it is not for the outbox.
            pushed = {"number": info.number, "pushed_ns": now}
            batch.put(fmt.version_key(info.layer, info.number), json.dumps(pushed).encode(), h[fmt.CF_PUSHED])
            self._db.write(batch, sync=True)
        return info

    def stage_version_deletion(
        self, batch: rocksdict.WriteBatch, info: VersionInfo, *, drop_manifest: bool
    ) -> None:
        """Add the removal of one version to a caller's batch (the coordinator's retention GC, which
        writes it synced together with its event and audit record).

        The caller guarantees what this cannot see alone: no tag points at the version, it is not its
        layer's latest, and ``drop_manifest`` only when no other version names the same manifest. Tag
        history that mentions the version is kept (it is history); its blocks are left to a block GC,
        which keeps every block any remaining version references."""
        h = self._db.handle
        batch.delete(fmt.version_key(info.layer, info.number), h[fmt.CF_VERSIONS])
        if drop_manifest:
            batch.delete(info.manifest_digest, h[fmt.CF_MANIFESTS])

    def has_version(self, layer: str, number: int) -> bool:
        return self._db.cf[fmt.CF_VERSIONS].get(fmt.version_key(layer, number)) is not None

    # -- images --------------------------------------------------------------------------------

    def create_image(self, name: str, refs: list[str]) -> ImageSpec:
        validate_layer_name(name)
        for ref in refs:
            self.resolve(ref)  # every ref must exist now
        spec = ImageSpec(name, tuple(refs), time.time_ns())
        payload = json.dumps({"refs": list(spec.refs), "created_ns": spec.created_ns}).encode()
        batch = self._db.batch()
        batch.put(name.encode(), payload, self._db.handle[fmt.CF_IMAGES])
        self._db.write(batch, sync=True)
        return spec

    def image(self, name: str) -> ImageSpec:
        raw = self._db.cf[fmt.CF_IMAGES].get(name.encode())
        if raw is None:
            raise ImageNotFound(name)
        data = json.loads(raw)
        return ImageSpec(name, tuple(data["refs"]), data["created_ns"])

    def images(self) -> list[ImageSpec]:
        return [self.image(key.decode()) for key in self._db.scan_keys(fmt.CF_IMAGES)]
