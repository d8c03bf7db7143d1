"""C-ECHO (PS3.7 9.1.5) in both directions between our apps/API and DCMTK and pynetdicom.

DCMTK has no echoscp; its storescp answers C-ECHO, so it is the DCMTK echo peer.
"""

from __future__ import annotations

import asyncio

from interop_support import (
    HOST,
    describe,
    echo_status,
    free_port,
    pynetdicom_state,
    require_dcmtk,
    run_bounded,
)


# --------------------------------------------------------------------------------------
# our echoscu -> peers
# --------------------------------------------------------------------------------------
def test_our_echoscu_to_dcmtk_storescp_exits_0(call_app, dcmtk_storescp):
    scp = dcmtk_storescp()
    result = call_app("echoscu", "-aec", "DCMTKSCP", HOST, str(scp.port), timeout=60)
    assert result.returncode == 0, describe(result)


def test_our_echoscu_to_pynetdicom_scp_exits_0_and_releases(call_app, pynetdicom_scp):
    scp = pynetdicom_scp()
    result = call_app("echoscu", "-aec", "PYNETDICOM", HOST, str(scp.port), timeout=60)
    assert result.returncode == 0, describe(result)
    assert scp.wait_for(lambda s: s.released == 1), "pynetdicom saw no A-RELEASE"
    assert scp.echoes == 1
    assert scp.aborted == 0


def test_our_echoscu_repeat_3_sends_three_echoes_on_one_association(call_app, pynetdicom_scp):
    scp = pynetdicom_scp()
    result = call_app("echoscu", "--repeat", "3", HOST, str(scp.port), timeout=60)
    assert result.returncode == 0, describe(result)
    assert scp.wait_for(lambda s: s.released == 1)
    assert scp.echoes == 3


def test_our_echoscu_abort_ends_with_a_abort_and_exits_0(call_app, pynetdicom_scp):
    scp = pynetdicom_scp()
    result = call_app("echoscu", "--abort", HOST, str(scp.port), timeout=60)
    assert result.returncode == 0, describe(result)
    assert scp.wait_for(lambda s: s.aborted == 1), "pynetdicom saw no A-ABORT"
    assert scp.echoes == 1
    assert scp.released == 0


def test_our_echoscu_abort_against_dcmtk_storescp_exits_0(call_app, dcmtk_storescp):
    scp = dcmtk_storescp()
    result = call_app("echoscu", "--abort", "--repeat", "2", HOST, str(scp.port), timeout=60)
    assert result.returncode == 0, describe(result)
    # DCMTK's storescp keeps serving after a peer abort.
    again = call_app("echoscu", HOST, str(scp.port), timeout=60)
    assert again.returncode == 0, describe(again)


def test_our_echoscu_exits_1_with_one_line_when_nothing_listens(call_app):
    result = call_app("echoscu", "-to", "5", HOST, str(free_port()), timeout=60)
    assert result.returncode == 1, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(result)


def test_our_echoscu_exits_nonzero_when_the_peer_answers_a_failure_status(call_app, pynetdicom_scp):
    scp = pynetdicom_scp(echo_status=0x0211)
    result = call_app("echoscu", "--repeat", "2", HOST, str(scp.port), timeout=60)
    assert result.returncode != 0, describe(result)
    assert "2 of 2" in result.stderr, describe(result)
    assert scp.wait_for(lambda s: s.released == 1), "the association is still released"


def test_our_echoscu_rejects_bad_arguments_with_usage_exit_2(call_app):
    result = call_app("echoscu", "--repeat", "x", HOST, "104", timeout=60)
    assert result.returncode == 2, describe(result)
    result = call_app("echoscu", HOST, "70000", timeout=60)
    assert result.returncode == 2, describe(result)
    result = call_app("echoscu", "-aet", "A" * 17, HOST, "104", timeout=60)
    assert result.returncode == 2, describe(result)


# --------------------------------------------------------------------------------------
# peers -> our echoscp / storescp
# --------------------------------------------------------------------------------------
def test_dcmtk_echoscu_to_our_echoscp_succeeds(run_app):
    echoscu = require_dcmtk("echoscu")["echoscu"]
    scp = run_app("echoscp")
    result = run_bounded([echoscu, "-aec", "ECHOSCP", HOST, str(scp.port)], timeout=60)
    assert result.returncode == 0, describe(result) + "\nserver stderr:\n" + scp.stderr()


