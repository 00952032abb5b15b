"""Evidence exports: one tar holding a user's file versions over a time range, what they are, and the
record of who did what to them.

Members (regular files only, names relative and percent-encoded, never '..'):

  files/<layer>@<n>/<path>  the bytes of a file as version n of user/NAME/<layer> held it; a content
                            seen before in the export is not stored again (the manifest points at
                            the member that holds it)
  timeline.json             the user's versions in the range (as `history timeline --json`)
  audit.json                every audit record about the user up to and including this export's
  manifest.json             format, user, range, who exported and when, the audit head, the SHA-256
                            and size of every other member, and every file of every version with
                            its SHA-256 and the member holding its bytes
  manifest.sha256           "<hex>  manifest.json" (``sha256sum -c`` reads it too)

``verify_evidence`` recomputes every digest from the tar alone (no coordinator needed) and names
each member, file or record that differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import quote

from cachepoint.model import EntryType
from coordinator.history.audit import AuditRecord, record_from_json
from coordinator.history.files import FileReader, content_key
from coordinator.history.query import Queries, Timeline
from coordinator.history.times import iso
from coordinator.history.users import layer_prefix

EVIDENCE_FORMAT = 1
SUPPORTED_FORMATS = frozenset({1})
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
TIMELINE = "timeline.json"
AUDIT = "audit.json"
FILES_DIR = "files"
TOP_LEVEL = frozenset({MANIFEST, MANIFEST_DIGEST, TIMELINE, AUDIT})
# Besides letters, digits and "_.-~", which quote() never encodes: kept readable, harmless everywhere.
_SAFE_CHARS = " +,=@()!'"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-~ +,=@()!'%/]+$")
MAX_METADATA_MEMBER = 256 * 1024 * 1024  # manifest, timeline and audit are read into memory
READ_CHUNK = 1024 * 1024


def member_name(layer: str, user: str, number: int, path: str) -> str:
    """``files/home@3/docs/report%20final.txt``: every segment percent-encoded apart from a safe set,
    so a name can hold no control character, backslash or drive letter, and never '..' (manifest paths
    have no '.', '..' or empty segments, and '%' itself is encoded)."""
    suffix = layer[len(layer_prefix(user)) :]
    segments = "/".join(quote(segment, safe=_SAFE_CHARS) for segment in path.split("/"))
    return f"{FILES_DIR}/{quote(suffix, safe='')}@{number}/{segments}"


def is_safe_member(name: str) -> bool:
    if name in TOP_LEVEL:
        return True
    if not name.startswith(FILES_DIR + "/") or not _SAFE_NAME.match(name):
        return False
    return all(segment not in ("", ".", "..") for segment in name.split("/"))


class HashingReader(io.RawIOBase):
    """A file object over an iterator of chunks that hashes what is read (tarfile reads members
    through ``read``, 16 KiB at a time: the current chunk is sliced by offset, never copied whole)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = b""
        self._offset = 0
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        remaining = size if size >= 0 else None  # None: everything that is left
        while remaining is None or remaining > 0:
            if self._offset >= len(self._chunk):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._chunk, self._offset = chunk, 0
            end = len(self._chunk) if remaining is None else self._offset + remaining
            part = self._chunk[self._offset : end]
            self._offset += len(part)
            if remaining is not None:
                remaining -= len(part)
            parts.append(part)
        data = b"".join(parts)
        self.digest.update(data)
        self.size += len(data)
        return data


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644  # never the file's own bits: an extracted export carries no setuid or exec bits
    info.type = tarfile.REGTYPE
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> dict[str, Any]:
    tar.addfile(_info(name, len(data), mtime), io.BytesIO(data))
    return {"name": name, "sha256": f"sha256:{hashlib.sha256(data).hexdigest()}", "size": len(data)}


@dataclass(frozen=True, slots=True)
class ExportRequest:
    user: str
    from_ns: int
    to_ns: int
    actor: str
    exported_ns: int
    coordinator: str  # the store id of the coordinator that made it


@dataclass
class ExportSummary:
    versions: int = 0
    files: int = 0
    members: int = 0
    bytes: int = 0

    def as_json(self) -> dict[str, int]:
        return {"versions": self.versions, "files": self.files, "members": self.members, "bytes": self.bytes}


