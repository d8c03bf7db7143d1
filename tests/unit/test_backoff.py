"""DestinationHealth (router/backoff.py): the dispatcher's destination-level backoff,
with the clock and the random source injected."""

from __future__ import annotations

import random

from router.backoff import DestinationHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock) -> DestinationHealth:
    return DestinationHealth(base=1.0, cap=8.0, clock=clock, rng=random.Random(7))


def test_a_reachable_destination_has_no_limit_from_health() -> None:
    assert health(Clock()).room("pacs", held=5) is None


def test_unreachable_stops_leasing_then_allows_one_probe_then_reachable_ends_it() -> None:
    clock = Clock()
    h = health(clock)
    h.unreachable("pacs")
    assert h.room("pacs", held=0) == 0
    assert h.room("ai", held=0) is None  # the others are not held back
    clock.now += 8.0  # past any first interval (at most base, capped)
    assert h.room("pacs", held=0) == 1  # one probe
    assert h.room("pacs", held=1) == 0  # while it is out, no second one
    h.reachable("pacs")
    assert h.room("pacs", held=1) is None


def test_reports_during_a_backoff_do_not_lengthen_it_failed_probes_do() -> None:
    clock = Clock()
    h = health(clock)
    h.unreachable("pacs")
    first = h.backing_off()["pacs"]
    for _ in range(10):  # the jobs leased before the backoff fail one after another
        h.unreachable("pacs")
    assert h.backing_off()["pacs"] == first
    ceilings = []
    for _ in range(6):
        clock.now += 100.0  # the interval is over; the probe fails
        h.unreachable("pacs")
        ceilings.append(h.backing_off()["pacs"])
    assert all(0.5 <= wait <= 8.0 for wait in ceilings)  # floor base/2, capped
    assert max(ceilings[3:]) > 2.0  # it grew past the first intervals' ceilings
