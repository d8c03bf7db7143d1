"""Association limits hold node-wide across listener processes (DESIGN §3 last paragraph):
with 2 listeners on one port (SO_REUSEPORT), max_associations = 3 admits 3 at once
(was 1 per listener, 2 in all) and refuses the 4th with (2, 3, 2); the per-calling-AE
limit likewise; a SIGKILLed listener's associations are forgotten when it restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator

import pytest
from ingest_support import HOST
from security_support import SecureNode, wait_for

from protocol.errors import AssociationRejected
from protocol.net import Association, ContextRequest, Timeouts, associate
from protocol.uids import IMPLICIT_VR_LE, VERIFICATION
from router.admission import SharedAdmission, admission_path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNode]:
    node = SecureNode(
        tmp_path_factory.mktemp("limits"),
        env={
            "DICOM_ROUTER_LISTENER_PROCESSES": "2",
            "DICOM_ROUTER_LISTENER_MAX_ASSOCIATIONS": "3",
            "DICOM_ROUTER_LISTENER_MAX_ASSOCIATIONS_PER_CALLING_AE": "2",
        },
    )
    node.serve(workers=0, listeners=2)
    yield node
    node.kill()


async def _open(port: int, calling_ae: str) -> Association:
    return await associate(
        HOST,
        port,
        [ContextRequest(VERIFICATION, (IMPLICIT_VR_LE,))],
        called_ae="ROUTER",
        calling_ae=calling_ae,
        timeouts=Timeouts(connect=10, acse=10, dimse=10),
    )


async def _refused(port: int, calling_ae: str) -> tuple[int, int, int]:
    with pytest.raises(AssociationRejected) as refused:
        await _open(port, calling_ae)
    return refused.value.result, refused.value.source, refused.value.reason


def _counts(node: SecureNode) -> tuple[int, dict[str, int]]:
    shared = SharedAdmission(admission_path(node.data), rows=2, index=0, max_total=3, max_per_ae=2)
    try:
        return shared.counts()
    finally:
        shared.close()


async def _release(*associations: Association) -> None:
    for association in associations:
        assert await association.send_c_echo() == 0
        await association.release()


def test_the_limits_hold_across_two_listeners(node: SecureNode) -> None:
    async def run() -> None:
        a1, a2 = await _open(node.port, "A"), await _open(node.port, "A")
        # Per calling AE, node-wide: a third from A is refused whichever listener gets it.
        for _ in range(4):
            assert await _refused(node.port, "A") == (2, 3, 2)
        b1 = await _open(node.port, "B")
        assert _counts(node) == (3, {"A": 2, "B": 1})
        # Total, node-wide: 3 open, every further one refused (several tries, so that
        # both listeners are asked).
        for _ in range(6):
            assert await _refused(node.port, "C") == (2, 3, 2)
        await _release(a1)
        c1 = await _open(node.port, "C")
        await _release(a2, b1, c1)
        assert wait_for(lambda: _counts(node) == (0, {}), 10)

    asyncio.run(run())


def test_a_killed_listener_gives_its_associations_back(node: SecureNode) -> None:
    async def hold() -> list[Association]:
        return [await _open(node.port, ae) for ae in ("A", "B", "C")]

    loop = asyncio.new_event_loop()
    try:
        held = loop.run_until_complete(hold())
        assert _counts(node)[0] == 3
        listeners = _listener_pids(node)
        assert len(listeners) == 2
        for pid in listeners:
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: len(set(_listener_pids(node)) - set(listeners)) == 2, 60)
        assert wait_for(lambda: _counts(node)[0] == 0, 30), _counts(node)
        for association in held:
            association.abort()

        async def again() -> None:
            await _release(*[await _open(node.port, ae) for ae in ("A", "B", "D")])

        deadline = loop.time() + 30
        while True:  # the restarted listeners bind again
            try:
                loop.run_until_complete(again())
                break
            except (OSError, AssociationRejected):
                if loop.time() > deadline:
                    raise
                loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        loop.close()


def _listener_pids(node: SecureNode) -> list[int]:
    """The listeners' pids as the supervisor records them (router/status.py)."""
    from router.status import status_path

    try:
        state = json.loads(status_path(node.data).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    children = state.get("children", {})
    return [int(c["pid"]) for name, c in children.items() if name.startswith("listener-")]
