"""The SCU side: ``associate()`` and the association object it returns.

Every wait has a deadline (DESIGN §2): TCP connect, A-ASSOCIATE-AC/RJ (ACSE timeout),
each DIMSE response, A-RELEASE-RP; a peer that stops reading is cut off by the write
deadline of the shared driver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl as ssl_module
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.acse import build_associate_rq, negotiate_as_requestor
from protocol.connection import (
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    PDataReceived,
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
    Message,
    iter_file_fragments,
)
from protocol.errors import (
    AssociationAborted,
    AssociationRejected,
    ConnectionClosed,
    DIMSEError,
    DIMSETimeout,
    LocalProtocolError,
    NoAcceptableContext,
    ProtocolError,
)
from protocol.items import RoleSelection, UserIdentityRQ
from protocol.limits import Limits
from protocol.net.association import AssociationProtocol, Timeouts
from protocol.part10 import read_part10
from protocol.pdu import AAssociateRQ
from protocol.uids import DEFLATED_EXPLICIT_VR_LE, VERIFICATION

log = logging.getLogger(__name__)

#: Datasets up to this size are read whole and sent in one write; larger ones stream.
_WHOLE_READ_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ContextRequest:
    """One presentation context to propose: an abstract syntax and its transfer syntaxes."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


class _SCUProtocol(AssociationProtocol):
    role = Role.REQUESTOR
    # A destination that aborts right after its last C-STORE-RSP did store the instance:
    # the response still counts (sending nothing back, the requestor cannot misbehave).
    kept_before_abort = (PDataReceived,)

    def __init__(self, rq: AAssociateRQ, limits: Limits, timeouts: Timeouts) -> None:
        self._rq = rq
        super().__init__(limits, timeouts)
        self.conn.request_association(rq)
        loop = asyncio.get_running_loop()
        self.established: asyncio.Future[None] = loop.create_future()
        self.response: asyncio.Future[Message] | None = None
        self.released: asyncio.Future[None] = loop.create_future()
        self.failure: ProtocolError | None = None

    def on_associate_accepted(self, event: AssociateAccepted) -> None:
        try:
            negotiated = negotiate_as_requestor(self._rq, event.ac)
        except ProtocolError as exc:
            self._fail(exc)
            self.abort()
            return
        self.info.contexts = dict(negotiated.contexts)
        self.info.peer_max_pdu_length = negotiated.peer_max_pdu_length
        self.info.calling_ae, self.info.called_ae = self._rq.calling_ae, self._rq.called_ae
        if not self.established.done():
            self.established.set_result(None)

    def on_associate_rejected(self, event: AssociateRejected) -> None:
        rj = event.rj
        self._fail(AssociationRejected(rj.result, rj.source, rj.reason))

    def on_associate_request(self, event: AssociateRequested) -> None:  # pragma: no cover
        raise AssertionError("a requestor never receives A-ASSOCIATE-RQ events")

    def on_command(self, event: CommandReceived) -> None:
        if self.response is None or self.response.done():
            raise DIMSEError(f"unsolicited {type(event.message).__name__}")
        if event.has_dataset:
            raise DIMSEError("a response with a data set")
        self.response.set_result(event.message)

    def on_dataset_fragment(self, event: DatasetFragment) -> None:
        raise DIMSEError("data set fragment where none was expected")

    def on_release_requested(self, event: ReleaseRequested) -> None:
        # Release collision (PS3.8 9.2.2 AR-8..AR-10) is resolved inside the connection;
        # a plain A-RELEASE-RQ from the acceptor is answered.
        if not event.collision:
            self.conn.respond_release()
            self._flush()

    def on_release_confirmed(self) -> None:
        if not self.released.done():
            self.released.set_result(None)

    def on_aborted(self, event: Aborted) -> None:
        if event.local and event.error is not None:
            self._fail(event.error)
        else:
            self._fail(AssociationAborted(event.source, event.reason))

    def on_closed(self) -> None:
        self._fail(ConnectionClosed("the connection closed"))

    def _fail(self, exc: ProtocolError) -> None:
        if self.failure is None:
            self.failure = exc
        for future in (self.established, self.response, self.released):
            if future is not None and not future.done():
                future.set_exception(self.failure)
                # Nobody may be waiting on this future (a release never asked for): the
                # caller learns of the failure from the call it is in, so mark it seen.
                future.exception()


