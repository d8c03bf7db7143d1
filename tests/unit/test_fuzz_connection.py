"""Fuzzing the sans-IO Upper Layer (issue #6 item 3): mutated valid PDUs of every type fed
to ``Connection`` in both roles and the states where the peer's bytes matter.

Extends test_pdu_properties.py (decode_pdu and the PDU reader alone) to what the state
machine does with the result. Start states: acceptor Sta2 (awaiting A-ASSOCIATE-RQ),
Sta6 and Sta8; requestor Sta5 (awaiting A-ASSOCIATE-AC/RJ), Sta6 and Sta7. The input is
one to three valid frames (A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF with C-ECHO and C-STORE
command sets and data, A-RELEASE-RQ/RP, A-ABORT), one of them mutated by the mutators
of test_pdu_properties.py, cut into chunks anywhere. Each case must hold:

* ``receive_data`` never raises (bad bytes are Evt19 or an unexpected PDU, PS3.8 9.2);
  ``connection_lost`` and ``timer_expired`` afterwards neither;
* the connection ends in a state Table 9-10 reaches from the start state;
* the abort bytes are those PS3.8 prescribes: AA-1 (source 0, reason 0) for bad bytes in
  Sta2 (and for an A-ASSOCIATE-AC accepting what was never offered, SM-15), otherwise
  AA-8 (source 2, a reason of Table 9-26) equal to what the ``Aborted`` event says;
  after a local abort the connection waits in Sta13 with ARTIM running;
* nothing is indicated after an abort; every PDV indicated is on an accepted context;
* the PDVs indicated go through ``MessageAssembler``: only ``DIMSEError`` escapes;
* allocation is bounded by the configured limits, not by lengths read from the wire.

The example count comes from the profile in tests/conftest.py ("ci": 500).
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.connection import (
    Aborted,
    AssociateRequested,
    Closed,
    Connection,
    PDataReceived,
    ReleaseRequested,
    Role,
    ULEvent,
)
from protocol.dimse import CEchoRQ, CStoreRQ, MessageAssembler, encode_command
from protocol.errors import AbortReason, DIMSEError
from protocol.fsm import State
from protocol.items import PresentationContextAC
from protocol.limits import Limits
from protocol.pdu import AAbort, AAssociateAC, AAssociateRJ, AReleaseRP, AReleaseRQ
from tests.unit.pdu_fixtures import ASSOCIATE_RQ
from tests.unit.test_connection import AC, RQ, ConnectionPair, drain, pdata
from tests.unit.test_pdu_properties import mutated

FUZZ = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])
LIMITS = Limits(max_pdu_length=16384, max_associate_pdu_length=8192)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PROVIDER_REASONS = {int(r) for r in AbortReason}

# --- valid frames -----------------------------------------------------------------------
ECHO = pdata(1, encode_command(CEchoRQ(1)), 0x03)
STORE_CMD = pdata(3, encode_command(CStoreRQ(2, CT_IMAGE, "1.2.3.4", 0)), 0x03)
DATA_SET = pdata(3, bytes.fromhex("08001600 0400 0000 312e3200"), 0x02)  # explicit LE
DATA_PART = pdata(3, bytes.fromhex("10001000 0000"), 0x00)  # a data set fragment, not last
TWO_PDVS = (
    bytes.fromhex("04 00 00000014")
    + struct.pack(">IBB", 6, 3, 0x00)
    + b"\x08\x00\x16\x00"
    + struct.pack(">IBB", 6, 3, 0x02)
    + b"\x04\x00\x00\x00"
)
UNOFFERED_AC = AAssociateAC(
    "ROUTER", "MODALITY", (PresentationContextAC(7, 0, "1.2.840.10008.1.2"),), AC.user_information
).encode()
FRAMES = {
    "rq": RQ.encode(),
    "rq-fixture": ASSOCIATE_RQ,
    "ac": AC.encode(),
    "ac-unoffered": UNOFFERED_AC,
    "rj": AAssociateRJ(1, 1, 7).encode(),
    "echo": ECHO,
    "store": STORE_CMD + DATA_PART + DATA_SET,
    "two-pdvs": STORE_CMD + TWO_PDVS,
    "release-rq": AReleaseRQ().encode(),
    "release-rp": AReleaseRP().encode(),
    "abort-user": AAbort(0, 0).encode(),
    "abort-provider": AAbort(2, 6).encode(),
}


# --- start states -----------------------------------------------------------------------
def _acceptor_sta2() -> Connection:
    conn = Connection(Role.ACCEPTOR, LIMITS)
    conn.transport_connected()
    return conn


def _pair() -> ConnectionPair:
    pair = ConnectionPair(limits=LIMITS)
    pair.associate()
    return pair


def _acceptor_sta6() -> Connection:
    conn = _pair().acceptor
    drain(conn)
    return conn


def _acceptor_sta8() -> Connection:
    pair = _pair()
    pair.requestor.request_release()
    assert pair.to_acceptor() == [ReleaseRequested(collision=False)]
    drain(pair.acceptor)
    return pair.acceptor


def _requestor_sta5() -> Connection:
    conn = Connection(Role.REQUESTOR, LIMITS)
    conn.request_association(RQ)
    conn.transport_connected()
    drain(conn)
    return conn


def _requestor_sta6() -> Connection:
    conn = _pair().requestor
    drain(conn)
    return conn


def _requestor_sta7() -> Connection:
    conn = _requestor_sta6()
    conn.request_release()
    drain(conn)
    return conn


@dataclass(frozen=True)
class Start:
    name: str
    make: Callable[[], Connection]
    state: State
    frames: tuple[str, ...]
    # the states Table 9-10 can reach from here on the peer's bytes alone (release
    # collisions are answered by the connection: auto_collision_response)
    reachable: frozenset[State]


S = State
STARTS = [
    Start("acceptor-Sta2", _acceptor_sta2, S.Sta2, tuple(FRAMES),
          frozenset({S.Sta2, S.Sta3, S.Sta13, S.Sta1})),
    Start("acceptor-Sta6", _acceptor_sta6, S.Sta6, tuple(FRAMES),
          frozenset({S.Sta6, S.Sta8, S.Sta13, S.Sta1})),
    Start("acceptor-Sta8", _acceptor_sta8, S.Sta8, tuple(FRAMES),
          frozenset({S.Sta8, S.Sta13, S.Sta1})),
    Start("requestor-Sta5", _requestor_sta5, S.Sta5, tuple(FRAMES),
          frozenset({S.Sta5, S.Sta6, S.Sta8, S.Sta13, S.Sta1})),
    Start("requestor-Sta6", _requestor_sta6, S.Sta6, tuple(FRAMES),
          frozenset({S.Sta6, S.Sta8, S.Sta13, S.Sta1})),
    Start("requestor-Sta7", _requestor_sta7, S.Sta7, tuple(FRAMES),
          frozenset({S.Sta7, S.Sta11, S.Sta13, S.Sta1})),
]  # fmt: skip


@st.composite
def cases(draw: st.DrawFn) -> tuple[Start, bytes, list[int]]:
    start = draw(st.sampled_from(STARTS))
    names = draw(st.lists(st.sampled_from(start.frames), min_size=1, max_size=3))
    frames = [FRAMES[n] for n in names]
    at = draw(st.integers(0, len(frames) - 1))
    frames[at] = draw(mutated(st.just(frames[at])))
    cuts = draw(st.lists(st.integers(0, 4000), max_size=4))
    return start, b"".join(frames), cuts


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def _pdus(stream: bytes) -> list[tuple[int, bytes]]:
    """Our own output parsed as PDUs: it must always be well framed."""
    out, off = [], 0
    while off < len(stream):
        assert len(stream) - off >= 6, f"truncated PDU header in our output {stream.hex()}"
        (length,) = struct.unpack_from(">I", stream, off + 2)
        assert off + 6 + length <= len(stream), "our output PDU runs past its end"
        out.append((stream[off], stream[off + 6 : off + 6 + length]))
        off += 6 + length
    return out


def _run(start: Start, data: bytes, cuts: list[int]) -> tuple[Connection, list[ULEvent], bytes]:
    conn = start.make()
    assert conn.state is start.state
    events: list[ULEvent] = []
    out = b""
    for chunk in _chunks(data, cuts):
        events += conn.receive_data(chunk)  # never raises, whatever the bytes
        out += drain(conn)
    return conn, events, out


def _check_aborts(start: Start, events: list[ULEvent], out: bytes, conn: Connection) -> None:
    aborts = [body for kind, body in _pdus(out) if kind == 7]
    local = [e for e in events if isinstance(e, Aborted) and e.local]
    for body in aborts:
        assert len(body) == 4
        source, reason = body[2], body[3]
        assert (source, reason) == (0, 0) or (source == 2 and reason in PROVIDER_REASONS)
    if not local:
        return
    first = local[0]
    assert aborts, f"{first} but no A-ABORT sent"
    assert (aborts[0][2], aborts[0][3]) == (first.source, first.reason)
    before = events[: events.index(first)]
    if start.state is S.Sta2 and not any(isinstance(e, AssociateRequested) for e in before):
        assert (first.source, first.reason) == (0, 0), "Sta2: PS3.8 prescribes AA-1"
    elif first.source == 0:  # SM-15: the requestor aborts an AC it cannot use
        assert start.state is S.Sta5 and isinstance(first.error, Exception)
    else:
        assert first.source == 2 and first.reason in PROVIDER_REASONS
    # Nothing is indicated after the abort; the connection waits for the close (Sta13),
    # unless the peer's A-ABORT or the end of the stream already closed it.
    after = events[events.index(first) + 1 :]
    assert all(isinstance(e, Aborted | Closed) for e in after), after
    assert conn.state in (S.Sta13, S.Sta1)
    if conn.state is S.Sta13:
        assert conn.artim_running


@FUZZ
@given(cases())
def test_mutated_frames_in_every_state_end_defined(case: tuple[Start, bytes, list[int]]) -> None:
    start, data, cuts = case
    conn, events, out = _run(start, data, cuts)
    assert conn.state in start.reachable, f"{start.name}: ended in {conn.state.name}"
    _check_aborts(start, events, out, conn)
    assembler = MessageAssembler(LIMITS)
    for event in events:
        if isinstance(event, PDataReceived):
            for pdv in event.pdu.pdvs:
                assert pdv.context_id in conn.accepted_contexts
            with contextlib.suppress(DIMSEError):  # the DIMSE layer: only DIMSEError
                for pdv in event.pdu.pdvs:
                    assembler.feed(pdv)
    if any(isinstance(e, Aborted) and not e.local for e in events):
        assert conn.state is S.Sta1 and conn.should_close
    # the edge's other inputs never raise either, and the transport ends it in Sta1
    conn.timer_expired()
    conn.connection_lost()
    assert conn.state is S.Sta1


@st.composite
def announced_lengths(draw: st.DrawFn) -> bytes:
    """A valid frame whose PDU length says anything up to 2**32-1, then a few bytes."""
    frame = bytearray(draw(st.sampled_from(list(FRAMES.values()))))
    length = draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 1 << 24, 16385, 16384, 8193]))
    frame[2:6] = length.to_bytes(4, "big")
    return bytes(frame[: draw(st.integers(6, len(frame)))])


@FUZZ
@given(
    st.sampled_from(STARTS),
    st.one_of(announced_lengths(), mutated(st.sampled_from(list(FRAMES.values())))),
)
def test_allocation_is_bounded_by_the_limits(start: Start, data: bytes) -> None:
    conn = start.make()
    bound = max(LIMITS.max_pdu_length, LIMITS.max_associate_pdu_length) + 64 * 1024
    # traced only around receive_data: tracing hypothesis' own work too costs 3x the time
    tracemalloc.start()
    try:
        conn.receive_data(data)
        drain(conn)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= bound + 4 * len(data), f"{peak} bytes for a {len(data)}-byte input"
