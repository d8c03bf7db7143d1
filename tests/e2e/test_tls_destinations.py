"""TLS towards destinations (PS3.15 B.1): `destinations add --tls`, the worker's verified
context, `destinations echo` over TLS; DCMTK storescp and pynetdicom as TLS SCPs; an
untrusted or misnamed certificate fails closed and is dead-lettered (catalogue SEC-15)."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingest_support import HOST, free_port, make_dataset, require_dcmtk, write_part10
from pydicom import dcmread
from security_support import SecureNode, TlsStorescp, make_pki, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SecureNode]:
    node = SecureNode(tmp_path / "node")
    yield node
    node.kill()


def _send(node: SecureNode, tmp_path: Path, count: int = 3) -> set[str]:
    study = tmp_path / "study"
    study.mkdir(exist_ok=True)
    uids = set()
    for i in range(count):
        ds = make_dataset("CT")
        write_part10(ds, study / f"{i}.dcm")
        uids.add(str(ds.SOPInstanceUID))
    result = subprocess.run(
        [require_dcmtk("storescu"), "-aec", "ROUTER", "+sd", HOST, str(node.port), str(study)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return uids


def _add(node: SecureNode, port: int, *tls: str, name: str = "pacs") -> None:
    node.cli(
        "destinations", "add", name, "--aet", "PACS", "--host", HOST, "--port", str(port), *tls
    )
    node.cli("rules", "add", f"all-{name}", "--to", name)


def test_forwards_to_dcmtk_storescp_requiring_our_client_certificate(
    node: SecureNode, pki: dict[str, Path], tmp_path: Path
) -> None:
    scp = TlsStorescp(tmp_path, pki["server_key"], pki["server_crt"], pki["ca_crt"], "-rc")
    try:
        _add(
            node,
            scp.port,
            "--tls",
            "--tls-ca",
            str(pki["ca_crt"]),
            "--tls-cert",
            str(pki["client_crt"]),
            "--tls-key",
            str(pki["client_key"]),
        )
        listed = json.loads(node.cli("destinations", "list", "--json").stdout)
        assert listed[0]["tls"] is True
        assert listed[0]["tls_ca"] == str(pki["ca_crt"].resolve())
        assert listed[0]["tls_cert"] == str(pki["client_crt"].resolve())
        echoed = json.loads(node.cli("destinations", "echo", "pacs", "--json").stdout)
        assert echoed["status"] == "0x0000"
        node.serve()
        uids = _send(node, tmp_path)
        assert wait_for(lambda: len(scp.received()) == 3, 60), node.log()[-3000:]
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received()}
        assert got == uids
        assert wait_for(lambda: {s for _, s, _ in node.jobs()} == {"done"}, 30), node.jobs()
    finally:
        scp.stop()


def test_forwards_to_a_pynetdicom_tls_scp(
    node: SecureNode, pki: dict[str, Path], tmp_path: Path
) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_crt"], pki["server_key"])
    ae = AE("PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        (HOST, port), block=False, ssl_context=context, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        _add(node, port, "--tls", "--tls-ca", str(pki["ca_crt"]))
        node.serve()
        uids = _send(node, tmp_path)
        assert wait_for(lambda: set(received) == uids, 60), node.log()[-3000:]
    finally:
        server.shutdown()


@pytest.mark.parametrize("certificate", ["rogue_server", "wrong_host"])
def test_sec_15_an_unverified_destination_fails_closed_and_is_dead_lettered(
    node: SecureNode, pki: dict[str, Path], tmp_path: Path, certificate: str
) -> None:
    """An untrusted CA or a certificate for another host name: the TLS handshake fails,
    nothing is sent in clear, the job is dead-lettered at once (a configuration error)
    with the reason in its last error; `destinations echo` says the same."""
    key, crt = pki[f"{certificate}_key"], pki[f"{certificate}_crt"]
    scp = TlsStorescp(tmp_path, key, crt, pki["ca_crt"], "-ic")
    try:
        _add(node, scp.port, "--tls", "--tls-ca", str(pki["ca_crt"]))
        echo = node.cli("destinations", "echo", "pacs", check=False)
        assert echo.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in echo.stderr, echo.stderr
        node.serve()
        _send(node, tmp_path, count=2)
        assert wait_for(lambda: [s for _, s, _ in node.jobs()] == ["dead", "dead"], 60), (
            node.jobs(),
            node.log()[-3000:],
        )
        for _, _, error in node.jobs():
            assert error is not None and "TLS certificate not verified" in error, error
        attempts = node.query("select count(*) from attempts")[0][0]
        assert attempts == 2  # once each: never retried, never in clear
        assert scp.received() == []
    finally:
        scp.stop()


def test_destinations_add_checks_its_tls_options(node: SecureNode, pki: dict[str, Path]) -> None:
    base = ("destinations", "add", "x", "--aet", "X", "--host", HOST, "--port", "104")
    bad = node.cli(*base, "--tls-ca", str(pki["ca_crt"]), check=False)
    assert bad.returncode == 2 and "need --tls" in bad.stderr
    bad = node.cli(*base, "--tls", "--tls-cert", str(pki["client_crt"]), check=False)
    assert bad.returncode == 2 and "go together" in bad.stderr
    bad = node.cli(*base, "--tls", "--tls-ca", "/nonexistent/ca.pem", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: destination TLS files")
    assert json.loads(node.cli("destinations", "list", "--json").stdout) == []
