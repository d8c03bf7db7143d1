"""Catalogue B.1, malformed PDUs, against a live ``dicom-router serve`` (layer I)."""

from __future__ import annotations

from harness import ABORT_1, HOST, RawPeer, abort_8


def test_mp_05_unknown_pdu_type_gets_abort_1(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.send(bytes.fromhex("08 00 00 00 00 04 00 00 00 00"))
        peer.expect_abort_and_close(ABORT_1)


def test_mp_30_pdv_length_1_gets_abort_8_6(catalogue_node, invariant):
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate()
        assert peer.echo() == 0
        peer.send(bytes.fromhex("04 00 00 00 00 05 00 00 00 01 01"))
        peer.expect_abort_and_close(abort_8(6))


def test_mp_36_ok(catalogue_node, invariant):
    invariant.expect_no_warning()
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate()
        assert peer.echo() == 0
        peer.release()
