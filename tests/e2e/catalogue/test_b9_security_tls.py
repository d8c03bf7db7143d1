"""Catalogue B.9, TLS (SEC-10, SEC-12..15) against a node whose listener requires TLS
with a client certificate (serve --tls-cert --tls-key --tls-ca --tls-require-client-cert;
certificates from openssl, tests/e2e/security_support.py), and the worker's sender
towards TLS destinations (SEC-15; the full forwarding run is tests/e2e/
test_tls_destinations.py). DCMTK storescu +tls with our client certificate stores.

The listener refuses plain peers, so the shared ``invariant`` fixture (plain good peers)
cannot run here; each case checks its part of it: the bad peer is closed, the listener's
fds return to their baseline, and a good TLS peer (DCMTK storescu) works right after.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOST, ProcessWatch, associate_rq, catalogue_dataset

from router.db.repository import TlsOptions
from router.status import status_path
from router.tls import TLS12_CIPHERS
from tests.e2e.ingest_support import free_port, require_dcmtk, write_part10
from tests.e2e.security_support import SecureNode, make_pki
from workers.retry import Failure, Verdict, classify
from workers.sender import Destination, DestinationPool, Item, tls_context

ARTIM = 2.0  # also the TLS handshake deadline (protocol/net/server.py)
WITHIN = 15.0
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[SecureNode]:
    node = SecureNode(
        tmp_path_factory.mktemp("tls-node"),
        env={"DICOM_ROUTER_LISTENER_ACSE_TIMEOUT": str(ARTIM)},
    )
    node.serve(
        "--tls-cert", str(pki["server_crt"]), "--tls-key", str(pki["server_key"]),
        "--tls-ca", str(pki["ca_crt"]), "--tls-require-client-cert",
        workers=0,
    )  # fmt: skip
    # Warm up what the listener opens lazily (the audit file, database connections), so
    # that the first case's fd baseline is the steady state.
    _dcmtk_store(node, pki, node.root)
    yield node
    node.kill()


@pytest.fixture
def watch(node: SecureNode, pki: dict[str, Path], tmp_path: Path) -> Iterator[ProcessWatch]:
    """The per-case invariant: the listener's fds back to baseline, a good TLS peer after."""
    state = json.loads(status_path(node.data).read_text())
    pids = [int(c["pid"]) for n, c in state["children"].items() if n.startswith("listener")]
    watch = ProcessWatch(pids)
    yield watch
    _dcmtk_store(node, pki, tmp_path)
    watch.assert_back_to_baseline(timeout=15)


def _dcmtk_store(node: SecureNode, pki: dict[str, Path], tmp: Path) -> None:
    ds = catalogue_dataset()
    path = write_part10(ds, tmp / "good.dcm")
    argv = [
        require_dcmtk("storescu"), "-aec", "ROUTER",
        "+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca_crt"]),
        HOST, str(node.port), str(path),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    uid = str(ds.SOPInstanceUID)
    assert node.query("select count(*) from instances where sop_instance_uid = ?", uid) == [(1,)]


