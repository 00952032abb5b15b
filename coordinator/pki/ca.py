"""The fleet's CA: DATA/ca/ca.key (0600) and DATA/ca/ca.crt, made on a first TLS start or imported
from an operator's CA; it issues every certificate of the fleet, the coordinator's own included."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cachepoint.errors import InvalidInput
from cachepoint.trust.identity import write_file
from cachepoint.trust.principal import BACKDATE, PEER_TLS_NAME, Principal, subject_of, uris_of

CA_DIR = "ca"
KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
CA_LIFETIME = timedelta(days=3650)
COORDINATOR_CN = "cachepoint-coordinator"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, in hex: what a join token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    directory: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    # -- where it comes from -----------------------------------------------------------------------

    @classmethod
    def exists(cls, data: Path) -> bool:
        return (data / CA_DIR / CERT_FILE).exists()

    @classmethod
    def load(cls, data: Path) -> CertificateAuthority:
        directory = data / CA_DIR
        return cls.load_files(directory / CERT_FILE, directory / KEY_FILE, directory)

    @classmethod
    def load_files(cls, cert_file: Path, key_file: Path, directory: Path) -> CertificateAuthority:
        """A CA from its two PEM files (unencrypted key); ``directory``: where it saves itself."""
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        except (OSError, ValueError, TypeError) as err:
            raise InvalidInput(f"cannot read the CA in {cert_file} and {key_file}: {err}") from err
        return cls._checked(key, cert, key_file, cert_file, directory)

    @classmethod
    def _checked(
        cls, key: object, cert: x509.Certificate, key_file: Path, cert_file: Path, directory: Path
    ) -> CertificateAuthority:
        if _public_der(key.public_key()) != _public_der(cert.public_key()):  # type: ignore[attr-defined]
            raise InvalidInput(f"CA key {key_file} does not match CA certificate {cert_file}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise InvalidInput(f"{cert_file} is not a CA certificate (basicConstraints CA:TRUE is missing)")
        return cls(key, cert, directory)  # type: ignore[arg-type]

    @classmethod
    def create(cls, data: Path) -> CertificateAuthority:
        return cls.create_in(data / CA_DIR)

    @classmethod
    def create_in(cls, directory: Path) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"cachepoint fleet CA {secrets.token_hex(4)}")]
        )
        now = datetime.now(UTC).replace(microsecond=0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(key, cert, directory)
        ca._save()
        return ca

    @classmethod
    def import_from(cls, data: Path, cert_file: Path, key_file: Path) -> CertificateAuthority:
        """An operator's CA, copied into DATA/ca/. Refused when the key does not match the
        certificate, and when DATA/ca already holds another CA (a fleet has one CA at a time)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (OSError, ValueError) as err:
            raise InvalidInput(f"cannot read CA certificate {cert_file}: {err}") from err
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        except (OSError, ValueError, TypeError) as err:
            raise InvalidInput(f"cannot read CA key {key_file} (an unencrypted PEM key): {err}") from err
        ca = cls._checked(key, cert, key_file, cert_file, data / CA_DIR)
        if cls.exists(data):
            held = cls.load(data)
            if held.fingerprint != ca.fingerprint:
                raise InvalidInput(
                    f"{data / CA_DIR} already holds CA {held.fingerprint[:16]}…, not {cert_file} "
                    f"({ca.fingerprint[:16]}…): move it away to change the fleet's CA"
                )
            return held
        ca.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca._save()
        return ca

    @classmethod
    def for_serve(
        cls, data: Path, cert_file: Path | None, key_file: Path | None, tls: bool
    ) -> CertificateAuthority | None:
        """The CA a starting coordinator serves with: imported when named, the one in DATA/ca/, a
        new one when TLS is asked for and there is none; None: plaintext."""
        if (cert_file is None) != (key_file is None):
            raise InvalidInput("--ca-cert and --ca-key go together: name both files")
        if cert_file is not None and key_file is not None:
            return cls.import_from(data, cert_file, key_file)
        if cls.exists(data):
            return cls.load(data)
        return cls.create(data) if tls else None

    def _save(self) -> None:
        key = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_file(self.directory / KEY_FILE, key, 0o600)
        write_file(self.directory / CERT_FILE, self.cert_pem, 0o644)

    # -- what it issues ----------------------------------------------------------------------------

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        algorithm = (
            None
            if isinstance(self.key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
            else hashes.SHA256()
        )
        return builder.sign(self.key, algorithm)  # type: ignore[arg-type]

    def _builder(
        self, public_key: object, subject: x509.Name, lifetime: timedelta
    ) -> x509.CertificateBuilder:
        now = datetime.now(UTC).replace(microsecond=0)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )

    def issue(self, public_key: object, principal: Principal, lifetime: timedelta) -> x509.Certificate:
        """A principal's certificate. A node's also serves its peer port (PEER_TLS_NAME); anyone
        else's is for calling only."""
        names: list[x509.GeneralName] = uris_of(principal)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if principal.has("node"):
            names.append(x509.DNSName(PEER_TLS_NAME))
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            self._builder(public_key, subject_of(principal), lifetime)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        return self._sign(builder)

    def issue_server(self, public_key: object, hosts: list[str], lifetime: timedelta) -> x509.Certificate:
        """The coordinator's own server certificate, naming ``hosts`` (names and IP addresses)."""
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COORDINATOR_CN)])
        builder = (
            self._builder(public_key, subject, lifetime)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        return self._sign(builder)


def server_hosts(listen_host: str, tls_names: list[str]) -> list[str]:
    """What the coordinator's certificate names: the listen host (or, on a wildcard address, this
    machine's names and addresses), loopback, and every --tls-name."""
    hosts = list(tls_names)
    if listen_host in ("0.0.0.0", "::", "[::]", ""):
        hosts += [socket.gethostname(), socket.getfqdn()]
        try:
            hosts += socket.gethostbyname_ex(socket.gethostname())[2]
        except OSError:
            pass
    else:
        hosts.append(listen_host.strip("[]"))
    hosts += ["localhost", "127.0.0.1", "::1"]
    return [h for h in hosts if h]


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signatures only (EC keys agree on session keys by ECDHE); a CA also signs certificates."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
