"""Crash safety: an ingest SIGKILLed at any moment leaves the store as it was before that ingest.

Each round starts a real `cachepoint ingest` child, waits until its ingest record is in the store
(so the child is past opening the store and is writing), waits a further random delay and kills it
with SIGKILL. A kill only counts as landing mid-ingest when the store proves it: the child's own
ingest record survives and no version was added. After every kill fsck must be clean and every
listed version must export byte for byte to the image it was made from.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.gen_image import generate
from cachepoint.store.store import Store
from tests.conftest import REPO, cli_env, run_cli, sha256_file

LAYER = "os/x"
BLOCK = 64 * 1024
IMAGE_SIZE = 48 * 1024 * 1024
ROUNDS = 16
MIN_PROVEN = 12  # 75% of ROUNDS: the claim is about kills that really land mid-ingest
RECORD_WAIT = 30.0  # seconds a child may take to reach its first write; a bound, not a speed claim
KILL_WAIT = 30.0


def make_variant(base: Path, dest: Path, seed: int, fraction: float) -> None:
    """Copy ``base`` with ``fraction`` of its blocks replaced by new random or compressible blocks.

    Every variant has its own new blocks, so every ingest of one has real work to do (hashing,
    compressing, writing), which is what keeps it running long enough to be killed in the middle.
    """
    rng = random.Random(seed)
    shutil.copyfile(base, dest)
    blocks = IMAGE_SIZE // BLOCK
    with open(dest, "r+b") as out:
        for index in rng.sample(range(blocks), int(blocks * fraction)):
            out.seek(index * BLOCK)
            if rng.random() < 0.5:
                out.write(rng.randbytes(BLOCK))
            else:
                # Compressible but unique: a random 4 KiB pattern repeated (zstd packs it well).
                out.write(rng.randbytes(4096) * (BLOCK // 4096))


@dataclass(frozen=True)
class StoreState:
    ingest_records: dict[bytes, int]  # ingest id -> pid of the process that started it
    versions: tuple[int, ...]


def read_state(store_dir: Path) -> StoreState:
    with Store.open(store_dir) as store:
        records = {i.ingest_id: i.pid for i in store.interrupted_ingests()}
        versions = tuple(v.number for v in store.catalog.versions(LAYER))
    return StoreState(records, versions)


def recover(store_dir: Path) -> None:
    """What the next command after a crash does first: a writable open applies the catalog journal's
    records the database lacks (a kill can land between a batch's fsynced journal record and its
    database write; a read-only open and fsck then see the database one record behind)."""
    Store.open(store_dir, writable=True).close()


def wait_for_new_record(store_dir: Path, known: set[bytes], child: subprocess.Popen[bytes]) -> bool:
    """Poll the store read-only until the child's ingest record appears (False if it never does)."""
    deadline = time.monotonic() + RECORD_WAIT
    while time.monotonic() < deadline and child.poll() is None:
        try:
            with Store.open(store_dir) as store:
                ids = {i.ingest_id for i in store.interrupted_ingests()}
        except Exception:  # a read-only open can race with the writer deleting obsolete files
            ids = set()
        if ids - known:
            return True
        time.sleep(0.002)
    return False


def assert_store_consistent(store_dir: Path, sources: dict[int, str], scratch: Path) -> None:
    """fsck clean, exactly the committed versions listed, each exporting to its source image.

    ``sources`` maps each committed version to the SHA-256 of the image it was made from.
    """
    fsck = run_cli(store_dir, "fsck", "--json", check=False)
    report = fsck.json()
    assert fsck.code == 0 and report["ok"] and report["problems"] == [], fsck.out + fsck.err
    log = run_cli(store_dir, "log", LAYER, "--json").json()
    assert sorted(v["version"] for v in log["versions"]) == sorted(sources)
    for number, source_digest in sources.items():
        out = scratch / f"export-{number}.img"
        run_cli(store_dir, "export", f"{LAYER}@{number}", out)
        assert sha256_file(out) == source_digest, f"{LAYER}@{number} does not export to its source"
        out.unlink()


