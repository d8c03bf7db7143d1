"""Catalogue B.8: destination behaviour, the worker's side (DST-01..DST-18), live.

One real node (``dicom-router serve``: listener, dispatcher, one worker, ZeroMQ between
them; the ``Node`` of tests/e2e/test_forwarding_faults.py) forwards to a misbehaving
destination per case: a ``ScriptedSCP`` (scripted_scp.py: a real listening socket that
answers what the case says), a port nobody listens on, or the harness's FaultProxy in
front of a scripted SCP. Every instance is also routed to a well-behaved DCMTK storescp
("good"): each case asserts that it received its instance too (the worker keeps serving
other destinations) and that no child of serve died. The outcome the catalogue
prescribes is asserted in the database: the job's state and its attempt rows (outcome,
DIMSE status, error). The pure classifier is table-tested in tests/unit/test_retry.py.

To keep the module fast every case's destination and rule (``StudyDescription ==
<case>``) is configured once, before ``serve``, through the repository the CLI's
``destinations add`` and ``rules add`` use (not the commands: a second of start-up
each, ~50 destinations); the node's
worker timeouts are 4 s (workers.connect/acse/dimse/write_timeout) and its backoff 0.3-1 s
(workers.retry_base/cap, set by ``Node``). RX-16 (catalogue B.4), a destination that
stops reading, is the worker's side of a slow peer and lives here too.

Scaled down (DESIGN §8): DST-02's "2 s latency, 10 KB/s" runs as 0.5 s latency and
10 KB/s (the node's 4 s timeouts stand in for the default 30/120 s; a 2 s latency would
need them); DST-17's "flaps every 10 s for 5 minutes" runs as every 1 s for 6 s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ingest_support import EXPLICIT_LE, make_dataset, require_dcmtk, write_part10
from pydicom.encaps import encapsulate
from test_forwarding_faults import Node, StoreSCP

sys.path.insert(0, str(Path(__file__).parent))

from fault_proxy import FaultProxy
from scripted_scp import Assoc, Reply, ScriptedSCP, always, first

from router.db.engine import make_engine
from router.db.repository import Repository
from router.rules import RuleSpec, parse_condition

TIMEOUT = 4.0  # the worker's connect / ACSE / DIMSE timeouts in this module
RETRY_BASE, RETRY_CAP = 0.3, 1.0  # test_forwarding_faults.Node's workers.retry_base/cap
SETTLE = 90.0  # seconds a case may take to reach done/dead (generous: a shared machine)
OK, ACCEPT = Reply(), Assoc()

SLOW_LATENCY, SLOW_BANDWIDTH = 0.5, 10_000  # DST-02 here; full size 2 s and 10 KB/s
FLAP_PERIOD, FLAP_FOR = 1.0, 6.0  # DST-17 here; full size every 10 s for 300 s


# --------------------------------------------------------------------------------------
# the cases: one destination each, named after the case
# --------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    association: Callable[[int], Assoc] = lambda _n: ACCEPT
    store: Callable[[int], Reply] = lambda _n: OK
    max_retries: int = 3
    kind: str = "scripted"  # "scripted", "refused" (nothing listens), "proxied"


CASES: dict[str, Case] = {}


def case(name: str, **kwargs: Any) -> str:
    assert name not in CASES
    CASES[name] = Case(name, **kwargs)
    return name


def store_fails_once(bad: Reply) -> dict[str, Any]:
    """The first C-STORE meets ``bad``, every later one succeeds."""
    return {"store": first(1, bad, OK)}


def association_fails_once(bad: Assoc) -> dict[str, Any]:
    return {"association": first(1, bad, ACCEPT)}


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


class Flapping:
    """Down (every connection and every C-STORE meets a close) and up (stores answered
    after ``STORE_TIME``) by turns of ``period`` seconds, down first, from its first
    connection on, for ``duration`` seconds; then up for good."""

    STORE_TIME = 0.2  # ten instances need two or more up phases

    def __init__(self, period: float, duration: float) -> None:
        self.period, self.duration = period, duration
        self.started: float | None = None
        self.down_meetings = 0  # connections and stores closed while down
        self._lock = threading.Lock()

    def _down(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self.started is None:
                self.started = now
            elapsed = now - self.started
            down = elapsed < self.duration and int(elapsed / self.period) % 2 == 0
            self.down_meetings += down
            return down

    def association(self, _n: int) -> Assoc:
        return Assoc("close") if self._down() else ACCEPT

    def store(self, _n: int) -> Reply:
        return Reply("close") if self._down() else Reply(delay=self.STORE_TIME)


DST_01 = case("dst-01", kind="refused", max_retries=3)
DST_02 = case("dst-02", kind="proxied")
DST_03 = {
    "DST-03-no-ac": case("dst-03-no-ac", **association_fails_once(Assoc("hang"))),
    "DST-03-no-rsp": case("dst-03-no-rsp", **store_fails_once(Reply("hang"))),
}


def _reject(name: str, rj: tuple[int, int, int], *, once: bool) -> str:
    bad = Assoc("reject", reject=rj)
    if once:
        return case(name, **association_fails_once(bad))
    return case(name, association=always(bad))


DST_04 = {
    f"DST-04-{label}": (rj, _reject(f"dst-04-{label}", rj, once=True))
    for label, rj in [
        ("local-limit", (2, 3, 2)),
        ("congestion", (2, 3, 1)),
        ("user-no-reason", (2, 1, 1)),
    ]
}
DST_05 = {
    f"DST-05-{label}": (meaning, _reject(f"dst-05-{label}", rj, once=False))
    for label, rj, meaning in [
        ("called-ae", (1, 1, 7), "called-AE-title-not-recognized"),
        ("calling-ae", (1, 1, 3), "calling-AE-title-not-recognized"),
        ("protocol-version", (1, 2, 2), "protocol-version-not-supported"),
    ]
}
DST_06 = case("dst-06", association=always(Assoc(context_result=3)))
DST_07 = case("dst-07", association=always(Assoc(context_result=4)))
DST_08 = {
    f"DST-08-source-{source}": case(
        f"dst-08-{source}", **store_fails_once(Reply("abort", abort=(source, 0)))
    )
    for source in (0, 2)
}
DST_09 = {
    f"DST-09-{status:04X}": (
        status,
        case(
            f"dst-09-{status:04x}", **store_fails_once(Reply(status=status, error_comment="busy"))
        ),
    )
    for status in (0xA700, 0xA7FF, 0x0213)
}
DEAD_STATUSES = {
    "DST-10": (0xA900, 0xA9FF),
    "DST-11": (0xC000, 0xCFFF),
    "DST-12": (0x0122, 0x0124, 0x0117, 0x0211, 0x0212),
}
DEAD = {
    f"{cid}-{status:04X}": (
        status,
        case(f"{cid.lower()}-{status:04x}", store=always(Reply(status=status, error_comment="no"))),
    )
    for cid, statuses in DEAD_STATUSES.items()
    for status in statuses
}
DST_13 = {
    f"DST-13-{status:04X}": (
        status,
        case(f"dst-13-{status:04x}", store=always(Reply(status=status))),
    )
    for status in (0xB000, 0xB006, 0xB007)
}
DST_14 = {
    f"DST-14-{status:04X}": (
        status,
        case(f"dst-14-{status:04x}", store=always(Reply(status=status)), max_retries=2),
    )
    for status in (0xFF00, 0xFE00, 0x1234)
}
DST_15 = {
    "DST-15-message-id": case("dst-15-message-id", **store_fails_once(Reply(message_id_offset=1))),
    "DST-15-sop-instance": case(
        "dst-15-sop-instance",
        **store_fails_once(Reply(sop_instance="1.2.826.0.1.3680043.9.9999.15")),
    ),
}
SEND_PDU_CAP = 1 << 20  # protocol/limits.py: our fragments when the peer announces 0
DST_16 = {
    f"DST-16-{label}": (limit, case(f"dst-16-{label}", association=always(Assoc(max_pdu=max_pdu))))
    for label, max_pdu, limit in [
        ("0", 0, SEND_PDU_CAP),
        ("4096", 4096, 4096),
        ("1MiB", 1 << 20, 1 << 20),
    ]
}
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DS_07_FRAGMENT = b"\xff\xd8\xfe\xff\xdd\xe0\x00\x00\x00\x00\xfe\xff\x0d\xe0\x00\x00\xff\xd9"
DS_07 = case("ds-07")
PT_10_TEXT = "../../../../tmp/pt10-from-destination"
PT_10 = case("pt-10", store=always(Reply(status=0xB000, error_comment=PT_10_TEXT)))
# RX-16: the first association stalls (AC, then nothing read ever again), the next is served.
RX_16 = case("rx-16", association=first(1, Assoc("stall"), ACCEPT))
RX_16_PIXELS = 8 << 20  # streamed (over 4 MiB) and more than both kernels' buffers take
FLAPPING = Flapping(FLAP_PERIOD, FLAP_FOR)
DST_17 = case("dst-17", association=FLAPPING.association, store=FLAPPING.store, max_retries=100)

# DST-18: malformed answers to our A-ASSOCIATE-RQ (and to a C-STORE-RQ); each case's
# second association is accepted, so the job is retried and done.
_AC_FIXED = struct.pack(">HH", 1, 0) + b"GOOD".ljust(16) + b"ROUTER".ljust(16) + bytes(32)
MALFORMED_ASSOCIATION = {
    "DST-18-ac-truncated": _pdu(0x02, _AC_FIXED)[:6] + b"\x00\x01",  # 68 announced, 2 sent
    "DST-18-ac-item-overrun": _pdu(0x02, _AC_FIXED + b"\x10\x00\xff\xff1.2.840.10008.3.1.1.1"),
    "DST-18-ac-no-context": _pdu(0x02, _AC_FIXED + b"\x10\x00\x00\x151.2.840.10008.3.1.1.1"),
    "DST-18-rj-long": _pdu(0x03, bytes([0, 1, 1, 7, 0, 0])),
    "DST-18-rj-undefined-result": _pdu(0x03, bytes([0, 9, 1, 1])),
    "DST-18-abort-short": _pdu(0x07, bytes([0, 0])),
    "DST-18-unknown-pdu": _pdu(0x09, bytes(4)),
    "DST-18-release-rp-instead": _pdu(0x06, bytes(4)),
}
MALFORMED_RESPONSE = {
    "DST-18-oversized-pdu": b"\x04\x00\x7f\xff\xff\xff" + bytes(64),
    "DST-18-pdv-overrun": _pdu(0x04, struct.pack(">LBB", 0xFF, 1, 0x03) + bytes(4)),
    "DST-18-undecodable-command": _pdu(0x04, struct.pack(">LBB", 6, 1, 0x03) + b"\x00\x00\x00\x00"),
}
DST_18 = {
    **{
        cid: case(cid.lower(), **association_fails_once(Assoc("raw", raw=raw)))
        for cid, raw in MALFORMED_ASSOCIATION.items()
    },
    **{
        cid: case(cid.lower(), **store_fails_once(Reply("raw", raw=raw)))
        for cid, raw in MALFORMED_RESPONSE.items()
    },
    "DST-18-close-mid-pdu": case(
        "dst-18-close-mid-pdu", **store_fails_once(Reply("close_mid_pdu"))
    ),
}


# --------------------------------------------------------------------------------------
# the node
# --------------------------------------------------------------------------------------
@dataclass
class Job:
    id: int
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    sop_instance_uid: str


@dataclass
class Attempt:
    job_id: int
    outcome: str
    dimse_status: int | None
    error: str | None
    started_at: dt.datetime
    duration_ms: int

    @property
    def ended_at(self) -> dt.datetime:
        return self.started_at + dt.timedelta(milliseconds=self.duration_ms)


@dataclass
class Run:
    """What one case produced: its jobs and their attempts, in order."""

    jobs: list[Job]
    attempts: list[Attempt]
    uids: set[str]

    @property
    def job(self) -> Job:
        (job,) = self.jobs
        return job

    def history(self) -> list[tuple[str, int | None]]:
        return [(a.outcome, a.dimse_status) for a in self.attempts]


class Bed:
    """The node, its good destination and every case's scripted destination."""

    def __init__(self, node: Node, good: StoreSCP, scps: dict[str, ScriptedSCP], root: Path):
        self.node, self.good, self.scps, self.root = node, good, scps, root
        self._sent = itertools.count()

    def send(
        self,
        name: str,
        count: int = 1,
        *,
        big: bool = False,
        jpeg: bool = False,
        pixel_bytes: int = 0,
    ) -> set[str]:
        """``count`` CT instances routed to ``name`` (and "good"), sent by DCMTK storescu
        (exit 0: each acknowledged); ``jpeg``: encapsulated, with delimiter bytes inside
        the fragment (DS-07); ``pixel_bytes``: that much 16-bit pixel data (a square)."""
        study = self.root / f"study-{next(self._sent)}-{name}"
        study.mkdir()
        uids = set()
        for i in range(count):
            ds = make_dataset("CT")
            ds.StudyDescription = name
            if big:  # 2 MiB of pixel data: spans many fragments at every Maximum Length
                pixel_bytes = pixel_bytes or 2 << 20
            if pixel_bytes:
                ds.Rows = ds.Columns = int((pixel_bytes // 2) ** 0.5)
                ds.PixelData = os.urandom(ds.Rows * ds.Columns * 2)
            if jpeg:
                ds.PixelData = encapsulate([DS_07_FRAGMENT])
                ds["PixelData"].VR = "OB"
            write_part10(ds, study / f"{i:03d}.dcm", JPEG_BASELINE if jpeg else EXPLICIT_LE)
            uids.add(str(ds.SOPInstanceUID))
        if not jpeg:
            self.node.send(study)
            return uids
        # storescu proposes uncompressed syntaxes only, unless told (-xy: JPEG 8-bit).
        argv = [require_dcmtk("storescu"), "-xy", "-aec", "ROUTER", "+sd", "127.0.0.1"]
        result = subprocess.run(
            [*argv, str(self.node.port), str(study)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr + self.log_tail()
        return uids

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Rows from the node's SQLite database (this module's node is always SQLite)."""
        path = self.node.data / "router.sqlite"
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
            return db.execute(sql, params).fetchall()

    def jobs(self, name: str) -> list[Job]:
        rows = self.query(
            "select j.id, j.state, j.attempts, j.last_status, j.last_error, i.sop_instance_uid"
            " from jobs j join destinations d on d.id = j.destination_id"
            " join instances i on i.id = j.instance_id where d.name = ? order by j.id",
            name,
        )
        return [Job(*row) for row in rows]  # type: ignore[arg-type]

    def attempts(self, name: str) -> list[Attempt]:
        rows = self.query(
            "select a.job_id, a.outcome, a.dimse_status, a.error, a.started_at, a.duration_ms"
            " from attempts a join destinations d on d.id = a.destination_id"
            " where d.name = ? order by a.id",
            name,
        )
        return [
            Attempt(job, outcome, status, error, _utc(started), duration)  # type: ignore[arg-type]
            for job, outcome, status, error, started, duration in rows
        ]

    def run(
        self,
        name: str,
        count: int = 1,
        *,
        big: bool = False,
        jpeg: bool = False,
        good: bool = True,
        pixel_bytes: int = 0,
    ) -> Run:
        """Send, wait until the case's jobs are done or dead and (unless ``good`` is
        False) the good destination has the instances; check that nothing died."""
        uids = self.send(name, count, big=big, jpeg=jpeg, pixel_bytes=pixel_bytes)
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            jobs = self.jobs(name)
            if len(jobs) == count and all(j.state in ("done", "dead") for j in jobs):
                break
            time.sleep(0.1)
        jobs = self.jobs(name)
        assert {j.sop_instance_uid for j in jobs} == uids, jobs
        assert all(j.state in ("done", "dead") for j in jobs), (jobs, self.log_tail())
        if good:
            self.assert_good_has(uids)
        assert "exited (status" not in self.node.log(), self.log_tail()
        self.assert_forwarded_unchanged(name, uids)
        return Run(jobs, self.attempts(name), uids)

    def assert_forwarded_unchanged(self, name: str, uids: set[str]) -> None:
        """What a scripted destination stored hashes to the digest of the data set the
        node received: forwarded byte for byte, never re-encoded (DS-07, DS-13)."""
        scp = self.scps.get(name)
        if scp is None:
            return
        digests = dict(self.query("select sop_instance_uid, digest from instances"))
        for got in scp.record.stored:
            if got.sop_instance in uids:
                assert got.sha256 == digests[got.sop_instance], got

    def assert_good_has(self, uids: set[str]) -> None:
        def good_done() -> bool:
            states = [j.state for j in self.jobs("good") if j.sop_instance_uid in uids]
            return states == ["done"] * len(uids)

        assert _wait_for(good_done, SETTLE), f"good destination: {self.jobs('good')[-5:]}"
        assert uids <= self.good.received()
        assert "exited (status" not in self.node.log(), self.log_tail()

    def log_tail(self) -> str:
        return self.node.log()[-3000:]


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def _wait_for(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


class _Config:
    """Destinations and rules written through the repository the CLI uses (the
    ``destinations add`` / ``rules add`` commands cost ~1 s of start-up each; this
    module has ~50 destinations)."""

    def __init__(self, node: Node) -> None:
        # durable=False: set-up rows need no fsync each (~100 of them)
        self._engine = make_engine(f"sqlite:///{node.data / 'router.sqlite'}", durable=False)
        self.repository = Repository(self._engine)

    def add(self, name: str, port: int, max_retries: int, *, max_associations: int = 1) -> None:
        self.repository.add_destination(
            name, name.upper()[:16], "127.0.0.1", port, max_associations, max_retries
        )

    def route(self, rule: str, destination: str, *conditions: str) -> None:
        parsed = tuple(parse_condition(text) for text in conditions)
        self.repository.add_rule(RuleSpec(rule, 100, True, False, parsed, (destination,)))

    def close(self) -> None:
        self._engine.dispose()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:

    root = tmp_path_factory.mktemp("b8")
    node = Node(root)
    node.env.update(
        {
            "DICOM_ROUTER_WORKERS_CONNECT_TIMEOUT": str(TIMEOUT),
            "DICOM_ROUTER_WORKERS_ACSE_TIMEOUT": str(TIMEOUT),
            "DICOM_ROUTER_WORKERS_DIMSE_TIMEOUT": str(TIMEOUT),
            "DICOM_ROUTER_WORKERS_WRITE_TIMEOUT": str(TIMEOUT),
        }
    )
    good = StoreSCP(root, "good")
    with contextlib.ExitStack() as stack:
        stack.callback(node.kill)
        node.cli("init")
        good.start()
        stack.callback(good.stop)
        config = _Config(node)
        stack.callback(config.close)
        # One association: DCMTK storescp serves one at a time (a second waits unanswered).
        config.add("good", good.port, 10, max_associations=1)
        config.route("everything-to-good", "good")
        scps: dict[str, ScriptedSCP] = {}
        for name, spec in CASES.items():
            if spec.kind == "refused":
                port = _refused_port()
            else:
                scp = stack.enter_context(ScriptedSCP(spec.association, spec.store))
                scps[name] = scp
                port = scp.port
                if spec.kind == "proxied":
                    proxy = FaultProxy(
                        target=("127.0.0.1", scp.port),
                        latency=SLOW_LATENCY,
                        bandwidth=SLOW_BANDWIDTH,
                    )
                    port = stack.enter_context(proxy).port
            config.add(name, port, spec.max_retries)
            config.route(f"to-{name}", name, f"StudyDescription == {name}")
        node.serve()
        yield Bed(node, good, scps, root)


def _refused_port() -> int:
    """A loopback port with nothing listening (bound and closed: the kernel refuses)."""
    from ingest_support import free_port

    return free_port()


# --------------------------------------------------------------------------------------
# DST-01: refused
# --------------------------------------------------------------------------------------
def test_dst_01_connection_refused_is_retried_with_backoff_then_dead_lettered(bed: Bed) -> None:
    run = bed.run(DST_01)
    assert run.job.state == "dead", run
    # Every attempt a retry (the last one exhausts max_retries = 3), each refused.
    assert [a.outcome for a in run.attempts] == ["retry"] * 3, run.attempts
    assert all("connection refused" in (a.error or "") for a in run.attempts), run.attempts
    floor = dt.timedelta(seconds=RETRY_BASE / 2)  # workers/retry.py: backoff's floor
    for before, after in itertools.pairwise(run.attempts):
        assert after.started_at >= before.ended_at + floor - dt.timedelta(milliseconds=5), run


# --------------------------------------------------------------------------------------
# DST-02: slow but alive
# --------------------------------------------------------------------------------------
def test_dst_02_slow_destination_completes_without_timeouts_and_others_are_not_held(
    bed: Bed,
) -> None:
    """0.5 s latency each way and 10 KB/s through the FaultProxy (full size: 2 s
    latency against the default 30 s ACSE / 120 s DIMSE timeouts; here 0.5 s against 4 s):
    every store completes at the first attempt, and the good destination had the same
    instances before the slow one's first attempt ended."""
    run = bed.run(DST_02, count=3)
    assert [j.state for j in run.jobs] == ["done"] * 3, run
    assert [a.outcome for a in run.attempts] == ["done"] * 3, run.attempts
    # The proxy was in the way: the first attempt's association and store took at
    # least two round trips of its latency.
    assert run.attempts[0].duration_ms >= 4 * SLOW_LATENCY * 1000 - 100, run.attempts
    good = [a for a in bed.attempts("good") if a.job_id in _good_jobs(bed, run.uids)]
    assert max(a.ended_at for a in good) <= min(a.ended_at for a in run.attempts), (good, run)


def _good_jobs(bed: Bed, uids: set[str]) -> set[int]:
    return {j.id for j in bed.jobs("good") if j.sop_instance_uid in uids}


# --------------------------------------------------------------------------------------
# DST-03: hangs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(DST_03))
def test_dst_03_hanging_destination_times_out_is_retried_and_its_slot_released(
    bed: Bed, cid: str
) -> None:
    """No A-ASSOCIATE-AC (ACSE timeout) or no C-STORE-RSP (DIMSE timeout): the attempt
    ends as a timeout after about 4 s, is retried, and the retry (one association
    allowed: the slot was given back) succeeds; the good destination meanwhile got its
    copy before the hang's timeout fired."""
    name = DST_03[cid]
    run = bed.run(name)
    assert run.job.state == "done", run
    assert [a.outcome for a in run.attempts] == ["retry", "done"], run.attempts
    hung = run.attempts[0]
    assert "timeout" in (hung.error or "").lower(), hung
    assert hung.duration_ms >= (TIMEOUT - 0.5) * 1000, hung
    assert bed.scps[name].connections == 2
    good = [a for a in bed.attempts("good") if a.job_id in _good_jobs(bed, run.uids)]
    assert max(a.ended_at for a in good) <= hung.ended_at, (good, hung)


# --------------------------------------------------------------------------------------
# RX-16 (catalogue B.4): a destination that stops reading
# --------------------------------------------------------------------------------------
def test_rx_16_destination_side_stalled_send_is_reset_at_the_write_deadline_and_retried(
    bed: Bed,
) -> None:
    """The destination accepts TCP and the association, then reads nothing (zero TCP
    window; dcm4che#532). The worker's send ends at workers.write_timeout with a reset
    (an A-ABORT PDU cannot get past the bytes the destination does not read), the
    attempt is a timeout, the job is retried after its backoff on a new association and
    stored; the good destination had its copy before the stalled attempt ended. 8 MiB
    of pixel data: sent streamed and more than both kernels' socket buffers take, so it
    is the write deadline, not the DIMSE timeout, that ends the attempt."""
    name = RX_16
    run = bed.run(name, pixel_bytes=RX_16_PIXELS)
    assert run.job.state == "done", run
    assert [a.outcome for a in run.attempts] == ["retry", "done"], run.attempts
    stalled, retried = run.attempts
    assert "stopped reading" in (stalled.error or ""), stalled
    scp = bed.scps[name]
    assert _wait_for(lambda: scp.record.stall_ends, 10), "the stalled connection never ended"
    assert scp.record.stall_ends == ["reset"], scp.record.stall_ends
    assert scp.connections == 2 and set(scp.stored_uids()) == run.uids
    floor = dt.timedelta(seconds=RETRY_BASE / 2)  # workers/retry.py: backoff's floor
    assert retried.started_at >= stalled.ended_at + floor - dt.timedelta(milliseconds=5), run
    good = [a for a in bed.attempts("good") if a.job_id in _good_jobs(bed, run.uids)]
    assert max(a.ended_at for a in good) <= stalled.ended_at, (good, stalled)


# --------------------------------------------------------------------------------------
# DST-04 / DST-05: association rejected
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(DST_04))
def test_dst_04_transient_reject_is_retried(bed: Bed, cid: str) -> None:
    (result, source, reason), name = DST_04[cid]
    run = bed.run(name)
    assert run.job.state == "done", run
    assert [a.outcome for a in run.attempts] == ["retry", "done"], run.attempts
    error = run.attempts[0].error or ""
    assert f"result {result}" in error and f"source {source}" in error, error
    assert f"reason {reason}" in error, error


@pytest.mark.parametrize("cid", list(DST_05))
def test_dst_05_permanent_reject_is_dead_lettered_at_once_with_the_reason(
    bed: Bed, cid: str
) -> None:
    meaning, name = DST_05[cid]
    run = bed.run(name)
    assert run.job.state == "dead", run
    (attempt,) = run.attempts
    assert attempt.outcome == "dead", attempt
    assert "destination misconfigured" in (attempt.error or ""), attempt
    assert meaning in (attempt.error or ""), attempt
    assert bed.scps[name].connections == 1


# --------------------------------------------------------------------------------------
# DST-06 / DST-07: presentation context refused
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cid", "name"), [("DST-06", DST_06), ("DST-07", DST_07)], ids=["DST-06", "DST-07"]
)
def test_dst_06_07_refused_context_is_dead_lettered_and_no_data_is_sent(
    bed: Bed, cid: str, name: str
) -> None:
    """Result 3 (abstract syntax) or 4 (transfer syntaxes not supported): dead letter at
    once. DST-07's transcoding alternative does not exist (files are sent as they are,
    workers/sender.py), so its "else dead-letter" branch is what holds; no P-DATA ever
    reaches the destination (never data in a syntax it did not accept)."""
    run = bed.run(name)
    assert run.job.state == "dead", run
    (attempt,) = run.attempts
    assert attempt.outcome == "dead", attempt
    assert "presentation context not accepted" in (attempt.error or ""), attempt
    scp = bed.scps[name]
    assert scp.record.pdu_lengths == [] and scp.stores == 0