def test_dcmtk_echoscu_repeat_3_to_our_echoscp_succeeds(run_app):
    echoscu = require_dcmtk("echoscu")["echoscu"]
    scp = run_app("echoscp")
    result = run_bounded([echoscu, "-v", "--repeat", "3", HOST, str(scp.port)], timeout=60)
    assert result.returncode == 0, describe(result)
    output = result.stdout + result.stderr
    assert output.count("Received Echo Response (Success)") == 3, output
    assert output.count("Requesting Association") == 1, output


def test_dcmtk_echoscu_abort_to_our_echoscp_succeeds_and_server_keeps_serving(run_app):
    echoscu = require_dcmtk("echoscu")["echoscu"]
    scp = run_app("echoscp")
    result = run_bounded([echoscu, "--abort", HOST, str(scp.port)], timeout=60)
    assert result.returncode == 0, describe(result)
    result = run_bounded([echoscu, HOST, str(scp.port)], timeout=60)
    assert result.returncode == 0, describe(result)
    assert scp.proc.poll() is None


def test_dcmtk_echoscu_to_our_storescp_succeeds(run_app, tmp_path):
    echoscu = require_dcmtk("echoscu")["echoscu"]
    out = tmp_path / "out"
    out.mkdir()
    scp = run_app("storescp", "-od", str(out))
    result = run_bounded([echoscu, "-aec", "STORESCP", HOST, str(scp.port)], timeout=60)
    assert result.returncode == 0, describe(result)
    assert list(out.iterdir()) == []


def test_pynetdicom_echo_repeat_3_to_our_echoscp_returns_success(run_app):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    scp = run_app("echoscp", "-d")
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, scp.port, ae_title="ECHOSCP")
    try:
        assert assoc.is_established
        for _ in range(3):
            status = echo_status(assoc)
            assert status == 0x0000, f"{pynetdicom_state(assoc)}\nserver:\n{scp.stderr()}"
    finally:
        assoc.release()
    assert assoc.is_released


def test_pynetdicom_echo_to_our_storescp_returns_success(run_app, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    scp = run_app("storescp", "--ignore")
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, scp.port, ae_title="STORESCP")
    try:
        assert assoc.is_established
        assert echo_status(assoc) == 0x0000, pynetdicom_state(assoc)
    finally:
        assoc.release()


def test_pynetdicom_echo_abort_to_our_echoscp_leaves_server_serving(run_app):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    scp = run_app("echoscp")
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    for _ in range(2):
        assoc = ae.associate(HOST, scp.port)
        assert assoc.is_established
        assert echo_status(assoc) == 0x0000, pynetdicom_state(assoc)
        assoc.abort()
        assert assoc.is_aborted
    assert scp.proc.poll() is None


# --------------------------------------------------------------------------------------
# our async API
# --------------------------------------------------------------------------------------
def test_async_associate_and_c_echo_against_dcmtk_storescp(dcmtk_storescp):
    from protocol.net import ContextRequest, associate
    from protocol.uids import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION

    scp = dcmtk_storescp()

    async def scenario() -> tuple[dict[int, tuple[str, str]], list[int]]:
        assoc = await associate(
            HOST,
            scp.port,
            [ContextRequest(VERIFICATION, (EXPLICIT_VR_LE, IMPLICIT_VR_LE))],
            called_ae="DCMTKSCP",
            calling_ae="ASYNCSCU",
        )
        try:
            statuses = [await assoc.send_c_echo() for _ in range(3)]
            contexts = dict(assoc.contexts)
        except BaseException:
            assoc.abort()
            raise
        await assoc.release()
        assert not assoc.is_alive
        return contexts, statuses

    contexts, statuses = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert statuses == [0, 0, 0]
    assert len(contexts) == 1
    ((abstract, transfer),) = contexts.values()
    assert abstract == VERIFICATION
    assert transfer in (EXPLICIT_VR_LE, IMPLICIT_VR_LE)


def test_async_associate_abort_against_dcmtk_storescp_closes(dcmtk_storescp):
    from protocol.net import ContextRequest, associate
    from protocol.uids import IMPLICIT_VR_LE, VERIFICATION

    scp = dcmtk_storescp()

    async def scenario() -> bool:
        assoc = await associate(HOST, scp.port, [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))])
        assert await assoc.send_c_echo() == 0
        assoc.abort()
        await asyncio.wait_for(assoc.wait_closed(), 10)
        return assoc.is_alive

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) is False
