"""Repair: salvage a damaged store, rebuild its catalog from the journal, and say exactly what was
recovered and what was lost.

Steps (each recorded in the report):

1. **Open.** The database is opened without RocksDB's paranoid checks and every family is read with
   checks. A clean read skips to step 3.
2. **Salvage.** Damage somewhere: every SST file is hard-linked into a scratch copy (no space used),
   then RocksDB's own repair rebuilds the database from the files it can read and moves the ones it
   cannot into ``db/lost/``. From the scratch copy, every known key that falls in a lost file's key
   range (catalog keys from the journal, block ids from the manifests) is read back where RocksDB
   still can, and written into the rebuilt database. Lost files end in ``STORE/damaged-<time>/``.
3. **Catalog.** The journal is replayed and merged with what the database holds: records only the
   journal has are written back (recovered); records only the database has are kept; where both
   have a key and differ, the side that saw the later batch wins. Layers' latest numbers are
   recomputed, tags pointing at versions that are gone are dropped, and versions whose manifest
   survives nowhere are removed (lost: nothing can rebuild them).
4. **Blocks.** Every block a version or an attached disk's map names is read and verified. Bad and
   missing ones are handed to ``heal`` (re-fetched from peers or the coordinator) when given.
5. **Journal.** Rewritten as a checkpoint of the repaired catalog.

Repair works offline (a daemon must not hold the store) and changes nothing it did not have to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rocksdict

from cachepoint.blocks import decode_block
from cachepoint.errors import RecordsUnreadable, StoreDamaged
from cachepoint.ids import BlockId
from cachepoint.store import format as fmt
from cachepoint.store import journal as jr
from cachepoint.store.db import StoreDB
from cachepoint.store.fsck import BATCH, check_blocks
from cachepoint.store.store import Store
from cachepoint.wire import manifest_digest, manifest_from_bytes, version_from_bytes

HealFn = Callable[[Store, list[bytes]], set[bytes]]
ProgressFn = Callable[[int, int], None]

_SST_NAME = re.compile(r"(\d+\.sst)")


@dataclass
class RepairReport:
    store: str
    database: str = "read cleanly"
    damage: list[str] = field(default_factory=list)
    files_set_aside: list[str] = field(default_factory=list)
    records_salvaged: int = 0
    blocks_salvaged: int = 0
    recovered_from_journal: dict[str, int] = field(default_factory=dict)
    kept_not_in_journal: dict[str, int] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    lost_versions: list[str] = field(default_factory=list)
    lost_records: list[str] = field(default_factory=list)
    blocks_checked: int = 0
    blocks_bad: int = 0
    blocks_healed: int = 0
    lost_blocks: list[str] = field(default_factory=list)
    incomplete_versions: dict[str, int] = field(default_factory=dict)  # ref -> blocks it lacks
    journal: str = ""

    @property
    def ok(self) -> bool:
        """Nothing was lost: every version is whole again."""
        return not (self.lost_versions or self.lost_records or self.lost_blocks)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "store": self.store,
            "database": self.database,
            "damage": self.damage,
            "files_set_aside": self.files_set_aside,
            "records_salvaged": self.records_salvaged,
            "blocks_salvaged": self.blocks_salvaged,
            "recovered_from_journal": self.recovered_from_journal,
            "kept_not_in_journal": self.kept_not_in_journal,
            "fixed": self.fixed,
            "lost_versions": self.lost_versions,
            "lost_records": self.lost_records,
            "blocks_checked": self.blocks_checked,
            "blocks_bad": self.blocks_bad,
            "blocks_healed": self.blocks_healed,
            "lost_blocks": self.lost_blocks,
            "incomplete_versions": self.incomplete_versions,
            "journal": self.journal,
        }


def repair(root: Path | str, heal: HealFn | None = None, progress: ProgressFn | None = None) -> RepairReport:
    root = Path(root)
    report = RepairReport(str(root))
    if (root / "db" / "CURRENT").exists():
        if _find_damage(root, report):
            _salvage(root, report)
    elif (root / jr.FILE_NAME).exists():
        # The database is gone altogether: the catalog comes back from the journal, blocks from the fleet.
        report.damage.append("the database is missing")
        report.database = "made anew from the catalog journal"
    else:
        StoreDB(root, writable=False)  # raises StoreMissing with the usual message
    # The format record itself may be among the damage: the journal holds it too (checked after).
    store = Store(StoreDB(root, writable=True, create=True, attach_journal=False, check_format=False))
    try:
        _merge_catalog(store, report)
        store.db.check_format()
        _check_blocks(store, report, heal, progress)
        store.db.checkpoint_journal()
        report.journal = f"rewritten as a checkpoint at record {store.db.journal_seq()}"
    finally:
        store.close()
    return report


# -- 1. open and look -------------------------------------------------------------------------------


def _find_damage(root: Path, report: RepairReport) -> bool:
    """Read every family with checks. True when anything could not be read."""
    try:
        db = StoreDB(root, writable=True, salvage=True, attach_journal=False)
    except StoreDamaged as err:
        report.damage.append(f"the database cannot be opened: {err.args[1]}")
        return True
    try:
        for family in fmt.COLUMN_FAMILIES:
            try:
                for _ in db.scan_keys(family):
                    pass
            except RecordsUnreadable as err:
                report.damage.append(f"{family}: {err.args[2]}")
    finally:
        db.close()
    return bool(report.damage)


# -- 2. salvage -------------------------------------------------------------------------------------


def _salvage(root: Path, report: RepairReport) -> None:
    path = root / "db"
    stamp = time.strftime("%Y%m%dT%H%M%S")
    scratch = root / f"repair-{stamp}"  # holds db/ as it was, for reading back what can be read
    scratch.mkdir()
    _link_copy(path, scratch / "db")
    try:
        options = rocksdict.Options(raw_mode=True)
        try:
            rocksdict.Rdict.repair(str(path), options)
        except Exception as err:
            raise StoreDamaged(root, f"RocksDB's repair failed too: {err}") from err
        report.database = "rebuilt from its readable files by RocksDB's repair"
        lost_dir = path / "lost"
        damaged = sorted(p.name for p in lost_dir.glob("*.sst")) if lost_dir.exists() else []
        if lost_dir.exists():
            # RocksDB's repair also moves the old MANIFEST and WAL files there (bookkeeping it replaced);
            # only the SST files it could not read are damage worth naming.
            aside = root / f"damaged-{stamp}"
            os.replace(lost_dir, aside)
            report.files_set_aside = [str(aside / name) for name in damaged]
        if damaged:
            _salvage_keys(root, scratch, damaged, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _link_copy(source: Path, target: Path) -> None:
    """A copy of the database directory as it was, made of hard links: it costs no space, which a
    repair on a full disk does not have. Safe because RocksDB never rewrites a file in place: SST
    files are immutable, and its repair replaces MANIFEST, CURRENT and the WAL by new files and
    renames. RocksDB's info logs (LOG*) are left out: nothing reads them back."""
    target.mkdir()
    for entry in os.scandir(source):
        if not entry.is_file() or entry.name == "LOCK" or entry.name.startswith("LOG"):
            continue
        os.link(entry.path, target / entry.name)


