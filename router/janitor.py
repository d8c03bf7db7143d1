"""Spool clean-up (DESIGN §3.5): a file goes once every job of its instance is done.

The database says which files may go (``JobQueue.removable_spool_files``: instances
done, and done at least the retention period ago); the janitor unlinks each, fsyncs the
directories it changed, and only then marks the rows (``forget_spool_files``). A crash
between the two leaves a row naming a missing file, which the next sweep unlinks again
(``missing_ok``) and marks. Files of instances with a job still to do, dead-lettered or
unrouted are kept: an operator may retry them.

It runs on the node (where the spool is) as one process of the supervisor, so remote
workers, which have no spool, need nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable

from router.db.jobs import JobQueue
from router.spool import Spool

log = logging.getLogger(__name__)


class SpoolJanitor:
    def __init__(
        self,
        queue: JobQueue,
        spool: Spool,
        *,
        retention: dt.timedelta = dt.timedelta(0),
        batch: int = 1000,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self._queue = queue
        self._spool = spool
        self._retention = retention
        self._batch = batch
        # Run once per sweep: the listener's commits leave SQLite's WAL checkpoints to
        # the other processes (router/db/engine.py make_engine ``checkpoints``).
        self._checkpoint = checkpoint

    def sweep_once(self) -> int:
        """Remove up to one batch of removable files; how many were marked removed."""
        names = self._queue.removable_spool_files(self._batch, keep_for=self._retention)
        if not names:
            return 0
        # Workers commit results without an fsync of their own (make_engine durable=False):
        # make "done" durable before the file goes, or a power loss could leave a job to
        # do whose file is gone.
        self._queue.sync()
        kept = []
        for name in names:
            try:
                self._spool.remove(name)
            except ValueError:  # not a name the spool generates: leave the row for a human
                log.error("janitor: instance row names %r, which is not a spool name", name)
                continue
            kept.append(name)
        self._spool.sync_directories(kept)
        return self._queue.forget_spool_files(kept)

    def sweep(self) -> int:
        """Sweep until nothing removable is left, then checkpoint; the total removed."""
        total = 0
        while True:
            removed = self.sweep_once()
            total += removed
            if removed < self._batch:
                break
        if self._checkpoint is not None:
            self._checkpoint()
        return total

    async def run(self, stop: asyncio.Event, interval: float = 2.0) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                removed = await loop.run_in_executor(None, self.sweep)
                if removed:
                    log.debug("janitor: removed %d spool files", removed)
            except Exception as exc:  # the database or disk may be briefly unavailable
                log.warning("janitor: sweep failed: %s", exc)
            with contextlib.suppress(TimeoutError):  # the interval passed: sweep again
                await asyncio.wait_for(stop.wait(), interval)