# --------------------------------------------------------------------------------------
# DST-08: aborted mid-transfer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(DST_08))
def test_dst_08_abort_mid_transfer_is_retried(bed: Bed, cid: str) -> None:
    run = bed.run(DST_08[cid])
    assert run.job.state == "done", run
    assert [a.outcome for a in run.attempts] == ["retry", "done"], run.attempts
    assert "aborted" in (run.attempts[0].error or ""), run.attempts


# --------------------------------------------------------------------------------------
# DST-09..DST-14: statuses
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(DST_09))
def test_dst_09_out_of_resources_is_retried(bed: Bed, cid: str) -> None:
    status, name = DST_09[cid]
    run = bed.run(name)
    assert run.job.state == "done", run
    assert run.history() == [("retry", status), ("done", 0)], run.attempts
    assert "busy" in (run.attempts[0].error or ""), run.attempts  # the Error Comment


def _assert_dead_at_once(bed: Bed, cid: str) -> None:
    status, name = DEAD[cid]
    run = bed.run(name)
    assert run.job.state == "dead", run
    assert run.job.last_status == status, run
    assert run.history() == [("dead", status)], run.attempts
    assert f"0x{status:04X}" in (run.attempts[0].error or ""), run.attempts
    assert bed.scps[name].stores == 1


