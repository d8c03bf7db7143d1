"""The sans-IO Upper Layer: whole flows between two Connections, and the catalogue's
state-machine (SM-*) and malformed-PDU (MP-*) cases that land at this layer.

A ``ConnectionPair`` links a requestor and an acceptor through ``data_to_send`` /
``receive_data``; single-sided cases feed hand-built bytes (catalogue B.0).
SM-18 (release with a message in progress) needs the DIMSE assembler: it is tested there.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocol.connection import (
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    Closed,
    Connection,
    PDataReceived,
    ReleaseConfirmed,
    ReleaseRequested,
    Role,
    ULEvent,
)
from protocol.errors import (
    AssociationAborted,
    ConnectionClosed,
    LocalProtocolError,
    PDUDecodeError,
    RemoteProtocolError,
)
from protocol.fsm import State
from protocol.items import PresentationContextAC, PresentationContextRQ, UserInformation
from protocol.limits import Limits
from protocol.pdu import AAssociateAC, AAssociateRJ, AAssociateRQ, encode_pdata
from protocol.uids import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RQ = AAssociateRQ(
    "ROUTER",
    "MODALITY",
    (
        PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT_VR_LE,)),
        PresentationContextRQ(3, (CT_IMAGE,), (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),
    ),
    UserInformation(max_length=16384),
)
AC = AAssociateAC(
    "ROUTER",
    "MODALITY",
    (PresentationContextAC(1, 0, IMPLICIT_VR_LE), PresentationContextAC(3, 0, EXPLICIT_VR_LE)),
    UserInformation(max_length=32768),
)
RELEASE_RQ = bytes.fromhex("05 00 00000004 00000000")
RELEASE_RP = bytes.fromhex("06 00 00000004 00000000")
ABORT_1 = bytes.fromhex("07 00 00000004 00 00 00 00")  # catalogue B.0: ABORT-1


def abort_8(reason: int) -> bytes:
    return bytes.fromhex("07 00 00000004 00 00 02") + bytes((reason,))


def pdata(context_id: int = 1, data: bytes = b"\x00\x01", control: int = 0x03) -> bytes:
    return b"".join(bytes(b) for b in encode_pdata(context_id, control, data))


def drain(conn: Connection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


class ConnectionPair:
    """A requestor and an acceptor joined by an in-memory link (h11's ConnectionPair)."""

    def __init__(self, rq: AAssociateRQ = RQ, limits: Limits | None = None) -> None:
        self.requestor = Connection(Role.REQUESTOR, limits)
        self.acceptor = Connection(Role.ACCEPTOR, limits)
        self.requestor.request_association(rq)
        self.requestor.transport_connected()
        self.acceptor.transport_connected()

    def to_acceptor(self) -> list[ULEvent]:
        return self.acceptor.receive_data(drain(self.requestor))

    def to_requestor(self) -> list[ULEvent]:
        return self.requestor.receive_data(drain(self.acceptor))

    def associate(self, ac: AAssociateAC = AC) -> None:
        assert self.to_acceptor() == [AssociateRequested(self.requestor.associate_rq or RQ)]
        self.acceptor.accept(ac)
        assert self.to_requestor() == [AssociateAccepted(ac)]
        assert self.requestor.state is self.acceptor.state is State.Sta6


def established(role: Role) -> Connection:
    """One side in Sta6, its peer played with bytes."""
    pair = ConnectionPair()
    pair.associate()
    conn = pair.requestor if role is Role.REQUESTOR else pair.acceptor
    conn.data_to_send()
    return conn


def acceptor_in_sta2() -> Connection:
    conn = Connection(Role.ACCEPTOR)
    conn.transport_connected()
    return conn


def state_of(conn: Connection) -> State:
    """The state, read through a call (mypy would keep an earlier assert's narrowing)."""
    return conn.state


def only_abort(events: list[ULEvent]) -> Aborted:
    assert len(events) == 1 and isinstance(events[0], Aborted), events
    return events[0]


# --- whole flows ------------------------------------------------------------------------


def test_association_data_and_release_initiated_by_requestor() -> None:
    pair = ConnectionPair()
    pair.associate()
    r, a = pair.requestor, pair.acceptor
    # Negotiated values, from the RQ each side sent or received (PS3.8 9.3.3.2, D.1).
    expected = {1: (VERIFICATION, IMPLICIT_VR_LE), 3: (CT_IMAGE, EXPLICIT_VR_LE)}
    assert dict(r.accepted_contexts) == dict(a.accepted_contexts) == expected
    assert (r.peer_max_pdu_length, r.our_max_pdu_length) == (32768, 16384)
    assert (a.peer_max_pdu_length, a.our_max_pdu_length) == (16384, 32768)
    assert r.associate_ac == a.associate_ac == AC and a.associate_rq == RQ

    r.send_pdata(encode_pdata(3, 0x00, b"dataset"))
    [event] = pair.to_acceptor()
    assert isinstance(event, PDataReceived)
    assert [(p.context_id, bytes(p.data)) for p in event.pdu.pdvs] == [(3, b"dataset")]
    a.send_pdata(encode_pdata(1, 0x03, b"response"))
    assert isinstance(pair.to_requestor()[0], PDataReceived)

    r.request_release()
    assert pair.to_acceptor() == [ReleaseRequested(collision=False)]
    a.respond_release()
    assert a.state is State.Sta13 and a.artim_running  # AR-4: wait for the close
    assert pair.to_requestor() == [ReleaseConfirmed(), Closed()]
    assert r.state is State.Sta1 and r.should_close  # AR-3 closes
    assert a.connection_lost() == [Closed()]  # AR-5
    assert state_of(a) is State.Sta1 and not a.artim_running


def test_release_initiated_by_acceptor() -> None:
    pair = ConnectionPair()
    pair.associate()
    pair.acceptor.request_release()
    assert pair.to_requestor() == [ReleaseRequested(collision=False)]
    pair.requestor.respond_release()
    assert pair.to_acceptor() == [ReleaseConfirmed(), Closed()]


def test_rejected_association() -> None:
    pair = ConnectionPair()
    pair.to_acceptor()
    rj = AAssociateRJ(1, 1, 7)
    pair.acceptor.reject(rj)
    assert pair.acceptor.state is State.Sta13 and pair.acceptor.artim_running  # AE-8
    assert pair.to_requestor() == [AssociateRejected(rj), Closed()]  # AE-4
    assert pair.requestor.state is State.Sta1 and pair.requestor.should_close


def test_user_abort_reaches_the_peer() -> None:
    pair = ConnectionPair()
    pair.associate()
    pair.requestor.abort()
    assert pair.requestor.state is State.Sta13 and pair.requestor.artim_running  # AA-1
    assert pair.to_acceptor() == [Aborted(0, 0, False, None), Closed()]  # AA-3
    assert pair.acceptor.should_close


def test_abort_while_connecting_just_closes() -> None:
    conn = Connection(Role.REQUESTOR)
    conn.request_association(RQ)
    conn.abort()  # Sta4 + Evt15 -> AA-2
    assert conn.state is State.Sta1 and conn.should_close and drain(conn) == b""


def test_transport_lost_under_an_association_is_a_provider_abort() -> None:
    conn = established(Role.ACCEPTOR)
    [aborted, closed] = conn.connection_lost()  # AA-4: A-P-ABORT indication
    assert isinstance(aborted, Aborted) and closed == Closed()
    assert (aborted.source, aborted.reason, aborted.local) == (2, 0, True)
    assert isinstance(aborted.error, ConnectionClosed)
    assert conn.connection_lost() == []  # already closed: Evt17 in Sta1 is ignored


def test_local_request_in_an_empty_cell_raises_and_changes_nothing() -> None:
    conn = Connection(Role.REQUESTOR)
    conn.request_association(RQ)
    conn.transport_connected()
    sent = drain(conn)
    assert sent == RQ.encode()
    requests: list[Callable[[], None]] = [
        lambda: conn.send_pdata([pdata()]),
        conn.request_release,
        conn.respond_release,
        lambda: conn.accept(AC),
        lambda: conn.request_association(RQ),
    ]
    for request in requests:
        with pytest.raises(LocalProtocolError):
            request()
        assert conn.state is State.Sta5 and drain(conn) == b""
    with pytest.raises(LocalProtocolError):
        Connection(Role.ACCEPTOR).request_association(RQ)


@pytest.mark.parametrize(("source", "reason"), [(1, 0), (0, 2), (2, 3), (2, 7), (3, 0)])
def test_abort_request_with_invalid_fields_raises(source: int, reason: int) -> None:
    conn = established(Role.REQUESTOR)
    with pytest.raises(LocalProtocolError):
        conn.abort(source, reason)
    assert conn.state is State.Sta6


def test_provider_abort_request() -> None:
    conn = established(Role.ACCEPTOR)
    conn.abort(2, 6)
    assert drain(conn) == abort_8(6)


def test_accept_must_answer_proposed_contexts() -> None:
    conn = acceptor_in_sta2()
    conn.receive_data(RQ.encode())
    stray = AAssociateAC(
        "ROUTER", "MODALITY", (PresentationContextAC(5, 0, IMPLICIT_VR_LE),), UserInformation()
    )
    with pytest.raises(LocalProtocolError):
        conn.accept(stray)
    assert conn.state is State.Sta3 and drain(conn) == b""


def test_unrecognized_pdu_after_association_is_abort_8_1_and_desyncs() -> None:
    conn = established(Role.ACCEPTOR)
    aborted = only_abort(conn.receive_data(b"\x09\x00\x00\x00\x00\x04abcd" + RELEASE_RQ))
    assert drain(conn) == abort_8(1)
    assert isinstance(aborted.error, PDUDecodeError) and aborted.reason == 1
    assert conn.receive_data(RELEASE_RQ + pdata()) == []  # the stream has no framing now
    assert drain(conn) == b"" and conn.state is State.Sta13


# --- catalogue B.2: state-machine violations ---------------------------------------------


def test_SM_02_pdata_as_first_pdu_is_abort_1() -> None:
    conn = acceptor_in_sta2()
    aborted = only_abort(conn.receive_data(pdata()))  # nothing dispatched as PDataReceived
    assert drain(conn) == ABORT_1 and conn.state is State.Sta13 and conn.artim_running
    assert (aborted.source, aborted.reason, aborted.local) == (0, 0, True)
    assert isinstance(aborted.error, RemoteProtocolError) and aborted.error.reason == 2
    assert conn.timer_expired() == [Closed()] and conn.should_close


@pytest.mark.parametrize(
    "first", [RELEASE_RQ, RELEASE_RP, AC.encode(), AAssociateRJ(1, 1, 1).encode()]
)
def test_SM_03_release_or_associate_answer_as_first_pdu_is_abort_1(first: bytes) -> None:
    conn = acceptor_in_sta2()
    only_abort(conn.receive_data(first))
    assert drain(conn) == ABORT_1 and conn.state is State.Sta13


@pytest.mark.parametrize("role", list(Role))
def test_SM_04_SM_17_second_associate_rq_or_ac_when_established(role: Role) -> None:
    for pdu in (RQ.encode(), AC.encode()):
        conn = established(role)
        aborted = only_abort(conn.receive_data(pdu + pdata()))  # the P-DATA after is ignored
        assert drain(conn) == abort_8(2) and conn.state is State.Sta13
        assert (aborted.source, aborted.reason, aborted.local) == (2, 2, True)
        assert conn.artim_running


def test_SM_05_release_rp_without_release_rq() -> None:
    conn = established(Role.ACCEPTOR)
    only_abort(conn.receive_data(RELEASE_RP))
    assert drain(conn) == abort_8(2)


def test_SM_06_pdata_after_peers_release_rq() -> None:
    conn = established(Role.ACCEPTOR)
    assert conn.receive_data(RELEASE_RQ) == [ReleaseRequested(collision=False)]
    assert conn.state is State.Sta8
    conn.send_pdata([pdata()])  # AR-7: we may still send in Sta8
    assert drain(conn) == pdata()
    only_abort(conn.receive_data(pdata()))  # but the peer may not (AA-8)
    assert drain(conn) == abort_8(2)


def test_SM_07_pdata_while_awaiting_release_rp_is_delivered() -> None:
    pair = ConnectionPair()
    pair.associate()
    pair.requestor.request_release()
    pair.acceptor.send_pdata([pdata(1, b"C-STORE-RSP")])  # crossed on the wire
    [event] = pair.to_requestor()  # AR-6
    assert isinstance(event, PDataReceived) and bytes(event.pdu.pdvs[0].data) == b"C-STORE-RSP"
    assert pair.requestor.state is State.Sta7
    assert pair.to_acceptor() == [ReleaseRequested(collision=False)]
    pair.acceptor.respond_release()
    assert pair.to_requestor() == [ReleaseConfirmed(), Closed()]


@pytest.mark.parametrize("first", ["requestor", "acceptor"])
def test_SM_08_release_collision_ends_released_on_both_sides(first: str) -> None:
    pair = ConnectionPair()
    pair.associate()
    pair.requestor.request_release()
    pair.acceptor.request_release()
    r_events: list[ULEvent] = []
    a_events: list[ULEvent] = []
    rq_r, rq_a = drain(pair.requestor), drain(pair.acceptor)
    assert rq_r == rq_a == RELEASE_RQ
    # Deliver the crossed A-RELEASE-RQs in either order, then pump until quiet.
    if first == "requestor":
        a_events += pair.acceptor.receive_data(rq_r)
        r_events += pair.requestor.receive_data(rq_a)
    else:
        r_events += pair.requestor.receive_data(rq_a)
        a_events += pair.acceptor.receive_data(rq_r)
    for _ in range(3):
        a_events += pair.to_acceptor()
        r_events += pair.to_requestor()
    # AR-8 -> Sta9 -> AR-9 -> Sta11 -> AR-3 (requestor); AR-8 -> Sta10 -> AR-10 -> Sta12
    # -> AR-4 -> Sta13 (acceptor). Nobody aborts.
    assert r_events == [ReleaseRequested(collision=True), ReleaseConfirmed(), Closed()]
    assert a_events == [ReleaseRequested(collision=True), ReleaseConfirmed()]
    assert pair.requestor.state is State.Sta1 and pair.acceptor.state is State.Sta13
    assert pair.acceptor.connection_lost() == [Closed()]


def test_SM_08_manual_collision_response() -> None:
    r = Connection(Role.REQUESTOR, auto_collision_response=False)
    r.request_association(RQ)
    r.transport_connected()
    r.receive_data(AC.encode())
    r.request_release()
    assert r.receive_data(RELEASE_RQ) == [ReleaseRequested(collision=True)]
    assert r.state is State.Sta9
    r.data_to_send()
    r.respond_release()  # AR-9
    assert drain(r) == RELEASE_RP and state_of(r) is State.Sta11


@pytest.mark.parametrize("how", ["reject", "abort", "release"])
def test_SM_11_artim_closes_when_the_peer_never_does(how: str) -> None:
    conn = acceptor_in_sta2()
    conn.receive_data(RQ.encode())
    if how == "reject":
        conn.reject(AAssociateRJ(1, 1, 3))
    else:
        conn.accept(AC)
        if how == "abort":
            conn.abort()
        else:
            conn.receive_data(RELEASE_RQ)
            conn.respond_release()
    assert conn.state is State.Sta13 and conn.artim_running and not conn.should_close
    drain(conn)
    assert conn.timer_expired() == [Closed()]  # AA-2
    assert conn.should_close and not conn.artim_running and drain(conn) == b""


def test_SM_12_sta13_ignores_pdata_and_artim_still_closes() -> None:
    conn = acceptor_in_sta2()
    conn.receive_data(RQ.encode())
    conn.reject(AAssociateRJ(1, 1, 3))
    drain(conn)
    for _ in range(3):
        assert conn.receive_data(pdata() + RELEASE_RQ) == []  # AA-6
    assert drain(conn) == b"" and conn.state is State.Sta13
    assert conn.timer_expired() == [Closed()]


def test_SM_12_sta13_answers_a_new_associate_rq_with_abort() -> None:
    conn = acceptor_in_sta2()
    conn.receive_data(RQ.encode())
    conn.reject(AAssociateRJ(1, 1, 3))
    drain(conn)
    assert conn.receive_data(RQ.encode()) == []  # AA-7
    assert drain(conn) == abort_8(2) and conn.state is State.Sta13


def test_SM_13_silent_connection_closes_on_artim_without_abort() -> None:
    conn = acceptor_in_sta2()
    assert conn.artim_running  # AE-5
    assert conn.timer_expired() == [Closed()]  # Sta2 + Evt18 -> AA-2
    assert drain(conn) == b"" and conn.should_close
    assert conn.timer_expired() == []  # a stale expiry is ignored


def _requestor_receives(ac: AAssociateAC) -> tuple[Connection, list[ULEvent]]:
    conn = Connection(Role.REQUESTOR)
    conn.request_association(RQ)
    conn.transport_connected()
    drain(conn)
    return conn, conn.receive_data(ac.encode())


@pytest.mark.parametrize(
    "context",
    [PresentationContextAC(5, 0, IMPLICIT_VR_LE), PresentationContextAC(1, 0, EXPLICIT_VR_LE)],
)
def test_SM_15_ac_accepting_what_we_never_offered_is_a_user_abort(
    context: PresentationContextAC,
) -> None:
    ac = AAssociateAC("ROUTER", "MODALITY", (context,), UserInformation(max_length=16384))
    conn, events = _requestor_receives(ac)
    aborted = only_abort(events)  # no AssociateAccepted
    assert (aborted.source, aborted.reason, aborted.local) == (0, 0, True)
    assert isinstance(aborted.error, RemoteProtocolError)
    assert drain(conn) == ABORT_1 and conn.state is State.Sta13


def test_SM_15_max_length_zero_is_unlimited() -> None:
    ac = AAssociateAC("ROUTER", "MODALITY", AC.presentation_contexts, UserInformation(max_length=0))
    conn, events = _requestor_receives(ac)
    assert events == [AssociateAccepted(ac)] and conn.peer_max_pdu_length == 0


def test_SM_15_undecodable_ac_is_abort_8_6() -> None:
    conn = Connection(Role.REQUESTOR)
    conn.request_association(RQ)
    conn.transport_connected()
    drain(conn)
    body = bytearray(AC.encode())
    body[6 + 68 + 2 : 6 + 68 + 4] = b"\xff\xff"  # application context item length
    aborted = only_abort(conn.receive_data(bytes(body)))
    assert drain(conn) == abort_8(6) and isinstance(aborted.error, PDUDecodeError)


# --- catalogue B.1: malformed PDUs ------------------------------------------------------


def test_MP_04_pdata_longer_than_announced_is_refused_from_the_header() -> None:
    conn = established(Role.ACCEPTOR)  # the AC we sent announced 32768
    aborted = only_abort(conn.receive_data(bytes.fromhex("04 00 00 01 00 01")))  # no body
    assert drain(conn) == abort_8(6) and aborted.reason == 6
    assert isinstance(aborted.error, PDUDecodeError) and conn.state is State.Sta13


def test_MP_04_pdata_at_the_announced_maximum_is_accepted() -> None:
    conn = established(Role.ACCEPTOR)
    frame = pdata(1, bytes(32768 - 6))
    assert int.from_bytes(frame[2:6], "big") == 32768
    assert isinstance(conn.receive_data(frame)[0], PDataReceived)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00\x00\x04abcd",
        b"\x08\x00\x00\x00\x00\x04abcd",
        b"\xff\x00\xff\xff\xff\xff" + bytes(1024),
        b"\x53\x00\x00\x00\x00\x10",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # MP-06: type 0x47, length 1 163 141 167
    ],
)
def test_MP_05_MP_06_garbage_first_pdu_is_abort_1(garbage: bytes) -> None:
    conn = acceptor_in_sta2()
    aborted = only_abort(conn.receive_data(garbage))
    assert drain(conn) == ABORT_1  # 07 00 00 00 00 04 00 00 00 00
    assert isinstance(aborted.error, PDUDecodeError) and aborted.error.reason == 1
    assert conn.state is State.Sta13 and conn.artim_running
    assert conn.receive_data(b"more garbage" * 100) == [] and drain(conn) == b""
    assert conn.timer_expired() == [Closed()] and conn.should_close


