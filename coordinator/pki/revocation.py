"""Revoked principals: DATA/ca/revoked.json, {name: revoked_at (Unix seconds)}.

Revoking a name refuses every certificate of that name issued at or before the revocation (the
issue time is read from the certificate: not_before + BACKDATE, whole seconds), so that enrolling the
name again with a new token gives a certificate that works, while every older one stays refused.
`revoke` writes the file while the coordinator runs; the coordinator looks at its mtime on each call
(one stat) and reads it again when it changed.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from cachepoint.errors import InvalidInput
from cachepoint.trust.identity import write_file
from cachepoint.trust.principal import Principal
from coordinator.pki.ca import CA_DIR

REVOKED_FILE = "revoked.json"


def path_of(data: Path) -> Path:
    return data / CA_DIR / REVOKED_FILE


def read(data: Path) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path_of(data).read_text()).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as err:
        raise InvalidInput(f"cannot read {path_of(data)}: {err}") from err


def revoke(data: Path, name: str, now: float | None = None) -> float:
    """Record ``name`` as revoked now; returns the time recorded. Two revokes at once both land (a
    lock file serialises read-modify-write)."""
    path = path_of(data)
    if not path.parent.is_dir():
        raise InvalidInput(f"{data} has no CA ({path.parent} is missing): nothing to revoke")
    at = time.time() if now is None else now
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        revoked = read(data)
        revoked[name] = at
        write_file(path, json.dumps(revoked, indent=1, sort_keys=True).encode(), 0o644)
    return at


class Revocations:
    """The revoked set as the coordinator sees it, re-read when the file changes."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self._seen: tuple[int, int, int] | None = None
        self.revoked: dict[str, float] = {}

    def refresh(self) -> None:
        try:
            st = os.stat(path_of(self.data))
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._seen:
            self.revoked = read(self.data) if stamp is not None else {}
            self._seen = stamp

    def revoked_at(self, name: str) -> float | None:
        self.refresh()
        return self.revoked.get(name)

    def refuses(self, principal: Principal) -> float | None:
        """When ``principal``'s certificate was revoked, or None when it stands."""
        self.refresh()
        at = self.revoked.get(principal.name)
        if at is None or principal.issued is None:
            return None
        return at if principal.issued.timestamp() <= at else None