@pytest.mark.parametrize("cid", [c for c in DEAD if c.startswith("DST-10")])
def test_dst_10_data_set_does_not_match_sop_class_is_dead_lettered_at_once(
    bed: Bed, cid: str
) -> None:
    _assert_dead_at_once(bed, cid)


@pytest.mark.parametrize("cid", [c for c in DEAD if c.startswith("DST-11")])
def test_dst_11_cannot_understand_is_dead_lettered_at_once(bed: Bed, cid: str) -> None:
    _assert_dead_at_once(bed, cid)


@pytest.mark.parametrize("cid", [c for c in DEAD if c.startswith("DST-12")])
def test_dst_12_refusal_statuses_are_dead_lettered_at_once_with_the_status(
    bed: Bed, cid: str
) -> None:
    _assert_dead_at_once(bed, cid)


@pytest.mark.parametrize("cid", list(DST_13))
def test_dst_13_warning_completes_and_is_recorded_in_the_attempt(bed: Bed, cid: str) -> None:
    """Retry on warning (dcm4chee's dcmRetryOnWarning) is off by default, as asked;
    workers/retry.classify has the switch but no setting exposes it yet."""
    status, name = DST_13[cid]
    run = bed.run(name)
    assert run.job.state == "done", run
    assert run.history() == [("done_with_warning", status)], run.attempts
    assert (run.attempts[0].error or "").startswith(f"warning 0x{status:04X}"), run.attempts


