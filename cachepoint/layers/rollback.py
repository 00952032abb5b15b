"""Rollback: a new version whose content is an older one's. Nothing is rewritten or forgotten."""

from __future__ import annotations

from cachepoint.ids import Ref
from cachepoint.model import VersionInfo
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store


def rollback(
    store: Store, layer: str, to: Ref, *, author: str, device: str, message: str = ""
) -> VersionInfo:
    if to.layer != layer:
        raise ValueError(f"rollback of {layer!r} must name one of its own versions, not {to}")
    target = store.catalog.resolve(to)
    raw = store.catalog.manifest_bytes(target.manifest_digest)
    manifest = store.catalog.manifest(target.manifest_digest)
    # The prefilter records are keyed by manifest digest, so the old version's ones serve again.
    return store.catalog.commit(
        layer=layer,
        kind=target.kind,
        pending=PendingCommit(raw, {}),
        manifest=manifest,
        author=author,
        device=device,
        message=message or f"rollback to {target.ref}",
        restored_from=target.number,
    )
