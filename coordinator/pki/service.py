"""The Enrollment service: Enroll spends a join token for a certificate naming the token's principal;
Renew gives the caller (authenticated by its current certificate) a new one for a new key."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cachepoint.errors import StoreBusy
from cachepoint.trust.principal import Principal, Role
from cachepoint.trust.token import secret_hash
from cachepoint.v1 import enrollment_pb2, enrollment_pb2_grpc
from coordinator.history.audit import AuditEntry, AuditLog
from coordinator.pki import tokens
from coordinator.pki.audit_queue import ENROLLED, RENEWED
from coordinator.pki.guard import Refused, peer_principal
from coordinator.pki.rotation import LiveAuthorities
from coordinator.pki.state import TrustRecords

log = logging.getLogger("coordinator.pki")
MAX_CSR = 16 * 1024


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(
        self,
        data: Path,
        authorities: LiveAuthorities,
        lifetime: timedelta,
        records: TrustRecords,
        audit: AuditLog | None = None,
    ) -> None:
        self.data = data
        self.authorities = authorities
        self.lifetime = lifetime
        self.records = records
        self.audit = audit

    async def _audited(self, actor: str, action: str, cert: x509.Certificate, **details: object) -> None:
        """Each certificate handed out is in the audit log, with its serial (as `openssl x509` shows it)."""
        if self.audit is None:
            return
        details = {
            **details,
            "serial": f"{cert.serial_number:x}",
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
        entry = AuditEntry(actor, action, actor, details)
        await asyncio.to_thread(self.audit.append, [entry])

    async def _public_key(
        self, csr_pem: bytes, context: grpc.aio.ServicerContext
    ) -> ec.EllipticCurvePublicKey:
        """The key of a well-formed, self-signed EC P-256 request (the kind `cachepoint enroll` makes)."""
        try:
            if len(csr_pem) > MAX_CSR:
                raise ValueError(f"{len(csr_pem)} bytes, more than {MAX_CSR}")
            csr = x509.load_pem_x509_csr(csr_pem)
            if not csr.is_signature_valid:
                raise ValueError("its signature does not verify")
            key = csr.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise ValueError("the key must be EC P-256")
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"certificate request refused: {err}")
        return key

    def _issue(self, key: ec.EllipticCurvePublicKey, principal: Principal) -> tuple[x509.Certificate, bytes]:
        """A certificate from the issuing CA, and the trust bundle to keep beside it (during a CA
        rotation both CAs, coordinator/pki/rotation.py)."""
        current = self.authorities.refresh()
        return current.issuing.issue(key, principal, self.lifetime), current.bundle_pem

    def _response(self, cert: x509.Certificate, bundle: bytes) -> enrollment_pb2.EnrollResponse:
        return enrollment_pb2.EnrollResponse(
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM), ca_certificate_pem=bundle
        )

    async def Enroll(  # noqa: N802 - gRPC method name
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        key = await self._public_key(request.csr_pem, context)  # a bad request does not spend the token
        try:
            # A file rename, or one UPDATE in PostgreSQL when the tokens are shared by replicas.
            entry = await asyncio.to_thread(self.records.tokens.spend, secret_hash(request.token_secret))
        except tokens.TokenRefused as err:
            log.warning("enrollment refused from %s: %s", context.peer(), err)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        except StoreBusy as err:  # the replicas' database is unreachable: the token stays unspent
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        principal = Principal(entry.name, (Role.parse(entry.role),), entry.site)
        await self._after_revocation(entry.name)
        cert, bundle = self._issue(key, principal)
        log.warning("enrolled %s as %s (site %r) from %s", entry.name, entry.role, entry.site, context.peer())
        await self._audited(
            entry.name, ENROLLED, cert, role=entry.role, site=entry.site or None, peer=context.peer()
        )
        return self._response(cert, bundle)

    async def _after_revocation(self, name: str) -> None:
        """Certificates carry their issue time in whole seconds, and a revocation refuses every one
        issued up to its second: a name enrolled again in that same second waits for the next one."""
        at = await asyncio.to_thread(self.records.revoked_at, name)
        if at is not None:
            await asyncio.sleep(max(0.0, math.floor(at) + 1 - time.time()))

    async def Renew(  # noqa: N802
        self, request: enrollment_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        try:
            current = peer_principal(context)  # on the main port the Guard has checked it already
        except Refused as refused:
            await context.abort(refused.code, str(refused))
        key = await self._public_key(request.csr_pem, context)
        cert, bundle = self._issue(key, Principal(current.name, current.roles, current.site))
        log.info("renewed the certificate of %s until %s", current.name, cert.not_valid_after_utc)
        await self._audited(current.name, RENEWED, cert, previous_serial=f"{current.serial:x}")
        return self._response(cert, bundle)


def register(server: grpc.aio.Server, service: EnrollmentService) -> None:
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(service, server)
