"""The seven PDUs (PS3.8 9.3.2-9.3.8): exact bytes, round trips and decode failures.

Catalogue ids (MP-xx) from /work/shared/research/reliability-catalogue.md B.1 are in the
test names. Expected reasons: 6 structural, 5 duplicate item, 1 unknown PDU type.
"""

from __future__ import annotations

import struct

import pytest

from protocol.errors import AbortReason, LocalProtocolError, PDUDecodeError
from protocol.items import (
    PresentationContextAC,
    PresentationContextRQ,
    RoleSelection,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)
from protocol.limits import Limits
from protocol.pdu import (
    PDU,
    PDU_TYPES,
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    decode_pdu,
    encode_pdata,
)
from protocol.uids import APPLICATION_CONTEXT
from tests.unit.pdu_fixtures import (
    APP_CONTEXT_ITEM,
    ASSOCIATE_RQ,
    ASSOCIATE_RQ_BODY,
    ECHO_COMMAND,
    ECHO_PDATA,
    MAX_LENGTH_ITEM,
    OFFSET_PC_ITEM,
    OFFSET_USER_INFO_ITEM,
    PC_ITEM,
    RELEASE_RP,
    RELEASE_RQ,
    USER_INFO_BODY,
    USER_INFO_ITEM,
    abort,
    associate_fixed,
    associate_rq,
    item,
    pdu,
    reject,
)

INVALID = AbortReason.INVALID_PDU_PARAMETER_VALUE
DUPLICATE = AbortReason.UNEXPECTED_PDU_PARAMETER
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _decode(frame: bytes) -> object:
    """decode_pdu on a whole frame, after checking its PDU length field."""
    assert struct.unpack_from(">I", frame, 2)[0] == len(frame) - 6
    return decode_pdu(frame[0], frame[6:])


def _fails(frame: bytes, reason: AbortReason = INVALID) -> PDUDecodeError:
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(frame[0], frame[6:])
    assert info.value.reason == reason, info.value.message
    return info.value


def _rq_with_items(*items: bytes) -> bytes:
    return associate_rq(*items)


# --- catalogue B.0 reference bytes --------------------------------------------------------


def test_catalogue_associate_rq_is_191_bytes() -> None:
    assert len(ASSOCIATE_RQ) == 191
    assert ASSOCIATE_RQ[OFFSET_PC_ITEM : OFFSET_PC_ITEM + len(PC_ITEM)] == PC_ITEM
    assert ASSOCIATE_RQ[OFFSET_USER_INFO_ITEM:] == USER_INFO_ITEM


def test_catalogue_associate_rq_decodes_field_by_field() -> None:
    rq = _decode(ASSOCIATE_RQ)
    assert rq == AAssociateRQ(
        called_ae="ROUTER",
        calling_ae="MODALITY",
        presentation_contexts=(PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT,)),),
        user_information=UserInformation(
            max_length=16384, implementation_class_uid="1.2.826.0.1.3680043.9.9999"
        ),
        application_context=APPLICATION_CONTEXT,
        protocol_version=1,
    )


def test_catalogue_associate_rq_encodes_to_the_same_bytes() -> None:
    rq = AAssociateRQ.decode(ASSOCIATE_RQ_BODY)
    assert rq.encode() == ASSOCIATE_RQ


def test_catalogue_echo_pdata_decodes_zero_copy() -> None:
    body = memoryview(ECHO_PDATA)[6:]
    pdata = decode_pdu(4, body)
    assert isinstance(pdata, PDataTF)
    (pdv,) = pdata.pdvs
    assert (pdv.context_id, pdv.control_header) == (1, 0x03)
    assert pdv.is_command and pdv.is_last
    assert pdv.data == ECHO_COMMAND and len(pdv.data) == 68
    assert isinstance(pdv.data, memoryview) and pdv.data.obj is ECHO_PDATA  # no copy
    assert pdata.encode() == ECHO_PDATA


def test_catalogue_echo_pdata_via_encode_pdata() -> None:
    data = memoryview(ECHO_COMMAND)
    parts = encode_pdata(1, 0x03, data)
    assert len(parts) == 2 and parts[1] is data  # ready for writelines, data not copied
    assert b"".join(parts) == ECHO_PDATA
    assert len(ECHO_PDATA) == 80


