"""A forwarding worker: receives leases from the dispatcher and sends the instances.

Leases are grouped by destination: each destination has its own association pool
(``workers/sender.py``), so a slow or dead destination never holds back the others. The
worker writes each attempt's result itself, under its lease (``router/db/jobs.py``),
then gives the dispatcher one credit back. When every job of an instance is done the
spool file is removed (DESIGN §3.5).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import time
import uuid

import zmq
import zmq.asyncio

from protocol.net import Timeouts
from router.db.jobs import JobQueue, Lease, Result
from router.db.models import JobState
from router.messages import Bye, Credit, Hello, LeaseMessage, MessageError, decode
from router.spool import Spool
from workers.retry import Failure, Outcome, RetryPolicy, Verdict, classify
from workers.sender import Destination, DestinationPool, Item

log = logging.getLogger(__name__)

_STATE = {"done": JobState.DONE, "retry_wait": JobState.RETRY_WAIT, "dead": JobState.DEAD}


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        spool: Spool,
        endpoint: str,
        *,
        calling_ae: str = "ROUTER",
        destinations: tuple[str, ...] | None = None,
        credit: int = 16,
        policy: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        heartbeat: float = 2.0,
    ) -> None:
        self.name = f"worker-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._queue = queue
        self._spool = spool
        self._endpoint = endpoint
        self._calling_ae = calling_ae
        self._destinations = destinations
        self._credit = credit
        self._policy = policy or RetryPolicy()
        self._timeouts = timeouts or Timeouts(connect=10, acse=30, dimse=120)
        self._heartbeat = heartbeat
        self._pools: dict[str, DestinationPool] = {}
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._results: list[Result] = []
        self._results_ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 1000)
        socket.connect(self._endpoint)
        self._socket = socket
        await socket.send(Hello(self.name, self._destinations, self._credit).encode())
        recorder = asyncio.ensure_future(self._record_results())
        last_beat = last_lease = time.monotonic()
        try:
            while not stop.is_set():
                if await socket.poll(int(self._heartbeat * 500)):
                    self._accept(await socket.recv())
                    last_lease = time.monotonic()
                now = time.monotonic()
                if now - last_beat >= self._heartbeat:
                    last_beat = now
                    if now - last_lease > 5 * self._heartbeat and not self._tasks:
                        # Idle with full credit: the dispatcher may have restarted and
                        # forgotten us; introducing ourselves again is harmless.
                        await socket.send(
                            Hello(self.name, self._destinations, self._credit).encode()
                        )
                    else:
                        await socket.send(Credit(0).encode())
                    for pool in self._pools.values():
                        await pool.close_idle()  # associations unused for a while go
            await self._finish_in_flight()
            deadline = time.monotonic() + 10
            while self._results and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the recorder writes what the last sends produced
            recorder.cancel()
            await socket.send(Bye().encode())
        finally:
            for pool in self._pools.values():
                await pool.close()
            socket.close()
            context.term()
            await asyncio.get_running_loop().run_in_executor(None, self._queue.release, self.name)

    def _accept(self, data: bytes) -> None:
        try:
            message = decode(data)
        except MessageError as exc:
            log.warning("%s: dropped a bad message: %s", self.name, exc)
            return
        if isinstance(message, LeaseMessage):
            task = asyncio.ensure_future(self._deliver(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _finish_in_flight(self, grace: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    def _pool(self, lease: LeaseMessage) -> DestinationPool:
        pool = self._pools.get(lease.destination)
        target = Destination(
            lease.destination, lease.ae_title, lease.host, lease.port, lease.max_associations
        )
        if pool is None or pool.destination != target:
            pool = DestinationPool(target, self._calling_ae, self._timeouts)
            self._pools[lease.destination] = pool
        return pool

    async def _deliver(self, message: LeaseMessage) -> None:
        started = dt.datetime.now(dt.UTC)
        clock = time.perf_counter()
        try:
            path = self._spool.path_for(message.spool_name)
            outcome = await self._pool(message).send(
                Item(path, message.sop_class, message.transfer_syntax)
            )
        except ValueError as exc:  # a spool name that is not ours: never touch the disk
            outcome = Outcome(failure=Failure.SPOOL_FILE_MISSING, detail=str(exc))
        duration_ms = int((time.perf_counter() - clock) * 1000)
        verdict, reason = classify(outcome)
        policy = RetryPolicy(
            max_attempts=max(1, message.max_retries),
            max_deliveries=self._policy.max_deliveries,
            base=self._policy.base,
            cap=self._policy.cap,
        )
        state, when = policy.next_step(
            message.attempts + 1, message.deliveries, verdict, dt.datetime.now(dt.UTC), self._rng
        )
        level = (
            logging.INFO
            if verdict in (Verdict.DONE, Verdict.DONE_WITH_WARNING)
            else logging.WARNING
        )
        log.log(level, "job %d to %s: %s -> %s", message.job, message.destination, reason, state)
        self._results.append(
            self._result(message, state, verdict, reason, outcome, started, duration_ms, when)
        )
        self._results_ready.set()

    async def _record_results(self) -> None:
        """Group commit of results: whatever finished while the previous batch was being
        written goes in the next single transaction."""
        loop = asyncio.get_running_loop()
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            batch, self._results = self._results, []
            if not batch:
                continue
            try:
                names = await loop.run_in_executor(None, self._queue.finish_many, batch)
            except Exception as exc:  # the database is the record: the leases will expire
                log.warning("could not record %d results: %s", len(batch), exc)
                names = []
            for name in names:
                if name:
                    self._spool.remove(name)  # every job of that instance is done
            await self._socket.send(Credit(len(batch)).encode())

    def _result(
        self,
        message: LeaseMessage,
        state: str,
        verdict: Verdict,
        reason: str,
        outcome: Outcome,
        started: dt.datetime,
        duration_ms: int,
        when: dt.datetime | None,
    ) -> Result:
        lease = Lease(
            job_id=message.job,
            instance_id=message.instance,
            destination=message.destination,
            ae_title=message.ae_title,
            host=message.host,
            port=message.port,
            max_associations=message.max_associations,
            max_retries=message.max_retries,
            spool_name=message.spool_name,
            transfer_syntax=message.transfer_syntax,
            sop_class_uid=message.sop_class,
            sop_instance_uid="",
            priority=0,
            token=message.token,
            expires_at=started,
            attempts=message.attempts,
            deliveries=message.deliveries,
        )
        error = None if verdict is Verdict.DONE else reason
        return Result(
            lease, _STATE[state], verdict.value, started, duration_ms, outcome.status, error, when
        )
