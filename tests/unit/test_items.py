"""Variable items and user-information sub-items (PS3.8 9.3.2-9.3.3, Annex D; PS3.7 D.3.3).

Catalogue ids (MP-xx) from /work/shared/research/reliability-catalogue.md B.1 are in the
test names where a case comes from there. Item bodies are hand-built from the standard.
"""

from __future__ import annotations

import struct
from contextlib import AbstractContextManager

import pytest

from protocol.errors import AbortReason, LocalProtocolError, PDUDecodeError
from protocol.items import (
    AbstractSyntax,
    ApplicationContext,
    AsyncOpsWindow,
    ImplementationClassUID,
    ImplementationVersionName,
    ItemType,
    MaximumLength,
    PresentationContextAC,
    PresentationContextRQ,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    TransferSyntax,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)
from tests.unit.pdu_fixtures import (
    ABSTRACT_SYNTAX_ITEM,
    APP_CONTEXT_ITEM,
    IMPL_CLASS_ITEM,
    IMPL_CLASS_UID,
    MAX_LENGTH_ITEM,
    PC_BODY,
    PC_ITEM,
    TRANSFER_SYNTAX_ITEM,
    USER_INFO_BODY,
    USER_INFO_ITEM,
    item,
)

INVALID = AbortReason.INVALID_PDU_PARAMETER_VALUE
DUPLICATE = AbortReason.UNEXPECTED_PDU_PARAMETER
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _invalid(
    reason: AbortReason = INVALID,
) -> AbstractContextManager[pytest.ExceptionInfo[PDUDecodeError]]:
    return pytest.raises(PDUDecodeError, check=lambda e: e.reason == reason)


# --- application context, abstract and transfer syntax -----------------------------------


def test_item_types_match_ps3_8() -> None:
    assert [int(t) for t in ItemType] == [
        0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59
    ]  # fmt: skip


def test_application_context_item_bytes() -> None:
    assert ApplicationContext("1.2.840.10008.3.1.1.1").encode() == APP_CONTEXT_ITEM
    assert ApplicationContext.decode(APP_CONTEXT_ITEM[4:]).name == "1.2.840.10008.3.1.1.1"


@pytest.mark.parametrize(
    ("cls", "encoded"),
    [(AbstractSyntax, ABSTRACT_SYNTAX_ITEM), (TransferSyntax, TRANSFER_SYNTAX_ITEM)],
)
def test_syntax_sub_items(cls: type[AbstractSyntax | TransferSyntax], encoded: bytes) -> None:
    decoded = cls.decode(encoded[4:])
    assert decoded.encode() == encoded


def test_mp23_uid_trailing_nul_padding_is_stripped() -> None:
    assert AbstractSyntax.decode(b"1.2.840.10008.1.1\x00").name == VERIFICATION
    # a trailing space or embedded NUL is kept: negotiation finds it invalid (MP-23)
    assert AbstractSyntax.decode(b"1.2.3 ").name == "1.2.3 "
    assert AbstractSyntax.decode(b"1.2\x003").name == "1.2\x003"


def test_uid_with_high_bytes_decodes_as_latin1() -> None:
    assert TransferSyntax.decode(b"1.2.\xff").name == "1.2.\xff"


# --- presentation context RQ [0x20] -------------------------------------------------------


def test_presentation_context_rq_from_catalogue_bytes() -> None:
    pc = PresentationContextRQ.decode(PC_BODY)
    assert pc == PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT,))
    assert pc.abstract_syntax == VERIFICATION
    assert pc.encode() == PC_ITEM


