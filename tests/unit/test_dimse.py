"""DIMSE command sets, fragmentation and reassembly (PS3.7 6.3, 9.3, E; PS3.8 9.3.5, E.2).

Catalogue ids (DM-xx, MP-24/MP-33) are in the test names where a case comes from
/work/shared/research/reliability-catalogue.md B.3.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import pytest

from protocol import dimse, pdu
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
    fragment,
    iter_file_fragments,
)
from protocol.errors import DIMSEError, LocalProtocolError
from protocol.limits import SEND_PDU_CAP, Limits
from protocol.uids import VERIFICATION

CT = "1.2.840.10008.5.1.4.1.1.2"

# Catalogue B.0: the command set inside the reference P-DATA-TF carrying a C-ECHO-RQ.
ECHO_RQ_BYTES = (
    bytes.fromhex("0000 0000 04000000 380000000000 0200 12000000")
    + b"1.2.840.10008.1.1\0"
    + bytes.fromhex("0000 0001 02000000 30000000 1001 02000000 01000000 0008 02000000 0101")
)


@dataclass(frozen=True)
class PDV:
    """Stand-in with the fields of pdu.PDV that the assembler reads."""

    context_id: int
    control_header: int
    data: bytes | memoryview

    @property
    def is_command(self) -> bool:
        return bool(self.control_header & 1)

    @property
    def is_last(self) -> bool:
        return bool(self.control_header & 2)


def element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def us(elem: int, value: int) -> bytes:
    return element(elem, struct.pack("<H", value))


def command_set(*elements: bytes, group_length: int | None = None) -> bytes:
    body = b"".join(elements)
    length = len(body) if group_length is None else group_length
    return struct.pack("<HHII", 0, 0, 4, length) + body


def parse_pdus(buffers: list[bytes | memoryview]) -> list[tuple[int, int, bytes]]:
    """(context id, control header, data) of each P-DATA-TF PDU in ``buffers``."""
    stream = b"".join(bytes(b) for b in buffers)
    out = []
    offset = 0
    while offset < len(stream):
        pdu_type, _, pdu_len = struct.unpack_from(">BBI", stream, offset)
        assert pdu_type == 4
        body = stream[offset + 6 : offset + 6 + pdu_len]
        pdv_len, ctx, mch = struct.unpack_from(">IBB", body, 0)
        assert pdv_len + 4 == pdu_len, "exactly one PDV per PDU"
        out.append((ctx, mch, body[6:]))
        offset += 6 + pdu_len
    return out


# -- command-set codec ---------------------------------------------------------------------
def test_echo_rq_matches_catalogue_b0_bytes() -> None:
    assert encode_command(CEchoRQ(1)) == ECHO_RQ_BYTES
    assert decode_command(ECHO_RQ_BYTES) == CEchoRQ(1, VERIFICATION)


def test_echo_rq_in_reference_pdata_tf() -> None:
    pdus = fragment(1, encode_command(CEchoRQ(1)), True, 16384)
    wire = b"".join(bytes(b) for b in pdus)
    assert wire[:12] == bytes.fromhex("040000 00004a 00000046 0103".replace(" ", ""))
    assert len(wire) == 80
    assert wire[12:] == ECHO_RQ_BYTES


def test_echo_rsp_round_trip() -> None:
    msg = CEchoRSP(7, 0)
    assert decode_command(encode_command(msg)) == msg


def test_echo_rsp_without_optional_sop_class() -> None:
    raw = command_set(us(0x0100, 0x8030), us(0x0120, 3), us(0x0800, 0x0101), us(0x0900, 0))
    assert decode_command(raw) == CEchoRSP(3, 0, "")


def test_store_rq_round_trip_with_move_originator() -> None:
    msg = CStoreRQ(65535, CT, "1.2.3.4.5", 2, "MOVESCU", 17)
    raw = encode_command(msg)
    assert len(raw) % 2 == 0
    assert decode_command(raw) == msg


def test_store_rq_encodes_dataset_present_and_tag_order() -> None:
    raw = encode_command(CStoreRQ(1, CT, "1.2.3"))
    tags = []
    offset = 12
    while offset < len(raw):
        _, elem, length = struct.unpack_from("<HHI", raw, offset)
        tags.append(elem)
        if elem == 0x0800:
            assert struct.unpack_from("<H", raw, offset + 8)[0] != 0x0101
        offset += 8 + length
    assert tags == sorted(tags)  # PS3.5 7.1: ascending tag order
    assert tags == [0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000]


def test_store_rsp_round_trip_with_error_comment() -> None:
    msg = CStoreRSP(4, CT, "1.2.3.4", 0xA700, "disk full")
    assert decode_command(encode_command(msg)) == msg


def test_store_rsp_error_comment_cut_to_lo_length() -> None:
    msg = CStoreRSP(4, CT, "1.2.3.4", 0xC000, "x" * 100)
    decoded = decode_command(encode_command(msg))
    assert isinstance(decoded, CStoreRSP)
    assert decoded.error_comment == "x" * 64


def test_store_rsp_without_optional_uids() -> None:
    raw = command_set(us(0x0100, 0x8001), us(0x0120, 9), us(0x0800, 0x0101), us(0x0900, 0xB000))
    assert decode_command(raw) == CStoreRSP(9, "", "", 0xB000, None)


def test_uid_padding_stripped() -> None:
    raw = command_set(
        element(0x0002, b"1.2.840.10008.1.1\0"),
        us(0x0100, 0x0030),
        us(0x0110, 5),
        us(0x0800, 0x0101),
    )
    assert decode_command(raw) == CEchoRQ(5)
    spaced = command_set(
        element(0x0002, b"1.2.3 "), us(0x0100, 0x0030), us(0x0110, 5), us(0x0800, 0x0101)
    )
    assert decode_command(spaced) == CEchoRQ(5, "1.2.3")


def test_odd_length_values_are_padded_on_encode() -> None:
    raw = encode_command(CStoreRQ(1, "1.2", "1.2.345", move_originator_ae="ABC"))
    assert b"1.2\0" in raw and b"1.2.345\0" in raw and b"ABC " in raw


def test_encode_rejects_out_of_range_and_non_ascii() -> None:
    with pytest.raises(LocalProtocolError):
        encode_command(CEchoRQ(70000))
    with pytest.raises(LocalProtocolError):
        encode_command(CStoreRQ(1, CT, "1.2.\u00e9"))


def test_dm01_missing_command_field() -> None:
    raw = command_set(element(0x0002, b"1.2\0"), us(0x0110, 1), us(0x0800, 0x0101))
    with pytest.raises(DIMSEError, match="0100"):
        decode_command(raw)


def test_dm02_unknown_command_field_is_unsupported_command() -> None:
    raw = command_set(us(0x0100, 0x0FFF), us(0x0110, 12), us(0x0800, 0x0101))
    assert decode_command(raw) == UnsupportedCommand(0x0FFF, 12, False)
    find = command_set(
        element(0x0002, b"1.2\0"),
        us(0x0100, 0x0020),
        us(0x0110, 3),
        us(0x0700, 0),
        us(0x0800, 0x0001),
    )
    assert decode_command(find) == UnsupportedCommand(0x0020, 3, True)
    no_id = command_set(us(0x0100, 0x8020), us(0x0120, 3), us(0x0800, 0x0101))
    assert decode_command(no_id) == UnsupportedCommand(0x8020, None, False)


def test_unsupported_command_round_trip() -> None:
    msg = UnsupportedCommand(0x0021, 8, True)
    assert decode_command(encode_command(msg)) == msg


@pytest.mark.parametrize("delta", [-2, -1, 1, 2, 1000])
def test_dm03_wrong_group_length(delta: int) -> None:
    body = ECHO_RQ_BYTES[12:]
    raw = command_set(body, group_length=len(body) + delta)
    with pytest.raises(DIMSEError, match="Group Length"):
        decode_command(raw)


def test_dm03_missing_group_length() -> None:
    with pytest.raises(DIMSEError):
        decode_command(ECHO_RQ_BYTES[12:])


def test_dm03_explicit_vr_command_set() -> None:
    # The same C-ECHO-RQ written Explicit VR LE: (0000,0000) UL 4, (0000,0002) UI ...
    body = (
        struct.pack("<HH2sH", 0, 2, b"UI", 18)
        + b"1.2.840.10008.1.1\0"
        + struct.pack("<HH2sHH", 0, 0x100, b"US", 2, 0x30)
        + struct.pack("<HH2sHH", 0, 0x110, b"US", 2, 1)
        + struct.pack("<HH2sHH", 0, 0x800, b"US", 2, 0x101)
    )
    raw = struct.pack("<HH2sHI", 0, 0, b"UL", 4, len(body)) + body
    with pytest.raises(DIMSEError):
        decode_command(raw)


def test_dm03_element_runs_past_end() -> None:
    raw = command_set(us(0x0100, 0x0030), struct.pack("<HHI", 0, 0x0110, 0xFFFFFFFF))
    with pytest.raises(DIMSEError, match="past"):
        decode_command(raw)


def test_truncated_element_header() -> None:
    raw = command_set(us(0x0100, 0x0030), b"\0\0\x10\x01")
    with pytest.raises(DIMSEError, match="truncated"):
        decode_command(raw)


def test_element_outside_group_0000() -> None:
    raw = command_set(us(0x0100, 0x0030), struct.pack("<HHIH", 8, 0x16, 2, 0))
    with pytest.raises(DIMSEError, match="group 0000"):
        decode_command(raw)


def test_duplicate_element() -> None:
    raw = command_set(us(0x0100, 0x0030), us(0x0100, 0x0001), us(0x0110, 1), us(0x0800, 0x101))
    with pytest.raises(DIMSEError, match="twice"):
        decode_command(raw)


def test_us_of_wrong_length() -> None:
    raw = command_set(element(0x0100, b"\x30\0\0\0"), us(0x0110, 1), us(0x0800, 0x101))
    with pytest.raises(DIMSEError, match="US value"):
        decode_command(raw)


@pytest.mark.parametrize(
    "missing", [0x0002, 0x0110, 0x0700, 0x0800, 0x1000], ids=lambda e: f"0000,{e:04X}"
)
def test_store_rq_required_fields(missing: int) -> None:
    fields = {
        0x0002: element(0x0002, CT.encode() + b"\0"),
        0x0100: us(0x0100, 0x0001),
        0x0110: us(0x0110, 1),
        0x0700: us(0x0700, 0),
        0x0800: us(0x0800, 0x0001),
        0x1000: element(0x1000, b"1.2.3\0"),
    }
    del fields[missing]
    with pytest.raises(DIMSEError, match=f"{missing:04X}"):
        decode_command(command_set(*fields.values()))


@pytest.mark.parametrize("missing", [0x0120, 0x0800, 0x0900])
def test_store_rsp_required_fields(missing: int) -> None:
    fields = {
        0x0100: us(0x0100, 0x8001),
        0x0120: us(0x0120, 1),
        0x0800: us(0x0800, 0x0101),
        0x0900: us(0x0900, 0),
    }
    del fields[missing]
    with pytest.raises(DIMSEError):
        decode_command(command_set(*fields.values()))


def test_dm10_odd_priority_and_move_fields_tolerated() -> None:
    msg = CStoreRQ(1, CT, "1.2.3", priority=7, move_originator_ae="X", move_originator_message_id=1)
    assert decode_command(encode_command(msg)) == msg


def test_unknown_elements_are_ignored() -> None:
    raw = command_set(
        element(0x0002, b"1.2.840.10008.1.1\0"),
        us(0x0100, 0x0030),
        us(0x0110, 5),
        us(0x0800, 0x0101),
        element(0x5555, b"ab"),
    )
    assert decode_command(raw) == CEchoRQ(5)


@pytest.mark.parametrize("size", [0, 1, 11])
def test_too_short(size: int) -> None:
    with pytest.raises(DIMSEError):
        decode_command(ECHO_RQ_BYTES[:size])


# -- fragmentation -------------------------------------------------------------------------
@pytest.mark.parametrize("max_pdu", [0, 16384, 7, 8, 9, 13, 1001, SEND_PDU_CAP + 5])
@pytest.mark.parametrize("size", [0, 1, 2, 999, 16378, 16379, 40000])
def test_fragment_respects_max_pdu(max_pdu: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    buffers = fragment(3, data, False, max_pdu)
    pdus = parse_pdus(buffers)
    limit = SEND_PDU_CAP if max_pdu == 0 or max_pdu > SEND_PDU_CAP else max_pdu
    for ctx, mch, chunk in pdus:
        assert ctx == 3
        assert len(chunk) + 6 <= limit  # PDU body = PDV item
        assert mch & 1 == 0
    assert [mch & 2 for _, mch, _ in pdus] == [0] * (len(pdus) - 1) + [2]
    assert b"".join(chunk for _, _, chunk in pdus) == data
    expected = max(1, -(-size // (limit - 6)))
    assert len(pdus) == expected


def test_fragment_command_bit() -> None:
    pdus = parse_pdus(fragment(1, b"x" * 30, True, 16))
    assert [mch for _, mch, _ in pdus] == [1, 1, 3]


def test_fragment_does_not_copy_data() -> None:
    data = bytearray(b"a" * 100)
    buffers = fragment(1, memoryview(data), False, 46)
    data[0:1] = b"Z"  # a view sees the change; a copy would not
    views = [b for b in buffers if isinstance(b, memoryview)]
    assert len(views) == 3
    assert bytes(views[0][:1]) == b"Z"
    assert all(isinstance(b, bytes) and len(b) == 12 for b in buffers[::2])


def test_fragment_single_pdu_passes_buffer_through() -> None:
    data = b"q" * 10
    buffers = fragment(1, data, False, 0)
    assert buffers[1] is data


@pytest.mark.parametrize("max_pdu", [1, 6, -1])
def test_mp24_fragment_rejects_tiny_max_pdu(max_pdu: int) -> None:
    with pytest.raises(LocalProtocolError):
        fragment(1, b"abc", False, max_pdu)


def test_fragment_context_id_out_of_range() -> None:
    with pytest.raises(LocalProtocolError):
        fragment(256, b"abc", False, 0)


def test_fragment_send_cap_override() -> None:
    pdus = parse_pdus(fragment(1, b"z" * 100, False, 0, send_pdu_cap=26))
    assert [len(c) for _, _, c in pdus] == [20] * 5


def test_fragment_matches_pdu_encode_pdata_when_available() -> None:
    ours = b"".join(bytes(b) for b in fragment(5, b"abcd", True, 0))
    theirs = b"".join(bytes(b) for b in pdu.encode_pdata(5, 0x03, b"abcd"))
    assert ours == theirs


@pytest.mark.parametrize(
    ("max_pdu", "size"),
    [(m, s) for m in (0, 7, 100, 16384) for s in (0, 1, 5000, 70001) if (m, s) != (7, 70001)],
)
def test_iter_file_fragments(max_pdu: int, size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    f = io.BytesIO(b"P" * 132 + payload + b"TRAILER")
    chunks = list(iter_file_fragments(f, 132, size, 9, max_pdu, chunk_size=4096))
    pdus = parse_pdus([b for chunk in chunks for b in chunk])
    assert b"".join(c for _, _, c in pdus) == payload
    assert [m for _, m, _ in pdus] == [0] * (len(pdus) - 1) + [2]
    assert all(ctx == 9 for ctx, _, _ in pdus)
    if size > 8192 and 0 < max_pdu <= 4096:
        assert len(chunks) > 1  # read piece by piece, not whole


def test_iter_file_fragments_reads_in_chunks() -> None:
    class CountingFile(io.BytesIO):
        largest = 0

        def read(self, n: int | None = -1) -> bytes:
            assert n is not None and n > 0
            CountingFile.largest = max(CountingFile.largest, n)
            return super().read(n)

    f = CountingFile(b"x" * 100_000)
    list(iter_file_fragments(f, 0, 100_000, 1, 16384, chunk_size=32768))
    assert CountingFile.largest <= 32768


def test_iter_file_fragments_short_file() -> None:
    f = io.BytesIO(b"x" * 100)
    with pytest.raises(OSError):
        list(iter_file_fragments(f, 10, 200, 1, 0))


# -- reassembly ----------------------------------------------------------------------------
def store_rq_pdvs(ctx: int = 1, max_pdu: int = 0) -> list[PDV]:
    raw = encode_command(CStoreRQ(1, CT, "1.2.3"))
    return [PDV(c, m, d) for c, m, d in parse_pdus(fragment(ctx, raw, True, max_pdu))]


def test_reassembles_echo() -> None:
    asm = MessageAssembler(Limits())
    out = asm.feed(PDV(1, 3, ECHO_RQ_BYTES))
    assert out == [CommandReceived(1, CEchoRQ(1), False)]
    assert asm.idle


def test_reassembles_fragmented_command_and_streams_dataset() -> None:
    asm = MessageAssembler(Limits())
    out: list[object] = []
    for pdv in store_rq_pdvs(max_pdu=20):
        out += asm.feed(pdv)
    assert out == [CommandReceived(1, CStoreRQ(1, CT, "1.2.3"), True)]
    assert not asm.idle
    first = asm.feed(PDV(1, 0, b"abc"))
    last = asm.feed(PDV(1, 2, b"def"))
    assert first == [DatasetFragment(1, b"abc", False)]
    assert last == [DatasetFragment(1, b"def", True)]
    assert asm.idle
    # ready for the next message
    assert asm.feed(PDV(1, 3, ECHO_RQ_BYTES)) == [CommandReceived(1, CEchoRQ(1), False)]


def test_dataset_fragment_is_passed_through_not_copied() -> None:
    asm = MessageAssembler(Limits())
    for pdv in store_rq_pdvs():
        asm.feed(pdv)
    view = memoryview(b"payload")
    (frag,) = asm.feed(PDV(1, 2, view))
    assert isinstance(frag, DatasetFragment) and frag.data is view


def test_mp33_reserved_control_bits_ignored() -> None:
    asm = MessageAssembler(Limits())
    out = asm.feed(PDV(1, 0xFF, ECHO_RQ_BYTES))
    assert out == [CommandReceived(1, CEchoRQ(1), False)]


def test_dm04_dataset_before_any_command() -> None:
    asm = MessageAssembler(Limits())
    with pytest.raises(DIMSEError, match="DM-04"):
        asm.feed(PDV(1, 0, b"data"))
    with pytest.raises(DIMSEError):
        MessageAssembler(Limits()).feed(PDV(1, 2, b"data"))


def test_dataset_inside_unfinished_command() -> None:
    asm = MessageAssembler(Limits())
    pdvs = store_rq_pdvs(max_pdu=20)
    asm.feed(pdvs[0])
    with pytest.raises(DIMSEError, match="last fragment"):
        asm.feed(PDV(1, 2, b"data"))


def test_dm05_dataset_on_other_context() -> None:
    asm = MessageAssembler(Limits())
    for pdv in store_rq_pdvs(ctx=1):
        asm.feed(pdv)
    with pytest.raises(DIMSEError, match="DM-05"):
        asm.feed(PDV(3, 2, b"data"))


def test_dm05_later_dataset_fragment_on_other_context() -> None:
    asm = MessageAssembler(Limits())
    for pdv in store_rq_pdvs(ctx=1):
        asm.feed(pdv)
    asm.feed(PDV(1, 0, b"ok"))
    with pytest.raises(DIMSEError, match="DM-05"):
        asm.feed(PDV(3, 0, b"data"))


def test_dm06_new_command_while_dataset_expected() -> None:
    asm = MessageAssembler(Limits())
    for pdv in store_rq_pdvs():
        asm.feed(pdv)
    asm.feed(PDV(1, 0, b"partial"))
    with pytest.raises(DIMSEError, match="DM-06"):
        asm.feed(PDV(1, 3, ECHO_RQ_BYTES))


def test_dm06_store_without_dataset_then_dataset() -> None:
    raw = command_set(
        element(0x0002, CT.encode() + b"\0"),
        us(0x0100, 1),
        us(0x0110, 1),
        us(0x0700, 0),
        us(0x0800, 0x0101),
        element(0x1000, b"1.2.3\0"),
    )
    asm = MessageAssembler(Limits())
    (received,) = asm.feed(PDV(1, 3, raw))
    assert isinstance(received, CommandReceived) and not received.has_dataset
    with pytest.raises(DIMSEError, match="announced none"):
        asm.feed(PDV(1, 2, b"data"))


def test_dm07_command_set_cap() -> None:
    asm = MessageAssembler(Limits(max_command_set_length=1000))
    for _ in range(9):
        assert asm.feed(PDV(1, 1, b"\0" * 100)) == []
    asm.feed(PDV(1, 1, b"\0" * 100))  # exactly at the cap is allowed
    with pytest.raises(DIMSEError, match="DM-07"):
        asm.feed(PDV(1, 1, b"\0"))


def test_dm07_cap_counts_the_last_fragment() -> None:
    asm = MessageAssembler(Limits(max_command_set_length=len(ECHO_RQ_BYTES) - 1))
    with pytest.raises(DIMSEError, match="DM-07"):
        asm.feed(PDV(1, 3, ECHO_RQ_BYTES))


def test_command_fragments_on_two_contexts() -> None:
    asm = MessageAssembler(Limits())
    pdvs = store_rq_pdvs(max_pdu=20)
    asm.feed(pdvs[0])
    with pytest.raises(DIMSEError, match="began on context 1"):
        asm.feed(PDV(3, pdvs[1].control_header, pdvs[1].data))


def test_dm11_echo_with_dataset_reported() -> None:
    raw = command_set(
        element(0x0002, b"1.2.840.10008.1.1\0"),
        us(0x0100, 0x30),
        us(0x0110, 1),
        us(0x0800, 0x0001),
    )
    (received,) = MessageAssembler(Limits()).feed(PDV(1, 3, raw))
    assert isinstance(received, CommandReceived) and received.has_dataset


def test_undecodable_command_raises_dimse_error() -> None:
    with pytest.raises(DIMSEError):
        MessageAssembler(Limits()).feed(PDV(1, 3, b"\x01\x02\x03"))


def test_assembler_with_real_pdv_when_available() -> None:
    asm = MessageAssembler(Limits())
    out = asm.feed(pdu.PDV(1, 3, ECHO_RQ_BYTES))
    assert out == [CommandReceived(1, CEchoRQ(1), False)]


def test_module_exports() -> None:
    for name in ("Message", "fragment", "iter_file_fragments", "MessageAssembler"):
        assert hasattr(dimse, name)
