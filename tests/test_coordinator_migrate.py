"""`cachepoint-coordinator migrate`: an embedded coordinator made the way the fleet and history tests
make one (os versions, a user's history from a device, a hold, audit records, a node in the fleet)
copied into PostgreSQL and a block directory; a replica on the same data directory then answers every
question as before, and the node started before goes on working without enrolling again."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from cachepoint.store import format as fmt
from cachepoint.store.store import Store
from coordinator.backends.embedded_to_shared import Migration
from coordinator.history.audit import AuditEntry, AuditLog
from tests.conftest import run_cli
from tests.fleet import (
    BLOCK,
    LAYER,
    Fleet,
    coordinator_cli,
    coordinator_versions,
    free_port,
    publish,
    random_image,
)
from tests.history import USER, history_json, make_version, wait_delivered
from tests.replicas import shared_args

# The one answer that is the serving process's own, not state: when it last heard the node's heartbeat
# (the registry is in memory; the node registers again with whichever coordinator serves).
PER_PROCESS_NODE_FIELDS = ("last_seen",)


def _migrate(data: Path, dsn: str, blocks: Path, *extra: str, check: bool = True) -> Any:
    return coordinator_cli(
        "migrate", "--from-data", str(data), "--to", dsn, "--blocks", blocks.as_uri(), *extra, check=check
    )


def _fleet(address: str) -> dict[str, dict[str, Any]]:
    """`cachepoint-coordinator fleet --json`, the command itself (the nodes by id)."""
    printed = coordinator_cli("fleet", "--coordinator", address, "--json").json()
    return {
        node["node_id"]: {k: v for k, v in node.items() if k not in PER_PROCESS_NODE_FIELDS}
        for node in printed["nodes"]  # type: ignore[index]
    }


def _answers(address: str, out: Path, first_created: str) -> dict[str, Any]:
    """What `history timeline`, `history file`, `history get` (the file's bytes and summary, now and as
    it was at the first version), `fleet --json` and the catalog's os versions answer; asked at the
    same time (each is a child process). Each get is audited: callers order these against the audit."""
    out.mkdir(exist_ok=True)
    calls: dict[str, Callable[[], Any]] = {
        "timeline": lambda: history_json(address, "timeline", USER),
        "file": lambda: history_json(address, "file", USER, "notes.txt"),
        "latest": lambda: history_json(address, "get", USER, "notes.txt", "-o", out / "latest", "--force"),
        "first": lambda: history_json(
            address, "get", USER, "notes.txt", "--at", first_created, "-o", out / "first", "--force"
        ),
        "fleet": lambda: _fleet(address),
        "os_versions": lambda: [
            v.SerializeToString(deterministic=True) for v in coordinator_versions(address, LAYER)
        ],
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        answers = {name: future.result() for name, future in futures.items()}
    answers["bytes"] = [(out / "latest").read_bytes(), (out / "first").read_bytes()]
    return answers


def test_a_migrated_coordinator_answers_as_before_and_its_node_works_on_without_enrolling_again(
    tmp_path: Path, postgres_dsn: str
) -> None:
    data, blocks = tmp_path / "coordinator", tmp_path / "blocks"
    home = tmp_path / "home"
    home.mkdir()
    image = tmp_path / "image"
    listen = f"127.0.0.1:{free_port()}"  # the replica comes back where the node looks for it
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(data=data, listen=listen)
        address = coordinator.address
        admin = tmp_path / "admin"
        fleet.identity(admin, "publisher", "admin")
        for seed in (1, 2):
            random_image(image, 2 * BLOCK, seed=seed)
            publish(admin, address, image, "production")
        desk = fleet.cachepoint("desk", address)  # subscribed to os/x:production
        for n in (1, 2):
            (home / "notes.txt").write_text(f"notes, version {n}")
            make_version(desk, home, f"version {n}")
        history_json(address, "hold", USER, "--reason", "litigation 7", "--actor", "counsel")
        wait_delivered(desk)
        fleet.wait_holds(desk, 2)
        fleet.wait_fleet_holds(address, "desk", f"{LAYER}@2")
        identity = (desk.store / "identity" / "cert.pem").read_bytes()

        first = history_json(address, "timeline", USER)["versions"][0]["created"]
        answers_before = _answers(address, tmp_path / "answers", first)
        audit_before = history_json(address, "audit", "verify")  # last: the gets above are in it
        assert audit_before["ok"] and audit_before["records"] >= 3
        coordinator.stop()

        report = _migrate(data, postgres_dsn, blocks, "--json").json()
        assert report["verified"], report
        assert report["audit"]["target"]["head"] == audit_before["head"]
        families = report["families"]
        assert families["versions"]["records"] == 4 and families["versions"]["ok"]  # os/x@1,2 and alice's
        assert families["holds"]["records"] == 1 and families["audit"]["records"] == audit_before["records"]
        assert report["blocks"]["blocks"] >= 4 and report["blocks"]["verified"] == report["blocks"]["blocks"]
        assert str(data / "ca/") in report["stays_in_data"] and "--catalog" in report["serve"]

        fleet.coordinator(data=data, listen=listen, name="replica", extra=shared_args(postgres_dsn, blocks))
        assert history_json(address, "audit", "verify") == audit_before, "first: a get adds a record"
        fleet.wait_fleet_holds(address, "desk", f"{LAYER}@2")  # the node's heartbeat found the replica
        assert _answers(address, tmp_path / "answers", first) == answers_before

        # The node started before goes on: a publish reaches it, its new version is taken (the
        # assignment and its certificate are those of before), with the identity it had.
        random_image(image, 2 * BLOCK, seed=3)
        publish(admin, address, image, "production")
        fleet.wait_holds(desk, 3)
        (home / "notes.txt").write_text("notes, version 3")
        make_version(desk, home, "version 3")
        wait_delivered(desk)  # the replica took user/alice/home@3 from it
        assert desk.running() and (desk.store / "identity" / "cert.pem").read_bytes() == identity


def test_migrate_refuses_while_a_coordinator_serves_the_data_and_into_a_database_that_holds_records(
    tmp_path: Path, postgres_dsn: str
) -> None:
    data, blocks = tmp_path / "coordinator", tmp_path / "blocks"
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(data=data)
        busy = _migrate(data, postgres_dsn, blocks, check=False)
        assert busy.code == 5 and "stop the coordinator first" in busy.err, busy.err
        coordinator.stop()
    _migrate(data, postgres_dsn, blocks)
    database = postgres_dsn.rsplit("/", 1)[1]

    again = _migrate(data, postgres_dsn, blocks, check=False)
    assert again.code == 4 and "was migrated to" in again.err and database in again.err, again.err
    embedded = coordinator_cli(
        "serve", "--data", str(data), "--listen", "127.0.0.1:0", check=False, timeout=60
    )  # refused before it binds: it must not serve
    assert embedded.code == 4 and "serve it with --catalog" in embedded.err, embedded.err

    other = tmp_path / "other"
    Store.open(other, writable=True, create=True).close()  # another coordinator's (empty) store
    mixed = _migrate(other, postgres_dsn, blocks, check=False)
    assert mixed.code == 4 and "already holds" in mixed.err and database in mixed.err, mixed.err
    assert not (other / "migrated.json").exists()


def test_a_copy_that_differs_from_its_source_does_not_verify_and_names_what_differs(
    tmp_path: Path, postgres_dsn: str
) -> None:
    source = tmp_path / "store"
    image = tmp_path / "image"
    random_image(image, 3 * BLOCK, seed=5)
    run_cli(source, "ingest", LAYER, image)  # versions, manifests and blocks, as a coordinator keeps them
    migration = Migration(source, postgres_dsn, (tmp_path / "blocks").as_uri())
    try:
        migration.open()
        migration.copy_records()
        migration.copy_blocks()
        assert migration.verify().verified
        assert migration.source is not None and migration.target is not None
        assert migration.target.meta(fmt.META_STORE_ID) == migration.source.meta(fmt.META_STORE_ID)
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE records SET value = value || '\\x00'::bytea WHERE family = %s", (fmt.CF_VERSIONS,)
            )
        assert migration.files is not None
        lost = next(iter(migration.source.scan_keys(fmt.CF_BLOCKS)))
        migration.files.path(lost).unlink()
        report = migration.verify()
        migration.finish()
    finally:
        migration.close()
    assert not report.verified
    differing = [f.family for f in report.families if not f.ok]
    assert differing == [fmt.CF_VERSIONS]
    assert report.blocks.missing == [f"sha256:{lost.hex()}"] and report.blocks.verified == 2
    assert not (source / "migrated.json").exists(), "an unverified copy does not mark the source"


def test_an_interrupted_migrate_is_resumed_by_running_it_again_and_a_verified_one_is_never_copied_over(
    tmp_path: Path, postgres_dsn: str
) -> None:
    source, blocks = tmp_path / "store", tmp_path / "blocks"
    image = tmp_path / "image"
    random_image(image, 24 * BLOCK, seed=6)
    run_cli(source, "ingest", LAYER, image)
    # A run stopped partway (as Ctrl-C leaves it): the target claimed, its records and 10 blocks in.
    partial = Migration(source, postgres_dsn, blocks.as_uri())
    try:
        partial.open()
        partial.copy_records()
        assert partial.source is not None and partial.files is not None
        firsts = [(bytes(d), bytes(v)) for d, v in partial.source.scan(fmt.CF_BLOCKS)][:10]
        partial.files.put_many(firsts)
        damaged = partial.files.path(firsts[3][0])  # one copy the interruption left bad, whole length
    finally:
        partial.close()
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))

    resumed = _migrate(source, postgres_dsn, blocks, "--json", check=False)
    assert resumed.code == 8, resumed.err  # the bad copy is found, and removed
    report = resumed.json()
    assert report["resumed_from"] and report["blocks"]["already_there"] == 10
    assert report["blocks"]["first_corrupt"] == [f"sha256:{firsts[3][0].hex()}"] and not damaged.exists()
    assert "migrate again" in resumed.err and not (source / "migrated.json").exists()

    again = _migrate(source, postgres_dsn, blocks, "--json").json()
    assert again["verified"] and again["blocks"]["already_there"] == again["blocks"]["blocks"] - 1
    assert (source / "migrated.json").exists()

    # Verified, then the source's note lost: a target that may be in service is never copied over.
    (source / "migrated.json").unlink()
    refused = _migrate(source, postgres_dsn, blocks, check=False)
    assert refused.code == 4 and "verified at" in refused.err, refused.err


def test_a_source_whose_audit_chain_does_not_verify_is_refused_before_anything_is_copied(
    tmp_path: Path, postgres_dsn: str
) -> None:
    source = tmp_path / "coordinator"
    with Store.open(source, writable=True, create=True) as store:
        audit = AuditLog(store.db)
        audit.append(
            [
                AuditEntry("counsel", "hold.set", "user/alice"),
                AuditEntry("judge", "hold.release", "user/alice"),
            ]
        )
        key, raw = next(iter(store.db.scan(fmt.CF_AUDIT)))
        changed = json.loads(raw) | {"actor": "someone else"}  # its hash no longer matches
        batch = store.db.batch()
        batch.put(key, json.dumps(changed).encode(), store.db.handle[fmt.CF_AUDIT])
        store.db.write(batch, sync=True)
    refused = _migrate(source, postgres_dsn, tmp_path / "blocks", check=False)
    assert refused.code == 8 and "audit log" in refused.err and "record 1" in refused.err, refused.err
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('records')").fetchone()
    assert row is not None and row[0] is None, "nothing was written to the database"
    assert not (tmp_path / "blocks").exists()
