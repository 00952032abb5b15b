"""Legal holds: while a user is on hold, none of their versions (user/NAME/...) is deleted, whatever
the retention policy says, and so none of their blocks either (a block GC keeps every block a
remaining version references). Setting and releasing a hold are audited in the same batch."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from cachepoint.errors import AlreadyExists, InvalidInput, NotFound
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB
from coordinator.history.audit import HOLD_RELEASE, HOLD_SET, AuditEntry, AuditLog, check_actor
from coordinator.history.times import iso
from coordinator.history.users import user_subject, validate_user

HOLD_FORMAT = 1
MAX_REASON = 1000


class AlreadyHeld(AlreadyExists):
    """user {!r} is already on hold: set by {} at {} ({!r}); release it first to set another reason"""


class NotHeld(NotFound):
    """user {!r} is not on hold"""


@dataclass(frozen=True, slots=True)
class Hold:
    user: str
    reason: str
    actor: str
    set_ns: int

    def as_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "reason": self.reason,
            "actor": self.actor,
            "set": iso(self.set_ns),
            "set_ns": self.set_ns,
        }


def _check_reason(reason: str) -> str:
    if not reason.strip():
        raise InvalidInput("a hold needs a reason (--reason): it is recorded with the hold and audited")
    if len(reason) > MAX_REASON:
        raise InvalidInput(f"hold reason: {len(reason)} characters, the limit is {MAX_REASON}")
    return reason


class Holds:
    def __init__(self, db: StoreDB, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    def get(self, user: str) -> Hold | None:
        raw = self.db.cf[fmt.CF_HOLDS].get(user.encode()) if fmt.CF_HOLDS in self.db.cf else None
        if raw is None:
            return None
        data = json.loads(raw)
        return Hold(data["user"], data["reason"], data["actor"], data["set_ns"])

    def all(self) -> list[Hold]:
        holds = []
        for _, raw in self.db.scan(fmt.CF_HOLDS):
            data = json.loads(raw)
            holds.append(Hold(data["user"], data["reason"], data["actor"], data["set_ns"]))
        return holds

    def held_users(self) -> set[str]:
        return {key.decode() for key in self.db.scan_keys(fmt.CF_HOLDS)}

    def set(self, user: str, reason: str, actor: str) -> Hold:
        """Callers serialise holds with deletions (the coordinator's catalog write lock), so a GC
        never deletes a version of a user held while it runs."""
        validate_user(user)
        _check_reason(reason)
        check_actor(actor)
        existing = self.get(user)
        if existing is not None:
            raise AlreadyHeld(user, existing.actor, iso(existing.set_ns), existing.reason)
        hold = Hold(user, reason, actor, time.time_ns())
        record = {"format": HOLD_FORMAT, **{k: v for k, v in hold.as_json().items() if k != "set"}}
        batch = self.db.batch()
        batch.put(user.encode(), json.dumps(record).encode(), self.db.handle[fmt.CF_HOLDS])
        entry = AuditEntry(actor, HOLD_SET, user_subject(user), {"reason": reason})
        self.audit.append([entry], batch)
        return hold

    def release(self, user: str, actor: str) -> Hold:
        validate_user(user)
        check_actor(actor)
        hold = self.get(user)
        if hold is None:
            raise NotHeld(user)
        batch = self.db.batch()
        batch.delete(user.encode(), self.db.handle[fmt.CF_HOLDS])
        details = {"reason": hold.reason, "held_by": hold.actor, "held_since_ns": hold.set_ns}
        self.audit.append([AuditEntry(actor, HOLD_RELEASE, user_subject(user), details)], batch)
        return hold