def _client(
    pki: dict[str, Path],
    cert: str | None = "client",
    *,
    maximum: ssl.TLSVersion | None = None,
    minimum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_crt"]))
    if cert is not None:
        context.load_cert_chain(pki[f"{cert}_crt"], pki[f"{cert}_key"])
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def _associates(port: int, context: ssl.SSLContext) -> bool:
    """Whether an A-ASSOCIATE-RQ over TLS with ``context`` gets an A-ASSOCIATE-AC. A
    handshake refused (either side), or a certificate refused after it (TLS 1.3 checks
    the client's certificate after the client thinks it is done), is False."""
    raw = socket.create_connection((HOST, port), timeout=WITHIN)
    try:
        with context.wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(associate_rq(calling="TLSPEER"))
            return tls.recv(1)[:1] == b"\x02"
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return False
    finally:
        raw.close()


# -- the listener's TLS with DCMTK --------------------------------------------------------
def test_dcmtk_storescu_over_tls_with_a_client_certificate(node, pki, watch, tmp_path):
    _dcmtk_store(node, pki, tmp_path)
    anonymous = subprocess.run(
        [require_dcmtk("storescu"), "-aec", "ROUTER", "+tla", "+cf", str(pki["ca_crt"]),
         HOST, str(node.port), str(write_part10(catalogue_dataset(), tmp_path / "a.dcm"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert anonymous.returncode != 0  # no client certificate: refused


# -- SEC-10 -------------------------------------------------------------------------------
def test_sec_10_plain_client_on_the_tls_port_is_closed(node, watch):
    """A plain A-ASSOCIATE-RQ on the TLS port: the handshake fails, the connection is
    closed (at most a TLS alert comes back, never an A-ASSOCIATE-AC), fds are freed."""
    with socket.create_connection((HOST, node.port), timeout=WITHIN) as sock:
        sock.sendall(associate_rq(calling="PLAINPEER"))
        received = b""
        deadline = time.monotonic() + WITHIN
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        else:
            raise AssertionError("not closed")
    assert not received.startswith(b"\x02")
    assert received == b"" or received[0] == 0x15  # nothing, or a TLS alert record


def test_sec_10_a_failed_handshake_is_logged_once_with_the_peer(node):
    offset = len(node.log())
    with socket.create_connection((HOST, node.port), timeout=WITHIN) as sock:
        sock.sendall(associate_rq(calling="PLAINPEER"))
        host, port = sock.getsockname()[:2]
        local = f"{host}:{port}"
        with pytest.raises((ConnectionError, TimeoutError, OSError)):
            while sock.recv(4096):
                pass
            raise ConnectionResetError
    time.sleep(1)
    lines = [line for line in node.log()[offset:].splitlines() if local in line]
    assert len(lines) == 1, lines


# -- SEC-12 -------------------------------------------------------------------------------
def test_sec_12_tls_1_0_and_1_1_are_refused(node, pki, watch):
    old = _client(pki, maximum=ssl.TLSVersion.TLSv1_1, minimum=ssl.TLSVersion.TLSv1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    assert not _associates(node.port, old)


def test_sec_12_tls_1_2_without_aead_is_refused(node, pki, watch):
    for suite in ("AES128-SHA", "ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA"):
        context = _client(pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers=suite)
        assert not _associates(node.port, context), suite


def test_sec_12_tls_1_2_aead_and_tls_1_3_are_accepted(node, pki, watch):
    assert _associates(node.port, _client(pki, minimum=ssl.TLSVersion.TLSv1_3))
    tls12 = _client(pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    assert _associates(node.port, tls12)
    assert "ECDHE+AESGCM" in TLS12_CIPHERS


# -- SEC-13 -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cert", "version"),
    [
        (None, ssl.TLSVersion.TLSv1_3),
        (None, ssl.TLSVersion.TLSv1_2),
        ("rogue_client", ssl.TLSVersion.TLSv1_3),
        ("rogue_client", ssl.TLSVersion.TLSv1_2),
        ("expired", ssl.TLSVersion.TLSv1_3),
    ],
    ids=["none-1.3", "none-1.2", "untrusted-ca-1.3", "untrusted-ca-1.2", "expired-1.3"],
)
def test_sec_13_mtls_refuses_a_missing_untrusted_or_expired_client_certificate(
    node, pki, watch, cert, version
):
    context = _client(pki, cert, minimum=version, maximum=version)
    assert not _associates(node.port, context)


def test_sec_13_a_refused_client_certificate_is_audited(node, pki):
    before = (node.data / "audit" / "audit.jsonl").read_text().count("\n")
    assert not _associates(node.port, _client(pki, "rogue_client"))
    time.sleep(1)
    after = (node.data / "audit" / "audit.jsonl").read_text()
    assert after.count("\n") > before and "110113" in after.splitlines()[-1]


# -- SEC-14 -------------------------------------------------------------------------------
def test_sec_14_a_slow_client_hello_is_closed_by_the_handshake_deadline(node, pki, watch):
    """Catalogue: one byte every 5 s; here one every 0.5 s against a 2 s deadline
    (ARTIM): the listener closes before the ClientHello is complete."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _client(pki).wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    started = time.monotonic()
    with socket.create_connection((HOST, node.port), timeout=WITHIN) as sock:
        sent = 0
        try:
            for byte in hello:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.5)
                if time.monotonic() - started > ARTIM + WITHIN:
                    break
            closed = False
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        if not closed:
            sock.settimeout(1)
            try:
                closed = sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed = True
    assert closed and sent < len(hello), f"sent {sent} of {len(hello)} bytes"
    assert time.monotonic() - started < ARTIM + WITHIN


# -- SEC-15 -------------------------------------------------------------------------------
@pytest.mark.parametrize("certificate", ["rogue_server", "wrong_host", "plain"])
def test_sec_15_worker_to_an_unverified_tls_destination_fails_closed(pki, tmp_path, certificate):
    """The worker's sender (workers/sender.py with its verified context) towards a
    pynetdicom SCP with a certificate of an untrusted CA, one naming another host, or no
    TLS at all: the attempt fails, nothing is stored in clear, and the first two are a
    dead letter at once (configuration error), the third a retry (the peer spoke no TLS)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    stored: list[str] = []
    ae = AE("PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server_context = None
    if certificate != "plain":
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(pki[f"{certificate}_crt"], pki[f"{certificate}_key"])
    port = free_port()
    server = ae.start_server(
        (HOST, port),
        block=False,
        ssl_context=server_context,
        evt_handlers=[(evt.EVT_C_STORE, lambda e: stored.append("x") or 0)],
    )
    try:
        path = write_part10(catalogue_dataset(), tmp_path / "x.dcm")
        options = TlsOptions(str(pki["ca_crt"]))
        pool = DestinationPool(
            Destination("pacs", "PACS", HOST, port, 1, tls=options),
            "ROUTER",
            tls=tls_context(options),
        )

        async def send() -> object:
            try:
                return await pool.send(Item(path, CT_IMAGE, "1.2.840.10008.1.2.1"))
            finally:
                await pool.close()

        outcome = asyncio.run(send())
    finally:
        server.shutdown()
    assert stored == []
    verdict, reason = classify(outcome)  # type: ignore[arg-type]
    if certificate == "plain":
        assert verdict is Verdict.RETRY and outcome.failure is not Failure.TLS_NOT_VERIFIED  # type: ignore[attr-defined]
    else:
        assert outcome.failure is Failure.TLS_NOT_VERIFIED, outcome  # type: ignore[attr-defined]
        assert verdict is Verdict.DEAD and "TLS certificate not verified" in reason
