"""Bearer tokens for the HTTP servers: what `cachepoint-coordinator token` prints and an HTTP client
sends as ``Authorization: Bearer TOKEN``.

    cpbearer1.<base64url of the claims JSON>.<base64url of the CA's signature>

    claims: {"v": 1, "name": "alice", "roles": ["user:alice"], "site": "",
             "iat": ISSUED (Unix s), "exp": EXPIRES (Unix s), "serial": "16 hex digits"}

The signature is the fleet CA key's over ``SIGNED_PREFIX`` + the claims segment as sent (so nothing is
re-encoded before checking), which lets any holder of the CA certificate, a node offline included,
verify a token without asking the coordinator; the prefix keeps a token's signature from ever being
mistaken for one over a certificate. A token names a principal as a certificate does, is valid from
``iat`` - BACKDATE (clock skew) to ``exp``, and falls under the same revocations: `revoke NAME` refuses
every token of NAME issued at or before it. The serial lets logs tell one token from another.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from cachepoint.trust.principal import BACKDATE, Principal, Role

PREFIX = "cpbearer1."
SIGNED_PREFIX = b"cachepoint bearer token 1\x00"
VERSION = 1
MAX_TOKEN_CHARS = 4096  # a token is ~300 characters; a header longer than this is not one of ours


class TokenInvalid(ValueError):
    """Why a bearer token is not accepted (the message goes back to the client in a 401)."""


class TokenNotCurrent(TokenInvalid):
    """A token the fleet's CA signed, outside its validity (expired, or not yet valid)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: object, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key.sign(data)
    raise TokenInvalid(f"a CA key of type {type(key).__name__} cannot sign tokens")


def _verify(public_key: object, signature: bytes, data: bytes) -> None:
    """Raises InvalidSignature when ``signature`` is not the CA key's over ``data``."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        public_key.verify(signature, data)
    else:
        raise InvalidSignature(f"a CA key of type {type(public_key).__name__} signs no tokens")


@dataclass(frozen=True, slots=True)
class BearerToken:
    principal: Principal
    issued: int  # Unix seconds
    expires: int
    serial: str

    @classmethod
    def issue(cls, ca_key: object, principal: Principal, ttl: timedelta, now: float) -> str:
        """A signed token for ``principal`` valid for ``ttl`` from ``now``."""
        issued = int(now)
        claims = {
            "v": VERSION,
            "name": principal.name,
            "roles": [str(r) for r in principal.roles],
            "site": principal.site,
            "iat": issued,
            "exp": issued + max(1, int(ttl.total_seconds())),
            "serial": secrets.token_hex(8),
        }
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{PREFIX}{body}.{_b64(_sign(ca_key, SIGNED_PREFIX + body.encode()))}"

    @classmethod
    def verify(cls, text: str, ca: x509.Certificate, now: datetime | None = None) -> BearerToken:
        """The token ``text`` if the fleet's CA signed it and it is current; TokenInvalid saying why
        not. Revocation is the caller's to check (on the principal, as for a certificate)."""
        now = now or datetime.now(UTC)
        if len(text) > MAX_TOKEN_CHARS or not text.startswith(PREFIX):
            raise TokenInvalid(f"not a cachepoint bearer token (they start with {PREFIX!r})")
        body, dot, signature = text[len(PREFIX) :].partition(".")
        try:
            signed = _unb64(signature)
        except (binascii.Error, ValueError) as err:
            raise TokenInvalid(f"the bearer token is damaged (copy it whole): {err}") from None
        try:
            _verify(ca.public_key(), signed, SIGNED_PREFIX + body.encode())
        except (InvalidSignature, ValueError):
            raise TokenInvalid(
                "the bearer token's signature is not the fleet CA's (forged, altered, or of another fleet)"
            ) from None
        if not dot:
            raise TokenInvalid("the bearer token is damaged (copy it whole)")
        try:
            claims = json.loads(_unb64(body))
            if claims.get("v") != VERSION:
                raise TokenInvalid(
                    f"bearer token version {claims.get('v')!r}: this cachepoint reads {VERSION}"
                )
            issued, expires = int(claims["iat"]), int(claims["exp"])
            principal = Principal(
                str(claims["name"]),
                tuple(Role.parse(str(r)) for r in claims["roles"]),
                str(claims.get("site") or ""),
                int(str(claims["serial"]), 16),
                datetime.fromtimestamp(issued, UTC) - BACKDATE,
                datetime.fromtimestamp(expires, UTC),
            )
        except TokenInvalid:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:
            raise TokenInvalid(f"the bearer token's claims are malformed: {err}") from None
        assert principal.not_before is not None and principal.not_after is not None
        if principal.not_after <= now:
            expired = f"{principal.not_after:%Y-%m-%d %H:%M:%S}"
            raise TokenNotCurrent(f"the bearer token of {principal.name!r} expired at {expired} UTC")
        if principal.not_before > now:
            raise TokenNotCurrent(
                f"the bearer token of {principal.name!r} is valid only from "
                f"{principal.not_before:%Y-%m-%d %H:%M:%S} UTC (is a clock wrong?)"
            )
        return cls(principal, issued, expires, str(claims["serial"]))
