"""PS3.8 Table 9-10 (catalogue SM-01): the table itself, then every cell driven with bytes.

The reference lists below are written independently of ``protocol.fsm`` and in a
different shape (by action, and by empty cells per event), so that a typo in one
does not hide in the other.
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
)
from protocol.errors import LocalProtocolError
from protocol.fsm import NEXT_STATE, TABLE_9_10, Action, Event, State, lookup
from protocol.items import PresentationContextAC, PresentationContextRQ, UserInformation
from protocol.pdu import AAssociateAC, AAssociateRJ, AAssociateRQ, encode_pdata
from protocol.uids import IMPLICIT_VR_LE, VERIFICATION

ALL = tuple(range(1, 14))
PDU_EVENTS = (3, 4, 6, 10, 12, 13, 16, 19)


def _but(*states: int) -> list[int]:
    return [s for s in ALL if s not in states]


#: Empty cells of Table 9-10, per event (state numbers).
REFERENCE_EMPTY_CELLS: dict[int, list[int]] = {
    1: _but(1),
    2: _but(4),
    3: [1, 4],
    4: [1, 4],
    5: _but(1),
    6: [1, 4],
    7: _but(3),
    8: _but(3),
    9: _but(6, 8),
    10: [1, 4],
    11: _but(6),
    12: [1, 4],
    13: [1, 4],
    14: _but(8, 9, 12),
    15: [1, 2, 13],
    16: [1, 4],
    17: [1],
    18: _but(2, 13),
    19: [1, 4],
}

_ESTABLISHED_ON = [3, 5, 6, 7, 8, 9, 10, 11, 12]  # "Sta3, Sta5-Sta12"

#: Every non-empty cell, per action: {action: [(event, [states])]}.
REFERENCE_CELLS: dict[str, list[tuple[int, list[int]]]] = {
    "AE-1": [(1, [1])],
    "AE-2": [(2, [4])],
    "AE-3": [(3, [5])],
    "AE-4": [(4, [5])],
    "AE-5": [(5, [1])],
    "AE-6": [(6, [2])],
    "AE-7": [(7, [3])],
    "AE-8": [(8, [3])],
    "DT-1": [(9, [6])],
    "DT-2": [(10, [6])],
    "AR-1": [(11, [6])],
    "AR-2": [(12, [6])],
    "AR-3": [(13, [7, 11])],
    "AR-4": [(14, [8, 12])],
    "AR-5": [(17, [13])],
    "AR-6": [(10, [7])],
    "AR-7": [(9, [8])],
    "AR-8": [(12, [7])],
    "AR-9": [(14, [9])],
    "AR-10": [(13, [10])],
    "AA-1": [(e, [2]) for e in (3, 4, 10, 12, 13, 19)] + [(15, _ESTABLISHED_ON)],
    "AA-2": [(15, [4]), (16, [2, 13]), (18, [2, 13])],
    "AA-3": [(16, _ESTABLISHED_ON)],
    "AA-4": [(17, list(range(3, 13)))],
    "AA-5": [(17, [2])],
    "AA-6": [(e, [13]) for e in (3, 4, 10, 12, 13)],
    "AA-7": [(6, [13]), (19, [13])],
    "AA-8": [
        (3, [3, 6, 7, 8, 9, 10, 11, 12]),
        (4, [3, 6, 7, 8, 9, 10, 11, 12]),
        (6, _ESTABLISHED_ON),
        (10, [3, 5, 8, 9, 10, 11, 12]),
        (12, [3, 5, 8, 9, 10, 11, 12]),
        (13, [3, 5, 6, 8, 9, 12]),
        (19, _ESTABLISHED_ON),
    ],
}


#: {(state, event): action} from REFERENCE_CELLS.
REFERENCE = {
    (s, e): Action(name) for name, cells in REFERENCE_CELLS.items() for e, ss in cells for s in ss
}


def _st(n: int) -> State:
    return State[f"Sta{n}"]


def _ev(n: int) -> Event:
    return Event[f"Evt{n}"]


def test_enums_match_the_standard_numbering() -> None:
    assert [s.name for s in State] == [f"Sta{n}" for n in ALL]
    assert [e.name for e in Event] == [f"Evt{n}" for n in range(1, 20)]
    assert {a.value for a in Action} == set(REFERENCE_CELLS)
    assert set(NEXT_STATE) == set(Action)


def test_empty_cells_are_the_standards() -> None:
    empty = {(_st(s), _ev(e)) for e, states in REFERENCE_EMPTY_CELLS.items() for s in states}
    every = {(s, e) for s in State for e in Event}
    assert set(TABLE_9_10) == every - empty
    assert len(TABLE_9_10) == 123
    for state, event in empty:
        assert lookup(state, event) is None


def test_every_cell_has_the_standards_action() -> None:
    reference = {(_st(s), _ev(e)): action for (s, e), action in REFERENCE.items()}
    assert len(reference) == 123  # no cell listed twice
    assert reference == TABLE_9_10
    for (state, event), action in reference.items():
        assert lookup(state, event) is action


def test_next_states() -> None:
    # PS3.8 Tables 9-6..9-9; AE-6 and AR-8 are the two conditional actions.
    conditional = {a: s for a, s in NEXT_STATE.items() if len(s) > 1}
    assert conditional == {
        Action.AE_6: (State.Sta3, State.Sta13),
        Action.AR_8: (State.Sta9, State.Sta10),
    }
    to_sta1 = {a.value for a, s in NEXT_STATE.items() if s == (State.Sta1,)}
    assert to_sta1 == {"AE-4", "AR-3", "AR-5", "AA-2", "AA-3", "AA-4", "AA-5"}
    to_sta13 = {a.value for a, s in NEXT_STATE.items() if s == (State.Sta13,)}
    assert to_sta13 == {"AE-8", "AR-4", "AA-1", "AA-6", "AA-7", "AA-8"}
    assert NEXT_STATE[Action.AR_9] == (State.Sta11,)
    assert NEXT_STATE[Action.AR_10] == (State.Sta12,)
    assert NEXT_STATE[Action.AR_6] == (State.Sta7,)
    assert NEXT_STATE[Action.AR_7] == (State.Sta8,)


# --- SM-01: every cell of Table 9-10, driven through a Connection with bytes -------------

R, A_ = Role.REQUESTOR, Role.ACCEPTOR
CONTEXT = PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT_VR_LE,))
RQ = AAssociateRQ("ROUTER", "MODALITY", (CONTEXT,), UserInformation(max_length=16384))
AC = AAssociateAC(
    "ROUTER", "MODALITY", (PresentationContextAC(1, 0, IMPLICIT_VR_LE),), UserInformation(16384)
)
RJ = AAssociateRJ(1, 1, 1)
PDATA = b"".join(bytes(b) for b in encode_pdata(1, 0x03, b"\x00\x01"))
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
PEER_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x05"
# Framed correctly but invalid inside (a PDV item length of 1): Evt19 with reason 6.
INVALID = b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x01\x01\x03"

#: The bytes that make each received-PDU event.
PDU_BYTES = {
    3: AC.encode(),
    4: RJ.encode(),
    6: RQ.encode(),
    10: PDATA,
    12: RELEASE_RQ,
    13: RELEASE_RP,
    16: PEER_ABORT,
    19: INVALID,
}


def _abort(source: int, reason: int) -> bytes:
    return bytes((7, 0, 0, 0, 0, 4, 0, 0, source, reason))


def _drive(state: int, role: Role) -> Connection:
    """A connection in ``state``, reached through the public API and peer bytes only."""
    conn = Connection(role, auto_collision_response=False)
    path: list[Callable[[Connection], object]] = []
    if role is R:
        path = [lambda c: c.request_association(RQ), lambda c: c.transport_connected()]
        path += [lambda c: c.receive_data(AC.encode())]
    else:
        path = [lambda c: c.transport_connected(), lambda c: c.receive_data(RQ.encode())]
        path += [lambda c: c.accept(AC)]
    steps = {1: 0, 4: 1, 5: 2, 2: 1, 3: 2, 6: 3}
    if state in steps:
        path = path[: steps[state]]
    elif state == 13 and role is A_:
        path = [*path[:2], lambda c: c.reject(RJ)]
    elif state == 13:
        path.append(lambda c: c.abort())
    elif state == 8:
        path.append(lambda c: c.receive_data(RELEASE_RQ))
    else:  # 7, 9..12: our A-RELEASE-RQ, then the peer's (collision), then ...
        path.append(lambda c: c.request_release())
        if state >= 9:
            path.append(lambda c: c.receive_data(RELEASE_RQ))
        if state == 11:
            path.append(lambda c: c.respond_release())
        if state == 12:
            path.append(lambda c: c.receive_data(RELEASE_RP))
    for step in path:
        step(conn)
    assert conn.state is _st(state), (state, role)
    conn.data_to_send()
    return conn


def _roles(state: int, event: int) -> list[Role]:
    if state == 1:
        return [R] if event in (1, 2) else [A_]
    if state in (2, 3, 10, 12):
        return [A_]
    if state in (4, 5, 9, 11):
        return [R]
    return [R, A_]


def _inject(conn: Connection, event: int) -> list[object]:
    if event in PDU_BYTES:
        return list(conn.receive_data(PDU_BYTES[event]))
    local: dict[int, Callable[[], object]] = {
        1: lambda: conn.request_association(RQ),
        2: lambda: conn._local(Event.Evt2),  # transport_connected() maps by role
        5: lambda: conn._local(Event.Evt5),
        7: lambda: conn.accept(AC),
        8: lambda: conn.reject(RJ),
        9: lambda: conn.send_pdata([PDATA]),
        11: conn.request_release,
        14: conn.respond_release,
        15: conn.abort,
        17: conn.connection_lost,
        18: conn.timer_expired,
    }
    result = local[event]()
    return list(result) if isinstance(result, list) else []


def _norm(events: list[object]) -> list[object]:
    out: list[object] = []
    for ev in events:
        if isinstance(ev, Aborted):
            error = type(ev.error).__name__ if ev.error is not None else None
            out.append(("Aborted", ev.source, ev.reason, ev.local, error))
        else:
            out.append(ev)
    return out


def _expected(
    action: Action, state: int, event: int, role: Role, artim_before: bool
) -> tuple[State, bytes, list[object], bool]:
    """(next state, bytes sent, events, ARTIM running) per PS3.8 Tables 9-6..9-9."""
    invalid = event == 19
    reason = 6 if invalid else 2  # invalid PDU parameter value / unexpected PDU
    error = "PDUDecodeError" if invalid else "RemoteProtocolError"
    closed = Closed()
    outcomes: dict[Action, tuple[int, bytes, list[object], bool | None]] = {
        Action.AE_1: (4, b"", [], None),
        Action.AE_2: (5, RQ.encode(), [], None),
        Action.AE_3: (6, b"", [AssociateAccepted(AC)], None),
        Action.AE_4: (1, b"", [AssociateRejected(RJ), closed], False),
        Action.AE_5: (2, b"", [], True),
        Action.AE_6: (3, b"", [AssociateRequested(RQ)], False),
        Action.AE_7: (6, AC.encode(), [], None),
        Action.AE_8: (13, RJ.encode(), [], True),
        Action.DT_1: (6, PDATA, [], None),
        Action.DT_2: (6, b"", ["PDataReceived"], None),
        Action.AR_1: (7, RELEASE_RQ, [], None),
        Action.AR_2: (8, b"", [ReleaseRequested(collision=False)], None),
        Action.AR_3: (1, b"", [ReleaseConfirmed(), closed], False),
        Action.AR_4: (13, RELEASE_RP, [], True),
        Action.AR_5: (1, b"", [closed], False),
        Action.AR_6: (7, b"", ["PDataReceived"], None),
        Action.AR_7: (8, PDATA, [], None),
        Action.AR_8: (9 if role is R else 10, b"", [ReleaseRequested(collision=True)], None),
        Action.AR_9: (11, RELEASE_RP, [], None),
        Action.AR_10: (12, b"", [ReleaseConfirmed()], None),
        Action.AA_2: (1, b"", [] if event == 15 else [closed], False),
        Action.AA_3: (1, b"", [("Aborted", 2, 5, False, None), closed], False),
        Action.AA_4: (1, b"", [("Aborted", 2, 0, True, "ConnectionClosed"), closed], False),
        Action.AA_5: (1, b"", [closed], False),
        Action.AA_6: (13, b"", [], None),
        Action.AA_7: (13, _abort(2, reason), [], None),
        Action.AA_8: (13, _abort(2, reason), [("Aborted", 2, reason, True, error)], True),
    }
    if action is Action.AA_1:  # ABORT-1 for bad input in Sta2, or our A-ABORT request
        events: list[object] = [] if event == 15 else [("Aborted", 0, 0, True, error)]
        return State.Sta13, _abort(0, 0), events, True
    nxt, sent, evs, artim = outcomes[action]
    return _st(nxt), sent, evs, artim_before if artim is None else artim


CELLS = [(s, e, role) for s in ALL for e in range(1, 20) for role in _roles(s, e)]


@pytest.mark.parametrize(("state", "event", "role"), CELLS)
def test_SM_01_every_cell(state: int, event: int, role: Role) -> None:
    conn = _drive(state, role)
    artim_before = conn.artim_running
    action = REFERENCE.get((state, event))  # the independent copy, not TABLE_9_10
    if action is None:
        if event in (17, 18) or (event in PDU_BYTES and state == 1):
            # Not requests: a close we asked for, a stale timer, bytes after the close.
            assert _inject(conn, event) == []
        else:
            with pytest.raises(LocalProtocolError):
                _inject(conn, event)
        assert conn.state is _st(state)
        assert conn.data_to_send() == []
        assert conn.artim_running is artim_before
        return
    events = _inject(conn, event)
    nxt, sent, expected_events, artim = _expected(action, state, event, role, artim_before)
    assert conn.state is nxt
    assert b"".join(bytes(b) for b in conn.data_to_send()) == sent
    got = [type(e).__name__ if isinstance(e, PDataReceived) else e for e in _norm(events)]
    assert got == expected_events
    assert conn.artim_running is artim
    assert conn.should_close is (nxt is State.Sta1)
    assert nxt in NEXT_STATE[action]


def test_SM_01_covers_every_cell() -> None:
    covered = {(_st(s), _ev(e)) for s, e, _ in CELLS}
    assert covered == {(s, e) for s in State for e in Event}