def test_fixed_length_pdus_bytes() -> None:
    assert AReleaseRQ().encode() == RELEASE_RQ
    assert AReleaseRP().encode() == RELEASE_RP
    assert AAbort(2, 6).encode() == abort(2, 6)
    assert AAbort(0, 0).encode() == bytes.fromhex("07000000000400000000")
    assert AAssociateRJ(1, 1, 7).encode() == reject(1, 1, 7)
    assert _decode(RELEASE_RQ) == AReleaseRQ()
    assert _decode(RELEASE_RP) == AReleaseRP()
    assert _decode(abort(2, 1)) == AAbort(2, 1)
    assert _decode(reject(2, 3, 1)) == AAssociateRJ(2, 3, 1)


def test_pdu_types_table() -> None:
    assert {k: v.__name__ for k, v in PDU_TYPES.items()} == {
        1: "AAssociateRQ",
        2: "AAssociateAC",
        3: "AAssociateRJ",
        4: "PDataTF",
        5: "AReleaseRQ",
        6: "AReleaseRP",
        7: "AAbort",
    }
    for pdu_type, kind in PDU_TYPES.items():
        assert kind.pdu_type == pdu_type


# --- A-ASSOCIATE-AC -----------------------------------------------------------------------


def _ac_bytes() -> bytes:
    """An A-ASSOCIATE-AC built by hand: context 1 accepted, context 3 rejected (3)."""
    accepted = item(0x21, bytes.fromhex("01000000") + item(0x40, IMPLICIT.encode()))
    rejected = item(0x21, bytes.fromhex("03000300") + item(0x40, b""))
    user_info = item(0x50, MAX_LENGTH_ITEM + item(0x52, b"1.2.3") + item(0x59, b"\x00\x02ok"))
    return pdu(2, associate_fixed() + APP_CONTEXT_ITEM + accepted + rejected + user_info)


def test_associate_ac_hand_built() -> None:
    ac = _decode(_ac_bytes())
    assert ac == AAssociateAC(
        called_ae="ROUTER",
        calling_ae="MODALITY",
        presentation_contexts=(PresentationContextAC(1, 0, IMPLICIT), PresentationContextAC(3, 3)),
        user_information=UserInformation(
            max_length=16384,
            implementation_class_uid="1.2.3",
            user_identity_ac=UserIdentityAC(b"ok"),
        ),
    )
    assert isinstance(ac, AAssociateAC)
    assert ac.encode() == _ac_bytes()


def test_associate_ac_skips_rq_context_items_and_vice_versa() -> None:
    # a 0x20 item inside an AC (or 0x21 inside an RQ) is not a context of that PDU
    ac_frame = pdu(2, associate_fixed() + APP_CONTEXT_ITEM + PC_ITEM + USER_INFO_ITEM)
    assert _decode(ac_frame).presentation_contexts == ()  # type: ignore[attr-defined]
    ac_item = item(0x21, bytes.fromhex("01000000") + item(0x40, b"1.2"))
    rq = _decode(_rq_with_items(APP_CONTEXT_ITEM, ac_item, USER_INFO_ITEM))
    assert rq.presentation_contexts == ()  # type: ignore[attr-defined]


def test_round_trip_every_pdu() -> None:
    info = UserInformation(
        max_length=0,
        implementation_class_uid="1.2.3.4",
        implementation_version_name="V1",
        role_selections=(RoleSelection("1.2.840.10008.5.1.4.1.1.2", True, True),),
        user_identity_rq=UserIdentityRQ(2, True, b"u", b"p"),
    )
    contexts = tuple(
        PresentationContextRQ(i, ("1.2.840.10008.5.1.4.1.1.2",), (EXPLICIT, IMPLICIT))
        for i in range(1, 256, 2)
    )
    pdus: list[PDU] = [
        AAssociateRQ("CALLED", "CALLING", contexts, info),
        AAssociateAC("A", "B", (PresentationContextAC(1, 0, EXPLICIT),), UserInformation()),
        AAssociateRJ(1, 2, 2),
        PDataTF((PDV(1, 0, b""), PDV(3, 2, b"x" * 1000), PDV(255, 0xFF, bytes(7)))),
        AReleaseRQ(),
        AReleaseRP(),
        AAbort(2, 6),
    ]
    for value in pdus:
        frame = value.encode()
        assert frame[0] == value.pdu_type
        assert _decode(frame) == value


# --- MP-03: A-ASSOCIATE shorter than the 68 fixed bytes -----------------------------------


