"""A command that opens the store for itself finishes the compactions its writes started before it
exits (``Store.finish_compactions``, cachepoint/store/compaction.py).

RocksDB stops a running compaction when the database closes and throws its output away. One that a
command's flushes started (level 0 full) was then started again by every later command and abandoned
again at its exit: measured on a 50,000-file capture store, 1.9 s of every 4.3 s re-capture.
"""

from __future__ import annotations

import os
from pathlib import Path

from cachepoint.store import format as fmt
from cachepoint.store.store import Store

TRIGGER = 12  # the blocks family's level0_file_num_compaction_trigger (cachepoint/store/db.py)
FLUSH_BYTES = 24 << 20  # per level-0 file: enough that the merge is still running at close


def fill_level0(store: Store, files: int) -> None:
    """``files`` flushes of new random blocks, the last one starting a compaction of level 0."""
    for _ in range(files):
        store.blocks.put_many((os.urandom(32), os.urandom(64 << 10)) for _ in range(FLUSH_BYTES >> 16))
        store.db.flush(fmt.CF_BLOCKS)


def level0_files(root: Path) -> int:
    with Store.open(root) as store:
        return int(store.db.cf[fmt.CF_BLOCKS].property_int_value("rocksdb.num-files-at-level0") or 0)


def test_a_command_waits_for_the_compaction_its_writes_started_and_leaves_level_0_empty(
    tmp_path: Path,
) -> None:
    notices: list[str] = []
    store = Store.open(tmp_path / "store", writable=True, create=True)
    store.finish_compactions = notices.append
    fill_level0(store, TRIGGER)
    store.close()
    assert len(notices) == 1 and "compacting the store" in notices[0]
    assert level0_files(tmp_path / "store") < TRIGGER


def test_without_it_the_compaction_is_abandoned_at_close(tmp_path: Path) -> None:
    # What a daemon's shutdown (or an API user's close) does: level 0 stays full, and the next
    # writable open starts the same compaction again.
    store = Store.open(tmp_path / "store", writable=True, create=True)
    fill_level0(store, TRIGGER)
    store.close()
    assert level0_files(tmp_path / "store") >= TRIGGER
