"""Catalogue B.7: crash and fault injection (listener, dispatcher, worker, queue).

One forwarding node walks through every durability boundary (router/failpoints.py):
``serve --listeners 4 --workers 4`` with two DCMTK storescp destinations and ALL
failpoints armed once (``DICOM_ROUTER_FAILPOINT_ONCE``), so each boundary SIGKILLs its
process exactly once while the supervisor restarts what died (several listeners and
workers keep the supervisor's restart pauses short: each process name has its own).
Instances are stored one at a time, so the listener dies at its boundaries in order:
received_last_fragment, after_file_fsync, after_rename, after_dir_fsync (FI-01),
after_db_commit, after_zmq_push (FI-02; FI-03 for the job no notice announced),
after_rsp_sent (FI-03). Whatever was not acknowledged is sent again, as a modality
would. The jobs being forwarded meanwhile meet the dispatcher's boundaries
(after_lease_commit, after_lease_sent: FI-14, the PULL side restarted) and the worker's
(after_claim, mid_send: FI-06; after_dest_success, after_attempt_commit: FI-07). Then,
in the same run: a SIGKILL of the listener during a 32 MiB receive (FI-05, scaled down
from 2 GiB), SIGTERM while instances arrive (FI-10), stale state planted while the node
is down (a temporary file, a spool file without a row, a job leased by a dead worker
whose lease expired: FI-19), a restart, four associations storing at once into the
four listeners while the four workers forward (FI-13, SQLite contention), the drain, a
spool file deleted under a waiting job (FI-20), a job dead-lettered by a refusing
destination, its file kept and ``queue retry`` (FI-21), and ``PRAGMA integrity_check``. FI-09
(SIGKILL of the supervisor) has a node of its own. The tests below assert on what the
walk recorded, one per case and boundary.

The promises (catalogue B.7's invariant): every instance acknowledged with a success
status is, after recovery and draining, at every destination (at least once); nothing
half-written remains after the next start's recovery; no job is leased or dead.

FI-04 (power loss) is shown by a system-call trace (DESIGN §8): the listener runs under
``strace -f`` while DCMTK storescu stores; per instance the file fsync, the rename into
the spool, the directory fsync, the WAL write and fsync of the database, and the C-STORE
response on the socket come in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crash_support import DESTINATIONS, Node, StoreSCP, alive, cli_argv, kill_group
from ingest_support import (
    CT_IMAGE,
    EXPLICIT_LE,
    HOST,
    OUT_OF_RESOURCES,
    SUCCESS,
    encode_dataset,
    make_dataset,
    open_association,
    require_dcmtk,
    write_part10,
)

from protocol.errors import ProtocolError

BEFORE_COMMIT = (
    "listener.received_last_fragment",
    "listener.after_file_fsync",
    "listener.after_rename",
    "listener.after_dir_fsync",
)
AFTER_COMMIT = ("listener.after_db_commit", "listener.after_zmq_push")
LISTENER_POINTS = (*BEFORE_COMMIT, *AFTER_COMMIT, "listener.after_rsp_sent")
DISPATCHER_POINTS = ("dispatcher.after_lease_commit", "dispatcher.after_lease_sent")
WORKER_POINTS = (
    "worker.after_claim",
    "worker.mid_send",
    "worker.after_dest_success",
    "worker.after_attempt_commit",
)
ALL_POINTS = (*LISTENER_POINTS, *DISPATCHER_POINTS, *WORKER_POINTS)
LEASE_SECONDS = 3
BIG = 32 << 20  # FI-05's receive, scaled down from 2 GiB (the kill comes at 4 MiB)
CONTENTION = 160  # FI-13: instances stored over four associations at once
WAIT = 120.0  # generous: the machine may be loaded (assert behaviour, not speed)
LIVE = ("pending", "leased", "retry_wait")


# The walk is one long fixture (it is charged to its first test); a loaded machine is
# slow, not wrong.
pytestmark = pytest.mark.timeout(900)


def _ids(points: tuple[str, ...]) -> list[str]:
    return [p.split(".", 1)[1] for p in points]


# --------------------------------------------------------------------------------------
# sending
# --------------------------------------------------------------------------------------
def _instance(rows: int = 8) -> tuple[str, bytes]:
    ds = make_dataset("CT", rows=rows, columns=rows)
    return str(ds.SOPInstanceUID), encode_dataset(ds, EXPLICIT_LE)


def _big_instance() -> tuple[str, bytes]:
    ds = make_dataset("CT", rows=16, columns=16)
    ds.Rows = ds.Columns = 4096
    ds.PixelData = os.urandom(BIG)
    return str(ds.SOPInstanceUID), encode_dataset(ds, EXPLICIT_LE)


async def _store_once(port: int, uid: str, data: bytes) -> int | None:
    """The C-STORE status, or None when the association died without one (a status
    that came back counts even if the release then failed)."""
    status: int | None = None
    with contextlib.suppress(ProtocolError, OSError, TimeoutError):
        async with open_association(port, dimse_timeout=60) as assoc:
            status = (await assoc.send_c_store(data, CT_IMAGE, uid, EXPLICIT_LE)).status
    return status


def _store(port: int, uid: str, data: bytes) -> int | None:
    return asyncio.run(_store_once(port, uid, data))


def _store_until_acknowledged(port: int, uid: str, data: bytes, tries: int = 20) -> int | None:
    """Send again until a success status (the node may be restarting a listener)."""
    status = None
    for _ in range(tries):
        status = _store(port, uid, data)
        if status == SUCCESS:
            return status
        time.sleep(0.5)
    return status


def _wait(condition: object, timeout: float = WAIT, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(step)
    return bool(condition())  # type: ignore[operator]


# --------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------


@dataclass
class Stored:
    uid: str
    status: int | None  # of the store that met the failpoint
    rows: int  # instance rows right after the kill
    jobs: int  # their jobs
    resend: int | None = None  # status of the modality's re-send (if it had to)


@dataclass
class Walk:
    node: Node
    scps: list[StoreSCP]
    once: Path
    serve_args: tuple[str, ...] = ()
    stored: dict[str, Stored] = field(default_factory=dict)  # listener point -> store
    acknowledged: set[str] = field(default_factory=set)
    fired: set[str] = field(default_factory=set)
    big_uid: str = ""
    big_status: int | None = -1
    big_partial: list[str] = field(default_factory=list)  # .part files after the kill
    big_resend: int | None = None
    planted: dict[str, object] = field(default_factory=dict)
    after_recovery: tuple[list[str], list[str]] = ([], [])  # tmp files, unrecorded files
    sigterm_exit: int | None = None
    sigterm_acknowledged: set[str] = field(default_factory=set)
    sigterm_unrecorded: list[str] = field(default_factory=list)
    received: dict[str, dict[str, int]] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    stuck: list[tuple[object, ...]] = field(default_factory=list)
    dead: list[tuple[object, ...]] = field(default_factory=list)
    redelivered: int = 0
    kept_files_of_done: list[str] = field(default_factory=list)
    final_exit: int | None = None
    kills_in_log: int = 0
    deleted: tuple[object, str, str] = (0, "", "")  # FI-20: job, state, last error
    contention: dict[str, int] = field(default_factory=dict)  # FI-13: uid -> status
    contention_unrecorded: list[str] = field(default_factory=list)
    integrity: list[tuple[object, ...]] = field(default_factory=list)
    retention: dict[str, object] = field(default_factory=dict)  # FI-21
    errors: list[str] = field(default_factory=list)

    def note(self, problem: str) -> None:
        self.errors.append(f"{problem}\n{self.node.log_tail(3000)}")

    def rows(self, uid: str) -> tuple[int, int]:
        [(instances, jobs)] = self.node.query(
            "select count(distinct i.id), count(j.id) from instances i"
            " left join jobs j on j.instance_id = i.id where i.sop_instance_uid = ?",
            uid,
        )
        return int(instances), int(jobs)  # type: ignore[call-overload]

    def copies(self, uid: str) -> list[int]:
        return [self.received[scp.name].get(uid, 0) for scp in self.scps]

    def message(self) -> str:
        return "\n".join(self.errors)


def _fired(once: Path) -> set[str]:
    return {p.name for p in once.iterdir()}


def _walk_listener(walk: Walk) -> None:
    """Store one instance per listener boundary; each dies at the next one in order. A
    store that met none (it reached a listener the supervisor was still restarting, or
    a connection queued on the one that just died) is not counted: another is sent."""
    node = walk.node
    for point in LISTENER_POINTS:
        for _ in range(5):
            before = _fired(walk.once)
            uid, data = _instance()
            _resend[uid] = data
            status = _store(node.port, uid, data)
            if status == SUCCESS:
                walk.acknowledged.add(uid)
            # The kill is in the listener: its mark is made before the SIGKILL.
            _wait(lambda b=before: bool(_fired(walk.once) - b), 10 if status is None else 3)  # type: ignore[misc]
            new = _fired(walk.once) - before
            instances, jobs = walk.rows(uid)
            if new & set(LISTENER_POINTS):
                if new & set(LISTENER_POINTS) != {point}:
                    walk.note(f"expected {point}, fired {sorted(new)}")
                walk.stored[point] = Stored(uid, status, instances, jobs)
                break
            if status != SUCCESS:
                walk.stored.setdefault("(none)", Stored(uid, status, instances, jobs))
        else:
            walk.note(f"{point} did not fire")
    for point, stored in walk.stored.items():
        if stored.status != SUCCESS:
            stored.resend = _store_until_acknowledged(node.port, stored.uid, _resend[stored.uid])
            if stored.resend == SUCCESS:
                walk.acknowledged.add(stored.uid)
            else:
                walk.note(f"the re-send after {point} got {stored.resend}")


_resend: dict[str, bytes] = {}


def _listener_with(node: Node, path: Path) -> int | None:
    """The pid of the listener holding ``path`` open."""
    status = node.status()
    for proc in status.processes if status else ():
        if not proc.name.startswith("listener") or proc.pid is None:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(path):
                        return proc.pid
    return None


def _kill_mid_receive(walk: Walk) -> None:
    """FI-05: SIGKILL the listener receiving a big instance once 4 MiB are in its
    temporary file; the sender must see no success."""
    node, tmp = walk.node, walk.node.data_dir / "spool" / "tmp"
    uid, data = _big_instance()
    _resend[uid] = data
    walk.big_uid = uid
    result: dict[str, int | None] = {}
    sender = threading.Thread(target=lambda: result.update(status=_store(node.port, uid, data)))
    sender.start()
    killed = False
    deadline = time.monotonic() + WAIT
    while not killed and sender.is_alive() and time.monotonic() < deadline:
        for part in tmp.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if part.stat().st_size >= 4 << 20:
                    pid = _listener_with(node, part)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed = True
                        break
        time.sleep(0.01)
    sender.join(WAIT)
    walk.big_status = result.get("status")
    walk.big_partial = sorted(p.name for p in tmp.glob("*.part"))
    if not killed:
        walk.note("the big receive was never caught in the spool")


def _more_traffic(walk: Walk, count: int) -> list[str]:
    uids = []
    for _ in range(count):
        uid, data = _instance()
        _resend[uid] = data
        if _store_until_acknowledged(walk.node.port, uid, data) == SUCCESS:
            walk.acknowledged.add(uid)
            uids.append(uid)
    return uids


def _sigterm_under_load(walk: Walk) -> dict[str, bytes]:
    """FI-10: SIGTERM while two associations store; serve exits 0 and everything that
    was acknowledged is recorded. Returns what was not acknowledged (sent again later)."""
    node = walk.node
    corpus = dict(_instance() for _ in range(60))
    _resend.update(corpus)
    acknowledged: set[str] = set()
    work = iter(corpus.items())

    async def sender() -> None:
        with contextlib.suppress(ProtocolError, OSError, TimeoutError):
            async with open_association(node.port, dimse_timeout=60) as assoc:
                for uid, data in work:
                    rsp = await assoc.send_c_store(data, CT_IMAGE, uid, EXPLICIT_LE)
                    if rsp.status == SUCCESS:
                        acknowledged.add(uid)

    async def both() -> None:
        await asyncio.gather(sender(), sender())

    thread = threading.Thread(target=lambda: asyncio.run(both()))
    thread.start()
    _wait(lambda: len(acknowledged) >= 10, WAIT, 0.01)
    walk.sigterm_exit = node.stop(WAIT)
    thread.join(WAIT)
    walk.sigterm_acknowledged = set(acknowledged)
    recorded = {str(u) for (u,) in node.query("select sop_instance_uid from instances")}
    walk.sigterm_unrecorded = sorted(acknowledged - recorded)
    walk.acknowledged |= acknowledged
    return {uid: data for uid, data in corpus.items() if uid not in acknowledged}


def _plant_stale_state(walk: Walk, waiting: list[str]) -> None:
    """FI-19, while the node is down: what a crash can leave behind. A temporary file,
    a committed-looking spool file without a row, and a job leased by a worker that died,
    its lease expired (of an instance whose archive job could not finish: archive was
    down, so its spool file is still there)."""
    node = walk.node
    spool = node.data_dir / "spool"
    temp = spool / "tmp" / f"{uuid.uuid4().hex}.part"
    temp.write_bytes(b"\0" * 1000)
    ident = uuid.uuid4().hex
    orphan = spool / "store" / ident[:2] / f"{ident}.dcm"
    orphan.write_bytes(b"\0" * 1000)
    uid = waiting[0]
    [(job,)] = node.query(
        "select j.id from jobs j join instances i on i.id = j.instance_id"
        " join destinations d on d.id = j.destination_id where i.sop_instance_uid = ?"
        " and d.name = 'archive'",
        uid,
    )
    with contextlib.closing(sqlite3.connect(node.data_dir / "router.sqlite", timeout=30)) as db:
        db.execute(
            "update jobs set state = 'leased', lease_owner = 'worker-1-dead00',"
            " lease_token = 'dead', lease_expires_at = '2000-01-01 00:00:00.000000',"
            " deliveries = deliveries + 1 where id = ?",
            (job,),
        )
        db.commit()
    walk.planted = {"temp": temp.name, "orphan": f"{ident[:2]}/{ident}.dcm", "job": job}
    walk.planted["uid"] = uid


def _contention(walk: Walk) -> None:
    """FI-13: four associations store at once into four listeners (four workers are
    forwarding meanwhile): every store is answered."""
    node = walk.node
    corpus = dict(_instance() for _ in range(CONTENTION))
    work = iter(corpus.items())

    async def sender() -> None:
        async with open_association(node.port, dimse_timeout=60) as assoc:
            for uid, data in work:
                rsp = await assoc.send_c_store(data, CT_IMAGE, uid, EXPLICIT_LE)
                walk.contention[uid] = rsp.status

    async def senders() -> None:
        await asyncio.gather(*(sender() for _ in range(4)))

    asyncio.run(senders())
    acknowledged = {uid for uid, status in walk.contention.items() if status == SUCCESS}
    recorded = {str(u) for (u,) in node.query("select sop_instance_uid from instances")}
    walk.contention_unrecorded = sorted(acknowledged - recorded)
    walk.acknowledged |= acknowledged


def _drain(walk: Walk) -> None:
    node = walk.node

    def settled() -> bool:
        received = [set(scp.received()) for scp in walk.scps]
        arrived = all(walk.acknowledged <= got for got in received)
        return arrived and not any(node.job_states().get(s) for s in LIVE)

    if not _wait(settled, WAIT, 0.5):
        walk.note("the node did not drain")

    def janitor_done() -> list[str]:
        rows = node.query(
            "select i.spool_name from instances i where not exists (select 1 from jobs j"
            " where j.instance_id = i.id and j.state != 'done')"
        )
        names = {str(name) for (name,) in rows}
        store = node.data_dir / "spool" / "store"
        return sorted(
            f"{p.parent.name}/{p.name}"
            for p in store.rglob("*.dcm")
            if f"{p.parent.name}/{p.name}" in names
        )

    _wait(lambda: not janitor_done(), 30, 0.5)
    walk.kept_files_of_done = janitor_done()
    walk.received = {scp.name: dict(scp.received()) for scp in walk.scps}
    walk.states = node.job_states()
    walk.stuck = node.query("select id, lease_owner from jobs where state = 'leased'")
    walk.dead = node.query("select id, last_error from jobs where state = 'dead'")
    walk.redelivered = int(
        node.query("select count(*) from jobs where deliveries > attempts")[0][0]  # type: ignore[call-overload]
    )


def _spool_file_deleted(walk: Walk) -> None:
    """FI-20: an instance whose archive job waits (archive down) loses its spool file
    to someone else; once archive is back the job is dead with the reason, not retried."""
    node = walk.node
    archive = next(scp for scp in walk.scps if scp.name == "archive")
    archive.stop()
    [uid] = _more_traffic(walk, 1)
    walk.acknowledged.discard(uid)  # nothing is left to deliver to archive
    _wait(lambda: uid in walk.scps[0].received(), WAIT, 0.2)  # pacs has it
    [(job, spool_name)] = node.query(
        "select j.id, i.spool_name from jobs j join instances i on i.id = j.instance_id"
        " join destinations d on d.id = j.destination_id"
        " where i.sop_instance_uid = ? and d.name = 'archive'",
        uid,
    )
    (node.data_dir / "spool" / "store" / str(spool_name)).unlink()
    archive.start()

    def state() -> tuple[str, str]:
        [(st, error)] = node.query("select state, last_error from jobs where id = ?", job)
        return str(st), str(error)

    _wait(lambda: state()[0] == "dead", WAIT, 0.2)
    walk.deleted = (job, *state())


def _dead_letter_kept_and_retried(walk: Walk) -> None:
    """FI-21: archive refuses every association (a permanent reject: dead letter at
    once) while pacs takes the instance; its spool file stays while the archive job is
    dead; once archive accepts again, ``queue retry`` delivers it and the file goes."""
    node = walk.node
    archive = next(scp for scp in walk.scps if scp.name == "archive")
    archive.stop()
    archive.start("--refuse")
    [uid] = _more_traffic(walk, 1)
    walk.acknowledged.discard(uid)  # its delivery is this case's own assertion
    [(job, spool_name)] = node.query(
        "select j.id, i.spool_name from jobs j join instances i on i.id = j.instance_id"
        " join destinations d on d.id = j.destination_id"
        " where i.sop_instance_uid = ? and d.name = 'archive'",
        uid,
    )

    def state() -> str:
        return str(node.query("select state from jobs where id = ?", job)[0][0])

    _wait(lambda: state() == "dead" and uid in walk.scps[0].received(), WAIT, 0.2)
    time.sleep(5)  # two janitor sweeps: it must leave the file of a dead job alone
    path = node.data_dir / "spool" / "store" / str(spool_name)
    walk.retention = {"dead": state(), "kept": path.exists()}
    archive.stop()
    archive.start()
    node.cli("queue", "retry", "--destination", "archive")
    _wait(lambda: state() == "done" and uid in archive.received(), WAIT, 0.2)
    _wait(lambda: not path.exists(), 30, 0.5)
    walk.retention.update(retried=state(), removed=not path.exists())


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    require_dcmtk("storescp")
    root = tmp_path_factory.mktemp("b7walk")
    once = root / "once"
    once.mkdir()
    scps = [StoreSCP(root, name) for name in DESTINATIONS]
    env = {
        "DICOM_ROUTER_FAILPOINT": ",".join(ALL_POINTS),
        "DICOM_ROUTER_FAILPOINT_ONCE": str(once),
    }
    node = Node(root, lease_seconds=LEASE_SECONDS, env=env)
    serve_args = ("--listeners", "4", "--workers", "4")
    walk = Walk(node, scps, once, serve_args)
    began = time.monotonic()

    def step(name: str) -> None:
        print(f"b7 walk: {name} at {time.monotonic() - began:.1f} s", flush=True)

    try:
        for scp in scps:
            scp.start()
        node.configure(scps)
        node.start(*serve_args, timeout=WAIT)
        step("serve up")
        _walk_listener(walk)
        step("listener boundaries walked")
        _kill_mid_receive(walk)
        step("killed mid-receive")
        _more_traffic(walk, 12)  # jobs for the dispatcher's and workers' boundaries
        if not _wait(lambda: _fired(once) >= set(ALL_POINTS), WAIT, 0.5):
            _more_traffic(walk, 12)
            _wait(lambda: _fired(once) >= set(ALL_POINTS), WAIT, 0.5)
        walk.fired = _fired(once)
        step(f"{len(walk.fired)} boundaries fired")
        archive = next(scp for scp in scps if scp.name == "archive")
        archive.stop()  # instances whose archive jobs cannot finish: their files stay
        waiting = _more_traffic(walk, 2)
        unacknowledged = _sigterm_under_load(walk)
        step("SIGTERM under load")
        _plant_stale_state(walk, waiting)
        archive.start()  # the same port: the destination is back before the node
        for name in ("DICOM_ROUTER_FAILPOINT", "DICOM_ROUTER_FAILPOINT_ONCE"):
            node.env.pop(name)
        node.start(*serve_args, timeout=WAIT)
        leftovers = node.spool_leftovers()
        walk.after_recovery = (
            sorted(p.name for p in leftovers[0]),
            sorted(f"{p.parent.name}/{p.name}" for p in leftovers[1]),
        )
        step("restarted")
        for uid, data in [(walk.big_uid, _resend[walk.big_uid]), *unacknowledged.items()]:
            status = _store_until_acknowledged(node.port, uid, data)
            if uid == walk.big_uid:
                walk.big_resend = status
            if status == SUCCESS:
                walk.acknowledged.add(uid)
        _contention(walk)
        step("contention")
        _drain(walk)
        step("drained")
        _spool_file_deleted(walk)
        step("spool file deleted")
        _dead_letter_kept_and_retried(walk)
        step("dead letter retried")
        walk.dead = [row for row in walk.dead if row[0] != walk.deleted[0]]
        walk.final_exit = node.stop(WAIT)
        walk.integrity = node.query("pragma integrity_check")
        walk.kills_in_log = node.log_path.read_text(errors="replace").count("(status -9)")
        yield walk
    finally:
        node.kill_all()
        for scp in scps:
            scp.stop()


def _assert_no_loss(walk: Walk) -> None:
    assert not walk.errors, walk.message()
    lost = {scp.name: sorted(walk.acknowledged - set(walk.received[scp.name])) for scp in walk.scps}
    assert not any(lost.values()), f"acknowledged but never delivered: {lost}"
    assert set(walk.states) == {"done"}, walk.states
    assert not walk.stuck and not walk.dead, (walk.stuck, walk.dead)
    assert walk.after_recovery == ([], []), (
        f"left after the start-up recovery: {walk.after_recovery}"
    )


# --------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", BEFORE_COMMIT, ids=_ids(BEFORE_COMMIT))
def test_fi_01_listener_killed_before_the_commit_no_success_no_row_resend_forwarded(
    walk: Walk, point: str
) -> None:
    stored = walk.stored[point]
    assert point in walk.fired
    assert stored.status is None, f"{point}: the sender got status {stored.status}"
    assert (stored.rows, stored.jobs) == (0, 0), f"{point}: a row before any commit"
    assert stored.resend == SUCCESS
    assert all(n >= 1 for n in walk.copies(stored.uid)), walk.copies(stored.uid)
    _assert_no_loss(walk)


@pytest.mark.parametrize("point", AFTER_COMMIT, ids=_ids(AFTER_COMMIT))
def test_fi_02_listener_killed_after_the_commit_resend_is_a_duplicate_forwarded(
    walk: Walk, point: str
) -> None:
    stored = walk.stored[point]
    assert point in walk.fired
    assert stored.status is None, f"{point}: the sender got status {stored.status}"
    assert (stored.rows, stored.jobs) == (1, len(DESTINATIONS)), "committed with its jobs"
    assert stored.resend == SUCCESS
    # The duplicate rule (DESIGN §3.1): no second set of jobs while the first is pending,
    # routed again once it is done: one extra set of jobs at most. (The copies at the
    # destinations may be more: the worker's failpoints may have met these jobs too.)
    instances, jobs = walk.rows(stored.uid)
    assert instances <= 2 and jobs == instances * len(DESTINATIONS), (instances, jobs)
    assert all(n >= instances for n in walk.copies(stored.uid)), walk.copies(stored.uid)
    _assert_no_loss(walk)


@pytest.mark.parametrize(
    "point",
    ("listener.after_db_commit", "listener.after_rsp_sent"),
    ids=["after_db_commit", "after_rsp_sent"],
)
def test_fi_03_jobs_of_a_listener_killed_after_the_commit_are_found_and_forwarded(
    walk: Walk, point: str
) -> None:
    # after_db_commit: the notice was never pushed (and the duplicate re-send pushes
    # none), so only the dispatcher's sweep can have found the jobs.
    stored = walk.stored[point]
    assert point in walk.fired
    if point == "listener.after_rsp_sent":
        assert stored.status == SUCCESS and stored.uid in walk.acknowledged
        assert (stored.rows, stored.jobs) == (1, len(DESTINATIONS))
    assert all(n >= 1 for n in walk.copies(stored.uid)), walk.copies(stored.uid)
    _assert_no_loss(walk)


def test_fi_05_listener_killed_mid_receive_no_success_temp_removed_resend_forwarded(
    walk: Walk,
) -> None:
    assert walk.big_status is None, f"the sender got status {walk.big_status}"
    assert walk.big_partial, "no temporary file was left by the killed receive"
    assert not set(walk.big_partial) & set(walk.after_recovery[0])
    assert walk.big_resend == SUCCESS
    assert all(n >= 1 for n in walk.copies(walk.big_uid)), walk.copies(walk.big_uid)
    for scp in walk.scps:  # the copy that arrived is the whole instance
        files = [p for p in scp.out.iterdir() if p.stat().st_size > BIG]
        assert files, f"{scp.name}: no file of the big instance's size"
    _assert_no_loss(walk)


@pytest.mark.parametrize(
    "point", ("worker.after_claim", "worker.mid_send"), ids=["after_claim", "mid_send"]
)
def test_fi_06_worker_killed_holding_a_lease_the_job_is_leased_again_and_done(
    walk: Walk, point: str
) -> None:
    assert point in walk.fired
    # The interrupted try is counted: a delivery with no attempt recorded.
    assert walk.redelivered >= 1
    _assert_no_loss(walk)


@pytest.mark.parametrize(
    "point",
    ("worker.after_dest_success", "worker.after_attempt_commit"),
    ids=["after_dest_success", "after_attempt_commit"],
)
def test_fi_07_worker_killed_after_the_destination_answered_job_ends_done(
    walk: Walk, point: str
) -> None:
    assert point in walk.fired
    if point == "worker.after_dest_success":  # sent again: a duplicate, acceptable
        assert any(n > 1 for got in walk.received.values() for n in got.values())
    else:  # the result stood; the spool file it did not remove is the janitor's
        assert not walk.kept_files_of_done, walk.kept_files_of_done[:5]
    _assert_no_loss(walk)


def test_fi_10_sigterm_under_load_exits_0_every_acknowledged_recorded(walk: Walk) -> None:
    assert walk.sigterm_exit == 0
    assert walk.sigterm_acknowledged, "nothing was acknowledged before SIGTERM"
    assert not walk.sigterm_unrecorded, f"acknowledged without a row: {walk.sigterm_unrecorded}"
    _assert_no_loss(walk)
    assert walk.final_exit == 0


@pytest.mark.parametrize("point", DISPATCHER_POINTS, ids=_ids(DISPATCHER_POINTS))
def test_fi_14_dispatcher_killed_every_job_still_completes(walk: Walk, point: str) -> None:
    assert point in walk.fired
    _assert_no_loss(walk)


def test_fi_19_startup_recovery_removes_stale_files_and_re_leases_expired_jobs(
    walk: Walk,
) -> None:
    temp, orphan = walk.planted["temp"], walk.planted["orphan"]
    tmp_left, unrecorded = walk.after_recovery
    assert temp not in tmp_left and orphan not in unrecorded
    # archive was down until the restart: the copy it has came through the stale lease.
    assert walk.received["archive"].get(str(walk.planted["uid"]), 0) >= 1
    [(state,)] = walk.node.query("select state from jobs where id = ?", walk.planted["job"])
    assert state == "done"
    _assert_no_loss(walk)


def test_fi_20_spool_file_deleted_while_its_job_waits_is_dead_lettered_once(
    walk: Walk,
) -> None:
    _job, state, error = walk.deleted
    assert state == "dead", walk.deleted
    # Dead at the first attempt that found the file gone (the earlier ones were refused).
    assert "spool file missing" in error, error


def test_fi_21_a_dead_lettered_job_keeps_the_file_and_queue_retry_delivers_it(
    walk: Walk,
) -> None:
    assert walk.retention == {"dead": "dead", "kept": True, "retried": "done", "removed": True}
    _assert_no_loss(walk)


def test_every_boundary_killed_its_process_once(walk: Walk) -> None:
    assert walk.fired == set(ALL_POINTS), sorted(set(ALL_POINTS) - walk.fired)
    # router/node.py logs each death: the failpoints' and FI-05's (the supervisor's own
    # SIGKILL is not logged by it).
    assert walk.kills_in_log >= len(ALL_POINTS) + 1, walk.kills_in_log


# --------------------------------------------------------------------------------------
# FI-04: the durable order, from a system-call trace
# --------------------------------------------------------------------------------------
TRACED = "fsync,fdatasync,rename,renameat,renameat2,write,pwrite64,writev,pwritev,sendto,sendmsg"
_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")


@dataclass
class Call:
    pid: int
    start: float
    end: float
    name: str
    text: str  # the call with its arguments (and result)


def _parse_trace(path: Path) -> list[Call]:
    """strace -f -ttt lines as calls (an ``<unfinished ...>`` call ends at its
    ``<... resumed>`` line), in the order they started."""
    calls: list[Call] = []
    open_calls: dict[tuple[int, str], Call] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, when, rest = int(m[1]), float(m[2]), m[3]
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)", rest)
        if resumed:
            call = open_calls.pop((pid, resumed[1]), None)
            if call is not None:
                call.end, call.text = when, call.text + resumed[2]
            continue
        name = re.match(r"(\w+)\(", rest)
        if not name:
            continue
        call = Call(pid, when, when, name[1], rest)
        if rest.endswith("<unfinished ...>"):
            open_calls[(pid, name[1])] = call
        calls.append(call)
    return calls


def _first(calls: list[Call], after: float, name: tuple[str, ...], needle: str) -> Call | None:
    for call in calls:
        if call.start > after and call.name in name and needle in call.text:
            return call
    return None


def test_fi_04_power_loss_order_file_fsync_rename_dir_fsync_commit_then_response(
    tmp_path: Path,
) -> None:
    strace = shutil.which("strace")
    if strace is None:
        message = "strace is not installed (scripts/test.sh installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    storescu = require_dcmtk("storescu")
    scp = StoreSCP(tmp_path, "pacs")  # never started: the jobs stay pending
    node = Node(tmp_path)
    node.configure([scp])
    trace = tmp_path / "trace.txt"
    argv = [
        strace,
        "-f",
        "--seccomp-bpf",
        "-ttt",
        "-yy",
        "-s",
        "1024",
        "-e",
        f"trace={TRACED}",
        "-o",
        str(trace),
        *cli_argv("-v", "serve", "--port", str(node.port), "--bind", HOST, "--workers", "0"),
    ]
    files = []
    for i in range(3):
        ds = make_dataset("CT")
        files.append(write_part10(ds, tmp_path / f"in{i}.dcm"))
    with open(node.log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=node.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        assert _wait(lambda: asyncio.run(node.echo()), WAIT, 0.5), node.log_tail()
        sent = subprocess.run(
            [storescu, "-aec", "ROUTER", HOST, str(node.port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=WAIT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert sent.returncode == 0, sent.stderr
        rows = node.query("select sop_instance_uid, spool_name from instances")
        assert len(rows) == len(files), rows
    finally:
        proc.terminate()  # strace detaches and writes out what it has
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        kill_group(proc.pid)
    calls = _parse_trace(trace)
    store = node.data_dir / "spool" / "store"
    for uid, spool_name in rows:
        ident = Path(str(spool_name)).stem
        response = next(
            (
                c
                for c in calls
                if c.name in ("sendto", "write", "writev", "sendmsg")
                and "TCP" in c.text
                and str(uid) in c.text
                and "\\4\\0" in c.text
            ),
            None,
        )
        assert response is not None, f"{uid}: no C-STORE response on a TCP socket in the trace"
        steps = [
            ("file fsync", ("fsync", "fdatasync"), f"/tmp/{ident}.part>"),
            ("rename", ("rename", "renameat", "renameat2"), f"/store/{spool_name}"),
            ("directory fsync", ("fsync", "fdatasync"), f"{store}/{str(spool_name)[:2]}>"),
            ("WAL write", ("write", "pwrite64", "writev", "pwritev"), "router.sqlite-wal>"),
            ("WAL fsync", ("fsync", "fdatasync"), "router.sqlite-wal>"),
        ]
        at, seen = 0.0, []
        for label, names, needle in steps:
            call = _first(calls, at, names, needle)
            assert call is not None and call.end <= response.start, (
                f"{uid}: no {label} ({needle}) between {seen[-1] if seen else 'the start'}"
                f" and the response: {[c.text[:120] for c in calls if needle in c.text][:4]}"
            )
            seen.append(f"{label} at {call.start:.6f}")
            at = call.end
        assert at <= response.start, f"{uid}: the response came before the commit: {seen}"


def test_fi_09_children_exit_after_a_sigkilled_supervisor_and_a_restart_binds(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path)
    try:
        node.cli("init")
        node.start(timeout=WAIT)
        status = node.status()
        assert status is not None and node.proc is not None
        children = {p.name: p.pid for p in status.processes[1:] if p.pid is not None}
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        # They get SIGTERM from the kernel (PR_SET_PDEATHSIG) and finish what they hold.
        _wait(lambda: not any(alive(pid) for pid in children.values()), 60, 0.1)
        survivors = sorted(name for name, pid in children.items() if alive(pid))
        assert not survivors, f"children of the SIGKILLed supervisor still running: {survivors}"
        node.start(timeout=WAIT)  # a restarted serve comes up whole (the port binds)
    finally:
        node.kill_all()


@dataclass
class PoisonRun:
    poison: str
    beside: set[str]  # stored with it, leased in the same batch
    later: set[str]  # stored once it was dead
    jobs: dict[str, tuple[str, int, str]]  # uid -> state, deliveries, last error
    received: set[str]
    crashes: int


@pytest.fixture(scope="module")
def poison_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoisonRun]:
    """An instance that kills the worker every time it is about to be sent (failpoint
    ``worker.sending=UID``), ``workers.max_deliveries`` = 3. It and three others are
    stored while no worker runs (``--workers 0``), so that the first lease batch of the
    restarted node holds all four, the poison first; three more are stored once the
    poison is dead."""
    require_dcmtk("storescp")
    root = tmp_path_factory.mktemp("poison")
    poison, poison_data = _instance()
    scp = StoreSCP(root, "pacs")
    env = {
        "DICOM_ROUTER_FAILPOINT": f"worker.sending={poison}",
        "DICOM_ROUTER_WORKERS_MAX_DELIVERIES": "3",
    }
    node = Node(root, lease_seconds=2, env=env)
    try:
        scp.start()
        node.configure([scp])
        node.start("--workers", "0", timeout=WAIT)
        beside = dict(_instance() for _ in range(3))
        for uid, data in [(poison, poison_data), *beside.items()]:
            assert _store_until_acknowledged(node.port, uid, data) == SUCCESS
        assert node.stop(WAIT) == 0
        node.start(timeout=WAIT)

        def dead() -> bool:
            return bool(
                node.query(
                    "select 1 from jobs j join instances i on i.id = j.instance_id"
                    " where i.sop_instance_uid = ? and j.state = 'dead'",
                    poison,
                )
            )

        assert _wait(dead, WAIT, 0.5), (node.job_states(), node.log_tail())
        later = dict(_instance() for _ in range(3))
        for uid, data in later.items():
            assert _store_until_acknowledged(node.port, uid, data) == SUCCESS
        _wait(lambda: set(later) <= set(scp.received()), WAIT, 0.5)
        _wait(lambda: not any(node.job_states().get(s) for s in LIVE), WAIT, 0.5)
        rows = node.query(
            "select i.sop_instance_uid, j.state, j.deliveries, coalesce(j.last_error, '')"
            " from jobs j join instances i on i.id = j.instance_id"
        )
        yield PoisonRun(
            poison,
            set(beside),
            set(later),
            {str(u): (str(st), int(d), str(e)) for u, st, d, e in rows},  # type: ignore[call-overload]
            set(scp.received()),
            node.log_tail(1_000_000).count("worker-0 exited (status -9)"),
        )
    finally:
        node.kill_all()
        scp.stop()


def test_fi_08_poison_instance_is_dead_lettered_after_n_crashes_others_flow(
    poison_run: PoisonRun,
) -> None:
    state, deliveries, error = poison_run.jobs[poison_run.poison]
    assert (state, deliveries) == ("dead", 3), poison_run.jobs[poison_run.poison]
    assert error == "worker crashed 3 times (3 deliveries)"
    assert poison_run.crashes == 3
    assert poison_run.poison not in poison_run.received
    assert poison_run.later <= poison_run.received
    assert all(poison_run.jobs[uid][0] == "done" for uid in poison_run.later)


def test_fi_08_jobs_leased_beside_a_poison_instance_are_not_dead_lettered(
    poison_run: PoisonRun,
) -> None:
    states = {uid: poison_run.jobs[uid] for uid in poison_run.beside}
    assert all(state == "done" for state, _, _ in states.values()), states
    assert poison_run.beside <= poison_run.received


# --------------------------------------------------------------------------------------
# FI-11, FI-12: the database goes away under the listener
# --------------------------------------------------------------------------------------
@dataclass
class Attempt:
    uid: str
    started: float
    ended: float
    status: int | None


@pytest.mark.postgresql
def test_fi_11_fi_12_postgresql_killed_during_commits_never_success_without_a_row(
    tmp_path: Path,
) -> None:
    """PostgreSQL is shut down "immediate" (SIGQUIT to the postmaster: backends killed,
    no checkpoint, crash recovery at the next start) while a sender stores: no C-STORE
    is answered success without its row (FI-12); stores while it is down are answered
    0xA700 (FI-11); once it is back the same listener process stores again."""
    from db_support import PostgresServer, db_query, require_postgres

    require_postgres()
    server = PostgresServer()
    scp = StoreSCP(tmp_path, "pacs")  # never started: the jobs stay pending
    try:
        server.start()
        url = server.url(server.create_database())
        node = Node(tmp_path, env={"DICOM_ROUTER_DB": url})
        node.configure([scp])
        node.start("--workers", "0", timeout=WAIT)
        listener = _pids(node, "listener")
        attempts: list[Attempt] = []
        stop = threading.Event()

        def send() -> None:
            while not stop.is_set():
                uid, data = _instance()
                started = time.monotonic()
                status = _store(node.port, uid, data)
                attempts.append(Attempt(uid, started, time.monotonic(), status))

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert _wait(lambda: sum(a.status == SUCCESS for a in attempts) >= 10, WAIT, 0.05)
            assert server.process is not None
            argv = Path(f"/proc/{server.process.pid}/cmdline").read_text().split("\0")[:-1]
            postmaster = int((server.base / "data" / "postmaster.pid").read_text().split()[0])
            os.kill(postmaster, signal.SIGQUIT)
            server.process.wait(60)
            gone = time.monotonic()  # the postmaster has exited: nothing can commit now
            _wait(lambda: sum(a.started > gone for a in attempts) >= 3, WAIT, 0.1)
            restarting = time.monotonic()
            with open(server.base / "postgres.log", "ab") as log:
                server.process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            server._wait_ready()
            up = time.monotonic()
            assert _wait(
                lambda: any(a.started > up and a.status == SUCCESS for a in attempts), WAIT, 0.1
            ), node.log_tail()
        finally:
            stop.set()
            sender.join(WAIT)
        recorded = {str(u) for (u,) in db_query(url, "select sop_instance_uid from instances")}
        acknowledged = {a.uid for a in attempts if a.status == SUCCESS}
        assert acknowledged - recorded == set(), "acknowledged without a row"
        while_down = [a.status for a in attempts if a.started > gone and a.ended < restarting]
        assert while_down and SUCCESS not in while_down, while_down
        assert OUT_OF_RESOURCES in while_down, while_down  # refused, not cut off
        assert _pids(node, "listener") == listener, "the listener was restarted"
        node.kill_all()
    finally:
        server.stop()


def _pids(node: Node, prefix: str) -> list[int | None]:
    status = node.status()
    assert status is not None
    return [p.pid for p in status.processes if p.name.startswith(prefix)]


def test_fi_13_sqlite_contention_4_listeners_4_workers_no_loss_no_corruption(
    walk: Walk,
) -> None:
    # Four listeners and four workers on one SQLite file while four associations store
    # at once: each store answered (a locked database waited for, or 0xA700), never
    # acknowledged without its commit; the file is intact after all the kills.
    statuses = walk.contention
    assert len(statuses) == CONTENTION, len(statuses)
    assert set(statuses.values()) <= {SUCCESS, OUT_OF_RESOURCES}, set(statuses.values())
    assert walk.contention_unrecorded == [], walk.contention_unrecorded
    assert walk.integrity == [("ok",)], walk.integrity
    _assert_no_loss(walk)
