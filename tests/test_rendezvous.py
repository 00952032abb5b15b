"""Rendezvous hashing of block ids over a site's pullers (cachepoint/replication/rendezvous.py)."""

from __future__ import annotations

import hashlib

from cachepoint.replication import rendezvous

IDS = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(4000)]
NODES = ["n1", "n2", "n3", "n4"]


def test_every_puller_gets_a_fair_share_of_the_blocks() -> None:
    groups = rendezvous.split(IDS, NODES)
    assert sorted(b for group in groups.values() for b in group) == sorted(IDS)
    assert all(800 <= len(group) <= 1200 for group in groups.values()), {n: len(g) for n, g in groups.items()}


def test_when_a_puller_leaves_only_its_blocks_move() -> None:
    before = rendezvous.split(IDS, NODES)
    after = rendezvous.split(IDS, ["n1", "n3", "n4"])
    for node in ("n1", "n3", "n4"):
        assert set(before[node]) <= set(after[node])
    assert set().union(*after.values()) == set(IDS)


def test_nodes_that_see_different_pullers_agree_on_every_owner_both_see() -> None:
    for block_id in IDS[:500]:
        full = rendezvous.owner(block_id, NODES)
        seen = [n for n in NODES if n != "n4"]  # a node that did not see n4 announce
        if full != "n4":
            assert rendezvous.owner(block_id, seen) == full