def _rq_with_version(version: int) -> bytes:
    data = bytearray(RQ.encode())
    data[6:8] = version.to_bytes(2, "big")
    return bytes(data)


def test_MP_14_protocol_version_without_bit_0_is_rejected() -> None:
    conn = acceptor_in_sta2()
    assert conn.receive_data(_rq_with_version(0)) == []  # AE-6 "otherwise": no indication
    assert drain(conn) == bytes.fromhex("03 00 00000004 00 01 02 02")  # RJ (1, 2, 2)
    assert conn.state is State.Sta13 and conn.artim_running
    # No indication, but the edge can still log the refusal with the peer's address.
    assert conn.provider_rejection is not None
    rq, rj = conn.provider_rejection
    assert rq.protocol_version == 0 and (rj.result, rj.source, rj.reason) == (1, 2, 2)


def test_empty_application_context_name_is_refused_by_the_provider() -> None:
    conn = acceptor_in_sta2()
    rq = AAssociateRQ("ROUTER", "MODALITY", RQ.presentation_contexts, RQ.user_information, "")
    assert conn.receive_data(rq.encode()) == []  # AE-6 "not acceptable": RJ (1, 2, 1)
    assert drain(conn) == bytes.fromhex("03 00 00000004 00 01 02 01")
    assert conn.state is State.Sta13


