"""The server's TLS files: read and checked at start, read again when they change.

gRPC asks `changed_configuration` before each new TLS handshake; it answers None (keep the
current certificate) unless a file's modification time or size moved, so a certificate
renewed on disk (cert-manager, certbot) is served to new connections without a restart.
Connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loramux.core.errors import FailedPrecondition

log = logging.getLogger(__name__)

MAX_PEM_BYTES = 1 << 20


def read_pem(path: Path, field_name: str, marker: str) -> bytes:
    """The bytes of a PEM file, refused with the flag named when absent or not PEM."""
    try:
        data = path.read_bytes()[: MAX_PEM_BYTES + 1]
    except OSError as exc:
        raise FailedPrecondition(field_name, f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_PEM_BYTES:
        raise FailedPrecondition(field_name, f"{path} is over {MAX_PEM_BYTES} bytes")
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise FailedPrecondition(field_name, f"{path} holds no PEM {marker.lower()}")
    return data


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size)


@dataclass
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    _stamps: tuple[object, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        cert = read_pem(self.cert, "tls_cert", "CERTIFICATE")
        key = read_pem(self.key, "tls_key", "PRIVATE KEY")
        ca = read_pem(self.client_ca, "tls_client_ca", "CERTIFICATE") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _current_stamps(self) -> tuple[object, ...]:
        return (_stamp(self.cert), _stamp(self.key), _stamp(self.client_ca))

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as they are now (FailedPrecondition naming the flag when unusable)."""
        with self._lock:
            self._stamps = self._current_stamps()
            return self._read()

    def changed_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when a file changed, else None (keep)."""
        with self._lock:
            stamps = self._current_stamps()
            if stamps == self._stamps:
                return None
            try:
                config = self._read()
            except FailedPrecondition as exc:  # half-written during a rotation: keep the old
                log.warning("TLS files changed but cannot be used yet: %s", exc)
                return None
            self._stamps = stamps
            log.info("TLS files changed: serving the new certificate to new connections")
            return config
