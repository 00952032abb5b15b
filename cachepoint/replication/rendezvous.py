"""Which node of a site fetches a block across the WAN: rendezvous (highest-random-weight) hashing.

Every puller of a version scores each block with xxh3-64 of (node id, block id) and the highest score
owns it. Two pullers that see different sets of pullers still agree for every block whose owner both
see, and a node only ever waits for a node scoring higher than itself for that block, so waits cannot
form a cycle: the top of every chain fetches from the origin. When an owner leaves, only its blocks move.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash


def score(node_id: str, block_id: bytes) -> int:
    # The block id first: it is a fixed 32 bytes, so no two (node, block) pairs give the same input.
    return xxhash.xxh3_64_intdigest(block_id + node_id.encode())


def owner(block_id: bytes, candidates: Iterable[str]) -> str:
    """The candidate that fetches ``block_id`` from the origin (ties, never seen in practice, by name)."""
    return max(candidates, key=lambda node_id: (score(node_id, block_id), node_id))


def split(block_ids: Iterable[bytes], candidates: list[str]) -> dict[str, list[bytes]]:
    """``block_ids`` grouped by owner, each group in the given order; every candidate has a group."""
    groups: dict[str, list[bytes]] = {node_id: [] for node_id in candidates}
    for block_id in block_ids:
        groups[owner(block_id, candidates)].append(block_id)
    return groups
