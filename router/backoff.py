"""Destination-level backoff in the dispatcher (DESIGN §3.2: "the dispatcher alone …
applies per-destination limits and backoff").

A job that fails retries with its own backoff (workers/retry.py), but a destination that
is down fails every job in turn: 1,000 queued instances would each spend their attempts
against a closed port, and all go to dead letter after the destination's retry limit,
even if it comes back a little later. So when a worker reports that a destination could
not be reached (connection refused, reset or lost, a timeout, a transient reject), the
dispatcher stops leasing its jobs for a backoff interval that doubles with each failed
probe (full jitter, capped); after the interval one probe job at a time is leased, and
the first attempt that reaches the destination ends the backoff. Jobs that wait this way
spend no attempt. Pure: the clock and the random source are injected.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.retry import backoff


@dataclass
class _Down:
    failures: int
    until: float


class DestinationHealth:
    def __init__(
        self,
        base: float,
        cap: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._base, self._cap = base, cap
        self._clock = clock
        self._rng = rng or random.Random()
        self._down: dict[str, _Down] = {}

    def unreachable(self, name: str) -> None:
        """An attempt could not reach ``name``. Reports of the jobs leased before the
        backoff began arrive during it and do not lengthen it."""
        now = self._clock()
        state = self._down.get(name)
        if state is not None and now < state.until:
            return
        failures = 1 if state is None else state.failures + 1
        wait = backoff(failures, self._base, self._cap, self._rng)
        self._down[name] = _Down(failures, now + wait)

    def reachable(self, name: str) -> None:
        self._down.pop(name, None)

    def room(self, name: str, held: int) -> int | None:
        """Jobs of ``name`` a worker holding ``held`` of them may lease now: None when the
        destination is not in backoff, 0 during it, and one probe after it."""
        state = self._down.get(name)
        if state is None:
            return None
        if self._clock() < state.until:
            return 0
        return max(0, 1 - held)

    def backing_off(self) -> dict[str, float]:
        """Seconds left per destination in backoff (0: probing)."""
        now = self._clock()
        return {name: max(0.0, s.until - now) for name, s in self._down.items()}
