"""TLS certificates for the HTTP/3 door: ``hapax certs dev`` and reloading files that change.

QUIC always runs TLS 1.3, so even a laptop needs a certificate. ``write_dev_pair``
makes a self-signed one (ECDSA P-256, valid for localhost and the loopback
addresses); in production the files come from a mounted secret, which
Kubernetes replaces by swapping a symlink, so ``CertificateFiles`` notices a
change by the files' (device, inode, size, mtime) as ``os.stat`` follows the
link, not by an mtime alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Long enough not to expire during development, short enough that a leaked dev key ages out.
DEV_DAYS: Final = 90
DEV_NAMES: Final = ("localhost", "127.0.0.1", "::1")


def write_dev_pair(directory: Path, *, names: tuple[str, ...] = DEV_NAMES, days: int = DEV_DAYS) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (mode 0600) into ``directory``; their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "hapax-dev")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class _Stamp:
    cert: tuple[int, int, int, int]
    key: tuple[int, int, int, int]


def _stat(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class CertificateFiles:
    """A certificate and key pair on disk, and whether it changed since it was last read."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._stamp: _Stamp | None = None

    def stamp(self) -> _Stamp:
        return _Stamp(_stat(self.cert_file), _stat(self.key_file))

    def changed(self) -> bool:
        """True when either file differs from the last ``mark``ed read (or was never read)."""
        try:
            return self.stamp() != self._stamp
        except OSError:
            return False  # mid-swap or gone: keep serving with what we have

    def mark(self, stamp: _Stamp) -> None:
        self._stamp = stamp
