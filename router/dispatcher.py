"""The dispatcher: the one process that leases jobs and hands them to workers.

Workers connect with a ZeroMQ DEALER socket to one of the dispatcher's ROUTER sockets —
``ipc://`` for the node's own workers, and, when ``workers.bind`` is set, ``tcp://`` for
workers on other hosts (with CURVE: only workers whose public key is in the allowed
directory get in) — and say how many leases they can hold (credit). Whenever a worker
has credit the dispatcher leases that many due jobs for the destinations the worker
reaches and sends them; a worker's credit comes back as it finishes jobs. The database
is the record (DESIGN §3.2): a job whose lease expires — its worker died, or the lease
message was lost — is due again and leased anew, so the dispatcher keeps no state worth
saving and rebuilds everything after a restart. A worker silent for ``worker_timeout``
seconds (it sends heartbeats) is forgotten. Listeners PUSH a ``job`` message after each
commit (the fast path); without one the dispatcher still sweeps the database once per
``sweep`` seconds.

A destination's ``max_associations`` holds for the whole node (DESIGN §3.3): a
worker of revision 1.4 or later gets the destination's jobs only while it holds a share
of that limit, one association at a time (a second share once its first is busy with
``pipeline`` leases). It keeps its shares while it holds an association to the
destination, idle ones included, and says when it has closed them all (credit
``closed``; hello ``open`` after a restart of either side); a worker forgotten or gone
gives its shares back. Otherwise several workers, each pooling its own associations,
would open more than a one-association destination (DCMTK's storescp without
``--fork``) takes, and wait for the ACSE timeout behind one another. Older workers are
not counted: each keeps the limit for itself.

A job some worker died holding (deliveries > attempts: a suspect, maybe an instance
that kills workers) is leased alone, to a worker that holds nothing else, and that
worker gets nothing more until it gives it back: a poison instance's crashes then cost
no other job a delivery (catalogue FI-08). A suspect passed over lets one busy worker
run empty for it; that is the worker holding the destination's share, since only a
worker with room for a destination sees its suspects.

A worker without the node's filesystem asks for a spool file in chunks (``fetch``); the
dispatcher answers (``chunk``) only while that worker's token holds a lease on a job of
that very instance, so reaching the port does not open the spool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import zmq
import zmq.asyncio

from router import failpoints
from router.backoff import DestinationHealth
from router.curve import KeyPair, ZapHandler
from router.db.jobs import JobQueue, Lease, Leases
from router.liveness import WorkerSeen, remove_view, write_view
from router.messages import (
    MAX_CHUNK,
    Bye,
    Chunk,
    Credit,
    Fetch,
    Heartbeat,
    Hello,
    LeaseMessage,
    MessageError,
    Who,
    decode,
)
from router.processes import has_exited
from router.spool import Spool

log = logging.getLogger(__name__)

_COVER_CACHE_SECONDS = 5.0  # a checked (token, spool name) is trusted this long


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where workers connect. With ``curve`` the socket is a CURVE server (PS3.15 does
    not cover this hop: ZeroMQ's own encryption and authentication) and a worker gets in
    only while its public key is a ``.pub`` file in ``allowed``."""

    url: str
    curve: KeyPair | None = None
    allowed: str | None = None


@dataclass
class _Worker:
    name: str
    destinations: tuple[str, ...] | None
    credit: int
    last_seen: float
    socket: zmq.asyncio.Socket
    # Leases held per destination, for a worker that says which it gives back (1.2).
    held: Counter[str] | None = None
    host: str = "local"  # the connection's peer address (tcp://), for liveness
    minor: int = 0
    pid: int = 0  # with pid_ns: its process, where the dispatcher can see it (1.4)
    pid_ns: str = ""
    # Associations granted per destination, for a worker that says when it closed them
    # (1.4): its share of each destination's node-wide limit.
    shares: Counter[str] = field(default_factory=Counter)
    suspect: bool = False  # it holds a suspect lease (FI-08): nothing goes with it

    @property
    def counted(self) -> bool:
        return self.held is not None and self.minor >= 4

    def idle(self) -> bool:
        """It holds no lease (known only of a 1.2 worker, which reports what it gives
        back)."""
        return self.held is not None and not +self.held


