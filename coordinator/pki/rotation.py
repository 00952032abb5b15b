"""Rotating the fleet's CA without stopping the fleet.

`cachepoint-coordinator rotate-ca --data DIR` makes a new CA (or imports one with --ca-cert/--ca-key)
and keeps the old one as DATA/ca/retiring.crt and retiring.key. During the transition:

- the coordinator trusts certificates of both CAs (its trust bundle: new CA + old CA);
- every certificate it issues (enrollments, renewals) comes from the new CA, and each Enroll or Renew
  answer hands out the bundle, which the daemon keeps as its identity's ca.pem: a daemon moves onto the
  new CA at its next renewal, without a restart, and trusts both from then on;
- the coordinator's own server certificate still comes from the old CA (machines not yet renewed trust
  only that one), and join tokens pin the old CA, which the enrollment port presents.

`rotate-ca --data DIR --finish` retires the old CA: its key and certificate are removed, the bundle
is the new CA alone, the coordinator's server certificate comes from the new CA, and a certificate of
the old CA is refused in the TLS handshake. Wait at least one certificate lifetime (`cert_lifetime`)
between the two, so that every daemon has renewed. A node's peer port trusts the bundle it got at its
renewal: during the transition, a node not yet renewed refuses peers already renewed (they fetch from
the coordinator meanwhile).

The running coordinator notices both steps by the CA files' modification times (a stat per issue and
per TLS handshake) and switches without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from cachepoint.errors import InvalidInput, NotFound
from cachepoint.trust.identity import write_file
from coordinator.pki.ca import CA_DIR, CERT_FILE, KEY_FILE, CertificateAuthority, fingerprint

log = logging.getLogger("coordinator.pki")
RETIRING_CERT = "retiring.crt"
RETIRING_KEY = "retiring.key"


def _stamp(directory: Path) -> tuple[tuple[int, int] | None, ...]:
    stamps: list[tuple[int, int] | None] = []
    for name in (CERT_FILE, RETIRING_CERT):
        try:
            st = os.stat(directory / name)
            stamps.append((st.st_ino, st.st_mtime_ns))
        except FileNotFoundError:
            stamps.append(None)
    return tuple(stamps)


@dataclass(frozen=True)
class Authorities:
    issuing: CertificateAuthority  # signs every certificate the coordinator issues
    retiring: CertificateAuthority | None  # the old CA during a rotation

    @property
    def serving(self) -> CertificateAuthority:
        """Signs the coordinator's own server certificate: the old CA until the rotation finishes."""
        return self.retiring or self.issuing

    @property
    def bundle_pem(self) -> bytes:
        """The CAs a certificate may come from: new first, then the retiring one."""
        return self.issuing.cert_pem + (self.retiring.cert_pem if self.retiring else b"")

    @classmethod
    def load(cls, data: Path, issuing: CertificateAuthority | None = None) -> Authorities:
        directory = data / CA_DIR
        retiring = None
        if (directory / RETIRING_CERT).exists():
            retiring = CertificateAuthority.load_files(
                directory / RETIRING_CERT, directory / RETIRING_KEY, directory
            )
        return cls(issuing or CertificateAuthority.load(data), retiring)


class LiveAuthorities:
    """The authorities as the serving coordinator sees them, loaded again when a rotation step changes
    the files."""

    def __init__(self, data: Path, ca: CertificateAuthority) -> None:
        self.data = data
        self._lock = threading.Lock()  # the TLS fetcher runs on gRPC's threads
        self._stamp = _stamp(data / CA_DIR)
        self.current = Authorities.load(data, ca)
        self.generation = 0

    def refresh(self) -> Authorities:
        with self._lock:
            stamp = _stamp(self.data / CA_DIR)
            if stamp != self._stamp:
                try:
                    self.current = Authorities.load(self.data)
                except InvalidInput as err:  # a step half written: keep the set we have, look again
                    log.warning("the CA files changed but cannot be read yet (%s): serving as before", err)
                    return self.current
                self._stamp = stamp
                self.generation += 1
                log.warning(
                    "fleet CA: issuing from %s…, trusting %d CA(s)",
                    self.current.issuing.fingerprint[:16],
                    2 if self.current.retiring else 1,
                )
            return self.current


def rotate(data: Path, cert_file: Path | None = None, key_file: Path | None = None) -> Authorities:
    """Start a rotation: the current CA becomes the retiring one, a new (or imported) CA issues."""
    directory = data / CA_DIR
    if not CertificateAuthority.exists(data):
        raise NotFound(f"{data} has no CA to rotate (start the coordinator once with --tls)")
    if (directory / RETIRING_CERT).exists():
        raise InvalidInput(
            f"a rotation of the CA in {directory} is under way: finish it first (rotate-ca --finish)"
        )
    if (cert_file is None) != (key_file is None):
        raise InvalidInput("--ca-cert and --ca-key go together: name both files")
    old = CertificateAuthority.load(data)
    staging = directory / "next"
    staging.mkdir(mode=0o700, exist_ok=True)
    if cert_file is not None and key_file is not None:
        new = CertificateAuthority.load_files(cert_file, key_file, staging)
        if new.fingerprint == old.fingerprint:
            raise InvalidInput(f"{cert_file} is the fleet's current CA: rotate to another one")
        new._save()
    else:
        new = CertificateAuthority.create_in(staging)
    # The old pair is copied aside before the new one replaces it: a crash in between leaves the old
    # CA in place (and in retiring.*), which `rotate-ca --finish` or a new `rotate-ca` sorts out.
    write_file(directory / RETIRING_KEY, (directory / KEY_FILE).read_bytes(), 0o600)
    write_file(directory / RETIRING_CERT, old.cert_pem, 0o644)
    (staging / KEY_FILE).replace(directory / KEY_FILE)
    (staging / CERT_FILE).replace(directory / CERT_FILE)
    staging.rmdir()
    return Authorities.load(data)


def finish(data: Path) -> str:
    """End a rotation: the retiring CA's key and certificate are removed. Returns its fingerprint."""
    directory = data / CA_DIR
    if not (directory / RETIRING_CERT).exists():
        raise NotFound(f"no rotation of the CA in {directory} is under way (nothing to finish)")
    retired = fingerprint(x509.load_pem_x509_certificate((directory / RETIRING_CERT).read_bytes()))
    if retired == CertificateAuthority.load(data).fingerprint:
        raise InvalidInput(f"{directory}: the retiring CA is also the current one; run rotate-ca again")
    (directory / RETIRING_KEY).unlink(missing_ok=True)
    (directory / RETIRING_CERT).unlink()
    return retired
