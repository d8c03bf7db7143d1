"""Forwarding under destination faults, end to end (DESIGN §3.3-3.6, §8): real
``dicom-router serve`` processes (listener, dispatcher, worker, ZeroMQ between them),
DCMTK storescu as the sender and real destination peers that misbehave:

* a pynetdicom SCP that answers 0xA700 (out of resources) a few times, then success:
  the attempts are retried with backoff and every instance arrives;
* a refused port and a TCP black hole beside two live DCMTK storescp destinations: the
  live ones receive everything before the black hole's first ACSE timeout fires
  (asserted as structure, never as speed);
* SIGTERM while forwarding: serve exits 0, no child is left, no job stays leased, and a
  restart delivers every acknowledged instance.

The fixtures and helpers follow tests/e2e/test_forwarding.py (copied, minimal, so that
this file does not depend on another test module).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from db_support import db_query, requested_pg_url
from ingest_support import (
    HOST,
    OUT_OF_RESOURCES,
    SUCCESS,
    free_port,
    make_dataset,
    require_dcmtk,
    write_part10,
)
from pydicom import dcmread

#: The node's retry backoff in these tests (env, as test_forwarding.py's node fixture).
RETRY_BASE = 0.3
RETRY_CAP = 1.0
#: workers/worker.py: Worker(timeouts=None) -> Timeouts(connect=10, acse=30, dimse=120);
#: node.py passes no timeouts and settings.py has no key for them (not configurable).
WORKER_ACSE_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------
# the node (as in test_forwarding.py)
# --------------------------------------------------------------------------------------
# Where the database's part matters most (attempts and backoff, leases handed back at a
# stop), on SQLite and PostgreSQL (tests/conftest.py db_backend); the others on SQLite.
ON_BOTH_DATABASES = pytest.mark.usefixtures("db_backend")


def _cli(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "dicom-router"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "router.cli", *args]


class Node:
    """A data directory configured through the CLI and its ``serve`` process."""

    def __init__(self, root: Path, db_url: str | None = None) -> None:
        self.data = root / "data"
        self.db_url = db_url or f"sqlite:///{(self.data / 'router.sqlite').resolve()}"
        self.log_path = root / "serve.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ROUTER_")}
        self.env.update(
            {
                "DICOM_ROUTER_DATA_DIR": str(self.data),
                "DICOM_ROUTER_WORKERS_RETRY_BASE": str(RETRY_BASE),
                "DICOM_ROUTER_WORKERS_RETRY_CAP": str(RETRY_CAP),
            }
        )
        if db_url is not None:
            self.env["DICOM_ROUTER_DB"] = db_url
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> None:
        result = subprocess.run(_cli(*args), env=self.env, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode(errors="replace")

    def add_destination(
        self, name: str, port: int, *, max_associations: int = 1, max_retries: int = 10
    ) -> None:
        self.cli(
            "destinations",
            "add",
            name,
            "--aet",
            name.upper(),
            "--host",
            HOST,
            "--port",
            str(port),
            "--max-associations",
            str(max_associations),
            "--max-retries",
            str(max_retries),
        )

    def serve(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                _cli("-v", "serve", "--port", str(self.port), "--bind", HOST),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        echoscu = require_dcmtk("echoscu")
        deadline = time.monotonic() + 90  # generous: start-up under load
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited: {self.log()[-3000:]}"
            echo = [echoscu, "-to", "5", "-aec", "ROUTER", HOST, str(self.port)]
            if subprocess.run(echo, capture_output=True, timeout=30).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"serve did not come up: {self.log()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, sql: str, **params: object) -> list[tuple[object, ...]]:
        """Rows of ``sql`` (``:name`` parameters) on the node's SQLite or PostgreSQL."""
        return db_query(self.db_url, sql, **params)

    def done_jobs(self, destination: str) -> int:
        (count,) = self.query(
            "select count(*) from jobs j join destinations d on d.id = j.destination_id"
            " where d.name = :name and j.state = 'done'",
            name=destination,
        )[0]
        return int(count)  # type: ignore[call-overload]

    def attempts(self, destination: str | None = None) -> list[Attempt]:
        """Every attempt row (of one destination), in the order they were recorded."""
        where = "" if destination is None else " where d.name = :name"
        rows = self.query(
            "select a.job_id, d.name, a.started_at, a.duration_ms, a.outcome, a.dimse_status"
            " from attempts a join destinations d on d.id = a.destination_id"
            f"{where} order by a.id",
            name=destination,
        )
        return [Attempt(*row) for row in rows]  # type: ignore[arg-type]

    def send(self, study: Path) -> None:
        """Every file under ``study`` with DCMTK storescu (one association); exit 0 means
        every instance was acknowledged with success."""
        result = subprocess.run(
            [require_dcmtk("storescu"), "-aec", "ROUTER", "+sd", HOST, str(self.port), str(study)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr + self.log()[-3000:]


class Attempt:
    def __init__(
        self,
        job_id: int,
        destination: str,
        started_at: str | dt.datetime,
        duration_ms: int,
        outcome: str,
        dimse_status: int | None,
    ) -> None:
        self.job_id = job_id
        self.destination = destination
        # SQLite keeps UTCDateTime as naive UTC text (router/db/models.py); PostgreSQL
        # gives a timestamptz.
        if isinstance(started_at, str):
            started_at = dt.datetime.fromisoformat(started_at).replace(tzinfo=dt.UTC)
        self.started_at = started_at.astimezone(dt.UTC)
        self.duration_ms = duration_ms
        self.outcome = outcome
        self.dimse_status = dimse_status

    def __repr__(self) -> str:
        return (
            f"Attempt(job={self.job_id}, {self.destination}, {self.started_at.time()},"
            f" {self.duration_ms} ms, {self.outcome}, {self.dimse_status})"
        )


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    node = Node(tmp_path, requested_pg_url(request))
    node.cli("init")
    try:
        yield node
    finally:
        node.kill()


def _wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def _study(root: Path, count: int) -> dict[str, Path]:
    """``count`` small CT instances as Part 10 files in ``root``, by SOP Instance UID."""
    root.mkdir()
    out = {}
    for i in range(count):
        ds = make_dataset("CT")
        out[str(ds.SOPInstanceUID)] = write_part10(ds, root / f"{i:04d}.dcm")
    return out


# --------------------------------------------------------------------------------------
# destination peers
# --------------------------------------------------------------------------------------
class StoreSCP:
    """DCMTK storescp writing every instance into its own directory."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.out = root / f"received-{name}"
        self.out.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                require_dcmtk("storescp"),
                *("-aet", self.name.upper(), "-od", str(self.out), str(self.port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def received(self) -> set[str]:
        return {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.out.iterdir()
            if p.is_file()
        }


class ScriptedSCP:
    """A pynetdicom Storage SCP in a thread of the test process whose C-STORE answers
    the test scripts. pynetdicom rather than our own protocol library's server: the
    peer is an independent implementation (our client is not checked against itself),
    and its synchronous EVT_C_STORE handler makes counting calls and holding a store
    back trivial, with no event loop of our own in a thread."""

    def __init__(self, name: str, answer: Callable[[int], int]) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.name = name
        self.port = free_port()
        self.calls = 0
        self.stored: list[str] = []  # SOP Instance UIDs answered with success
        self._answer = answer  # call number (from 1) -> status
        self._lock = threading.Lock()
        ae = AE(ae_title=name.upper())
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 4
        self._server = ae.start_server(
            (HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: object) -> int:
        with self._lock:
            self.calls += 1
            call = self.calls
        status = self._answer(call)
        if status == SUCCESS:
            uid = str(event.dataset.SOPInstanceUID)  # type: ignore[attr-defined]
            with self._lock:
                self.stored.append(uid)
        return status

    def shutdown(self) -> None:
        self._server.shutdown()


class BlackHole:
    """A TCP port that accepts connections and never reads or answers: the worker's
    A-ASSOCIATE-RQ goes unanswered until its ACSE timeout."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


# --------------------------------------------------------------------------------------
# 1. out of resources, then success
# --------------------------------------------------------------------------------------
@ON_BOTH_DATABASES
def test_out_of_resources_is_retried_with_backoff_until_every_instance_arrives(
    node: Node, tmp_path: Path
) -> None:
    refusals = 3
    scp = ScriptedSCP("busy", lambda call: OUT_OF_RESOURCES if call <= refusals else SUCCESS)
    try:
        node.add_destination("busy", scp.port)
        node.cli("rules", "add", "all", "--to", "busy")
        node.serve()
        sent = _study(tmp_path / "study", 5)
        node.send(tmp_path / "study")
        assert _wait_for(lambda: node.done_jobs("busy") == len(sent), 60), node.log()[-3000:]
        assert set(scp.stored) == set(sent)
        attempts = node.attempts("busy")
        refused = [a for a in attempts if a.dimse_status == OUT_OF_RESOURCES]
        assert len(refused) == refusals, attempts
        assert all(a.outcome == "retry" for a in refused), attempts
        by_job: dict[int, list[Attempt]] = {}
        for a in attempts:
            by_job.setdefault(a.job_id, []).append(a)
        assert len(by_job) == len(sent), attempts
        floor = dt.timedelta(seconds=min(RETRY_BASE, RETRY_CAP) / 2)  # workers/retry.py
        for history in by_job.values():
            *retries, last = history
            # Each job: its 0xA700 attempts (retry), then one success.
            assert [(a.outcome, a.dimse_status) for a in retries] == [
                ("retry", OUT_OF_RESOURCES)
            ] * len(retries), history
            assert (last.outcome, last.dimse_status) == ("done", SUCCESS), history
            for before, after in itertools.pairwise(history):
                # The next attempt starts after the previous one ended plus the backoff
                # floor (base / 2): it was held back, not repeated at once.
                ended = before.started_at + dt.timedelta(milliseconds=before.duration_ms)
                assert after.started_at >= ended + floor - dt.timedelta(milliseconds=5), history
        assert sum(len(h) - 1 for h in by_job.values()) == refusals
        assert scp.calls == refusals + len(sent)
    finally:
        scp.shutdown()


# --------------------------------------------------------------------------------------
# 2. dead destinations beside live ones
# --------------------------------------------------------------------------------------
def test_live_destinations_receive_everything_before_a_black_holes_first_acse_timeout(
    node: Node, tmp_path: Path
) -> None:
    pacs, archive = StoreSCP(tmp_path, "pacs"), StoreSCP(tmp_path, "archive")
    hole = BlackHole()
    try:
        for live in (pacs, archive):
            live.start()
            node.add_destination(live.name, live.port)
        node.add_destination("refused", free_port())  # nothing listens there
        node.add_destination("blackhole", hole.port)
        # The dead ones first: their jobs are the older ones of each instance.
        node.cli("rules", "add", "all", "--to", "blackhole,refused,pacs,archive")
        node.serve()
        sent = _study(tmp_path / "study", 50)
        node.send(tmp_path / "study")

        def live_done() -> bool:
            return node.done_jobs("pacs") == len(sent) and node.done_jobs("archive") == len(sent)

        # Wait until the live destinations are done or the black hole's first attempt
        # is recorded (its ACSE timeout fired), whichever comes first.
        deadline = time.monotonic() + WORKER_ACSE_TIMEOUT + 20
        witnessed = False
        while time.monotonic() < deadline:
            finished = live_done()
            # Read after the live counts: if the black hole still has no attempt row now,
            # the live destinations were complete while its first ACSE wait was running.
            hole_attempts = node.attempts("blackhole")
            if finished and not hole_attempts:
                witnessed = True
                break
            if hole_attempts:
                break
            time.sleep(0.1)
        states = node.query(
            "select d.name, j.state, count(*) from jobs j"
            " join destinations d on d.id = j.destination_id group by d.name, j.state"
        )
        assert witnessed, (
            f"jobs (destination, state, count) {states}, {len(sent)} per destination, when"
            f" the black hole's first attempt was recorded: {node.attempts('blackhole')[:2]}"
        )
        # The black hole was being tried meanwhile (connected, not merely never leased),
        # and the refused port's connections failed and were retried.
        assert hole.accepted, "the worker never connected to the black hole"
        assert any(a.outcome == "retry" for a in node.attempts("refused"))
        assert node.done_jobs("refused") == node.done_jobs("blackhole") == 0
        assert pacs.received() == set(sent)
        assert archive.received() == set(sent)
    finally:
        node.kill()
        hole.close()
        for live in (pacs, archive):
            live.stop()


# --------------------------------------------------------------------------------------
# 3. graceful stop while forwarding
# --------------------------------------------------------------------------------------
@ON_BOTH_DATABASES
def test_sigterm_while_forwarding_exits_0_leaves_no_lease_and_a_restart_delivers_all(
    node: Node, tmp_path: Path
) -> None:
    count = 300
    gate = threading.Event()  # the destination holds its first store until ingest is done

    def answer(call: int) -> int:
        gate.wait(60)
        time.sleep(0.01)  # forwarding (>= 3 s) outlasts the moment of the SIGTERM below
        return SUCCESS

    scp = ScriptedSCP("slow", answer)
    try:
        node.add_destination("slow", scp.port, max_retries=1000)
        node.cli("rules", "add", "all", "--to", "slow")
        node.serve()
        sent = _study(tmp_path / "study", count)
        node.send(tmp_path / "study")  # exit 0: all acknowledged
        gate.set()
        assert _wait_for(lambda: node.done_jobs("slow") >= 20, 60), node.log()[-3000:]
        proc = node.proc
        assert proc is not None
        group = os.getpgid(proc.pid)
        proc.send_signal(signal.SIGTERM)
        # Within the grace: the worker's in-flight wait (30 s) inside the supervisor's.
        try:
            code = proc.wait(45)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve ignored SIGTERM: {node.log()[-3000:]}") from None
        assert code == 0, node.log()[-3000:]

        def group_gone() -> bool:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return True
            return False

        assert _wait_for(group_gone, 10), "a child of serve outlived it"
        states = dict(node.query("select state, count(*) from jobs group by state"))
        assert states.get("done", 0) < count, f"nothing left to forward at the stop: {states}"
        leased = node.query(
            "select id, state, lease_owner, lease_token, lease_expires_at from jobs"
            " where state = 'leased' or lease_owner is not null or lease_token is not null"
            " or lease_expires_at is not null"
        )
        assert leased == [], f"jobs still leased after a graceful stop: {leased[:5]}"
        assert set(states) <= {"pending", "retry_wait", "done"}, states

        node.serve()
        assert _wait_for(lambda: node.done_jobs("slow") == count, 60), node.log()[-3000:]
        assert set(scp.stored) == set(sent)  # at least once each
    finally:
        gate.set()
        node.kill()
        scp.shutdown()


# --------------------------------------------------------------------------------------
# 4. a destination down for longer than its retries last
# --------------------------------------------------------------------------------------
def test_a_destination_down_longer_than_its_retries_spends_attempts_of_probes_only(
    node: Node, tmp_path: Path
) -> None:
    """The dispatcher backs off the whole destination (router/backoff.py): its queued
    jobs wait without spending attempts, and only the probe jobs (one at a time, after
    each interval) meet the closed port. A destination allowed 2 attempts per job that
    stays down for many intervals loses only its probes to dead letter, not the queue
    (per-job retries alone, base 0.3 s and cap 1 s, would dead-letter every job within
    seconds); when it comes back the rest arrives, and `queue retry` sends the probes."""
    late = StoreSCP(tmp_path, "late")
    node.add_destination("late", late.port, max_retries=2)
    node.cli("rules", "add", "all", "--to", "late")
    node.serve()
    sent = _study(tmp_path / "study", 30)
    node.send(tmp_path / "study")
    try:
        assert _wait_for(lambda: len(node.attempts("late")) >= 6, 30), node.log()[-3000:]
        time.sleep(3 * RETRY_CAP)
        late.start()

        def settled() -> bool:
            states = {s for (s,) in node.query("select state from jobs")}
            return states <= {"done", "dead"}

        assert _wait_for(settled, 60), node.log()[-3000:]
        failed = [a for a in node.attempts("late") if a.outcome != "done"]
        (dead,) = node.query("select count(*) from jobs where state = 'dead'")[0]
        assert int(dead) <= len(failed) // 2 < len(sent) // 2, failed  # 2 attempts each
        assert len(late.received()) == len(sent) - int(dead)
        node.cli("queue", "retry", "--destination", "late")
        assert _wait_for(lambda: late.received() == set(sent), 60), node.log()[-3000:]
    finally:
        late.stop()