def _salvage_keys(root: Path, scratch: Path, damaged: list[str], report: RepairReport) -> None:
    """Read back, from the pre-repair copy, what RocksDB can still read of the damaged files' keys."""
    try:
        before = StoreDB(scratch, writable=False, salvage=True)
    except Exception:
        # The copy's MANIFEST cannot even be read: nothing names the damaged files' keys.
        return
    ranges: list[tuple[bytes, bytes]] = []
    try:
        for meta in before.db.live_files():
            found = _SST_NAME.search(meta["name"] or "")
            if found and found.group(1) in damaged:
                ranges.append((meta["start_key"], meta["end_key"]))
        if not ranges:
            return
        known = _known_keys(root, before)
        target = StoreDB(root, writable=True, attach_journal=False, check_format=False)
        try:
            for family, keys in known.items():
                batch = target.batch()
                count = 0
                for key in keys:
                    if not any(start <= key <= end for start, end in ranges):
                        continue
                    try:
                        value = before.get(family, key)
                    except RecordsUnreadable:
                        continue
                    if value is None or target.get(family, key) is not None:
                        continue
                    batch.inner.put(key, value, target.handle[family])
                    count += 1
                    if family == fmt.CF_BLOCKS:
                        report.blocks_salvaged += 1
                    else:
                        report.records_salvaged += 1
                if count:
                    target.write_unjournaled(batch.inner, sync=True, wal=True)
        finally:
            target.close()
    finally:
        before.close()


