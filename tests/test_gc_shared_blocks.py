"""GC over a shared block directory (a coordinator's ``blocks = "file:///..."``) counts what it removed.

Between GC's scan and its sweep, another replica may be asked for a block (HasBlocks makes the file
young again, so the sweep keeps it) or may remove one itself. The report must count exactly the files
this sweep unlinked: it once reported no bytes at all for a batch in which any file was skipped.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from cachepoint.blocks import block_digest, encode_block
from cachepoint.store.db import StoreDB
from cachepoint.store.gc import collect
from cachepoint.store.store import Store
from coordinator.backends.fileblocks import FileBlocks

GRACE_S = 60.0


class RacedBlocks(FileBlocks):
    """A shared directory whose scan meets two other replicas at work: once GC has seen the first
    three files, one of them is asked for (made young) and another is removed by someone else."""

    touched: bytes = b""
    raced: bytes = b""

    def scan_sizes(self) -> Iterator[tuple[bytes, int, float]]:
        seen: list[bytes] = []
        for entry in super().scan_sizes():
            yield entry
            seen.append(entry[0])
            if len(seen) == 3:
                self.touched, self.raced = seen[0], seen[1]
                os.utime(self.path(self.touched))  # HasBlocks on another replica: young again
                self.path(self.raced).unlink()  # another replica's sweep got there first


def test_gc_reports_the_blocks_and_bytes_it_removed_when_other_replicas_race_it(tmp_path: Path) -> None:
    files = RacedBlocks(tmp_path / "blocks", grace_s=GRACE_S)
    rng = random.Random(1)
    values = {}
    for n in range(8):  # no version names them: all garbage
        data = rng.randbytes(4096 + 1000 * n) if n % 2 else bytes([n]) * 65536
        values[block_digest(data)] = encode_block(data)
    files.put_many(values.items())
    old = time.time() - 2 * GRACE_S  # older than the grace period: the sweep may take them all
    for digest in values:
        os.utime(files.path(digest), (old, old))
    with Store(StoreDB(tmp_path / "store", writable=True, create=True), files) as store:
        result = collect(store)
    assert [d for d in values if files.path(d).exists()] == [files.touched], "the file made young stays"
    swept = [d for d in values if d not in (files.touched, files.raced)]
    assert result.blocks_removed == len(swept) == 6
    assert result.bytes_freed == sum(len(values[d]) for d in swept) > 0
