"""How the dispatcher hands out suspect jobs (FI-08): a job some worker died holding goes
only to a worker that holds nothing else, that worker gets nothing more while it holds
it, and a waiting suspect makes one busy worker run empty so that it gets one."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

import pytest

from router.db.jobs import JobQueue, Leases
from router.dispatcher import Dispatcher, _Worker


def worker(held: Counter[str] | None) -> _Worker:
    return _Worker("w", None, 8, 0.0, cast(Any, None), held)


def suspect_lease(suspect: bool) -> Any:
    class Lease:
        pass

    lease = Lease()
    lease.suspect = suspect  # type: ignore[attr-defined]
    return lease


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher(cast(JobQueue, None), "ipc:///nonexistent")


KEY = (0, b"a")
OTHER = (0, b"b")


def test_an_idle_worker_may_take_a_suspect_alone_a_busy_one_skips_them(
    dispatcher: Dispatcher,
) -> None:
    assert dispatcher._mode(KEY, worker(Counter())) == "alone"
    assert dispatcher._mode(KEY, worker(Counter(pacs=2))) == "skip"


def test_a_worker_holding_a_suspect_gets_nothing_until_it_is_empty(
    dispatcher: Dispatcher,
) -> None:
    w = worker(Counter())
    given = Leases([suspect_lease(True)])
    dispatcher._note_suspects(KEY, w, given)
    w.held = Counter(pacs=1)
    assert w.suspect and dispatcher._mode(KEY, w) is None
    w.held = Counter()  # it gave the suspect back
    assert dispatcher._mode(KEY, w) == "alone" and not w.suspect


def test_a_passed_over_suspect_lets_one_worker_run_empty(dispatcher: Dispatcher) -> None:
    busy, other = worker(Counter(pacs=3)), worker(Counter(pacs=3))
    skipped = Leases([suspect_lease(False)])
    skipped.suspects_skipped = 1
    dispatcher._note_suspects(KEY, busy, skipped)
    dispatcher._note_suspects(OTHER, other, skipped)  # one worker drains, not both
    dispatcher._workers = {KEY: busy, OTHER: other}
    assert dispatcher._mode(KEY, busy) is None
    assert dispatcher._mode(OTHER, other) == "skip"
    busy.held = Counter()
    assert dispatcher._mode(KEY, busy) == "alone"
    dispatcher._note_suspects(KEY, busy, Leases([suspect_lease(True)]))
    assert dispatcher._draining is None and busy.suspect


def test_a_worker_of_protocol_1_1_gets_suspects_alone_in_a_batch(dispatcher: Dispatcher) -> None:
    legacy = worker(None)  # it reports no per-destination counts: idleness unknown
    assert dispatcher._mode(KEY, legacy) == "alone"
    dispatcher._note_suspects(KEY, legacy, Leases([suspect_lease(True)]))
    assert not legacy.suspect and dispatcher._mode(KEY, legacy) == "alone"
