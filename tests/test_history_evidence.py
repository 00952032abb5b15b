"""Evidence exports and paths: an export holds a user's file versions, a SHA-256 manifest, the
timeline and the audit records about the user; it round-trips through `verify-export`, and any
change to it is named. Neither `history get` nor `export` writes outside the destination, and export
members have safe names whatever the user's file names are."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

import grpc
import pytest

from cachepoint.v1 import history_pb2, history_pb2_grpc
from coordinator.history.audit import GENESIS_HASH, AuditEntry, record_from_json, seal
from coordinator.history.evidence import HashingReader, is_safe_member, member_name
from coordinator.history.files import CHUNK_BYTES
from tests import tls
from tests.fleet import Fleet
from tests.history import (
    USER,
    history,
    history_json,
    make_version,
    offline,
    rest,
    sha256_text,
    wait_delivered,
)

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

ODD_NAMES = {
    "docs/report final.txt": "quarterly",
    "back\\slash.txt": "windows path?",
    "naïve ☃.txt": "unicode",
    "esc\x1b[2Jape.txt": "a terminal escape in a name",
    "100%.txt": "percent",
    "-rf": "looks like a flag",
    ".hidden": "dot file",
}


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        found = {}
        for m in tar.getmembers():
            handle = tar.extractfile(m)
            found[m.name] = handle.read() if handle else b""
        return found


def write_tar(path: Path, contents: dict[str, bytes], links: dict[str, str] | None = None) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def verify(tar_path: Path) -> tuple[int, dict[str, object], str]:
    result = offline("verify-export", tar_path, "--json", check=False)
    return result.code, dict(json.loads(result.out)), result.err


@pytest.fixture
def fleet_with_history(tmp_path):
    """A coordinator holding two versions of alice's home made on a device, with odd file names."""
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(extra=["--http", "127.0.0.1:0"])
        desk = fleet.cachepoint("desk", coordinator.address, subscribe=())
        for path, text in ODD_NAMES.items():
            (home / path).write_text(text)
        (home / "notes.txt").write_text("first")
        make_version(desk, home, "one")
        (home / "notes.txt").write_text("second, longer")
        os.symlink("notes.txt", home / "link")
        make_version(desk, home, "two")
        wait_delivered(desk)
        yield coordinator


def test_an_export_round_trips_through_verify_export_and_every_change_to_it_is_named(
    fleet_with_history, tmp_path
):
    address = fleet_with_history.address
    history(address, "hold", USER, "--reason", "subpoena 4", "--actor", "counsel")
    versions = history_json(address, "timeline", USER)["versions"]
    out = tmp_path / "evidence" / "alice.tar"
    out.parent.mkdir()
    summary = history_json(address, "export", USER, out, "--actor", "counsel")
    assert summary["ok"] and summary["files"] > len(ODD_NAMES)
    assert sorted(os.listdir(out.parent)) == ["alice.tar"], "no partial files left behind"
    code, check, _ = verify(out)
    assert code == 0 and check["ok"] and check["user"] == USER

    contents = members(out)
    assert all(is_safe_member(name) and name.isascii() and name.isprintable() for name in contents)
    manifest = json.loads(contents["manifest.json"])
    listed = {(row["version"], row["path"]): row for row in manifest["files"]}
    for path, text in ODD_NAMES.items():
        row = listed[(versions[0]["ref"], path)]
        assert row["sha256"] == sha256_text(text) and contents[row["member"]] == text.encode()
    second = listed[(versions[1]["ref"], "notes.txt")]
    assert contents[second["member"]] == b"second, longer"
    assert listed[(versions[1]["ref"], "link")]["target"] == "notes.txt"
    unchanged = listed[(versions[1]["ref"], "-rf")]
    assert unchanged["member"] == listed[(versions[0]["ref"], "-rf")]["member"], "stored once"
    timeline = json.loads(contents["timeline.json"])
    assert [v["ref"] for v in timeline["versions"]] == [v["ref"] for v in versions]
    actions = [r["action"] for r in json.loads(contents["audit.json"])]
    assert actions[0] == "hold.set" and actions[-1] == "export"

    # A file's bytes changed (same size): the member and its digest are named.
    victim = second["member"]
    tampered = tmp_path / "tampered.tar"
    write_tar(tampered, {**contents, victim: b"SECOND, LONGER"})
    code, check, err = verify(tampered)
    assert code == 8 and any(victim in p and "the manifest says" in p for p in check["problems"]), check
    assert victim in err

    # The manifest changed without its digest.
    doctored = dict(manifest, exported_by="someone else")
    write_tar(tampered, {**contents, "manifest.json": json.dumps(doctored).encode()})
    code, check, _ = verify(tampered)
    assert code == 8 and "manifest.json has SHA-256" in check["problems"][0]

    # A member smuggled in with a climbing name, and a symlink member.
    write_tar(tampered, {**contents, "../evil.sh": b"rm -rf /"}, links={"files/link": "/etc/passwd"})
    code, check, _ = verify(tampered)
    assert code == 8
    assert any("'../evil.sh' has an unsafe" in p for p in check["problems"]), check
    assert any("'files/link' is not a regular file" in p for p in check["problems"]), check

    # An audit record rewritten in the export.
    records = json.loads(contents["audit.json"])
    records[0]["actor"] = "mallory"
    write_tar(tampered, {**contents, "audit.json": json.dumps(records).encode()})
    code, check, _ = verify(tampered)
    assert any("audit.json" in p for p in check["problems"]) and code == 8

    # An export never overwrites a file; a time range selects its versions.
    again = history(address, "export", USER, out, check=False)
    assert again.code == 4 and "exists" in again.err
    ranged = tmp_path / "evidence" / "second-only.tar"
    history(address, "export", USER, ranged, "--from", versions[1]["created"])
    assert {row["version"] for row in json.loads(members(ranged)["manifest.json"])["files"]} == {
        versions[1]["ref"]
    }
    assert verify(ranged)[0] == 0
    assert verify(tmp_path / "nope.tar")[0] == 8

    # REST makes the same kind of export.
    status, body = rest(
        fleet_with_history.ready["http"], "POST", f"/v1/history/users/{USER}/export", {"actor": "t"}
    )
    assert status == 200 and isinstance(body, bytes)
    (tmp_path / "rest.tar").write_bytes(body)
    assert verify(tmp_path / "rest.tar")[1]["files"] == summary["files"]


