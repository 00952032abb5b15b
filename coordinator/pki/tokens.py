"""Join-token records: DATA/ca/tokens/<sha256 of the secret>.json, written by `enroll` (which may run
while the coordinator does, so not in its locked store) and spent by the Enrollment service.

Spending is one rename into tokens/used/: of two enrollments racing with one token, only one rename
succeeds, so a token is single-use by the file system's own atomicity, across processes too.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cachepoint.trust.identity import write_file
from cachepoint.trust.principal import Role, check_name
from coordinator.pki.ca import CA_DIR

TOKENS_DIR = "tokens"
USED_DIR = "used"
DEFAULT_TTL = 3600.0
PURGE_AFTER = 7 * 86400.0  # spent and expired records are kept a week: who enrolled when


class TokenRefused(Exception):
    """Why a join token cannot be spent (the message goes back to the enrolling machine)."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    name: str
    role: str
    site: str
    expires_at: float
    created_at: float

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        Role.parse(self.role)
        if self.site:
            check_name(self.site, "site")


def _dir(data: Path) -> Path:
    return data / CA_DIR / TOKENS_DIR


def record(data: Path, secret_hash: str, entry: TokenRecord) -> None:
    directory = _dir(data)
    (directory / USED_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file(directory / f"{secret_hash}.json", json.dumps(asdict(entry)).encode(), 0o600)
    purge(data)


def _read(path: Path) -> TokenRecord:
    return TokenRecord(**json.loads(path.read_text()))


def token_dir(data: Path) -> Path:
    """Where the token records of ``data`` are (unspent ones; spent ones below, in used/)."""
    return _dir(data)


read_record = _read


def spend(data: Path, secret_hash: str, now: float | None = None) -> TokenRecord:
    """The record of a valid token, now spent; TokenRefused when unknown, used or expired."""
    now = time.time() if now is None else now
    directory = _dir(data)
    live = directory / f"{secret_hash}.json"
    used = directory / USED_DIR / f"{secret_hash}.json"
    try:
        entry = _read(live)
        if entry.expires_at < now:
            ago = now - entry.expires_at
            raise TokenRefused(f"the join token for {entry.name!r} expired {ago:.0f} s ago: make a new one")
        live.rename(used)
    except FileNotFoundError:
        if used.exists():
            spent = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(used.stat().st_mtime))
            raise TokenRefused(
                f"this join token was already used (at {spent} UTC): a token enrolls one machine once"
            ) from None
        raise TokenRefused("this join token is unknown to the coordinator (make one with `enroll`)") from None
    os.utime(used)  # its mtime now says when it was spent
    return entry


class FileTokens:
    """The token records of DATA/ca/tokens/, as the Enrollment service spends them."""

    def __init__(self, data: Path) -> None:
        self.data = data

    def spend(self, secret_hash: str) -> TokenRecord:
        return spend(self.data, secret_hash)


def purge(data: Path, now: float | None = None) -> None:
    """Forget records spent or expired more than PURGE_AFTER ago."""
    now = time.time() if now is None else now
    directory = _dir(data)
    for path in [*directory.glob("*.json"), *(directory / USED_DIR).glob("*.json")]:
        try:
            spent = path.parent.name == USED_DIR and path.stat().st_mtime < now - PURGE_AFTER
            if spent or _read(path).expires_at < now - PURGE_AFTER:
                path.unlink()
        except (OSError, ValueError, TypeError):
            continue
