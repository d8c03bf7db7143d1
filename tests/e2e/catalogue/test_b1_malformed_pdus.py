"""Catalogue B.1, malformed PDUs, against a live ``dicom-router serve`` (layer I).

Every case runs against the module's ``catalogue_node`` with the ``invariant`` fixture
(tests/e2e/catalogue/conftest.py): beyond the bytes asserted here, a good DCMTK storescu
and a pynetdicom C-ECHO succeed afterwards, fds/tasks/spool temporary files are back at
their baseline, each raw peer has one WARNING line naming it (unless the case says
otherwise), and nothing unacknowledged is kept.

Variants of one case run on concurrent connections, so the node's ARTIM wait after each
A-ABORT (Sta13, ``ARTIM`` s) is paid once per case, not once per variant.

Pure byte-level parts stay unit tests with the id in their name: MP-02/MP-03 framing in
tests/unit/test_framing.py, MP-37 in tests/unit/test_pdu_properties.py (hypothesis),
MP-20..MP-24 negotiation in tests/unit/test_acse.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from harness import (
    ABORT_1,
    C_ECHO_PDATA,
    COMMAND_LAST,
    CT_IMAGE,
    DATASET_MORE,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    PEERS,
    VERIFICATION,
    ProcessWatch,
    RawPeer,
    abort,
    abort_8,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    command_status,
    dataset_bytes,
    edit,
    item,
    p_data_tf,
    parse_ac,
    parse_command_status,
    pdu,
    pdv,
    presentation_context,
    release_rp,
    release_rq,
    set_length,
    store_pdata,
    truncate,
    user_information,
)
from pydicom.uid import generate_uid

from tests.e2e.catalogue.conftest import ARTIM, Invariant

#: Long enough for the node's ARTIM close under load (what is asserted is the bytes).
WITHIN = ARTIM + 15
RQ = associate_rq()  # catalogue B.0, 191 bytes
#: The maximum P-DATA-TF length the node announces (listener.max_pdu_length default).
NODE_MAX_PDU = 262_144
STORE_CONTEXTS = ((1, CT_IMAGE, (EXPLICIT_LE,)), (3, VERIFICATION, (IMPLICIT_LE,)))


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _established(port: int, **rq_fields: object) -> RawPeer:
    """A peer in Sta6 whose association has really worked (one C-ECHO answered)."""
    peer = RawPeer(HOST, port).connect()
    ac = parse_ac(peer.associate(**rq_fields))
    echo_context = next(cid for cid, result, _ in ac.contexts if result == 0)
    peer.send(p_data_tf(pdv(echo_context, COMMAND_LAST, c_echo_rq(1))))
    pdu_type, body = peer.recv_pdu()
    status = parse_command_status(pdu(pdu_type, body))
    assert pdu_type == 0x04 and status == 0, f"C-ECHO before the case: {pdu_type} {status}"
    return peer


def _all_get(
    invariant: Invariant,
    port: int,
    variants: Mapping[str, bytes],
    expected: bytes,
    *,
    associate_first: bool = False,
    **rq_fields: object,
) -> None:
    """Send each variant on its own connection (all at once), then check every peer got
    ``expected`` and was closed, and has one WARNING line with the abort's codes and a
    reason."""
    invariant.expect_warning(rf"aborted \(source {expected[8]}, reason {expected[9]}\): \S")
    peers: dict[str, RawPeer] = {}
    try:
        for name, payload in variants.items():
            if associate_first:
                peer = _established(port, **rq_fields)
            else:
                peer = RawPeer(HOST, port).connect()
            peers[name] = peer
            peer.try_send(payload)
        for name, peer in peers.items():
            try:
                if associate_first:
                    # ABORT-8's promise is the bytes; the node would then wait ARTIM in
                    # Sta13 for us to close (B.2's SM-11 checks that wait), so we close and
                    # the invariant checks that the node freed the connection.
                    peer.expect(expected, WITHIN)
                else:
                    peer.expect_abort_and_close(expected, WITHIN)  # ABORT-1 *and* close
            except AssertionError as exc:
                raise AssertionError(f"variant {name!r}: {exc}") from None
    finally:
        for peer in peers.values():
            peer.close()


def _all_rejected(
    invariant: Invariant, port: int, variants: Mapping[str, bytes], codes: tuple[int, int, int]
) -> None:
    invariant.expect_warning(r"rejected \(result {}, source {}, reason {}\)".format(*codes))
    peers = {name: RawPeer(HOST, port).connect() for name in variants}
    try:
        for name, peer in peers.items():
            peer.send(variants[name])
        for name, peer in peers.items():
            try:
                # The RJ bytes; the close after it (Sta13, ARTIM) is B.2's SM-11.
                peer.expect(bytes.fromhex("03 00 00 00 00 04 00") + bytes(codes), WITHIN)
            except AssertionError as exc:
                raise AssertionError(f"variant {name!r}: {exc}") from None
    finally:
        for peer in peers.values():
            peer.close()


def _all_accepted(
    port: int, variants: Mapping[str, bytes]
) -> dict[str, list[tuple[int, int, str]]]:
    """Each variant is answered with an A-ASSOCIATE-AC; a C-ECHO works on its first
    accepted context and the association releases cleanly. Returns the context results."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for name, payload in variants.items():
        with RawPeer(HOST, port) as peer:
            peer.send(payload)
            pdu_type, body = peer.recv_pdu(WITHIN)
            assert pdu_type == 0x02, f"variant {name!r}: got {pdu(pdu_type, body)[:10].hex(' ')}"
            ac = parse_ac(pdu(pdu_type, body))
            out[name] = ac.contexts
            accepted = [cid for cid, result, _ in ac.contexts if result == 0]
            if accepted:
                assert peer.echo(context_id=accepted[0]) == 0, name
            peer.release()
    return out


