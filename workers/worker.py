"""A forwarding worker: receives leases from the dispatcher and sends the instances.

Leases are grouped by destination: each destination has its own association pool
(``workers/sender.py``), so a slow or dead destination never holds back the others. The
worker writes each attempt's result itself, under its lease (``router/db/jobs.py``),
then gives the dispatcher one credit back. When every job of an instance is done the
node's janitor removes the spool file (DESIGN §3.5), after making the results durable:
the worker commits them without an fsync of its own (``make_engine(durable=False)``).

A worker on the node's host reads the spool directly. A worker elsewhere (``dicom-router
worker --connect tcp://…``, no shared filesystem) fetches each file from the dispatcher
in chunks over its own socket into a private temporary file, sends it from there and
deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import random
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import zmq
import zmq.asyncio

from protocol.net import Timeouts
from router import failpoints
from router.audit import AuditLog, instance_forwarded
from router.curve import KeyPair
from router.db.jobs import JobQueue, Lease, Result
from router.db.models import JobState
from router.db.repository import TlsOptions
from router.messages import (
    MAX_CHUNK,
    Bye,
    Chunk,
    Credit,
    Fetch,
    Hello,
    LeaseMessage,
    MessageError,
    Who,
    decode,
)
from router.processes import pid_namespace
from router.spool import Spool
from router.tls import TlsConfigError
from workers.retry import Failure, Outcome, RetryPolicy, Verdict, classify
from workers.sender import Destination, DestinationPool, Item, tls_context

log = logging.getLogger(__name__)

_STATE = {"done": JobState.DONE, "retry_wait": JobState.RETRY_WAIT, "dead": JobState.DEAD}
# Attempts that say the destination could not be reached at all (the dispatcher then
# backs off the whole destination), and those that say nothing about it either way.
_UNREACHABLE = frozenset(
    {
        Failure.CONNECTION_REFUSED,
        Failure.CONNECTION_RESET,
        Failure.CONNECTION_LOST,
        Failure.TIMEOUT,
        Failure.REJECTED_TRANSIENT,
    }
)
_NOT_ABOUT_REACHING = frozenset({Failure.SPOOL_FILE_MISSING, Failure.INTERNAL_ERROR})
_FETCH_WINDOW = 4  # chunk requests in flight per file
_FETCH_TIMEOUT = 30.0  # seconds for one chunk to come back
_REFUSED_RETRY = 30.0  # seconds before a worker whose key was refused tries again
_TLS_FRESH = 10.0  # seconds a destination's TLS options are used before reading them again


class FetchError(Exception):
    """The node did not hand over a spool file (its reason: "not found", "not leased",
    or no answer in time)."""


class DestinationLookupError(Exception):
    """A destination's TLS settings could not be read (the attempt is retried)."""


