"""TLS of the API's port: server credentials from ApiSettings, and binding the port with or without them.

With RUN_API_TLS_CERT and RUN_API_TLS_KEY the port speaks TLS only: a plaintext client is refused.
With RUN_API_TLS_CLIENT_CA as well, every client must present a certificate signed by that CA
(mutual TLS). Without them the port is plaintext, as before.
"""

from __future__ import annotations

import pathlib

import grpc

from shared.settings import ApiSettings

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8, RSA and EC keys alike


class TlsError(RuntimeError):
    """The TLS files cannot be used: unreadable, not PEM, or a key that does not match its certificate."""


def _pem(path: str, variable: str, marker: bytes, what: str) -> bytes:
    """The bytes of a PEM file, or a TlsError naming its variable."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise TlsError(f"{variable}: cannot read {path!r}: {err.strerror or err}") from None
    if marker not in data:
        raise TlsError(f"{variable}: {path!r} holds no PEM {what}")
    return data


def server_credentials(settings: ApiSettings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials (mutual TLS when tls_client_ca is set), or None when TLS is off."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _pem(settings.tls_cert, "RUN_API_TLS_CERT", _CERTIFICATE, "certificate")
    key = _pem(settings.tls_key, "RUN_API_TLS_KEY", _PRIVATE_KEY, "private key")
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _pem(settings.tls_client_ca, "RUN_API_TLS_CLIENT_CA", _CERTIFICATE, "certificate")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _accepted(credentials: grpc.ServerCredentials) -> bool:
    """Whether gRPC accepts the credentials, tried on a throwaway server and a port that is always free."""
    probe = grpc.aio.server()
    try:
        probe.add_secure_port("127.0.0.1:0", credentials)
    except RuntimeError:
        return False
    return True


def bind(server: grpc.aio.Server, settings: ApiSettings) -> int:
    """Listen on settings.addr, with TLS when configured; the bound port, or 0 when the address is taken.

    Raises TlsError when the TLS files are unusable (gRPC reports that as a failed bind too).
    """
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            return server.add_insecure_port(settings.addr)
        return server.add_secure_port(settings.addr, credentials)
    except RuntimeError:
        if credentials is not None and not _accepted(credentials):
            raise TlsError(
                "gRPC refused RUN_API_TLS_CERT / RUN_API_TLS_KEY"
                + (" / RUN_API_TLS_CLIENT_CA" if settings.tls_client_ca else "")
                + ": does the key belong to the certificate (and is it unencrypted)?"
            ) from None
        return 0