def _rq_with_body(body: bytes) -> bytes:
    """An A-ASSOCIATE-RQ PDU around ``body`` (length field consistent)."""
    return pdu(0x01, body)


# --------------------------------------------------------------------------------------
# Sta2: before the association (ABORT-1)
# --------------------------------------------------------------------------------------
def test_mp_01_huge_associate_length_is_not_buffered(catalogue_node, invariant):
    """`01 00 FF FF FF FF` + 1 KiB, then silence: ABORT-1 and close, no allocation in
    proportion to the 4 GiB announced (peak RSS of the listener grows < 1 MiB; three
    peers, 64 KiB sent after the header each)."""
    watch = ProcessWatch(catalogue_node.listener_pids())
    header = bytes.fromhex("01 00 FF FF FF FF")
    _all_get(
        invariant,
        catalogue_node.port,
        {"1KiB": header + bytes(1024), **{f"64KiB-{i}": header + bytes(65536) for i in range(3)}},
        ABORT_1,
    )
    assert watch.hwm_growth() < 1024, f"peak RSS grew by {watch.hwm_growth()} KiB"


def test_mp_02_length_wraparound_values_get_abort_1(catalogue_node, invariant):
    """Lengths near 2**31 and 2**32 (header + length must not wrap)."""
    _all_get(
        invariant,
        catalogue_node.port,
        {
            f"{n:#x}": bytes.fromhex("01 00") + n.to_bytes(4, "big") + bytes(64)
            for n in (0x80000000, 0xFFFFFFF5, 0x7FFFFFFF)
        },
        ABORT_1,
    )


def test_mp_03_associate_shorter_than_its_fixed_part_gets_abort_1(catalogue_node, invariant):
    """Length 0 and every length 1..67 (the fixed part is 68 bytes), each whole."""
    variants = {"0": bytes.fromhex("01 00 00 00 00 00")}
    for n in range(1, 68):
        variants[str(n)] = set_length(RQ[: 6 + n], n)
    _all_get(invariant, catalogue_node.port, variants, ABORT_1)


def test_mp_05_unknown_first_pdu_types_get_abort_1(catalogue_node, invariant):
    """Types 00, 08, FF, 53 as the first PDU; a huge announced body is never awaited."""
    variants = {
        f"{t:02x}": bytes([t, 0]) + (4).to_bytes(4, "big") + bytes(4) for t in (0x00, 0x08, 0xFF)
    }
    variants["53-huge"] = bytes.fromhex("53 00 7F FF FF FF") + bytes(16)
    variants["08-huge-no-body"] = bytes.fromhex("08 00 FF FF FF FF")
    _all_get(invariant, catalogue_node.port, variants, ABORT_1)
    invariant.expect_warning(r"aborted \(source 0, reason 0\): unrecognized PDU type 0x")


def test_mp_06_http_request_gets_abort_1(catalogue_node, invariant):
    """An HTTP GET (type 0x47, length 1 163 141 167): ABORT-1, a WARNING naming the peer."""
    _all_get(
        invariant, catalogue_node.port, {"http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"}, ABORT_1
    )


