"""Every P0 and P1 case of the reliability catalogue (research/reliability-catalogue.md,
Part B) has a test named by its id, so the two read side by side (issue #6).

A test covers an id when its function name starts with ``test_<id>`` (``test_mp_01_...``,
any case, or after other ids: ``test_fi_11_fi_12_...``) or when a parametrized test
carries the id as (the start of) a pytest id or a string of its own (``"MP-05"``,
``"PT-03-dotdot"``). A case that cannot run here is still a test: one that skips with
its reason, or an ``xfail`` naming the bug. The table is the catalogue's (ids and
priorities are facts of that document; the project must not read it at run time).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

CASES: dict[str, str] = {
    # B.1 malformed PDUs
    "MP-01": "P0",
    "MP-02": "P0",
    "MP-03": "P0",
    "MP-04": "P0",
    "MP-05": "P0",
    "MP-06": "P0",
    "MP-07": "P1",
    "MP-08": "P0",
    "MP-09": "P0",
    "MP-10": "P0",
    "MP-11": "P0",
    "MP-12": "P1",
    "MP-13": "P0",
    "MP-14": "P1",
    "MP-16": "P1",
    "MP-17": "P1",
    "MP-18": "P1",
    "MP-19": "P1",
    "MP-20": "P0",
    "MP-21": "P1",
    "MP-22": "P1",
    "MP-23": "P1",
    "MP-24": "P0",
    "MP-25": "P1",
    "MP-26": "P0",
    "MP-27": "P1",
    "MP-28": "P0",
    "MP-29": "P1",
    "MP-30": "P0",
    "MP-31": "P0",
    "MP-32": "P0",
    "MP-34": "P1",
    "MP-35": "P1",
    "MP-36": "P0",
    "MP-37": "P0",
    "MP-38": "P1",
    # B.2 state-machine violations
    "SM-01": "P0",
    "SM-02": "P0",
    "SM-03": "P0",
    "SM-04": "P0",
    "SM-05": "P1",
    "SM-06": "P1",
    "SM-07": "P0",
    "SM-08": "P1",
    "SM-09": "P0",
    "SM-10": "P0",
    "SM-11": "P0",
    "SM-12": "P1",
    "SM-13": "P0",
    "SM-14": "P1",
    "SM-15": "P0",
    "SM-16": "P0",
    "SM-18": "P1",
    # B.3 DIMSE violations
    "DM-01": "P0",
    "DM-02": "P1",
    "DM-03": "P0",
    "DM-04": "P0",
    "DM-05": "P0",
    "DM-06": "P0",
    "DM-07": "P0",
    "DM-08": "P1",
    "DM-09": "P1",
    # B.4 resource exhaustion and slow peers
    "RX-01": "P0",
    "RX-02": "P0",
    "RX-03": "P1",
    "RX-04": "P0",
    "RX-05": "P1",
    "RX-06": "P0",
    "RX-07": "P0",
    "RX-08": "P0",
    "RX-09": "P0",
    "RX-10": "P1",
    "RX-12": "P1",
    "RX-13": "P0",
    "RX-14": "P1",
    "RX-15": "P0",
    "RX-16": "P0",
    "RX-17": "P1",
    "RX-18": "P0",
    # B.5 path traversal and file naming
    "PT-01": "P0",
    "PT-02": "P0",
    "PT-03": "P0",
    "PT-04": "P0",
    "PT-05": "P1",
    "PT-06": "P1",
    "PT-07": "P0",
    "PT-08": "P0",
    "PT-09": "P1",
    "PT-11": "P1",
    # B.6 bad data sets
    "DS-01": "P0",
    "DS-02": "P0",
    "DS-03": "P0",
    "DS-04": "P1",
    "DS-05": "P0",
    "DS-06": "P0",
    "DS-07": "P1",
    "DS-08": "P1",
    "DS-09": "P1",
    "DS-10": "P1",
    "DS-11": "P1",
    "DS-12": "P1",
    "DS-13": "P1",
    "DS-15": "P1",
    # B.7 crash and fault injection
    "FI-01": "P0",
    "FI-02": "P0",
    "FI-03": "P0",
    "FI-04": "P0",
    "FI-05": "P1",
    "FI-06": "P0",
    "FI-07": "P0",
    "FI-08": "P0",
    "FI-09": "P1",
    "FI-10": "P0",
    "FI-11": "P0",
    "FI-12": "P0",
    "FI-13": "P1",
    "FI-14": "P0",
    "FI-15": "P0",
    "FI-16": "P1",
    "FI-17": "P1",
    "FI-19": "P0",
    "FI-20": "P1",
    "FI-21": "P1",
    "FI-22": "P1",
    # B.8 destination behaviour
    "DST-01": "P0",
    "DST-02": "P0",
    "DST-03": "P0",
    "DST-04": "P0",
    "DST-05": "P0",
    "DST-06": "P0",
    "DST-07": "P1",
    "DST-08": "P0",
    "DST-09": "P0",
    "DST-10": "P0",
    "DST-11": "P0",
    "DST-12": "P0",
    "DST-13": "P0",
    "DST-14": "P1",
    "DST-15": "P0",
    "DST-16": "P0",
    "DST-17": "P1",
    "DST-18": "P0",
    # B.9 security
    "SEC-01": "P0",
    "SEC-02": "P0",
    "SEC-03": "P0",
    "SEC-04": "P1",
    "SEC-05": "P1",
    "SEC-06": "P0",
    "SEC-07": "P1",
    "SEC-08": "P1",
    "SEC-10": "P0",
    "SEC-11": "P1",
    "SEC-12": "P0",
    "SEC-13": "P0",
    "SEC-14": "P1",
    "SEC-15": "P0",
    "SEC-16": "P1",
    "SEC-17": "P0",
    "SEC-18": "P1",
    "SEC-19": "P1",
}

# Cases the catalogue lists twice, tested once under the other id.
COVERED_AS: dict[str, str] = {
    # The requestor's Sta5 with no A-ASSOCIATE-AC: the worker's ACSE timeout against a
    # destination that accepts the connection and never answers (test_b8's DST-03-no-ac).
    "SM-16": "DST-03",
}

# Cases tested by a test that predates the catalogue's names (its function name here).
TESTED_BY: dict[str, str] = {
    # The claim is one conditional UPDATE (SKIP LOCKED on PostgreSQL), on both databases.
    "FI-15": "test_two_processes_never_lease_the_same_job",
    # Worker host cut off (network namespaces) inside a PostgreSQL transaction.
    "FI-16": "test_a_worker_host_cut_off_inside_a_transaction_gives_back_its_jobs",
    # Partly: the worker host loses the node's ZeroMQ endpoint and the database together.
    "FI-17": "test_a_worker_host_cut_off_mid_run_gives_back_its_jobs_and_the_other_finishes",
    # Scaled down (20 kills, 1,000 instances); tests/soak/crash_suite.py is the full size.
    "FI-22": "test_sigkills_during_forwarding_lose_no_acknowledged_instance",
}


def _test_sources() -> str:
    own = Path(__file__).resolve()
    return "\n".join(
        path.read_text(encoding="utf-8")
        for path in sorted(TESTS.rglob("*.py"))
        if path.resolve() != own
    )


def _covered(case: str, sources: str) -> bool:
    name = case.replace("-", "_")
    # test_fi_11_fi_12_...: a test named by several ids covers each of them
    by_name = re.compile(rf"def test_(?:[a-z]+_[0-9]+_)*{name}(?![0-9])", re.IGNORECASE)
    by_id = re.compile(rf"[\"']{re.escape(case)}(?![0-9])")
    return bool(by_name.search(sources) or by_id.search(sources))


@pytest.fixture(scope="module")
def sources() -> str:
    return _test_sources()


def test_the_table_holds_every_section_of_the_catalogue() -> None:
    sections = {case.split("-")[0] for case in CASES}
    assert sections == {"MP", "SM", "DM", "RX", "PT", "DS", "FI", "DST", "SEC"}
    assert sum(p == "P0" for p in CASES.values()) == 96
    assert sum(p == "P1" for p in CASES.values()) == 64


@pytest.mark.parametrize("case", sorted(CASES))
def test_catalogue_case_has_a_test_named_by_its_id(case: str, sources: str) -> None:
    if case in TESTED_BY:
        assert f"def {TESTED_BY[case]}(" in sources, f"{case}: {TESTED_BY[case]} is gone"
        return
    tested_as = COVERED_AS.get(case, case)
    assert _covered(tested_as, sources), f"{case} ({CASES[case]}): no test named by this id"
