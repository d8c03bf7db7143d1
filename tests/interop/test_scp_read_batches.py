"""Several PDUs in one read, over a real socket to ``protocol.net.start_server``.

Regression tests for two bugs found by the catalogue's B.2 cases against the live node:

* SM-06 and kin: the indications of one read were dispatched after all of its PDUs had
  run through the state machine, so an A-RELEASE-RQ (or C-ECHO-RQ, or A-ASSOCIATE-RQ)
  followed in the same segment by the PDU that aborts the association was answered in
  Sta13: ``LocalProtocolError`` escaped ``data_received`` (asyncio "Fatal error") and the
  abort's own WARNING line was never written.
* SM-14: a second C-STORE-RQ sent before the first response (no asynchronous operations
  window) overwrote the outstanding request: the first data set was answered with the
  second's message ID and UID, the second never; now it is ABORT-U (source 0).
"""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from protocol.acse import AcceptorPolicy
from protocol.net import AssociationInfo, StoreOutcome, Timeouts, start_server

CT = "1.2.840.10008.5.1.4.1.1.2"
ELE = "1.2.840.10008.1.2.1"
ILE = "1.2.840.10008.1.2"
ABORT_1 = bytes.fromhex("07 00 00 00 00 04 00 00 00 00")
ABORT_8_2 = bytes.fromhex("07 00 00 00 00 04 00 00 02 02")
RELEASE_RQ = bytes.fromhex("05 00 00 00 00 04 00 00 00 00")


def _item(kind: int, body: bytes) -> bytes:
    return bytes([kind, 0]) + len(body).to_bytes(2, "big") + body


def associate_rq() -> bytes:
    contexts = b"".join(
        _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, sop.encode()) + _item(0x40, ts.encode()))
        for cid, sop, ts in ((1, "1.2.840.10008.1.1", ILE), (3, CT, ELE))
    )
    user = _item(0x50, _item(0x51, (16384).to_bytes(4, "big")) + _item(0x52, b"1.2.3.4"))
    body = (
        b"\x00\x01\x00\x00"
        + b"ANY-SCP".ljust(16)
        + b"MODALITY".ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + contexts
        + user
    )
    return b"\x01\x00" + len(body).to_bytes(4, "big") + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = (len(data) + 2).to_bytes(4, "big") + bytes([context_id, control]) + data
    return b"\x04\x00" + len(pdv).to_bytes(4, "big") + pdv


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _uid(text: str) -> bytes:
    raw = text.encode()
    return raw + b"\x00" * (len(raw) % 2)


def command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int) -> bytes:
    return command(
        _element(0x0002, _uid("1.2.840.10008.1.1")),
        _element(0x0100, struct.pack("<H", 0x0030)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", 0x0101)),
    )


def c_store_rq(message_id: int, sop_instance: str) -> bytes:
    return command(
        _element(0x0002, _uid(CT)),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", 0)),
        _element(0x0800, struct.pack("<H", 0x0000)),
        _element(0x1000, _uid(sop_instance)),
    )


class _Sink:
    def __init__(self, handler: _Handler, uid: str) -> None:
        self.handler, self.uid = handler, uid

    def write(self, data: bytes | memoryview) -> None:
        pass

    async def finish(self) -> StoreOutcome:
        await asyncio.sleep(0.2)  # a durable commit takes a while
        self.handler.finished.append(self.uid)
        return StoreOutcome(0)

    def discard(self) -> None:
        self.handler.discarded.append(self.uid)


class _Handler:
    def __init__(self) -> None:
        self.echoes = 0
        self.finished: list[str] = []
        self.discarded: list[str] = []

    def on_echo(self, info: AssociationInfo) -> int:
        self.echoes += 1
        return 0

    def on_store(self, info: AssociationInfo, request: object, transfer_syntax: str) -> _Sink:
        return _Sink(self, request.affected_sop_instance_uid)  # type: ignore[attr-defined]


async def _read_pdu(reader: asyncio.StreamReader) -> bytes:
    header = await asyncio.wait_for(reader.readexactly(6), 10)
    return header + await asyncio.wait_for(
        reader.readexactly(int.from_bytes(header[2:], "big")), 10
    )


async def _exchange(established: bool, frames: bytes, handler: _Handler) -> list[bytes]:
    """Send ``frames`` in one write (after an association if ``established``); every
    PDU the server sends until it closes."""
    policy = AcceptorPolicy(accept_any_abstract_syntax=True)
    # ARTIM 0.5 s: after AA-8 the server waits that long for us to close (Sta13).
    server = await start_server(handler, policy, timeouts=Timeouts(artim=0.5))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        if established:
            writer.write(associate_rq())
            assert (await _read_pdu(reader))[0] == 0x02
        writer.write(frames)
        received = []
        while True:
            try:
                received.append(await _read_pdu(reader))
            except asyncio.IncompleteReadError:
                break
        writer.close()
        return received
    finally:
        await server.close(grace=1)


@pytest.mark.parametrize(
    ("established", "frames", "answer"),
    [
        pytest.param(True, RELEASE_RQ + p_data(1, 3, c_echo_rq(1)), ABORT_8_2, id="SM-06"),
        pytest.param(True, p_data(1, 3, c_echo_rq(1)) + associate_rq(), ABORT_8_2, id="SM-04"),
        pytest.param(False, associate_rq() + p_data(1, 3, c_echo_rq(1)), ABORT_8_2, id="Sta3"),
    ],
)
def test_pdus_before_an_abort_in_one_read_are_not_answered(established, frames, answer, caplog):
    caplog.set_level(logging.WARNING)
    handler = _Handler()
    received = asyncio.run(_exchange(established, frames, handler))
    assert received == [answer]
    assert handler.echoes == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert [r.getMessage() for r in caplog.records if "aborted (source 2" in r.getMessage()]


def test_sm_14_second_store_before_the_response_is_abort_u_and_nothing_finishes(caplog):
    caplog.set_level(logging.WARNING)
    handler = _Handler()
    frames = (
        p_data(3, 3, c_store_rq(1, "1.2.3.1"))
        + p_data(3, 2, b"\x08\x00\x60\x00\x43\x53\x02\x00CT")
        + p_data(3, 3, c_store_rq(2, "1.2.3.2"))
        + p_data(3, 2, b"\x08\x00\x60\x00\x43\x53\x02\x00CT")
    )
    received = asyncio.run(_exchange(True, frames, handler))
    assert received == [ABORT_1]  # ABORT-U: service-user source, reason 0
    assert handler.finished == []  # the first store's finish was cancelled, not answered
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    violations = [r.getMessage() for r in caplog.records if "DIMSE violation" in r.getMessage()]
    assert len(violations) == 1 and "outstanding" in violations[0], violations
