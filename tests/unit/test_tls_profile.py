"""router/tls.py: the BCP 195 RFC 8996 profile of the listener and of destinations."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from router.tls import TlsConfigError, client_context, server_context


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=unit", "-keyout", "k.pem", "-out", "c.pem"],
        cwd=d, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(d / "c.pem"), str(d / "k.pem")


def _assert_profile(context: ssl.SSLContext) -> None:
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suites at all"
    for cipher in tls12:
        assert cipher["aead"], cipher["name"]
        assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher["name"]


def test_server_profile(pair: tuple[str, str]) -> None:
    context = server_context(*pair, ca=pair[0], require_client_cert=True)
    _assert_profile(context)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert server_context(*pair).verify_mode == ssl.CERT_NONE


def test_client_profile_verifies_certificate_and_host(pair: tuple[str, str]) -> None:
    context = client_context(pair[0], *pair)
    _assert_profile(context)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_unusable_files_are_a_config_error(pair: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="destination TLS files"):
        client_context(str(tmp_path / "missing.pem"))
    with pytest.raises(TlsConfigError, match="listener TLS files"):
        server_context(pair[0], pair[0])  # a certificate is not a key