def write_evidence(
    out: IO[bytes],
    request: ExportRequest,
    timeline: Timeline,
    audit_records: list[AuditRecord],
    queries: Queries,
    files: FileReader,
) -> ExportSummary:
    summary = ExportSummary(versions=len(timeline.entries))
    members: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []
    stored: dict[bytes, tuple[str, str]] = {}  # content key -> (member, sha256)
    mtime = request.exported_ns / 1e9
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in timeline.entries:
            info = entry.version
            manifest = queries.manifest(info.manifest_digest)
            for item in sorted(manifest.entries, key=lambda e: e.path):
                row: dict[str, Any] = {
                    "version": info.ref,
                    "created_ns": info.created_ns,
                    "device": info.device,
                    "path": item.path,
                    "type": item.type.name.lower(),
                    "mode": oct(item.mode),
                    "mtime_ns": item.mtime_ns,
                }
                if item.type == EntryType.SYMLINK:
                    listed.append({**row, "target": item.target})
                    continue
                if item.type != EntryType.FILE:
                    continue
                key = content_key(item, manifest.block_size)
                if key not in stored:
                    name = member_name(info.layer, request.user, info.number, item.path)
                    reader = HashingReader(files.chunks(item, manifest.block_size))
                    tar.addfile(_info(name, item.size, item.mtime_ns / 1e9), reader)
                    sha = f"sha256:{reader.digest.hexdigest()}"
                    files.remember(item, manifest.block_size, sha.removeprefix("sha256:"))
                    stored[key] = (name, sha)
                    members.append({"name": name, "sha256": sha, "size": item.size})
                    summary.bytes += item.size
                member, sha = stored[key]
                listed.append({**row, "size": item.size, "sha256": sha, "member": member})
        timeline_bytes = json.dumps(timeline.as_json(), indent=2, sort_keys=True).encode()
        members.append(_add_bytes(tar, TIMELINE, timeline_bytes, mtime))
        audit_bytes = json.dumps([r.as_json() for r in audit_records], indent=2, sort_keys=True).encode()
        members.append(_add_bytes(tar, AUDIT, audit_bytes, mtime))
        head = audit_records[-1] if audit_records else None
        manifest_doc = {
            "format": EVIDENCE_FORMAT,
            "kind": "cachepoint evidence export",
            "user": request.user,
            "from": iso(request.from_ns) if request.from_ns else None,
            "from_ns": request.from_ns,
            "to": iso(request.to_ns) if request.to_ns else None,
            "to_ns": request.to_ns,
            "exported": iso(request.exported_ns),
            "exported_ns": request.exported_ns,
            "exported_by": request.actor,
            "coordinator": request.coordinator,
            "last_audit_record": {"seq": head.seq, "hash": head.hash} if head else None,
            "members": members,
            "files": listed,
        }
        manifest_bytes = json.dumps(manifest_doc, indent=2, sort_keys=True).encode()
        _add_bytes(tar, MANIFEST, manifest_bytes, mtime)
        digest_line = f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n".encode()
        _add_bytes(tar, MANIFEST_DIGEST, digest_line, mtime)
    summary.files = len(listed)
    summary.members = len(members) + 2
    return summary


# -- verification --------------------------------------------------------------------------------


@dataclass
class EvidenceCheck:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    user: str = ""
    files: int = 0
    members: int = 0
    audit_records: int = 0

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "user": self.user or None,
            "files": self.files,
            "members": self.members,
            "audit_records": self.audit_records,
        }


@dataclass(frozen=True, slots=True)
class _Seen:
    sha256: str
    size: int


