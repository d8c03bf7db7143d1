"""Fixtures of the catalogue tests: ``catalogue_node`` and ``invariant``.

``catalogue_node`` (module scope) is one ``dicom-router serve`` (tests/e2e/conftest.py's
``NodeUnderTest``: AE title ROUTER, one listener, no workers, unrouted instances kept) on
a free port, with ARTIM (``listener.acse_timeout``) at ``ARTIM`` seconds so Sta2/Sta13
cases are cheap. ``invariant`` (function scope) checks the catalogue's global invariant
at teardown (reliability catalogue Part B, "global invariant"; Part C.7):

1. the bad peer got the prescribed bytes or a clean close (the test asserts that itself
   with ``RawPeer.expect*``);
2. a well-behaved DCMTK storescu C-STORE and a pynetdicom C-ECHO succeed after the case
   (and, with ``invariant.during()``, while the bad peer acts);
3. the listener's fds (/proc, by kind), its asyncio tasks (the
   ``dicom_router_listener_asyncio_tasks`` gauge) and spool temporary files are back at
   their baseline;
4. each RawPeer of the case has exactly one WARNING line naming its address (or none,
   with ``expect_no_warning``); no ERROR, no traceback, no patient data anywhere in the
   case's log;
5. no instance row or spool file for anything not acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import HOST, PATIENT_ID, PATIENT_NAME, PEERS, ProcessWatch, catalogue_dataset

import tests.e2e.conftest as e2e  # the module pytest loaded (same name, same object)
from tests.e2e.ingest_support import require_dcmtk, write_part10

#: ARTIM of the catalogue node (first PDU after connect; Sta13 before close), seconds.
ARTIM = 2.0
TASKS_GAUGE = "dicom_router_listener_asyncio_tasks"
GOOD_AET = "GOODSCU"


class CatalogueNode(e2e.NodeUnderTest):
    """A NodeUnderTest with what the catalogue cases read: listener pids, their asyncio
    task gauge, the log since an offset, and the good peers."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(root, env)
        self.good_dir = root / "good"
        self.good_dir.mkdir(parents=True, exist_ok=True)
        self._good = 0

    # -- processes -------------------------------------------------------------------
    def children(self) -> dict[str, int]:
        path = self.data_dir / "run" / "node.json"
        state = json.loads(path.read_text())
        return {
            name: int(child["pid"])
            for name, child in state.get("children", {}).items()
            if child.get("pid") is not None
        }

    def listener_pids(self) -> list[int]:
        return sorted(pid for name, pid in self.children().items() if name.startswith("listener"))

    def tasks(self) -> dict[int, float]:
        """pid -> asyncio tasks of each listener at its latest association event."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.data_dir / "run" / "metrics"))  # type: ignore[no-untyped-call]
        out: dict[int, float] = {}
        for family in registry.collect():
            if family.name == TASKS_GAUGE:
                for sample in family.samples:
                    out[int(sample.labels["pid"])] = sample.value
        live = set(self.listener_pids())
        return {pid: value for pid, value in out.items() if pid in live}

    # -- log -------------------------------------------------------------------------
    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    # -- good peers ------------------------------------------------------------------
    def good_store(self, count: int = 1, timeout: float = 60.0) -> list[str]:
        """DCMTK storescu stores ``count`` fresh instances; returns their SOP Instance
        UIDs once each has its row (the C-STORE success promises the commit)."""
        storescu = require_dcmtk("storescu")
        files, uids = [], []
        for _ in range(count):
            self._good += 1
            ds = catalogue_dataset()
            path = write_part10(ds, self.good_dir / f"good{self._good}.dcm")
            files.append(str(path))
            uids.append(str(ds.SOPInstanceUID))
        argv = [storescu, "-aet", GOOD_AET, "-aec", "ROUTER", HOST, str(self.port), *files]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        for path in files:
            Path(path).unlink()
        assert result.returncode == 0, f"good storescu failed:\n{result.stdout}{result.stderr}"
        stored = {str(row[0]) for row in self.query("select sop_instance_uid from instances")}
        missing = [uid for uid in uids if uid not in stored]
        assert not missing, f"good storescu exited 0 but no row for {missing}:\n{result.stderr}"
        return uids

    def good_echo(self, timeout: float = 30.0) -> None:
        """A pynetdicom C-ECHO succeeds (association, echo, release)."""
        from pynetdicom import AE

        ae = AE(ae_title="GOODECHO")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(HOST, self.port, ae_title="ROUTER")
        try:
            assert assoc.is_established, "pynetdicom could not associate"
            status = assoc.send_c_echo()
            assert getattr(status, "Status", None) == 0x0000, f"C-ECHO status {status}"
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    def uids(self) -> set[str]:
        return {str(row[0]) for row in self.query("select sop_instance_uid from instances")}


@pytest.fixture(scope="module")
def catalogue_node(
    tmp_path_factory: pytest.TempPathFactory, configured_data_dir: Path
) -> Iterator[CatalogueNode]:
    node = CatalogueNode(
        tmp_path_factory.mktemp("catalogue"),
        {"DICOM_ROUTER_LISTENER_ACSE_TIMEOUT": str(ARTIM)},
    )
    shutil.copytree(configured_data_dir, node.data_dir, symlinks=True)
    try:
        node.start()
        # Warm up what a listener opens lazily (database connections, executor threads,
        # the gauge's first sample), so the first case's baseline is the steady state.
        node.good_store(2)
        node.good_echo()
        yield node
    finally:
        node.kill()


# --------------------------------------------------------------------------------------
# the invariant
# --------------------------------------------------------------------------------------
def peer_pattern(address: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(address)}(?!\d)")


class Invariant:
    """The global invariant of one case (checked by the fixture at teardown)."""

    def __init__(self, node: CatalogueNode) -> None:
        self.node = node
        PEERS.clear()
        self._offset = node.log_size()
        self._rows = node.uids()
        self._acknowledged: set[str] = set()
        self._tmp = node.tmp_files()
        self._watch = ProcessWatch(node.listener_pids())
        self._tasks = self._settled_tasks()
        self._warning: re.Pattern[str] | None = None
        self._warnings: set[int] = {1}
        self._good_peers: set[str] = set()
        self._during_errors: list[BaseException] = []

    # -- what the case says ------------------------------------------------------------
    def expect_warning(self, regex: str, count: int = 1) -> None:
        """Each RawPeer of the case has ``count`` WARNING line(s), matching ``regex``."""
        self._warning = re.compile(regex)
        self._warnings = {count}

    def expect_no_warning(self) -> None:
        self._warnings = {0}

    def allow_warning(self, regex: str = ".") -> None:
        """Each RawPeer has at most one WARNING line (matching ``regex``): for cases whose
        peers are not all bad (a fuzzed frame may be a valid request)."""
        self._warning = re.compile(regex)
        self._warnings = {0, 1}

    def good_peer(self, peer: object) -> None:
        """This RawPeer (or "host:port") behaved: it must have no WARNING line, whatever
        the case expects of the others (e.g. a peer that only checks what is negotiated)."""
        self._good_peers.add(str(getattr(peer, "address", peer)))

    def acknowledged(self, uid: str) -> None:
        """The case acknowledged this instance on purpose: its row and file stay."""
        self._acknowledged.add(uid)

    @contextlib.contextmanager
    def during(self, interval: float = 0.0) -> Iterator[list[str]]:
        """A good DCMTK peer stores, again and again, while the body runs (at least
        once, and once more after it); yields the list of UIDs it stored so far."""
        stored: list[str] = []
        stop = threading.Event()

        def run() -> None:
            try:
                while True:
                    stored.extend(self.node.good_store(1))
                    if stop.is_set():
                        return
                    stop.wait(interval)
            except BaseException as exc:  # reported in the test's thread
                self._during_errors.append(exc)

        thread = threading.Thread(target=run, name="good-peer", daemon=True)
        thread.start()
        try:
            yield stored
        finally:
            stop.set()
            thread.join(timeout=120)
        assert not thread.is_alive(), "the good peer did not finish within 120 s"
        if self._during_errors:
            raise AssertionError(f"the good peer failed during the case: {self._during_errors[0]}")
        assert stored, "the good peer stored nothing during the case"
        self._acknowledged.update(stored)

    # -- checks ------------------------------------------------------------------------
    def _settled_tasks(self, timeout: float = 0.0) -> dict[int, float]:
        return self.node.tasks()

    def check(self) -> None:
        node = self.node
        assert node.running, f"serve is not running:\n{node.log_since(self._offset)}"
        # 2. good peers after the case.
        self._acknowledged.update(node.good_store(1))
        node.good_echo()
        # 3. fds, tasks, spool temporary files.
        self._watch.assert_back_to_baseline(timeout=15)
        self._assert_tasks_back(timeout=15)
        assert node.tmp_files() == self._tmp, f"spool/tmp not back: {node.tmp_files()}"
        # 5. nothing kept that was not acknowledged.
        unexpected = node.uids() - self._rows - self._acknowledged
        assert not unexpected, f"rows for instances never acknowledged: {sorted(unexpected)}"
        node.assert_spool_matches_database()
        # 4. the log.
        self._assert_log()

    def _assert_tasks_back(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            now = self.node.tasks()
            grown = {
                pid: (self._tasks[pid], value)
                for pid, value in now.items()
                if pid in self._tasks and value > self._tasks[pid]
            }
            if not grown:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"asyncio tasks not back to baseline: {grown}")
            time.sleep(0.1)

    def _peer_lines(self, text: str) -> dict[str, list[str]]:
        warnings = [line for line in text.splitlines() if " WARNING " in line]
        return {
            peer: [line for line in warnings if peer_pattern(peer).search(line)] for peer in PEERS
        }

    def _assert_log(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.node.log_since(self._offset)
            lines = self._peer_lines(text)
            done = all(
                len(found) >= min(self._warnings)
                for peer, found in lines.items()
                if peer not in self._good_peers
            )
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for peer, found in lines.items():
            if peer in self._good_peers:
                assert not found, f"{peer} behaved, yet has WARNING lines: {found}"
                continue
            assert len(found) in self._warnings, (
                f"{peer}: expected {self._warnings} WARNING line(s), got {len(found)}:\n{text}"
            )
            if self._warning is not None:
                for line in found:
                    assert self._warning.search(line), f"{peer}: {line!r} !~ {self._warning}"
        bad = [
            line
            for line in text.splitlines()
            if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
        ]
        assert not bad, "errors in the node's log during the case:\n" + "\n".join(bad)
        for phi in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.replace("^", " ")):
            assert phi not in text, f"patient data {phi!r} in the node's log:\n{text}"


@pytest.fixture
def invariant(catalogue_node: CatalogueNode) -> Iterator[Invariant]:
    inv = Invariant(catalogue_node)
    yield inv
    inv.check()