def test_mp_07_tls_client_hello_on_the_plain_port_gets_abort_1(catalogue_node, invariant):
    hello = bytes.fromhex("16 03 01 00 c8 01 00 00 c4 03 03") + os.urandom(32) + bytes(64)
    _all_get(invariant, catalogue_node.port, {"client-hello": hello}, ABORT_1)


def test_mp_08_truncated_associate_then_fin_frees_the_connection(catalogue_node, invariant):
    """185 bytes announced, 100 sent, then FIN: nothing is owed (Evt17), the node
    closes; one WARNING names the peer, nothing above WARNING."""
    invariant.expect_warning(r"closed the connection in the middle of its first PDU")
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(truncate(RQ, 100))
        peer.shutdown_write()
        peer.expect_close(WITHIN)


def test_mp_09_silent_partial_associate_is_closed_by_artim(catalogue_node, invariant):
    """100 of 191 bytes, then silence: the Sta2 deadline (ARTIM) closes the connection,
    while a good DCMTK peer stores at the same time."""
    with invariant.during():
        # The node starts ARTIM when it accepts, after this clock starts: the close
        # cannot come sooner than ARTIM after it (however late this thread runs).
        started = time.monotonic()
        with RawPeer(HOST, catalogue_node.port) as peer:
            peer.send(truncate(RQ, 100))
            peer.expect_close(WITHIN)
        waited = time.monotonic() - started
    invariant.expect_warning(r"no A-ASSOCIATE-RQ within 2 s \(ARTIM\), closing")
    assert waited >= ARTIM - 0.05, f"closed after {waited:.1f} s, before ARTIM ({ARTIM} s)"


def test_mp_10_presentation_context_item_length_ffff_gets_abort_1(catalogue_node, invariant):
    _all_get(
        invariant, catalogue_node.port, {"pc-ffff": edit(RQ, 0x63, b"\x20\x00\xff\xff")}, ABORT_1
    )


def test_mp_11_sub_item_lengths_inconsistent_with_parent_get_abort_1(catalogue_node, invariant):
    """Abstract syntax length 0x0100 inside the 46-byte context item; an implementation
    class UID sub-item running 10 bytes past the end of its user information item."""
    uid_at = RQ.index(b"\x52\x00\x00\x1a")
    past = edit(RQ, uid_at + 2, b"\x00\x24") + bytes(10)
    _all_get(
        invariant,
        catalogue_node.port,
        {
            "abstract-0x100": edit(RQ, 0x6B + 2, b"\x01\x00"),
            "user-info-sub-item-past-parent": set_length(past, len(past) - 6),
        },
        ABORT_1,
    )


def test_mp_12_unknown_items_are_skipped(catalogue_node, invariant):
    """Item 0x33 between the application context and the presentation context, and a
    user information sub-item 0x5F: skipped, the association works."""
    invariant.expect_no_warning()
    _all_accepted(
        catalogue_node.port,
        {
            "item-33": associate_rq(extra_items=item(0x33, b"unknown!")),
            "sub-item-5f": associate_rq(user_items=item(0x5F, b"xyz1")),
        },
    )


def test_mp_13_unknown_item_running_past_the_pdu_gets_abort_1(catalogue_node, invariant):
    tail = RQ + bytes.fromhex("33 00 FF FF") + bytes(8)
    _all_get(invariant, catalogue_node.port, {"33-ffff": set_length(tail, len(tail) - 6)}, ABORT_1)


def test_mp_14_protocol_version_without_bit_0_is_rejected_1_2_2(catalogue_node, invariant):
    _all_rejected(invariant, catalogue_node.port, {"0000": edit(RQ, 6, b"\x00\x00")}, (1, 2, 2))


def test_mp_15_protocol_version_with_other_bits_is_accepted(catalogue_node, invariant):
    """PS3.8 Table 9-11: the receiver tests bit 0 only."""
    invariant.expect_no_warning()
    _all_accepted(
        catalogue_node.port,
        {"0003": edit(RQ, 6, b"\x00\x03"), "8001": edit(RQ, 6, b"\x80\x01")},
    )