def test_history_get_never_writes_outside_its_destination(fleet_with_history, tmp_path):
    address = fleet_with_history.address
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")

    for bad in ("../outside.txt", "/etc/passwd", "docs/../../outside.txt", "docs//x"):
        result = history(address, "get", USER, bad, "-o", dest, check=False)
        assert result.code == 4, (bad, result.err)
    # A symlink waiting at the destination name is refused, and with --force replaced: never followed.
    os.symlink(outside, dest / "notes.txt")
    refused = history(address, "get", USER, "notes.txt", "-o", dest, check=False)
    assert refused.code == 4 and "is a symlink" in refused.err and (dest / "notes.txt").is_symlink()
    history(address, "get", USER, "notes.txt", "-o", dest, "--force")
    assert outside.read_text() == "untouched"
    assert not (dest / "notes.txt").is_symlink() and (dest / "notes.txt").read_text() == "second, longer"
    # A file in a subdirectory is written under its own name, inside the destination.
    history(address, "get", USER, "docs/report final.txt", "-o", dest)
    assert sorted(os.listdir(dest)) == ["notes.txt", "report final.txt"]
    symlink = history(address, "get", USER, "link", "-o", dest, check=False)
    assert symlink.code == 4 and "is a symlink" in symlink.err
    # A trailing slash names a directory: made when missing (its parent must exist), never a file.
    history(address, "get", USER, "notes.txt", "-o", f"{tmp_path / 'restored'}/")
    assert (tmp_path / "restored" / "notes.txt").read_text() == "second, longer"
    orphan = history(address, "get", USER, "notes.txt", "-o", f"{tmp_path / 'no' / 'restored'}/", check=False)
    assert orphan.code == 4 and f"its parent {tmp_path / 'no'} does not exist" in orphan.err
    assert not (tmp_path / "no").exists()

    # The same refusals over gRPC and REST, and the coordinator keeps serving.
    with tls.channel(address) as ch:
        stub = history_pb2_grpc.HistoryStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            next(
                iter(stub.GetFile(history_pb2.GetFileRequest(user=USER, path="../x", actor="t"), timeout=10))
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    base = fleet_with_history.ready["http"]
    status, body = rest(base, "GET", f"/v1/history/users/{USER}/content/..%2F..%2Fetc%2Fpasswd?actor=t")
    assert status in (400, 404) and "error" in body
    assert fleet_with_history.running() and history_json(address, "timeline", USER)["versions"]


def test_member_names_are_percent_encoded_and_never_climb():
    name = member_name("user/alice/home", "alice", 3, "a b/..c/%/\\/\x1b/é")
    assert name == "files/home@3/a b/..c/%25/%5C/%1B/%C3%A9"
    assert is_safe_member(name)
    for bad in ("../x", "files/../x", "/etc/passwd", "files/a//b", "files/./a", "files/a\\b", "other.json"):
        assert not is_safe_member(bad), bad


def test_an_export_or_audit_record_of_an_unknown_format_is_refused_by_name(tmp_path):
    manifest = json.dumps({"format": 2, "members": [], "files": []}).encode()
    digest = hashlib.sha256(manifest).hexdigest()
    future = tmp_path / "future.tar"
    write_tar(future, {"manifest.json": manifest, "manifest.sha256": f"{digest}  manifest.json\n".encode()})
    code, check, _ = verify(future)
    assert code == 8 and "format 2, this coordinator reads [1]" in check["problems"][0]
    record = seal(1, 1, AuditEntry("a", "hold.set", "user/x"), GENESIS_HASH).stored()
    with pytest.raises(ValueError, match=r"format 2, supported \[1\]"):
        record_from_json({**record, "format": 2})


def test_export_members_are_streamed_whole_across_chunk_boundaries():
    data = random.Random(1).randbytes(3 * CHUNK_BYTES + 1)
    reader = HashingReader(iter([data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]))
    pieces = []
    while piece := reader.read(16 * 1024):  # as tarfile reads
        pieces.append(piece)
    assert b"".join(pieces) == data and reader.digest.hexdigest() == hashlib.sha256(data).hexdigest()