@pytest.mark.parametrize("version", [0x0003, 0x8001])
def test_MP_15_only_bit_0_of_the_protocol_version_is_tested(version: int) -> None:
    conn = acceptor_in_sta2()
    [event] = conn.receive_data(_rq_with_version(version))
    assert isinstance(event, AssociateRequested) and event.rq.protocol_version == version
    assert conn.state is State.Sta3 and not conn.artim_running and drain(conn) == b""


@pytest.mark.parametrize("context_id", [5, 0, 2, 255])
@pytest.mark.parametrize("state", [State.Sta6, State.Sta7])
def test_MP_32_pdv_on_a_context_not_accepted(context_id: int, state: State) -> None:
    rq = AAssociateRQ(
        "ROUTER",
        "MODALITY",
        (*RQ.presentation_contexts, PresentationContextRQ(5, (CT_IMAGE,), (IMPLICIT_VR_LE,))),
        RQ.user_information,
    )
    pair = ConnectionPair(rq)
    pair.to_acceptor()
    ac = AAssociateAC(
        "ROUTER",
        "MODALITY",
        (*AC.presentation_contexts, PresentationContextAC(5, 3)),
        UserInformation(16384),
    )
    pair.acceptor.accept(ac)  # context 5 proposed but rejected
    pair.to_requestor()
    conn = pair.acceptor
    if state is State.Sta7:
        conn.request_release()
    drain(conn)
    # A good PDV, then one on a context that is not accepted, in one P-DATA-TF.
    body = pdata(1, b"ok", 0x00)[6:] + pdata(context_id, b"x")[6:]
    frame = b"\x04\x00" + len(body).to_bytes(4, "big") + body
    aborted = only_abort(conn.receive_data(frame))
    assert drain(conn) == abort_8(6) and aborted.reason == 6 and conn.state is State.Sta13


