"""Mark-and-sweep GC never removes the blocks of an ingest in progress, and does remove garbage.

The garbage comes from a real failed ingest: its source file shrinks while it is being read, so the
ingest stops with an error after storing some blocks that no version references. A second ingest
(layer B) then reuses many of those garbage blocks. GC runs while B is paused midway (B has already
found some garbage blocks in the store and counts on them), or between GC's mark and its sweep
(B commits after the mark, so the mark does not know B's version). Either way B must commit
complete: fsck clean, and B exports byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cachepoint.errors import SourceUnreadable
from cachepoint.layers.ingest import IngestOptions, IngestResult, ingest
from cachepoint.model import LayerKind
from cachepoint.store import census
from cachepoint.store.fsck import fsck
from cachepoint.store.gc import collect
from cachepoint.store.store import Store
from tests.conftest import REPO, cli_env, run_cli, sha256_file

BLOCK = 64 * 1024
WAIT = 60.0  # bound on every wait for another thread or process; never reached when things work
# One worker thread: the ingest then reads only a few jobs ahead of the one it reports, so pausing
# it halfway leaves blocks it has already looked at (pinned) and blocks it has not reached yet.
WORKERS = 1


def block(seed: int) -> bytes:
    """A unique block, random (stored raw) or compressible (stored zstd) depending on the seed."""
    rng = random.Random(seed)
    if seed % 2:
        return rng.randbytes(BLOCK)
    return rng.randbytes(2048) * (BLOCK // 2048)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def write_image(path: Path, blocks: list[bytes]) -> Path:
    path.write_bytes(b"".join(blocks))
    return path


def fail_an_ingest(store: Store, path: Path, layer: str) -> None:
    """Ingest ``path`` but shrink it once the first blocks are stored: the ingest fails for real."""

    def shrink(done: int, total: int) -> None:
        os.truncate(path, BLOCK)

    with pytest.raises(SourceUnreadable, match="shrank"):
        ingest(store, path, IngestOptions(layer=layer, workers=WORKERS), progress=shrink)
    assert store.interrupted_ingests() == []  # a failed ingest drops its record; its blocks remain


class Scenario:
    """Layer A with one version, garbage left by a failed ingest, and an image B reusing most of it."""

    def __init__(self, tmp_path: Path, store: Store) -> None:
        a_blocks = [block(i) for i in range(64)]
        self.a = write_image(tmp_path / "a.img", a_blocks)
        ingest(store, self.a, IngestOptions(layer="os/a", kind=LayerKind.OS))

        g_blocks = [block(1000 + i) for i in range(384)]  # six ingest jobs of 4 MiB
        fail_an_ingest(store, write_image(tmp_path / "g.img", g_blocks), "os/b")
        garbage = [b for b in g_blocks if store.blocks.has(digest(b))]
        assert len(garbage) >= 64, "the failed ingest stored less than one job of blocks"
        report = fsck(store)
        assert report.ok and report.unreferenced_blocks == len(garbage)

        # B reuses three quarters of the garbage, spread over its whole length among new blocks;
        # the last quarter stays garbage that nothing will ever use again.
        cut = len(garbage) * 3 // 4
        self.reused = [digest(b) for b in garbage[:cut]]
        self.garbage_only = [digest(b) for b in garbage[cut:]]
        size = 640  # ten jobs
        b_blocks = [block(5000 + i) for i in range(size)]
        for j, data in enumerate(garbage[:cut]):
            b_blocks[j * size // cut] = data
        self.b_blocks = b_blocks
        self.b = write_image(tmp_path / "b.img", b_blocks)


class PausedIngest:
    """Ingest B in a thread that stops in its progress callback once half of B is done."""

    def __init__(self, store: Store, path: Path) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.done_at_pause = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="paused-ingest")
        self.future = self._pool.submit(
            ingest, store, path, IngestOptions(layer="os/b", workers=WORKERS), self._progress
        )

    def _progress(self, done: int, total: int) -> None:
        if done * 2 >= total and not self.reached.is_set():
            self.done_at_pause = done
            self.reached.set()
            if not self.release.wait(WAIT):
                raise TimeoutError("the test never released the ingest")

    def wait_paused(self) -> None:
        if not self.reached.wait(WAIT):
            self.future.result(timeout=0)  # surfaces the ingest's error, if it failed early
            raise AssertionError("the ingest never reached its midpoint")

    def finish(self) -> IngestResult:
        self.release.set()
        try:
            return self.future.result(timeout=WAIT)
        finally:
            self._pool.shutdown(wait=False)


def check_b_committed(store: Store, scenario: Scenario, result: IngestResult, tmp_path: Path) -> None:
    assert result.version is not None and result.version.ref == "os/b@1"
    missing = [d for d in map(digest, scenario.b_blocks) if not store.blocks.has(d)]
    assert missing == [], f"{len(missing)} blocks of the committed version are gone"
    report = fsck(store)
    assert report.ok, [p.as_json() for p in report.problems]
    assert report.interrupted_ingests == []
    # Exported by the real command, which reads the store while this process still holds it.
    for ref, source in (("os/b@1", scenario.b), ("os/a@1", scenario.a)):
        out = tmp_path / "export.img"
        run_cli(tmp_path / "store", "export", ref, out)
        assert sha256_file(out) == sha256_file(source), f"{ref} does not export to its source"
        out.unlink()


def test_gc_while_an_ingest_is_paused_keeps_the_blocks_it_relies_on(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store", writable=True, create=True)
    try:
        scenario = Scenario(tmp_path, store)
        paused = PausedIngest(store, scenario.b)
        try:
            paused.wait_paused()
            gc = collect(store)
            # The reused garbage in the half of B already done was found in the store and not
            # written again: B's version will name it, so GC must have kept it.
            done_blocks = paused.done_at_pause // BLOCK
            relied_on = {digest(b) for b in scenario.b_blocks[:done_blocks]} & set(scenario.reused)
            assert relied_on, "the paused half of B reused no garbage: the test proves nothing"
            assert all(store.blocks.has(d) for d in relied_on)
            # ...while the garbage nothing uses is really gone: GC did sweep during the ingest.
            assert not any(store.blocks.has(d) for d in scenario.garbage_only)
            assert gc.blocks_removed >= len(scenario.garbage_only)
        finally:
            result = paused.finish()
        check_b_committed(store, scenario, result, tmp_path)
    finally:
        store.close()


@pytest.mark.parametrize("started", ["before-the-mark", "after-the-mark"])
def test_an_ingest_committing_between_mark_and_sweep_keeps_its_blocks(tmp_path: Path, started: str) -> None:
    store = Store.open(tmp_path / "store", writable=True, create=True)
    try:
        scenario = Scenario(tmp_path, store)
        results: list[IngestResult] = []
        paused: PausedIngest | None = None
        if started == "before-the-mark":
            paused = PausedIngest(store, scenario.b)
            paused.wait_paused()

        def commit_b() -> None:
            # Runs after GC has marked: B's version did not exist when the mark read the versions.
            if paused is not None:
                results.append(paused.finish())
            else:
                results.append(ingest(store, scenario.b, IngestOptions(layer="os/b", workers=WORKERS)))

        try:
            gc = collect(store, before_sweep=commit_b)
        finally:
            if paused is not None:
                paused.release.set()
        assert len(results) == 1
        check_b_committed(store, scenario, results[0], tmp_path)
        assert not any(store.blocks.has(d) for d in scenario.garbage_only)
        assert gc.blocks_removed == len(scenario.garbage_only)
        # B's prefilter records belong to a committed version, so they are not stale: GC must
        # leave them, and a re-ingest of the same image then skips every block through them.
        again = ingest(store, scenario.b, IngestOptions(layer="os/b", workers=WORKERS))
        assert again.reused == len(scenario.b_blocks), (
            f"the re-ingest lost B's prefilter: {again.reused} blocks skipped, {again.deduplicated} re-hashed"
        )
        assert gc.prefilter_records_removed == 0
    finally:
        store.close()


def test_a_commit_landing_while_the_mark_reads_the_catalog_is_no_lost_record_to_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The census behind GC's mark reads the database's journal position first, then the catalog: a
    commit landing in between (a daemon's pull finishing while its GC runs) puts the journal one record
    ahead of that position. That is no lost record: GC runs, and the commit's blocks stay."""
    store = Store.open(tmp_path / "store", writable=True, create=True)
    try:
        scenario = Scenario(tmp_path, store)
        results: list[IngestResult] = []
        read_family = census._read_family

        def commit_b_first(db: Any, family: str, found: census.Census) -> dict[bytes, bytes] | None:
            if not results:  # after the census read the position, before it reads any family
                results.append(ingest(store, scenario.b, IngestOptions(layer="os/b", workers=WORKERS)))
            return read_family(db, family, found)

        monkeypatch.setattr(census, "_read_family", commit_b_first)
        gc = collect(store)  # refused before: "is at journal record N, the journal at N+1"
        monkeypatch.undo()
        assert len(results) == 1
        check_b_committed(store, scenario, results[0], tmp_path)
        assert gc.blocks_removed == len(scenario.garbage_only)
    finally:
        store.close()


