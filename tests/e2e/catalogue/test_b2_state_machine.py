"""Catalogue B.2, state-machine violations, against a live ``dicom-router serve`` (layer I).

Every case runs with the catalogue's ``invariant`` (a good DCMTK store and a pynetdicom
echo afterwards; fds, tasks and spool/tmp back to baseline; one WARNING line per bad
peer; no row for anything unacknowledged). The node's ARTIM is the harness's ``ARTIM``
(2 s), so the Sta2/Sta13 cases finish in seconds.

Where the rest lives:

* SM-01 (every cell of PS3.8 Table 9-10, layer U) is tests/unit/test_fsm.py; SM-15 (an
  A-ASSOCIATE-AC with a context or transfer syntax we never offered, layer U) is
  tests/unit/test_acse.py.
* SM-16 (a destination silent after TCP connect) is test_b8_destinations.py's
  ``DST-03-no-ac`` case (the worker's ACSE timeout, abort, retry).
* SM-07, SM-08 and SM-17 are the worker's side: the listener never requests a release
  (so it is never in Sta7, Sta9-Sta12) and never receives an A-ASSOCIATE-AC; they are
  tests/unit/test_fsm.py cells (AR-6, AR-8..AR-10, AA-8) and the worker cases below.

Two bugs these cases found are fixed (babc47c): SM-06 with both PDUs in one TCP segment
crashed ``data_received`` (asyncio "Fatal error", the abort's WARNING lost), and SM-14
answered the first data set with the second request's Message ID and UID.
"""

from __future__ import annotations

import select
import time

import pytest
from harness import (
    ABORT_1,
    ABORT_U,
    COMMAND_LAST,
    CT_IMAGE,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    VERIFICATION,
    RawPeer,
    abort,
    abort_8,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    dataset_bytes,
    p_data_tf,
    pdu,
    pdv,
    release_rp,
    release_rq,
    store_pdata,
)
from pydicom.uid import generate_uid

from tests.e2e.catalogue.conftest import ARTIM

#: Verification on 1 (Implicit VR LE) and CT Image Storage on 3 (Explicit VR LE).
CONTEXTS = ((1, VERIFICATION, (IMPLICIT_LE,)), (3, CT_IMAGE, (EXPLICIT_LE,)))
#: ARTIM plus room for a loaded machine (DESIGN §8: behaviour, not speed).
CLOSE_WITHIN = ARTIM + 10
ABORT_8_UNEXPECTED = abort_8(2)  # PS3.8 9.3.8 reason 2: unexpected PDU


def _poll(peer: RawPeer, within: float) -> bytes | None:
    """What arrives within ``within`` s: bytes, b"" for a close, None for silence."""
    sock = peer.sock
    assert sock is not None
    ready, _, _ = select.select([sock], [], [], within)
    if not ready:
        return None
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def _partial_store(peer: RawPeer, uid: str) -> None:
    """A C-STORE-RQ and the first, non-last fragment of its data set (in flight)."""
    command, *fragments = store_pdata(3, 1, CT_IMAGE, uid, dataset_bytes(uid), fragment=64)
    peer.send(command + fragments[0])
    time.sleep(0.3)  # the listener has opened its temporary file


# --------------------------------------------------------------------------------------
# Sta2: anything but an A-ASSOCIATE-RQ first is AA-1
# --------------------------------------------------------------------------------------
def test_sm_02_p_data_before_any_associate_rq_gets_abort_1(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(1))))
        peer.expect_abort_and_close(ABORT_1, within=CLOSE_WITHIN)
    invariant.expect_warning(r"aborted \(source 0, reason 0\): unexpected PDataTF")


AC = pdu(0x02, associate_rq()[6:])  # a well-formed A-ASSOCIATE-AC body shape (type 2)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(release_rq(), id="A-RELEASE-RQ"),
        pytest.param(release_rp(), id="A-RELEASE-RP"),
        pytest.param(AC, id="A-ASSOCIATE-AC"),
        pytest.param(bytes.fromhex("03 00 00 00 00 04 00 01 01 01"), id="A-ASSOCIATE-RJ"),
    ],
)
def test_sm_03_release_or_associate_answer_as_first_pdu_gets_abort_1(
    catalogue_node, invariant, frame
):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(frame)
        peer.expect_abort_and_close(ABORT_1, within=CLOSE_WITHIN)
    invariant.expect_warning(r"aborted \(source 0, reason 0\)")


