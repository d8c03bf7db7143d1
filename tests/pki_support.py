"""Test certificates made by the openssl command line (DESIGN §8), shared by the interop
and the end-to-end TLS tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_CA_CONFIG = """[ca]
default_ca = test
[test]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = any
copy_extensions = copy
unique_subject = no
[any]
commonName = supplied
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        cwd=d,
    )


def _sign(d: Path, name: str, ca: str, san: str = "IP:127.0.0.1,DNS:localhost") -> None:
    _key_and_csr(d, name)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=d,
    )


def make_pki(d: Path) -> dict[str, Path]:
    """ca.crt; server/client signed by it (SAN 127.0.0.1, localhost); rogue-ca and a
    server and client signed by that CA (untrusted); wrong-host: a server certificate
    of our CA for another name; expired: a client certificate of our CA valid in 2020."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (scripts/test.sh installs it)")
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _sign(d, "server", "ca")
    _sign(d, "client", "ca")
    _sign(d, "rogue-server", "rogue-ca")
    _sign(d, "rogue-client", "rogue-ca")
    _sign(d, "wrong-host", "ca", san="DNS:elsewhere.invalid")
    _key_and_csr(d, "expired")
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text(_CA_CONFIG.format(dir=d))
    _openssl(
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-cert",
        "ca.crt",
        "-keyfile",
        "ca.key",
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
        "-in",
        "expired.csr",
        "-out",
        "expired.crt",
        "-notext",
        cwd=d,
    )
    return {p.name.replace(".", "_").replace("-", "_"): p for p in d.iterdir()}
