"""The DICOM Upper Layer as a sans-IO state machine (PS3.8 9.2), driven by Table 9-10.

Every input is an event of Table 9-10: a local request (a method call), a received PDU
(``receive_data``), the transport closing (``connection_lost``) or the ARTIM timer
expiring (``timer_expired``). The connection looks up the action in
``fsm.TABLE_9_10``, runs it, and moves to the action's next state. Actions never do
I/O: they queue bytes (drained by ``data_to_send``), return indications as
``ULEvent`` values, and set ``artim_running`` / ``should_close`` for the edge.

An empty cell for a local request raises ``LocalProtocolError`` and changes nothing.
Bad bytes from the peer never raise: they are Evt19 (or an unexpected PDU) and become
an A-ABORT in the outgoing queue plus an ``Aborted`` event, as the table prescribes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import cast

from protocol.errors import (
    AbortReason,
    AbortSource,
    ConnectionClosed,
    LocalProtocolError,
    PDUDecodeError,
    ProtocolError,
    RejectReason,
    RejectResult,
    RejectSource,
    RemoteProtocolError,
)
from protocol.framing import PDUReader
from protocol.fsm import NEXT_STATE, TABLE_9_10, Action, Event, State
from protocol.limits import Limits
from protocol.pdu import (
    PDU,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    decode_pdu,
)

__all__ = [
    "Aborted",
    "AssociateAccepted",
    "AssociateRejected",
    "AssociateRequested",
    "Closed",
    "Connection",
    "PDataReceived",
    "ReleaseConfirmed",
    "ReleaseRequested",
    "Role",
    "ULEvent",
]

log = logging.getLogger(__name__)


class Role(Enum):
    """Which end of the association this connection is (PS3.8 AR-8 depends on it)."""

    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


# --- indications to the user (events the connection returns) --------------------------


@dataclass(frozen=True, slots=True)
class AssociateRequested:
    """A-ASSOCIATE indication (AE-6): answer with ``accept()`` or ``reject()``."""

    rq: AAssociateRQ


@dataclass(frozen=True, slots=True)
class AssociateAccepted:
    """A-ASSOCIATE confirmation, accept (AE-3)."""

    ac: AAssociateAC


@dataclass(frozen=True, slots=True)
class AssociateRejected:
    """A-ASSOCIATE confirmation, reject (AE-4); the transport is closing."""

    rj: AAssociateRJ


@dataclass(frozen=True, slots=True)
class PDataReceived:
    """P-DATA indication (DT-2, AR-6); every PDV is on an accepted context."""

    pdu: PDataTF


@dataclass(frozen=True, slots=True)
class ReleaseRequested:
    """A-RELEASE indication (AR-2; AR-8 with ``collision``).

    Without a collision, answer with ``respond_release()``. In a collision our own
    A-RELEASE request is the answer, so the connection gives the response itself
    (PS3.8 7.2: the A-RELEASE result is always affirmative): do not respond.
    """

    collision: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseConfirmed:
    """A-RELEASE confirmation (AR-3, AR-10): the association is released."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The association ended abnormally.

    ``local`` is False for an A-ABORT received from the peer (AA-3, ``error`` None);
    True when this end decided: an invalid or unexpected PDU (AA-8 source 2, or AA-1 in
    Sta2), an A-ASSOCIATE-AC we never asked for (a user abort), or the transport closing
    under an association (AA-4, an A-P-ABORT). ``error`` says why.
    """

    source: int
    reason: int
    local: bool
    error: ProtocolError | None = None


@dataclass(frozen=True, slots=True)
class Closed:
    """The transport is to be closed (or is closed); the connection is back in Sta1."""


ULEvent = (
    AssociateRequested
    | AssociateAccepted
    | AssociateRejected
    | PDataReceived
    | ReleaseRequested
    | ReleaseConfirmed
    | Aborted
    | Closed
)

# --- the connection -------------------------------------------------------------------

_Handler = Callable[["Connection", object], "State | None"]

_PDU_EVENT: dict[type[PDU], Event] = {
    AAssociateAC: Event.Evt3,
    AAssociateRJ: Event.Evt4,
    AAssociateRQ: Event.Evt6,
    PDataTF: Event.Evt10,
    AReleaseRQ: Event.Evt12,
    AReleaseRP: Event.Evt13,
    AAbort: Event.Evt16,
}
_RELEASE_RQ = AReleaseRQ().encode()
_RELEASE_RP = AReleaseRP().encode()
_USER_ABORT = AAbort(AbortSource.SERVICE_USER, 0).encode()
_DATA_ACTIONS = frozenset((Action.DT_1, Action.DT_2, Action.AR_6, Action.AR_7))
_ENDED = (State.Sta1, State.Sta13)
_PROVIDER_REASONS = frozenset(int(r) for r in AbortReason)


class Connection:
    """One association's Upper Layer: bytes and requests in, events and bytes out.

    ``auto_collision_response`` (default True) answers the A-RELEASE indication of a
    release collision (Sta9, Sta12) on the user's behalf; tests walking Table 9-10 turn
    it off to stop in those states.
    """

    def __init__(
        self,
        role: Role,
        limits: Limits | None = None,
        *,
        auto_collision_response: bool = True,
    ) -> None:
        self._role = role
        self._limits = limits if limits is not None else Limits()
        self._auto_collision = auto_collision_response
        self._state = State.Sta1
        self._reader = PDUReader(self._limits)
        self._desynced = False  # framing lost: no later byte can start a PDU
        self._out: list[bytes | memoryview] = []
        self._events: list[ULEvent] = []
        self._follow_up: tuple[Event, object] | None = None
        self._artim = False
        self._close = False
        self._rq: AAssociateRQ | None = None
        self._rq_bytes = b""
        self._provider_rejection: tuple[AAssociateRQ, AAssociateRJ] | None = None
        self._ac: AAssociateAC | None = None
        self._contexts: dict[int, tuple[str, str]] = {}
        self._peer_max = 0
        self._our_max = self._limits.max_pdu_length

    # --- state for the edge ------------------------------------------------------------
    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> State:
        return self._state

    @property
    def provider_rejection(self) -> tuple[AAssociateRQ, AAssociateRJ] | None:
        """The request the UL provider refused itself (AE-6 "otherwise": PS3.8 9.3.2,
        protocol version; no indication goes to the user) and the RJ sent: for the log."""
        return self._provider_rejection

    @property
    def artim_running(self) -> bool:
        """Whether the ARTIM timer should run (PS3.8 9.1.5); expiry -> ``timer_expired()``."""
        return self._artim

    @property
    def should_close(self) -> bool:
        """The edge should close the transport (or it already is): Sta1 was reached."""
        return self._close

    @property
    def receiving_pdu(self) -> bool:
        """Part of a PDU has arrived and the rest has not: the edge's PDU deadline runs."""
        return self._reader.in_progress

    @property
    def accepted_contexts(self) -> Mapping[int, tuple[str, str]]:
        """{context id: (abstract syntax, transfer syntax)} of the accepted contexts."""
        return MappingProxyType(self._contexts)

    @property
    def peer_max_pdu_length(self) -> int:
        """The peer's Maximum Length (PS3.8 D.1) for P-DATA we send; 0 = unlimited."""
        return self._peer_max

    @property
    def our_max_pdu_length(self) -> int:
        """The Maximum Length we announced; longer P-DATA-TF PDUs are aborted (MP-04)."""
        return self._our_max

    @property
    def associate_rq(self) -> AAssociateRQ | None:
        return self._rq

    @property
    def associate_ac(self) -> AAssociateAC | None:
        return self._ac

    def data_to_send(self) -> list[bytes | memoryview]:
        """Drain the queued outgoing buffers (for ``transport.writelines``)."""
        out, self._out = self._out, []
        return out

    # --- local requests (raise LocalProtocolError on an empty cell) --------------------
    def request_association(self, rq: AAssociateRQ) -> None:
        """A-ASSOCIATE request (Evt1, AE-1); then ``transport_connected()`` sends it."""
        if self._role is not Role.REQUESTOR:
            raise LocalProtocolError("only the association-requestor requests an association")
        self._local(Event.Evt1, rq)

    def transport_connected(self) -> None:
        """Transport connect confirmation (Evt2) or indication (Evt5), by role."""
        self._local(Event.Evt2 if self._role is Role.REQUESTOR else Event.Evt5)

    def accept(self, ac: AAssociateAC) -> None:
        """A-ASSOCIATE response, accept (Evt7, AE-7)."""
        self._local(Event.Evt7, ac)

    def reject(self, rj: AAssociateRJ) -> None:
        """A-ASSOCIATE response, reject (Evt8, AE-8)."""
        self._local(Event.Evt8, rj)

    def send_pdata(self, buffers: list[bytes | memoryview]) -> None:
        """P-DATA request (Evt9): queue already-encoded P-DATA-TF PDUs as they are."""
        self._local(Event.Evt9, buffers)

    def request_release(self) -> None:
        """A-RELEASE request (Evt11, AR-1)."""
        self._local(Event.Evt11)

    def respond_release(self) -> None:
        """A-RELEASE response (Evt14, AR-4)."""
        self._local(Event.Evt14)

    def abort(self, source: int = AbortSource.SERVICE_USER, reason: int = 0) -> None:
        """A-ABORT request (Evt15, AA-1; AA-2 while the transport is still connecting)."""
        if source == AbortSource.SERVICE_USER:
            if reason != 0:  # PS3.8 9.3.8: sent as 00H when the source is the user
                raise LocalProtocolError("a service-user A-ABORT has reason 0")
        elif source != AbortSource.SERVICE_PROVIDER or reason not in _PROVIDER_REASONS:
            raise LocalProtocolError(f"invalid A-ABORT source {source} / reason {reason}")
        self._local(Event.Evt15, (source, reason))

    # --- indications from the transport, the timer and the peer ------------------------
    def connection_lost(self) -> list[ULEvent]:
        """Transport connection closed indication (Evt17). Ignored in Sta1."""
        if self._state is State.Sta1:
            return []  # we closed it ourselves (or it never opened)
        return self._indicate(Event.Evt17)

    def timer_expired(self) -> list[ULEvent]:
        """ARTIM expired (Evt18). A stale expiry (ARTIM no longer running) is ignored."""
        if not self._artim:
            return []
        return self._indicate(Event.Evt18)

    def receive_data(self, data: bytes) -> list[ULEvent]:
        """Bytes from the peer: frame, decode and run each PDU through Table 9-10."""
        if self._state is State.Sta4:
            raise LocalProtocolError("data received before the transport connected")
        if self._state is State.Sta1 or self._desynced:
            return []  # after the close or a framing error nothing is a PDU any more
        events: list[ULEvent] = []
        self._events = events
        reader = self._reader
        reader.feed(data)
        while True:
            try:
                frame = reader.next_pdu()
            except PDUDecodeError as exc:
                # The header itself is bad: the stream cannot be resynchronised.
                self._desynced = True
                self._handle(Event.Evt19, exc)
                break
            if frame is None:
                break
            event, arg = self._classify(*frame)
            before = self._state
            action = self._handle(event, arg)
            if (self._state is not before and self._state in _ENDED) or action is Action.AA_7:
                # The association is over (or we just aborted): the rest of this read is
                # not acted on, but complete PDUs are consumed to keep the framing.
                self._skip_buffered()
                break
        return events

    # --- dispatch ----------------------------------------------------------------------
    def _local(self, event: Event, arg: object = None) -> None:
        if (self._state, event) not in TABLE_9_10:
            raise LocalProtocolError(f"{event.name} is not allowed in {self._state.name}")
        self._events = []  # local actions issue no indications worth returning
        self._handle(event, arg)

    def _indicate(self, event: Event) -> list[ULEvent]:
        events: list[ULEvent] = []
        self._events = events
        self._handle(event, None)
        return events

    def _handle(self, event: Event, arg: object) -> Action | None:
        """Run the Table 9-10 action for ``event``, then any follow-up event it queued."""
        first: Action | None = None
        while True:
            action = TABLE_9_10[(self._state, event)]
            if action not in _DATA_ACTIONS:
                log.debug(
                    "%s %s + %s -> %s", self._role.value, self._state.name, event.name, action.value
                )
            new_state = _HANDLERS[action](self, arg)
            self._state = NEXT_STATE[action][0] if new_state is None else new_state
            first = first or action
            if self._follow_up is None:
                return first
            (event, arg), self._follow_up = self._follow_up, None

    def _classify(self, pdu_type: int, body: memoryview) -> tuple[Event, object]:
        try:
            pdu = decode_pdu(pdu_type, body)
        except PDUDecodeError as exc:
            return Event.Evt19, exc
        event = _PDU_EVENT[type(pdu)]
        if event is Event.Evt10 and self._state in (State.Sta6, State.Sta7):
            assert isinstance(pdu, PDataTF)
            contexts = self._contexts
            for pdv in pdu.pdvs:
                if pdv.context_id not in contexts:
                    # Catalogue MP-32: a PDV on a context that is not accepted is an
                    # invalid PDU parameter value (PS3.8 9.3.8 reason 6).
                    return Event.Evt19, RemoteProtocolError(
                        f"PDV on presentation context {pdv.context_id}, which is not accepted",
                        AbortReason.INVALID_PDU_PARAMETER_VALUE,
                    )
        return event, pdu

    def _skip_buffered(self) -> None:
        try:
            while self._reader.next_pdu() is not None:
                pass
        except PDUDecodeError:
            self._desynced = True

    def _queue_abort(self, source: int, reason: int) -> None:
        self._out.append(AAbort(source, reason).encode())

    def _closing(self) -> None:
        self._artim = False
        self._close = True
        self._events.append(Closed())

    def _record_negotiation(self, rq: AAssociateRQ, ac: AAssociateAC, ours: int | None) -> None:
        # The abstract syntax of an accepted context is the one proposed for its id in
        # the RQ (PS3.8 9.3.3.2: the AC item carries only the transfer syntax).
        proposed = {pc.context_id: pc.abstract_syntax or "" for pc in rq.presentation_contexts}
        self._contexts = {
            pc.context_id: (proposed[pc.context_id], pc.transfer_syntax)
            for pc in ac.presentation_contexts
            if pc.result == 0 and pc.context_id in proposed
        }
        self._our_max = self._limits.max_pdu_length if ours is None else ours
        self._reader.set_max_pdata_length(self._our_max)

    # --- AE: association establishment (PS3.8 Table 9-6) -------------------------------
    def _ae_1(self, arg: object) -> State | None:
        if not isinstance(arg, AAssociateRQ):
            raise LocalProtocolError("request_association() takes an AAssociateRQ")
        self._rq_bytes = arg.encode()  # a bad RQ fails here, in Sta1, not at AE-2
        self._rq = arg  # the edge opens the transport, then calls transport_connected()
        return None

    def _ae_2(self, arg: object) -> State | None:
        self._out.append(self._rq_bytes)
        return None

    def _ae_3(self, arg: object) -> State | None:
        assert isinstance(arg, AAssociateAC) and self._rq is not None
        self._ac = arg
        problem = _unoffered(self._rq, arg)
        if problem is not None:
            # Catalogue SM-15: a decodable AC accepting what we never offered cannot be
            # used; the user (us) aborts it once established (Evt15 -> AA-1 in Sta6).
            error = RemoteProtocolError(problem, AbortReason.INVALID_PDU_PARAMETER_VALUE)
            self._events.append(Aborted(AbortSource.SERVICE_USER, 0, True, error))
            self._follow_up = (Event.Evt15, (AbortSource.SERVICE_USER, 0))
            return None
        self._record_negotiation(self._rq, arg, self._rq.user_information.max_length)
        self._peer_max = arg.user_information.max_length or 0
        self._events.append(AssociateAccepted(arg))
        return None

    def _ae_4(self, arg: object) -> State | None:
        assert isinstance(arg, AAssociateRJ)
        self._events.append(AssociateRejected(arg))
        self._closing()
        return None

    def _ae_5(self, arg: object) -> State | None:
        self._artim = True  # PS3.8 9.1.5: the A-ASSOCIATE-RQ must arrive within ARTIM
        return None

    def _ae_6(self, arg: object) -> State | None:
        assert isinstance(arg, AAssociateRQ)
        self._artim = False
        # Acceptable to the UL provider: PS3.8 9.3.2 says a receiver shall test only bit
        # 0 of the protocol version (catalogue MP-14, MP-15). The application context
        # name itself is the user's to judge (acse, MP-18).
        if arg.protocol_version & 1 and arg.application_context:
            self._rq = arg
            self._events.append(AssociateRequested(arg))
            return State.Sta3
        if arg.protocol_version & 1:
            reason = RejectReason.NO_REASON
        else:
            reason = RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED
        rj = AAssociateRJ(RejectResult.PERMANENT, RejectSource.SERVICE_PROVIDER_ACSE, reason)
        self._provider_rejection = (arg, rj)
        self._out.append(rj.encode())
        self._artim = True
        return State.Sta13

    def _ae_7(self, arg: object) -> State | None:
        if not isinstance(arg, AAssociateAC):
            raise LocalProtocolError("accept() takes an AAssociateAC")
        assert self._rq is not None
        proposed = {pc.context_id for pc in self._rq.presentation_contexts}
        stray = [pc.context_id for pc in arg.presentation_contexts if pc.context_id not in proposed]
        if stray:
            raise LocalProtocolError(f"accept() answers contexts {stray} that were not proposed")
        self._out.append(arg.encode())
        self._ac = arg
        self._record_negotiation(self._rq, arg, arg.user_information.max_length)
        self._peer_max = self._rq.user_information.max_length or 0
        return None

    def _ae_8(self, arg: object) -> State | None:
        if not isinstance(arg, AAssociateRJ):
            raise LocalProtocolError("reject() takes an AAssociateRJ")
        self._out.append(arg.encode())
        self._artim = True
        return None

    # --- DT: data transfer (Table 9-7); AR-6/AR-7 are the same during release ----------
    def _dt_1(self, arg: object) -> State | None:
        # The hot path: the buffers are dimse.fragment()'s PDUs, queued as they are.
        self._out.extend(cast("list[bytes | memoryview]", arg))
        return None

    def _dt_2(self, arg: object) -> State | None:
        self._events.append(PDataReceived(cast(PDataTF, arg)))
        return None

    _ar_6 = _dt_2  # issue P-DATA indication while awaiting A-RELEASE-RP (SM-07)
    _ar_7 = _dt_1  # send P-DATA-TF after the peer's A-RELEASE-RQ

    # --- AR: association release (Table 9-8) -------------------------------------------
    def _ar_1(self, arg: object) -> State | None:
        self._out.append(_RELEASE_RQ)
        return None

    def _ar_2(self, arg: object) -> State | None:
        self._events.append(ReleaseRequested(collision=False))
        return None

    def _ar_3(self, arg: object) -> State | None:
        self._events.append(ReleaseConfirmed())
        self._closing()
        return None

    def _ar_4(self, arg: object) -> State | None:
        self._out.append(_RELEASE_RP)
        self._artim = True  # PS3.8 9.2.2: wait for the requestor to close, within ARTIM
        return None

    def _ar_8(self, arg: object) -> State | None:
        # Release collision (PS3.8 9.2.2 AR-8): both sides sent A-RELEASE-RQ.
        self._events.append(ReleaseRequested(collision=True))
        if self._role is Role.REQUESTOR:
            if self._auto_collision:
                self._follow_up = (Event.Evt14, None)  # Sta9: AR-9 sends the RP first
            return State.Sta9
        return State.Sta10

    def _ar_9(self, arg: object) -> State | None:
        self._out.append(_RELEASE_RP)
        return None

    def _ar_10(self, arg: object) -> State | None:
        self._events.append(ReleaseConfirmed())
        if self._auto_collision:
            self._follow_up = (Event.Evt14, None)  # Sta12: AR-4 answers the peer's RQ
        return None

    # --- AA: association abort (Table 9-9) ---------------------------------------------
    def _aa_1(self, arg: object) -> State | None:
        if isinstance(arg, tuple):  # a local A-ABORT request: (source, reason)
            self._queue_abort(*arg)
        else:  # an invalid or unexpected PDU in Sta2 (catalogue ABORT-1)
            self._out.append(_USER_ABORT)
            self._events.append(Aborted(AbortSource.SERVICE_USER, 0, True, _error_for(arg)))
        self._artim = True  # start, or restart if already started
        return None

    def _aa_2(self, arg: object) -> State | None:
        self._closing()
        return None

    # AA-5 (Evt17 in Sta2) and AR-5 (Evt17 in Sta13) only stop ARTIM: the transport is
    # already gone, so they end exactly as AA-2 does.
    _aa_5 = _ar_5 = _aa_2

    def _aa_3(self, arg: object) -> State | None:
        assert isinstance(arg, AAbort)
        # Source 0 is an A-ABORT indication, 2 an A-P-ABORT; values are kept as received
        # (catalogue MP-35).
        self._events.append(Aborted(arg.source, arg.reason, False, None))
        self._closing()
        return None

    def _aa_4(self, arg: object) -> State | None:
        error = ConnectionClosed("the transport closed under the association")
        self._events.append(
            Aborted(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED, True, error)
        )
        self._closing()
        return None

    def _aa_6(self, arg: object) -> State | None:
        return None

    def _aa_7(self, arg: object) -> State | None:
        self._queue_abort(AbortSource.SERVICE_PROVIDER, _error_for(arg).reason)
        return None

    def _aa_8(self, arg: object) -> State | None:
        error = _error_for(arg)
        self._queue_abort(AbortSource.SERVICE_PROVIDER, error.reason)
        self._events.append(Aborted(AbortSource.SERVICE_PROVIDER, error.reason, True, error))
        self._artim = True
        return None


