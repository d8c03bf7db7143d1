"""The dispatcher: the one process that leases jobs and hands them to workers.

Workers connect with a ZeroMQ DEALER socket to the dispatcher's ROUTER (``ipc://`` on
the node; ``tcp://`` from other hosts later) and say how many leases they can hold
(credit). Whenever a worker has credit the dispatcher leases that many due jobs for the
destinations the worker reaches and sends them; a worker's credit comes back as it
finishes jobs. The database is the record (DESIGN §3.2): a job whose lease expires —
its worker died, or the lease message was lost — is due again and leased anew, so the
dispatcher keeps no state worth saving and rebuilds everything after a restart. A
worker silent for ``worker_timeout`` seconds (it sends heartbeats) is forgotten.
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
    ) -> None:
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
        log.info("dispatcher listening on %s", self._endpoint)
        try:
            while not stop.is_set():
                if await socket.poll(int(self._tick * 1000)):
                    identity, data = await socket.recv_multipart()
                    self._handle(identity, data)
                self._forget_silent()
                await self._dispatch(socket)
        finally:
            socket.close()
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
            log.info("worker %s connected (credit %d)", message.worker, message.credit)
            return
        worker = self._workers.get(identity)
        if worker is None:
            return  # not introduced (a dispatcher restart): it says hello again
        worker.last_seen = now
        if isinstance(message, Credit):
            worker.credit += max(0, message.credit)
        elif isinstance(message, Bye):
            del self._workers[identity]
            log.info("worker %s left", worker.name)

    def _forget_silent(self) -> None:
        limit = time.monotonic() - self._worker_timeout
        for identity, worker in list(self._workers.items()):
            if worker.last_seen < limit:
                log.warning("worker %s is silent; its leases will expire", worker.name)
                del self._workers[identity]

    async def _dispatch(self, socket: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
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
                return
            for lease in leases:
                await socket.send_multipart([identity, lease_message(lease).encode()])
            worker.credit -= len(leases)
