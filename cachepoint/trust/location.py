"""Where a process's identity lives, found without loading grpc or cryptography: every command
asks at start-up, and most have no identity to load (plaintext)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_IDENTITY = "CACHEPOINT_IDENTITY"
STORE_IDENTITY = "identity"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
CA_FILE = "ca.pem"


def identity_dir(flag: str | None, store: Path | None) -> Path | None:
    """Where the identity is: --identity, else $CACHEPOINT_IDENTITY, else STORE/identity when it
    holds one; None: none (plaintext)."""
    named = flag or os.environ.get(ENV_IDENTITY)
    if named:
        return Path(named)
    if store is not None and (store / STORE_IDENTITY / CERT_FILE).exists():
        return store / STORE_IDENTITY
    return None
