"""Fuzzing the DIMSE layer (issue #6 item 3): mutated valid command sets and PDV streams.

Extends test_dimse_properties.py (which fuzzes ``decode_command`` alone): here what the
SCP does next is checked too. A command set that decodes can always be answered (the
response echoes the request's UIDs, PS3.7 9.3.1.2), and reassembly of mutated valid PDV
streams raises only ``DIMSEError`` while never holding more than the command-set limit.
The example count comes from the profile in tests/conftest.py ("ci": 500).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.dimse import (
    CEchoRQ,
    CEchoRSP,
    CommandReceived,
    CStoreRQ,
    CStoreRSP,
    DatasetFragment,
    MessageAssembler,
    UnsupportedCommand,
    decode_command,
    encode_command,
)
from protocol.errors import DIMSEError
from protocol.limits import Limits

FUZZ = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

REQUESTS = [
    encode_command(CEchoRQ(1)),
    encode_command(CStoreRQ(2, CT_IMAGE, "1.2.3.4.5.6", 0, "MOVER", 9)),
    encode_command(CStoreRQ(3, CT_IMAGE, "1.2.3.4.5.7", 2)),
    encode_command(UnsupportedCommand(0x0020, 4, True)),
]


def _value_offsets(command: bytes) -> list[int]:
    """Offsets of value bytes after the group length (Implicit VR LE, PS3.7 6.3.1)."""
    out, off = [], 12
    while off + 8 <= len(command):
        (length,) = struct.unpack_from("<I", command, off + 4)
        out += range(off + 8, min(off + 8 + length, len(command)))
        off += 8 + length
    return out


@st.composite
def requests_with_mutated_values(draw: st.DrawFn) -> bytes:
    """A valid request whose structure stays and whose value bytes take any value."""
    data = bytearray(draw(st.sampled_from(REQUESTS)))
    offsets = _value_offsets(bytes(data))
    for at in draw(st.lists(st.sampled_from(offsets), min_size=1, max_size=4)):
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


def response_to(request: CEchoRQ | CStoreRQ) -> bytes:
    """What the SCP sends back (protocol/net/server.py): the request's UIDs echoed."""
    if isinstance(request, CEchoRQ):
        return encode_command(CEchoRSP(request.message_id, 0))
    return encode_command(
        CStoreRSP(
            request.message_id,
            request.affected_sop_class_uid,
            request.affected_sop_instance_uid,
            0xC000,
            "cannot understand",
        )
    )


@FUZZ
@given(requests_with_mutated_values())
def test_every_decoded_request_can_be_answered(data: bytes) -> None:
    try:
        message = decode_command(data)
    except DIMSEError:
        return
    if isinstance(message, CEchoRQ | CStoreRQ):
        assert decode_command(response_to(message))  # encodes, and decodes again


def _store_rq_with_instance_uid(uid: bytes) -> bytes:
    good = encode_command(CStoreRQ(5, CT_IMAGE, "1.2.3.4", 0))
    marker = struct.pack("<HHI", 0, 0x1000, 8) + b"1.2.3.4\0"
    assert marker in good
    body = good[12:].replace(marker, struct.pack("<HHI", 0, 0x1000, len(uid)) + uid)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def test_non_ascii_uid_in_a_request_is_a_dimse_error() -> None:
    # Found by tests/fuzz/fuzz_live_listener.py: a C-STORE-RQ whose SOP Instance UID
    # held byte 0x80 decoded (latin-1), then encoding the C-STORE-RSP that echoes it
    # raised LocalProtocolError inside data_received: asyncio's "Fatal error", the
    # association closed with no A-ABORT and no C-STORE-RSP.
    data = _store_rq_with_instance_uid(b"1.2.826.0.1.36\x800043.8\0")
    with pytest.raises(DIMSEError, match="not a UID"):
        decode_command(data)


@dataclass(frozen=True)
class PDV:
    context_id: int
    control_header: int
    data: bytes

    @property
    def is_command(self) -> bool:
        return bool(self.control_header & 1)

    @property
    def is_last(self) -> bool:
        return bool(self.control_header & 2)


def _split(data: bytes, cuts: list[int], context_id: int, command: bool) -> list[PDV]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parts = [data[a:b] for a, b in itertools.pairwise(points)] or [b""]
    control = 1 if command else 0
    return [
        PDV(context_id, control | (2 if i == len(parts) - 1 else 0), p) for i, p in enumerate(parts)
    ]


@st.composite
def mutated_pdv_streams(draw: st.DrawFn) -> list[PDV]:
    """A valid C-ECHO or C-STORE (command and data set) as PDVs, then 1-3 mutations: a
    control header or context id changed, a PDV dropped, repeated or moved, command
    bytes changed (MessageAssembler's input after the Upper Layer, PS3.8 E.2)."""
    store = draw(st.booleans())
    command = REQUESTS[1] if store else REQUESTS[0]
    pdvs = _split(command, draw(st.lists(st.integers(0, 200), max_size=3)), 3, True)
    if store:
        pdvs += _split(
            b"\x08\x00\x16\x00" * 8, draw(st.lists(st.integers(0, 40), max_size=3)), 3, False
        )
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(pdvs) - 1))
        pdv = pdvs[at]
        op = draw(st.sampled_from(["control", "context", "drop", "repeat", "move", "bytes"]))
        if op == "control":
            pdvs[at] = PDV(pdv.context_id, draw(st.integers(0, 255)), pdv.data)
        elif op == "context":
            pdvs[at] = PDV(draw(st.sampled_from([1, 3, 5, 255])), pdv.control_header, pdv.data)
        elif op == "drop" and len(pdvs) > 1:
            del pdvs[at]
        elif op == "repeat":
            pdvs[at:at] = [pdv] * draw(st.integers(1, 50))
        elif op == "move":
            pdvs.insert(draw(st.integers(0, len(pdvs))), pdvs.pop(at))
        elif op == "bytes" and pdv.data:
            data = bytearray(pdv.data)
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            pdvs[at] = PDV(pdv.context_id, pdv.control_header, bytes(data))
    return pdvs


@FUZZ
@given(mutated_pdv_streams())
def test_mutated_pdv_streams_raise_only_dimse_error_and_stay_bounded(pdvs: list[PDV]) -> None:
    limits = Limits(max_command_set_length=256)
    assembler = MessageAssembler(limits)
    dataset_context: int | None = None
    try:
        for pdv in pdvs:
            for item in assembler.feed(pdv):
                if isinstance(item, CommandReceived):
                    dataset_context = item.context_id if item.has_dataset else None
                else:
                    # a data set only after its command announced one, on its context
                    assert isinstance(item, DatasetFragment)
                    assert item.context_id == dataset_context == pdv.context_id
                    if item.last:
                        dataset_context = None
            # never more than the command-set limit held while a command is incomplete
            assert sum(len(p) for p in assembler._parts) <= limits.max_command_set_length
    except DIMSEError:
        return
