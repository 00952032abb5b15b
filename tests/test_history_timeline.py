"""History at the coordinator over real processes: a user's home captured on two devices, one of them
offline for part of the time; the coordinator keeps every version of both, shows them in the order
they were made, lists every version of a file and hands out a file as it was at a point in time."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachepoint.model import LayerKind, Manifest
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, version_pb2
from cachepoint.wire import manifest_digest, manifest_to_bytes
from coordinator.history.times import iso
from tests.fleet import Fleet
from tests.history import USER, history, history_json, make_version, rest, sha256_text, wait_delivered

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)


def test_every_version_from_two_devices_is_kept_in_order_and_each_file_can_be_had_as_it_was(tmp_path):
    desk_home, laptop_home = tmp_path / "desk-home", tmp_path / "laptop-home"
    desk_home.mkdir()
    laptop_home.mkdir()
    made: list[tuple[str, str]] = []  # (device, notes.txt) in the order the versions were made
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(extra=["--http", "127.0.0.1:0"])
        address = coordinator.address
        desk = fleet.cachepoint("desk", address, subscribe=())
        laptop = fleet.cachepoint("laptop", None, subscribe=())  # offline: no coordinator at all

        def capture(node_name: str, home: Path, text: str) -> None:
            (home / "notes.txt").write_text(text)
            make_version(desk if node_name == "desk" else laptop, home, text)
            made.append((node_name, text))

        capture("desk", desk_home, "monday at the desk")
        capture("laptop", laptop_home, "tuesday on the train, offline")
        capture("desk", desk_home, "wednesday at the desk, longer")
        capture("laptop", laptop_home, "thursday offline again")
        wait_delivered(desk)
        assert laptop.status()["outbox_depth"] == 2, "the offline laptop keeps its versions"

        laptop.stop()
        laptop = fleet.cachepoint("laptop", address, subscribe=())  # back online: its outbox drains
        wait_delivered(laptop)
        capture("desk", desk_home, "friday at the desk")
        wait_delivered(desk)

        versions = history_json(address, "timeline", USER)["versions"]
        assert [(v["device"], v["message"]) for v in versions] == made, "in the order made, from both"
        numbers = [v["version"] for v in versions]
        assert numbers != sorted(numbers), "the laptop's versions arrived after the desk's later ones"
        times = [v["created_ns"] for v in versions]
        assert times == sorted(times)
        assert versions[-1]["tags"] == ["latest"]

        # Every version of one file, with the device, size and SHA-256 of each.
        rows = history_json(address, "file", USER, "notes.txt")["versions"]
        assert [(r["device"], r["size"], r["sha256"]) for r in rows] == [
            (device, len(text), sha256_text(text)) for device, text in made
        ]
        assert [r["ref"] for r in rows] == [v["ref"] for v in versions]

        # The file as it was: between two versions, the earlier one's bytes; at a version's own printed
        # time, that version's bytes.
        out = tmp_path / "restored"
        out.mkdir()
        for index, (_, text) in enumerate(made):
            after = times[index + 1] if index + 1 < len(times) else times[index] + 2_000_000
            between = iso((times[index] + after) // 2)
            got = history_json(address, "get", USER, "notes.txt", "--at", between, "-o", out / f"{index}.txt")
            assert (out / f"{index}.txt").read_text() == text
            assert got["ref"] == versions[index]["ref"] and got["sha256"] == sha256_text(text)
        exact = history(address, "get", USER, "notes.txt", "--at", versions[1]["created"])
        assert exact.out == made[1][1], "--at with a printed time includes that version"
        before = history(address, "get", USER, "notes.txt", "--at", iso(times[0] - 1000), check=False)
        assert before.code == 3 and "no version made at or before" in before.err, before.err

        # What changed between the two devices' lines.
        diff = history_json(address, "diff", versions[0]["ref"], versions[1]["ref"])
        assert [c["path"] for c in diff["changed"]] == ["notes.txt"]

        # REST serves the same history.
        base = coordinator.ready["http"]
        status, timeline = rest(base, "GET", f"/v1/history/users/{USER}/timeline")
        assert status == 200 and timeline == history_json(address, "timeline", USER)
        status, body = rest(base, "GET", f"/v1/history/users/{USER}/content/notes.txt?actor=t&at=yesterday")
        assert status == 400, "a malformed time is refused"
        status, body = rest(base, "GET", f"/v1/history/users/{USER}/content/notes.txt?actor=t")
        assert status == 200 and body == made[-1][1].encode()
        status, rows_rest = rest(base, "GET", f"/v1/history/users/{USER}/files/notes.txt")
        assert status == 200 and [r["sha256"] for r in rows_rest["versions"]] == [r["sha256"] for r in rows]


def test_bad_requests_are_refused_by_name_and_the_coordinator_stays_up(tmp_path):
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(extra=["--http", "127.0.0.1:0"])
        address, base = coordinator.address, coordinator.ready["http"]
        cases = [
            (["timeline", "Alice"], 4, "user name 'Alice'"),
            (["timeline", "bob"], 3, "user 'bob' has no layers"),
            (["timeline", "alice", "--from", "yesterday"], 4, "--from 'yesterday'"),
            (["timeline", "alice", "--from", "2026-02-01", "--to", "2026-01-01"], 4, "is after to"),
            (["file", "alice", "a//b"], 4, "empty, '.' or '..' segment"),
            (["hold", "alice", "--reason", "x" * 1001], 4, "the limit is 1000"),
            (["hold", "alice", "--reason", " "], 4, "needs a reason"),
            (["release", "alice"], 3, "not on hold"),
            (["diff", "user/alice/home@1", "nope@@"], 4, "invalid ref"),
            (["audit", "list", "--limit", "20000"], 4, "maximum of 10000"),
        ]
        for args, code, words in cases:
            result = history(address, *args, check=False)
            assert result.code == code and words in result.err, (args, result.code, result.err)
        status, body = rest(base, "PUT", "/v1/history/holds/alice", {"reason": "r"})
        assert status == 400 and "actor is empty" in body["error"]
        status, body = rest(base, "PUT", "/v1/history/holds/alice", {"reason": "r", "actor": "a"})
        assert status == 201 and body["actor"] == "a"
        status, body = rest(base, "PUT", "/v1/history/holds/alice", {"reason": "again", "actor": "b"})
        assert status == 409 and "already on hold: set by a" in body["error"]
        again = history(address, "hold", "alice", "--reason", "again", check=False)
        assert again.code == 4 and "already on hold" in again.err
        status, body = rest(base, "GET", "/v1/history/audit?limit=ten")
        assert status == 400
        assert history_json(address, "audit", "verify")["ok"]
        assert coordinator.running()


def test_the_software_timeline_of_a_capture_shows_in_the_history(tmp_path):
    """Labels and per-class change counts travel with a version (a device's outbox sends them in the
    commit) and the timeline shows them; here the commit is made directly, as an outbox would."""
    manifest = manifest_to_bytes(Manifest(65536, False, ()))
    request = catalog_pb2.CommitRequest(
        layer=f"user/{USER}/home",
        kind=int(LayerKind.USER),
        manifest=catalog_pb2.ManifestBlob(digest=manifest_digest(manifest), manifest=manifest),
        device="desk",
        author=USER,
        message="capture",
        labels=["app installed: Programs/Editor"],
        changes=[
            version_pb2.ClassChanges(file_class="apps", added=12),
            version_pb2.ClassChanges(file_class="data", changed=2),
        ],
    )
    with Fleet(tmp_path / "fleet") as fleet:
        address = fleet.coordinator().address
        fleet.assign(USER, "desk")  # with TLS, a user's versions come from a node assigned to them
        with fleet.channel(address, "node", name="desk") as ch:
            catalog_pb2_grpc.CatalogStub(ch).Commit(request, timeout=10)
        (entry,) = history_json(address, "timeline", USER)["versions"]
        assert entry["labels"] == ["app installed: Programs/Editor"]
        assert entry["changes"] == {
            "apps": {"added": 12, "changed": 0, "removed": 0},
            "data": {"added": 0, "changed": 2, "removed": 0},
        }
        shown = history(address, "timeline", USER).out
        assert "app installed: Programs/Editor" in shown and "apps +12 ~0 -0; data +0 ~2 -0" in shown
