"""A scan of the store's records (StoreDB.scan, scan_keys) is one point in time, and it tells the end
of the records from damage that stopped it.

GC's census scans the blocks while a daemon's pull writes more: a record written behind the scan's
position once made the scan report "stopped early" and the GC refuse to run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cachepoint.errors import RecordsUnreadable
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB
from cachepoint.store.store import Store
from tests.conftest import run_cli
from tests.damage import flip_in_sst
from tests.fleet import random_image

FAMILY = fmt.CF_BLOCKS


def put(db: StoreDB, *keys: bytes) -> None:
    batch = db.batch()
    for key in keys:
        batch.put(key, b"value of " + key, db.handle[FAMILY])
    db.write(batch)


@pytest.mark.parametrize("keys_only", [False, True], ids=["scan", "scan_keys"])
def test_records_written_during_a_scan_are_not_in_it_and_do_not_fail_it(
    tmp_path: Path, keys_only: bool
) -> None:
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        db = store.db
        put(db, b"k1", b"k3", b"k5")
        scan = db.scan_keys(FAMILY, b"k") if keys_only else (key for key, _ in db.scan(FAMILY, b"k"))
        seen = [next(scan)]
        put(db, b"k2", b"k4", b"k9")  # before, between and after what the scan has still to read
        seen += list(scan)
        assert seen == [b"k1", b"k3", b"k5"]
        assert list(db.scan_keys(FAMILY, b"k")) == [b"k1", b"k2", b"k3", b"k4", b"k5", b"k9"]
        assert list(db.scan(FAMILY, b"k9")) == [(b"k9", b"value of k9")]
        assert list(db.scan_keys(FAMILY, b"zz")) == []


def test_a_scan_over_damaged_records_raises_naming_the_store(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    image = tmp_path / "random.img"
    random_image(image, 4 << 20, seed=5)
    run_cli(store_dir, "ingest", "os/x", image)
    flip_in_sst(store_dir)
    with Store.open(store_dir) as store:
        with pytest.raises(RecordsUnreadable, match=str(store_dir)):
            list(store.db.scan(FAMILY))
