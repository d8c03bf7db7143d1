"""The DICOM Upper Layer state machine as data (PS3.8 9.2).

States (Tables 9-1..9-5), events and actions (Tables 9-6..9-9) are enums, and
``TABLE_9_10`` is PS3.8 Table 9-10. The table is written the way the standard
prints it, one row per event and one column per state, so that it can be checked
against the standard cell by cell; an empty cell (``__``) is absent from the dict.

Nothing here runs an action: ``protocol.connection`` looks the action up, runs it
and moves to the action's next state (``NEXT_STATE``).
"""

from __future__ import annotations

import enum

__all__ = ["NEXT_STATE", "TABLE_9_10", "Action", "Event", "State", "lookup"]


class State(enum.Enum):
    """PS3.8 9.2.1, Tables 9-1..9-5."""

    #: Idle.
    Sta1 = 1
    #: Transport connection open (awaiting A-ASSOCIATE-RQ PDU).
    Sta2 = 2
    #: Awaiting local A-ASSOCIATE response primitive (from local user).
    Sta3 = 3
    #: Awaiting transport connection opening to complete (from local transport service).
    Sta4 = 4
    #: Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU.
    Sta5 = 5
    #: Association established and ready for data transfer.
    Sta6 = 6
    #: Awaiting A-RELEASE-RP PDU.
    Sta7 = 7
    #: Awaiting local A-RELEASE response primitive (from local user).
    Sta8 = 8
    #: Release collision requestor side; awaiting A-RELEASE response (from local user).
    Sta9 = 9
    #: Release collision acceptor side; awaiting A-RELEASE-RP PDU.
    Sta10 = 10
    #: Release collision requestor side; awaiting A-RELEASE-RP PDU.
    Sta11 = 11
    #: Release collision acceptor side; awaiting A-RELEASE response primitive (from local user).
    Sta12 = 12
    #: Awaiting transport connection close indication (association no longer exists).
    Sta13 = 13


class Event(enum.Enum):
    """PS3.8 9.2.3, the rows of Table 9-10."""

    #: A-ASSOCIATE request (local user).
    Evt1 = 1
    #: Transport connect confirmation (local transport service).
    Evt2 = 2
    #: A-ASSOCIATE-AC PDU (received on transport connection).
    Evt3 = 3
    #: A-ASSOCIATE-RJ PDU (received on transport connection).
    Evt4 = 4
    #: Transport connection indication (local transport service).
    Evt5 = 5
    #: A-ASSOCIATE-RQ PDU (received on transport connection).
    Evt6 = 6
    #: A-ASSOCIATE response primitive (accept).
    Evt7 = 7
    #: A-ASSOCIATE response primitive (reject).
    Evt8 = 8
    #: P-DATA request primitive.
    Evt9 = 9
    #: P-DATA-TF PDU.
    Evt10 = 10
    #: A-RELEASE request primitive.
    Evt11 = 11
    #: A-RELEASE-RQ PDU (received on open transport connection).
    Evt12 = 12
    #: A-RELEASE-RP PDU (received on transport connection).
    Evt13 = 13
    #: A-RELEASE response primitive.
    Evt14 = 14
    #: A-ABORT request primitive.
    Evt15 = 15
    #: A-ABORT PDU (received on open transport connection).
    Evt16 = 16
    #: Transport connection closed indication (local transport service).
    Evt17 = 17
    #: ARTIM timer expired (association reject/release timer).
    Evt18 = 18
    #: Unrecognized or invalid PDU received.
    Evt19 = 19