def test_a_killed_ingest_leaves_no_partial_version(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    images = tmp_path / "images"
    images.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rng = random.Random(7)

    base = images / "base.img"
    generate(base, IMAGE_SIZE, seed=11)
    sources: dict[int, str] = {}  # committed version -> SHA-256 of the image it was made from
    run_cli(store_dir, "ingest", LAYER, base, "--json")
    sources[1] = sha256_file(base)

    # Calibrate the kill delay on this machine: one complete ingest of a variant like the ones
    # killed below. Delays are a fraction of it so that most kills land before the commit.
    calibration = images / "calibration.img"
    make_variant(base, calibration, seed=1000, fraction=0.7)
    done = run_cli(store_dir, "ingest", LAYER, calibration, "--json").json()
    assert done["new_bytes"] > 0
    sources[done["version"]] = sha256_file(calibration)
    ingest_seconds = float(done["seconds"])

    proven = 0
    outcomes: list[str] = []
    for round_no in range(ROUNDS):
        variant = images / f"variant-{round_no}.img"
        make_variant(base, variant, seed=round_no, fraction=rng.uniform(0.5, 0.9))
        before = read_state(store_dir)
        child = subprocess.Popen(
            [sys.executable, "-m", "cachepoint", "ingest", LAYER, str(variant), "--json"],
            env=cli_env(store_dir),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            delay = rng.uniform(0.0, 0.5 * ingest_seconds)
            if wait_for_new_record(store_dir, set(before.ingest_records), child):
                time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            code = child.wait(timeout=KILL_WAIT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        recover(store_dir)
        after = read_state(store_dir)
        new_records = {i: pid for i, pid in after.ingest_records.items() if i not in before.ingest_records}
        added = [n for n in after.versions if n not in before.versions]

        # The commit removes the ingest record in the same batch that adds the version: a kill can
        # never leave both (or a version without its blocks, which fsck below would catch).
        assert not (new_records and added), f"round {round_no}: record {new_records} and version {added}"
        assert set(before.versions) <= set(after.versions)
        assert code in (-signal.SIGKILL, 0), f"round {round_no}: the ingest failed by itself (exit {code})"
        if code == -signal.SIGKILL and new_records and not added:
            assert list(new_records.values()) == [child.pid], "the surviving record is not the child's"
            proven += 1
            outcomes.append(f"mid-ingest (+{delay:.3f}s)")
        else:
            # Killed too late (or finished first): then the ingest committed whole.
            assert len(added) <= 1
            if code == 0:
                assert len(added) == 1, f"round {round_no}: the ingest exited 0 but added no version"
            outcomes.append(f"exit {code}, versions added {added}")
            for number in added:
                sources[number] = sha256_file(variant)
        assert_store_consistent(store_dir, sources, scratch)
        variant.unlink()

    assert proven >= MIN_PROVEN and proven >= 8, f"only {proven}/{ROUNDS} kills landed mid-ingest: {outcomes}"

    # GC clears every record the kills left, and the store is still clean and usable.
    state = read_state(store_dir)
    assert len(state.ingest_records) == proven
    gc = run_cli(store_dir, "gc", "--json").json()
    assert gc["interrupted_ingests_cleared"] == proven
    report = run_cli(store_dir, "fsck", "--json").json()
    assert report["ok"] and report["interrupted_ingests"] == [] and report["unreferenced_blocks"] == 0
    final = images / "final.img"
    make_variant(base, final, seed=5000, fraction=0.2)
    done = run_cli(store_dir, "ingest", LAYER, final, "--json").json()
    assert done["version"] == max(sources) + 1
    sources[done["version"]] = sha256_file(final)
    assert_store_consistent(store_dir, sources, scratch)
    layers = run_cli(store_dir, "ls", "--json").json()["layers"]
    assert [(r["layer"], r["latest"], r["versions"]) for r in layers] == [(LAYER, max(sources), len(sources))]