@pytest.mark.parametrize(("source", "reason"), [(9, 0x77), (0, 0xFF), (2, 3), (1, 1)])
def test_MP_35_abort_with_out_of_range_fields(source: int, reason: int) -> None:
    conn = established(Role.ACCEPTOR)
    events = conn.receive_data(bytes.fromhex("07 00 00000004 00 00") + bytes((source, reason)))
    assert events == [Aborted(source, reason, False, None), Closed()]
    assert conn.state is State.Sta1 and conn.should_close and drain(conn) == b""
    assert str(source) in str(AssociationAborted(source, reason))  # the log text formats


def _normalise(events: list[ULEvent]) -> list[object]:
    return [
        [(p.context_id, p.control_header, bytes(p.data)) for p in e.pdu.pdvs]
        if isinstance(e, PDataReceived)
        else e
        for e in events
    ]


@pytest.mark.parametrize("role", list(Role))
def test_MP_36_pdus_coalesced_or_one_byte_at_a_time(role: Role) -> None:
    if role is Role.ACCEPTOR:
        stream = RQ.encode() + pdata(1, b"a") + pdata(3, b"b" * 300, 0x00) + RELEASE_RQ
    else:
        stream = AC.encode() + pdata(1, b"a") + pdata(3, b"b" * 300, 0x00) + RELEASE_RQ

    def fresh() -> Connection:
        conn = Connection(role)
        if role is Role.REQUESTOR:
            conn.request_association(RQ)
        conn.transport_connected()
        return conn

    whole = fresh()
    if role is Role.ACCEPTOR:  # the acceptor must answer before P-DATA is valid
        first = whole.receive_data(stream[: len(RQ.encode())])
        whole.accept(AC)
        events = first + whole.receive_data(stream[len(RQ.encode()) :])
    else:
        events = whole.receive_data(stream)  # three PDUs (and more) in one write
    trickled = fresh()
    slow: list[ULEvent] = []
    for i in range(len(stream)):
        slow += trickled.receive_data(stream[i : i + 1])
        if role is Role.ACCEPTOR and trickled.state is State.Sta3:
            trickled.accept(AC)
    assert _normalise(slow) == _normalise(events)
    assert len(events) == 4 and events[-1] == ReleaseRequested(collision=False)
    assert trickled.state is whole.state is State.Sta8
