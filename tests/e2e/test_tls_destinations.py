"""TLS towards destinations (PS3.15 B.1): `destinations add --tls`, the worker's verified
context, `destinations echo` over TLS; DCMTK storescp and pynetdicom as TLS SCPs; an
untrusted or misnamed certificate fails closed and is dead-lettered (catalogue SEC-15)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ingest_support import HOST, free_port, make_dataset, require_dcmtk, write_part10
from pydicom import dcmread
from security_support import SecureNode, TlsStorescp, make_pki, wait_for

from workers.worker import _TLS_FRESH


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNode]:
    """One forwarding node for the module; each test adds its own destination and a rule
    for its own calling AE title (the rules and destinations are read per association
    and per lease)."""
    node = SecureNode(tmp_path_factory.mktemp("tls-destinations"))
    node.serve()
    yield node
    node.kill()


def _jobs(node: SecureNode, name: str) -> list[tuple[str, str | None]]:
    return [(state, error) for dest, state, error in node.jobs() if dest == name]


def _send(node: SecureNode, tmp_path: Path, calling: str, count: int = 3) -> set[str]:
    study = tmp_path / "study"
    study.mkdir(exist_ok=True)
    uids = set()
    for i in range(count):
        ds = make_dataset("CT")
        write_part10(ds, study / f"{i}.dcm")
        uids.add(str(ds.SOPInstanceUID))
    result = subprocess.run(
        [
            require_dcmtk("storescu"),
            "-aet",
            calling,
            "-aec",
            "ROUTER",
            "+sd",
            HOST,
            str(node.port),
            str(study),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return uids


def _add(node: SecureNode, port: int, *tls: str, name: str) -> None:
    """Destination ``name`` and a rule sending it what calling AE ``name.upper()`` stores."""
    node.cli(
        "destinations", "add", name, "--aet", "PACS", "--host", HOST, "--port", str(port), *tls
    )
    node.cli("rules", "add", name, "--to", name, "--when", f"calling_aet == {name.upper()}")


def _attempts(node: SecureNode, name: str) -> int:
    ((count,),) = node.query(
        "select count(*) from attempts a join jobs j on j.id = a.job_id"
        " join destinations d on d.id = j.destination_id where d.name = ?",
        name,
    )
    assert isinstance(count, int)
    return count


def _re_add_with_tls(node: SecureNode, name: str, port: int, ca: Path) -> None:
    """Remove destination ``name`` and its rule and add both back, the destination with
    TLS on ``port``: what `rules remove`, `destinations remove`, `destinations add --tls`
    and `rules add` do, in one process, so that it fits well inside the worker's cache
    window (four CLI starts took most of it)."""
    from router.db.engine import make_engine
    from router.db.repository import Repository, TlsOptions

    engine = make_engine(f"sqlite:///{node.data / 'router.sqlite'}")
    try:
        repository = Repository(engine)
        rule = repository.get_rule(name)
        old = repository.get_destination(name)
        repository.remove_rule(name)
        repository.remove_destination(name)
        repository.add_destination(name, old.ae_title, old.host, port, tls=TlsOptions(ca=str(ca)))
        repository.add_rule(rule)
    finally:
        engine.dispose()


def _pynetdicom_scp(pki: dict[str, Path] | None, received: list[str]) -> tuple[Any, int]:
    """A pynetdicom storage SCP on a free port (TLS with the server certificate when
    ``pki`` is given) appending each SOP Instance UID it stores to ``received``."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    context = None
    if pki is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki["server_crt"], pki["server_key"])
    ae = AE("PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
    return ae.start_server(
        (HOST, port), block=False, ssl_context=context, evt_handlers=handlers
    ), port


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
            name="dcmtk",
        )
        listed = {
            d["name"]: d for d in json.loads(node.cli("destinations", "list", "--json").stdout)
        }
        assert listed["dcmtk"]["tls"] is True
        assert listed["dcmtk"]["tls_ca"] == str(pki["ca_crt"].resolve())
        assert listed["dcmtk"]["tls_cert"] == str(pki["client_crt"].resolve())
        echoed = json.loads(node.cli("destinations", "echo", "dcmtk", "--json").stdout)
        assert echoed["status"] == "0x0000"
        uids = _send(node, tmp_path, "DCMTK")
        assert wait_for(lambda: len(scp.received()) == 3, 120), node.log()[-3000:]
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received()}
        assert got == uids
        assert wait_for(lambda: {s for s, _ in _jobs(node, "dcmtk")} == {"done"}, 60)
    finally:
        scp.stop()