def test_presentation_context_rq_several_transfer_syntaxes_round_trip() -> None:
    pc = PresentationContextRQ(255, (CT_IMAGE,), (EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.4.50"))
    assert PresentationContextRQ.decode(pc.encode()[4:]) == pc


def test_mp22_context_without_or_with_two_abstract_syntaxes_is_kept() -> None:
    none = PresentationContextRQ.decode(bytes.fromhex("03000000") + TRANSFER_SYNTAX_ITEM)
    assert none.abstract_syntaxes == ()
    assert none.abstract_syntax is None
    two = PresentationContextRQ.decode(
        bytes.fromhex("05000000") + ABSTRACT_SYNTAX_ITEM + ABSTRACT_SYNTAX_ITEM
    )
    assert two.abstract_syntaxes == (VERIFICATION, VERIFICATION)
    assert two.abstract_syntax is None
    assert two.transfer_syntaxes == ()


def test_mp16_presentation_context_reserved_bytes_not_tested() -> None:
    body = bytes.fromhex("01ffffff") + item(0x30, VERIFICATION.encode(), reserved=0xAA)
    body += item(0x40, IMPLICIT.encode(), reserved=0x55)
    assert PresentationContextRQ.decode(body) == PresentationContextRQ(
        1, (VERIFICATION,), (IMPLICIT,)
    )


def test_mp12_unknown_sub_item_in_presentation_context_is_skipped() -> None:
    body = PC_BODY[:4] + item(0x33, b"xyz") + PC_BODY[4:]
    assert PresentationContextRQ.decode(body) == PresentationContextRQ.decode(PC_BODY)


@pytest.mark.parametrize("length", [0, 1, 3])
def test_presentation_context_body_shorter_than_4(length: int) -> None:
    with _invalid():
        PresentationContextRQ.decode(PC_BODY[:length])
    with _invalid():
        PresentationContextAC.decode(PC_BODY[:length])


def test_mp11_abstract_syntax_length_past_context_item() -> None:
    # abstract syntax length 0x0100 inside the 46-byte context item
    body = PC_BODY[:4] + b"\x30\x00\x01\x00" + PC_BODY[8:]
    with _invalid():
        PresentationContextRQ.decode(body)


def test_truncated_sub_item_header_in_context() -> None:
    with _invalid():
        PresentationContextRQ.decode(PC_BODY + b"\x40\x00")


# --- presentation context AC [0x21] -------------------------------------------------------


def test_presentation_context_ac_accepted_bytes() -> None:
    encoded = bytes.fromhex("21000019 01000000 40000011") + IMPLICIT.encode()
    pc = PresentationContextAC(1, 0, IMPLICIT)
    assert pc.encode() == encoded
    assert PresentationContextAC.decode(encoded[4:]) == pc
    assert pc.accepted


@pytest.mark.parametrize("result", [1, 2, 3, 4])
def test_presentation_context_ac_rejected_sends_empty_transfer_syntax(result: int) -> None:
    pc = PresentationContextAC(3, result)
    assert pc.encode() == bytes((0x21, 0, 0, 8, 3, 0, result, 0, 0x40, 0, 0, 0))
    assert PresentationContextAC.decode(pc.encode()[4:]) == pc
    assert not pc.accepted


def test_presentation_context_ac_rejected_transfer_syntax_not_tested() -> None:
    # PS3.8 9.3.3.2: not significant unless accepted; absent, garbage or twice is fine
    for tail in (b"", TRANSFER_SYNTAX_ITEM * 2, item(0x40, b"\xff\xfe")):
        pc = PresentationContextAC.decode(bytes.fromhex("07ff03ff") + tail)
        assert pc == PresentationContextAC(7, 3, "")


def test_presentation_context_ac_accepted_without_transfer_syntax() -> None:
    with _invalid():
        PresentationContextAC.decode(bytes.fromhex("01000000"))


def test_presentation_context_ac_accepted_with_two_transfer_syntaxes() -> None:
    with _invalid(DUPLICATE):
        PresentationContextAC.decode(bytes.fromhex("01000000") + TRANSFER_SYNTAX_ITEM * 2)


# --- user-information sub-items -----------------------------------------------------------


def test_maximum_length_sub_item_bytes() -> None:
    assert MaximumLength(16384).encode() == MAX_LENGTH_ITEM
    assert MaximumLength.decode(MAX_LENGTH_ITEM[4:]) == MaximumLength(16384)
    assert MaximumLength.decode(b"\xff\xff\xff\xff").value == 0xFFFFFFFF
    assert MaximumLength.decode(b"\x00\x00\x00\x00").value == 0  # 0 = no limit (D.1)


@pytest.mark.parametrize("length", [0, 2, 3, 5, 8])
def test_mp25_maximum_length_item_length_not_4(length: int) -> None:
    with _invalid():
        MaximumLength.decode(bytes(length))


def test_implementation_class_uid_and_version_name() -> None:
    assert ImplementationClassUID.decode(IMPL_CLASS_ITEM[4:]).uid == IMPL_CLASS_UID.decode()
    assert ImplementationClassUID(IMPL_CLASS_UID.decode()).encode() == IMPL_CLASS_ITEM
    name = ImplementationVersionName("DICOMROUTER_01")
    assert name.encode() == b"\x55\x00\x00\x0eDICOMROUTER_01"
    assert ImplementationVersionName.decode(b"OFFIS_DCMTK_369 ").name == "OFFIS_DCMTK_369"


def test_async_ops_window() -> None:
    window = AsyncOpsWindow(5, 0)
    assert window.encode() == bytes.fromhex("53000004 0005 0000")
    assert AsyncOpsWindow.decode(bytes.fromhex("0005 0000")) == window
    for length in (0, 3, 5):
        with _invalid():
            AsyncOpsWindow.decode(bytes(length))


def test_role_selection_bytes() -> None:
    role = RoleSelection(CT_IMAGE, scu_role=False, scp_role=True)
    uid = CT_IMAGE.encode()
    encoded = struct.pack(">BBHH", 0x54, 0, len(uid) + 4, len(uid)) + uid + b"\x00\x01"
    assert role.encode() == encoded
    assert RoleSelection.decode(encoded[4:]) == role


def test_mp26_role_selection_uid_length_past_sub_item() -> None:
    uid = CT_IMAGE.encode()
    body = struct.pack(">H", len(uid) + 10) + uid + b"\x01\x01"
    with _invalid():
        RoleSelection.decode(body)
    with _invalid():
        RoleSelection.decode(b"\x00")  # not even the UID length


def test_role_selection_missing_or_extra_role_bytes() -> None:
    uid = CT_IMAGE.encode()
    with _invalid():
        RoleSelection.decode(struct.pack(">H", len(uid)) + uid + b"\x01")
    with _invalid():
        RoleSelection.decode(struct.pack(">H", len(uid)) + uid + b"\x01\x01\x00")


def test_sop_class_extended_negotiation() -> None:
    ext = SOPClassExtendedNegotiation(CT_IMAGE, b"\x01\x00\x01")
    encoded = ext.encode()
    assert encoded[:6] == struct.pack(">BBHH", 0x56, 0, 2 + len(CT_IMAGE) + 3, len(CT_IMAGE))
    assert SOPClassExtendedNegotiation.decode(encoded[4:]) == ext
    with _invalid():
        SOPClassExtendedNegotiation.decode(struct.pack(">H", 40) + b"1.2")


def test_sop_class_common_extended_negotiation() -> None:
    ext = SOPClassCommonExtendedNegotiation(CT_IMAGE, "1.2.840.10008.4.2", (VERIFICATION, "1.2"))
    encoded = ext.encode()
    assert encoded[:2] == b"\x57\x00"  # byte 1 is the sub-item version, 00H
    related = b"\x00\x11" + VERIFICATION.encode() + b"\x00\x031.2"
    assert encoded.endswith(struct.pack(">H", len(related)) + related)
    assert SOPClassCommonExtendedNegotiation.decode(encoded[4:]) == ext


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x05abc",  # SOP class UID length past the sub-item
        b"\x00\x031.2\x00\x09abc",  # service class UID length past
        b"\x00\x031.2\x00\x031.2\x00\x10\x00\x02ab",  # related identification length past
        b"\x00\x031.2\x00\x031.2\x00\x04\x00\x05ab",  # related UID length past its field
        b"\x00\x031.2\x00\x031.2",  # related identification length missing
    ],
)
def test_sop_class_common_extended_negotiation_bad_lengths(body: bytes) -> None:
    with _invalid():
        SOPClassCommonExtendedNegotiation.decode(body)


