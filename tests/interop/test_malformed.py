"""Malformed PDUs over a raw socket to our storescp (catalogue B.0, B.1, B.2).

Each bad peer gets the A-ABORT bytes the catalogue prescribes and is closed; a
well-behaved DCMTK storescu running at the same time completes its C-STOREs; the
storescp (default logging) writes one WARNING line per bad peer, naming it.

ABORT-1 (anything invalid before the association, AA-1): 07 00 00 00 00 04 00 00 00 00.
ABORT-8(r) (invalid after it, AA-8): 07 00 00 00 00 04 00 00 02 r.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop_support import (
    HOST,
    describe,
    find_received,
    make_case,
    recv_pdu,
    recv_until_closed,
    require_dcmtk,
    run_bounded,
    sop_instance_uid,
)

# The frames of catalogue B.0, built by hand in one place (the catalogue harness).
from tests.e2e.catalogue.harness import ABORT_1, C_ECHO_PDATA, abort_8, associate_rq

#: ARTIM for these servers: after our A-ABORT the storescp waits at most this long for
#: the peer to close (Sta13) before closing itself.
ARTIM = 1


def test_b0_reference_frames_have_the_catalogue_lengths():
    rq = associate_rq()
    assert len(rq) == 191 and rq[:6] == bytes.fromhex("01 00 00 00 00 b9")
    assert len(C_ECHO_PDATA) == 80


# --------------------------------------------------------------------------------------
# bad peers
# --------------------------------------------------------------------------------------
@dataclass
class PeerResult:
    local_port: int
    data: bytes
    closed: bool
    elapsed: float
    associated: bool = False


def _bad_peer(port: int, payload: bytes, *, associate_first: bool = False) -> PeerResult:
    """Connect, optionally associate (B.0 RQ, expect AC), send ``payload``, then read
    until the server closes; never closes first itself."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        associated = False
        if associate_first:
            sock.sendall(associate_rq())
            pdu_type, _ = recv_pdu(sock)
            assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {pdu_type}"
            # A valid C-ECHO first: the association really works before the bad PDU.
            sock.sendall(C_ECHO_PDATA)
            pdu_type, _ = recv_pdu(sock)
            assert pdu_type == 0x04, f"expected P-DATA-TF (C-ECHO-RSP), got {pdu_type}"
            associated = True
        started = time.monotonic()
        sock.sendall(payload)
        data, closed = recv_until_closed(sock, timeout=ARTIM + 8)
        return PeerResult(local_port, data, closed, time.monotonic() - started, associated)


@dataclass(frozen=True)
class Case:
    expected: bytes
    payload: bytes
    associate_first: bool = False


