"""The asyncio edge shared by both roles: one ``asyncio.Protocol`` per association.

It owns what the sans-IO core must not: the socket, the clocks and the event loop.
Bytes from the socket go into ``Connection.receive_data``; whatever the connection
queued goes out in one ``writelines`` call; timers the connection asks for (ARTIM) and
the deadlines of DESIGN §2 (ACSE, DIMSE, idle, write) are loop callbacks that feed
expiries back in. The write deadline holds whenever bytes wait in the transport's
buffer, not only past its high-water mark (``_sync_write_deadline``). P-DATA is
reassembled by ``dimse.MessageAssembler`` and handed to the role-specific subclass as
whole commands and streamed dataset fragments.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from protocol.dimse import (
    CommandReceived,
    DatasetFragment,
    Message,
    MessageAssembler,
    encode_command,
    fragment,
)
from protocol.errors import (
    AbortSource,
    AssociationAborted,
    DIMSEError,
    DIMSETimeout,
    ProtocolError,
)
from protocol.fsm import State
from protocol.limits import Limits
from protocol.pdu import AAssociateRJ, AAssociateRQ

log = logging.getLogger(__name__)

_association_ids = itertools.count(1)


class WriteTimeout(DIMSETimeout):
    """The peer read none of what we sent for ``Timeouts.write`` seconds (zero window)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines in seconds (None = wait forever, never the default for a peer's input)."""

    connect: float | None = 30.0  # TCP connect (SCU)
    acse: float | None = 30.0  # A-ASSOCIATE-AC/RJ and A-RELEASE-RP (SCU)
    dimse: float | None = 60.0  # a DIMSE response (SCU)
    artim: float = 30.0  # PS3.8 9.1.5: first PDU after connect, and Sta13 before close
    idle: float | None = 300.0  # no PDU at all on an established association
    # The rest of a PDU whose first bytes arrived: an absolute deadline per PDU, so a
    # peer trickling a byte now and then (slowloris, catalogue RX-02/RX-03) is cut off.
    pdu: float | None = 120.0
    write: float | None = 60.0  # a peer that stops reading (zero window) holds no slot


@dataclass(slots=True)
class AssociationInfo:
    """What the application may know about an association (no protocol state)."""

    association_id: int
    peer_host: str
    peer_port: int
    calling_ae: str = ""
    called_ae: str = ""
    # context id -> (abstract syntax, transfer syntax)
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)
    peer_max_pdu_length: int = 0
    username: str | None = None

    @property
    def peer(self) -> str:
        return f"{self.peer_host}:{self.peer_port}"


