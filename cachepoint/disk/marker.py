"""The zero marker: "this block reads as zeros, whatever the layers below hold".

In a disk manifest HOLE_DIGEST means "nothing in this layer: the block below shows through". A
user who zeroes or discards a block that a lower layer holds data for needs the opposite, zeros
that hide what is below. The marker is the SHA-256 of the all-zero block of that block's length
(the layer's block size; less only for a disk's short last block), so it is a genuine content
address: the one block whose bytes it names is all zeros, and it never collides with data.

Readers here never fetch it. Until cachepoint/layers/composite.py, export.py and store/fsck.py
(and gc, replication) learn the marker, a snapshot that uses it also stores that zero block (a
few bytes compressed), so the code that does not know the marker reads it as an ordinary block
and gets the same zeros.
"""

from __future__ import annotations

import functools

from cachepoint.blocks import block_digest
from cachepoint.ids import HOLE_DIGEST


@functools.lru_cache(maxsize=8)
def zero_marker(length: int) -> bytes:
    return block_digest(bytes(length))


def is_zero_marker(digest: bytes, length: int) -> bool:
    return digest == zero_marker(length)


def reads_as_zeros(digest: bytes, length: int) -> bool:
    """A hole (nothing below either) or a zero marker."""
    return digest == HOLE_DIGEST or digest == zero_marker(length)
