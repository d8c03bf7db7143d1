"""Rejections, releases and aborts as the peers see them (PS3.8 7.1-7.3, 9.3.4, 9.3.8).

RJ codes are (result, source, reason) per PS3.8 Table 9-21 (catalogue B.0).
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from interop_support import (
    HOST,
    describe,
    echo_status,
    make_case,
    pynetdicom_state,
    recv_until_closed,
    require_dcmtk,
    run_bounded,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_associate(port: int, contexts: list[str], **kwargs):
    from pynetdicom import AE

    ae = AE(ae_title=kwargs.pop("calling_ae", "PYSCU"))
    ae.acse_timeout = 10
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae.associate(HOST, port, **kwargs)


def _rj(assoc) -> tuple[int, int, int]:
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


# --------------------------------------------------------------------------------------
# wrong called AE title
# --------------------------------------------------------------------------------------
def test_wrong_called_aet_dcmtk_storescu_reports_called_ae_not_recognized(run_app, tmp_path):
    storescu = require_dcmtk("storescu")["storescu"]
    original = make_case("ct_implicit_le", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    scp = run_app("storescp", "-aet", "GOODSCP", "--require-called-aet", "-od", str(out))
    result = run_bounded(
        [storescu, "-aec", "WRONGSCP", HOST, str(scp.port), str(original)], timeout=60
    )
    assert result.returncode != 0, describe(result)
    output = result.stdout + result.stderr
    assert "Association Rejected" in output, describe(result)
    assert "Result: Rejected Permanent, Source: Service User" in output, describe(result)
    assert "Reason: Called AE Title Not Recognized" in output, describe(result)
    assert list(out.iterdir()) == []
    # The right title is accepted by the same server.
    result = run_bounded(
        [storescu, "-aec", "GOODSCP", HOST, str(scp.port), str(original)], timeout=60
    )
    assert result.returncode == 0, describe(result)


def test_wrong_called_aet_pynetdicom_sees_rj_1_1_7_and_server_logs_it(run_app):
    scp = run_app("storescp", "-aet", "GOODSCP", "--require-called-aet", "--ignore")
    assoc = _pynetdicom_associate(scp.port, [VERIFICATION], ae_title="WRONGSCP")
    assert assoc.is_rejected
    assert not assoc.is_established
    assert _rj(assoc) == (1, 1, 7)
    log = scp.wait_for_stderr(lambda text: "rejected" in text)
    assert "rejected" in log and "WRONGSCP" in log, log

    assoc = _pynetdicom_associate(scp.port, [VERIFICATION], ae_title="GOODSCP")
    assert assoc.is_established
    assoc.release()


def test_without_require_called_aet_any_called_title_is_accepted(run_app):
    scp = run_app("storescp", "-aet", "GOODSCP", "--ignore")
    assoc = _pynetdicom_associate(scp.port, [VERIFICATION], ae_title="ANYTHING")
    assert assoc.is_established
    assoc.release()


# --------------------------------------------------------------------------------------
# unsupported abstract syntax
# --------------------------------------------------------------------------------------
def test_echoscp_rejects_storage_context_with_result_3_keeps_verification(run_app):
    scp = run_app("echoscp")
    assoc = _pynetdicom_associate(scp.port, [VERIFICATION, CT_IMAGE])
    try:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert accepted == {VERIFICATION}
        assert rejected == {CT_IMAGE: 0x03}  # abstract-syntax-not-supported
        assert echo_status(assoc) == 0x0000, pynetdicom_state(assoc)
    finally:
        assoc.release()


def test_echoscp_storage_only_proposal_gets_no_accepted_context(run_app):
    scp = run_app("echoscp")
    assoc = _pynetdicom_associate(scp.port, [CT_IMAGE])
    assert not assoc.is_established
    # Our echoscp answers A-ASSOCIATE-AC with the context rejected (result 3);
    # pynetdicom then finds no accepted context and aborts.
    assert assoc.is_aborted, "expected an AC with no accepted context, not an RJ"
    assert [(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts] == [(CT_IMAGE, 0x03)]
    assert scp.proc.poll() is None


def test_dcmtk_storescu_to_our_echoscp_reports_no_acceptable_context(run_app, tmp_path):
    storescu = require_dcmtk("storescu")["storescu"]
    original = make_case("ct_implicit_le", tmp_path / "src")
    scp = run_app("echoscp")
    result = run_bounded([storescu, HOST, str(scp.port), str(original)], timeout=60)
    assert result.returncode != 0, describe(result)
    assert "No Acceptable Presentation Contexts" in result.stdout + result.stderr, describe(result)


def test_our_storescu_to_our_echoscp_exits_1_naming_no_accepted_context(
    run_app, call_app, tmp_path
):
    original = make_case("ct_implicit_le", tmp_path / "src")
    scp = run_app("echoscp")
    result = call_app("storescu", HOST, str(scp.port), str(original), timeout=60)
    assert result.returncode == 1, describe(result)
    assert "presentation context" in result.stderr.lower(), describe(result)


# --------------------------------------------------------------------------------------
# association limit (catalogue RX-04)
# --------------------------------------------------------------------------------------
def test_rx04_max_associations_1_second_gets_rj_2_3_2_then_room_again(run_app):
    scp = run_app("storescp", "--max-associations", "1", "--ignore")
    first = _pynetdicom_associate(scp.port, [VERIFICATION], calling_ae="FIRST")
    assert first.is_established
    try:
        second = _pynetdicom_associate(scp.port, [VERIFICATION], calling_ae="SECOND")
        # (what it became instead, and what the SCP logged: one CI run saw no reject)
        assert second.is_rejected, (pynetdicom_state(second), scp.stderr())
        assert _rj(second) == (2, 3, 2)  # transient, presentation provider, local limit
        assert echo_status(first) == 0x0000, pynetdicom_state(first)
    finally:
        first.release()
    # After the release the slot is free again (within a second, RX-04).
    deadline = time.monotonic() + 5
    while True:
        third = _pynetdicom_associate(scp.port, [VERIFICATION], calling_ae="THIRD")
        if third.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert third.is_established
    third.release()


def test_rx04_dcmtk_echoscu_reports_local_limit_exceeded(run_app):
    echoscu = require_dcmtk("echoscu")["echoscu"]
    scp = run_app("echoscp", "--max-associations", "1")
    first = _pynetdicom_associate(scp.port, [VERIFICATION])
    assert first.is_established
    try:
        result = run_bounded([echoscu, HOST, str(scp.port)], timeout=60)
    finally:
        first.release()
    assert result.returncode != 0, describe(result)
    output = result.stdout + result.stderr
    assert "Association Rejected" in output, describe(result)
    assert "Rejected Transient" in output, describe(result)
    assert "Local Limit Exceeded" in output, describe(result)


# --------------------------------------------------------------------------------------
# our client rejected by pynetdicom
# --------------------------------------------------------------------------------------
def test_our_associate_raises_association_rejected_1_1_7_from_pynetdicom(pynetdicom_scp):
    from protocol.errors import AssociationRejected
    from protocol.net import ContextRequest, associate
    from protocol.uids import IMPLICIT_VR_LE

    scp = pynetdicom_scp(ae_title="GOODSCP", require_called_aet=True)

    async def scenario() -> None:
        await associate(
            HOST,
            scp.port,
            [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))],
            called_ae="WRONGSCP",
        )

    with pytest.raises(AssociationRejected) as info:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert (info.value.result, info.value.source, info.value.reason) == (1, 1, 7)
    assert "called-AE-title-not-recognized" in str(info.value)


def test_our_echoscu_rejected_by_pynetdicom_exits_1_with_reason(call_app, pynetdicom_scp):
    scp = pynetdicom_scp(ae_title="GOODSCP", require_called_aet=True)
    result = call_app("echoscu", "-aec", "WRONGSCP", HOST, str(scp.port), timeout=60)
    assert result.returncode == 1, describe(result)
    assert "rejected" in result.stderr and "reason 7" in result.stderr, describe(result)


def test_our_associate_raises_association_rejected_2_3_2_at_pynetdicom_limit(pynetdicom_scp):
    from protocol.errors import AssociationRejected
    from protocol.net import ContextRequest, associate
    from protocol.uids import IMPLICIT_VR_LE

    scp = pynetdicom_scp(maximum_associations=1)
    hold = _pynetdicom_associate(scp.port, [VERIFICATION])
    assert hold.is_established

    async def scenario() -> None:
        await associate(HOST, scp.port, [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))])

    try:
        with pytest.raises(AssociationRejected) as info:
            asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        hold.release()
    assert (info.value.result, info.value.source, info.value.reason) == (2, 3, 2)


# --------------------------------------------------------------------------------------
# release and abort
# --------------------------------------------------------------------------------------
def test_pynetdicom_release_from_our_storescp_is_confirmed(run_app):
    scp = run_app("storescp", "--ignore")
    assoc = _pynetdicom_associate(scp.port, [VERIFICATION])
    assert assoc.is_established
    assoc.release()
    assert assoc.is_released
    assert not assoc.is_aborted


def test_pynetdicom_peer_abort_leaves_our_storescp_serving(run_app, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    scp = run_app("storescp", "-od", str(out))
    for _ in range(3):
        assoc = _pynetdicom_associate(scp.port, [VERIFICATION, CT_IMAGE])
        assert assoc.is_established
        assert echo_status(assoc) == 0x0000, pynetdicom_state(assoc)
        assoc.abort()
        assert assoc.is_aborted
    assoc = _pynetdicom_associate(scp.port, [VERIFICATION])
    assert assoc.is_established
    assert echo_status(assoc) == 0x0000, pynetdicom_state(assoc)
    assoc.release()
    assert scp.proc.poll() is None
    assert list(out.iterdir()) == []


def test_our_async_abort_is_seen_by_dcmtk_storescp(dcmtk_storescp):
    from protocol.net import ContextRequest, associate
    from protocol.uids import IMPLICIT_VR_LE

    scp = dcmtk_storescp("-v")

    async def scenario() -> None:
        assoc = await associate(HOST, scp.port, [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))])
        assert await assoc.send_c_echo() == 0
        assoc.abort()
        await asyncio.wait_for(assoc.wait_closed(), 10)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    log = scp.wait_for_stderr(lambda text: "Association Aborted" in text)
    log += scp.stdout()
    assert "Association Aborted" in log, log
    assert "Association Release" not in log, log


def test_our_async_release_is_seen_by_dcmtk_storescp(dcmtk_storescp):
    from protocol.net import ContextRequest, associate
    from protocol.uids import IMPLICIT_VR_LE

    scp = dcmtk_storescp("-v")

    async def scenario() -> None:
        assoc = await associate(HOST, scp.port, [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))])
        assert await assoc.send_c_echo() == 0
        await assoc.release()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    deadline = time.monotonic() + 10
    while "Association Release" not in scp.stdout() + scp.stderr():
        assert time.monotonic() < deadline, scp.stdout() + scp.stderr()
        time.sleep(0.05)


def test_pynetdicom_scp_abort_during_echo_raises_association_aborted_in_our_client():
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from protocol.errors import AssociationAborted, ConnectionClosed
    from protocol.net import ContextRequest, associate
    from protocol.uids import IMPLICIT_VR_LE

    def abort_instead(event) -> int:
        event.assoc.abort()
        return 0x0000

    ae = AE(ae_title="ABORTER")
    ae.add_supported_context(Verification)
    server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, abort_instead)])
    try:
        port = server.server_address[1]

        async def scenario() -> None:
            assoc = await associate(HOST, port, [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))])
            await assoc.send_c_echo()

        with pytest.raises((AssociationAborted, ConnectionClosed)) as info:
            asyncio.run(asyncio.wait_for(scenario(), 30))
        # pynetdicom's assoc.abort() sends A-ABORT source 0 (service user).
        assert isinstance(info.value, AssociationAborted), info.value
        assert info.value.source == 0
    finally:
        server.shutdown()


# --------------------------------------------------------------------------------------
# ARTIM: a peer that connects and sends nothing (catalogue SM-13 / MP-09)
# --------------------------------------------------------------------------------------
def test_sm13_silent_peer_closed_by_artim_within_seconds(run_app):
    scp = run_app("storescp", "-ta", "1", "--ignore")
    started = time.monotonic()
    with socket.create_connection((HOST, scp.port), timeout=5) as sock:
        data, closed = recv_until_closed(sock, timeout=10)
    elapsed = time.monotonic() - started
    assert closed, "the silent connection was not closed within 10 s"
    assert elapsed < 4, f"closed after {elapsed:.1f} s with ARTIM 1 s"
    assert elapsed > 0.5, f"closed after {elapsed:.2f} s, before ARTIM could expire"
    # Closing without an A-ABORT is what AA-2 prescribes; an A-ABORT is tolerated.
    assert data in (b"", bytes.fromhex("07000000000400000000")), data.hex()
    # A well-behaved peer still gets served afterwards.
    assoc = _pynetdicom_associate(scp.port, [VERIFICATION])
    assert assoc.is_established
    assoc.release()


def test_mp09_silent_peer_does_not_block_a_concurrent_association(run_app):
    scp = run_app("storescp", "-ta", "1", "--ignore")
    with socket.create_connection((HOST, scp.port), timeout=5) as silent:
        assoc = _pynetdicom_associate(scp.port, [VERIFICATION])
        assert assoc.is_established
        assert echo_status(assoc) == 0x0000, pynetdicom_state(assoc)
        assoc.release()
        _, closed = recv_until_closed(silent, timeout=10)
    assert closed


# --------------------------------------------------------------------------------------
# SCP/SCU role selection (PS3.7 D.3.3.4) and user identity (PS3.7 D.3.3.7)
# --------------------------------------------------------------------------------------
class _AcceptAll:
    """A ServiceHandler that answers C-ECHO and C-STORE with success and stores nothing."""

    def on_echo(self, info) -> int:
        return 0x0000

    def on_store(self, info, request, transfer_syntax):
        from protocol.net import StoreOutcome

        return StoreOutcome(0x0000)


def _identity_server(identities: list, *, scp_role_sop_classes=frozenset()):
    from interop_support import InProcessServer

    from protocol.acse import AcceptorPolicy

    def check(identity):
        identities.append(identity)
        if identity.primary_field == b"alice" and identity.secondary_field == b"secret":
            return b""
        return False

    policy = AcceptorPolicy(
        ae_title="IDSCP",
        accept_any_abstract_syntax=True,
        accept_any_transfer_syntax=True,
        user_identity=check,
        scp_role_sop_classes=frozenset(scp_role_sop_classes),
    )
    return InProcessServer(_AcceptAll(), policy)


def _negotiation_items(username: bytes, password: bytes, *, scp_role: bool = True):
    from pynetdicom import build_role
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2  # username and passcode
    identity.primary_field = username
    identity.secondary_field = password
    identity.positive_response_requested = True
    return [build_role(CT_IMAGE, scu_role=True, scp_role=scp_role), identity]


def _reply_items(assoc):
    from pynetdicom.pdu_primitives import (
        SCP_SCU_RoleSelectionNegotiation,
        UserIdentityNegotiation,
    )

    items = assoc.acceptor.user_information
    roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in items
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
    }
    identities = [item for item in items if isinstance(item, UserIdentityNegotiation)]
    return roles, identities


def test_role_selection_grants_scu_only_and_user_identity_gets_positive_response():
    identities: list = []
    with _identity_server(identities) as server:
        assoc = _pynetdicom_associate(
            server.port,
            [VERIFICATION, CT_IMAGE],
            ae_title="IDSCP",
            ext_neg=_negotiation_items(b"alice", b"secret"),
        )
        try:
            assert assoc.is_established
            roles, replies = _reply_items(assoc)
            # SCU role as proposed; the SCP role is not granted (not in the policy).
            assert roles == {CT_IMAGE: (True, False)}
            assert len(replies) == 1
            # D.3.3.7.2: for username + passcode the server response is zero length.
            assert replies[0].server_response in (b"", None)
            assert echo_status(assoc) == 0x0000, pynetdicom_state(assoc)
        finally:
            assoc.release()
    assert len(identities) == 1
    seen = identities[0]
    assert (seen.identity_type, seen.positive_response_requested) == (2, True)
    assert (seen.primary_field, seen.secondary_field) == (b"alice", b"secret")


def test_role_selection_grants_scp_role_when_policy_allows():
    identities: list = []
    with _identity_server(identities, scp_role_sop_classes={CT_IMAGE}) as server:
        assoc = _pynetdicom_associate(
            server.port,
            [CT_IMAGE],
            ae_title="IDSCP",
            ext_neg=_negotiation_items(b"alice", b"secret"),
        )
        try:
            assert assoc.is_established
            roles, _ = _reply_items(assoc)
            assert roles == {CT_IMAGE: (True, True)}
        finally:
            assoc.release()


def test_user_identity_refused_by_hook_gets_rj_1_1_1():
    identities: list = []
    with _identity_server(identities) as server:
        assoc = _pynetdicom_associate(
            server.port,
            [VERIFICATION],
            ae_title="IDSCP",
            ext_neg=_negotiation_items(b"alice", b"wrong"),
        )
        assert assoc.is_rejected
        assert _rj(assoc) == (1, 1, 1)
    assert [i.secondary_field for i in identities] == [b"wrong"]
