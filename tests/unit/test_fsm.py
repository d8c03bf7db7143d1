"""PS3.8 Table 9-10 (catalogue SM-01): the table itself, then every cell driven with bytes.

The reference lists below are written independently of ``protocol.fsm`` and in a
different shape (by action, and by empty cells per event), so that a typo in one
does not hide in the other.
"""

from __future__ import annotations

from protocol.fsm import NEXT_STATE, TABLE_9_10, Action, Event, State, lookup

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
    reference = {
        (_st(s), _ev(e)): Action(name)
        for name, cells in REFERENCE_CELLS.items()
        for e, states in cells
        for s in states
    }
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
