"""Transport security: TLS and mutual TLS for the server, credentials for clients.

The server reads its certificate chain, key and (for mutual TLS) the client CA
from files, and checks them again at every new connection: replaced files
(a renewed certificate, a new CA bundle) take effect for the next connection
without a restart.  A replacement that does not load (half-written, key and
certificate that do not pair) is logged and the previous files stay in use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from index.durable import check_private
from server.errors import ConfigurationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key, and the CA its clients' certificates
    must chain to (None: clients are not asked for one)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigurationError(f"the {what} {path} is not PEM")
    return data


def _check_pair(cert: bytes, key: bytes, files: TlsFiles) -> None:
    """Refuse a key that does not belong to the certificate (gRPC would accept the
    files and fail every handshake)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        cert_key = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"the TLS certificate {files.cert} or key {files.key} does "
                                 f"not load: {exc}") from exc
    if (cert_key.public_bytes(serialization.Encoding.DER, spki)
            != private.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ConfigurationError(f"the TLS key {files.key} is not the key of the certificate "
                                 f"{files.cert}")


def certificate_configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """The files as gRPC's certificate configuration.

    Raises:
        ConfigurationError: a file is missing, not PEM, or the key does not match,
            or others can read or change the key (see :func:`index.durable.check_control`).
    """
    check_private(files.key, "the TLS key")
    cert = _read(files.cert, "TLS certificate")
    key = _read(files.key, "TLS key")
    _check_pair(cert, key, files)
    ca = _read(files.client_ca, "client CA") if files.client_ca else None
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class ReloadingCredentials:
    """Server credentials that follow their files (see the module docstring)."""

    def __init__(self, files: TlsFiles, on_reload: Callable[[], None] = lambda: None) -> None:
        self.files = files
        self.on_reload = on_reload
        self._stamp = self._stat()
        self.initial = certificate_configuration(files)
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self.files.paths():
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, -1))
        return tuple(out)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before every handshake: a new configuration when the files
        changed and load, else None (keep the current one).  Never raises."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            config = certificate_configuration(self.files)
        except ConfigurationError as exc:
            log.error("TLS files changed but do not load; keeping the previous ones: %s", exc)
            return None
        self.reloads += 1
        self.on_reload()
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return config

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch,
            require_client_authentication=self.files.client_ca is not None)


@dataclass(frozen=True)
class ClientTls:
    """What a client needs for TLS: the CA that signed the server's certificate
    (None: the system's roots), and its own certificate and key for mutual TLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name to check in the server's certificate

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None)

    def options(self) -> list[tuple[str, str]]:
        return ([("grpc.ssl_target_name_override", self.server_name)]
                if self.server_name else [])


def channel(target: str, tls: ClientTls | None, options: list[tuple[str, object]]
            ) -> grpc.Channel:
    """A blocking channel to ``target``: TLS when ``tls`` is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])

