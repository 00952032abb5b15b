"""A writable open reads the catalog journal only from where the database left it: the database keeps
the journal file's inode and the offset after its last applied record (meta/journal_end), and the
scan falls back to the whole file whenever that point does not fit."""

from __future__ import annotations

import os
from pathlib import Path

from cachepoint.store import format as fmt
from cachepoint.store import journal as jr
from cachepoint.store.store import Store
from tests.conftest import run_cli
from tests.fleet import BLOCK, random_image


def recorded_end(store: Path) -> tuple[int, int]:
    with Store.open(store) as opened:
        raw = opened.db.get(fmt.CF_META, fmt.META_JOURNAL_END)
    assert raw is not None and len(raw) == 16
    return fmt.read_u64(raw[:8]), fmt.read_u64(raw[8:])


def journal_seq(store: Path) -> int:
    with Store.open(store) as opened:
        return opened.db.journal_seq()


def store_with_history(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    image = tmp_path / "a.img"
    random_image(image, 2 * BLOCK, 21)
    run_cli(store, "ingest", "os/a", image, "--json")
    run_cli(store, "tag", "os/a@1", "staging", "--json")
    return store


def test_every_catalog_write_records_where_the_journal_ends(tmp_path: Path) -> None:
    store = store_with_history(tmp_path)
    journal = store / jr.FILE_NAME
    stat = journal.stat()
    assert recorded_end(store) == (stat.st_ino, stat.st_size)


def test_the_scan_starts_at_the_recorded_end_and_falls_back_when_it_does_not_fit(tmp_path: Path) -> None:
    store = store_with_history(tmp_path)
    journal = store / jr.FILE_NAME
    inode, end = recorded_end(store)
    seq = journal_seq(store)
    with Store.open(store) as opened:
        store_id = opened.db.meta(fmt.META_STORE_ID) or b""
    # Everything before the recorded end made unreadable: a scan that starts there never sees it.
    data = bytearray(journal.read_bytes())
    data[jr.HEADER_SIZE : end] = bytes(end - jr.HEADER_SIZE)
    with open(journal, "r+b") as f:  # in place: the inode stays
        f.write(data)
    tail = jr.read_tail(journal, store_id, after_seq=seq, resume=(inode, end))
    assert (tail.last_seq, tail.records, tail.torn_at) == (seq, [], None)
    # Another file at that path (a checkpoint's): the whole file is read.
    whole = jr.read_tail(journal, store_id, after_seq=seq, resume=(inode + 1, end))
    assert whole.last_seq == 0
    # An offset past the end of the file: the whole file is read too.
    assert jr.read_tail(journal, store_id, after_seq=seq, resume=(inode, end + 1)).last_seq == 0


def test_a_record_the_database_lacks_is_still_rolled_forward_from_the_recorded_end(tmp_path: Path) -> None:
    store = store_with_history(tmp_path)
    journal = store / jr.FILE_NAME
    seq = journal_seq(store)
    with Store.open(store) as opened:
        version = opened.catalog.tag_target("os/a", "staging")
    assert version is not None
    # A crash after the journal append and before the database write of a tag move.
    raw_target = None
    with Store.open(store) as opened:
        raw_target = opened.db.get(fmt.CF_TAGS, b"os/a" + fmt.SEP + b"staging")
    assert raw_target is not None
    record = jr.encode_record(
        seq + 1, jr.KIND_BATCH, [(jr.OP_PUT, fmt.CF_TAGS, b"os/a" + fmt.SEP + b"production", raw_target)]
    )
    with open(journal, "ab") as f:
        f.write(record)
        f.flush()
        os.fsync(f.fileno())
    with Store.open(store, writable=True) as opened:
        assert opened.catalog.tag_target("os/a", "production") == version
    assert journal_seq(store) == seq + 1
    stat = journal.stat()
    assert recorded_end(store) == (stat.st_ino, stat.st_size)


def test_a_checkpoint_records_its_new_file(tmp_path: Path) -> None:
    store = store_with_history(tmp_path)
    journal = store / jr.FILE_NAME
    before = journal.stat().st_ino
    with Store.open(store, writable=True) as opened:
        opened.db.checkpoint_journal()
    stat = journal.stat()
    assert stat.st_ino != before
    assert recorded_end(store) == (stat.st_ino, stat.st_size)
    run_cli(store, "tag", "os/a@1", "production", "--json")
    stat = journal.stat()
    assert recorded_end(store) == (stat.st_ino, stat.st_size)