# --------------------------------------------------------------------------------------
# Sta6/Sta8: unexpected PDUs are AA-8 (source 2, reason 2)
# --------------------------------------------------------------------------------------
def test_sm_04_second_associate_rq_in_sta6_gets_abort_8_2(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        assert peer.echo() == 0
        peer.send(associate_rq(contexts=CONTEXTS))
        peer.expect_abort_and_close(ABORT_8_UNEXPECTED, within=CLOSE_WITHIN)
    invariant.expect_warning(r"aborted \(source 2, reason 2\): unexpected AAssociateRQ")


def test_sm_04_second_associate_rq_during_a_c_store_leaves_it_unacknowledged(
    catalogue_node, invariant
):
    """The in-flight C-STORE gets no response, its temporary file goes and no row is
    made (the invariant checks spool/tmp and the rows)."""
    uid = generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        _partial_store(peer, uid)
        peer.send(associate_rq(contexts=CONTEXTS))
        peer.expect_abort_and_close(ABORT_8_UNEXPECTED, within=CLOSE_WITHIN)
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"unexpected AAssociateRQ")


def test_sm_04_echo_and_second_associate_rq_in_one_segment(catalogue_node, invariant):
    """Regression (babc47c): the C-ECHO-RQ before the abort in the same read was
    answered in Sta13 (LocalProtocolError out of data_received)."""
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(2))) + associate_rq())
        peer.expect_abort_and_close(ABORT_8_UNEXPECTED, within=CLOSE_WITHIN)
    invariant.expect_warning(r"unexpected AAssociateRQ")


def test_sm_05_release_rp_in_sta6_gets_abort_8_2(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(release_rp())
        peer.expect_abort_and_close(ABORT_8_UNEXPECTED, within=CLOSE_WITHIN)
    invariant.expect_warning(r"aborted \(source 2, reason 2\): unexpected AReleaseRP")


def test_sm_06_p_data_after_release_rq_in_one_segment_gets_abort_8_2(catalogue_node, invariant):
    """Both PDUs in one write reach the state machine in Sta8 (the A-RELEASE response is
    not given yet): P-DATA there is AA-8. Regression (babc47c): the release indication
    was then answered in Sta13 and the abort's WARNING line lost."""
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(release_rq() + p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(2))))
        peer.expect_abort_and_close(ABORT_8_UNEXPECTED, within=CLOSE_WITHIN)
    invariant.expect_warning(r"aborted \(source 2, reason 2\): unexpected PDataTF")


def test_sm_06_p_data_after_the_release_rp_is_ignored_and_artim_closes(catalogue_node, invariant):
    """Sent after the listener's A-RELEASE-RP (it answers at once, AR-4), the P-DATA
    arrives in Sta13: ignored (AA-6), and ARTIM still closes the connection."""
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(release_rq())
        peer.expect(release_rp())
        peer.try_send(p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(2))))
        peer.expect_close(within=CLOSE_WITHIN)
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# the peer goes away in the middle of a data set
# --------------------------------------------------------------------------------------
def test_sm_09_peer_a_abort_mid_data_set_leaves_nothing(catalogue_node, invariant):
    """No C-STORE-RSP, no temporary file, no row; a peer's abort is INFO, not WARNING."""
    uid = generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        _partial_store(peer, uid)
        peer.send(abort(0, 0))
        peer.expect_close(within=CLOSE_WITHIN)
    assert uid not in catalogue_node.uids()
    invariant.expect_no_warning()


@pytest.mark.parametrize("how", ["FIN", "RST"])
def test_sm_10_peer_closes_tcp_mid_data_set_leaves_nothing(catalogue_node, invariant, how):
    uid = generate_uid()
    peer = RawPeer(HOST, catalogue_node.port).connect()
    peer.associate(contexts=CONTEXTS)
    _partial_store(peer, uid)
    if how == "RST":
        peer.reset()
    else:
        peer.close()
    deadline = time.monotonic() + 15
    while catalogue_node.tmp_files() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"the transport closed under the association")