def test_mp_16_reserved_fields_are_not_tested(catalogue_node, invariant):
    invariant.expect_no_warning()
    _all_accepted(
        catalogue_node.port,
        {
            "pdu-byte-1": edit(RQ, 1, b"\xaa"),
            "bytes-8-9": edit(RQ, 8, b"\xaa\xbb"),
            "bytes-2a-49": edit(RQ, 0x2A, b"\xcc" * 32),
            "item-byte-1": edit(RQ, 0x4A + 1, b"\x77"),
            "context-reserved": edit(RQ, 0x63 + 5, b"\x11\x22\x33"),
        },
    )


def test_mp_17_missing_or_duplicate_single_items_get_abort_1(catalogue_node, invariant):
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    _all_get(
        invariant,
        catalogue_node.port,
        {
            "no-application-context": associate_rq(application_context=None),
            "two-application-contexts": associate_rq(extra_items=app),
            "two-user-information": associate_rq(user_info=user_information() * 2),
            "two-max-length": associate_rq(user_items=item(0x51, (16384).to_bytes(4, "big"))),
        },
        ABORT_1,
    )


def test_mp_18_unknown_application_context_is_rejected_1_1_2(catalogue_node, invariant):
    _all_rejected(
        invariant,
        catalogue_node.port,
        {
            "3.1.1.2": associate_rq(application_context="1.2.840.10008.3.1.1.2"),
            "garbage": associate_rq(application_context="not a UID at all"),
        },
        (1, 1, 2),
    )


def test_mp_19_no_presentation_context_is_rejected_1_1_1(catalogue_node, invariant):
    _all_rejected(invariant, catalogue_node.port, {"none": associate_rq(contexts=())}, (1, 1, 1))


def test_mp_20_context_ids_zero_even_and_duplicate_are_rejected(catalogue_node, invariant):
    """Chosen behaviour (tests/unit/test_acse.py): the offending context gets result 2
    (provider rejection), every copy of a duplicated id too; the others negotiate."""
    invariant.expect_no_warning()
    contexts = [(cid, VERIFICATION, (IMPLICIT_LE,)) for cid in (0, 2, 3, 3, 5)]
    got = _all_accepted(catalogue_node.port, {"ids": associate_rq(contexts=contexts)})["ids"]
    assert [(cid, result) for cid, result, _ in got] == [(0, 2), (2, 2), (3, 2), (3, 2), (5, 0)]


def test_mp_21_the_maximum_of_128_contexts_and_one_repeated(catalogue_node, invariant):
    invariant.expect_no_warning()
    contexts = [(cid, VERIFICATION, (IMPLICIT_LE,)) for cid in range(1, 256, 2)]
    contexts.append((255, VERIFICATION, (IMPLICIT_LE,)))
    rq = associate_rq(contexts=contexts)
    assert len(rq) < 65536
    got = _all_accepted(catalogue_node.port, {"129": rq})["129"]
    assert len(got) == 129
    assert all(result == 0 for _, result, _ in got[:127]), got[:127]
    assert got[127][:2] == (255, 2) and got[128][:2] == (255, 2), got[127:]


def test_mp_22_malformed_contexts_rejected_others_negotiated(catalogue_node, invariant):
    """No abstract syntax (2), two abstract syntaxes (2), no transfer syntax (4)."""
    invariant.expect_no_warning()
    two_abstract = item(
        0x20,
        b"\x03\x00\x00\x00"
        + item(0x30, CT_IMAGE.encode())
        + item(0x30, VERIFICATION.encode())
        + item(0x40, IMPLICIT_LE.encode()),
    )
    body = associate_rq(contexts=[(1, None, (IMPLICIT_LE,))])[6:]
    at = body.index(b"\x50\x00")
    body = (
        body[:at]
        + two_abstract
        + presentation_context(5, VERIFICATION, ())
        + presentation_context(7, VERIFICATION, (IMPLICIT_LE,))
        + body[at:]
    )
    got = _all_accepted(catalogue_node.port, {"mixed": _rq_with_body(body)})["mixed"]
    assert [(cid, result) for cid, result, _ in got] == [(1, 2), (3, 2), (5, 4), (7, 0)]


