"""Fleet trust at a serving coordinator, wired in one place: the main port's mutual TLS and Guard, the
enrollment port (TLS, no client certificate, Enrollment and health only), and the task that ends the
open calls of revoked principals."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc

from cachepoint.rpc.serving import Server, split_address
from coordinator.history.audit import AuditLog
from coordinator.pki.ca import CertificateAuthority, server_hosts
from coordinator.pki.guard import coordinator_guard
from coordinator.pki.rotation import LiveAuthorities
from coordinator.pki.service import EnrollmentService, register
from coordinator.pki.state import TrustRecords
from coordinator.pki.tls import CoordinatorTls

DEFAULT_LIFETIME = "3d"


@dataclass
class TrustSettings:
    ca: CertificateAuthority
    lifetime: timedelta
    enroll_listen: str = ""
    """HOST:PORT of the enrollment port; empty: the main port's host and its port + 1 (0 stays 0)."""
    tls_names: list[str] = field(default_factory=list)
    """More names and addresses the coordinator's certificate gives (beside the listen host)."""


def enroll_address(listen: str, enroll_listen: str) -> str:
    if enroll_listen:
        return enroll_listen
    host, port = split_address(listen)
    return f"{host}:{port + 1 if port else 0}"


class FleetTrust:
    def __init__(
        self,
        data: Path,
        settings: TrustSettings,
        listen: str,
        records: TrustRecords,
        audit: AuditLog | None = None,
    ) -> None:
        """``records``: where tokens and revocations are (coordinator/pki/state.py)."""
        self.settings = settings
        host, _ = split_address(listen)
        self.authorities = LiveAuthorities(data, settings.ca)
        self.tls = CoordinatorTls(self.authorities, server_hosts(host, settings.tls_names), settings.lifetime)
        self.revocations = records.revocations
        self.guard = coordinator_guard(self.revocations)
        self.enrollment = EnrollmentService(data, self.authorities, settings.lifetime, records, audit)
        self.enroll_server = Server(
            enroll_address(listen, settings.enroll_listen),
            "cachepoint.v1.Enrollment",
            self.tls.credentials(False),
        )
        self.enroll_server.add(lambda s: register(s, self.enrollment))
        self._watch: asyncio.Task[None] | None = None

    def main_server(
        self,
        listen: str,
        name: str,
        authorizer: grpc.aio.ServerInterceptor | None = None,
        metrics: grpc.aio.ServerInterceptor | None = None,
    ) -> Server:
        """The Guard authenticates every call first; then ``authorizer`` (coordinator/authz.py) decides.
        ``metrics`` counts every call, refused ones too (cachepoint/rpc/metrics.py)."""
        interceptors = [self.guard] if authorizer is None else [self.guard, authorizer]
        if authorizer is not None:
            self.guard.on_refusal = getattr(authorizer, "guard_refused", None)
        server = Server(listen, name, self.tls.credentials(True), interceptors, metrics=metrics)
        server.add(self.register)
        return server

    def revoked(self) -> dict[str, float]:
        """Every revoked name and when, as heartbeat replies hand it to the nodes."""
        self.revocations.refresh()
        return dict(self.revocations.revoked)

    def register(self, server: grpc.aio.Server) -> None:
        register(server, self.enrollment)  # Renew, and Enroll for callers who already have a certificate

    async def start(self) -> dict[str, object]:
        """Start the enrollment port and the revocation watch; what to announce."""
        address = await self.enroll_server.start()
        self._watch = asyncio.create_task(self.guard.watch(), name="revocations")
        return {"enroll": address, "ca_fingerprint": self.authorities.current.serving.fingerprint}

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.enroll_server.stop()
