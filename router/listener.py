"""The listener: the node's storage SCP, durable before it answers (DESIGN §3.1).

Per instance, in this order: stream the dataset into a temporary spool file while the
walker checks every element header and picks out the values the rules read; evaluate
the rules; fsync the file and rename it into the store; fsync the directory and commit
the instance row and its job rows (grouped with whatever other associations finished
meanwhile: group commit); only then answer success. Any failure before the commit
answers a failure status and leaves neither a file nor a row behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from protocol.dimse import CStoreRQ
from protocol.net import AssociationInfo, StoreOutcome
from protocol.net.server import StoreSink
from protocol.part10 import build_file_meta
from protocol.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from protocol.uids import (
    DEFLATED_EXPLICIT_VR_LE,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_valid_uid,
)
from router import failpoints
from router.audit import AuditLog, instance_received
from router.db.repository import InstanceResult, NewInstance, Repository
from router.messages import JobMessage
from router.metrics import listener_metrics
from router.rules import InstanceFacts, RuleSet
from router.settings import ListenerSettings
from router.spool import Spool, SpoolFull, TempFile
from router.walker import DatasetError, DatasetWalker, Key

log = logging.getLogger(__name__)

SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
_ALWAYS_WANTED = frozenset({SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID})
#: How often (in data set bytes) a store in progress checks the spool's room again.
ROOM_CHECK_BYTES = 1 << 20


class RuleCache:
    """The compiled rules of this process, reloaded when the database's version moves."""

    def __init__(self, repository: Repository, check_interval: float = 1.0) -> None:
        self._repository = repository
        self._interval = check_interval
        self.version = -1
        self.rules = RuleSet.compile([])
        self.sources: dict[str, tuple[str, ...]] = {}
        #: calling AE -> what it may do (catalogue SEC-05; router/node.py enforces it)
        self.operations: dict[str, frozenset[str]] = {}

    def load(self) -> None:
        """Read the version; reload rules and sources only when it moved (every change
        to rules, destinations or sources bumps it). One small indexed read otherwise."""
        version = self._repository.rules_version()
        if version != self.version:
            self.rules = RuleSet.compile(self._repository.list_rules())
            sources = self._repository.list_sources()
            self.sources = {s.ae_title: tuple(s.addresses) for s in sources}
            self.operations = {s.ae_title: frozenset(s.operations) for s in sources}
            self.version = version
            log.info("rules loaded (version %d, %d rules)", version, len(self.rules.rules))

    async def keep_fresh(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            try:
                await loop.run_in_executor(None, self.load)
            except Exception as exc:  # a database hiccup must not stop the listener
                log.warning("could not reload rules: %s", exc)


@dataclass
class _Pending:
    record: NewInstance
    temp: TempFile
    future: asyncio.Future[int]


class GroupCommitter:
    """Commits finished instances in batches: while one batch is being made durable the
    next one gathers, so concurrent associations share the directory fsync and the
    database commit; no success is answered before its own batch committed."""

    def __init__(
        self,
        repository: Repository,
        spool: Spool,
        notify: Callable[[JobMessage], None] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._repository = repository
        self._spool = spool
        self._notify = notify
        self._audit = audit
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
        self._fsync_pool = ThreadPoolExecutor(8, thread_name_prefix="spool-fsync")

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._fsync_pool.shutdown(wait=True)

    async def submit(self, record: NewInstance, temp: TempFile) -> int:
        """Make ``temp`` durable and record it; returns the instance id, or raises what
        the commit raised (the caller then discards the file)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending = _Pending(record, temp, future)
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The association ended before its response (aborted, closed, a request out of
            # turn: catalogue SM-14). From here the committer owns the file: not taken yet,
            # it goes now; taken, the batch drops or commits it (``_take``), so that no
            # other hand unlinks a file a commit in flight is renaming.
            if pending in self._queue:
                self._queue.remove(pending)
                self._spool.discard(temp)
            raise

    def _take(self) -> list[_Pending]:
        """The next batch, without instances whose association already went away (their
        files go); one cancelled later, in the commit, is committed but never
        acknowledged: the peer sends it again (at-least-once, DESIGN §3.1)."""
        batch, self._queue = self._queue, []
        for pending in batch:
            if pending.future.cancelled():
                self._spool.discard(pending.temp)
        return [pending for pending in batch if not pending.future.cancelled()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = self._take()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._commit, batch)
            except Exception as exc:
                for pending in batch:
                    if pending.future.cancelled():  # nobody left to discard it
                        self._spool.discard(pending.temp)
                    elif not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result.instance_id)
                if self._notify is not None and result.new_jobs:
                    record = pending.record
                    targets = dict.fromkeys(record.destinations)
                    for job, destination in zip(result.job_ids, targets, strict=False):
                        self._notify(
                            JobMessage(job, result.instance_id, destination, record.priority)
                        )
                failpoints.hit("listener.after_zmq_push")  # (nothing pushed without workers)
            if self._audit is not None:  # after the responses, on the commit thread
                self._executor.submit(self._audit_batch, batch, results)

    def _audit_batch(self, batch: list[_Pending], results: list[InstanceResult]) -> None:
        """One audit record per instance acknowledged, the batch in one write."""
        assert self._audit is not None
        try:
            records = [
                instance_received(
                    calling_ae=p.record.calling_aet,
                    called_ae=p.record.called_aet,
                    peer_host=p.record.peer_address,
                    study_uid=p.record.study_instance_uid,
                    sop_class_uid=p.record.sop_class_uid,
                    sop_instance_uid=p.record.sop_instance_uid,
                    duplicate=result.duplicate_of is not None,
                )
                for p, result in zip(batch, results, strict=True)
            ]
        except Exception as exc:  # never the instances' fate: they are acknowledged
            log.warning("could not build the audit records of %d instances: %s", len(batch), exc)
            return
        self._audit.write(*records)

    def _commit(self, batch: list[_Pending]) -> list[InstanceResult]:
        # One thread hand-off per batch: fsync and rename every file, fsync their
        # directories, then one database transaction (DESIGN §3.1 order).
        if len(batch) == 1:
            self._spool.commit(batch[0].temp)
        else:
            # Concurrent associations: their files' fsyncs overlap in the disk's queue.
            list(self._fsync_pool.map(self._spool.commit, [p.temp for p in batch]))
        records = [p.record for p in batch]
        self._spool.sync_directories((r.spool_name for r in records), self._fsync_pool)
        failpoints.hit("listener.after_dir_fsync")
        results = self._repository.record_instances(records)
        failpoints.hit("listener.after_db_commit")
        for record, result in zip(records, results, strict=True):
            if result.duplicate_of is not None:
                # Same bytes, same pending jobs: the earlier copy stands (DESIGN §3.1).
                self._spool.remove(record.spool_name)
        return results


SERIES_INSTANCE_UID = 0x0020000E
#: Data set UIDs the node records besides the command's (catalogue PT-02, DS-10).
_CHECKED_UIDS = {STUDY_INSTANCE_UID: "Study", SERIES_INSTANCE_UID: "Series"}


def _could_be_uid(values: tuple[str, ...]) -> bool:
    """One value of digits and periods, at most 64 characters, no empty component
    (PS3.5 9.1). Leading zeros, which some old devices write, are let through: a router
    refusing a study for them would stall the modality's queue over nothing."""
    if len(values) != 1 or not 0 < len(values[0]) <= 64:
        return False
    components = values[0].split(".")
    return all(c.isascii() and c.isdigit() for c in components)


#: Deflated bytes a background walk reads per step: it checks for a stop between steps,
#: and 4 KiB inflate to at most ~4 MiB (deflate's ratio is at most 1032:1).
WALK_STEP = 4096


class BackgroundWalk:
    """Walks a deflated data set off the event loop (catalogue RX-18).

    A deflate bomb of small elements inflates ~674:1 and its headers are walked in Python
    (~50 ms per inflated MiB): walked inside ``data_received`` one read would stall every
    association of the listener for seconds. The spool file is the queue: the writer
    reports how far it has written, this thread ``pread``s from its own read-only descriptor of the
    file (its descriptor closed by the thread itself on every path) and feeds the walker;
    nothing is held in memory. Every element header is still walked (DESIGN §3.1): the
    sink judges the data set only after ``wait`` says the whole file was walked.
    """

    def __init__(self, walker: DatasetWalker, path: Path, start: int) -> None:
        self.walker = walker
        # The spool's descriptor is write-only: a read-only one of the same (just
        # created, router-named) file, opened here so it exists before the thread does.
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._offset = start
        self._written = start
        self._ended = False
        self._stopped = False
        self._cond = threading.Condition()
        # Until the walk finishes, the data set counts as not walked: never stored.
        self.error: DatasetError | None = DatasetError("the data set was not walked to its end")
        self.values: dict[Key, tuple[str, ...]] = {}
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="deflate-walk", daemon=True)
        try:
            self._thread.start()
        except RuntimeError:
            os.close(self._fd)
            raise

    def written(self, end: int) -> None:
        with self._cond:
            self._written = end
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    async def wait(self) -> None:
        """Every byte written walked (and the walk finished), or the first error."""
        with self._cond:
            self._ended = True
            self._cond.notify()
        await self._done

    def _run(self) -> None:
        try:
            self._walk()
        except DatasetError as exc:
            self.error = exc
        except OSError as exc:  # pread failed: the store fails, not the thread
            self.error = DatasetError(f"reading the spooled data set failed: {exc}")
        finally:
            os.close(self._fd)
            # RuntimeError: the loop closed meanwhile, and nobody waits.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_set_done, self._done)

    def _walk(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and self._written == self._offset and not self._ended:
                    self._cond.wait()
                if self._stopped:
                    return
                end, ended = self._written, self._ended
            if self._offset == end and ended:
                self.values = self.walker.finish()
                self.error = None
                return
            chunk = os.pread(self._fd, min(WALK_STEP, end - self._offset), self._offset)
            if not chunk:
                raise DatasetError("spooled data set is shorter than written")
            self._offset += len(chunk)
            self.walker.feed(chunk)


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class IngestSink:
    """Receives one C-STORE dataset into the spool; ``finish`` makes it durable."""

    def __init__(
        self,
        node: ListenerNode,
        info: AssociationInfo,
        request: CStoreRQ,
        transfer_syntax: str,
        temp: TempFile,
    ) -> None:
        self._node = node
        self._info = info
        self._request = request
        self._transfer_syntax = transfer_syntax
        self._temp = temp
        self._rules = node.rules.rules
        wanted = self._rules.wanted_tags | _ALWAYS_WANTED | _CHECKED_UIDS.keys()
        self._walker = DatasetWalker(
            transfer_syntax,
            wanted,
            self._rules.wanted_sequence_tags,
            max_inflated_bytes=node.settings.max_inflated_bytes,
        )
        self._digest = hashlib.sha256()
        self._size = 0
        self._error: str | None = None
        self._submitted = False
        self._next_room_check = ROOM_CHECK_BYTES  # on_store checked the room at 0
        meta = build_file_meta(
            request.affected_sop_class_uid,
            request.affected_sop_instance_uid,
            transfer_syntax,
            IMPLEMENTATION_CLASS_UID,
            IMPLEMENTATION_VERSION_NAME,
            source_ae=info.calling_ae,
        )
        self._write(meta)
        self._end = len(meta)
        self._background: BackgroundWalk | None = None
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
            self._background = BackgroundWalk(self._walker, temp.path, self._end)

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._temp.fd, view)
            view = view[written:]

    def write(self, data: bytes | memoryview) -> None:
        if self._size >= self._next_room_check:
            # Catalogue RX-09/RX-13: a data set that never ends (or a disk filling up
            # under a big one) stops growing at the spool's high-water mark, within
            # ROOM_CHECK_BYTES plus one fragment; SpoolFull (an OSError) makes the server
            # discard this file and answer 0xA700 once the data set ends.
            self._next_room_check = self._size + ROOM_CHECK_BYTES
            self._node.spool.check_room()
        self._write(data)
        self._size += len(data)
        self._end += len(data)
        self._digest.update(data)
        if self._background is not None:
            self._background.written(self._end)
        elif self._error is None:
            try:
                self._walker.feed(data)
            except DatasetError as exc:
                self._error = str(exc)

    def discard(self) -> None:
        if self._background is not None:
            self._background.stop()  # it closes its own descriptor within one step
        self._node.spool.discard(self._temp)

    async def finish(self) -> StoreOutcome:
        failpoints.hit("listener.received_last_fragment")
        started = time.perf_counter()
        try:
            outcome = await self._finish()
        except asyncio.CancelledError:
            if not self._submitted:  # submitted, the committer owns the file
                self.discard()
            raise
        except Exception as exc:  # disk or database: refuse, keep nothing (DESIGN §3.1)
            log.warning("%s: storing failed: %s", self._info.peer, exc)
            self.discard()
            self._node.metrics.refused()
            return StoreOutcome(OUT_OF_RESOURCES, "the router could not store the instance")
        if outcome.status != SUCCESS:
            self.discard()
            self._node.metrics.refused()
        else:
            self._node.metrics.stored(self._size, time.perf_counter() - started)
            if failpoints.armed("listener.after_rsp_sent"):
                # The server writes the response as soon as this returns, in the same
                # step of its task: the next turn of the loop comes after that write.
                asyncio.get_running_loop().call_soon(failpoints.hit, "listener.after_rsp_sent")
        return outcome

    async def _finish(self) -> StoreOutcome:
        request = self._request
        if self._background is not None:
            await self._background.wait()
            if self._background.error is not None:
                self._error = str(self._background.error)
            values = self._background.values
        elif self._error is None:
            try:
                values = self._walker.finish()
            except DatasetError as exc:
                self._error = str(exc)
        if self._error is not None:
            return StoreOutcome(CANNOT_UNDERSTAND, f"cannot parse the data set: {self._error}"[:64])
        if self._walker.file_meta_elements:
            # Catalogue DS-08, policy: refused, not stripped. Kept, they would follow our
            # meta header in the spool file and a Part 10 reader would take them as part
            # of it (a peer's Transfer Syntax UID overriding the context's).
            return StoreOutcome(CANNOT_UNDERSTAND, "file meta elements (0002,xxxx) in the data set")
        if values.get(SOP_INSTANCE_UID, (request.affected_sop_instance_uid,)) != (
            request.affected_sop_instance_uid,
        ) or values.get(SOP_CLASS_UID, (request.affected_sop_class_uid,)) != (
            request.affected_sop_class_uid,
        ):
            # Catalogue DM-09: never store under one UID and route under another.
            return StoreOutcome(
                DATASET_DOES_NOT_MATCH_SOP_CLASS, "data set UIDs differ from the command"
            )
        for tag, name in _CHECKED_UIDS.items():
            # Absent is allowed (DS-09); present, it must be a UID: never ``..`` or a path
            # in the database and audit records (PT-02), nor 65+ characters (DS-10).
            if tag in values and not _could_be_uid(values[tag]):
                return StoreOutcome(CANNOT_UNDERSTAND, f"invalid {name} Instance UID")
        facts = InstanceFacts(
            values, self._info.calling_ae, self._info.called_ae, self._info.peer_host
        )
        decision = self._rules.match(facts)
        destinations = decision.destinations
        if not destinations and self._node.settings.unrouted_policy == "reject":
            log.warning(
                "%s: instance matched no rule; refused (unrouted_policy = reject)", self._info.peer
            )
            return StoreOutcome(PROCESSING_FAILURE, "no routing rule matched")
        study = values.get(STUDY_INSTANCE_UID, ())
        record = NewInstance(
            sop_instance_uid=request.affected_sop_instance_uid,
            sop_class_uid=request.affected_sop_class_uid,
            transfer_syntax=self._transfer_syntax,
            study_instance_uid=study[0] if study else None,
            calling_aet=self._info.calling_ae,
            called_aet=self._info.called_ae,
            peer_address=self._info.peer_host,
            spool_name=self._temp.spool_name,
            size=self._size,
            digest=self._digest.hexdigest(),
            destinations=tuple(destinations),
            unrouted=not destinations,
            # PS3.7 C.4.1.1: 0 medium, 1 high, 2 low; anything else is stored as medium.
            priority=request.priority if request.priority in (0, 1, 2) else 0,
        )
        self._submitted = True
        await self._node.committer.submit(record, self._temp)
        if not destinations:  # after the commit: an instance never kept is not "kept"
            log.warning("%s: instance matched no rule; kept as unrouted", self._info.peer)
        return StoreOutcome(SUCCESS)


class ListenerNode:
    """The ``ServiceHandler`` of the node's SCP."""

    def __init__(
        self,
        settings: ListenerSettings,
        repository: Repository,
        spool: Spool,
        rules: RuleCache,
        committer: GroupCommitter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.spool = spool
        self.rules = rules
        self.committer = committer
        self._clock = clock
        self.metrics = listener_metrics()

    def on_echo(self, info: AssociationInfo) -> int:
        return SUCCESS

    def on_store(
        self, info: AssociationInfo, request: CStoreRQ, transfer_syntax: str
    ) -> StoreSink | StoreOutcome:
        answer = self._open_sink(info, request, transfer_syntax)
        if isinstance(answer, StoreOutcome):
            self.metrics.refused()
        return answer

    def _open_sink(
        self, info: AssociationInfo, request: CStoreRQ, transfer_syntax: str
    ) -> StoreSink | StoreOutcome:
        if not is_valid_uid(request.affected_sop_instance_uid):
            # Catalogue PT-01..PT-06: refuse, whatever the name would have been.
            return StoreOutcome(CANNOT_UNDERSTAND, "invalid Affected SOP Instance UID")
        if not is_valid_uid(request.affected_sop_class_uid):
            return StoreOutcome(CANNOT_UNDERSTAND, "invalid Affected SOP Class UID")
        try:
            self.spool.check_room()
            temp = self.spool.create_temp()
        except SpoolFull as exc:
            log.warning("%s: refusing instance: %s", info.peer, exc)
            return StoreOutcome(OUT_OF_RESOURCES, "the router's spool is full")
        try:
            return IngestSink(self, info, request, transfer_syntax, temp)
        except OSError:
            self.spool.discard(temp)
            raise
