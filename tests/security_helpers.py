"""Test helpers for issue 11's secure defaults: listening sockets and TLS files made here."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
ANY = "*"  # every interface: 0.0.0.0, or "::" (gRPC binds 0.0.0.0 as a dual-stack socket)


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6} writes addresses as 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    text = socket.inet_ntop(family, swapped)
    if text in ("0.0.0.0", "::"):
        return ANY
    return text.removeprefix("::ffff:") if "." in text else text  # IPv4-mapped: the IPv4


def listening_addresses(port: int) -> set[str]:
    """The local addresses that sockets listening on TCP `port` are bound to (Linux);
    ANY for every interface."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == LISTEN and int(hex_port, 16) == port:
                found.add(_address(address))
    return found


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A private CA and certificates it signed, as PEM files in `folder`."""

    ca: Path
    server: Pem
    client: Pem


def _key() -> object:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(folder: Path, name: str, cert: object, key: object) -> Pem:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))  # type: ignore[attr-defined]
    key_path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Pem(cert_path, key_path)


def make_pki(folder: Path, name: str = "test") -> Pki:
    """A self-signed CA, a server certificate for 127.0.0.1/localhost and a client one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def subject(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = _key()
    ca_name = subject(f"{name} CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> Pem:
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _write(folder, common_name, builder.sign(ca_key, hashes.SHA256()), key)  # type: ignore[arg-type]

    ca = _write(folder, f"{name}-ca", ca_cert, ca_key)
    server = leaf(
        f"{name}-server",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = leaf(f"{name}-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return Pki(ca=ca.cert, server=server, client=client)
