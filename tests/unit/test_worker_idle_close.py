"""The worker's idle-association sweep while deliveries add pools (regression).

The heartbeat releases associations unused for a while, pool by pool, awaiting each
release; meanwhile a lease for a destination new to this worker adds its pool. Iterating
the live dict then raised "dictionary changed size during iteration" and the worker
process died (seen live in tests/e2e/catalogue/test_b8_destinations.py, ~50 destinations
over a few minutes).
"""

from __future__ import annotations

import asyncio

from workers.worker import Worker


class _Pool:
    def __init__(self, worker: Worker, adds: str | None) -> None:
        self.worker, self.adds, self.swept = worker, adds, 0

    async def close_idle(self) -> None:
        self.swept += 1
        await asyncio.sleep(0)  # a release in flight: other tasks run
        if self.adds is not None:
            self.worker._pools[self.adds] = _Pool(self.worker, None)  # type: ignore[assignment]


def test_idle_sweep_survives_a_pool_added_while_it_awaits() -> None:
    async def main() -> None:
        worker = Worker(None, None, "ipc:///nonexistent")  # type: ignore[arg-type]
        first = _Pool(worker, adds="new-destination")
        worker._pools = {"old-destination": first}  # type: ignore[dict-item]
        await worker._close_idle_pools()
        assert first.swept == 1
        assert set(worker._pools) == {"old-destination", "new-destination"}

    asyncio.run(main())
