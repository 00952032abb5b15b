"""Commits and tag moves made at once in one process (a daemon ingests, captures, snapshots and pulls
in threads): each commit gets its own version number and every tag move keeps its log record."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from cachepoint.model import EntryType, FileEntry, LayerKind, Manifest
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.wire import manifest_to_bytes

THREADS = 6
EACH = 4


def slow_writes(store: Store) -> None:
    """Widen the window between a commit's reads and its write, as a busy disk would: without the
    catalog's lock, two commits then both read the same latest number."""
    write = store.db.write

    def slowly(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.01)
        write(*args, **kwargs)

    store.db.write = slowly  # type: ignore[method-assign]


def test_commits_to_one_layer_at_once_each_get_their_own_number(tmp_path: Path):
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        slow_writes(store)
        made: list[str] = []
        lock = threading.Lock()

        def commit_some(worker: int) -> None:
            for n in range(EACH):
                message = f"worker {worker} commit {n}"
                entry = FileEntry(f"w{worker}-{n}.txt", EntryType.FILE, 0o644, 0)
                manifest = Manifest(4096, False, (entry,))
                info = store.catalog.commit(
                    layer="user/ann/home",
                    kind=LayerKind.USER,
                    pending=PendingCommit(manifest_to_bytes(manifest), {}),
                    manifest=manifest,
                    author="ann",
                    device="desk",
                    message=message,
                )
                with lock:
                    made.append(f"{info.number}:{message}")

        threads = [threading.Thread(target=commit_some, args=(w,)) for w in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        total = THREADS * EACH
        assert sorted(int(m.split(":")[0]) for m in made) == list(range(1, total + 1))
        stored = {f"{v.number}:{v.message}" for v in store.catalog.versions("user/ann/home")}
        assert stored == set(made), "every commit is listed under the number it was given"
        assert store.catalog.layer("user/ann/home").latest == total
        moves = [m for m in store.catalog.tag_history("user/ann/home") if m["tag"] == "latest"]
        assert len(moves) == total, "each commit's move of 'latest' kept its own log record"


def test_tag_moves_at_once_each_keep_their_log_record(tmp_path: Path):
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        entry = FileEntry("a.txt", EntryType.FILE, 0o644, 0)
        manifest = Manifest(4096, False, (entry,))
        info = store.catalog.commit(
            layer="os/base",
            kind=LayerKind.OS,
            pending=PendingCommit(manifest_to_bytes(manifest), {}),
            manifest=manifest,
            author="ops",
            device="build",
            message="one",
        )
        slow_writes(store)
        threads = [
            threading.Thread(target=store.catalog.set_tag, args=(info.ref, "production", f"ops-{n}"))
            for n in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        moves = [m for m in store.catalog.tag_history("os/base") if m["tag"] == "production"]
        assert sorted(str(m["actor"]) for m in moves) == sorted(f"ops-{n}" for n in range(THREADS))
