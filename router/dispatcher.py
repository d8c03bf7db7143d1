"""The dispatcher: the one process that leases jobs and hands them to workers.

Workers connect with a ZeroMQ DEALER socket to the dispatcher's ROUTER (``ipc://`` on
the node; ``tcp://`` from other hosts later) and say how many leases they can hold
(credit). Whenever a worker has credit the dispatcher leases that many due jobs for the
destinations the worker reaches and sends them; a worker's credit comes back as it
finishes jobs. The database is the record (DESIGN §3.2): a job whose lease expires —
its worker died, or the lease message was lost — is due again and leased anew, so the
dispatcher keeps no state worth saving and rebuilds everything after a restart. A
worker silent for ``worker_timeout`` seconds (it sends heartbeats) is forgotten.
Listeners PUSH a ``job`` message after each commit (the fast path); without one the
dispatcher still sweeps the database once per ``sweep`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from router.db.jobs import JobQueue, Lease
from router.messages import Bye, Credit, Hello, LeaseMessage, MessageError, decode

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    name: str
    destinations: tuple[str, ...] | None
    credit: int
    last_seen: float


def lease_message(lease: Lease) -> LeaseMessage:
    return LeaseMessage(
        job=lease.job_id,
        instance=lease.instance_id,
        destination=lease.destination,
        ae_title=lease.ae_title,
        host=lease.host,
        port=lease.port,
        max_associations=lease.max_associations,
        max_retries=lease.max_retries,
        spool_name=lease.spool_name,
        transfer_syntax=lease.transfer_syntax,
        sop_class=lease.sop_class_uid,
        token=lease.token,
        attempts=lease.attempts,
        deliveries=lease.deliveries,
    )


class Dispatcher:
    def __init__(
        self,
        queue: JobQueue,
        endpoint: str,
        *,
        lease_seconds: float = 120.0,
        tick: float = 0.2,
        worker_timeout: float = 15.0,
        notify_endpoint: str | None = None,
        sweep: float = 1.0,
        coalesce: float = 0.1,
    ) -> None:
        self._notify_endpoint = notify_endpoint
        self._sweep = sweep
        # Notices within this interval share one lease transaction (bigger batches,
        # fewer waits for SQLite's single write lock).
        self._coalesce = coalesce
        self._work = True
        self._credit_back = False
        self._queue = queue
        self._endpoint = endpoint
        self._lease_seconds = lease_seconds
        self._tick = tick
        self._worker_timeout = worker_timeout
        self._workers: dict[bytes, _Worker] = {}

    async def run(self, stop: asyncio.Event) -> None:
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self._endpoint)
        poller = zmq.asyncio.Poller()
        poller.register(socket, zmq.POLLIN)
        notices = None
        if self._notify_endpoint:
            notices = context.socket(zmq.PULL)
            notices.setsockopt(zmq.LINGER, 0)
            notices.bind(self._notify_endpoint)
            poller.register(notices, zmq.POLLIN)
        log.info("dispatcher listening on %s", self._endpoint)
        last_lease = 0.0
        try:
            while not stop.is_set():
                ready = dict(await poller.poll(int(min(self._tick, self._coalesce) * 1000)))
                while socket in ready and await socket.poll(0):
                    identity, data = await socket.recv_multipart()
                    self._handle(identity, data)
                while notices is not None and notices in ready and await notices.poll(0):
                    await notices.recv()  # a listener committed new jobs
                    self._work = True
                self._forget_silent()
                # Lease when told of new jobs or given credit, and otherwise once per
                # sweep interval (retries coming due, expired leases): each lease is a
                # write transaction, which the listeners' commits would queue behind.
                now = time.monotonic()
                since = now - last_lease
                if (
                    self._credit_back
                    or (self._work and since >= self._coalesce)
                    or since >= self._sweep
                ):
                    last_lease = now
                    self._credit_back = False
                    self._work = await self._dispatch(socket)
        finally:
            socket.close()
            if notices is not None:
                notices.close()
            context.term()

    def _handle(self, identity: bytes, data: bytes) -> None:
        try:
            message = decode(data)
        except MessageError as exc:
            log.warning("dispatcher: dropped a bad message: %s", exc)
            return
        now = time.monotonic()
        if isinstance(message, Hello):
            self._workers[identity] = _Worker(
                message.worker, message.destinations, message.credit, now
            )
            self._work = True
            log.info("worker %s connected (credit %d)", message.worker, message.credit)
            return
        worker = self._workers.get(identity)
        if worker is None:
            return  # not introduced (a dispatcher restart): it says hello again
        worker.last_seen = now
        if isinstance(message, Credit):
            worker.credit += max(0, message.credit)
            if message.credit > 0:
                # Capacity came back: lease at once, not after the notices' coalescing
                # interval (a worker draining a backlog would idle for it every batch).
                self._credit_back = True
        elif isinstance(message, Bye):
            del self._workers[identity]
            log.info("worker %s left", worker.name)

    def _forget_silent(self) -> None:
        limit = time.monotonic() - self._worker_timeout
        for identity, worker in list(self._workers.items()):
            if worker.last_seen < limit:
                log.warning("worker %s is silent; its leases will expire", worker.name)
                del self._workers[identity]

    async def _dispatch(self, socket: zmq.asyncio.Socket) -> bool:
        """Lease for every worker with credit; True if more work may be waiting."""
        loop = asyncio.get_running_loop()
        more = False
        for identity, worker in list(self._workers.items()):
            if worker.credit <= 0:
                continue
            try:
                leases = await loop.run_in_executor(
                    None,
                    self._queue.lease,
                    worker.name,
                    worker.destinations,
                    worker.credit,
                    self._lease_seconds,
                )
            except Exception as exc:  # the database may be briefly unavailable
                log.warning("dispatcher: leasing failed: %s", exc)
                return True
            for lease in leases:
                await socket.send_multipart([identity, lease_message(lease).encode()])
            more = more or len(leases) == worker.credit
            worker.credit -= len(leases)
        return more