def _error_for(arg: object) -> PDUDecodeError | RemoteProtocolError:
    """The typed error behind an abort: Evt19's own error, or 'unexpected PDU' (reason 2)."""
    if isinstance(arg, PDUDecodeError | RemoteProtocolError):
        return arg
    return RemoteProtocolError(f"unexpected {type(arg).__name__}", AbortReason.UNEXPECTED_PDU)


def _unoffered(rq: AAssociateRQ, ac: AAssociateAC) -> str | None:
    """Why an AC accepts something the RQ never offered (catalogue SM-15), or None."""
    offered = {pc.context_id: pc.transfer_syntaxes for pc in rq.presentation_contexts}
    for pc in ac.presentation_contexts:
        if pc.result != 0:
            continue
        if pc.context_id not in offered:
            return f"A-ASSOCIATE-AC accepts presentation context {pc.context_id}, never proposed"
        if pc.transfer_syntax not in offered[pc.context_id]:
            return (
                f"A-ASSOCIATE-AC accepts context {pc.context_id} with transfer syntax "
                f"{pc.transfer_syntax!r}, never offered for it"
            )
    return None


#: Action -> method, by name (``Action.AE_6`` runs ``Connection._ae_6``).
_HANDLERS: dict[Action, _Handler] = {
    action: getattr(Connection, "_" + action.name.lower()) for action in Action
}