class Association:
    """An established association, as requestor."""

    def __init__(self, protocol: _SCUProtocol) -> None:
        self._protocol = protocol
        self._message_id = 0
        self._lock = asyncio.Lock()

    @property
    def contexts(self) -> dict[int, tuple[str, str]]:
        """Accepted presentation contexts: id -> (abstract syntax, transfer syntax)."""
        return self._protocol.info.contexts

    @property
    def peer_max_pdu_length(self) -> int:
        return self._protocol.info.peer_max_pdu_length

    @property
    def is_alive(self) -> bool:
        transport = self._protocol.transport
        return (
            self._protocol.failure is None and transport is not None and not transport.is_closing()
        )

    def find_context(self, abstract_syntax: str, transfer_syntax: str | None = None) -> int:
        """The id of an accepted context for this SOP class (and transfer syntax)."""
        for context_id, (abstract, transfer) in self.contexts.items():
            if abstract == abstract_syntax and transfer_syntax in (None, transfer):
                return context_id
        wanted = f"{abstract_syntax} in {transfer_syntax}" if transfer_syntax else abstract_syntax
        raise NoAcceptableContext(f"no accepted presentation context for {wanted}")

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    async def send_c_echo(self) -> int:
        """C-ECHO (PS3.7 9.1.5); returns the status."""
        context_id = self.find_context(VERIFICATION)
        async with self._lock:
            response = await self._exchange(context_id, CEchoRQ(self._next_message_id()), None)
        if not isinstance(response, CEchoRSP):
            raise DIMSEError(f"expected C-ECHO-RSP, got {type(response).__name__}")
        return response.status

    async def send_c_store(
        self,
        dataset: bytes | memoryview,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        *,
        priority: int = 0,
    ) -> CStoreRSP:
        """C-STORE of an encoded dataset held in memory."""
        context_id = self.find_context(sop_class_uid, transfer_syntax)
        async with self._lock:
            request = CStoreRQ(self._next_message_id(), sop_class_uid, sop_instance_uid, priority)
            response = await self._exchange(context_id, request, dataset)
        return self._answer_to(request, response)

    async def send_c_store_file(
        self, path: str | os.PathLike[str], *, priority: int = 0
    ) -> CStoreRSP:
        """C-STORE of a Part 10 file's dataset, read from disk without decoding it."""
        with open(path, "rb") as f:
            meta = read_part10(f)
            context_id = self.find_context(meta.sop_class_uid, meta.transfer_syntax)
            length = meta.file_size - meta.dataset_offset
            async with self._lock:
                request = CStoreRQ(
                    self._next_message_id(), meta.sop_class_uid, meta.sop_instance_uid, priority
                )
                if length <= _WHOLE_READ_LIMIT:
                    f.seek(meta.dataset_offset)
                    dataset = f.read(length)
                    if len(dataset) % 2 and meta.transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
                        # PS3.5 A.5: a deflated stream is padded to even length with a
                        # NUL; some writers omit it and strict peers abort on odd PDVs.
                        dataset += b"\0"
                    response = await self._exchange(context_id, request, dataset)
                else:
                    response = await self._exchange_streamed(
                        context_id, request, f, meta.dataset_offset, length
                    )
        return self._answer_to(request, response)

    def _answer_to(self, request: CStoreRQ, response: Message) -> CStoreRSP:
        """``response`` if it answers ``request``: a C-STORE-RSP naming its Message ID
        and (when present) its SOP instance (PS3.7 9.3.1.2). Anything else is a DIMSE
        violation: abort (ABORT-U) and raise, so that a status answering some other
        request is never taken for this one's (catalogue DST-15)."""
        if not isinstance(response, CStoreRSP):
            problem = f"expected C-STORE-RSP, got {type(response).__name__}"
        elif response.message_id_being_responded_to != request.message_id:
            problem = (
                f"C-STORE-RSP answers message {response.message_id_being_responded_to},"
                f" not {request.message_id}"
            )
        elif response.affected_sop_instance_uid not in ("", request.affected_sop_instance_uid):
            problem = "C-STORE-RSP names another Affected SOP Instance UID"
        else:
            return response
        self._protocol.abort()
        raise DIMSEError(problem)

    async def _exchange(
        self, context_id: int, request: Message, dataset: bytes | memoryview | None
    ) -> Message:
        protocol = self._check_alive()
        protocol.response = asyncio.get_running_loop().create_future()
        protocol.send_message(context_id, request, dataset)
        return await self._await_response(protocol)

    async def _exchange_streamed(
        self, context_id: int, request: Message, f: object, offset: int, length: int
    ) -> Message:
        protocol = self._check_alive()
        protocol.response = asyncio.get_running_loop().create_future()
        protocol.send_message(context_id, request)
        max_pdu = protocol.conn.peer_max_pdu_length
        for buffers in iter_file_fragments(f, offset, length, context_id, max_pdu):  # type: ignore[arg-type]
            protocol.send_buffers(buffers)
            await protocol.drain()
            if protocol.failure is not None:
                raise protocol.failure
        return await self._await_response(protocol)

    async def _await_response(self, protocol: _SCUProtocol) -> Message:
        assert protocol.response is not None
        try:
            return await asyncio.wait_for(protocol.response, protocol.timeouts.dimse)
        except TimeoutError:
            protocol.abort()
            raise DIMSETimeout(
                f"no DIMSE response within {protocol.timeouts.dimse} s; association aborted"
            ) from None

    def _check_alive(self) -> _SCUProtocol:
        protocol = self._protocol
        if protocol.failure is not None:
            raise protocol.failure
        if protocol.transport is None or protocol.transport.is_closing():
            raise ConnectionClosed("the association is closed")
        return protocol

    async def release(self) -> None:
        """A-RELEASE (PS3.8 7.2); waits for A-RELEASE-RP within the ACSE timeout."""
        protocol = self._check_alive()
        async with self._lock:
            try:
                protocol.conn.request_release()
            except LocalProtocolError as exc:
                raise ConnectionClosed(str(exc)) from exc
            protocol._flush()
            try:
                await asyncio.wait_for(protocol.released, protocol.timeouts.acse)
            except TimeoutError:
                protocol.abort()
                raise DIMSETimeout("no A-RELEASE-RP within the ACSE timeout; aborted") from None
            await asyncio.wait_for(protocol.closed, protocol.timeouts.artim)

    def abort(self) -> None:
        """A-ABORT (service-user source) and close."""
        self._protocol.abort()

    async def wait_closed(self) -> None:
        await self._protocol.closed