class Action(enum.Enum):
    """PS3.8 9.2.2, Tables 9-6 (AE), 9-7 (DT), 9-8 (AR) and 9-9 (AA)."""

    #: Issue TRANSPORT CONNECT request primitive to local transport service.
    AE_1 = "AE-1"
    #: Send A-ASSOCIATE-RQ PDU.
    AE_2 = "AE-2"
    #: Issue A-ASSOCIATE confirmation (accept) primitive.
    AE_3 = "AE-3"
    #: Issue A-ASSOCIATE confirmation (reject) primitive and close transport connection.
    AE_4 = "AE-4"
    #: Issue transport connection response primitive; start ARTIM timer.
    AE_5 = "AE-5"
    #: Stop ARTIM; if the A-ASSOCIATE-RQ is acceptable by the service-provider issue
    #: A-ASSOCIATE indication (Sta3), otherwise send A-ASSOCIATE-RJ and start ARTIM (Sta13).
    AE_6 = "AE-6"
    #: Send A-ASSOCIATE-AC PDU.
    AE_7 = "AE-7"
    #: Send A-ASSOCIATE-RJ PDU and start ARTIM timer.
    AE_8 = "AE-8"
    #: Send P-DATA-TF PDU.
    DT_1 = "DT-1"
    #: Send P-DATA indication primitive.
    DT_2 = "DT-2"
    #: Send A-RELEASE-RQ PDU.
    AR_1 = "AR-1"
    #: Issue A-RELEASE indication primitive.
    AR_2 = "AR-2"
    #: Issue A-RELEASE confirmation primitive and close transport connection.
    AR_3 = "AR-3"
    #: Issue A-RELEASE-RP PDU and start ARTIM timer.
    AR_4 = "AR-4"
    #: Stop ARTIM timer.
    AR_5 = "AR-5"
    #: Issue P-DATA indication.
    AR_6 = "AR-6"
    #: Issue P-DATA-TF PDU.
    AR_7 = "AR-7"
    #: Issue A-RELEASE indication (release collision); Sta9 if association-requestor,
    #: Sta10 if not.
    AR_8 = "AR-8"
    #: Send A-RELEASE-RP PDU.
    AR_9 = "AR-9"
    #: Issue A-RELEASE confirmation primitive.
    AR_10 = "AR-10"
    #: Send A-ABORT PDU (service-user source) and start (or restart) ARTIM timer.
    AA_1 = "AA-1"
    #: Stop ARTIM timer if running; close transport connection.
    AA_2 = "AA-2"
    #: Issue A-ABORT (service-user source) or A-P-ABORT (service-provider source)
    #: indication and close transport connection.
    AA_3 = "AA-3"
    #: Issue A-P-ABORT indication primitive.
    AA_4 = "AA-4"
    #: Stop ARTIM timer.
    AA_5 = "AA-5"
    #: Ignore PDU.
    AA_6 = "AA-6"
    #: Send A-ABORT PDU.
    AA_7 = "AA-7"
    #: Send A-ABORT PDU (service-provider source), issue A-P-ABORT indication, start ARTIM.
    AA_8 = "AA-8"


S = State
A = Action

#: The next state of each action (PS3.8 Tables 9-6..9-9). Two actions have a condition
#: and so two possible next states: AE-6 (Sta3 if the A-ASSOCIATE-RQ is acceptable by
#: the service-provider, else Sta13) and AR-8 (Sta9 if association-requestor, else
#: Sta10). Every other action has exactly one.
NEXT_STATE: dict[Action, tuple[State, ...]] = {
    A.AE_1: (S.Sta4,),
    A.AE_2: (S.Sta5,),
    A.AE_3: (S.Sta6,),
    A.AE_4: (S.Sta1,),
    A.AE_5: (S.Sta2,),
    A.AE_6: (S.Sta3, S.Sta13),
    A.AE_7: (S.Sta6,),
    A.AE_8: (S.Sta13,),
    A.DT_1: (S.Sta6,),
    A.DT_2: (S.Sta6,),
    A.AR_1: (S.Sta7,),
    A.AR_2: (S.Sta8,),
    A.AR_3: (S.Sta1,),
    A.AR_4: (S.Sta13,),
    A.AR_5: (S.Sta1,),
    A.AR_6: (S.Sta7,),
    A.AR_7: (S.Sta8,),
    A.AR_8: (S.Sta9, S.Sta10),
    A.AR_9: (S.Sta11,),
    A.AR_10: (S.Sta12,),
    A.AA_1: (S.Sta13,),
    A.AA_2: (S.Sta1,),
    A.AA_3: (S.Sta1,),
    A.AA_4: (S.Sta1,),
    A.AA_5: (S.Sta1,),
    A.AA_6: (S.Sta13,),
    A.AA_7: (S.Sta13,),
    A.AA_8: (S.Sta13,),
}

