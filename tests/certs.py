"""Certificates made inside the tests: a CA, a server certificate for localhost, a client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, subject_key, issuer, issuer_key, *, ca=False, usage=None, san=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, certificate, key) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path.with_suffix(".crt"), path.with_suffix(".key")


def make_certs(folder: Path) -> CertFiles:
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate(_name("duo test CA"), ca_key, _name("duo test CA"), ca_key, ca=True)
    rogue_ca = _certificate(_name("rogue CA"), rogue_ca_key, _name("rogue CA"), rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _certificate(_name("localhost"), server_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                          san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _certificate(_name("duo-draft"), client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate(_name("intruder"), rogue_key, rogue_ca.subject, rogue_ca_key,
                         usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = _write(folder / "ca", ca, ca_key)
    server_cert, server_key_path = _write(folder / "server", server, server_key)
    client_cert, client_key_path = _write(folder / "client", client, client_key)
    rogue_cert, rogue_key_path = _write(folder / "rogue", rogue, rogue_key)
    return CertFiles(ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_cert, rogue_key_path)
