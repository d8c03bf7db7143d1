"""Catalogue B.3, DIMSE / message-level violations, against a live ``dicom-router serve``.

Every case runs with the catalogue's ``invariant``. Policies where the catalogue leaves
a choice (documented in protocol/net/server.py and router/listener.py):

* an unusable command (DM-01, DM-03, DM-04, DM-05, DM-07, an unknown or unserved
  Command Field DM-02, a C-ECHO-RQ with a data set DM-11) is ABORT-U (A-ABORT source 0,
  reason 0): the message cannot be answered reliably, or is an operation we do not
  serve;
* a well-formed C-STORE-RQ that cannot be stored is answered with a failure status and
  the association goes on: no data set (DM-06) 0xC000, a SOP class other than the
  context's (DM-08) 0x0122, data set UIDs other than the command's (DM-09) 0xA900.

The byte-level assertions (layer U) are also in tests/unit/test_dimse.py (DM-04..07).
"""

from __future__ import annotations

import struct

import pytest
from harness import (
    ABORT_U,
    COMMAND,
    COMMAND_LAST,
    CT_IMAGE,
    DATASET_LAST,
    DATASET_MORE,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    VERIFICATION,
    RawPeer,
    c_store_rq,
    command_set,
    dataset_bytes,
    p_data_tf,
    parse_command_status,
    pdv,
    store_pdata,
)
from pydicom.uid import generate_uid

from tests.e2e.catalogue.conftest import ARTIM

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Verification on 1, CT Image Storage on 3, MR Image Storage on 5.
CONTEXTS = (
    (1, VERIFICATION, (IMPLICIT_LE,)),
    (3, CT_IMAGE, (EXPLICIT_LE,)),
    (5, MR_IMAGE, (EXPLICIT_LE,)),
)
CLOSE_WITHIN = ARTIM + 10
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
DATASET_DOES_NOT_MATCH = 0xA900


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\x00" * (len(raw) % 2)


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def store_command(uid: str, **changes: bytes | None) -> bytes:
    """A C-STORE-RQ command set with elements replaced (bytes) or left out (None),
    keyed by ``e0002`` style names (the element number in group 0000)."""
    elements = {
        0x0002: _ui(CT_IMAGE),
        0x0100: _us(0x0001),
        0x0110: _us(1),
        0x0700: _us(0),
        0x0800: _us(0x0000),
        0x1000: _ui(uid),
    }
    for name, value in changes.items():
        tag = int(name[1:], 16)
        if value is None:
            elements.pop(tag, None)
        else:
            elements[tag] = value
    return command_set(elements.items())


def _store_response(peer: RawPeer) -> int | None:
    pdu_type, body = peer.recv_pdu()
    assert pdu_type == 0x04, f"expected a C-STORE-RSP, got PDU type {pdu_type:#04x}"
    return parse_command_status(bytes([4, 0]) + len(body).to_bytes(4, "big") + body)


def _abort_u_for(catalogue_node, *frames: bytes) -> None:
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send_all(frames)
        peer.expect_abort_and_close(ABORT_U, within=CLOSE_WITHIN)


# --------------------------------------------------------------------------------------
# undecodable or out-of-order commands: ABORT-U
# --------------------------------------------------------------------------------------
def test_dm_01_command_set_without_command_field_is_abort_u(catalogue_node, invariant):
    uid = generate_uid()
    _abort_u_for(catalogue_node, p_data_tf(pdv(3, COMMAND_LAST, store_command(uid, e0100=None))))
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"DIMSE violation, aborting: .*\(0000,0100\) is missing")


@pytest.mark.parametrize(
    ("context_id", "command_field"),
    [pytest.param(1, 0x0FFF, id="unknown-0x0FFF"), pytest.param(3, 0x0020, id="C-FIND-on-CT")],
)
def test_dm_02_unknown_or_unserved_command_field_is_abort_u(
    catalogue_node, invariant, context_id, command_field
):
    command = command_set(
        [
            (0x0002, _ui(CT_IMAGE if context_id == 3 else VERIFICATION)),
            (0x0100, _us(command_field)),
            (0x0110, _us(1)),
            (0x0800, _us(0x0101)),
        ]
    )
    _abort_u_for(catalogue_node, p_data_tf(pdv(context_id, COMMAND_LAST, command)))
    invariant.expect_warning(rf"unsupported command field 0x{command_field:04X}")