@pytest.mark.parametrize("cid", list(DST_14))
def test_dst_14_status_undefined_for_c_store_is_retried_to_the_limit_then_dead(
    bed: Bed, cid: str
) -> None:
    status, name = DST_14[cid]
    run = bed.run(name)
    assert run.job.state == "dead", run
    assert run.history() == [("retry", status)] * 2, run.attempts  # max_retries = 2
    assert all(f"0x{status:04X}" in (a.error or "") for a in run.attempts), run.attempts
    assert f"0x{status:04X}" in bed.node.log()  # logged with the raw value


# --------------------------------------------------------------------------------------
# DST-15: a response to something else
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(DST_15))
def test_dst_15_response_to_another_request_aborts_and_is_retried(bed: Bed, cid: str) -> None:
    """A C-STORE-RSP whose Message ID Being Responded To (or Affected SOP Instance UID)
    is not the request's answers nothing we asked (PS3.7 9.1.1.1, 9.3.1.2): the worker
    aborts, the job is not complete, and the retry is."""
    name = DST_15[cid]
    run = bed.run(name)
    assert run.job.state == "done", run
    assert [a.outcome for a in run.attempts] == ["retry", "done"], run.attempts
    assert bed.scps[name].record.aborts >= 1, "the worker did not abort the association"


