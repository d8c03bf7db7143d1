"""A worker keeps the leases of its deliveries alive (workers/worker.py
``_extend_leases``): past half its length a lease is pushed out by its own length while
the delivery goes on, so a long send is not re-leased to another worker meanwhile; a
finished delivery's lease is left alone. On a migrated database (SQLite and PostgreSQL),
with the real JobQueue; no sockets (the delivery is replaced by a wait)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

from db_support import new_instance

from router.db.engine import make_engine
from router.db.jobs import JobQueue
from router.db.repository import Repository
from router.dispatcher import lease_message
from workers.worker import Worker


async def _deliver_slowly(
    worker: Worker, queue: JobQueue, lease_seconds: float, delivery: float
) -> tuple[dt.datetime, list[Any]]:
    (lease,) = queue.lease("w", None, 1, lease_seconds)
    worker._deliver = lambda message: asyncio.sleep(delivery)  # type: ignore[method-assign,assignment,return-value]
    worker._accept(lease_message(lease).encode())
    seen = []
    while worker._tasks:
        worker._extend_leases()  # what each heartbeat does
        await asyncio.sleep(0.2)
        job = queue.get_job(lease.job_id)
        assert job is not None
        now = dt.datetime.now(dt.UTC)
        seen.append((job.state, job.lease_owner, job.lease_expires_at, now))
    return lease.expires_at, seen


def test_a_long_delivery_keeps_its_lease_and_a_finished_one_is_let_go(
    db_url: str, tmp_path: Path
) -> None:
    engine = make_engine(db_url)
    try:
        repository = Repository(engine)
        repository.add_destination("pacs", "PACS", "10.0.0.5", 104)
        repository.record_instances([new_instance(1, "pacs")])
        queue = JobQueue(engine)
        worker = Worker(queue, None, "ipc:///nonexistent", fetch_dir=tmp_path)
        first_expiry, seen = asyncio.run(_deliver_slowly(worker, queue, 2.0, 3.5))
    finally:
        engine.dispose()
    # The delivery outlived its 2 s lease, which never lapsed: still ours, pushed out.
    assert all(s == "leased" and o == "w" and end > now for s, o, end, now in seen), seen
    assert seen[-1][2] > first_expiry + dt.timedelta(seconds=1)
    assert worker._held == {}  # finished: nothing is extended any more