def _explicit_vr_command(uid: str) -> bytes:
    def el(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH", 0, tag) + vr + struct.pack("<H", len(value)) + value

    body = (
        el(0x0002, b"UI", _ui(CT_IMAGE))
        + el(0x0100, b"US", _us(1))
        + el(0x0110, b"US", _us(1))
        + el(0x0800, b"US", _us(0))
        + el(0x1000, b"UI", _ui(uid))
    )
    return el(0x0000, b"UL", struct.pack("<I", len(body))) + body


@pytest.mark.parametrize("how", ["group-length-too-large", "group-length-too-small", "explicit"])
def test_dm_03_wrong_group_length_or_explicit_vr_command_is_abort_u(catalogue_node, invariant, how):
    uid = generate_uid()
    command = store_command(uid)
    if how == "explicit":
        command = _explicit_vr_command(uid)
    else:
        length = struct.unpack_from("<I", command, 8)[0] + (8 if how.endswith("large") else -8)
        command = command[:8] + struct.pack("<I", length) + command[12:]
    _abort_u_for(catalogue_node, p_data_tf(pdv(3, COMMAND_LAST, command)))
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"DIMSE violation, aborting")


def test_dm_04_data_set_fragment_before_any_command_is_abort_u(catalogue_node, invariant):
    _abort_u_for(catalogue_node, p_data_tf(pdv(3, DATASET_LAST, dataset_bytes(generate_uid()))))
    invariant.expect_warning(r"DIMSE violation, aborting: data set fragment before any command")


def test_dm_05_data_set_on_another_accepted_context_is_abort_u(catalogue_node, invariant):
    """Command on context 3 (CT), its data set on context 5 (MR, also accepted)."""
    uid = generate_uid()
    command, *fragments = store_pdata(3, 1, CT_IMAGE, uid, dataset_bytes(uid))
    moved = [p_data_tf(pdv(5, f[11], f[12:])) for f in fragments]  # same PDVs, context 5
    _abort_u_for(catalogue_node, command, *moved)
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"DIMSE violation, aborting: .*context")


def test_dm_06_c_store_rq_announcing_no_data_set_is_answered_0xc000(catalogue_node, invariant):
    """No zero-byte instance: the C-STORE-RQ with CommandDataSetType 0x0101 is refused
    with a failure status and the association goes on (an echo, then a release)."""
    uid = generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        command = c_store_rq(1, CT_IMAGE, uid, has_dataset=False)
        peer.send(p_data_tf(pdv(3, COMMAND_LAST, command)))
        assert _store_response(peer) == CANNOT_UNDERSTAND
        assert peer.echo(2) == SUCCESS
        peer.release()
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"C-STORE answered 0xC000: C-STORE-RQ without a data set")


def test_dm_06_new_command_where_the_announced_data_set_should_be_is_abort_u(
    catalogue_node, invariant
):
    first, second = generate_uid(), generate_uid()
    _abort_u_for(
        catalogue_node,
        p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, first))),
        p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(2, CT_IMAGE, second))),
    )
    assert not {first, second} & catalogue_node.uids()
    invariant.expect_warning(r"DIMSE violation, aborting")


def test_dm_07_command_fragments_never_last_are_capped_then_abort_u(catalogue_node, invariant):
    """Non-last command PDVs of 16 000 bytes: past the 64 KiB command-set cap
    (protocol/limits.py) the listener aborts; we stop at 1 MiB (scaled down from the
    catalogue's 1 GB: the cap is what is tested, the length past it does not matter)."""
    chunk = p_data_tf(pdv(3, COMMAND, b"\x00" * 16000))
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        sent = 0
        while sent < (1 << 20) and peer.try_send(chunk):
            sent += len(chunk)
            if sent > 4 * 65536:
                break
        peer.expect_abort_and_close(ABORT_U, within=CLOSE_WITHIN)
    invariant.expect_warning(r"DIMSE violation, aborting: command set exceeds")