def test_mp_23_odd_uids_in_contexts(catalogue_node, invariant):
    """A trailing NUL pad is legal (accepted); 65+ characters, letters, a trailing space
    and an embedded NUL make the context rejected (3 abstract, 4 transfer syntax)."""
    invariant.expect_no_warning()
    long_uid = "1.2.840.10008." + "1" * 60
    contexts = [
        (1, VERIFICATION + "\x00", (IMPLICIT_LE,)),
        (3, long_uid, (IMPLICIT_LE,)),
        (5, "1.2.840.abc.1", (IMPLICIT_LE,)),
        (7, VERIFICATION + " ", (IMPLICIT_LE,)),
        (9, "1.2.840\x0010008.1.1", (IMPLICIT_LE,)),
        (11, VERIFICATION, (long_uid,)),
        (13, VERIFICATION, ("1.2.840.10008.1.two",)),
        (15, VERIFICATION, (IMPLICIT_LE + "\x00",)),
    ]
    got = _all_accepted(catalogue_node.port, {"uids": associate_rq(contexts=contexts)})["uids"]
    assert [(cid, result) for cid, result, _ in got] == [
        (1, 0),
        (3, 3),
        (5, 3),
        (7, 3),
        (9, 3),
        (11, 4),
        (13, 4),
        (15, 0),
    ]


def test_mp_24_usable_maximum_lengths_are_accepted(catalogue_node, invariant):
    """0 (unlimited), 7 (one data byte per PDV: the node's C-ECHO-RSP arrives in 1-byte
    fragments) and 0xFFFFFFFF (the node caps its fragments) work."""
    invariant.expect_no_warning()
    _all_accepted(
        catalogue_node.port,
        {str(n): associate_rq(max_pdu=n) for n in (0, 7, 0xFFFFFFFF)},
    )


def test_mp_24_too_small_maximum_lengths_are_rejected_1_1_1(catalogue_node, invariant):
    """1 and 6 cannot carry a PDV with data."""
    variants = {str(n): associate_rq(max_pdu=n) for n in (1, 6)}
    _all_rejected(invariant, catalogue_node.port, variants, (1, 1, 1))


def test_mp_25_max_length_sub_item_of_length_2_gets_abort_1(catalogue_node, invariant):
    user_info = item(0x50, item(0x51, b"\x40\x00") + item(0x52, b"1.2.3.4"))
    _all_get(invariant, catalogue_node.port, {"len-2": associate_rq(user_info=user_info)}, ABORT_1)


def test_mp_26_role_selection_uid_past_its_sub_item_gets_abort_1(catalogue_node, invariant):
    uid = CT_IMAGE.encode()
    role = item(0x54, (len(uid) + 20).to_bytes(2, "big") + uid + b"\x01\x01")
    _all_get(invariant, catalogue_node.port, {"uid-past": associate_rq(user_items=role)}, ABORT_1)


def test_mp_27_user_identity_primary_field_past_its_item_gets_abort_1(catalogue_node, invariant):
    identity = item(0x58, b"\x01\x00" + (200).to_bytes(2, "big") + b"user" + b"\x00\x00")
    _all_get(
        invariant, catalogue_node.port, {"primary-past": associate_rq(user_items=identity)}, ABORT_1
    )


def test_mp_27_user_identity_of_unknown_type_is_ignored(catalogue_node, invariant):
    """Types 0 and 9 while identity is not required: ignored, association accepted."""
    invariant.expect_no_warning()
    _all_accepted(
        catalogue_node.port,
        {
            f"type-{t}": associate_rq(
                user_items=item(0x58, bytes([t, 0]) + (4).to_bytes(2, "big") + b"user\x00\x00")
            )
            for t in (0, 9)
        },
    )


ODD_TITLES = {
    "all-spaces": b" " * 16,
    "all-nul": b"\x00" * 16,
    "high-bytes": b"\xc3\xa9\xff\x80TITLE".ljust(16),
    "backslash": b"A\\B".ljust(16),
    "newline": b"EVIL\nINJECTED".ljust(16),
    "dot-dot": b"../x".ljust(16),
}


def test_mp_28_odd_called_ae_titles_are_rejected_1_1_7(catalogue_node, invariant):
    """Well-formed PDUs, so no abort: the called AE check refuses them (1, 1, 7) and the
    title is escaped in the log (no line of it starts where the newline was)."""
    _all_rejected(
        invariant,
        catalogue_node.port,
        {name: associate_rq(called_raw=raw) for name, raw in ODD_TITLES.items()},
        (1, 1, 7),
    )
    log = catalogue_node.log()
    assert not any(line.startswith("INJECTED") for line in log.splitlines()), log[-2000:]