def test_user_identity_rq_username_and_passcode() -> None:
    identity = UserIdentityRQ(2, True, b"alice", b"s3cret")
    encoded = identity.encode()
    assert encoded == b"\x58\x00\x00\x11\x02\x01\x00\x05alice\x00\x06s3cret"
    assert UserIdentityRQ.decode(encoded[4:]) == identity


@pytest.mark.parametrize("identity_type", [0, 9])
def test_mp27_user_identity_unknown_type_decodes(identity_type: int) -> None:
    # an unknown type is negotiation's business (RJ or ignored), not a decode error
    identity = UserIdentityRQ.decode(bytes((identity_type, 0)) + b"\x00\x01u\x00\x00")
    assert identity == UserIdentityRQ(identity_type, False, b"u", b"")


def test_mp27_user_identity_primary_field_length_past_item() -> None:
    with _invalid():
        UserIdentityRQ.decode(b"\x01\x00\x00\x40alice\x00\x00")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x01",
        b"\x01\x00\x00\x05alice",  # secondary field length missing
        b"\x02\x00\x00\x01u\x00\x09pw",  # secondary past the sub-item
        b"\x01\x00\x00\x01u\x00\x00junk",  # bytes after the secondary field
    ],
)
def test_user_identity_rq_structural_errors(body: bytes) -> None:
    with _invalid():
        UserIdentityRQ.decode(body)


def test_user_identity_ac() -> None:
    ac = UserIdentityAC(b"token")
    assert ac.encode() == b"\x59\x00\x00\x07\x00\x05token"
    assert UserIdentityAC.decode(ac.encode()[4:]) == ac
    for body in (b"", b"\x00", b"\x00\x09abc", b"\x00\x01ab"):
        with _invalid():
            UserIdentityAC.decode(body)


