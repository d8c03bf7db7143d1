"""Catalogue B.7 FI-01 and FI-02 at named places (router/failpoints.py): the listener
kills itself at each durability boundary while storing one instance.

Before the database commit (FI-01): the sender gets no success; after a restart there is
no row, no temporary and no orphan file, and sending again succeeds. After the commit
(FI-02): the sender still gets no success (the response was never written); the
instance is recorded with its jobs, and the sender's re-send is acknowledged by the
duplicate rule (DESIGN §3.1) without a second set of jobs.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from ingest_support import (
    CT_IMAGE,
    EXPECTED_DESTINATIONS,
    EXPLICIT_LE,
    SUCCESS,
    encode_dataset,
    make_dataset,
    open_association,
)

from protocol.errors import ProtocolError

if TYPE_CHECKING:
    from conftest import NodeFactory, NodeUnderTest

BEFORE_COMMIT = (
    "listener.received_last_fragment",
    "listener.after_file_fsync",
    "listener.after_rename",
    "listener.after_dir_fsync",
)
AFTER_COMMIT = ("listener.after_db_commit", "listener.after_zmq_push")


async def _store(node: NodeUnderTest, uid: str, data: bytes) -> int | None:
    """The C-STORE status, or None when the association died without one."""
    try:
        async with open_association(node.port, dimse_timeout=20) as assoc:
            return (await assoc.send_c_store(data, CT_IMAGE, uid, EXPLICIT_LE)).status
    except (ProtocolError, OSError, TimeoutError):
        return None


def _killed_at(router_node: NodeFactory, failpoint: str) -> tuple[NodeUnderTest, str, bytes]:
    # The suite's nodes run without workers: after_zmq_push is the place where the
    # notice would have been pushed (after the commit, before the response).
    node = router_node(env={"DICOM_ROUTER_FAILPOINT": failpoint})
    node.start()
    ds = make_dataset("CT")
    uid, data = str(ds.SOPInstanceUID), encode_dataset(ds, EXPLICIT_LE)
    assert asyncio.run(_store(node, uid, data)) is None, node.log()[-2000:]
    node.stop()
    # Restart without the failpoint: the start-up recovery runs.
    node.env.pop("DICOM_ROUTER_FAILPOINT")
    node.start()
    return node, uid, data


@pytest.mark.parametrize("failpoint", BEFORE_COMMIT)
def test_fi01_killed_before_the_commit_leaves_nothing_and_a_resend_succeeds(
    router_node: NodeFactory, failpoint: str
) -> None:
    node, uid, data = _killed_at(router_node, failpoint)
    try:
        assert node.by_uid() == {}
        assert node.tmp_files() == [] and node.store_files() == set()
        assert asyncio.run(_store(node, uid, data)) == SUCCESS
        [row] = node.by_uid()[uid]
        assert row["destinations"] == EXPECTED_DESTINATIONS["CT"]
        node.assert_spool_matches_database()
    finally:
        node.stop()


@pytest.mark.parametrize("failpoint", AFTER_COMMIT)
def test_fi02_killed_after_the_commit_keeps_the_instance_and_the_resend_is_a_duplicate(
    router_node: NodeFactory, failpoint: str
) -> None:
    node, uid, data = _killed_at(router_node, failpoint)
    try:
        [row] = node.by_uid()[uid]
        assert row["destinations"] == EXPECTED_DESTINATIONS["CT"]
        assert row["job_states"] == ["pending"] * len(EXPECTED_DESTINATIONS["CT"])
        node.assert_spool_matches_database()
        assert asyncio.run(_store(node, uid, data)) == SUCCESS
        [again] = node.by_uid()[uid]  # same bytes, same pending jobs: no new row or job
        assert again == row
        node.assert_spool_matches_database()
    finally:
        node.stop()