def test_mp_28_odd_calling_ae_titles_get_a_standard_answer(catalogue_node, invariant):
    """With accept = "any" every calling title may store; odd ones are accepted or
    refused (1, 1, 3), never aborted, and logged escaped."""
    invariant.allow_warning(r"rejected \(result 1, source 1, reason 3\)")
    for name, raw in ODD_TITLES.items():
        with RawPeer(HOST, catalogue_node.port) as peer:
            peer.send(associate_rq(calling_raw=raw))
            pdu_type, body = peer.recv_pdu(WITHIN)
            if pdu_type == 0x03:
                assert body == bytes.fromhex("00 01 01 03"), (name, body.hex(" "))
                peer.expect_close(WITHIN)
            else:
                assert pdu_type == 0x02, (name, pdu_type)
                assert peer.echo() == 0, name
                peer.release()
    log = catalogue_node.log()
    assert not any(line.startswith("INJECTED") for line in log.splitlines()), log[-2000:]


# --------------------------------------------------------------------------------------
# Sta6: inside an association (ABORT-8)
# --------------------------------------------------------------------------------------
def test_mp_04_pdata_over_the_announced_maximum_gets_abort_8_6(catalogue_node, invariant):
    """The node announces 262 144; a P-DATA-TF header announcing one more byte is
    refused from its header (the body is never sent)."""
    with RawPeer(HOST, catalogue_node.port) as peer:
        ac = parse_ac(peer.associate())
        peer.release()
    invariant.good_peer(peer)
    assert ac.max_pdu == NODE_MAX_PDU, ac
    _all_get(
        invariant,
        catalogue_node.port,
        {
            "max+1": bytes.fromhex("04 00") + (NODE_MAX_PDU + 1).to_bytes(4, "big"),
            "7f000000": bytes.fromhex("04 00 7F 00 00 00") + bytes(64),
        },
        abort_8(6),
        associate_first=True,
    )


def test_mp_29_pdata_without_any_pdv_gets_abort_8_6(catalogue_node, invariant):
    _all_get(
        invariant,
        catalogue_node.port,
        {"empty": bytes.fromhex("04 00 00 00 00 00")},
        abort_8(6),
        associate_first=True,
    )


def test_mp_30_pdv_of_length_0_or_1_gets_abort_8_6(catalogue_node, invariant):
    _all_get(
        invariant,
        catalogue_node.port,
        {
            "pdv-0": bytes.fromhex("04 00 00 00 00 04 00 00 00 00"),
            "pdv-1": bytes.fromhex("04 00 00 00 00 05 00 00 00 01 01"),
        },
        abort_8(6),
        associate_first=True,
    )


def test_mp_31_pdv_lengths_inconsistent_with_the_pdu_get_abort_8_6(catalogue_node, invariant):
    echo = pdv(1, COMMAND_LAST, c_echo_rq(2))
    _all_get(
        invariant,
        catalogue_node.port,
        {
            "past-pdu": bytes.fromhex("04 00 00 00 00 08 00 00 00 10 01 03 00 00"),
            "ffffffff": bytes.fromhex("04 00 00 00 00 08 FF FF FF FF 01 03 00 00"),
            "sum-short": pdu(0x04, echo + b"\x00\x00\x00"),
        },
        abort_8(6),
        associate_first=True,
    )


def test_mp_32_pdv_on_a_context_not_accepted_gets_abort_8_6(catalogue_node, invariant):
    """Rejected (3: its only transfer syntax is not a UID, result 4; the node accepts any
    well-formed abstract and transfer syntax), never proposed (5), 0 and even (2)."""
    contexts = ((1, VERIFICATION, (IMPLICIT_LE,)), (3, VERIFICATION, ("1.2.840.10008.1.two",)))
    with RawPeer(HOST, catalogue_node.port) as peer:
        assert parse_ac(peer.associate(contexts=contexts)).result(3) == 4
        peer.release()
    invariant.good_peer(peer)
    _all_get(
        invariant,
        catalogue_node.port,
        {f"context-{cid}": p_data_tf(pdv(cid, COMMAND_LAST, c_echo_rq(2))) for cid in (3, 5, 0, 2)},
        abort_8(6),
        associate_first=True,
        contexts=contexts,
    )