def test_forwards_to_a_pynetdicom_tls_scp(
    node: SecureNode, pki: dict[str, Path], tmp_path: Path
) -> None:
    received: list[str] = []
    server, port = _pynetdicom_scp(pki, received)
    try:
        _add(node, port, "--tls", "--tls-ca", str(pki["ca_crt"]), name="pynet")
        uids = _send(node, tmp_path, "PYNET")
        assert wait_for(lambda: set(received) == uids, 120), node.log()[-3000:]
    finally:
        server.shutdown()


def test_sec_15_an_untrusted_destination_fails_closed_and_is_dead_lettered(
    node: SecureNode, pki: dict[str, Path], tmp_path: Path
) -> None:
    """A certificate of an untrusted CA: the TLS handshake fails, nothing is sent in
    clear, each job is dead-lettered at once (a configuration error) with the reason in
    its last error; `destinations echo` says the same. (A certificate for another host
    name: tests/e2e/catalogue/test_b9_security_tls.py, at the sender.)"""
    scp = TlsStorescp(
        tmp_path, pki["rogue_server_key"], pki["rogue_server_crt"], pki["ca_crt"], "-ic"
    )
    try:
        _add(node, scp.port, "--tls", "--tls-ca", str(pki["ca_crt"]), name="rogue")
        echo = node.cli("destinations", "echo", "rogue", check=False)
        assert echo.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in echo.stderr, echo.stderr
        _send(node, tmp_path, "ROGUE", count=2)
        assert wait_for(lambda: [s for s, _ in _jobs(node, "rogue")] == ["dead", "dead"], 120), (
            node.jobs(),
            node.log()[-3000:],
        )
        for _, error in _jobs(node, "rogue"):
            assert error is not None and "TLS certificate not verified" in error, error
        assert _attempts(node, "rogue") == 2  # once each: never retried, never in clear
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
    names = {d["name"] for d in json.loads(node.cli("destinations", "list", "--json").stdout)}
    assert "x" not in names


def test_a_destination_re_added_with_tls_is_never_sent_to_in_clear(
    node: SecureNode, pki: dict[str, Path], tmp_path: Path
) -> None:
    """The worker caches a destination's TLS options for a few seconds. A destination
    removed and re-added with --tls inside that window is sent to over TLS from its first
    attempt (the lease says tls, messages revision 1.5): no clear-text association, so no
    failed attempt and no retry."""
    received: list[str] = []
    plain, plain_port = _pynetdicom_scp(None, received)
    secure, tls_port = _pynetdicom_scp(pki, received)
    (tmp_path / "plain").mkdir()
    (tmp_path / "tls").mkdir()
    try:
        _add(node, plain_port, name="swap")
        cached_at = time.monotonic()  # the first lease fills the worker's cache after this
        first = _send(node, tmp_path / "plain", "SWAP", count=1)
        assert wait_for(lambda: [s for s, _ in _jobs(node, "swap")] == ["done"], 60)
        _re_add_with_tls(node, "swap", tls_port, pki["ca_crt"])
        second = _send(node, tmp_path / "tls", "SWAP", count=1)
        # Otherwise the cache had expired and the test proved nothing.
        assert time.monotonic() - cached_at < _TLS_FRESH, "re-added too late for the cache"
        assert wait_for(lambda: set(received) == first | second, 60), node.log()[-3000:]
        assert _attempts(node, "swap") == 1, node.log()[-3000:]  # the re-added one's job
    finally:
        plain.shutdown()
        secure.shutdown()
