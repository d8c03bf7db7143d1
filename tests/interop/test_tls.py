"""TLS (PS3.15 B.1) between our apps and DCMTK, with certificates made by openssl here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from interop_support import (
    HOST,
    ProcessManager,
    Server,
    make_dataset,
    protocol_argv,
    received_files,
    require_dcmtk,
    run_bounded,
    write_part10,
)
from pki_support import make_pki

from protocol.uids import EXPLICIT_VR_LE

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by it
    (and the other certificates tests/pki_support.py makes)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def dicom_file(tmp_path: Path) -> Path:
    return write_part10(make_dataset(CT_IMAGE_STORAGE, "CT"), tmp_path / "ct.dcm", EXPLICIT_VR_LE)


def _our_tls_storescp(
    run_app: Callable[..., Server], pki: dict[str, Path], out: Path, *extra: str
) -> Server:
    out.mkdir(exist_ok=True)
    return run_app(
        "storescp",
        "-od",
        str(out),
        "--tls-cert",
        str(pki["server_crt"]),
        "--tls-key",
        str(pki["server_key"]),
        "--tls-ca",
        str(pki["ca_crt"]),
        *extra,
    )


def test_our_storescu_stores_over_tls_to_our_storescp(
    run_app: Callable[..., Server], pki: dict[str, Path], dicom_file: Path, tmp_path: Path
) -> None:
    server = _our_tls_storescp(run_app, pki, tmp_path / "out")
    result = run_bounded(
        protocol_argv(
            "storescu",
            HOST,
            str(server.port),
            str(dicom_file),
            "--tls",
            "--tls-ca",
            str(pki["ca_crt"]),
        ),
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(received_files(tmp_path / "out")) == 1


def test_client_certificate_is_required_when_asked(
    run_app: Callable[..., Server], pki: dict[str, Path], dicom_file: Path, tmp_path: Path
) -> None:
    server = _our_tls_storescp(run_app, pki, tmp_path / "out", "--tls-require-client-cert")
    base = protocol_argv(
        "storescu", HOST, str(server.port), str(dicom_file), "--tls", "--tls-ca", str(pki["ca_crt"])
    )
    refused = run_bounded(base, cwd=tmp_path, timeout=60)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("error:")
    accepted = run_bounded(
        [*base, "--tls-cert", str(pki["client_crt"]), "--tls-key", str(pki["client_key"])],
        cwd=tmp_path,
        timeout=60,
    )
    assert accepted.returncode == 0, accepted.stderr
    assert len(received_files(tmp_path / "out")) == 1


def test_plain_client_to_tls_port_fails_cleanly_and_server_keeps_serving(
    run_app: Callable[..., Server], pki: dict[str, Path], dicom_file: Path, tmp_path: Path
) -> None:
    server = _our_tls_storescp(run_app, pki, tmp_path / "out")
    plain = run_bounded(
        protocol_argv("storescu", HOST, str(server.port), str(dicom_file), "-ta", "3", "-to", "3"),
        cwd=tmp_path,
        timeout=60,
    )
    assert plain.returncode != 0
    good = run_bounded(
        protocol_argv(
            "storescu",
            HOST,
            str(server.port),
            str(dicom_file),
            "--tls",
            "--tls-ca",
            str(pki["ca_crt"]),
        ),
        cwd=tmp_path,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr


def test_dcmtk_storescu_stores_over_tls_to_our_storescp(
    run_app: Callable[..., Server], pki: dict[str, Path], dicom_file: Path, tmp_path: Path
) -> None:
    tool = require_dcmtk("storescu")["storescu"]
    server = _our_tls_storescp(run_app, pki, tmp_path / "out", "--tls-require-client-cert")
    result = run_bounded(
        [
            tool,
            "+tls",
            str(pki["client_key"]),
            str(pki["client_crt"]),
            "+cf",
            str(pki["ca_crt"]),
            HOST,
            str(server.port),
            str(dicom_file),
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(received_files(tmp_path / "out")) == 1


def test_our_storescu_stores_over_tls_to_dcmtk_storescp(
    processes: ProcessManager, pki: dict[str, Path], dicom_file: Path, tmp_path: Path
) -> None:
    tool = require_dcmtk("storescp")["storescp"]
    out = tmp_path / "dcmtk-out"
    out.mkdir()
    server = processes.start(
        "dcmtk-tls-storescp",
        lambda p: [
            tool,
            "+tls",
            str(pki["server_key"]),
            str(pki["server_crt"]),
            "+cf",
            str(pki["ca_crt"]),
            "-od",
            str(out),
            str(p),
        ],
        output_dir=out,
    )
    result = run_bounded(
        protocol_argv(
            "storescu",
            HOST,
            str(server.port),
            str(dicom_file),
            "--tls",
            "--tls-ca",
            str(pki["ca_crt"]),
            "--tls-cert",
            str(pki["client_crt"]),
            "--tls-key",
            str(pki["client_key"]),
        ),
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(received_files(out)) == 1