@pytest.mark.parametrize("length", [0, 1, 6, 36, 67])
@pytest.mark.parametrize("pdu_type", [1, 2])
def test_mp03_associate_shorter_than_fixed_fields(pdu_type: int, length: int) -> None:
    _fails(pdu(pdu_type, ASSOCIATE_RQ_BODY[:length]))


def test_mp03_associate_with_only_fixed_fields_lacks_mandatory_items() -> None:
    _fails(pdu(1, ASSOCIATE_RQ_BODY[:68]))


# --- MP-05 / MP-06 / MP-07: unknown PDU types ---------------------------------------------


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0xFF, 0x53, 0x47, 0x16])
def test_mp05_unknown_pdu_type(pdu_type: int) -> None:
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(pdu_type, b"\x00\x00\x00\x00")
    assert info.value.reason == AbortReason.UNRECOGNIZED_PDU


# --- MP-10 / MP-11 / MP-13: item lengths against the enclosing length ---------------------


def test_mp10_presentation_context_length_past_parent() -> None:
    frame = bytearray(ASSOCIATE_RQ)
    frame[OFFSET_PC_ITEM + 2 : OFFSET_PC_ITEM + 4] = b"\xff\xff"  # 20 00 FF FF
    _fails(bytes(frame))


def test_mp11_abstract_syntax_length_past_presentation_context() -> None:
    frame = bytearray(ASSOCIATE_RQ)
    frame[OFFSET_PC_ITEM + 8 : OFFSET_PC_ITEM + 12] = b"\x30\x00\x01\x00"  # length 0x0100
    _fails(bytes(frame))


def test_mp11_user_info_sub_items_sum_past_user_info_length() -> None:
    # user-info length 0x26 but the implementation class UID sub-item claims 0x24 bytes
    frame = bytearray(ASSOCIATE_RQ)
    frame[OFFSET_USER_INFO_ITEM + 14 : OFFSET_USER_INFO_ITEM + 16] = b"\x00\x24"
    _fails(bytes(frame))


def test_mp11_user_info_length_shorter_than_its_sub_items() -> None:
    # user info claims 0x20: the implementation class sub-item then runs past it
    body = b"\x50\x00\x00\x20" + USER_INFO_BODY[:0x20]
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, body))


def test_item_length_shorter_leaves_trailing_bytes_past_pdu() -> None:
    frame = bytearray(ASSOCIATE_RQ)
    frame[OFFSET_USER_INFO_ITEM + 3] = 0x27  # user info runs 1 byte past the PDU
    _fails(bytes(frame))


def test_mp12_unknown_item_between_app_context_and_presentation_context() -> None:
    frame = _rq_with_items(APP_CONTEXT_ITEM, item(0x33, b"unknown"), PC_ITEM, USER_INFO_ITEM)
    assert _decode(frame) == _decode(ASSOCIATE_RQ)


def test_mp12_unknown_user_info_sub_item() -> None:
    user_info = item(0x50, USER_INFO_BODY + item(0x5F, b"\x01\x02"))
    rq = _decode(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, user_info))
    assert isinstance(rq, AAssociateRQ)
    assert rq.user_information.unknown_sub_item_types == (0x5F,)
    assert rq.user_information.max_length == 16384


def test_mp13_unknown_item_length_past_pdu() -> None:
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, USER_INFO_ITEM, b"\x33\x00\xff\xff"))


@pytest.mark.parametrize("tail", [b"\x33", b"\x33\x00", b"\x33\x00\x00"])
def test_truncated_item_header_at_end_of_pdu(tail: bytes) -> None:
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, USER_INFO_ITEM, tail))


# --- MP-14 / MP-15 / MP-16 / MP-28: fixed fields kept as received -------------------------


@pytest.mark.parametrize("version", [0x0000, 0x0003, 0x8001, 0xFFFF])
def test_mp14_mp15_protocol_version_kept_for_negotiation(version: int) -> None:
    frame = bytearray(ASSOCIATE_RQ)
    frame[6:8] = version.to_bytes(2, "big")
    rq = _decode(bytes(frame))
    assert isinstance(rq, AAssociateRQ) and rq.protocol_version == version