# --------------------------------------------------------------------------------------
# DST-16: Maximum Length
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(DST_16))
def test_dst_16_fragments_respect_the_destinations_maximum_length(bed: Bed, cid: str) -> None:
    """A 2 MiB instance to a destination announcing Maximum Length 0 (unlimited: our cap
    of 1 MiB applies), 4096 or 1 MiB: every P-DATA-TF it receives is at most that long,
    and the data fill them (the largest is exactly that long)."""
    limit, name = DST_16[cid]
    run = bed.run(name, big=True)
    assert run.job.state == "done", run
    lengths = bed.scps[name].record.pdu_lengths
    assert max(lengths) == limit, (limit, sorted(set(lengths))[-5:])


# --------------------------------------------------------------------------------------
# DST-17: flapping
# --------------------------------------------------------------------------------------
def test_dst_17_flapping_destination_gets_everything_with_bounded_backoff_and_no_storm(
    bed: Bed,
) -> None:
    """Up and down by turns of 1 s for 6 s (full size: every 10 s for 5 minutes), ten
    instances: all arrive; no job waits longer than the backoff cap allows between two
    attempts (plus dispatch slack); connections met while down stay few (the dispatcher
    backs off the destination: a probe at a time, not every job at once)."""
    count = 10
    run = bed.run(DST_17, count=count)
    assert [j.state for j in run.jobs] == ["done"] * count, run
    assert set(bed.scps[DST_17].stored_uids()) == run.uids
    by_job: dict[int, list[Attempt]] = {}
    for a in run.attempts:
        by_job.setdefault(a.job_id, []).append(a)
    slack = dt.timedelta(seconds=2 * RETRY_CAP + 8)  # job backoff + destination backoff
    for history in by_job.values():
        for before, after in itertools.pairwise(history):
            assert after.started_at - before.ended_at <= slack, history
    down_phases = FLAP_FOR / FLAP_PERIOD / 2
    per_phase = 4 + FLAP_PERIOD / (RETRY_BASE / 2) + 1  # leased + probes at the floor
    assert FLAPPING.down_meetings <= down_phases * per_phase, FLAPPING.down_meetings


