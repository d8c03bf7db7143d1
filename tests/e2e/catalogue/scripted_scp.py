"""A scripted destination: a Storage SCP on a real listening socket that misbehaves on
purpose (catalogue B.8, DST-xx; Part C.1's "scripted raw peer", acceptor side).

Every byte it sends is built here by hand from PS3.8 9.3 (PDUs) and PS3.7 (command
sets), not by our protocol package, so the worker is never checked against itself.
It speaks just enough DICOM to accept an association, reassemble C-STORE/C-ECHO
requests and answer them; everything else is a script:

* ``association(n) -> Assoc``: what the n-th connection (from 1) meets: an
  A-ASSOCIATE-AC (with a presentation context result and a Maximum Length of the
  script's choosing), an A-ASSOCIATE-RJ, an A-ABORT, silence, a close, raw bytes, or
  an A-ASSOCIATE-AC after which nothing is ever read again (a zero TCP window, RX-16);
* ``store(n) -> Reply``: how the n-th C-STORE (from 1, over all connections) is
  answered: a status (with an Error Comment), a wrong Message ID Being Responded To or
  Affected SOP Instance UID, an A-ABORT, silence, a close in the middle of the response
  PDU, or raw bytes (a malformed or oversized PDU).

It records what it saw: connections, the A-ASSOCIATE-RQs' proposed contexts, each
P-DATA-TF PDU's length (DST-16), the data sets answered with success, and how each
stalled connection ended ("reset" or "closed" by the worker).

Blocking sockets and one thread per connection; ``close()`` ends them all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

HOST = "127.0.0.1"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS = b"1.2.826.0.1.3680043.9.9999.8"
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101


# --------------------------------------------------------------------------------------
# scripts
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assoc:
    """The answer to an A-ASSOCIATE-RQ.

    action: "accept" (A-ASSOCIATE-AC), "reject" (A-ASSOCIATE-RJ ``reject``), "abort"
    (A-ABORT ``abort`` = (source, reason)), "hang" (read, never answer), "close" (close
    the connection), "raw" (send ``raw`` then keep reading), "stall" (A-ASSOCIATE-AC,
    then never read again: the worker's data fill the windows and stop, RX-16).
    """

    action: str = "accept"
    context_result: int = 0  # PS3.8 9.3.3.2: 0 acceptance, 3 abstract syntax, 4 TS not supp.
    max_pdu: int = 16384  # our Maximum Length sub-item (PS3.8 D.1); 0 = unlimited
    reject: tuple[int, int, int] = (1, 1, 7)  # result, source, reason
    abort: tuple[int, int] = (2, 0)
    raw: bytes = b""


@dataclass(frozen=True)
class Reply:
    """The answer to one C-STORE-RQ.

    action: "answer" (C-STORE-RSP with ``status``, after ``delay`` seconds), "abort"
    (A-ABORT ``abort``), "hang" (never answer), "close" (close the connection),
    "close_mid_pdu" (the first bytes of the response PDU, then close), "raw" (send
    ``raw`` instead of the response).
    """

    action: str = "answer"
    delay: float = 0.0
    status: int = 0x0000
    error_comment: str = ""
    message_id_offset: int = 0  # added to Message ID Being Responded To (DST-15)
    sop_instance: str | None = None  # a different Affected SOP Instance UID (DST-15)
    abort: tuple[int, int] = (0, 0)
    raw: bytes = b""


Answer = TypeVar("Answer", Assoc, Reply)


def always(answer: Answer) -> Callable[[int], Answer]:
    return lambda _n: answer


def first(count: int, bad: Answer, then: Answer) -> Callable[[int], Answer]:
    """``bad`` for the first ``count`` calls, ``then`` afterwards."""
    return lambda n: bad if n <= count else then


# --------------------------------------------------------------------------------------
# bytes (PS3.8 9.3, PS3.7 E)
# --------------------------------------------------------------------------------------
def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(0x03, bytes([0, result, source, reason]))


def a_abort(source: int, reason: int) -> bytes:
    return _pdu(0x07, bytes([0, 0, source, reason]))


RELEASE_RP = _pdu(0x06, bytes(4))


def associate_ac(rq: AssociateRQ, context_result: int, max_pdu: int) -> bytes:
    contexts = b""
    for context_id, (_abstract, syntaxes) in rq.contexts.items():
        ts = syntaxes[0] if syntaxes else b"1.2.840.10008.1.2"
        contexts += _item(0x21, bytes([context_id, 0, context_result, 0]) + _item(0x40, ts))
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS)
    body = (
        struct.pack(">HH", 1, 0)
        + rq.called.ljust(16)
        + rq.calling.ljust(16)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + contexts
        + _item(0x50, user)
    )
    return _pdu(0x02, body)


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if tag in (0x00000002, 0x00001000) else b" "
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def command_set(elements: dict[int, bytes]) -> bytes:
    """Implicit VR Little Endian, with its group length (PS3.7 E.1)."""
    body = b"".join(_element(tag, elements[tag]) for tag in sorted(elements))
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def store_rsp(request: Command, status: int, reply: Reply) -> bytes:
    elements = {
        0x00000002: request.sop_class,
        0x00000100: struct.pack("<H", C_STORE_RSP),
        0x00000120: struct.pack("<H", (request.message_id + reply.message_id_offset) & 0xFFFF),
        0x00000800: struct.pack("<H", NO_DATA_SET),
        0x00000900: struct.pack("<H", status),
        0x00001000: (
            request.sop_instance if reply.sop_instance is None else reply.sop_instance.encode()
        ),
    }
    if reply.error_comment:
        elements[0x00000902] = reply.error_comment.encode()
    return command_set(elements)


def echo_rsp(request: Command) -> bytes:
    return command_set(
        {
            0x00000002: request.sop_class,
            0x00000100: struct.pack("<H", C_ECHO_RSP),
            0x00000120: struct.pack("<H", request.message_id),
            0x00000800: struct.pack("<H", NO_DATA_SET),
            0x00000900: struct.pack("<H", 0),
        }
    )


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF with one PDV: the whole command set, command + last (0x03)."""
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return _pdu(0x04, pdv)


# --------------------------------------------------------------------------------------
# what we read
# --------------------------------------------------------------------------------------
@dataclass
class AssociateRQ:
    called: bytes
    calling: bytes
    contexts: dict[int, tuple[bytes, list[bytes]]]  # id -> (abstract syntax, [TS...])
    max_pdu: int | None = None


def parse_associate_rq(body: bytes) -> AssociateRQ:
    rq = AssociateRQ(body[4:20], body[20:36], {})
    offset = 68
    while offset + 4 <= len(body):
        item_type, length = body[offset], struct.unpack_from(">H", body, offset + 2)[0]
        value = body[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if item_type == 0x20:
            abstract, syntaxes = b"", []
            for sub_type, sub in _sub_items(value[4:]):
                if sub_type == 0x30:
                    abstract = sub.rstrip(b"\0")
                elif sub_type == 0x40:
                    syntaxes.append(sub.rstrip(b"\0"))
            rq.contexts[value[0]] = (abstract, syntaxes)
        elif item_type == 0x50:
            for sub_type, sub in _sub_items(value):
                if sub_type == 0x51 and len(sub) == 4:
                    rq.max_pdu = struct.unpack(">L", sub)[0]
    return rq


def _sub_items(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while offset + 4 <= len(data):
        length = struct.unpack_from(">H", data, offset + 2)[0]
        out.append((data[offset], data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return out


@dataclass
class Command:
    field: int
    message_id: int
    sop_class: bytes
    sop_instance: bytes
    has_data_set: bool


def parse_command(data: bytes) -> Command:
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, offset)
        values[(group << 16) | element] = data[offset + 8 : offset + 8 + length]
        offset += 8 + length

    def us(tag: int) -> int:
        return int(struct.unpack("<H", values.get(tag, b"\0\0")[:2])[0])

    return Command(
        field=us(0x00000100),
        message_id=us(0x00000110),
        sop_class=values.get(0x00000002, b"").rstrip(b"\0"),
        sop_instance=values.get(0x00001000, b"").rstrip(b"\0"),
        has_data_set=us(0x00000800) != NO_DATA_SET,
    )


@dataclass
class Stored:
    sop_instance: str
    size: int
    sha256: str


# --------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------
@dataclass
class _Record:
    connections: int = 0
    stores: int = 0
    requests: list[AssociateRQ] = field(default_factory=list)
    pdu_lengths: list[int] = field(default_factory=list)  # P-DATA-TF PDU lengths received
    stored: list[Stored] = field(default_factory=list)  # answered with success
    aborts: int = 0  # A-ABORTs received from the worker on an established association
    releases: int = 0  # A-RELEASE-RQs received
    stall_ends: list[str] = field(default_factory=list)  # "reset"/"closed", per stall


class ScriptedSCP:
    """A destination that follows ``association`` and ``store`` (see the module doc)."""

    def __init__(
        self,
        association: Callable[[int], Assoc] | None = None,
        store: Callable[[int], Reply] | None = None,
        *,
        io_timeout: float = 60.0,
    ) -> None:
        self._association = association or (lambda _n: Assoc())
        self._store = store or (lambda _n: Reply())
        self._io_timeout = io_timeout
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.record = _Record()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(32)
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, name="scripted-scp", daemon=True)
        accept.start()
        self._threads.append(accept)

    # -- recorded ----------------------------------------------------------------------
    @property
    def connections(self) -> int:
        with self._lock:
            return self.record.connections

    @property
    def stores(self) -> int:
        with self._lock:
            return self.record.stores

    def stored_uids(self) -> list[str]:
        with self._lock:
            return [s.sop_instance for s in self.record.stored]

    # -- lifetime ----------------------------------------------------------------------
    def __enter__(self) -> ScriptedSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.settimeout(self._io_timeout)
            with self._lock:
                self.record.connections += 1
                number = self.record.connections
                self._connections.append(conn)
            thread = threading.Thread(
                target=self._serve, args=(conn, number), name=f"scripted-scp-{number}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    # -- one connection ----------------------------------------------------------------
    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            self._converse(conn, number)
        except (OSError, ConnectionError, _Closed):
            pass  # the worker went away, or close(): nothing to answer any more
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _read_pdu(self, conn: socket.socket) -> tuple[int, bytes]:
        header = _read_exactly(conn, 6)
        pdu_type, _, length = struct.unpack(">BBL", header)
        return pdu_type, _read_exactly(conn, length)

    def _hang(self, conn: socket.socket) -> None:
        """Read and drop whatever comes, answer nothing, until the peer or close() ends it."""
        while not self._closing.is_set():
            if not conn.recv(65536):
                return

    def _stall(self, conn: socket.socket) -> None:
        """Read nothing, ever; record how the worker ends the connection: a reset (RST)
        or a close (FIN). Polled, not read: reading would open the window again."""
        poller = select.poll()
        poller.register(conn, select.POLLRDHUP | select.POLLERR | select.POLLHUP)
        while not self._closing.is_set():
            if not poller.poll(100):
                continue
            error = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            with self._lock:
                self.record.stall_ends.append("reset" if error == errno.ECONNRESET else "closed")
            return

    def _converse(self, conn: socket.socket, number: int) -> None:
        pdu_type, body = self._read_pdu(conn)
        if pdu_type != 0x01:
            return
        rq = parse_associate_rq(body)
        with self._lock:
            self.record.requests.append(rq)
        script = self._association(number)
        if script.action == "hang":
            return self._hang(conn)
        if script.action == "close":
            return
        if script.action == "reject":
            conn.sendall(associate_rj(*script.reject))
            return self._hang(conn)  # the requestor closes (PS3.8 9.2: AR-3 / Sta1)
        if script.action == "abort":
            conn.sendall(a_abort(*script.abort))
            return
        if script.action == "raw":
            conn.sendall(script.raw)
            return self._hang(conn)
        conn.sendall(associate_ac(rq, script.context_result, script.max_pdu))
        if script.action == "stall":
            return self._stall(conn)
        self._transfer(conn)

    def _transfer(self, conn: socket.socket) -> None:
        command = b""
        request: Command | None = None
        data = hashlib.sha256()
        size = 0
        while True:
            pdu_type, body = self._read_pdu(conn)
            if pdu_type == 0x05:  # A-RELEASE-RQ
                with self._lock:
                    self.record.releases += 1
                conn.sendall(RELEASE_RP)
                return
            if pdu_type == 0x07:  # A-ABORT
                with self._lock:
                    self.record.aborts += 1
                return
            if pdu_type != 0x04:
                conn.sendall(a_abort(2, 2))  # unexpected PDU
                return
            with self._lock:
                self.record.pdu_lengths.append(len(body))
            offset = 0
            while offset + 6 <= len(body):
                length, context_id, control = struct.unpack_from(">LBB", body, offset)
                value = body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01:  # command fragment
                    command += value
                    if not control & 0x02:
                        continue
                    request, command = parse_command(command), b""
                    request_context = context_id
                    if not request.has_data_set:
                        if not self._answer(conn, request, request_context, None):
                            return
                        request = None
                    continue
                data.update(value)
                size += len(value)
                if control & 0x02 and request is not None:
                    uid = request.sop_instance.decode(errors="replace")
                    stored = Stored(uid, size, data.hexdigest())
                    if not self._answer(conn, request, request_context, stored):
                        return
                    request, data, size = None, hashlib.sha256(), 0

    def _answer(
        self, conn: socket.socket, request: Command, context_id: int, stored: Stored | None
    ) -> bool:
        """Answer one request; False when the script ended the association."""
        if request.field == C_ECHO_RQ:
            conn.sendall(p_data(context_id, echo_rsp(request)))
            return True
        with self._lock:
            self.record.stores += 1
            number = self.record.stores
        reply = self._store(number)
        if reply.action == "hang":
            self._hang(conn)
            return False
        if reply.action == "abort":
            conn.sendall(a_abort(*reply.abort))
            return False
        if reply.action == "close":
            return False
        if reply.action == "close_mid_pdu":
            conn.sendall(p_data(context_id, store_rsp(request, reply.status, reply))[:9])
            return False
        if reply.action == "raw":
            conn.sendall(reply.raw)
            self._hang(conn)
            return False
        if reply.delay:
            self._closing.wait(reply.delay)
        if reply.status == 0x0000 and stored is not None:
            with self._lock:
                self.record.stored.append(stored)
        conn.sendall(p_data(context_id, store_rsp(request, reply.status, reply)))
        return True


class _Closed(Exception):
    pass


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = conn.recv(min(count, 1 << 20))
        if not chunk:
            raise _Closed
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)