def test_mp_32_pdv_on_another_context_mid_store_leaves_nothing(catalogue_node, invariant):
    """A C-STORE whose dataset is half sent, then a PDV on a context never proposed:
    ABORT-8(6); the temporary spool file is deleted and no row is made (the invariant
    checks spool/tmp and the rows)."""
    uid = generate_uid()
    data = dataset_bytes(uid)
    peer = _established(catalogue_node.port, contexts=STORE_CONTEXTS)
    try:
        peer.send(p_data_tf(pdv(1, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid))))
        peer.send(p_data_tf(pdv(1, DATASET_MORE, data[: len(data) // 2])))
        peer.send(p_data_tf(pdv(5, COMMAND_LAST, c_echo_rq(2))))
        peer.expect(abort_8(6), WITHIN)
    finally:
        peer.close()
    assert uid not in catalogue_node.uids()


def test_mp_33_reserved_control_header_bits_are_ignored(catalogue_node, invariant):
    """0xFF on a command (bits 0-1: command, last) and 0xFC/0xFE on dataset fragments
    (bits 0-1: dataset, more/last): the messages are processed (PS3.8 E.2)."""
    invariant.expect_no_warning()
    uid = generate_uid()
    data = dataset_bytes(uid)
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=STORE_CONTEXTS)
        peer.send(p_data_tf(pdv(3, 0xFF, c_echo_rq(1))))
        assert parse_command_status(peer.recv_pdu_bytes()) == 0
        peer.send(p_data_tf(pdv(1, 0xFF, c_store_rq(2, CT_IMAGE, uid))))
        peer.send(p_data_tf(pdv(1, 0xFC, data[:100])))
        peer.send(p_data_tf(pdv(1, 0xFE, data[100:])))
        assert parse_command_status(peer.recv_pdu_bytes(WITHIN)) == 0
        invariant.acknowledged(uid)
        peer.release()
    assert uid in catalogue_node.uids()


def test_mp_34_fixed_length_pdus_of_another_length_get_abort_8_6(catalogue_node, invariant):
    _all_get(
        invariant,
        catalogue_node.port,
        {
            "release-rq-8": bytes.fromhex("05 00 00 00 00 08") + bytes(8),
            "release-rp-8": bytes.fromhex("06 00 00 00 00 08") + bytes(8),
            "abort-8": bytes.fromhex("07 00 00 00 00 08") + bytes(8),
            "release-rq-2": bytes.fromhex("05 00 00 00 00 02 00 00"),
        },
        abort_8(6),
        associate_first=True,
    )


def test_mp_35_peer_abort_with_out_of_range_codes_is_an_abort(catalogue_node, invariant):
    """A-ABORT source 9 reason 0x77 from the peer: the association ends (the node closes,
    sends nothing), nothing crashes while the reason is logged (at INFO: a peer's abort
    is its own business)."""
    invariant.expect_no_warning()
    peers = [_established(catalogue_node.port) for _ in range(2)]
    try:
        peers[0].send(abort(9, 0x77))
        peers[1].send(abort(0xFF, 0xFF))
        for peer in peers:
            peer.expect_close(WITHIN)
    finally:
        for peer in peers:
            peer.close()


# --------------------------------------------------------------------------------------
# MP-36: framing independent of TCP segmentation
# --------------------------------------------------------------------------------------
def _exchange(peer: RawPeer, uid: str, send: Callable[[bytes], None]) -> list[object]:
    """Associate, C-ECHO, C-STORE (the command and a small CT instance in 256-byte
    fragments: 4+ PDUs in one ``send``), release; returns what the node answered."""
    answers: list[object] = []
    send(associate_rq(contexts=STORE_CONTEXTS))
    answers.append(peer.recv_pdu(WITHIN)[0])
    send(p_data_tf(pdv(3, COMMAND_LAST, c_echo_rq(1))))
    answers.append(command_status(peer.recv_command(WITHIN)))
    send(b"".join(store_pdata(1, 2, CT_IMAGE, uid, dataset_bytes(uid), fragment=256)))
    answers.append(command_status(peer.recv_command(WITHIN)))
    send(release_rq())
    answers.append(peer.recv_pdu_bytes(WITHIN))
    return answers


NORMAL_ANSWERS = [0x02, 0, 0, release_rp()]


def test_mp_36_many_pdus_in_one_write(catalogue_node, invariant):
    """A C-STORE's command and dataset PDUs (5 PDUs) in one write: answered as usual."""
    invariant.expect_no_warning()
    uid = generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        assert _exchange(peer, uid, peer.send) == NORMAL_ANSWERS
    invariant.acknowledged(uid)
    assert uid in catalogue_node.uids()


def test_mp_36_one_byte_per_segment(catalogue_node, invariant):
    """The same exchange through a FaultProxy slicer: every byte its own TCP segment
    (TCP_NODELAY on both legs), both ways."""
    from fault_proxy import FaultProxy

    invariant.expect_no_warning()
    uid = generate_uid()
    slicer = FaultProxy((HOST, catalogue_node.port), slice_size=1, slice_interval=0.0002)
    with slicer as proxy, RawPeer(HOST, proxy.port) as peer:
        assert _exchange(peer, uid, peer.send) == NORMAL_ANSWERS
    PEERS.extend(proxy.upstream_addresses)  # the node saw the proxy: no WARNING for it
    invariant.acknowledged(uid)
    assert uid in catalogue_node.uids()


def test_mp_36_pdu_split_at_every_offset_of_the_header(catalogue_node, invariant):
    """Writes cut inside the 6-byte header and the fixed part, byte by byte."""
    invariant.expect_no_warning()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send_slowly(RQ[:80], chunk=1, interval=0.001)
        peer.send(RQ[80:])
        assert peer.recv_pdu(WITHIN)[0] == 0x02
        peer.send_slowly(C_ECHO_PDATA, chunk=1, interval=0.001)
        assert parse_command_status(peer.recv_pdu_bytes(WITHIN)) == 0
        peer.send(release_rq())
        peer.expect(release_rp(), WITHIN)


# --------------------------------------------------------------------------------------
# MP-37 at layer I: mutated frames against the live node
# --------------------------------------------------------------------------------------
def _mutations(seed: int, count: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    frames = [RQ, associate_rq(contexts=STORE_CONTEXTS, user_items=item(0x55, b"CATALOGUE"))]
    out: dict[str, bytes] = {}
    for n in range(count):
        frame = bytearray(rng.choice(frames))
        kind = rng.choice(["flip", "insert", "delete", "length"])
        at = rng.randrange(len(frame))
        if kind == "flip":
            frame[at] ^= 1 << rng.randrange(8)
        elif kind == "insert":
            frame[at:at] = bytes([rng.randrange(256)])
        elif kind == "delete":
            del frame[at]
        else:  # an item length field (2 bytes) or the PDU length set to an edge value
            frame[at : at + 2] = rng.choice([0, 1, 0xFFFF, rng.randrange(0x10000)]).to_bytes(
                2, "big"
            )
        out[f"{n}-{kind}@{at}"] = bytes(frame)
    return out


def test_mp_37_mutated_associate_requests_get_a_standard_answer(catalogue_node, invariant):
    """40 seeded mutations of valid A-ASSOCIATE-RQs (full property test: 500+ examples in
    tests/unit/test_pdu_properties.py): each gets an AC, an RJ, ABORT-1 or a close
    (deadline: a length grown past the bytes sent waits for the rest until ARTIM), and
    the node keeps serving."""
    invariant.allow_warning()
    peers = {}
    try:
        for name, frame in _mutations(seed=37, count=40).items():
            peers[name] = RawPeer(HOST, catalogue_node.port).connect()
            peers[name].try_send(frame)
        for name, peer in peers.items():
            try:
                pdu_type, body = peer.recv_pdu(WITHIN)
            except AssertionError:
                peer.expect_close(WITHIN)  # closed without a PDU: Sta2 ARTIM (AA-2)
                continue
            frame = pdu(pdu_type, body)
            if pdu_type == 0x02:
                peer.try_send(release_rq())
            else:
                assert pdu_type == 0x03 or frame == ABORT_1, f"{name}: {frame.hex(' ')}"
            with_close = peer.expect_close if pdu_type != 0x02 else None
            if with_close is not None:
                with_close(WITHIN)
    finally:
        for peer in peers.values():
            peer.close()


# --------------------------------------------------------------------------------------
# MP-38: no assert-based validation
# --------------------------------------------------------------------------------------
def test_mp_38_protocol_unit_suite_passes_under_python_O(tmp_path):
    """The byte-level unit tests (PDUs, items, framing, state machine, connection,
    negotiation, DIMSE) pass with ``python -O`` too (asserts stripped), so no validation
    depends on ``assert``. Hypothesis at its dev profile here (100 examples); the ci
    profile runs them at 500 in the normal run."""
    root = Path(__file__).resolve().parents[3]
    files = [
        "tests/unit/test_pdu.py",
        "tests/unit/test_items.py",
        "tests/unit/test_framing.py",
        "tests/unit/test_fsm.py",
        "tests/unit/test_connection.py",
        "tests/unit/test_acse.py",
        "tests/unit/test_dimse.py",
    ]
    env = {**os.environ, "HYPOTHESIS_PROFILE": "dev", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