# The failed ingest of fail_an_ingest, in a process of its own that exits afterwards.
FAIL_IN_CHILD = """
import sys
from pathlib import Path
from cachepoint.store.store import Store
from tests.test_gc_concurrency import fail_an_ingest
with Store.open(sys.argv[1], writable=True) as store:
    fail_an_ingest(store, Path(sys.argv[2]), sys.argv[3])
print("failed as planned: the file shrank")
"""


def kill_an_ingest_midway(store_dir: Path, image: Path) -> int:
    """SIGKILL a `cachepoint ingest` child once its ingest record is in the store; returns its pid."""
    with Store.open(store_dir) as store:
        known = {i.ingest_id for i in store.interrupted_ingests()}
    child = subprocess.Popen(
        [sys.executable, "-m", "cachepoint", "ingest", "os/c", str(image), "--json"],
        env=cli_env(store_dir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and child.poll() is None:
            try:
                with Store.open(store_dir) as store:
                    if {i.ingest_id for i in store.interrupted_ingests()} - known:
                        break
            except Exception:  # a read-only open can race with the writer deleting obsolete files
                pass
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=WAIT) == -signal.SIGKILL, "the ingest finished before the kill"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.pid


def test_gc_removes_what_failed_and_killed_ingests_left_behind(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    a = write_image(tmp_path / "a.img", [block(i) for i in range(64)] + [bytes(BLOCK)] * 8)
    run_cli(store_dir, "ingest", "os/a", a, "--json")

    # A failed ingest in one process leaves stored blocks that no version references...
    g = write_image(tmp_path / "g.img", [block(1000 + i) for i in range(384)])
    failed = subprocess.run(
        [sys.executable, "-c", FAIL_IN_CHILD, str(store_dir), str(g), "os/b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert failed.returncode == 0 and "shrank" in failed.stdout, failed.stdout + failed.stderr
    # ...and a SIGKILLed one in another leaves its ingest record.
    c = write_image(tmp_path / "c.img", [block(3000 + i) for i in range(768)])
    pid = kill_an_ingest_midway(store_dir, c)

    before = run_cli(store_dir, "fsck", "--json").json()
    assert before["ok"] and before["unreferenced_blocks"] > 0
    assert len(before["interrupted_ingests"]) == 1 and f"pid {pid}" in before["interrupted_ingests"][0]
    layers = [row["layer"] for row in run_cli(store_dir, "ls", "--json").json()["layers"]]
    assert layers == ["os/a"]

    gc = run_cli(store_dir, "gc", "--json").json()
    assert gc["blocks_removed"] == before["unreferenced_blocks"] and gc["bytes_freed"] > 0
    assert gc["interrupted_ingests_cleared"] == 1

    after = run_cli(store_dir, "fsck", "--json").json()
    assert after["ok"] and after["problems"] == []
    assert after["unreferenced_blocks"] == 0 and after["interrupted_ingests"] == []
    assert after["blocks_checked"] == before["blocks_checked"]
    out = tmp_path / "a-export.img"
    run_cli(store_dir, "export", "os/a@1", out)
    assert sha256_file(out) == sha256_file(a)

    # What GC removed can be stored again: the killed ingest, retried, commits whole.
    assert run_cli(store_dir, "ingest", "os/c", c, "--json").json()["version"] == 1
    out.unlink()
    run_cli(store_dir, "export", "os/c@1", out)
    assert sha256_file(out) == sha256_file(c)
    assert run_cli(store_dir, "fsck", "--json").json()["ok"]


def test_gc_in_another_process_runs_once_a_store_that_failed_an_ingest_is_closed(tmp_path: Path) -> None:
    # A long-lived process (a daemon, a GUI) keeps its Store object after closing it. Closing must
    # release the database, or every other command on the store fails as "busy" until that
    # object happens to be garbage-collected.
    store_dir = tmp_path / "store"
    store = Store.open(store_dir, writable=True, create=True)
    try:
        ingest(
            store, write_image(tmp_path / "a.img", [block(i) for i in range(16)]), IngestOptions(layer="os/a")
        )
        fail_an_ingest(store, write_image(tmp_path / "g.img", [block(1000 + i) for i in range(384)]), "os/b")
        store.close()
        gc = run_cli(store_dir, "gc", "--json", check=False)
        assert gc.code == 0, f"gc exited {gc.code} after the store was closed: {gc.err}"
        assert gc.json()["blocks_removed"] > 0
    finally:
        store.close()