def _read_members(path: str, check: EvidenceCheck) -> tuple[dict[str, _Seen], dict[str, bytes]]:
    """Digest of every member, and the bytes of the top-level ones; unsafe or odd members are
    problems (never extracted anywhere)."""
    seen: dict[str, _Seen] = {}
    kept: dict[str, bytes] = {}
    try:
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as err:
        check.problem(f"{path} is not a readable tar file: {err}")
        return seen, kept
    with tar:
        try:
            for member in tar:
                name = member.name
                if not is_safe_member(name):
                    check.problem(f"member {name!r} has an unsafe or unexpected name")
                    continue
                if not member.isfile():
                    check.problem(f"member {name!r} is not a regular file (type {member.type!r})")
                    continue
                if name in seen:
                    check.problem(f"member {name!r} appears twice")
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                digest, size, body = hashlib.sha256(), 0, []
                keep = name in TOP_LEVEL and member.size <= MAX_METADATA_MEMBER
                while chunk := handle.read(READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if keep:
                        body.append(chunk)
                seen[name] = _Seen(f"sha256:{digest.hexdigest()}", size)
                if keep:
                    kept[name] = b"".join(body)
        except (OSError, tarfile.TarError, EOFError) as err:
            check.problem(f"the tar file is damaged after {len(seen)} members: {err}")
    check.members = len(seen)
    return seen, kept


def _check_manifest_digest(kept: dict[str, bytes], check: EvidenceCheck) -> dict[str, Any] | None:
    if MANIFEST not in kept:
        check.problem(f"{MANIFEST} is missing")
        return None
    line = kept.get(MANIFEST_DIGEST, b"").decode(errors="replace").split()
    actual = hashlib.sha256(kept[MANIFEST]).hexdigest()
    if not line:
        check.problem(f"{MANIFEST_DIGEST} is missing")
    elif line[0] != actual:
        check.problem(f"{MANIFEST} has SHA-256 {actual}, {MANIFEST_DIGEST} says {line[0]}")
    try:
        manifest = json.loads(kept[MANIFEST])
    except ValueError as err:
        check.problem(f"{MANIFEST} is not JSON: {err}")
        return None
    if not isinstance(manifest, dict) or manifest.get("format") not in SUPPORTED_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        check.problem(f"{MANIFEST}: format {found!r}, this coordinator reads {sorted(SUPPORTED_FORMATS)}")
        return None
    return manifest


def _check_members(manifest: dict[str, Any], seen: dict[str, _Seen], check: EvidenceCheck) -> dict[str, str]:
    listed: dict[str, str] = {}
    for item in manifest.get("members") or []:
        name, sha, size = item.get("name"), item.get("sha256"), item.get("size")
        listed[name] = sha
        actual = seen.get(name)
        if actual is None:
            check.problem(f"member {name!r} is in the manifest but not in the tar")
        elif actual.sha256 != sha:
            check.problem(f"member {name!r} has {actual.sha256}, the manifest says {sha}")
        elif actual.size != size:
            check.problem(f"member {name!r} has {actual.size} bytes, the manifest says {size}")
    for name in seen:
        if name not in listed and name not in (MANIFEST, MANIFEST_DIGEST):
            check.problem(f"member {name!r} is in the tar but not in the manifest")
    return listed


def _check_files(
    manifest: dict[str, Any], listed: dict[str, str], refs: set[str], check: EvidenceCheck
) -> None:
    for row in manifest.get("files") or []:
        check.files += 1
        where = f"{row.get('path')!r} of {row.get('version')}"
        if row.get("version") not in refs:
            check.problem(f"{where} is not in {TIMELINE}")
        if row.get("type") != "file":
            continue
        member = row.get("member")
        if member not in listed:
            check.problem(f"{where}: its member {member!r} is not in the manifest")
        elif listed[member] != row.get("sha256"):
            check.problem(
                f"{where}: listed as {row.get('sha256')}, its member {member!r} has {listed[member]}"
            )


def _timeline_refs(kept: dict[str, bytes], check: EvidenceCheck) -> set[str]:
    try:
        timeline = json.loads(kept.get(TIMELINE, b""))
        return {v["ref"] for v in timeline["versions"]}
    except (ValueError, KeyError, TypeError) as err:
        check.problem(f"{TIMELINE} is missing or not a timeline: {err}")
        return set()


def _check_audit(kept: dict[str, bytes], check: EvidenceCheck) -> None:
    try:
        rows = json.loads(kept.get(AUDIT, b""))
        assert isinstance(rows, list)
    except (ValueError, AssertionError) as err:
        check.problem(f"{AUDIT} is missing or not a list of records: {err}")
        return
    previous: AuditRecord | None = None
    for index, row in enumerate(rows):
        seq = row.get("seq") if isinstance(row, dict) else None
        try:
            record = record_from_json({k: v for k, v in row.items() if k != "time"})
        except (ValueError, AttributeError) as err:
            check.problem(f"{AUDIT} record {seq or f'#{index + 1}'} is malformed: {err}")
            continue
        if not record.hash_matches():
            check.problem(f"{AUDIT} record {record.seq} does not match its hash")
        elif previous is not None and previous.seq + 1 == record.seq and record.prev_hash != previous.hash:
            check.problem(f"{AUDIT} record {record.seq} does not chain to record {previous.seq}")
        previous = record
        check.audit_records += 1


def verify_evidence(path: str) -> EvidenceCheck:
    check = EvidenceCheck()
    seen, kept = _read_members(path, check)
    if not seen:
        if check.ok:
            check.problem(f"{path} holds no members")
        return check
    manifest = _check_manifest_digest(kept, check)
    if manifest is None:
        return check
    check.user = str(manifest.get("user") or "")
    listed = _check_members(manifest, seen, check)
    _check_files(manifest, listed, _timeline_refs(kept, check), check)
    _check_audit(kept, check)
    return check
