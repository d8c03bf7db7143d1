"""PDUReader: splitting a byte stream into PDUs with header-only checks (PS3.8 9.3.1).

Catalogue ids (MP-xx) from /work/shared/research/reliability-catalogue.md B.1 are in the
test names.
"""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from protocol.errors import AbortReason, PDUDecodeError
from protocol.framing import PDUReader
from protocol.limits import Limits
from protocol.pdu import decode_pdu, encode_pdata
from tests.unit.pdu_fixtures import (
    ASSOCIATE_RQ,
    ECHO_PDATA,
    RELEASE_RP,
    RELEASE_RQ,
    abort,
    pdu,
)

INVALID = AbortReason.INVALID_PDU_PARAMETER_VALUE
UNRECOGNIZED = AbortReason.UNRECOGNIZED_PDU


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of every PDU in ``data`` split off the header by hand."""
    out, off = [], 0
    while off < len(data):
        length = struct.unpack_from(">I", data, off + 2)[0]
        out.append((data[off], data[off + 6 : off + 6 + length]))
        off += 6 + length
    return out


def _drain(reader: PDUReader) -> list[tuple[int, bytes]]:
    out = []
    while (got := reader.next_pdu()) is not None:
        out.append((got[0], bytes(got[1])))
    return out


def _feed_all(reader: PDUReader, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        reader.feed(chunk)
        out += _drain(reader)
    return out


def _refused(data: bytes, reason: AbortReason = INVALID, **kwargs: object) -> PDUDecodeError:
    reader = PDUReader(Limits(), **kwargs)  # type: ignore[arg-type]
    reader.feed(data)
    with pytest.raises(PDUDecodeError) as info:
        reader.next_pdu()
    assert info.value.reason == reason, info.value.message
    return info.value


STREAM = ASSOCIATE_RQ + ECHO_PDATA + RELEASE_RQ


# --- MP-36: framing independent of how the bytes arrive -----------------------------------


def test_mp36_three_pdus_in_one_feed() -> None:
    reader = PDUReader(Limits())
    reader.feed(STREAM)
    assert _drain(reader) == _frames(STREAM)
    assert [t for t, _ in _frames(STREAM)] == [1, 4, 5]
    assert not reader.in_progress


def test_mp36_one_byte_per_feed() -> None:
    reader = PDUReader(Limits())
    chunks = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert _feed_all(reader, chunks) == _frames(STREAM)


def test_mp36_every_split_point_gives_the_same_pdus() -> None:
    expected = _frames(STREAM)
    for cut in range(len(STREAM) + 1):
        reader = PDUReader(Limits())
        assert _feed_all(reader, [STREAM[:cut], STREAM[cut:]]) == expected, cut


def test_feeds_without_draining_in_between() -> None:
    reader = PDUReader(Limits())
    for i in range(0, len(STREAM), 7):
        reader.feed(STREAM[i : i + 7])
    assert _drain(reader) == _frames(STREAM)


def test_whole_stream_decodes_to_the_expected_pdus() -> None:
    reader = PDUReader(Limits())
    reader.feed(STREAM)
    names = [type(decode_pdu(*got)).__name__ for got in iter(reader.next_pdu, None)]
    assert names == ["AAssociateRQ", "PDataTF", "AReleaseRQ"]


def test_partial_pdu_is_held_until_complete() -> None:
    reader = PDUReader(Limits())
    reader.feed(ASSOCIATE_RQ[:100])  # MP-08's first part: header plus 94 body bytes
    assert reader.next_pdu() is None
    assert reader.in_progress
    reader.feed(ASSOCIATE_RQ[100:])
    assert _drain(reader) == _frames(ASSOCIATE_RQ)
    assert not reader.in_progress
    assert reader.next_pdu() is None


def test_partial_header_is_held() -> None:
    reader = PDUReader(Limits())
    reader.feed(RELEASE_RP[:3])
    assert reader.next_pdu() is None and reader.in_progress
    reader.feed(RELEASE_RP[3:])
    assert _drain(reader) == [(6, b"\x00\x00\x00\x00")]


# --- bodies stay valid; copies ------------------------------------------------------------


def test_bodies_stay_valid_after_later_feeds() -> None:
    reader = PDUReader(Limits())
    kept = []
    for i in range(len(STREAM)):  # assembled bodies
        reader.feed(STREAM[i : i + 1])
        kept += list(iter(reader.next_pdu, None))
    reader.feed(STREAM)  # zero-copy bodies
    kept += list(iter(reader.next_pdu, None))
    reader.feed(STREAM * 3)
    _drain(reader)
    assert [(t, bytes(b)) for t, b in kept] == _frames(STREAM) * 2


def test_pdu_whole_in_one_feed_is_not_copied() -> None:
    reader = PDUReader(Limits())
    reader.feed(STREAM)
    _, body = reader.next_pdu()  # type: ignore[misc]
    assert body.obj is STREAM


def test_large_pdata_split_across_feeds_assembled_in_one_buffer() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    frame = b"".join(encode_pdata(1, 0, payload))
    reader = PDUReader(Limits(), max_pdata_length=len(frame) - 6)
    got = _feed_all_views(reader, [frame[i : i + 65_536] for i in range(0, len(frame), 65_536)])
    ((pdu_type, body),) = got
    assert pdu_type == 4
    assert isinstance(body.obj, bytearray) and len(body.obj) == len(frame) - 6
    assert decode_pdu(4, body).pdvs[0].data == payload  # type: ignore[union-attr]


def _feed_all_views(reader: PDUReader, chunks: list[bytes]) -> list[tuple[int, memoryview]]:
    out: list[tuple[int, memoryview]] = []
    for chunk in chunks:
        reader.feed(chunk)
        out += list(iter(reader.next_pdu, None))
    return out


def test_large_pdata_one_byte_per_feed() -> None:
    payload = b"\xab" * 65_536
    frame = b"".join(encode_pdata(1, 2, payload))
    reader = PDUReader(Limits())
    got = _feed_all(reader, [frame[i : i + 1] for i in range(len(frame))])
    assert got == [(4, frame[6:])]


def test_many_pdus_in_one_feed() -> None:
    frames = b"".join(b"".join(encode_pdata(1, 0, bytes([i % 256]) * 10)) for i in range(5000))
    reader = PDUReader(Limits())
    reader.feed(frames)
    got = _drain(reader)
    assert len(got) == 5000 and got[4999][1][6:] == bytes([4999 % 256]) * 10


def test_bytearray_and_memoryview_feeds_are_copied_on_entry() -> None:
    data = bytearray(RELEASE_RQ)
    reader = PDUReader(Limits())
    reader.feed(data)  # type: ignore[arg-type]
    data[6:] = b"\xff\xff\xff\xff"  # the caller reuses its buffer
    assert _drain(reader) == [(5, b"\x00\x00\x00\x00")]


# --- MP-01 / MP-02: huge A-ASSOCIATE lengths refused from the header -----------------------


def test_mp01_associate_length_ffffffff_refused_without_allocation() -> None:
    tracemalloc.start()
    try:
        reader = PDUReader(Limits())
        reader.feed(b"\x01\x00\xff\xff\xff\xff")
        reader.feed(bytes(1024))
        with pytest.raises(PDUDecodeError) as info:
            reader.next_pdu()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == INVALID
    assert peak < 1 << 20


@pytest.mark.parametrize("length", [0x80000000, 0xFFFFFFF5, 0x7FFFFFFF, 65_537])
@pytest.mark.parametrize("pdu_type", [1, 2])
def test_mp02_associate_lengths_over_cap(pdu_type: int, length: int) -> None:
    _refused(struct.pack(">BBI", pdu_type, 0, length))


def test_associate_at_cap_accepted() -> None:
    body_length = len(ASSOCIATE_RQ) - 6
    reader = PDUReader(Limits(max_associate_pdu_length=body_length))
    reader.feed(ASSOCIATE_RQ)
    assert reader.next_pdu() is not None
    reader = PDUReader(Limits(max_associate_pdu_length=body_length - 1))
    reader.feed(ASSOCIATE_RQ[:6])  # refused on the header alone
    with pytest.raises(PDUDecodeError):
        reader.next_pdu()


# --- MP-03: A-ASSOCIATE shorter than its 68 fixed bytes -----------------------------------


@pytest.mark.parametrize("length", [0, 1, 4, 67])
@pytest.mark.parametrize("pdu_type", [1, 2])
def test_mp03_associate_length_below_68(pdu_type: int, length: int) -> None:
    _refused(struct.pack(">BBI", pdu_type, 0, length) + bytes(length))


# --- MP-04: P-DATA-TF over the announced maximum ------------------------------------------


def test_mp04_pdata_over_announced_maximum() -> None:
    reader = PDUReader(Limits())
    reader.set_max_pdata_length(16_384)
    reader.feed(bytes.fromhex("040000010001"))  # 65 537 bytes announced
    with pytest.raises(PDUDecodeError) as info:
        reader.next_pdu()
    assert info.value.reason == INVALID


def test_pdata_at_announced_maximum_accepted() -> None:
    frame = b"".join(encode_pdata(1, 0, bytes(16_378)))  # PDU length 16 384
    reader = PDUReader(Limits(), max_pdata_length=16_384)
    reader.feed(frame)
    assert _drain(reader) == [(4, frame[6:])]
    _refused(b"".join(encode_pdata(1, 0, bytes(16_379))), max_pdata_length=16_384)


def test_pdata_default_maximum_is_limits_max_pdu_length() -> None:
    assert PDUReader(Limits(max_pdu_length=1000)).max_pdata_length == 1000
    reader = PDUReader(Limits(max_pdu_length=1000))
    reader.feed(struct.pack(">BBI", 4, 0, 1001))
    with pytest.raises(PDUDecodeError):
        reader.next_pdu()


def test_pdata_maximum_zero_means_no_limit() -> None:
    frame = b"".join(encode_pdata(1, 0, bytes(300_000)))
    reader = PDUReader(Limits(), max_pdata_length=0)
    reader.feed(frame)
    assert len(_drain(reader)) == 1


# --- MP-05 / MP-06 / MP-07: not a DICOM PDU stream ----------------------------------------


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0xFF, 0x53])
def test_mp05_unknown_first_pdu_type(pdu_type: int) -> None:
    _refused(bytes((pdu_type, 0, 0, 0, 0, 4)) + bytes(4), UNRECOGNIZED)


def test_mp06_http_request_refused_on_header() -> None:
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    # the length field is "T / ", 1 411 395 360 (the catalogue's 1 163 141 167 is "ET /",
    # read one byte early); either way it is refused on the type byte 0x47 first
    assert int.from_bytes(request[2:6], "big") == 1_411_395_360
    tracemalloc.start()
    try:
        error = _refused(request, UNRECOGNIZED)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "0x47" in error.message
    assert peak < 1 << 20


def test_mp06_http_request_one_byte_per_feed() -> None:
    reader = PDUReader(Limits())
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for i in range(5):
        reader.feed(request[i : i + 1])
        assert reader.next_pdu() is None  # header incomplete
    reader.feed(request[5:6])
    with pytest.raises(PDUDecodeError) as info:
        reader.next_pdu()
    assert info.value.reason == UNRECOGNIZED


def test_mp07_tls_client_hello_refused() -> None:
    hello = bytes.fromhex("160301020001 0001fc0303") + bytes(64)
    _refused(hello, UNRECOGNIZED)


# --- MP-29 / MP-34: lengths impossible for the type ---------------------------------------


@pytest.mark.parametrize("length", [0, 1, 5])
def test_mp29_pdata_too_short_for_a_pdv(length: int) -> None:
    _refused(struct.pack(">BBI", 4, 0, length) + bytes(length))


@pytest.mark.parametrize("pdu_type", [3, 5, 6, 7])
@pytest.mark.parametrize("length", [0, 3, 5, 8, 0xFFFFFFFF])
def test_mp34_fixed_length_pdu_length_not_4(pdu_type: int, length: int) -> None:
    _refused(struct.pack(">BBI", pdu_type, 0, length))


def test_fixed_length_pdus_pass() -> None:
    reader = PDUReader(Limits())
    reader.feed(RELEASE_RQ + RELEASE_RP + abort(2, 6) + pdu(3, b"\x00\x01\x01\x07"))
    assert [t for t, _ in _drain(reader)] == [5, 6, 7, 3]


# --- after an error -----------------------------------------------------------------------


def test_error_is_sticky() -> None:
    reader = PDUReader(Limits())
    reader.feed(RELEASE_RQ + b"\x09\x00\x00\x00\x00\x04" + RELEASE_RP)
    assert reader.next_pdu() == (5, memoryview(b"\x00\x00\x00\x00"))
    with pytest.raises(PDUDecodeError) as first:
        reader.next_pdu()
    reader.feed(RELEASE_RP)
    with pytest.raises(PDUDecodeError) as second:
        reader.next_pdu()
    assert second.value is first.value


def test_reserved_header_byte_not_tested() -> None:
    reader = PDUReader(Limits())
    reader.feed(b"\x05\xff" + RELEASE_RQ[2:])
    assert _drain(reader) == [(5, b"\x00\x00\x00\x00")]


def test_no_limit_does_not_trust_a_huge_announced_length() -> None:
    tracemalloc.start()
    try:
        reader = PDUReader(Limits(), max_pdata_length=0)
        reader.feed(b"\x04\x00\xff\xff\xff\xff" + bytes(1024))
        assert reader.next_pdu() is None  # waits for the bytes, allocating as they come
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_body_over_preallocation_threshold_grows_as_bytes_arrive() -> None:
    payload = bytes(range(256)) * (5 * 4096)  # 5 MiB
    frame = b"".join(encode_pdata(1, 0, payload))
    reader = PDUReader(Limits(), max_pdata_length=0)
    chunks = [frame[i : i + 100_000] for i in range(0, len(frame), 100_000)]
    assert _feed_all(reader, chunks) == [(4, frame[6:])]
