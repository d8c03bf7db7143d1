"""Property tests of the DIMSE codec: round trips, fuzzed input, fragment/reassemble."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.dimse import (
    CEchoRQ,
    CEchoRSP,
    CommandReceived,
    CStoreRQ,
    CStoreRSP,
    DatasetFragment,
    Message,
    MessageAssembler,
    UnsupportedCommand,
    decode_command,
    encode_command,
    fragment,
)
from protocol.errors import DIMSEError
from protocol.limits import Limits

FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

us = st.integers(0, 0xFFFF)
uid = st.from_regex(r"\A[1-9][0-9]{0,5}(\.(0|[1-9][0-9]{0,5})){0,8}\Z")
ae = st.from_regex(r"\A[A-Z0-9_]{1,16}\Z")
comment = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=64)

store_rqs = st.builds(CStoreRQ, us, uid, uid, us, st.none() | ae, st.none() | us)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(CEchoRQ, us, uid),
    st.builds(CEchoRSP, us, us, uid),
    store_rqs,
    st.builds(CStoreRSP, us, uid | st.just(""), uid | st.just(""), us, st.none() | comment),
    st.builds(
        UnsupportedCommand,
        us.filter(lambda f: f not in (0x0001, 0x8001, 0x0030, 0x8030)),
        st.none() | us,
        st.booleans(),
    ),
)


@dataclass(frozen=True)
class PDV:
    context_id: int
    control_header: int
    data: bytes | memoryview

    @property
    def is_command(self) -> bool:
        return bool(self.control_header & 1)

    @property
    def is_last(self) -> bool:
        return bool(self.control_header & 2)


def pdvs_of(buffers: list[bytes | memoryview]) -> list[PDV]:
    stream = b"".join(bytes(b) for b in buffers)
    out, offset = [], 0
    while offset < len(stream):
        (pdu_len,) = struct.unpack_from(">I", stream, offset + 2)
        ctx, mch = stream[offset + 10], stream[offset + 11]
        out.append(PDV(ctx, mch, stream[offset + 12 : offset + 6 + pdu_len]))
        offset += 6 + pdu_len
    return out


@FAST
@given(messages)
def test_every_message_round_trips(msg: Message) -> None:
    raw = encode_command(msg)
    assert len(raw) % 2 == 0
    assert decode_command(raw) == msg


def _mutations() -> st.SearchStrategy[bytes]:
    base = st.sampled_from(
        [
            encode_command(CStoreRQ(1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0, "AE", 5)),
            encode_command(CStoreRSP(1, "1.2.3", "1.2.3.4", 0xA700, "full")),
            encode_command(CEchoRQ(3)),
            encode_command(CEchoRSP(3, 0)),
        ]
    )

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(base))
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "insert", "delete", "length", "truncate"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == "flip" and data:
                data[pos] ^= draw(st.integers(1, 255))
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete" and data:
                del data[pos : pos + draw(st.integers(1, 8))]
            elif kind == "length" and len(data) >= 4:
                value = draw(st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF, 0xFFFFFFFF, len(data)]))
                start = min(pos, len(data) - 4)
                data[start : start + 4] = struct.pack("<I", value)
            elif kind == "truncate":
                del data[pos:]
        return bytes(data)

    return mutate()


@FAST
@given(st.one_of(_mutations(), st.binary(max_size=200)))
def test_fuzzed_command_sets_raise_only_dimse_error(data: bytes) -> None:
    with contextlib.suppress(DIMSEError):
        decode_command(data)


@st.composite
def pdu_and_dataset(draw: st.DrawFn) -> tuple[int, bytes]:
    """A peer maximum and a data set of at most ~50 fragments at that maximum."""
    max_pdu = draw(st.one_of(st.just(0), st.integers(7, 40), st.integers(41, 6000)))
    per_pdv = (max_pdu or 1 << 20) - 6
    return max_pdu, draw(st.binary(max_size=min(5000, 50 * per_pdv)))


@FAST
@given(st.sampled_from([1, 3, 5, 127, 255]), pdu_and_dataset(), store_rqs)
def test_fragment_and_reassemble(ctx: int, sizes: tuple[int, bytes], msg: CStoreRQ) -> None:
    max_pdu, dataset = sizes
    buffers = fragment(ctx, encode_command(msg), True, max_pdu)
    buffers += fragment(ctx, dataset, False, max_pdu)
    asm = MessageAssembler(Limits())
    commands: list[CommandReceived] = []
    data = bytearray()
    last_seen = False
    for pdv in pdvs_of(buffers):
        assert len(pdv.data) + 6 <= (max_pdu or 1 << 20)
        for item in asm.feed(pdv):
            if isinstance(item, CommandReceived):
                commands.append(item)
            else:
                assert isinstance(item, DatasetFragment) and item.context_id == ctx
                assert not last_seen
                data += item.data
                last_seen = item.last
    assert commands == [CommandReceived(ctx, msg, True)]
    assert bytes(data) == dataset and last_seen
    assert asm.idle


@FAST
@given(st.lists(st.tuples(st.sampled_from([1, 3]), st.integers(0, 255), st.binary(max_size=40))))
def test_random_pdv_sequences_raise_only_dimse_error(
    pdvs: list[tuple[int, int, bytes]],
) -> None:
    asm = MessageAssembler(Limits(max_command_set_length=200))
    try:
        for ctx, mch, data in pdvs:
            asm.feed(PDV(ctx, mch, data))
    except DIMSEError:
        pass