__ = None
AE_1, AE_2, AE_3, AE_4, AE_5, AE_6, AE_7, AE_8 = (
    A.AE_1, A.AE_2, A.AE_3, A.AE_4, A.AE_5, A.AE_6, A.AE_7, A.AE_8,
)  # fmt: skip
DT_1, DT_2 = A.DT_1, A.DT_2
AR_1, AR_2, AR_3, AR_4, AR_5, AR_6, AR_7, AR_8, AR_9, AR_10 = (
    A.AR_1, A.AR_2, A.AR_3, A.AR_4, A.AR_5, A.AR_6, A.AR_7, A.AR_8, A.AR_9, A.AR_10,
)  # fmt: skip
AA_1, AA_2, AA_3, AA_4, AA_5, AA_6, AA_7, AA_8 = (
    A.AA_1, A.AA_2, A.AA_3, A.AA_4, A.AA_5, A.AA_6, A.AA_7, A.AA_8,
)  # fmt: skip

# PS3.8 Table 9-10, row by row. Columns are Sta1..Sta13; __ is an empty cell.
# fmt: off
_ROWS: dict[Event, tuple[Action | None, ...]] = {
    #             Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10  Sta11 Sta12 Sta13
    Event.Evt1:  (AE_1, __,   __,   __,   __,   __,   __,   __,   __,   __,    __,   __,   __),
    Event.Evt2:  (__,   __,   __,   AE_2, __,   __,   __,   __,   __,   __,    __,   __,   __),
    Event.Evt3:  (__,   AA_1, AA_8, __,   AE_3, AA_8, AA_8, AA_8, AA_8, AA_8,  AA_8, AA_8, AA_6),
    Event.Evt4:  (__,   AA_1, AA_8, __,   AE_4, AA_8, AA_8, AA_8, AA_8, AA_8,  AA_8, AA_8, AA_6),
    Event.Evt5:  (AE_5, __,   __,   __,   __,   __,   __,   __,   __,   __,    __,   __,   __),
    Event.Evt6:  (__,   AE_6, AA_8, __,   AA_8, AA_8, AA_8, AA_8, AA_8, AA_8,  AA_8, AA_8, AA_7),
    Event.Evt7:  (__,   __,   AE_7, __,   __,   __,   __,   __,   __,   __,    __,   __,   __),
    Event.Evt8:  (__,   __,   AE_8, __,   __,   __,   __,   __,   __,   __,    __,   __,   __),
    Event.Evt9:  (__,   __,   __,   __,   __,   DT_1, __,   AR_7, __,   __,    __,   __,   __),
    Event.Evt10: (__,   AA_1, AA_8, __,   AA_8, DT_2, AR_6, AA_8, AA_8, AA_8,  AA_8, AA_8, AA_6),
    Event.Evt11: (__,   __,   __,   __,   __,   AR_1, __,   __,   __,   __,    __,   __,   __),
    Event.Evt12: (__,   AA_1, AA_8, __,   AA_8, AR_2, AR_8, AA_8, AA_8, AA_8,  AA_8, AA_8, AA_6),
    Event.Evt13: (__,   AA_1, AA_8, __,   AA_8, AA_8, AR_3, AA_8, AA_8, AR_10, AR_3, AA_8, AA_6),
    Event.Evt14: (__,   __,   __,   __,   __,   __,   __,   AR_4, AR_9, __,    __,   AR_4, __),
    Event.Evt15: (__,   __,   AA_1, AA_2, AA_1, AA_1, AA_1, AA_1, AA_1, AA_1,  AA_1, AA_1, __),
    Event.Evt16: (__,   AA_2, AA_3, __,   AA_3, AA_3, AA_3, AA_3, AA_3, AA_3,  AA_3, AA_3, AA_2),
    Event.Evt17: (__,   AA_5, AA_4, AA_4, AA_4, AA_4, AA_4, AA_4, AA_4, AA_4,  AA_4, AA_4, AR_5),
    Event.Evt18: (__,   AA_2, __,   __,   __,   __,   __,   __,   __,   __,    __,   __,   AA_2),
    Event.Evt19: (__,   AA_1, AA_8, __,   AA_8, AA_8, AA_8, AA_8, AA_8, AA_8,  AA_8, AA_8, AA_7),
}
# fmt: on

#: PS3.8 Table 9-10 as a mapping; a missing key is an empty cell.
TABLE_9_10: dict[tuple[State, Event], Action] = {
    (state, event): action
    for event, row in _ROWS.items()
    for state, action in zip(State, row, strict=True)
    if action is not None
}


def lookup(state: State, event: Event) -> Action | None:
    """The action of Table 9-10 for ``event`` in ``state``, or None for an empty cell."""
    return TABLE_9_10.get((state, event))
