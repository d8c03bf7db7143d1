"""TLS contexts for the listener and for destinations (PS3.15 B.1, BCP 195 / RFC 8996).

Both sides use the profile DCMTK calls "BCP 195 RFC 8996": TLS 1.2 or 1.3 only, and
for TLS 1.2 only forward-secret AEAD suites (ECDHE/DHE with AES-GCM or ChaCha20), so a
TLS 1.0/1.1 peer or one offering only CBC/SHA-1 suites such as AES128-SHA fails the
handshake (catalogue SEC-12). TLS 1.3 suites are fixed by OpenSSL and all AEAD.

A destination's server certificate is verified against its CA file (or the system's
CAs) and, unless ``check_hostname`` is off, against the destination's host name or
address; there is never a fallback to clear text (catalogue SEC-15).
"""

from __future__ import annotations

import ssl

# OpenSSL cipher string for TLS 1.2: forward secrecy and AEAD only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


class TlsConfigError(ValueError):
    """TLS files that cannot be used (missing, unreadable, not PEM, key not matching)."""


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    return context


def server_context(
    cert: str, key: str, ca: str = "", require_client_cert: bool = False
) -> ssl.SSLContext:
    """The listener's context; with ``require_client_cert`` a peer without a certificate
    signed by ``ca`` fails the handshake (catalogue SEC-13)."""
    context = _profile(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    try:
        context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"listener TLS files: {exc}") from None
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A context towards a destination: its certificate is always verified (CERT_REQUIRED);
    ``cert``/``key`` are our client certificate when the destination asks for one."""
    context = _profile(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if ca:
            context.load_verify_locations(ca)
        if cert:
            context.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"destination TLS files: {exc}") from None
    return context
