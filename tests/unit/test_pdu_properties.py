"""Property tests for items, PDUs and framing (catalogue MP-36, MP-37).

Round trips of every item and PDU built by hypothesis, and fuzzing: arbitrary bytes and
mutated valid frames (flipped, inserted and deleted bytes; length fields set to 0, +-1,
the maximum and the enclosing length +-1) into ``decode_pdu`` and ``PDUReader`` must give
a valid PDU or ``PDUDecodeError``, never another exception. The example count comes from
the profile in tests/conftest.py ("ci": 500).
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import PDUDecodeError
from protocol.framing import PDUReader
from protocol.items import (
    AbstractSyntax,
    ApplicationContext,
    AsyncOpsWindow,
    ImplementationClassUID,
    ImplementationVersionName,
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
)
from tests.unit.pdu_fixtures import ASSOCIATE_RQ, ECHO_PDATA, RELEASE_RQ, abort, reject

# keep the profile's example count; a deadline also catches non-linear decode times
FUZZ = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])
LIMITS = Limits(max_associate_pdu_length=1 << 20)
MAX_PDATA = 1 << 20

# --- strategies ---------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
latin1 = st.characters(min_codepoint=0, max_codepoint=0xFF)
# UIDs as decoded: any latin-1 text without trailing NUL padding, mostly real-looking ones
uids = st.one_of(
    st.from_regex(r"[1-9][0-9]{0,5}(\.(0|[1-9][0-9]{0,8})){0,8}", fullmatch=True),
    st.text(latin1, max_size=64).map(lambda s: s.rstrip("\x00")),
)
# AE titles and version names as decoded: no padding space or NUL at either end
ae_titles = st.text(latin1, max_size=16).map(lambda s: s.strip(" \x00"))
names = st.text(latin1, min_size=1, max_size=16).map(lambda s: s.strip(" \x00"))
small_bytes = st.binary(max_size=80)


def _tuples(elements: st.SearchStrategy[Any], max_size: int = 3) -> st.SearchStrategy[Any]:
    return st.lists(elements, max_size=max_size).map(tuple)


pc_rq = st.builds(PresentationContextRQ, u8, _tuples(uids), _tuples(uids, 4))
pc_ac = st.one_of(
    st.builds(PresentationContextAC, u8, st.just(0), uids),
    st.builds(PresentationContextAC, u8, st.integers(1, 0xFF), st.just("")),
)
roles = st.builds(RoleSelection, uids, st.booleans(), st.booleans())
windows = st.builds(AsyncOpsWindow, u16, u16)
extended = st.builds(SOPClassExtendedNegotiation, uids, small_bytes)
common = st.builds(SOPClassCommonExtendedNegotiation, uids, uids, _tuples(uids))
identity_rq = st.builds(UserIdentityRQ, u8, st.booleans(), small_bytes, small_bytes)
identity_ac = st.builds(UserIdentityAC, small_bytes)
user_info = st.builds(
    UserInformation,
    max_length=st.none() | u32,
    implementation_class_uid=st.none() | uids,
    implementation_version_name=st.none() | names,
    async_ops_window=st.none() | windows,
    role_selections=_tuples(roles),
    sop_class_extended=_tuples(extended, 2),
    sop_class_common_extended=_tuples(common, 2),
    user_identity_rq=st.none() | identity_rq,
    user_identity_ac=st.none() | identity_ac,
    unknown_sub_item_types=st.just(()),  # never encoded
)
items = st.one_of(
    st.builds(ApplicationContext, uids),
    st.builds(AbstractSyntax, uids),
    st.builds(TransferSyntax, uids),
    pc_rq,
    pc_ac,
    st.builds(MaximumLength, u32),
    st.builds(ImplementationClassUID, uids),
    st.builds(ImplementationVersionName, names),
    windows,
    roles,
    extended,
    common,
    identity_rq,
    identity_ac,
    user_info,
)
pdvs = st.builds(PDV, u8, u8, st.binary(max_size=300))
pdus: st.SearchStrategy[PDU] = st.one_of(
    st.builds(AAssociateRQ, ae_titles, ae_titles, _tuples(pc_rq, 4), user_info, uids, u16),
    st.builds(AAssociateAC, ae_titles, ae_titles, _tuples(pc_ac, 4), user_info, uids, u16),
    st.builds(AAssociateRJ, u8, u8, u8),
    st.builds(PDataTF, st.lists(pdvs, min_size=1, max_size=4).map(tuple)),
    st.just(AReleaseRQ()),
    st.just(AReleaseRP()),
    st.builds(AAbort, u8, u8),
)
FIXED_FRAMES = [ASSOCIATE_RQ, ECHO_PDATA, RELEASE_RQ, abort(2, 6), reject(1, 1, 7)]
frames = st.one_of(st.sampled_from(FIXED_FRAMES), pdus.map(lambda p: p.encode()))


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- round trips --------------------------------------------------------------------------


@given(items)
def test_every_item_round_trips(value: Any) -> None:
    encoded = value.encode()
    assert encoded[0] == value.item_type
    assert struct.unpack_from(">H", encoded, 2)[0] == len(encoded) - 4
    assert type(value).decode(encoded[4:]) == value


@given(pdus)
def test_every_pdu_round_trips(value: PDU) -> None:
    frame = value.encode()
    assert frame[0] == value.pdu_type
    assert struct.unpack_from(">I", frame, 2)[0] == len(frame) - 6
    assert decode_pdu(frame[0], frame[6:]) == value


@given(st.lists(pdus, min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=8))
def test_mp36_pdu_stream_round_trips_through_reader_whatever_the_chunking(
    values: list[PDU], cuts: list[int]
) -> None:
    stream = b"".join(v.encode() for v in values)
    reader = PDUReader(LIMITS, max_pdata_length=MAX_PDATA)
    decoded: list[PDU] = []
    for chunk in _chunked(stream, cuts):
        reader.feed(chunk)
        decoded += [decode_pdu(t, body) for t, body in iter(reader.next_pdu, None)]
    assert decoded == values


# --- fuzzing (catalogue MP-37) ------------------------------------------------------------


def _normalised(value: PDU) -> PDU:
    """What re-encoding keeps: unknown sub-items are not sent again."""
    if isinstance(value, AAssociateRQ | AAssociateAC):
        info = dataclasses.replace(value.user_information, unknown_sub_item_types=())
        return dataclasses.replace(value, user_information=info)
    return value


def _decode_or_refuse(pdu_type: int, body: bytes | memoryview) -> None:
    """decode_pdu gives a PDU of that type or PDUDecodeError; a PDU re-encodes stably."""
    try:
        value = decode_pdu(pdu_type, body)
    except PDUDecodeError:
        return
    assert type(value) is PDU_TYPES[pdu_type]
    again = value.encode()
    assert decode_pdu(again[0], again[6:]) == _normalised(value)


def _read_stream(stream: bytes, cuts: list[int]) -> None:
    """Frame then decode ``stream``; only PDUDecodeError may come out."""
    reader = PDUReader(LIMITS, max_pdata_length=MAX_PDATA)
    try:
        for chunk in _chunked(stream, cuts):
            reader.feed(chunk)
            for pdu_type, body in iter(reader.next_pdu, None):
                _decode_or_refuse(pdu_type, body)
    except PDUDecodeError:
        return


@FUZZ
@given(u8, st.binary(max_size=400))
def test_mp37_arbitrary_body_into_decode_pdu(pdu_type: int, body: bytes) -> None:
    _decode_or_refuse(pdu_type, body) if pdu_type in PDU_TYPES else _expect_refused(
        lambda: decode_pdu(pdu_type, body)
    )


def _expect_refused(call: Callable[[], object]) -> None:
    try:
        call()
    except PDUDecodeError:
        return
    raise AssertionError("accepted")


@FUZZ
@given(st.sampled_from([1, 2, 4]), st.binary(max_size=300))
def test_mp37_arbitrary_items_after_valid_fixed_part(pdu_type: int, tail: bytes) -> None:
    head = ASSOCIATE_RQ[6:74] if pdu_type != 4 else b""
    _decode_or_refuse(pdu_type, head + tail)


ITEM_CLASSES = [
    ApplicationContext,
    PresentationContextRQ,
    PresentationContextAC,
    UserInformation,
    MaximumLength,
    ImplementationClassUID,
    ImplementationVersionName,
    AsyncOpsWindow,
    RoleSelection,
    SOPClassExtendedNegotiation,
    SOPClassCommonExtendedNegotiation,
    UserIdentityRQ,
    UserIdentityAC,
]


@FUZZ
@given(st.sampled_from(ITEM_CLASSES), st.binary(max_size=200))
def test_mp37_arbitrary_item_bodies(cls: Any, body: bytes) -> None:
    try:
        value = cls.decode(body)
    except PDUDecodeError:
        return
    assert isinstance(value, cls)


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 1000), max_size=6))
def test_mp37_arbitrary_stream_into_reader(stream: bytes, cuts: list[int]) -> None:
    _read_stream(stream, cuts)


def _length_fields(frame: bytes) -> list[tuple[int, int, int]]:
    """(offset, width, room) of every length field of a valid frame; ``room`` is the
    number of bytes its parent leaves after the field (the enclosing length)."""
    if len(frame) < 6:
        return []
    fields = [(2, 4, len(frame) - 6)]

    def prefixed(off: int, end: int, count: int) -> int:
        end = min(end, len(frame))  # mutated frames may claim more than they hold
        for _ in range(count):
            if off + 2 > end:
                break
            fields.append((off, 2, end - off - 2))
            off += 2 + struct.unpack_from(">H", frame, off)[0]
        return min(off, end)

    def walk(off: int, end: int) -> None:
        end = min(end, len(frame))
        while off + 4 <= end:
            item_type, length = frame[off], struct.unpack_from(">H", frame, off + 2)[0]
            fields.append((off + 2, 2, end - off - 4))
            start, stop = off + 4, min(off + 4 + length, end)  # the frame may be mutated
            if item_type in (0x20, 0x21):
                walk(start + 4, stop)
            elif item_type == 0x50:
                walk(start, stop)
            elif item_type in (0x54, 0x56, 0x59):
                prefixed(start, stop, 1)
            elif item_type == 0x57:
                related = prefixed(start, stop, 2)
                prefixed(related + 2, prefixed(related, stop, 1), 1000)
            elif item_type == 0x58:
                prefixed(start + 2, stop, 2)
            off = stop

    if frame[0] in (1, 2):
        walk(74, len(frame))
    elif frame[0] == 4:
        off = 6
        while off + 6 <= len(frame):
            fields.append((off, 4, len(frame) - off - 4))
            off += 4 + struct.unpack_from(">I", frame, off)[0]
    return fields


def mutated_frames() -> st.SearchStrategy[bytes]:
    return mutated(frames)


def mutated(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """1-3 mutations (flip, insert, delete, length edits) of a frame drawn from ``base``;
    also used by test_fuzz_connection.py."""
    return _mutated(base)


@st.composite
def _mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    frame = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "length", "length"]))
        if op == "length":
            fields = _length_fields(bytes(frame))
            if not fields:
                continue
            off, width, room = draw(st.sampled_from(fields))
            current = int.from_bytes(frame[off : off + width], "big")
            top = (1 << (8 * width)) - 1
            value = draw(
                st.sampled_from([0, 1, current - 1, current + 1, room - 1, room, room + 1, top])
            )
            frame[off : off + width] = min(max(value, 0), top).to_bytes(width, "big")
        elif op == "flip" and frame:
            at = draw(st.integers(0, len(frame) - 1))
            frame[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            at = draw(st.integers(0, len(frame)))
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and frame:
            at = draw(st.integers(0, len(frame) - 1))
            del frame[at : at + draw(st.integers(1, 8))]
    return bytes(frame)


@FUZZ
@given(mutated_frames(), st.lists(st.integers(0, 1000), max_size=4))
def test_mp37_mutated_valid_frames(frame: bytes, cuts: list[int]) -> None:
    if len(frame) >= 6:
        _decode_or_refuse(frame[0], frame[6:]) if frame[0] in PDU_TYPES else None
    _read_stream(frame, cuts)


def test_length_field_walker_finds_every_field_of_the_catalogue_rq() -> None:
    offsets = [off for off, _, _ in _length_fields(ASSOCIATE_RQ)]
    # PDU length; application context; presentation context and its two sub-items;
    # user information and its two sub-items
    assert offsets == [2, 0x4C, 0x65, 0x6D, 0x82, 0x97, 0x9B, 0xA3]