# --- user information [0x50] --------------------------------------------------------------


def test_user_information_from_catalogue_bytes() -> None:
    info = UserInformation.decode(USER_INFO_BODY)
    assert info == UserInformation(
        max_length=16384, implementation_class_uid=IMPL_CLASS_UID.decode()
    )
    assert info.encode() == USER_INFO_ITEM


def test_user_information_all_sub_items_round_trip() -> None:
    info = UserInformation(
        max_length=0,
        implementation_class_uid="1.2.3",
        implementation_version_name="X_1",
        async_ops_window=AsyncOpsWindow(1, 1),
        role_selections=(RoleSelection(CT_IMAGE, True, False), RoleSelection("1.2", True, True)),
        sop_class_extended=(SOPClassExtendedNegotiation(CT_IMAGE, b"\x01"),),
        sop_class_common_extended=(SOPClassCommonExtendedNegotiation(CT_IMAGE, "1.2.3", ()),),
        user_identity_rq=UserIdentityRQ(1, False, b"bob"),
        user_identity_ac=UserIdentityAC(b""),
    )
    encoded = info.encode()
    assert UserInformation.decode(encoded[4:]) == info
    # sent in sub-item type order
    types, off = [], 4
    while off < len(encoded):
        types.append(encoded[off])
        off += 4 + struct.unpack_from(">H", encoded, off + 2)[0]
    assert types == [0x51, 0x52, 0x53, 0x54, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59]


def test_empty_user_information() -> None:
    assert UserInformation().encode() == b"\x50\x00\x00\x00"
    assert UserInformation.decode(b"") == UserInformation()


@pytest.mark.parametrize(
    "sub_item",
    [
        MAX_LENGTH_ITEM,  # MP-17: two maximum length sub-items
        IMPL_CLASS_ITEM,
        AsyncOpsWindow(1, 1).encode(),
        ImplementationVersionName("A").encode(),
        UserIdentityRQ(1, False, b"u").encode(),
        UserIdentityAC(b"").encode(),
    ],
)
def test_mp17_duplicate_single_occurrence_sub_item(sub_item: bytes) -> None:
    with _invalid(DUPLICATE):
        UserInformation.decode(sub_item + USER_INFO_BODY + sub_item)


def test_mp12_unknown_user_info_sub_item_is_skipped_and_recorded() -> None:
    body = MAX_LENGTH_ITEM + item(0x5F, b"future") + IMPL_CLASS_ITEM + item(0x5F, b"")
    info = UserInformation.decode(body)
    assert info.max_length == 16384
    assert info.implementation_class_uid == IMPL_CLASS_UID.decode()
    assert info.unknown_sub_item_types == (0x5F, 0x5F)


def test_mp11_user_info_sub_items_longer_than_parent() -> None:
    # user-info length 0x26, but the sub-items inside add up to 0x30
    body = MAX_LENGTH_ITEM + b"\x52\x00\x00\x24" + IMPL_CLASS_UID
    with _invalid():
        UserInformation.decode(body)


def test_mp13_unknown_sub_item_length_past_user_info() -> None:
    with _invalid():
        UserInformation.decode(USER_INFO_BODY + b"\x5f\x00\xff\xff")


def test_sub_item_errors_propagate_through_user_information() -> None:
    with _invalid():
        UserInformation.decode(b"\x51\x00\x00\x02\x40\x00")  # MP-25 in context


# --- encoding refuses what the wire cannot carry ------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        PresentationContextRQ(256, (VERIFICATION,), (IMPLICIT,)),
        PresentationContextRQ(-1, (VERIFICATION,), (IMPLICIT,)),
        PresentationContextAC(1, 300, ""),
        PresentationContextRQ(1, ("1.2.\u20ac",), (IMPLICIT,)),
        PresentationContextRQ(1, (VERIFICATION,), ("1" * 70_000,)),
        MaximumLength(1 << 32),
        AsyncOpsWindow(70_000, 0),
        UserIdentityRQ(256, False, b""),
        UserIdentityRQ(1, False, bytes(70_000)),
        RoleSelection("1" * 70_000, True, True),
    ],
)
def test_encode_out_of_range_is_local_protocol_error(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        value.encode()  # type: ignore[attr-defined]


def test_items_are_frozen_and_slotted() -> None:
    pc = PresentationContextRQ(1, (VERIFICATION,), (IMPLICIT,))
    with pytest.raises(AttributeError):
        pc.context_id = 3  # type: ignore[misc]
    assert not hasattr(pc, "__dict__")
