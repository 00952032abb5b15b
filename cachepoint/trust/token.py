"""One-time join tokens: what `cachepoint-coordinator enroll` prints and `cachepoint enroll` spends.

    cpjoin1.<base64url of {"s": SECRET, "ca": CA_SHA256_HEX, "port": ENROLL_PORT}>

The secret (32 random bytes) proves the holder was invited; the coordinator keeps only its SHA-256.
The CA fingerprint lets a machine that has no CA yet check the coordinator it reaches. The port of
the enrollment listener is a hint (0: unknown, then the coordinator's port + 1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass

from cachepoint.errors import InvalidInput

PREFIX = "cpjoin1."


@dataclass(frozen=True, slots=True)
class JoinToken:
    secret: str
    ca_fingerprint: str
    enroll_port: int = 0

    @classmethod
    def new(cls, ca_fingerprint: str, enroll_port: int = 0) -> JoinToken:
        return cls(secrets.token_urlsafe(32), ca_fingerprint, enroll_port)

    @property
    def secret_hash(self) -> str:
        return secret_hash(self.secret)

    def encode(self) -> str:
        body = json.dumps({"s": self.secret, "ca": self.ca_fingerprint, "port": self.enroll_port})
        return PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        text = text.strip()
        if not text.startswith(PREFIX):
            raise InvalidInput(
                f"join token must start with {PREFIX!r} (made by `cachepoint-coordinator enroll`)"
            )
        body = text[len(PREFIX) :]
        try:
            fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            token = cls(str(fields["s"]), str(fields["ca"]).lower(), int(fields.get("port", 0)))
        except (binascii.Error, ValueError, KeyError, TypeError) as err:
            raise InvalidInput(f"join token is damaged (copy it whole): {err}") from err
        if len(token.ca_fingerprint) != 64 or not all(c in "0123456789abcdef" for c in token.ca_fingerprint):
            raise InvalidInput("join token is damaged: its CA fingerprint is not a SHA-256 in hex")
        return token


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