def test_dm_11_c_echo_rq_with_a_data_set_is_abort_u(catalogue_node, invariant):
    command = command_set(
        [(0x0002, _ui(VERIFICATION)), (0x0100, _us(0x0030)), (0x0110, _us(1)), (0x0800, _us(0))]
    )
    _abort_u_for(
        catalogue_node,
        p_data_tf(pdv(1, COMMAND_LAST, command)),
        p_data_tf(pdv(1, DATASET_LAST, b"\x08\x00\x60\x00\x02\x00\x00\x00CT")),
    )
    invariant.expect_warning(r"DIMSE violation, aborting: C-ECHO-RQ with a data set")


# --------------------------------------------------------------------------------------
# well-formed but unstorable: a failure status, the association goes on
# --------------------------------------------------------------------------------------
def _store(peer: RawPeer, command: bytes, dataset: bytes, context_id: int = 3) -> int | None:
    frames = [p_data_tf(pdv(context_id, COMMAND_LAST, command))]
    for offset in range(0, len(dataset), 16000):
        last = offset + 16000 >= len(dataset)
        frames.append(
            p_data_tf(
                pdv(context_id, DATASET_LAST if last else DATASET_MORE, dataset[offset:][:16000])
            )
        )
    peer.send_all(frames)
    return _store_response(peer)


def test_dm_08_sop_class_other_than_the_contexts_is_answered_0x0122(catalogue_node, invariant):
    """An MR SOP class in a C-STORE-RQ on the CT context: 0x0122, nothing kept; the
    association keeps serving (an echo and a good store on it)."""
    uid, good = generate_uid(), generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        command = store_command(uid, e0002=_ui(MR_IMAGE))
        assert _store(peer, command, dataset_bytes(uid)) == SOP_CLASS_NOT_SUPPORTED
        assert peer.echo(2) == SUCCESS
        assert _store(peer, c_store_rq(3, CT_IMAGE, good), dataset_bytes(good)) == SUCCESS
        peer.release()
    assert uid not in catalogue_node.uids()
    invariant.acknowledged(good)
    invariant.expect_warning(r"C-STORE answered 0x0122")


def test_dm_09_affected_sop_instance_other_than_the_data_sets_is_answered_0xa900(
    catalogue_node, invariant
):
    """Never stored under one UID and routed under the other: no row for either."""
    in_command, in_dataset = generate_uid(), generate_uid()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        status = _store(peer, c_store_rq(1, CT_IMAGE, in_command), dataset_bytes(in_dataset))
        assert status == DATASET_DOES_NOT_MATCH
        assert peer.echo(2) == SUCCESS
        peer.release()
    assert not {in_command, in_dataset} & catalogue_node.uids()
    invariant.expect_warning(r"C-STORE answered 0xA900: data set UIDs differ")


# --------------------------------------------------------------------------------------
# P2: tolerated oddities
# --------------------------------------------------------------------------------------
def test_dm_10_odd_priority_reused_message_id_and_move_originator_are_tolerated(
    catalogue_node, invariant
):
    """Priority 0x0007, the same Message ID twice and C-MOVE originator fields on a
    plain C-STORE: each stored and answered with success."""
    uids = [generate_uid() for _ in range(3)]
    commands = [
        store_command(uids[0], e0700=_us(0x0007)),
        store_command(uids[1]),  # Message ID 1 again
        store_command(uids[2], e1030=_ui("MOVESCU"), e1031=_us(7)),
    ]
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        for command, uid in zip(commands, uids, strict=True):
            assert _store(peer, command, dataset_bytes(uid)) == SUCCESS
        peer.release()
    assert set(uids) <= catalogue_node.uids()
    for uid in uids:
        invariant.acknowledged(uid)
    invariant.expect_no_warning()  # CT is routed by the node's rules: no warning at all