def lease_message(lease: Lease, associations: int | None = None) -> LeaseMessage:
    """``associations``: the worker's share of the destination's limit (None: all)."""
    return LeaseMessage(
        job=lease.job_id,
        instance=lease.instance_id,
        destination=lease.destination,
        ae_title=lease.ae_title,
        host=lease.host,
        port=lease.port,
        max_associations=lease.max_associations if associations is None else associations,
        max_retries=lease.max_retries,
        spool_name=lease.spool_name,
        transfer_syntax=lease.transfer_syntax,
        sop_class=lease.sop_class_uid,
        token=lease.token,
        attempts=lease.attempts,
        deliveries=lease.deliveries,
        sop_instance=lease.sop_instance_uid,
        expires=lease.expires_at.timestamp(),
        study=lease.study_instance_uid or "",
        tls=lease.tls,
    )


class Dispatcher:
    def __init__(
        self,
        queue: JobQueue,
        endpoints: str | Endpoint | Sequence[str | Endpoint],
        *,
        spool: Spool | None = None,
        lease_seconds: float = 120.0,
        tick: float = 0.2,
        worker_timeout: float = 15.0,
        notify_endpoint: str | None = None,
        sweep: float = 1.0,
        coalesce: float = 0.1,
        pipeline: int = 4,
        health: DestinationHealth | None = None,
        liveness: Path | None = None,
    ) -> None:
        if isinstance(endpoints, str | Endpoint):
            endpoints = [endpoints]
        self._endpoints = [e if isinstance(e, Endpoint) else Endpoint(e) for e in endpoints]
        self._spool = spool
        # Leases one worker may hold per destination and association: enough to keep
        # its associations busy, few enough that a destination that never answers
        # holds a bounded share of the worker's credit (the others go on meanwhile).
        self._pipeline = pipeline
        self._health = health or DestinationHealth(base=5.0, cap=600.0)
        self._notify_endpoint = notify_endpoint
        self._sweep = sweep
        # Notices within this interval share one lease transaction (bigger batches,
        # fewer waits for SQLite's single write lock).
        self._coalesce = coalesce
        self._work = True
        self._credit_back = False
        self._queue = queue
        self._lease_seconds = lease_seconds
        self._tick = tick
        self._worker_timeout = worker_timeout
        self._workers: dict[tuple[int, bytes], _Worker] = {}
        # The worker left to run empty for a suspect job that is waiting (see _mode).
        self._draining: tuple[int, bytes] | None = None
        self._liveness = liveness  # where queue status and the metrics read workers
        self._published = 0.0
        self._looked = 0.0  # when /proc was last read for exited workers
        self._covered: dict[tuple[str, str], float] = {}
        self._fetches: set[asyncio.Task[Any]] = set()
        self.ports: list[int] = []  # of the tcp:// endpoints, once bound (port 0: any)

    def _bind(self, context: zmq.asyncio.Context) -> list[zmq.asyncio.Socket]:
        sockets = []
        for endpoint in self._endpoints:
            socket = context.socket(zmq.ROUTER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 10_000)
            if endpoint.curve is not None:
                socket.curve_server = True
                socket.curve_publickey = endpoint.curve.public
                socket.curve_secretkey = endpoint.curve.secret
            socket.bind(endpoint.url)
            if endpoint.url.startswith("tcp://"):
                bound = socket.getsockopt_string(zmq.LAST_ENDPOINT)
                self.ports.append(int(bound.rsplit(":", 1)[1]))
            log.info(
                "dispatcher listening on %s%s",
                endpoint.url,
                " (CURVE)" if endpoint.curve else "",
            )
            sockets.append(socket)
        return sockets

    def _authenticator(self, base: zmq.Context[zmq.Socket[bytes]]) -> ZapHandler | None:
        secured = [e for e in self._endpoints if e.curve is not None]
        if not secured:
            return None
        if len({e.allowed for e in secured}) > 1:
            raise ValueError("every CURVE endpoint of one dispatcher shares its allowed keys")
        handler = ZapHandler(base, secured[0].allowed or "")
        handler.start()
        return handler

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        base: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        context = zmq.asyncio.Context(base)  # shadows it: one context, two interfaces
        auth = self._authenticator(base)  # before any bind: ZAP must be in place
        # (a plain context shadowed by the asyncio one: the handler's thread uses it)
        sockets = self._bind(context)
        poller = zmq.asyncio.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        notices = None
        if self._notify_endpoint:
            notices = context.socket(zmq.PULL)
            notices.setsockopt(zmq.LINGER, 0)
            notices.bind(self._notify_endpoint)
            poller.register(notices, zmq.POLLIN)
        if ready is not None:
            ready.set()
        last_lease = 0.0
        try:
            while not stop.is_set():
                ready_sockets = dict(await poller.poll(int(min(self._tick, self._coalesce) * 1000)))
                for index, socket in enumerate(sockets):
                    while socket in ready_sockets and await socket.poll(0):
                        identity, frame = await socket.recv_multipart(copy=False)
                        peer = _peer(self._endpoints[index], frame)
                        self._handle(index, socket, identity.bytes, frame.bytes, peer)
                while notices is not None and notices in ready_sockets and await notices.poll(0):
                    await notices.recv()  # a listener committed new jobs
                    self._work = True
                self._forget_silent()
                self._publish_liveness()
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
                    self._work = await self._dispatch()
        finally:
            for task in list(self._fetches):
                task.cancel()
            for socket in sockets:
                socket.close()
            if notices is not None:
                notices.close()
            if auth is not None:
                auth.stop()
            if self._liveness is not None:
                remove_view(self._liveness)
            base.term()

    def _handle(
        self,
        index: int,
        socket: zmq.asyncio.Socket,
        identity: bytes,
        data: bytes,
        peer: str = "local",
    ) -> None:
        try:
            message = decode(data)
        except MessageError as exc:
            log.warning("dispatcher: dropped a bad message: %s", exc)
            return
        now = time.monotonic()
        key = (index, identity)
        if isinstance(message, Hello):
            known = self._workers.get(key)
            held: Counter[str] | None = Counter() if message.minor >= 2 else None
            hello = _Worker(
                message.worker,
                message.destinations,
                message.credit,
                now,
                socket,
                held,
                peer,
                minor=message.minor,
                pid=message.pid,
                pid_ns=message.pid_ns,
                shares=Counter(message.open or ()),
            )
            if known is not None and known.name == message.worker and known.held:
                # Leases on their way to it may open associations its hello did not
                # count yet: keep those destinations' shares.
                for name, count in known.shares.items():
                    if known.held[name] > 0:
                        hello.shares[name] = max(hello.shares[name], count)
            self._workers[key] = hello
            self._work = True
            if known is None or known.name != message.worker:
                log.info("worker %s connected (credit %d)", message.worker, message.credit)
            return
        worker = self._workers.get(key)
        if worker is None:
            # Not introduced: this dispatcher restarted, or forgot a silent worker.
            task = asyncio.ensure_future(socket.send_multipart([identity, Who().encode()]))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
            return
        worker.last_seen = now
        if isinstance(message, Credit):
            worker.credit += max(0, message.credit)
            if worker.held is not None and message.done:
                worker.held.subtract(message.done)
                worker.held += Counter()  # drop the ones at zero or below
            for name in message.closed or ():
                # Unless a lease is on its way to it (that delivery will open one).
                if worker.held is None or worker.held[name] <= 0:
                    worker.shares.pop(name, None)
            for name in message.down or ():
                self._health.unreachable(name)
                log.info("destination %s unreachable: backing off", name)
            for name in message.up or ():
                self._health.reachable(name)
            if message.credit > 0:
                # Capacity came back: lease at once, not after the notices' coalescing
                # interval (a worker draining a backlog would idle for it every batch).
                self._credit_back = True
        elif isinstance(message, Fetch):
            task = asyncio.ensure_future(self._serve_fetch(socket, identity, message))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
        elif isinstance(message, Heartbeat):
            pass  # last_seen is all it says
        elif isinstance(message, Bye):
            del self._workers[key]
            log.info("worker %s left", worker.name)

    async def _serve_fetch(self, socket: zmq.asyncio.Socket, identity: bytes, fetch: Fetch) -> None:
        loop = asyncio.get_running_loop()
        data, eof, error = b"", False, ""
        try:
            path = self._spool.path_for(fetch.spool_name) if self._spool else None
        except ValueError:
            path = None
        if path is None:
            error = "not found"
        elif not await self._lease_covers(fetch.token, fetch.spool_name):
            error = "not leased"
            log.warning("dispatcher: refused a fetch of %s without its lease", fetch.spool_name)
        else:
            try:
                data, eof = await loop.run_in_executor(
                    None, _read_chunk, path, fetch.offset, min(fetch.length, MAX_CHUNK)
                )
            except OSError:
                error = "not found"
        chunk = Chunk(fetch.spool_name, fetch.offset, data, eof, error, fetch.token)
        await socket.send_multipart([identity, chunk.encode()], copy=False)

    async def _lease_covers(self, token: str, spool_name: str) -> bool:
        key = (token, spool_name)
        now = time.monotonic()
        if self._covered.get(key, 0.0) > now:
            return True
        loop = asyncio.get_running_loop()
        try:
            covered = await loop.run_in_executor(None, self._queue.lease_covers, token, spool_name)
        except Exception as exc:  # the database may be briefly unavailable: refuse
            log.warning("dispatcher: could not check a lease: %s", exc)
            return False
        if covered:
            if len(self._covered) > 10_000:
                self._covered = {k: t for k, t in self._covered.items() if t > now}
            self._covered[key] = now + _COVER_CACHE_SECONDS
        return covered

    def _publish_liveness(self) -> None:
        """About once a second, the workers heard from (router/liveness.py)."""
        now = time.monotonic()
        if self._liveness is None or now - self._published < 1.0:
            return
        self._published = now
        wall = time.time()
        seen = [
            WorkerSeen(w.name, w.host, w.destinations, w.credit, wall - (now - w.last_seen))
            for w in self._workers.values()
        ]
        try:
            write_view(self._liveness, seen, wall)
        except OSError as exc:
            log.warning("dispatcher: could not write the workers' liveness: %s", exc)

    def _forget_silent(self) -> None:
        now = time.monotonic()
        limit = now - self._worker_timeout
        look = now - self._looked >= 1.0  # /proc once a second
        if look:
            self._looked = now
        for key, worker in list(self._workers.items()):
            if worker.last_seen < limit:
                log.warning("worker %s is silent; its leases will expire", worker.name)
                del self._workers[key]
            elif look and worker.host == "local" and has_exited(worker.pid, worker.pid_ns):
                # (ipc:// only: a tcp:// worker's host may have a namespace of the same
                # inode, the initial one's is the same on every host)
                # Killed: its associations closed with it, so its shares are free now.
                log.warning("worker %s has exited; its leases will expire", worker.name)
                del self._workers[key]

    async def _dispatch(self) -> bool:
        """Lease for every worker with credit; True if more work may be waiting."""
        loop = asyncio.get_running_loop()
        more = False
        if self._draining is not None and self._draining not in self._workers:
            self._draining = None
        for key, worker in list(self._workers.items()):
            identity = key[1]
            mode = self._mode(key, worker)
            if worker.credit <= 0 or mode is None:
                continue
            held: Counter[str] = worker.held if worker.held is not None else Counter()
            capped = worker.held is not None
            granted: dict[str, int] = {}  # shares this lease call may use, per destination

            def room(
                name: str,
                associations: int,
                worker: _Worker = worker,
                held: Counter[str] = held,
                capped: bool = capped,
                granted: dict[str, int] = granted,
            ) -> int:
                if worker.counted:
                    granted[name] = shares = self._grant(worker, name, associations)
                    rooms = shares * self._pipeline - held[name]
                elif capped:
                    rooms = max(1, associations) * self._pipeline - held[name]
                else:
                    rooms = 1 << 30  # a 1.0/1.1 worker: no per-destination count
                probe = self._health.room(name, held[name])
                if probe is not None:
                    return min(probe, max(0, rooms))  # in backoff (0), or one probe job
                return rooms

            try:
                leases = await loop.run_in_executor(
                    None,
                    partial(
                        self._queue.lease,
                        worker.name,
                        worker.destinations,
                        worker.credit,
                        self._lease_seconds,
                        room=room,
                        suspects=mode,
                    ),
                )
            except Exception as exc:  # the database may be briefly unavailable
                log.warning("dispatcher: leasing failed: %s", exc)
                return True
            if leases:
                failpoints.hit("dispatcher.after_lease_commit")
            self._note_suspects(key, worker, leases)
            for lease in leases:
                associations = None
                if worker.counted:
                    name = lease.destination
                    associations = worker.shares[name] = max(worker.shares[name], granted[name])
                message = lease_message(lease, associations)
                await worker.socket.send_multipart([identity, message.encode()])
                if worker.held is not None:
                    worker.held[lease.destination] += 1
            if leases:
                failpoints.hit("dispatcher.after_lease_sent")  # handed to ZeroMQ
            more = more or len(leases) == worker.credit
            worker.credit -= len(leases)
        return more

    def _grant(self, worker: _Worker, name: str, limit: int) -> int:
        """The associations to ``name`` that ``worker`` may use now: those it holds,
        and one more while the node-wide ``limit`` leaves one and the worker has none or
        keeps its own busy (its held leases fill their pipelines)."""
        mine = worker.shares[name]
        taken = sum(w.shares[name] for w in self._workers.values() if w.counted)
        held = worker.held[name] if worker.held is not None else 0
        if taken < max(1, limit) and (mine == 0 or held >= mine * self._pipeline):
            return mine + 1
        return mine

    def _mode(self, key: tuple[int, bytes], worker: _Worker) -> Literal["alone", "skip"] | None:
        """How a worker may be given suspects (jobs a worker died holding, FI-08): only
        alone, to a worker that holds nothing else, so that if the suspect is a poison
        instance its crash costs no other job a delivery. None: give it nothing now (it
        holds a suspect, or it is being left to run empty so that a waiting suspect has
        a worker: otherwise a busy node would never have one idle)."""
        if worker.held is None:
            return "alone"  # 1.0/1.1: what it holds is unknown; alone in its batch
        idle = worker.idle()
        if idle:
            worker.suspect = False
        if worker.suspect or (key == self._draining and not idle):
            return None
        return "alone" if idle else "skip"

    def _note_suspects(self, key: tuple[int, bytes], worker: _Worker, leases: Leases) -> None:
        if self._draining == key:
            self._draining = None  # it ran empty and was offered the suspects first
        if any(lease.suspect for lease in leases):
            worker.suspect = worker.held is not None
        elif leases.suspects_skipped and self._draining is None and worker.held is not None:
            self._draining = key
            log.info(
                "dispatcher: %d job(s) a worker died holding wait to go alone; letting"
                " worker %s run empty for them",
                leases.suspects_skipped,
                worker.name,
            )


def _peer(endpoint: Endpoint, frame: zmq.Frame) -> str:
    """The peer address ZeroMQ gives a message of a tcp:// connection; "local" else."""
    if not endpoint.url.startswith("tcp://"):
        return "local"
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, KeyError):
        return "local"
    return str(address) if address else "local"


def _read_chunk(path: Path, offset: int, length: int) -> tuple[bytes, bool]:
    """``length`` bytes of ``path`` from ``offset``, and whether they reach its end."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, length, offset) if offset < size else b""
    finally:
        os.close(fd)
    return data, offset + len(data) >= size