# --------------------------------------------------------------------------------------
# DST-18: malformed answers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(DST_18))
def test_dst_18_malformed_answer_is_a_typed_error_retried_and_the_worker_survives(
    bed: Bed, cid: str
) -> None:
    """A malformed A-ASSOCIATE-AC/RJ/A-ABORT, an unexpected PDU, an oversized or broken
    P-DATA-TF, or a close in the middle of a PDU: the attempt ends with a typed error
    (never "internal error"), is retried, and the retry succeeds; no child of serve
    died (Bed.run) and the good destination was served."""
    run = bed.run(DST_18[cid])
    assert run.job.state == "done", run
    assert [a.outcome for a in run.attempts] == ["retry", "done"], run.attempts
    error = run.attempts[0].error or ""
    assert error and not error.startswith("internal error"), error


# --------------------------------------------------------------------------------------
# PT-10 (catalogue B.5, P2): the worker side of "no file name from peer text"
# --------------------------------------------------------------------------------------
def test_pt_10_text_from_a_destination_never_becomes_a_path(bed: Bed) -> None:
    """A destination's answer carries a traversal (its Error Comment, with a warning
    status): it lands in the attempt row as text, and nothing is created where it
    points. Workers only send (C-STORE SCU), open spool files by the router's own names
    (router/spool.py refuses any other) and only compare a response's UIDs (DST-15)."""
    target = Path("/tmp/pt10-from-destination")
    assert not target.exists()
    run = bed.run(PT_10)
    assert run.job.state == "done", run
    assert PT_10_TEXT in (run.attempts[0].error or ""), run.attempts
    assert not os.path.lexists(target)
    assert not os.path.lexists(bed.node.data.parent / "pt10-from-destination")


