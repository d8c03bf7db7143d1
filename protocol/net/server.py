"""The SCP side: an asyncio server accepting many associations in one process.

The application supplies a ``ServiceHandler``: C-ECHO returns a status; C-STORE returns
either an immediate outcome (refusal) or a ``StoreSink`` that receives the dataset
fragment by fragment and is then asked to ``finish()`` (synchronously, or with an
awaitable for work such as fsync + database commit). Responses go out in request order:
while a finish is awaited the association stops reading (PS3.7 without an asynchronous
operations window allows one outstanding operation anyway).
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from protocol.acse import AcceptorPolicy, negotiate_as_acceptor, reject_for_limit
from protocol.connection import (
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    ReleaseRequested,
    Role,
)
from protocol.dimse import (
    CEchoRQ,
    CEchoRSP,
    CommandReceived,
    CStoreRQ,
    CStoreRSP,
    DatasetFragment,
    UnsupportedCommand,
)
from protocol.errors import DIMSEError
from protocol.limits import Limits
from protocol.net.association import AssociationInfo, AssociationProtocol, Timeouts
from protocol.pdu import AAssociateAC, AAssociateRJ, AAssociateRQ
from protocol.status import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """The status a C-STORE-RSP carries (PS3.4 B.2.3), with an optional error comment."""

    status: int
    error_comment: str | None = None


class StoreSink(Protocol):
    """Receives one C-STORE dataset as it arrives."""

    def write(self, data: bytes | memoryview) -> None: ...

    def finish(self) -> StoreOutcome | Awaitable[StoreOutcome]: ...

    def discard(self) -> None: ...


class ServiceHandler(Protocol):
    def on_echo(self, info: AssociationInfo) -> int: ...

    def on_store(
        self, info: AssociationInfo, request: CStoreRQ, transfer_syntax: str
    ) -> StoreSink | StoreOutcome: ...


#: Decides, before negotiation, whether a peer may associate at all (e.g. known calling
#: AE titles pinned to addresses); returns the A-ASSOCIATE-RJ to send, or None.
AdmitHook = Callable[[AssociationInfo, AAssociateRQ], AAssociateRJ | None]


class _Refused:
    """Sink for a dataset whose C-STORE was already refused: reads and drops it."""

    def __init__(self, outcome: StoreOutcome) -> None:
        self.outcome = outcome

    def write(self, data: bytes | memoryview) -> None:
        pass

    def finish(self) -> StoreOutcome:
        return self.outcome

    def discard(self) -> None:
        pass


class SCPAssociation(AssociationProtocol):
    role = Role.ACCEPTOR

    def __init__(self, server: SCPServer) -> None:
        super().__init__(server.limits, server.timeouts)
        self.server = server
        self._established = False
        self._sink: StoreSink | None = None
        self._request: CStoreRQ | None = None
        self._context_id = 0
        self._pending_finish: asyncio.Task[None] | None = None
        self._dataset_started = 0.0  # monotonic time of the C-STORE-RQ being received
        self._dataset_bytes = 0

    # -- association -------------------------------------------------------------------
    def on_associate_request(self, event: AssociateRequested) -> None:
        rq = event.rq
        self.info.calling_ae, self.info.called_ae = rq.calling_ae, rq.called_ae
        reply: AAssociateAC | AAssociateRJ
        refusal = self.server.admit(self.info, rq) if self.server.admit else None
        if refusal is not None:
            reply = refusal
        elif not self.server.has_room(rq.calling_ae):
            reply = reject_for_limit()
        else:
            reply = negotiate_as_acceptor(rq, self.server.policy, self.limits)
        if isinstance(reply, AAssociateRJ):
            self.server.notify("rejected", self.info, reply)
            log.warning(
                "%s: association from %r to %r rejected (result %d, source %d, reason %d)",
                self.info.peer,
                rq.calling_ae,
                rq.called_ae,
                reply.result,
                reply.source,
                reply.reason,
            )
            self.conn.reject(reply)
            self._flush()
            return
        self.conn.accept(reply)
        self._established = True
        self.server.register(self)
        self.info.contexts = dict(self.conn.accepted_contexts)
        self.info.peer_max_pdu_length = self.conn.peer_max_pdu_length
        self.server.notify("accepted", self.info)
        log.info(
            "%s: association accepted from %r (%d contexts)",
            self.info.peer,
            rq.calling_ae,
            len(self.info.contexts),
        )
        self._flush()

    def on_associate_accepted(self, event: AssociateAccepted) -> None:  # pragma: no cover
        raise AssertionError("an acceptor never receives A-ASSOCIATE-AC events")

    def on_associate_rejected(self, event: AssociateRejected) -> None:  # pragma: no cover
        raise AssertionError("an acceptor never receives A-ASSOCIATE-RJ events")

    def on_release_requested(self, event: ReleaseRequested) -> None:
        if event.collision:
            return  # PS3.8 AR-8..AR-10: the connection answers a release collision itself
        if self._sink is not None or self._pending_finish is not None:
            # Catalogue SM-18: a release in the middle of a message is not a release.
            log.warning("%s: A-RELEASE-RQ with a message in progress, aborting", self.info.peer)
            self._drop_sink()
            self.abort()
            return
        self.conn.respond_release()
        self._flush()
        log.info("%s: association released", self.info.peer)

    def on_release_confirmed(self) -> None:  # pragma: no cover
        raise AssertionError("the SCP never requests a release")

    def on_aborted(self, event: Aborted) -> None:
        self._drop_sink()

    def on_closed(self) -> None:
        self._drop_sink()
        if self._pending_finish is not None:
            self._pending_finish.cancel()
        if self._established:
            self.server.unregister(self)
            self._established = False
            self.server.notify("closed")

    # -- DIMSE ---------------------------------------------------------------------------
    def on_command(self, event: CommandReceived) -> None:
        message = event.message
        context = self.info.contexts.get(event.context_id)
        if context is None:  # pragma: no cover - the connection checks PDV context ids
            raise DIMSEError(f"command on unknown context {event.context_id}")
        if self._request is not None:
            # Catalogue SM-14: we negotiate no Asynchronous Operations Window (PS3.7
            # D.3.3.3: one outstanding operation), so a request before the last one's
            # response is a violation (ABORT-U), never a second data set in flight.
            raise DIMSEError(
                f"{type(message).__name__} while message {self._request.message_id} "
                "is outstanding (no asynchronous operations window)"
            )
        if isinstance(message, CStoreRQ):
            self._begin_store(event, message, context)
        elif isinstance(message, CEchoRQ):
            if event.has_dataset:
                raise DIMSEError("C-ECHO-RQ with a data set")  # catalogue DM-11
            status = self.server.handler.on_echo(self.info)
            self.send_message(event.context_id, CEchoRSP(message.message_id, status))
        elif isinstance(message, UnsupportedCommand):
            # Catalogue DM-02: an operation we do not serve ends the association (ABORT-U).
            raise DIMSEError(f"unsupported command field 0x{message.command_field:04X}")
        else:
            raise DIMSEError(f"unexpected {type(message).__name__} from a requestor")

    def _begin_store(
        self, event: CommandReceived, request: CStoreRQ, context: tuple[str, str]
    ) -> None:
        self._context_id = event.context_id
        self._request = request
        self._dataset_started, self._dataset_bytes = time.monotonic(), 0
        abstract_syntax, transfer_syntax = context
        outcome: StoreSink | StoreOutcome
        if request.affected_sop_class_uid != abstract_syntax:
            # Catalogue DM-08: the SOP class must be the context's abstract syntax.
            outcome = StoreOutcome(SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the context")
        elif not event.has_dataset:
            outcome = StoreOutcome(CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
        else:
            try:
                outcome = self.server.handler.on_store(self.info, request, transfer_syntax)
            except OSError as exc:
                log.warning("%s: cannot store: %s", self.info.peer, exc)
                outcome = StoreOutcome(OUT_OF_RESOURCES, "cannot store the instance")
        if isinstance(outcome, StoreOutcome):
            if not event.has_dataset:
                self._respond(outcome)
                return
            outcome = _Refused(outcome)
        self._sink = outcome

    def on_dataset_fragment(self, event: DatasetFragment) -> None:
        sink = self._sink
        if sink is None:  # pragma: no cover - the assembler checks the order
            raise DIMSEError("data set fragment without a C-STORE-RQ")
        self._dataset_bytes += len(event.data)
        if not event.last:
            self._check_progress()
        try:
            sink.write(event.data)
        except OSError as exc:
            log.warning("%s: writing the data set failed: %s", self.info.peer, exc)
            sink.discard()
            sink = self._sink = _Refused(
                StoreOutcome(OUT_OF_RESOURCES, "cannot write the instance")
            )
        if event.last:
            self._sink = None
            self._finish(sink)

    def _check_progress(self) -> None:
        """Limits.min_dataset_rate (catalogue RX-03): an ABORT-U, through the DIMSE
        violation path, for a data set trickling in below the minimum."""
        limits = self.server.limits
        elapsed = time.monotonic() - self._dataset_started
        if not limits.min_dataset_rate or elapsed <= limits.min_rate_grace:
            return
        rate = self._dataset_bytes / elapsed
        if rate < limits.min_dataset_rate:
            raise DIMSEError(
                f"data set arriving at {rate:.0f} bytes/s for {elapsed:.0f} s, below the"
                f" minimum of {limits.min_dataset_rate} bytes/s"
            )

    def _finish(self, sink: StoreSink) -> None:
        try:
            result = sink.finish()
        except OSError as exc:
            log.warning("%s: completing the store failed: %s", self.info.peer, exc)
            result = StoreOutcome(OUT_OF_RESOURCES, "cannot store the instance")
        if isinstance(result, StoreOutcome):
            self._respond(result)
            return
        # Durable completion (fsync, commit) runs while reading pauses, so the next
        # request is not read before this response is sent.
        if self.transport is not None:
            self.transport.pause_reading()
        self._pending_finish = asyncio.ensure_future(self._await_finish(result))

    def _owes_response(self) -> bool:
        return self._pending_finish is not None

    async def _await_finish(self, result: Awaitable[StoreOutcome]) -> None:
        try:
            outcome = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the sink's failure becomes a status, never a crash
            log.warning("%s: completing the store failed: %s", self.info.peer, exc)
            outcome = StoreOutcome(OUT_OF_RESOURCES, "cannot store the instance")
        self._pending_finish = None
        if self.transport is None or self.transport.is_closing():
            return
        self._respond(outcome)
        self.transport.resume_reading()
        self._touch_idle()  # the peer's turn again: the idle timeout counts from here

    def _respond(self, outcome: StoreOutcome) -> None:
        request = self._request
        assert request is not None
        self._request = None
        response = CStoreRSP(
            request.message_id,
            request.affected_sop_class_uid,
            request.affected_sop_instance_uid,
            outcome.status,
            outcome.error_comment,
        )
        if outcome.status != SUCCESS:
            log.warning(
                "%s: C-STORE answered 0x%04X: %s",
                self.info.peer,
                outcome.status,
                outcome.error_comment or "",
            )
        self.send_message(self._context_id, response)

    def _drop_sink(self) -> None:
        if self._sink is not None:
            self._sink.discard()
            self._sink = None


class SCPServer:
    """Listens on one address; counts associations for the limits of DESIGN §2."""

    def __init__(
        self,
        handler: ServiceHandler,
        policy: AcceptorPolicy,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        admit: AdmitHook | None = None,
    ) -> None:
        self.handler = handler
        self.admit = admit
        self.policy = policy
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.associations: set[SCPAssociation] = set()
        self._per_calling_ae: Counter[str] = Counter()
        #: Called with "accepted", "rejected" or "closed" (an accepted association
        #: ended) after the counts changed: the embedding's metrics.
        self.on_association: Callable[[str], None] | None = None
        #: Called with "accepted" or "rejected", the association's info and the
        #: A-ASSOCIATE-RJ sent (None when accepted) as each request is answered: the
        #: embedding's audit trail.
        self.on_association_outcome: (
            Callable[[str, AssociationInfo, AAssociateRJ | None], None] | None
        ) = None
        self._server: asyncio.Server | None = None

    def has_room(self, calling_ae: str) -> bool:
        if len(self.associations) >= self.limits.max_associations:
            return False
        return self._per_calling_ae[calling_ae] < self.limits.max_associations_per_calling_ae

    def notify(
        self,
        event: str,
        info: AssociationInfo | None = None,
        rejection: AAssociateRJ | None = None,
    ) -> None:
        if self.on_association is not None:
            self.on_association(event)
        if info is not None and self.on_association_outcome is not None:
            self.on_association_outcome(event, info, rejection)

    def register(self, association: SCPAssociation) -> None:
        self.associations.add(association)
        self._per_calling_ae[association.info.calling_ae] += 1

    def unregister(self, association: SCPAssociation) -> None:
        self.associations.discard(association)
        ae = association.info.calling_ae
        self._per_calling_ae[ae] -= 1
        if self._per_calling_ae[ae] <= 0:
            del self._per_calling_ae[ae]

    async def start(
        self,
        host: str | None,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SCPAssociation(self),
            host,
            port,
            ssl=ssl,
            reuse_address=True,
            reuse_port=reuse_port or None,
            ssl_handshake_timeout=self.timeouts.artim if ssl else None,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, give live associations ``grace`` seconds, then abort them."""
        if self._server is not None:
            self._server.close()
        pending = [a.closed for a in list(self.associations)]
        if pending:
            _, still_open = await asyncio.wait(pending, timeout=grace)
            if still_open:
                for association in list(self.associations):
                    association.abort()
        if self._server is not None:
            await self._server.wait_closed()


async def start_server(
    handler: ServiceHandler,
    policy: AcceptorPolicy,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    limits: Limits | None = None,
    timeouts: Timeouts | None = None,
    ssl: ssl_module.SSLContext | None = None,
    reuse_port: bool = False,
    admit: AdmitHook | None = None,
) -> SCPServer:
    """Start an SCP and return it once it listens (``port`` 0 picks a free port)."""
    server = SCPServer(handler, policy, limits, timeouts, admit)
    await server.start(host, port, ssl=ssl, reuse_port=reuse_port)
    return server