def _known_keys(root: Path, before: StoreDB) -> dict[str, set[bytes]]:
    """Keys that may live in a damaged file: the journal's catalog keys, and the blocks its
    manifests and the old database's readable manifests name."""
    known: dict[str, set[bytes]] = {}
    state = jr.read_state(root / jr.FILE_NAME)
    manifests: list[bytes] = list(state.families.get(fmt.CF_MANIFESTS, {}).values())
    for family, records in state.families.items():
        known.setdefault(family, set()).update(records)
    try:
        for key, value in before.scan(fmt.CF_MANIFESTS):
            known.setdefault(fmt.CF_MANIFESTS, set()).add(key)
            manifests.append(value)
    except RecordsUnreadable:
        pass
    blocks = known.setdefault(fmt.CF_BLOCKS, set())
    for stored in manifests:
        try:
            blocks |= manifest_from_bytes(decode_block(stored)).block_ids()
        except Exception:
            continue
    return known


# -- 3. catalog -------------------------------------------------------------------------------------


def _merge_catalog(store: Store, report: RepairReport) -> None:
    db = store.db
    path = store.root / jr.FILE_NAME
    state = jr.read_state(path) if path.exists() else jr.JournalState()
    # Damage to the journal alone loses nothing while the database holds the same records; it is
    # named, and the journal is rewritten at the end.
    for damage in state.damage:
        report.damage.append(f"journal: {damage}")
    for first, last in state.gaps:
        report.damage.append(f"journal: records {first}..{last} are missing")
    db_seq = db.journal_seq()
    journal_newer = state.last_seq >= db_seq
    batch = db.batch()
    for family in sorted(fmt.JOURNALED_FAMILIES):
        held = dict(db.scan(family))
        wanted = state.families.get(family, {})
        for key, value in wanted.items():
            if family == fmt.CF_META and key in fmt.UNJOURNALED_META:
                continue
            mine = held.get(key)
            if mine is None:
                batch.inner.put(key, value, db.handle[family])
                report.recovered_from_journal[family] = report.recovered_from_journal.get(family, 0) + 1
            elif mine != value and journal_newer:
                batch.inner.put(key, value, db.handle[family])
                report.recovered_from_journal[family] = report.recovered_from_journal.get(family, 0) + 1
        extra = sum(1 for key in held if key not in wanted and key not in fmt.UNJOURNALED_META)
        if extra and path.exists():
            report.kept_not_in_journal[family] = extra
    batch.inner.put(fmt.META_JOURNAL_SEQ, fmt.u64(max(db_seq, state.last_seq)), db.handle[fmt.CF_META])
    db.write_unjournaled(batch.inner, sync=True, wal=True)
    _make_consistent(store, report)