# --------------------------------------------------------------------------------------
# DS-07 (catalogue B.6): forwarded byte for byte
# --------------------------------------------------------------------------------------
def test_ds_07_delimiter_bytes_inside_a_fragment_are_forwarded_byte_identically(bed: Bed) -> None:
    """A JPEG Baseline instance whose fragment holds ``FE FF DD E0 00 00 00 00`` and
    ``FE FF 0D E0``, sent by DCMTK storescu: the scripted destination receives a data
    set hashing to what the node received (Bed.run), which is the spool file's, fragment
    bytes included. (DCMTK storescp, the good destination, accepts no JPEG by default:
    that job is dead-lettered at once, DST-07's outcome with a real peer.)"""
    run = bed.run(DS_07, jpeg=True, good=False)
    assert run.job.state == "done", run
    (uid,) = run.uids
    ((name, digest),) = bed.query(
        "select spool_name, digest from instances where sop_instance_uid = ?", uid
    )
    data = (bed.node.data / "spool" / "store" / name).read_bytes()
    assert DS_07_FRAGMENT in data
    (got,) = [s for s in bed.scps[DS_07].record.stored if s.sop_instance == uid]
    assert got.sha256 == digest
    good = [j for j in bed.jobs("good") if j.sop_instance_uid == uid]
    assert [j.state for j in good] == ["dead"], good
    assert "presentation context not accepted" in (good[0].last_error or ""), good