def test_mp16_reserved_fields_not_tested() -> None:
    frame = bytearray(ASSOCIATE_RQ)
    frame[1] = 0xFF  # PDU header reserved byte
    frame[8:10] = b"\xff\xff"  # reserved after the protocol version
    frame[0x2A:0x4A] = b"\xee" * 32  # 32 reserved bytes
    frame[0x4B] = 0x01  # application context item reserved byte
    frame[OFFSET_PC_ITEM + 1] = 0x02  # presentation context item reserved byte
    frame[OFFSET_PC_ITEM + 5 : OFFSET_PC_ITEM + 8] = b"\x01\x02\x03"  # context reserved
    frame[OFFSET_USER_INFO_ITEM + 1] = 0x7F  # user info item reserved byte
    assert _decode(bytes(frame)) == _decode(ASSOCIATE_RQ)


def test_mp28_ae_titles_decoded_without_validation() -> None:
    for raw, expected in [
        (b" " * 16, ""),
        (b"\x00" * 16, ""),
        (b"  PADDED  ", "PADDED"),
        (b"A\\B\n../x\xe9\xff", "A\\B\n../x\xe9\xff"),
    ]:
        frame = pdu(1, associate_fixed(called=raw) + APP_CONTEXT_ITEM + PC_ITEM + USER_INFO_ITEM)
        rq = _decode(frame)
        assert isinstance(rq, AAssociateRQ) and rq.called_ae == expected


# --- MP-17: missing or duplicated mandatory items -----------------------------------------


def test_mp17_no_application_context_item() -> None:
    _fails(_rq_with_items(PC_ITEM, USER_INFO_ITEM))


def test_mp17_two_application_context_items() -> None:
    _fails(_rq_with_items(APP_CONTEXT_ITEM, APP_CONTEXT_ITEM, PC_ITEM, USER_INFO_ITEM), DUPLICATE)


def test_mp17_two_user_information_items() -> None:
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, USER_INFO_ITEM, USER_INFO_ITEM), DUPLICATE)


def test_mp17_no_user_information_item() -> None:
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM))


def test_mp17_two_max_length_sub_items() -> None:
    user_info = item(0x50, USER_INFO_BODY + MAX_LENGTH_ITEM)
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, user_info), DUPLICATE)


def test_mp17_ac_missing_and_duplicate_items() -> None:
    ac_pc = item(0x21, bytes.fromhex("01000000") + item(0x40, b"1.2"))
    _fails(pdu(2, associate_fixed() + ac_pc + USER_INFO_ITEM))
    _fails(pdu(2, associate_fixed() + APP_CONTEXT_ITEM + ac_pc))
    _fails(pdu(2, associate_fixed() + APP_CONTEXT_ITEM * 2 + USER_INFO_ITEM), DUPLICATE)


def test_mp19_no_presentation_context_decodes() -> None:
    rq = _decode(_rq_with_items(APP_CONTEXT_ITEM, USER_INFO_ITEM))
    assert isinstance(rq, AAssociateRQ) and rq.presentation_contexts == ()


# --- MP-25 / MP-26 / MP-27: sub-item faults inside a whole A-ASSOCIATE-RQ -----------------


def test_mp25_max_length_item_length_2() -> None:
    user_info = item(0x50, b"\x51\x00\x00\x02\x40\x00")
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, user_info))


def test_mp26_role_selection_uid_length_past_sub_item() -> None:
    role = item(0x54, b"\x00\x40" + b"1.2.840.10008.5.1.4.1.1.2" + b"\x01\x01")
    user_info = item(0x50, USER_INFO_BODY + role)
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, user_info))


def test_mp27_user_identity_primary_field_length_past_sub_item() -> None:
    identity = item(0x58, b"\x01\x00\x00\xffbob\x00\x00")
    user_info = item(0x50, USER_INFO_BODY + identity)
    _fails(_rq_with_items(APP_CONTEXT_ITEM, PC_ITEM, user_info))


# --- P-DATA-TF: MP-29, MP-30, MP-31, MP-33 ------------------------------------------------


def test_mp29_pdata_without_pdv() -> None:
    _fails(bytes.fromhex("040000000000"))


@pytest.mark.parametrize("pdv_length", [0, 1])
def test_mp30_pdv_item_length_0_or_1(pdv_length: int) -> None:
    _fails(pdu(4, struct.pack(">I", pdv_length) + b"\x01"))
    _fails(pdu(4, struct.pack(">IBB", pdv_length, 1, 3) + b"data"))


@pytest.mark.parametrize("pdv_length", [0x47, 0x100, 0x7FFFFFFF, 0xFFFFFFFF])
def test_mp31_pdv_item_length_past_pdu(pdv_length: int) -> None:
    frame = bytearray(ECHO_PDATA)
    frame[6:10] = pdv_length.to_bytes(4, "big")
    _fails(bytes(frame))


