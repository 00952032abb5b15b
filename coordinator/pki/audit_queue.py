"""Audit records of the commands an admin runs on the coordinator's data directory (`enroll`, `revoke`,
`assign`, `unassign`): the command cannot open the store a running coordinator holds, so it leaves each
record as a file in DATA/audit-queue/, and the coordinator moves them into its audit log, at start and
every QUEUE_CHECK seconds while it runs (a stopped coordinator does so at its next start).

A queued record names the operating-system user who ran the command (``os:NAME``): the data directory
is the admin's, and whoever can write it is acting as one. Its time is the command's, kept in the
record's details (``at``); the log's own time is when the coordinator appended it. A file is removed
after its record is in the log (synced): a crash between the two appends it again at the next drain,
so the log holds each queued record at least once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachepoint.atomic import TEMP_PREFIX
from cachepoint.trust.identity import write_file
from coordinator.history.audit import AuditEntry, AuditLog, recorded_actor

log = logging.getLogger("coordinator.pki")
QUEUE_DIR = "audit-queue"
QUEUE_CHECK = 1.0
DRAIN_MAX = 1000  # files per drain: a flood of queued records does not hold the log for long

# Actions (coordinator/history/audit.py's vocabulary, for enrollment and trust).
TOKEN_ISSUED = "enroll.token"  # subject: the principal's name
ENROLLED = "enroll.used"  # subject: the principal's name
RENEWED = "cert.renewed"  # subject: the principal's name
REVOKED = "principal.revoked"  # subject: the principal's name
ASSIGNED = "assignment.add"  # subject user/NAME
UNASSIGNED = "assignment.remove"  # subject user/NAME
CA_ROTATED = "ca.rotate"  # subject "ca"
CA_RETIRED = "ca.retire"  # subject "ca"


def os_actor() -> str:
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = f"uid {os.geteuid()}"
    return recorded_actor(f"os:{name}")


def queue(data: Path, action: str, subject: str, details: dict[str, Any]) -> Path:
    """Leave one record for the coordinator to append; returns its file."""
    directory = data / QUEUE_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    record = {
        "actor": os_actor(),
        "action": action,
        "subject": subject,
        "details": {**details, "at": time.time()},
    }
    path = directory / f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.json"
    write_file(path, json.dumps(record, sort_keys=True).encode(), 0o600)
    return path


def drain(data: Path, audit: AuditLog) -> int:
    """Append every queued record, oldest first, in one batch; remove their files. Returns how many."""
    directory = data / QUEUE_DIR
    try:
        # A record being written has a temporary name that may also end in .json: never take it.
        queued = (n for n in os.listdir(directory) if n.endswith(".json") and not n.startswith(TEMP_PREFIX))
        names = sorted(queued)[:DRAIN_MAX]
    except FileNotFoundError:
        return 0
    entries, done = [], []
    for name in names:
        path = directory / name
        try:
            raw = json.loads(path.read_text())
            entries.append(
                AuditEntry(
                    recorded_actor(str(raw["actor"])),
                    str(raw["action"]),
                    str(raw["subject"]),
                    dict(raw.get("details") or {}),
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.error("queued audit record %s is unreadable (%s): left in place", path, err)
            continue
        done.append(path)
    if entries:
        audit.append(entries)
    for path in done:
        path.unlink(missing_ok=True)
    return len(entries)


async def keep_draining(data: Path, audit: AuditLog, every: float = QUEUE_CHECK) -> None:
    while True:
        try:
            await asyncio.to_thread(drain, data, audit)
        except Exception:
            log.exception("moving queued audit records into the log failed; trying again")
        await asyncio.sleep(every)


Recorder = Callable[[str, str, str, dict[str, Any]], None]
"""(actor, action, subject, details): an audit record the serving coordinator writes itself."""
