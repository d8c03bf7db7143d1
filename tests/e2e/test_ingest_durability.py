"""FI-01 end to end: SIGKILL ``dicom-router serve`` at random points while instances
arrive; no acknowledged instance is ever lost, and the start-up recovery leaves the spool
and the database agreeing (DESIGN §3 step 1; research/reliability-catalogue.md B.7).

The corpus has the issue's size (500 instances); the kills are seeded, so a failing run
can be repeated. Our own client sends (two associations at once, so group commits of
several instances are in flight at a kill) and records exactly which SOP Instance UIDs
got a success status; after each kill ``serve`` is restarted and what was not
acknowledged is sent again.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pydicom
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

CORPUS_SIZE = 500
KILLS = 4
SEED = 20261124
SENDERS = 2


@pytest.fixture(scope="session")
def corpus() -> dict[str, bytes]:
    """SOP Instance UID -> the encoded dataset (CT, Explicit VR Little Endian)."""
    out = {}
    for _ in range(CORPUS_SIZE):
        ds = make_dataset("CT")
        out[ds.SOPInstanceUID] = encode_dataset(ds, EXPLICIT_LE)
    return out


async def _send_round(
    node: NodeUnderTest,
    corpus: dict[str, bytes],
    pending: list[str],
    acknowledged: set[str],
    refusals: list[tuple[str, int]],
    kill_after: int | None,
    rng: random.Random,
) -> bool:
    """Send ``pending`` over SENDERS associations; with ``kill_after``, SIGKILL serve a
    random few milliseconds after that many new success statuses. Returns whether it
    killed. A connection lost after the kill ends a sender; before it, it is a failure."""
    loop = asyncio.get_running_loop()
    work: Iterator[str] = iter(pending)
    state = {"new": 0, "killed": False}

    def maybe_kill() -> None:
        if kill_after is not None and not state["killed"] and state["new"] >= kill_after:
            state["killed"] = True
            loop.call_later(rng.uniform(0.0, 0.004), node.signal, signal.SIGKILL)

    async def sender() -> None:
        try:
            async with open_association(node.port, dimse_timeout=30) as assoc:
                for uid in work:  # shared: each instance is taken by one sender
                    rsp = await assoc.send_c_store(corpus[uid], CT_IMAGE, uid, EXPLICIT_LE)
                    if rsp.status == SUCCESS:
                        acknowledged.add(uid)
                        state["new"] += 1
                        maybe_kill()
                    else:
                        refusals.append((uid, rsp.status))
        except (ProtocolError, OSError, TimeoutError):
            if not state["killed"]:
                raise

    await asyncio.gather(*(sender() for _ in range(SENDERS)))
    return bool(state["killed"])


def _assert_acknowledged_are_recorded(node: NodeUnderTest, acknowledged: set[str]) -> None:
    recorded = set(node.by_uid())
    lost = acknowledged - recorded
    assert not lost, f"{len(lost)} acknowledged instances have no row: {sorted(lost)[:5]}"
    node.assert_spool_matches_database()


def test_fi01_sigkill_at_random_points_loses_no_acknowledged_instance(
    router_node: NodeFactory, corpus: dict[str, bytes]
) -> None:
    rng = random.Random(SEED)
    node = router_node()
    node.start()
    acknowledged: set[str] = set()
    refusals: list[tuple[str, int]] = []
    kills = 0
    pending = list(corpus)
    for _ in range(KILLS + 3):  # bounded: KILLS interrupted rounds, then the rest
        if not pending:
            break
        kill_after = rng.randint(10, 100) if kills < KILLS else None
        killed = asyncio.run(
            _send_round(node, corpus, pending, acknowledged, refusals, kill_after, rng)
        )
        if killed:
            kills += 1
            node.kill()
            node.start()  # start-up recovery: temp files and files without rows go
            _assert_acknowledged_are_recorded(node, acknowledged)
        pending = [uid for uid in corpus if uid not in acknowledged]
    assert kills == KILLS, f"only {kills} kills landed while sending"
    assert not refusals, f"refused while serve was up: {refusals[:5]}"
    assert pending == [], f"{len(pending)} instances never acknowledged"
    assert node.stop() == 0, node.log()

    _assert_acknowledged_are_recorded(node, acknowledged)
    rows = node.by_uid()
    assert set(rows) == set(corpus)
    for uid, instance_rows in rows.items():
        # A resend of an instance committed before the kill (its answer lost) is a
        # duplicate with the same bytes and pending jobs: no second row (DESIGN §3.1).
        assert len(instance_rows) == 1, instance_rows
        row = instance_rows[0]
        assert row["destinations"] == EXPECTED_DESTINATIONS["CT"], row
        path = node.store_dir / str(row["spool_name"])
        data = path.read_bytes()
        assert data.endswith(corpus[uid]), f"{path}: dataset bytes differ from what was sent"
        assert pydicom.dcmread(path).SOPInstanceUID == uid
