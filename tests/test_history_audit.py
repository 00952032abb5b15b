"""The audit log: every admin action at the coordinator is recorded with actor and time in a hash chain;
changing, removing or replacing one record on disk is detected by `history audit verify`, which names
the first record that does not verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachepoint.store import format as fmt
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, version_pb2
from coordinator.history.audit import GENESIS_HASH, AuditEntry, canonical, seal, verify_records
from tests.fleet import LAYER, Fleet, cli_json, random_image
from tests.history import history, history_json, offline

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)


def audit_records(data: Path) -> dict[int, bytes]:
    with Store.open(data) as store:
        return {fmt.read_u64(k): v for k, v in store.db.scan(fmt.CF_AUDIT)}


def rewrite(data: Path, puts: dict[int, bytes], deletes: tuple[int, ...] = ()) -> None:
    """Change the log on disk behind the coordinator's back (it is stopped), as an intruder would."""
    with Store.open(data, writable=True) as store:
        batch = store.db.batch()
        for seq, raw in puts.items():
            batch.put(fmt.u64(seq), raw, store.db.handle[fmt.CF_AUDIT])
        for seq in deletes:
            batch.delete(fmt.u64(seq), store.db.handle[fmt.CF_AUDIT])
        store.db.write(batch, sync=True)


def verify_offline(data: Path) -> tuple[int, dict[str, object], str]:
    result = offline("audit", "verify", "--data", data, "--json", check=False)
    return result.code, dict(json.loads(result.out)), result.err


def test_admin_actions_are_audited_and_a_changed_record_on_disk_is_named(tmp_path, coordinator_backend):
    if coordinator_backend == "postgresql":
        pytest.skip("embedded only: tampers with the audit log's RocksDB records and verifies them offline")
    data = tmp_path / "coordinator"
    admin = tmp_path / "admin"
    image = tmp_path / "os.img"
    random_image(image, 2 * 65536, seed=3)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(data=data)
        address = coordinator.address
        cli_json(admin, "publish", LAYER, image, "--coordinator", address, "--tag", "production")
        with fleet.channel(address, "publisher", name="rel") as ch:  # with TLS, the actor is its name
            catalog_pb2_grpc.CatalogStub(ch).SetTag(
                catalog_pb2.SetTagRequest(
                    ref=version_pb2.Ref(layer=LAYER, number=1), tag="staging", actor="rel"
                ),
                timeout=10,
            )
        history(address, "hold", "alice", "--reason", "case 1", "--actor", "counsel")
        history(address, "hold", "bob", "--reason", "case 2", "--actor", "counsel")
        history(address, "release", "alice", "--actor", "judge")
        history(address, "gc", "--actor", "ops")
        records = history_json(address, "audit", "list")["records"]
        assert [(r["seq"], r["action"], r["subject"], r["actor"]) for r in records] == [
            (1, "tag.move", f"{LAYER}:production", records[0]["actor"]),
            (2, "tag.move", f"{LAYER}:staging", "rel"),
            (3, "hold.set", "user/alice", "counsel"),
            (4, "hold.set", "user/bob", "counsel"),
            (5, "hold.release", "user/alice", "judge"),
            (6, "gc.sweep", "blocks", "ops"),
        ]
        assert all(r["time_ns"] > 0 and r["hash"] for r in records)
        assert [r["prev_hash"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
        online = history_json(address, "audit", "verify")
        assert online["ok"] and online["records"] == 6 and online["head"]["hash"] == records[-1]["hash"]
        coordinator.stop()

    original = audit_records(data)
    code, verdict, _ = verify_offline(data)
    assert code == 0 and verdict["ok"] and verdict["records"] == 6

    # One field of record 3 changed, its stored hash left as it was.
    changed = json.loads(original[3])
    changed["actor"] = "mallory"
    rewrite(data, {3: canonical(changed)})
    code, verdict, err = verify_offline(data)
    assert code == 8 and verdict["first_broken"] == 3, verdict
    assert "audit record 3 does not verify" in err and "do not match its hash" in err

    # A byte of record 2 flipped on disk: it no longer even parses.
    flipped = bytearray(original[2])
    flipped[0] ^= 0xFF
    rewrite(data, {2: bytes(flipped), 3: original[3]})
    code, verdict, err = verify_offline(data)
    assert code == 8 and verdict["first_broken"] == 2 and "does not parse" in err

    # Record 4 removed.
    rewrite(data, {2: original[2]}, deletes=(4,))
    code, verdict, _ = verify_offline(data)
    assert code == 8 and verdict["first_broken"] == 4 and "missing" in str(verdict["problem"])

    # Record 4 replaced by a forged one with a correct hash of its own: the next link breaks.
    forged = json.loads(original[4])
    forged_record = seal(
        4, forged["time_ns"], AuditEntry("mallory", "hold.set", "user/bob", {}), forged["prev_hash"]
    )
    rewrite(data, {4: canonical(forged_record.stored())})
    code, verdict, _ = verify_offline(data)
    assert code == 8 and verdict["first_broken"] == 5 and "prev_hash" in str(verdict["problem"])

    # Put back as it was: the log verifies again, offline and through a running coordinator.
    rewrite(data, {4: original[4]})
    assert verify_offline(data)[0] == 0
    with Fleet(tmp_path / "fleet-again") as fleet:
        coordinator = fleet.coordinator(data=data)
        assert history_json(coordinator.address, "audit", "verify")["ok"]
        history(coordinator.address, "hold", "carol", "--reason", "case 3")
        assert history_json(coordinator.address, "audit", "verify")["records"] == 7
        coordinator.stop()

    # A damaged last record does not stop the coordinator's work; it stays named until repaired.
    rewrite(data, {7: b"\xff garbage"})
    with Fleet(tmp_path / "fleet-damaged") as fleet:
        coordinator = fleet.coordinator(data=data)
        history(coordinator.address, "hold", "dave", "--reason", "case 4")
        result = history(coordinator.address, "audit", "verify", check=False)
        assert result.code == 8 and "audit record 7 does not verify" in result.err, result.err
        listing = history(coordinator.address, "audit", "list", check=False)
        assert listing.code == 8 and "audit record 7 cannot be read" in listing.err, listing.err


def _chain(count: int) -> list[tuple[bytes, bytes]]:
    items, prev = [], GENESIS_HASH
    for seq in range(1, count + 1):
        record = seal(seq, seq * 1000, AuditEntry("ops", "hold.set", f"user/u{seq}", {"reason": "r"}), prev)
        items.append((fmt.u64(seq), canonical(record.stored())))
        prev = record.hash
    return items


def test_an_intact_chain_verifies_and_reports_its_head():
    items = _chain(4)
    verdict = verify_records(iter(items))
    assert verdict.ok and verdict.records == 4 and verdict.head_seq == 4
    assert verdict.head_hash == json.loads(items[-1][1])["hash"]
    assert verify_records(iter([])).ok


@pytest.mark.parametrize(
    ("damage", "first_broken"),
    [
        (lambda items: items[:1] + items[2:], 2),  # a record removed
        (lambda items: [items[0], items[2], items[1], items[3]], 2),  # two records swapped
        (lambda items: items[:2] + [(items[2][0], items[2][1].replace(b"u3", b"u9"))] + items[3:], 3),
        (lambda items: items[:3] + [(items[3][0], b"{not json")], 4),
    ],
)
def test_a_damaged_chain_names_its_first_broken_record(damage, first_broken):
    verdict = verify_records(iter(damage(_chain(4))))
    assert not verdict.ok and verdict.first_broken == first_broken, verdict
