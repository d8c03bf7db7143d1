"""Crash safety of forwarding with real processes (DESIGN §3.2-3.6): SIGKILL of a worker
mid-send, of the dispatcher, of the listener and of the supervisor (``serve``) at random
points while instances arrive and are forwarded; afterwards every acknowledged instance
has reached every destination at least once, and no job is left leased or dead.

Size in the test command: 1,000 instances and 20 SIGKILLs (7 of the worker, 5 of the
dispatcher, 6 of the listener, 2 of the supervisor, in a seeded random order at random
moments). On demand: ``DICOM_ROUTER_CRASH_INSTANCES`` and ``DICOM_ROUTER_CRASH_KILLS``
scale it up (the mix keeps its proportions); ``DICOM_ROUTER_CRASH_SEED`` repeats a
schedule (the seed is printed, and named in every failure message).

The machinery (the node, the destinations, the killer, the sender) is in
``crash_support.py``; at full size (200 kills of each process type during 10,000
instances) it runs as tests/soak/crash_suite.py. That children do not outlive a SIGKILLed
supervisor is catalogue FI-09, in tests/e2e/catalogue/test_b7_faults.py.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from crash_support import (
    DESTINATIONS,
    TARGETS,
    Node,
    StoreSCP,
    default_mix,
    run_crashes,
)

INSTANCES = int(os.environ.get("DICOM_ROUTER_CRASH_INSTANCES") or 1000)
KILLS = max(4, int(os.environ.get("DICOM_ROUTER_CRASH_KILLS") or 20))
SEED = int(os.environ.get("DICOM_ROUTER_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path, SEED)
    try:
        yield node
    finally:
        node.kill_all()


@pytest.fixture
def destinations(tmp_path: Path) -> Iterator[list[StoreSCP]]:
    scps = [StoreSCP(tmp_path, name) for name in DESTINATIONS]
    try:
        for scp in scps:
            scp.start()
        yield scps
    finally:
        for scp in scps:
            scp.stop()


def test_sigkills_during_forwarding_lose_no_acknowledged_instance(
    tmp_path: Path, node: Node, destinations: list[StoreSCP]
) -> None:
    print(f"\nseed {SEED}: {INSTANCES} instances, {KILLS} kills (DICOM_ROUTER_CRASH_SEED)")
    run = run_crashes(
        tmp_path,
        destinations,
        instances=INSTANCES,
        counts=default_mix(KILLS),
        seed=SEED,
        node=node,
    )
    print(run.report())
    run.check(set(TARGETS))