class AssociationProtocol(asyncio.Protocol):
    """Base of the SCP and SCU association drivers."""

    role: Role
    #: Indications still delivered when the same read also ended in an abort.
    kept_before_abort: tuple[type, ...] = ()

    def __init__(self, limits: Limits, timeouts: Timeouts) -> None:
        self.limits = limits
        self.timeouts = timeouts
        self.conn = Connection(self.role, limits)
        self.assembler = MessageAssembler(limits)
        self.transport: asyncio.Transport | None = None
        self.info = AssociationInfo(next(_association_ids), "", 0)
        self.closed = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._artim: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._pdu_deadline: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused_at: float | None = None  # loop time of pause_writing, until resumed
        self._queued = 0  # bytes handed to the transport so far
        self._write_mark = (0, 0)  # (_queued, buffered bytes) when the deadline was armed
        self._abort_reported = False

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # DESIGN §2: without TCP_NODELAY each DIMSE exchange waits on Nagle + delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.info.peer_host, self.info.peer_port = str(peer[0]), int(peer[1])
        self.conn.transport_connected()
        self._flush()
        self._touch_idle()

    def data_received(self, data: bytes) -> None:
        self._touch_idle()
        events = self.conn.receive_data(data)
        self._flush()
        if self.conn.provider_rejection is not None and not self._abort_reported:
            self._report_provider_rejection(*self.conn.provider_rejection)
        if log.isEnabledFor(logging.DEBUG):
            for event in events:
                log.debug("%s: received %s", self.info.peer, describe_event(event))
        if any(isinstance(event, Aborted) for event in events):
            # One read can hold PDUs and, after them, the abort they led to (an A-RELEASE-RQ
            # then P-DATA, catalogue SM-06). The association is gone: indications before the
            # abort would answer in Sta13 or commit an instance that can never be
            # acknowledged. An abort may lose data in transit (PS3.8 7.3.1).
            kept = (Aborted, Closed, *self.kept_before_abort)
            events = [event for event in events if isinstance(event, kept)]
        for event in events:
            self._dispatch(event)
        self._sync_pdu_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.state is State.Sta2 and self.conn.receiving_pdu:
            # Catalogue MP-08: a first PDU cut short by the peer is bad input, so one line
            # names it (Evt17 in Sta2 needs no reply; a bare connect-and-close logs none).
            log.warning("%s: closed the connection in the middle of its first PDU", self.info.peer)
        events = self.conn.connection_lost()
        for event in events:
            self._dispatch(event)
        self._cancel_timers()
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("connection lost"))
            # A waiter (drain) gets it; with none, asyncio must not log it as an ERROR.
            self._writable.exception()
        self.on_closed()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()
        self._paused_at = self._loop.time()
        self._sync_write_deadline()

    def resume_writing(self) -> None:
        # The deadline stays armed: when it fires it sees the bytes that left meanwhile.
        self._paused_at = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- sending ----------------------------------------------------------------------
    def send_message(
        self, context_id: int, message: Message, dataset: bytes | memoryview | None = None
    ) -> None:
        """Queue a command (and a dataset held in memory) on the association."""
        max_pdu = self.conn.peer_max_pdu_length
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: sending %s on context %d%s",
                self.info.peer,
                message,
                context_id,
                f" with a {len(dataset)}-byte data set" if dataset is not None else "",
            )
        buffers = fragment(context_id, encode_command(message), True, max_pdu)
        if dataset is not None:
            buffers += fragment(context_id, dataset, False, max_pdu)
        self.conn.send_pdata(buffers)
        self._flush()

    def send_buffers(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Queue already-fragmented P-DATA-TF PDUs (a streamed dataset)."""
        self.conn.send_pdata(list(buffers))
        self._flush()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._writable is not None and not self._writable.done():
            await self._writable

    def abort(self, source: int = AbortSource.SERVICE_USER, reason: int = 0) -> None:
        """A-ABORT (Evt15 -> AA-1) and close."""
        if self.transport is None or self.transport.is_closing():
            return
        # In a state with no association to abort (Table 9-10 has no Evt15 cell) the
        # connection refuses; closing below is then all there is to do.
        with contextlib.suppress(ProtocolError):
            self.conn.abort(source, reason)
        self._flush()
        if not self.transport.is_closing():
            # AA-1 leaves the connection in Sta13 waiting for the peer to close; we do not
            # hold the socket for a peer we are aborting (PS3.8 9.2.2 permits the close).
            self.transport.close()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        buffers = self.conn.data_to_send()
        if buffers and not transport.is_closing():
            transport.writelines(buffers)
            self._queued += sum(map(len, buffers))
            self._sync_write_deadline()
        self._sync_artim()
        if self.conn.should_close and not transport.is_closing():
            transport.close()

    # -- events -----------------------------------------------------------------------
    def _dispatch(self, event: object) -> None:
        if isinstance(event, PDataReceived):
            self._on_pdata(event)
        elif isinstance(event, AssociateRequested):
            self.on_associate_request(event)
        elif isinstance(event, AssociateAccepted):
            self.on_associate_accepted(event)
        elif isinstance(event, AssociateRejected):
            self.on_associate_rejected(event)
        elif isinstance(event, ReleaseRequested):
            self.on_release_requested(event)
        elif isinstance(event, ReleaseConfirmed):
            self.on_release_confirmed()
        elif isinstance(event, Aborted):
            self._report_abort(event)
            self.on_aborted(event)
        elif isinstance(event, Closed) and self.transport is not None:
            self.transport.close()

    def _on_pdata(self, event: PDataReceived) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # aborted by an earlier PDU of the same read: one violation, one line
        try:
            for pdv in event.pdu.pdvs:
                for item in self.assembler.feed(pdv):
                    if isinstance(item, DatasetFragment):
                        self.on_dataset_fragment(item)
                    elif isinstance(item, CommandReceived):
                        self.on_command(item)
        except DIMSEError as exc:
            # Catalogue ABORT-U: a violation above the Upper Layer is a user abort (Evt15).
            log.warning("%s: DIMSE violation, aborting: %s", self.info.peer, exc)
            self.on_aborted(Aborted(AbortSource.SERVICE_USER, 0, True, exc))
            self.abort()

    def _report_abort(self, event: Aborted) -> None:
        if self._abort_reported:
            return
        self._abort_reported = True
        if event.local:
            log.warning(
                "%s: aborted (source %d, reason %d): %s",
                self.info.peer,
                event.source,
                event.reason,
                event.error,
            )
        else:
            log.info(
                "%s: peer aborted (source %d, reason %d)",
                self.info.peer,
                event.source,
                event.reason,
            )

    def _report_provider_rejection(self, rq: AAssociateRQ, rj: AAssociateRJ) -> None:
        # DESIGN §6: every refusal is one log line with the peer's address, including the
        # ones the Upper Layer makes itself (PS3.8 9.3.2: protocol version).
        self._abort_reported = True
        if rq.protocol_version & 1:
            why = "no application context name"
        else:
            why = f"protocol version 0x{rq.protocol_version:04X} not supported"
        log.warning(
            "%s: association from %r to %r rejected (result %d, source %d, reason %d): %s",
            self.info.peer,
            rq.calling_ae,
            rq.called_ae,
            rj.result,
            rj.source,
            rj.reason,
            why,
        )

    # -- timers -----------------------------------------------------------------------
    def _sync_artim(self) -> None:
        running = self.conn.artim_running
        if running and self._artim is None:
            self._artim = self._loop.call_later(self.timeouts.artim, self._artim_expired)
        elif not running and self._artim is not None:
            self._artim.cancel()
            self._artim = None

    def _artim_expired(self) -> None:
        self._artim = None
        if self.conn.state is State.Sta2:
            # Catalogue MP-09: a peer that connects and never completes an A-ASSOCIATE-RQ
            # (slow loris) is a bad peer: one WARNING naming it (PS3.8 9.1.5, AA-2).
            log.warning(
                "%s: no A-ASSOCIATE-RQ within %.0f s (ARTIM), closing",
                self.info.peer,
                self.timeouts.artim,
            )
        else:
            log.info("%s: ARTIM timer expired", self.info.peer or "peer")
        for event in self.conn.timer_expired():
            self._dispatch(event)
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _touch_idle(self) -> None:
        if self.timeouts.idle is None:
            return
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(self.timeouts.idle, self._idle_expired)

    def _owes_response(self) -> bool:
        """Whether the peer is waiting for us (a response being made): it is then silent
        by the protocol, and the idle timer must not count that (an SCP overrides)."""
        return False

    def _idle_expired(self) -> None:
        self._idle = None
        if self._owes_response():
            self._touch_idle()  # our turn, not the peer's: start counting once we answer
            return
        log.warning("%s: no data for %.0f s, aborting", self.info.peer, self.timeouts.idle or 0)
        self.on_aborted(
            Aborted(AbortSource.SERVICE_USER, 0, True, AssociationAborted(0, 0, "idle timeout"))
        )
        self.abort()

    def _sync_write_deadline(self) -> None:
        """Arm the write deadline whenever bytes wait in the transport's buffer.

        Past the high-water mark (``pause_writing``) was not enough: the kernel's socket
        buffer (megabytes on loopback) takes a stalled peer's first responses, and what
        stays behind below the mark, or an A-ABORT or A-RELEASE-RP queued before a
        ``close()``, then waited forever: ``close()`` flushes before it closes, so the
        association (and its slot) outlived every other deadline. Called after every
        write and at ``pause_writing``: so the deadline runs while the buffer is not empty.
        """
        transport = self.transport
        if self.timeouts.write is None or self._write_deadline is not None or transport is None:
            return
        if transport.get_write_buffer_size() > 0:
            self._arm_write_deadline(self.timeouts.write)

    def _arm_write_deadline(self, delay: float) -> None:
        assert self.transport is not None
        self._write_mark = (self._queued, self.transport.get_write_buffer_size())
        self._write_deadline = self._loop.call_later(delay, self._write_deadline_expired)

    def _write_deadline_expired(self) -> None:
        self._write_deadline = None
        transport, limit = self.transport, self.timeouts.write
        if transport is None or limit is None:
            return
        if self._paused_at is not None:
            # Past the high-water mark the buffer must drain to the low-water mark
            # within the deadline (a peer reading a trickle does not hold the slot).
            left = self._paused_at + limit - self._loop.time()
            if left > 0:
                self._arm_write_deadline(left)
            else:
                self._write_stalled()
            return
        buffered = transport.get_write_buffer_size()
        if buffered == 0:
            return  # all sent; the next write arms it again
        queued, buffered_then = self._write_mark
        sent = buffered_then + (self._queued - queued) - buffered
        if sent > 0:
            # Bytes left the buffer: the socket took them, and it only does once the
            # peer has read a good part of the kernel's buffer, not a byte now and then.
            self._arm_write_deadline(limit)
        else:
            self._write_stalled()

    def _write_stalled(self) -> None:
        limit = self.timeouts.write or 0
        self._abort_reported = True  # this is the line; the lost transport adds none
        log.warning("%s: peer stopped reading for %.0f s, aborting", self.info.peer, limit)
        # An A-ABORT PDU cannot reach a peer that reads nothing (it would queue behind
        # the stuck bytes): the connection is reset, which the peer sees as the abort
        # (an abort may lose data in transit, PS3.8 7.3.1). Whoever waits on this
        # association (a drain, a response) learns why.
        error = WriteTimeout(f"the peer stopped reading for {limit:g} s; connection reset")
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(error)
            self._writable.exception()  # seen, whether or not a drain waits on it
        self.on_aborted(Aborted(AbortSource.SERVICE_USER, 0, True, error))
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close() resets the connection and drops the unsent bytes. A plain
            # close would queue our FIN behind them, where a peer that never reads never
            # sees it, and the kernel would hold the buffers of an orphan for minutes.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _sync_pdu_deadline(self) -> None:
        if self.timeouts.pdu is None:
            return
        receiving = self.conn.receiving_pdu
        if receiving and self._pdu_deadline is None:
            self._pdu_deadline = self._loop.call_later(self.timeouts.pdu, self._pdu_stalled)
        elif not receiving and self._pdu_deadline is not None:
            self._pdu_deadline.cancel()
            self._pdu_deadline = None

    def _pdu_stalled(self) -> None:
        self._pdu_deadline = None
        log.warning(
            "%s: a PDU did not complete within %.0f s, aborting",
            self.info.peer,
            self.timeouts.pdu or 0,
        )
        self.on_aborted(
            Aborted(AbortSource.SERVICE_USER, 0, True, AssociationAborted(0, 0, "PDU deadline"))
        )
        self.abort()

    def _cancel_timers(self) -> None:
        for handle in (self._artim, self._idle, self._write_deadline, self._pdu_deadline):
            if handle is not None:
                handle.cancel()
        self._artim = self._idle = self._write_deadline = self._pdu_deadline = None

    # -- hooks for the roles ----------------------------------------------------------
    def on_associate_request(self, event: AssociateRequested) -> None:
        raise NotImplementedError

    def on_associate_accepted(self, event: AssociateAccepted) -> None:
        raise NotImplementedError

    def on_associate_rejected(self, event: AssociateRejected) -> None:
        raise NotImplementedError

    def on_command(self, event: CommandReceived) -> None:
        raise NotImplementedError

    def on_dataset_fragment(self, event: DatasetFragment) -> None:
        raise NotImplementedError

    def on_release_requested(self, event: ReleaseRequested) -> None:
        raise NotImplementedError

    def on_release_confirmed(self) -> None:
        raise NotImplementedError

    def on_aborted(self, event: Aborted) -> None:
        """The association ended abnormally (peer A-ABORT, provider abort, lost link)."""

    def on_closed(self) -> None:
        """The transport is closed; release every resource held for the association."""


def describe_event(event: object) -> str:
    """A one-line summary of an Upper Layer event for ``-d`` logs (no patient data)."""
    if isinstance(event, PDataReceived):
        parts = [
            f"{'command' if pdv.is_command else 'data'}{' last' if pdv.is_last else ''} "
            f"{len(pdv.data)} B ctx {pdv.context_id}"
            for pdv in event.pdu.pdvs
        ]
        return "P-DATA-TF [" + ", ".join(parts) + "]"
    if isinstance(event, AssociateRequested):
        rq = event.rq
        return (
            f"A-ASSOCIATE-RQ {rq.calling_ae!r} -> {rq.called_ae!r}, "
            f"{len(rq.presentation_contexts)} contexts, max PDU {rq.user_information.max_length}"
        )
    if isinstance(event, AssociateAccepted):
        ac = event.ac
        accepted = sum(1 for c in ac.presentation_contexts if c.result == 0)
        return (
            f"A-ASSOCIATE-AC {accepted}/{len(ac.presentation_contexts)} contexts accepted, "
            f"max PDU {ac.user_information.max_length}"
        )
    if isinstance(event, AssociateRejected):
        rj = event.rj
        return f"A-ASSOCIATE-RJ result {rj.result} source {rj.source} reason {rj.reason}"
    if isinstance(event, Aborted):
        side = "local" if event.local else "peer"
        return f"abort source {event.source} reason {event.reason} ({side})"
    return type(event).__name__