def _make_consistent(store: Store, report: RepairReport) -> None:
    """Versions need their manifest, layers their latest version, tags a version to point at."""
    db = store.db
    batch = db.batch()
    versions: dict[str, dict[int, Any]] = {}
    for key, raw in db.scan(fmt.CF_VERSIONS):
        try:
            info = version_from_bytes(raw)
        except Exception as err:
            batch.inner.delete(key, db.handle[fmt.CF_VERSIONS])
            report.lost_records.append(f"version record {key!r}: {err}")
            continue
        stored = db.get(fmt.CF_MANIFESTS, info.manifest_digest)
        whole = False
        if stored is not None:
            try:
                whole = manifest_digest(decode_block(stored)) == info.manifest_digest
            except Exception:
                whole = False
        if not whole:
            batch.inner.delete(key, db.handle[fmt.CF_VERSIONS])
            report.lost_versions.append(f"{info.ref} (its manifest {BlockId(info.manifest_digest)} is gone)")
            continue
        versions.setdefault(info.layer, {})[info.number] = info
    layers = {key.decode(): json.loads(raw) for key, raw in db.scan(fmt.CF_LAYERS)}
    for name, held in versions.items():
        latest = max(held)
        record = layers.get(name)
        if record is None or record.get("latest") != latest:
            kind = str(held[latest].kind)
            new = {
                "kind": record.get("kind", kind) if record else kind,
                "latest": latest,
                "created_ns": record.get("created_ns", held[min(held)].created_ns)
                if record
                else held[min(held)].created_ns,
            }
            batch.inner.put(name.encode(), json.dumps(new).encode(), db.handle[fmt.CF_LAYERS])
            report.fixed.append(f"layer {name}: latest set to @{latest}")
    for name in layers.keys() - versions.keys():
        batch.inner.delete(name.encode(), db.handle[fmt.CF_LAYERS])
        report.fixed.append(f"layer {name}: removed (no version of it survives)")
    for key, raw in db.scan(fmt.CF_TAGS):
        layer, _, tag = key.partition(fmt.SEP)
        name = layer.decode()
        number = fmt.read_u64(raw)
        if number in versions.get(name, {}):
            continue
        held = versions.get(name)
        if tag == b"latest" and held:
            batch.inner.put(key, fmt.u64(max(held)), db.handle[fmt.CF_TAGS])
            report.fixed.append(f"tag {name}:latest moved to @{max(held)} (it pointed at lost @{number})")
        else:
            batch.inner.delete(key, db.handle[fmt.CF_TAGS])
            report.lost_records.append(f"tag {name}:{tag.decode()} (it pointed at @{number}, which is gone)")
    if len(batch):
        db.write_unjournaled(batch.inner, sync=True, wal=True)


# -- 4. blocks --------------------------------------------------------------------------------------


def _check_blocks(
    store: Store, report: RepairReport, heal: HealFn | None, progress: ProgressFn | None
) -> None:
    users: dict[bytes, list[str]] = {}
    referenced: set[bytes] = set()
    for _, raw in store.db.scan(fmt.CF_VERSIONS):
        info = version_from_bytes(raw)
        manifest = store.catalog.manifest(info.manifest_digest)
        for digest in manifest.block_ids():
            users.setdefault(digest, []).append(info.ref)
        referenced |= manifest.block_ids()
    referenced |= store.working_block_ids()
    ordered = sorted(referenced)
    bad: set[bytes] = set()
    for start in range(0, len(ordered), BATCH):
        chunk = ordered[start : start + BATCH]
        _, problems = check_blocks(store, chunk)
        bad |= {digest for digest, _, _ in problems}
        report.blocks_checked += len(chunk)
        if progress is not None:
            progress(report.blocks_checked, len(ordered))
    report.blocks_bad = len(bad)
    if bad and heal is not None:
        healed = heal(store, sorted(bad))
        report.blocks_healed = len(healed & bad)
        bad -= healed
    for digest in sorted(bad):
        report.lost_blocks.append(str(BlockId(digest)))
        for ref in users.get(digest, []):
            report.incomplete_versions[ref] = report.incomplete_versions.get(ref, 0) + 1