class FetchedFiles:
    """Spool files of the node fetched over the worker's socket, each into a temporary
    file of its own (mode 0600, deleted after the attempt): never a whole instance in
    memory, at most ``_FETCH_WINDOW`` chunks of ``MAX_CHUNK`` bytes in flight."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        # By (spool name, token, offset): two fetches of one file (the instance's jobs
        # for two destinations) must not take each other's replies.
        self._waiting: dict[tuple[str, str, int], deque[asyncio.Future[Chunk]]] = {}
        self.socket: zmq.asyncio.Socket | None = None

    def deliver(self, chunk: Chunk) -> None:
        waiting = self._waiting.get((chunk.spool_name, chunk.token, chunk.offset))
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(chunk)
                return

    async def _request(self, spool_name: str, token: str, offset: int) -> asyncio.Future[Chunk]:
        future: asyncio.Future[Chunk] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((spool_name, token, offset), deque()).append(future)
        assert self.socket is not None
        try:
            await asyncio.wait_for(
                self.socket.send(Fetch(spool_name, token, offset, MAX_CHUNK).encode()),
                _FETCH_TIMEOUT,
            )
        except TimeoutError:
            self._forget(spool_name, token, offset, future)
            raise FetchError("the node does not take requests") from None
        return future

    def _forget(
        self, spool_name: str, token: str, offset: int, future: asyncio.Future[Chunk]
    ) -> None:
        key = (spool_name, token, offset)
        waiting = self._waiting.get(key)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                del self._waiting[key]

    async def fetch(self, spool_name: str, token: str) -> Path:
        fd, name = tempfile.mkstemp(prefix="fetched-", suffix=".dcm", dir=self._directory)
        path = Path(name)
        in_flight: deque[tuple[int, asyncio.Future[Chunk]]] = deque()
        try:
            offset = 0
            window = 1  # the first request alone: most files are one chunk (and one check)
            while True:
                while len(in_flight) < window:
                    in_flight.append((offset, await self._request(spool_name, token, offset)))
                    offset += MAX_CHUNK
                at, future = in_flight.popleft()
                try:
                    chunk = await asyncio.wait_for(future, _FETCH_TIMEOUT)
                except TimeoutError:
                    raise FetchError(
                        f"no chunk of {spool_name} within {_FETCH_TIMEOUT:.0f} s"
                    ) from None
                finally:
                    self._forget(spool_name, token, at, future)
                if chunk.error:
                    raise FetchError(chunk.error)
                os.pwrite(fd, chunk.data, at)
                if chunk.eof:  # every earlier chunk is written: they came in order
                    break
                window = _FETCH_WINDOW
            return path
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            for at, future in in_flight:
                self._forget(spool_name, token, at, future)
            os.close(fd)


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        spool: Spool | None,
        endpoint: str,
        *,
        curve: tuple[bytes, KeyPair] | None = None,
        fetch_dir: Path | None = None,
        calling_ae: str = "ROUTER",
        destinations: tuple[str, ...] | None = None,
        credit: int = 16,
        policy: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        heartbeat: float = 2.0,
        audit: AuditLog | None = None,
        study_uids: Callable[[Iterable[int]], dict[int, str | None]] | None = None,
        tls_for: Callable[[str], TlsOptions | None] | None = None,
    ) -> None:
        self.name = f"worker-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._queue = queue
        self._spool = spool  # None: no access to the node's spool; fetch files instead
        self._fetched = FetchedFiles(fetch_dir)
        self._endpoint = endpoint
        self._curve = curve  # (the dispatcher's public key, ours)
        self._calling_ae = calling_ae
        self._destinations = destinations
        self._credit = credit
        self._policy = policy or RetryPolicy()
        self._timeouts = timeouts or Timeouts(connect=10, acse=30, dimse=120)
        self._heartbeat = heartbeat
        self._pools: dict[str, DestinationPool] = {}
        self._leased: set[str] = set()  # destinations leased for (credit's "closed")
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._results: list[Result] = []
        self._outstanding = 0  # leases received whose credit has not gone back yet
        self._introduce = False
        # Per destination, whether the last attempt reached it (for the dispatcher's
        # destination backoff; sent with the next credit).
        self._reached: dict[str, bool] = {}
        self._results_ready = asyncio.Event()
        self._audit = audit
        self._study_uids = study_uids
        # A destination's TLS options by name (the database's), None: no TLS anywhere.
        self._tls_for = tls_for
        self._tls_cache: dict[str, tuple[float, TlsOptions | None]] = {}
        # Leases being delivered: job -> (lease, its length in seconds, wall time it ends)
        self._held: dict[int, tuple[LeaseMessage, float, float]] = {}
        self._extending: asyncio.Task[None] | None = None

    def _connect(self, context: zmq.asyncio.Context) -> None:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 1000)
        if self._curve is not None:
            server_key, ours = self._curve
            socket.curve_serverkey = server_key
            socket.curve_publickey = ours.public
            socket.curve_secretkey = ours.secret
        # A refused CURVE handshake is final for the connection (ZeroMQ does not try
        # again): watch for it, to say so and to reconnect later with a new socket.
        self._monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        socket.connect(self._endpoint)
        self._socket = socket
        self._fetched.socket = socket

    def _disconnect(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close()
        self._socket.close()

    async def _send(self, data: bytes) -> bool:
        """Send to the dispatcher, or give up after a heartbeat: a DEALER with no peer
        (the node down, or our key refused) would wait for one forever."""
        try:
            await asyncio.wait_for(self._socket.send(data), self._heartbeat)
            return True
        except TimeoutError:
            return False

    async def _refused(self, stop: asyncio.Event, context: zmq.asyncio.Context) -> None:
        """The node refused our key: say so, wait (it may be allowed meanwhile), retry."""
        while await self._monitor.poll(0):
            await self._monitor.recv_multipart()
        log.error(
            "%s: %s refused this worker's CURVE key (its .pub is not in the node's allowed"
            " directory); trying again in %.0f s",
            self.name,
            self._endpoint,
            _REFUSED_RETRY,
        )
        self._disconnect()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _REFUSED_RETRY)
        self._connect(context)
        await self._send(self._hello())

    async def run(self, stop: asyncio.Event) -> None:
        context = zmq.asyncio.Context()
        self._connect(context)
        await self._send(self._hello())
        recorder = asyncio.ensure_future(self._record_results())
        last_beat = last_lease = time.monotonic()
        try:
            while not stop.is_set():
                if await self._monitor.poll(0):
                    await self._refused(stop, context)
                    continue
                if await self._socket.poll(int(self._heartbeat * 500)):
                    self._accept(await self._socket.recv())
                    last_lease = time.monotonic()
                if self._introduce:
                    self._introduce = False
                    await self._send(self._hello())
                now = time.monotonic()
                if now - last_beat >= self._heartbeat:
                    last_beat = now
                    if now - last_lease > 5 * self._heartbeat and not self._tasks:
                        # Idle with full credit: the dispatcher may have restarted and
                        # forgotten us; introducing ourselves again is harmless.
                        await self._send(self._hello())
                    else:
                        await self._send(Credit(0, closed=self._closed(self._leased)).encode())
                    await self._close_idle_pools()
                    self._extend_leases()
            await self._finish_in_flight()
            deadline = time.monotonic() + 10
            while self._results and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the recorder writes what the last sends produced
            recorder.cancel()
            await self._send(Bye().encode())
        finally:
            for pool in list(self._pools.values()):  # a delivery may still add one
                await pool.close()
            self._disconnect()
            context.term()
            await asyncio.get_running_loop().run_in_executor(None, self._queue.release, self.name)

    async def _close_idle_pools(self) -> None:
        """Release associations unused for a while. Over a snapshot: while one pool
        releases, a delivery to a destination new to this worker adds its pool (the
        worker died of "dictionary changed size during iteration")."""
        for pool in list(self._pools.values()):
            await pool.close_idle()

    def _hello(self) -> bytes:
        free = max(0, self._credit - self._outstanding)
        open_ = tuple(
            name for name, pool in self._pools.items() for _ in range(pool.open_associations)
        )
        return Hello(
            self.name, self._destinations, free, open=open_, pid=os.getpid(), pid_ns=pid_namespace()
        ).encode()

    def _closed(self, names: Iterable[str]) -> tuple[str, ...] | None:
        """Of ``names``, those this worker holds no association to: the dispatcher
        gives their shares of the node-wide limit to other workers (1.4)."""
        closed = tuple(
            sorted(
                name
                for name in names
                if (pool := self._pools.get(name)) is None or pool.open_associations == 0
            )
        )
        return closed or None

    def _accept(self, data: bytes) -> None:
        try:
            message = decode(data)
        except MessageError as exc:
            log.warning("%s: dropped a bad message: %s", self.name, exc)
            return
        if isinstance(message, LeaseMessage):
            failpoints.hit("worker.after_claim")
            self._outstanding += 1
            self._leased.add(message.destination)
            if message.expires:  # 1.0 leases say not when they end: nothing to extend
                length = max(1.0, message.expires - time.time())
                self._held[message.job] = (message, length, message.expires)
            task = asyncio.ensure_future(self._deliver(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(partial(self._release_hold, message.job))
        elif isinstance(message, Chunk):
            self._fetched.deliver(message)
        elif isinstance(message, Who):  # the dispatcher restarted and forgot us
            self._introduce = True

    def _release_hold(self, job: int, _task: asyncio.Task[None]) -> None:
        self._held.pop(job, None)  # delivered, or failed: nothing more to extend

    def _extend_leases(self) -> None:
        """Push out, by its own length, the lease of every delivery past half of it (a
        large instance over a slow link outlives a 120 s lease; re-leased meanwhile, it
        would go out twice at once and our result would not count). One batch at a time,
        off the event loop; a lease already lost is left to its new holder."""
        if self._extending is not None and not self._extending.done():
            return
        now = time.time()
        due = [
            (lease, length)
            for lease, length, ends in self._held.values()
            if ends - now < length / 2
        ]
        if due:
            self._extending = asyncio.ensure_future(self._extend(due))

    async def _extend(self, due: list[tuple[LeaseMessage, float]]) -> None:
        loop = asyncio.get_running_loop()
        for lease, length in due:
            try:
                held = await loop.run_in_executor(
                    None, self._queue.extend, lease.job, lease.token, length
                )
            except Exception as exc:  # the database may be briefly away: next heartbeat
                log.warning(
                    "%s: could not extend the lease of job %d: %s", self.name, lease.job, exc
                )
                return
            if lease.job not in self._held:
                continue  # finished meanwhile
            if held:
                self._held[lease.job] = (lease, length, time.time() + length)
            else:
                log.warning(
                    "%s: the lease of job %d to %s expired before it could be extended;"
                    " its result will not count",
                    self.name,
                    lease.job,
                    lease.destination,
                )
                del self._held[lease.job]

    async def _finish_in_flight(self, grace: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    async def _pool(self, lease: LeaseMessage) -> DestinationPool:
        """The destination's pool, with its TLS settings read from the database (at most
        every ``_TLS_FRESH`` seconds, and at once when the lease says TLS and the cache
        says clear text): a lease names the destination, not its files."""
        tls = await self._tls_options(lease.destination, lease.tls)
        pool = self._pools.get(lease.destination)
        target = Destination(
            lease.destination,
            lease.ae_title,
            lease.host,
            lease.port,
            lease.max_associations,
            tls=tls,
        )
        if pool is not None and pool.destination == dataclasses.replace(
            target, max_associations=pool.destination.max_associations
        ):
            if pool.destination.max_associations != target.max_associations:
                pool.resize(target.max_associations)  # the dispatcher's share changed
        else:
            if pool is not None:
                await pool.close()
            pool = DestinationPool(target, self._calling_ae, self._timeouts, tls=tls_context(tls))
            self._pools[lease.destination] = pool
        return pool

    async def _tls_options(self, destination: str, says_tls: bool = False) -> TlsOptions | None:
        if self._tls_for is None:
            return None
        now = time.monotonic()
        cached = self._tls_cache.get(destination)
        if (
            cached is not None
            and now - cached[0] < _TLS_FRESH
            and not (says_tls and cached[1] is None)  # never clear text on a stale cache
        ):
            return cached[1]
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.run_in_executor(None, self._tls_for, destination)
        except Exception as exc:  # the database is briefly away: retry, never send in clear
            raise DestinationLookupError(f"reading destination {destination!r}: {exc}") from exc
        self._tls_cache[destination] = (now, tls)
        return tls

    async def _deliver(self, message: LeaseMessage) -> None:
        started = dt.datetime.now(dt.UTC)
        clock = time.perf_counter()
        fetched: Path | None = None
        judged = True  # whether the outcome says anything about reaching the destination
        try:
            failpoints.hit_for("worker.sending", message.sop_instance)
            if self._spool is not None:
                path = self._spool.path_for(message.spool_name)
            else:
                path = fetched = await self._fetched.fetch(message.spool_name, message.token)
            pool = await self._pool(message)
            outcome = await pool.send(Item(path, message.sop_class, message.transfer_syntax))
        except TlsConfigError as exc:  # never a clear-text fallback (SEC-15)
            judged = False
            outcome = Outcome(failure=Failure.TLS_NOT_VERIFIED, detail=str(exc))
        except DestinationLookupError as exc:
            judged = False
            outcome = Outcome(failure=Failure.INTERNAL_ERROR, detail=str(exc))
        except ValueError as exc:  # a spool name that is not ours: never touch the disk
            outcome = Outcome(failure=Failure.SPOOL_FILE_MISSING, detail=str(exc))
        except FetchError as exc:
            judged = False  # the node, not the destination, did not answer
            gone = str(exc) == "not found"
            outcome = Outcome(
                failure=Failure.SPOOL_FILE_MISSING if gone else Failure.CONNECTION_LOST,
                detail=f"fetching the file from the node: {exc}",
            )
        finally:
            if fetched is not None:
                fetched.unlink(missing_ok=True)
        duration_ms = int((time.perf_counter() - clock) * 1000)
        if judged and outcome.failure not in _NOT_ABOUT_REACHING:
            self._reached[message.destination] = outcome.failure not in _UNREACHABLE
        verdict, reason = classify(outcome)
        if verdict in (Verdict.DONE, Verdict.DONE_WITH_WARNING):
            failpoints.hit("worker.after_dest_success")
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
            else:
                failpoints.hit("worker.after_attempt_commit")
            done = tuple(result.lease.destination for result in batch)
            reached, self._reached = self._reached, {}
            down = tuple(name for name, ok in reached.items() if not ok)
            up = tuple(name for name, ok in reached.items() if ok)
            self._outstanding -= len(batch)
            closed = self._closed(set(done))
            await self._send(Credit(len(batch), done, down, up, closed).encode())
            if self._audit is not None:  # after the credit: the next leases come meanwhile
                await loop.run_in_executor(None, self._audit_results, batch, names)

    def _audit_results(self, batch: list[Result], names: list[str | None]) -> None:
        """An audit record per job that ended (done or dead) under a lease still held."""
        assert self._audit is not None
        recorded = [r for r, name in zip(batch, names, strict=False) if name is not None]
        ended = [r for r in recorded if r.state in (JobState.DONE, JobState.DEAD)]
        if not ended:
            return
        # Leases carry the study (messages 1.3); read it only for an older dispatcher's.
        studies = {r.lease.instance_id: r.lease.study_instance_uid for r in ended}
        unknown = [r.lease.instance_id for r in ended if not r.lease.study_instance_uid]
        try:
            if unknown and self._study_uids is not None:
                studies.update(self._study_uids(unknown))
        except Exception as exc:  # the records go without their study, not at all
            log.warning("audit: could not read the studies of %d instances: %s", len(ended), exc)
        self._audit.write(
            *(
                instance_forwarded(
                    calling_ae=self._calling_ae,
                    destination=r.lease.destination,
                    ae_title=r.lease.ae_title,
                    host=r.lease.host,
                    study_uid=studies.get(r.lease.instance_id),
                    sop_class_uid=r.lease.sop_class_uid,
                    sop_instance_uid=r.lease.sop_instance_uid,
                    delivered=r.state == JobState.DONE,
                    description=r.error or "",
                )
                for r in ended
            )
        )

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
            sop_instance_uid=message.sop_instance,
            priority=0,
            token=message.token,
            expires_at=started,
            attempts=message.attempts,
            deliveries=message.deliveries,
            study_instance_uid=message.study or None,
            tls=message.tls,
        )
        error = None if verdict is Verdict.DONE else reason
        return Result(
            lease, _STATE[state], verdict.value, started, duration_ms, outcome.status, error, when
        )