# --------------------------------------------------------------------------------------
# Sta13: ARTIM closes what the peer leaves open
# --------------------------------------------------------------------------------------
def test_sm_11_peer_never_closes_after_our_a_abort(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(release_rp())
        peer.expect(ABORT_8_UNEXPECTED)
        waited = peer.expect_close(within=CLOSE_WITHIN)  # we never close: ARTIM does
    assert waited >= ARTIM * 0.5, f"closed after {waited:.2f} s, before ARTIM ({ARTIM} s)"
    invariant.expect_warning(r"unexpected AReleaseRP")


def test_sm_11_peer_never_closes_after_our_a_associate_rj(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(associate_rq(called="NOT-ROUTER", contexts=CONTEXTS))
        peer.expect(bytes.fromhex("03 00 00 00 00 04 00 01 01 07"))
        waited = peer.expect_close(within=CLOSE_WITHIN)
    assert waited >= ARTIM * 0.5, f"closed after {waited:.2f} s, before ARTIM ({ARTIM} s)"
    invariant.expect_warning(r"rejected \(result 1, source 1, reason 7\)")


def test_sm_11_peer_never_closes_after_our_a_release_rp(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(release_rq())
        peer.expect(release_rp())
        peer.expect_close(within=CLOSE_WITHIN)
    invariant.expect_no_warning()


def test_sm_12_p_data_in_sta13_after_our_rj_is_ignored_and_artim_still_closes(
    catalogue_node, invariant
):
    """P-DATA every 0.2 s after the A-ASSOCIATE-RJ: nothing comes back (AA-6), and the
    PDUs do not restart ARTIM: the close comes about ARTIM after the RJ."""
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(associate_rq(called="NOT-ROUTER", contexts=CONTEXTS))
        peer.expect(bytes.fromhex("03 00 00 00 00 04 00 01 01 07"))
        started = time.monotonic()
        closed_after = None
        while time.monotonic() - started < ARTIM + 10:
            if not peer.try_send(p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(1)))):
                closed_after = time.monotonic() - started
                break
            got = _poll(peer, 0.2)
            if got == b"":
                closed_after = time.monotonic() - started
                break
            assert got is None, f"answered in Sta13: {got.hex(' ')}"
    assert closed_after is not None, "still open ARTIM + 10 s after the A-ASSOCIATE-RJ"
    invariant.expect_warning(r"rejected \(result 1, source 1, reason 7\)")


def test_sm_13_silent_connection_is_closed_at_artim_without_a_pdu(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        waited = peer.expect_close(within=CLOSE_WITHIN)  # no A-ABORT: AA-2 just closes
    assert waited >= ARTIM * 0.5, f"closed after {waited:.2f} s, before ARTIM ({ARTIM} s)"
    invariant.expect_warning(r"no A-ASSOCIATE-RQ within 2 s \(ARTIM\), closing")


# --------------------------------------------------------------------------------------
# DIMSE ordering inside an association
# --------------------------------------------------------------------------------------
def test_sm_14_second_c_store_rq_before_the_first_response_is_abort_u(catalogue_node, invariant):
    """Policy (documented here and in protocol/net/server.py): no Asynchronous
    Operations Window is negotiated (PS3.7 D.3.3.3: one outstanding operation), so a
    second request before the first response is ABORT-U, and neither instance is
    acknowledged or kept. Regression (babc47c): the first data set was answered with
    the second request's Message ID and UID; the second was never answered."""
    first, second = generate_uid(), generate_uid()
    frames = [
        *store_pdata(3, 1, CT_IMAGE, first, dataset_bytes(first)),
        *store_pdata(3, 2, CT_IMAGE, second, dataset_bytes(second)),
    ]
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send_all(frames)
        peer.expect_abort_and_close(ABORT_U, within=CLOSE_WITHIN)
    assert not {first, second} & catalogue_node.uids()
    invariant.expect_warning(r"DIMSE violation, aborting: CStoreRQ while message 1 is outstanding")


def test_sm_18_release_rq_with_a_data_set_incomplete_is_an_abort(catalogue_node, invariant):
    """dcm4che's releaseAfterPendingPDV: an A-RELEASE-RQ after a non-last data PDV is
    answered with A-ABORT (ABORT-U), never A-RELEASE-RP; nothing acknowledged."""
    uid = generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        _partial_store(peer, uid)
        peer.send(release_rq())
        peer.expect_abort_and_close(ABORT_U, within=CLOSE_WITHIN)
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"A-RELEASE-RQ with a message in progress")


def test_sm_18_release_rq_between_command_and_data_set_is_an_abort(catalogue_node, invariant):
    uid = generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid))))
        peer.send(release_rq())
        peer.expect_abort_and_close(ABORT_U, within=CLOSE_WITHIN)
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"A-RELEASE-RQ with a message in progress")