CASES: dict[str, Case] = {
    # MP-05: unknown PDU types as the first PDU.
    "mp05_unknown_type_00_gets_abort_1": Case(
        ABORT_1, bytes.fromhex("00 00 00 00 00 04 11 22 33 44")
    ),
    "mp05_unknown_type_08_gets_abort_1": Case(
        ABORT_1, bytes.fromhex("08 00 00 00 00 04 00 00 00 00")
    ),
    "mp05_unknown_type_ff_gets_abort_1": Case(ABORT_1, b"\xff" * 64),
    "mp05_garbage_first_pdu_gets_abort_1": Case(ABORT_1, bytes(range(0x53, 0x53 + 40))),
    # MP-06: an HTTP request (type 0x47, length 1 163 141 167).
    "mp06_http_request_gets_abort_1": Case(ABORT_1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    # MP-07: a TLS ClientHello on the plain port.
    "mp07_tls_client_hello_gets_abort_1": Case(
        ABORT_1, bytes.fromhex("16 03 01 00 c8 01 00 00 c4 03 03") + bytes(32)
    ),
    # MP-01: A-ASSOCIATE-RQ announcing 4 GiB, then 1 KiB of zeros, then silence.
    "mp01_oversize_associate_length_gets_abort_1": Case(
        ABORT_1, bytes.fromhex("01 00 FF FF FF FF") + bytes(1024)
    ),
    # MP-03: A-ASSOCIATE-RQ of length 0.
    "mp03_zero_length_associate_gets_abort_1": Case(ABORT_1, bytes.fromhex("01 00 00 00 00 00")),
    # SM-02: a P-DATA-TF (valid C-ECHO) before any A-ASSOCIATE-RQ.
    "sm02_pdata_before_associate_gets_abort_1": Case(ABORT_1, C_ECHO_PDATA),
    # MP-30: after association, a PDV of length 1.
    "mp30_pdv_length_1_gets_abort_8_6": Case(
        abort_8(6), bytes.fromhex("04 00 00 00 00 05 00 00 00 01 01"), associate_first=True
    ),
    # MP-30: after association, a PDV of length 0.
    "mp30_pdv_length_0_gets_abort_8_6": Case(
        abort_8(6), bytes.fromhex("04 00 00 00 00 04 00 00 00 00"), associate_first=True
    ),
    # MP-29: after association, a P-DATA-TF without any PDV.
    "mp29_pdata_without_pdv_gets_abort_8_6": Case(
        abort_8(6), bytes.fromhex("04 00 00 00 00 00"), associate_first=True
    ),
    # MP-04: after association, a P-DATA-TF longer than the maximum we announced.
    "mp04_pdata_over_announced_maximum_gets_abort_8_6": Case(
        abort_8(6), bytes.fromhex("04 00 7F 00 00 00") + bytes(64), associate_first=True
    ),
    # MP-34: after association, an A-RELEASE-RQ whose length is not 4.
    "mp34_release_rq_length_8_gets_abort_8_6": Case(
        abort_8(6), bytes.fromhex("05 00 00 00 00 08") + bytes(8), associate_first=True
    ),
    # SM-04: a second A-ASSOCIATE-RQ inside an established association.
    "sm04_second_associate_rq_gets_abort_8_2": Case(
        abort_8(2), associate_rq(), associate_first=True
    ),
    # MP-31: a PDV whose length runs past the end of the PDU.
    "mp31_pdv_longer_than_pdu_gets_abort_8_6": Case(
        abort_8(6), bytes.fromhex("04 00 00 00 00 08 00 00 00 10 01 03 00 00"), associate_first=True
    ),
}


def _warning_lines_for(stderr: str, local_port: int) -> list[str]:
    peer = re.compile(rf"{re.escape(HOST)}:{local_port}(?!\d)")
    return [line for line in stderr.splitlines() if line.startswith("W:") and peer.search(line)]


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def storescp(run_app, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # Default logging (WARNING): the per-peer warnings are what the tests count.
    return run_app("storescp", "-ta", str(ARTIM), "-od", str(out))


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_pdu(name, storescp):
    case = CASES[name]
    result = _bad_peer(storescp.port, case.payload, associate_first=case.associate_first)
    assert result.data[:10] == case.expected, (
        f"{name}: expected {case.expected.hex(' ')}, got {result.data.hex(' ')!r}"
    )
    assert result.data == case.expected, (
        f"{name}: extra bytes after the A-ABORT: {result.data.hex(' ')}"
    )
    assert result.closed, f"{name}: the server did not close the connection"
    assert result.elapsed < ARTIM + 3, f"{name}: closed only after {result.elapsed:.1f} s"
    stderr = storescp.wait_for_stderr(
        lambda text: bool(_warning_lines_for(text, result.local_port))
    )
    lines = _warning_lines_for(stderr, result.local_port)
    assert len(lines) == 1, f"{name}: expected one WARNING line for the peer, got:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert storescp.proc.poll() is None


def test_mp01_oversize_associate_is_not_buffered(storescp):
    """No allocation proportional to the announced 4 GiB (catalogue MP-01)."""
    before = _vm_hwm_kib(storescp.pid)
    results = [
        _bad_peer(storescp.port, bytes.fromhex("01 00 FF FF FF FF") + bytes(64 * 1024))
        for _ in range(3)
    ]
    for result in results:
        assert result.data == ABORT_1 and result.closed
    grown = _vm_hwm_kib(storescp.pid) - before
    assert grown < 8 * 1024, f"peak RSS grew by {grown} KiB"


def test_bad_peers_do_not_disturb_a_concurrent_dcmtk_storescu(storescp, tmp_path):
    """Every bad peer of CASES at once, while DCMTK's storescu sends five instances."""
    storescu = require_dcmtk("storescu")["storescu"]
    originals = [
        make_case(case, tmp_path / "src")
        for case in (
            "ct_implicit_le",
            "mr_explicit_le",
            "ct_small",
            "jpeg_baseline",
            "rtplan_implicit",
        )
    ]
    start = threading.Barrier(len(CASES) + 1)

    def peer(case: Case) -> Callable[[], PeerResult]:
        def run() -> PeerResult:
            start.wait(timeout=10)
            return _bad_peer(storescp.port, case.payload, associate_first=case.associate_first)

        return run

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {name: pool.submit(peer(case)) for name, case in CASES.items()}
        start.wait(timeout=10)
        good = run_bounded(
            [storescu, "-xy", "-aec", "STORESCP", HOST, str(storescp.port), *map(str, originals)],
            timeout=60,
        )
        results = {name: future.result(timeout=60) for name, future in futures.items()}

    assert good.returncode == 0, describe(good) + "\nserver:\n" + storescp.stderr()
    assert storescp.output_dir is not None
    for original in originals:
        find_received(storescp.output_dir, sop_instance_uid(original))

    stderr = storescp.wait_for_stderr(
        lambda text: all(_warning_lines_for(text, r.local_port) for r in results.values())
    )
    for name, result in results.items():
        assert result.data == CASES[name].expected, f"{name}: got {result.data.hex(' ')}"
        assert result.closed, name
        lines = _warning_lines_for(stderr, result.local_port)
        assert len(lines) == 1, f"{name}: {len(lines)} WARNING lines for its peer:\n{stderr}"
    assert "Traceback" not in stderr, stderr