async def associate(
    host: str,
    port: int,
    contexts: Sequence[ContextRequest],
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "DICOMROUTER",
    max_pdu_length: int | None = None,
    limits: Limits | None = None,
    timeouts: Timeouts | None = None,
    ssl: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
    user_identity: UserIdentityRQ | None = None,
    role_selections: Sequence[RoleSelection] = (),
) -> Association:
    """Open an association; raises ``AssociationRejected``, ``AssociationAborted``,
    ``ConnectionClosed`` or ``OSError``/``TimeoutError`` for the transport."""
    limits = limits or Limits()
    if max_pdu_length is not None:
        limits = _with_max_pdu(limits, max_pdu_length)
    timeouts = timeouts or Timeouts()
    if not contexts:
        raise LocalProtocolError("at least one presentation context must be proposed")
    rq = build_associate_rq(
        called_ae,
        calling_ae,
        [(c.abstract_syntax, c.transfer_syntaxes) for c in contexts],
        max_pdu_length=limits.max_pdu_length,
        user_identity=user_identity,
        role_selections=tuple(role_selections),
    )
    loop = asyncio.get_running_loop()
    connect = loop.create_connection(
        lambda: _SCUProtocol(rq, limits, timeouts),
        host,
        port,
        ssl=ssl,
        server_hostname=server_hostname if ssl else None,
    )
    try:
        _, protocol = await asyncio.wait_for(connect, timeouts.connect)
    except TimeoutError:
        raise TimeoutError(f"TCP connect to {host}:{port} timed out") from None
    try:
        await asyncio.wait_for(asyncio.shield(protocol.established), timeouts.acse)
    except TimeoutError:
        protocol.abort()
        raise DIMSETimeout(
            f"no A-ASSOCIATE-AC from {host}:{port} within the ACSE timeout"
        ) from None
    if not protocol.info.contexts:
        assoc = Association(protocol)
        assoc.abort()
        raise NoAcceptableContext("the peer accepted none of the proposed presentation contexts")
    return Association(protocol)


def _with_max_pdu(limits: Limits, max_pdu_length: int) -> Limits:
    from dataclasses import replace

    return replace(limits, max_pdu_length=max_pdu_length)