def test_mp31_pdv_lengths_sum_short_of_pdu_length() -> None:
    _fails(pdu(4, ECHO_PDATA[6:] + b"\x00"))  # one trailing byte
    _fails(pdu(4, ECHO_PDATA[6:] + b"\x00\x00\x00\x02\x01"))  # truncated PDV header


@pytest.mark.parametrize("control_header", [0xFF, 0xFC, 0xFE, 0x01])
def test_mp33_reserved_control_header_bits_ignored(control_header: int) -> None:
    frame = bytearray(ECHO_PDATA)
    frame[11] = control_header
    pdata = _decode(bytes(frame))
    assert isinstance(pdata, PDataTF)
    (pdv,) = pdata.pdvs
    assert pdv.control_header == control_header
    assert pdv.is_command == bool(control_header & 1)
    assert pdv.is_last == bool(control_header & 2)


def test_pdv_of_exactly_two_bytes_has_empty_data() -> None:
    pdata = _decode(pdu(4, b"\x00\x00\x00\x02\x05\x00"))
    assert pdata == PDataTF((PDV(5, 0, b""),))


def test_several_pdvs_in_one_pdu() -> None:
    body = ECHO_PDATA[6:] + struct.pack(">IBB", 5, 3, 0) + b"abc"
    pdata = _decode(pdu(4, body))
    assert isinstance(pdata, PDataTF)
    assert [(p.context_id, bytes(p.data)) for p in pdata.pdvs] == [(1, ECHO_COMMAND), (3, b"abc")]


# --- MP-34 / MP-35: fixed-length PDUs -----------------------------------------------------


@pytest.mark.parametrize("pdu_type", [3, 5, 6, 7])
@pytest.mark.parametrize("length", [0, 3, 5, 8])
def test_mp34_fixed_length_pdu_with_length_not_4(pdu_type: int, length: int) -> None:
    _fails(pdu(pdu_type, bytes(length)))


def test_mp35_abort_with_out_of_range_source_and_reason() -> None:
    assert _decode(bytes.fromhex("07000000000400000977")) == AAbort(9, 0x77)
    assert _decode(bytes.fromhex("0700000000040000ffff")) == AAbort(255, 255)


def test_fixed_length_pdus_reserved_bytes_not_tested() -> None:
    assert _decode(bytes.fromhex("0500000000 04ffffffff".replace(" ", ""))) == AReleaseRQ()
    assert _decode(bytes.fromhex("07000000 0004 ffff0206".replace(" ", ""))) == AAbort(2, 6)


# --- decode_pdu with limits; encoding errors ----------------------------------------------


def test_decode_pdu_applies_associate_cap_when_given_limits() -> None:
    body = ASSOCIATE_RQ_BODY
    assert decode_pdu(1, body, Limits(max_associate_pdu_length=len(body))) is not None
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(1, body, Limits(max_associate_pdu_length=len(body) - 1))
    assert info.value.reason == INVALID


def test_decode_accepts_bytes_bytearray_and_memoryview() -> None:
    for body in (ASSOCIATE_RQ_BODY, bytearray(ASSOCIATE_RQ_BODY), memoryview(ASSOCIATE_RQ_BODY)):
        assert decode_pdu(1, body) == _decode(ASSOCIATE_RQ)


@pytest.mark.parametrize(
    "value",
    [
        AAssociateRQ("X" * 17, "B", (), UserInformation()),
        AAssociateRQ("A", "\u20ac", (), UserInformation()),
        AAssociateRQ("A", "B", (), UserInformation(), protocol_version=0x10000),
        AAssociateRJ(256, 1, 1),
        AAbort(-1, 0),
        PDataTF((PDV(256, 0, b""),)),
        PDataTF((PDV(1, -1, b""),)),
    ],
)
def test_encode_out_of_range_is_local_protocol_error(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        value.encode()  # type: ignore[attr-defined]


def test_encode_pdata_out_of_range() -> None:
    with pytest.raises(LocalProtocolError):
        encode_pdata(256, 0, b"")


def test_ae_title_padding() -> None:
    frame = AAssociateRQ("AB", "C", (), UserInformation()).encode()
    assert frame[10:26] == b"AB" + b" " * 14
    assert frame[26:42] == b"C" + b" " * 15
