"""HTTPS for the tracker: one certificate per URL domain, chosen by SNI.

Certificates live in `control/tracker.tls/`, one PEM file per certificate
(`*.pem`: the certificate, its chain, and its private key, in one file).
The tracker reads the DNS names of each certificate (subjectAltName, else
the subject's common name) and answers a TLS client that asks for one of
them with that certificate; `*.example.com` covers one label. A client
that sends no name, or a name no certificate has, gets the first file by
name (name a file `00-default.pem` to choose).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

DIRECTORY = "tracker.tls"  # under control/


class TlsConfigError(Exception):
    """A certificate file that cannot be used (names the file)."""


@dataclass
class Certificates:
    """The server contexts of control/tracker.tls/, by DNS name."""

    default: ssl.SSLContext
    by_name: dict[str, ssl.SSLContext] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def for_name(self, name: str | None) -> ssl.SSLContext:
        if not name:
            return self.default
        name = name.lower().rstrip(".")
        found = self.by_name.get(name)
        if found is None and "." in name:
            found = self.by_name.get("*." + name.split(".", 1)[1])
        return found or self.default


def certificate_names(pem: bytes, path: Path) -> list[str]:
    """The DNS names of the first certificate in `pem` (lowercase)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise TlsConfigError(f"{path}: no readable PEM certificate ({e})") from None
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [str(n).lower().rstrip(".") for n in names]


def _context(path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(path)
    except ssl.SSLError as e:
        raise TlsConfigError(f"{path}: needs a PEM certificate and its private key ({e})") from None
    return context


def load(control_dir: Path) -> Certificates | None:
    """The certificates of control/tracker.tls/; None when the folder has none."""
    folder = Path(control_dir) / DIRECTORY
    files = sorted(folder.glob("*.pem")) if folder.is_dir() else []
    if not files:
        return None
    contexts = []
    by_name: dict[str, ssl.SSLContext] = {}
    for path in files:
        context = _context(path)
        contexts.append(context)
        for name in certificate_names(path.read_bytes(), path):
            by_name.setdefault(name, context)
    return Certificates(contexts[0], by_name, files)


class SniListener:
    """The listening context, switching to the certificate of the name the client asks for.

    `certificates` may be replaced while running (SIGHUP): new handshakes see it.
    """

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # Its own certificate is used only if the callback is never called.
        self.context.load_cert_chain(certificates.files[0])
        self.context.sni_callback = self._choose

    def _choose(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.certificates.for_name(name)
