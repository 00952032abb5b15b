"""The corruption matrix: one flipped byte in each file of a store's database, in turn.

For a store of three layers (and the coordinator's data, built by a real coordinator), a byte is
flipped in each SST file, in SST footers, in the WAL and in the MANIFEST. For every case:
- the damage is observed (an open that refuses, a GC that refuses, or fsck naming a problem), so the
  test cannot pass by missing the file;
- GC never deletes a block a version needs: a copy with the same damage that never ran GC is
  repaired beside it, and both must end with exactly the same losses;
- after repair no version is lost (the catalog journal holds every record), every version whose
  blocks survive reads back byte for byte (blocks verified against their ids, manifest digest
  unchanged), and fsck names only blocks that were in the damaged file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachepoint.errors import CachepointError
from cachepoint.model import HOLE_DIGEST
from cachepoint.store import journal as jr
from cachepoint.store.census import take
from cachepoint.store.fsck import fsck
from cachepoint.store.gc import collect
from cachepoint.store.repair import repair
from cachepoint.store.store import Store
from tests.conftest import REPO, cli_env, run_cli, sha256_file
from tests.fleet import Fleet, coordinator_cli, random_image

BLOCK = 64 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    file: str  # relative to db/
    offset: int  # negative: from the end


def content_digest(store: Store, ref: str) -> str:
    """What an export of ``ref`` would hold, every block verified against its id."""
    info = store.catalog.resolve(ref)
    manifest = store.catalog.manifest(info.manifest_digest)
    digest = hashlib.sha256(info.manifest_digest)
    for entry in manifest.entries:
        digest.update(f"{entry.path}\0{entry.type}\0{entry.mode}\0{entry.size}\0{entry.target}".encode())
        for block in entry.digests():
            digest.update(bytes(manifest.block_size) if block == HOLE_DIGEST else store.blocks.read(block))
    return digest.hexdigest()


def versions_of(store: Store) -> list[str]:
    return sorted(info.ref for info in store.catalog.all_versions())


def snapshot_contents(root: Path) -> dict[str, str]:
    with Store.open(root) as store:
        return {ref: content_digest(store, ref) for ref in versions_of(store)}


def leave_a_wal(root: Path) -> None:
    """Move a tag in a child process that dies without closing the database: the move stays in the
    WAL only (and in the journal), as after a power cut."""
    code = (
        "import os, sys\n"
        "from cachepoint.store.store import Store\n"
        "store = Store.open(sys.argv[1], writable=True)\n"
        "store.catalog.set_tag('os/base@1', 'production', 'matrix')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, cwd=REPO, env=cli_env(root))
    wal = [p for p in (root / "db").glob("*.log") if p.stat().st_size > 0]
    assert wal, "the child left no WAL behind"


def cases_for(root: Path) -> list[Case]:
    db = root / "db"
    cases = [Case(f"sst-{p.name}", p.name, min(40, p.stat().st_size // 2)) for p in sorted(db.glob("*.sst"))]
    biggest = max(db.glob("*.sst"), key=lambda p: p.stat().st_size)
    smallest = min(db.glob("*.sst"), key=lambda p: p.stat().st_size)
    cases += [Case(f"footer-{p.name}", p.name, -20) for p in {biggest, smallest}]
    cases += [Case(f"wal-{p.name}", p.name, -12) for p in db.glob("*.log") if p.stat().st_size > 0]
    cases += [Case(f"manifest-{p.name}", p.name, -30) for p in db.glob("MANIFEST-*")]
    return cases


def flip(root: Path, case: Case) -> None:
    path = root / "db" / case.file
    data = bytearray(path.read_bytes())
    at = case.offset if case.offset >= 0 else len(data) + case.offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def try_gc(root: Path, deleting: Callable[[Store], object]) -> str:
    """Run a GC on the damaged store; returns how it ended."""
    try:
        store = Store.open(root, writable=True)
    except CachepointError as err:
        return f"refused to open: {err}"
    try:
        deleting(store)
        return "ran"
    except CachepointError as err:
        return f"refused: {err}"
    finally:
        store.close()


def observed_by_fsck(root: Path) -> list[str]:
    try:
        store = Store.open(root)
    except CachepointError as err:
        return [f"open: {err}"]
    try:
        return [f"{p.kind} {p.subject}" for p in fsck(store).problems]
    finally:
        store.close()


def run_matrix(source: Path, work: Path, deleting: Callable[[Store], object]) -> dict[str, str]:
    before = snapshot_contents(source)
    assert len(before) >= 3
    outcomes: dict[str, str] = {}
    for case in cases_for(source):
        damaged, control = work / f"{case.name}-gc", work / f"{case.name}-control"
        for target in (damaged, control):
            shutil.copytree(source, target, symlinks=True)
            flip(target, case)
        gc_outcome = try_gc(damaged, deleting)
        problems = observed_by_fsck(control)
        assert gc_outcome != "ran" or problems, f"{case.name}: the damage went unnoticed"
        reports = [repair(target) for target in (damaged, control)]
        assert reports[0].lost_blocks == reports[1].lost_blocks, (
            f"{case.name}: GC ({gc_outcome}) deleted blocks a version needed: "
            f"{sorted(set(reports[0].lost_blocks) - set(reports[1].lost_blocks))[:3]}"
        )
        for report in reports:
            assert report.lost_versions == [], f"{case.name}: {report.lost_versions}"
        with Store.open(damaged) as store:
            assert versions_of(store) == sorted(before), f"{case.name}: versions differ after repair"
            for ref, expected in before.items():
                if ref in reports[0].incomplete_versions:
                    continue
                assert content_digest(store, ref) == expected, f"{case.name}: {ref} differs after repair"
            after = fsck(store)
            assert {p.kind for p in after.problems} <= {"missing-block"}, (case.name, after.problems)
            assert len(after.problems) == len(reports[0].lost_blocks)
            assert take(store).complete, case.name
        outcomes[case.name] = gc_outcome
        shutil.rmtree(damaged)
        shutil.rmtree(control)
    return outcomes


def test_a_flipped_byte_anywhere_in_a_store_never_lets_gc_delete_and_repair_restores_every_version(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    images = tmp_path / "images"
    images.mkdir()
    for name, size, seed in (("base1", 6, 1), ("base2", 6, 2), ("tool", 4, 3)):
        random_image(images / f"{name}.img", size * BLOCK, seed)
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "notes.txt").write_text("alice's notes\n" * 500)
    (home / "photo.raw").write_bytes(os.urandom(3 * BLOCK))
    run_cli(store, "ingest", "os/base", images / "base1.img", "--json")
    run_cli(store, "ingest", "os/base", images / "base2.img", "--json")
    run_cli(store, "ingest", "app/tool", images / "tool.img", "--json")
    run_cli(store, "ingest", "user/alice/home", home, "--json")
    leave_a_wal(store)
    outcomes = run_matrix(store, tmp_path / "cases", collect)
    kinds = {name.split("-", 1)[0] for name in outcomes}
    assert kinds == {"sst", "footer", "wal", "manifest"}, kinds
    assert len(outcomes) >= 20, outcomes


def test_repair_and_fsck_report_the_damage_through_the_cli(tmp_path: Path) -> None:
    store = tmp_path / "store"
    image = tmp_path / "a.img"
    random_image(image, 4 * BLOCK, 7)
    run_cli(store, "ingest", "os/a", image, "--json")
    run_cli(store, "tag", "os/a@1", "production", "--json")
    versions_sst = None
    with Store.open(store) as opened:
        for meta in opened.db.db.live_files():
            if meta["start_key"] == b"os/a\x00" + (1).to_bytes(8, "big"):  # the version record
                versions_sst = meta["name"].lstrip("/")
    assert versions_sst is not None
    flip(store, Case("versions", versions_sst, 40))

    gc = run_cli(store, "gc", "--json", check=False)
    assert gc.code == 8, gc
    assert "refused" in gc.err and "versions" in gc.err, gc.err
    checked = run_cli(store, "fsck", "--json", check=False)
    assert checked.code == 8
    kinds = {p["kind"] for p in checked.json()["problems"]}  # type: ignore[index]
    assert "unreadable-records" in kinds, checked.out

    repaired = run_cli(store, "repair", "--json")
    report = repaired.json()
    assert report["ok"] and report["recovered_from_journal"] == {"versions": 1}, report  # type: ignore[index]
    assert run_cli(store, "fsck", "--json").json()["ok"]  # type: ignore[index]
    out = tmp_path / "out.img"
    run_cli(store, "export", "os/a:production", out)
    assert sha256_file(out) == sha256_file(image)


def test_the_coordinators_data_survives_the_same_matrix(tmp_path: Path) -> None:
    from coordinator.catalog.events import EventLog
    from coordinator.history.audit import AuditLog
    from coordinator.history.gc import CoordinatorGc
    from coordinator.history.holds import Holds
    from coordinator.history.retention import Retention

    data = tmp_path / "coordinator"
    admin = tmp_path / "admin"
    images = tmp_path / "images"
    images.mkdir()
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(data)
        for layer, seed in (("os/base", 1), ("os/base", 2), ("app/tool", 3), ("user/alice/home", 4)):
            image = images / f"{seed}.img"
            random_image(image, 4 * BLOCK, seed)
            run_cli(admin, "publish", layer, image, "--coordinator", coordinator.address, "--json")
        coordinator_cli(
            "history", "hold", "alice", "--reason", "case 12", "--coordinator", coordinator.address
        )
        coordinator.stop()

    def history_gc(store: Store) -> None:
        audit = AuditLog(store.db)
        CoordinatorGc(store, EventLog(store), audit, Holds(store.db, audit), Retention({})).run(
            "matrix", False
        )

    outcomes = run_matrix(data, tmp_path / "cases", history_gc)
    assert {name.split("-", 1)[0] for name in outcomes} >= {"sst", "footer", "manifest"}
    # The audit chain and the hold came back whole in every case (checked on a last repaired copy).
    probe = tmp_path / "probe"
    shutil.copytree(data, probe)
    flip(probe, next(c for c in cases_for(probe) if c.name.startswith("manifest")))
    result = coordinator_cli("repair", "--data", str(probe), "--json")
    report = result.json()
    assert report["ok"] and report["audit"]["ok"], report  # type: ignore[index]
    with Store.open(probe) as store:
        assert Holds(store.db, AuditLog(store.db)).get("alice") is not None


@pytest.mark.parametrize("cut", [1, 7])
def test_a_journal_cut_inside_its_last_record_is_trimmed_and_the_store_opens(
    tmp_path: Path, cut: int
) -> None:
    store = tmp_path / "store"
    image = tmp_path / "a.img"
    random_image(image, 2 * BLOCK, 9)
    run_cli(store, "ingest", "os/a", image, "--json")
    journal = store / jr.FILE_NAME
    size = journal.stat().st_size
    # A crash in the middle of an append: part of a record, whose batch never reached the database.
    record = jr.encode_record(99, jr.KIND_BATCH, [(jr.OP_PUT, "tags", b"os/a\x00ghost", b"\x00" * 8)])
    with open(journal, "ab") as f:
        f.write(record[: len(record) - cut])
    with Store.open(store, writable=True) as opened:
        assert opened.catalog.tag_target("os/a", "ghost") is None
    assert journal.stat().st_size == size
    with Store.open(store) as opened:
        assert take(opened).complete


def test_a_damaged_journal_record_is_skipped_and_named(tmp_path: Path) -> None:
    store = tmp_path / "store"
    image = tmp_path / "a.img"
    random_image(image, 2 * BLOCK, 11)
    run_cli(store, "ingest", "os/a", image, "--json")
    run_cli(store, "tag", "os/a@1", "staging", "--json")
    run_cli(store, "tag", "os/a@1", "production", "--json")
    journal = store / jr.FILE_NAME
    data = bytearray(journal.read_bytes())
    records = [
        item for item in jr.scan_records(bytes(data), jr.HEADER_SIZE) if not isinstance(item, jr.Damage)
    ]
    middle = records[len(records) // 2][0]
    data[middle + 20] ^= 0xFF
    journal.write_bytes(bytes(data))
    state = jr.read_state(journal)
    assert len(state.damage) == 1 and state.records == len(records) - 1
    # GC cannot prove the catalog whole while its second copy is damaged, and says why.
    gc = run_cli(store, "gc", "--json", check=False)
    assert gc.code == 8 and "journal" in gc.err, gc.err
    report = run_cli(store, "repair", "--json").json()
    assert report["journal"].startswith("rewritten"), report  # type: ignore[index]
    assert run_cli(store, "gc", "--json").code == 0
