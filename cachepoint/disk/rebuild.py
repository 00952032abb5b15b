"""Rollback that keeps the user's data: move an image's base layers, or bring a user layer back.

``rebase`` changes which version of one base layer (OS or app) an image stacks; the user's layer is
not part of the image's refs (attach puts it on top), so the user's blocks stay exactly as they are.
``restore`` makes a new version of the user's layer with the content of an earlier one; the later
versions stay listed. Both are instant when the blocks are local: nothing is copied.
"""

from __future__ import annotations

from cachepoint.disk.exports import user_layer_of
from cachepoint.errors import InvalidInput
from cachepoint.ids import Ref
from cachepoint.layers.rollback import rollback
from cachepoint.model import ImageSpec, VersionInfo
from cachepoint.store import format as fmt
from cachepoint.store.store import Store


def rebase(store: Store, image: str, to: Ref) -> tuple[ImageSpec, str]:
    """Point the image's ref of ``to.layer`` at ``to``; returns the new spec and the ref it replaced."""
    spec = store.catalog.image(image)
    store.catalog.resolve(to)  # it must exist here
    layers = [Ref.parse(ref).layer for ref in spec.refs]
    if to.layer not in layers:
        raise InvalidInput(
            f"image {image!r} has no layer {to.layer!r} to rebase (it stacks {', '.join(spec.refs)})"
        )
    index = layers.index(to.layer)
    replaced = spec.refs[index]
    refs = list(spec.refs)
    refs[index] = str(to)
    return store.catalog.create_image(image, refs), replaced


def restore(
    store: Store, image: str, user: str, to: Ref, *, author: str, device: str, message: str = ""
) -> VersionInfo:
    """A new version of user/USER/IMAGE with the content of ``to`` (a version of that layer)."""
    layer = user_layer_of(user, image)
    if to.layer != layer:
        raise InvalidInput(f"restore of {layer} must name one of its own versions, not {to}")
    disk = f"{user}/{image}"
    prefix = fmt.WORKING_ENTRY_PREFIX + disk.encode() + fmt.SEP
    if next(store.db.scan_keys(fmt.CF_WORKING, prefix), None) is not None:
        raise InvalidInput(
            f"disk {disk} has writes that are not in a snapshot: snapshot or discard them before a restore"
        )
    return rollback(store, layer, to, author=author, device=device, message=message or f"restore to {to}")
