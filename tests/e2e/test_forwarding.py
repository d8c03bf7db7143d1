"""Forwarding end to end (issue "forwarding", first slice): DCMTK storescu -> router ->
DCMTK storescp destinations chosen by rules, with real serve, dispatcher and worker
processes and ZeroMQ between them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from db_support import db_query, requested_pg_url
from ingest_support import (
    HOST,
    assert_same_dataset,
    free_port,
    make_dataset,
    require_dcmtk,
    write_part10,
)
from pydicom import dcmread

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _cli(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "dicom-router"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "router.cli", *args]


class Destination:
    def __init__(self, root: Path, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.out = root / f"received-{name}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                require_dcmtk("storescp"),
                "-aet",
                self.name.upper(),
                "-od",
                str(self.out),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def received(self) -> dict[str, Path]:
        return {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in self.out.iterdir()
            if p.is_file()
        }


# The tests of what reaches the destinations and the database run on SQLite and
# PostgreSQL (tests/conftest.py db_backend); those of processes and signals, on SQLite.
ON_BOTH_DATABASES = pytest.mark.usefixtures("db_backend")


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, object]]:
    data = tmp_path / "data"
    db = requested_pg_url(request) or f"sqlite:///{(data / 'router.sqlite').resolve()}"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DICOM_ROUTER_DB"},
        "DICOM_ROUTER_DATA_DIR": str(data),
        "DICOM_ROUTER_WORKERS_RETRY_BASE": "0.3",
        "DICOM_ROUTER_WORKERS_RETRY_CAP": "1",
    }
    if db.startswith("postgresql"):
        env["DICOM_ROUTER_DB"] = db
    subprocess.run(_cli("init"), env=env, check=True, capture_output=True, timeout=60)
    state: dict[str, object] = {"data": data, "env": env, "port": free_port(), "db": db}
    yield state
    proc = state.get("proc")
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _configure(node: dict[str, object], *args: str) -> None:
    subprocess.run(_cli(*args), env=node["env"], check=True, capture_output=True, timeout=60)  # type: ignore[arg-type]


def _serve(node: dict[str, object], log: Path) -> None:
    with open(log, "ab") as out:
        node["proc"] = subprocess.Popen(
            _cli("-v", "serve", "--port", str(node["port"]), "--bind", HOST),
            env=node["env"],
            stdout=out,
            stderr=out,
            start_new_session=True,  # type: ignore[arg-type]
        )
    echoscu = require_dcmtk("echoscu")
    deadline = time.monotonic() + 90  # generous: start-up under load
    while time.monotonic() < deadline:
        if (
            subprocess.run(
                [echoscu, "-aec", "ROUTER", HOST, str(node["port"])], capture_output=True
            ).returncode
            == 0
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"serve did not come up: {log.read_text()}")


def query(node: dict[str, object], sql: str) -> list[tuple[object, ...]]:
    """Rows of ``sql`` on the node's database (SQLite or PostgreSQL)."""
    return db_query(str(node["db"]), sql)


def _jobs(node: dict[str, object]) -> list[tuple[str, str]]:
    return query(  # type: ignore[return-value]
        node, "select d.name, j.state from jobs j join destinations d on d.id = j.destination_id"
    )


def _wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


@ON_BOTH_DATABASES
def test_instances_reach_the_destinations_their_rules_name(
    node: dict[str, object], tmp_path: Path
) -> None:
    pacs, archive = Destination(tmp_path, "pacs"), Destination(tmp_path, "archive")
    for destination in (pacs, archive):
        destination.start()
        _configure(
            node,
            "destinations",
            "add",
            destination.name,
            "--aet",
            destination.name.upper(),
            "--host",
            HOST,
            "--port",
            str(destination.port),
            "--max-associations",
            "1",
        )
    _configure(node, "rules", "add", "ct", "--when", "Modality == CT", "--to", "pacs,archive")
    _configure(node, "rules", "add", "mr", "--when", "Modality == MR", "--to", "archive")
    _serve(node, tmp_path / "serve.log")
    study = tmp_path / "study"
    study.mkdir()
    sent = {}
    for i in range(20):
        ds = make_dataset("CT" if i % 2 else "MR")
        write_part10(ds, study / f"{i}.dcm")
        sent[str(ds.SOPInstanceUID)] = ds
    result = subprocess.run(
        [require_dcmtk("storescu"), "-aec", "ROUTER", "+sd", HOST, str(node["port"]), str(study)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ct = {uid for uid, ds in sent.items() if ds.Modality == "CT"}
    assert _wait_for(lambda: len(archive.received()) == 20 and len(pacs.received()) == 10, 60), (
        tmp_path / "serve.log"
    ).read_text()[-3000:]
    assert set(pacs.received()) == ct
    assert set(archive.received()) == set(sent)
    for uid, path in archive.received().items():
        assert_same_dataset(path, sent[uid], EXPLICIT_LE)
    assert _wait_for(lambda: {state for _, state in _jobs(node)} == {"done"}, 30)
    store = Path(str(node["data"])) / "spool" / "store"
    assert _wait_for(lambda: not any(p.is_file() for p in store.rglob("*")), 30)
    for destination in (pacs, archive):
        destination.stop()


@ON_BOTH_DATABASES
def test_a_destination_that_comes_up_later_receives_everything(
    node: dict[str, object], tmp_path: Path
) -> None:
    late = Destination(tmp_path, "late")
    _configure(
        node,
        "destinations",
        "add",
        "late",
        "--aet",
        "LATE",
        "--host",
        HOST,
        "--port",
        str(late.port),
        "--max-associations",
        "1",
    )
    _configure(node, "rules", "add", "all", "--to", "late")
    _serve(node, tmp_path / "serve.log")
    study = tmp_path / "study"
    study.mkdir()
    for i in range(5):
        write_part10(make_dataset("CT"), study / f"{i}.dcm")
    result = subprocess.run(
        [require_dcmtk("storescu"), "-aec", "ROUTER", "+sd", HOST, str(node["port"]), str(study)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Refused connections are retried with backoff: attempts are recorded meanwhile.
    assert _wait_for(lambda: any(state == "retry_wait" for _, state in _jobs(node)), 30)
    late.start()
    try:
        assert _wait_for(lambda: len(late.received()) == 5, 60), (
            tmp_path / "serve.log"
        ).read_text()[-3000:]
        assert _wait_for(lambda: {state for _, state in _jobs(node)} == {"done"}, 30)
        outcomes = [row[0] for row in query(node, "select outcome from attempts")]
        assert "retry" in outcomes and outcomes.count("done") == 5
    finally:
        late.stop()


@ON_BOTH_DATABASES
def test_cannot_understand_is_dead_lettered_and_queue_retry_sends_it_again(
    node: dict[str, object], tmp_path: Path
) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    answer = {"status": 0xC000}
    received: list[str] = []

    def on_store(event: object) -> int:
        if answer["status"] == 0:
            received.append(str(event.dataset.SOPInstanceUID))  # type: ignore[attr-defined]
        return answer["status"]

    ae = AE(ae_title="PICKY")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        _configure(
            node,
            "destinations",
            "add",
            "picky",
            "--aet",
            "PICKY",
            "--host",
            HOST,
            "--port",
            str(port),
        )
        _configure(node, "rules", "add", "all", "--to", "picky")
        _serve(node, tmp_path / "serve.log")
        study = tmp_path / "study"
        study.mkdir()
        write_part10(make_dataset("CT"), study / "ct.dcm")
        result = subprocess.run(
            [
                require_dcmtk("storescu"),
                "-aec",
                "ROUTER",
                HOST,
                str(node["port"]),
                str(study / "ct.dcm"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        # 0xC000 goes to dead letter at once: one attempt, no retries.
        assert _wait_for(lambda: [s for _, s in _jobs(node)] == ["dead"], 30)
        assert query(node, "select count(*), max(dimse_status) from attempts") == [(1, 0xC000)]
        answer["status"] = 0x0000  # the destination is fixed
        _configure(node, "queue", "retry", "--destination", "picky")
        assert _wait_for(lambda: [s for _, s in _jobs(node)] == ["done"], 30)
        assert len(received) == 1
    finally:
        server.shutdown()


def test_sigterm_stops_serve_and_every_child_with_status_0(
    node: dict[str, object], tmp_path: Path
) -> None:
    _configure(
        node,
        "destinations",
        "add",
        "nowhere",
        "--aet",
        "NOWHERE",
        "--host",
        HOST,
        "--port",
        str(free_port()),
    )
    _configure(node, "rules", "add", "all", "--to", "nowhere")
    _serve(node, tmp_path / "serve.log")
    proc = node["proc"]
    assert isinstance(proc, subprocess.Popen)
    group = os.getpgid(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)  # anyone left in serve's process group?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a child of serve outlived it")


@ON_BOTH_DATABASES
def test_a_rule_added_while_serving_applies_to_the_next_association(
    node: dict[str, object], tmp_path: Path
) -> None:
    _serve(node, tmp_path / "serve.log")
    _configure(
        node,
        "destinations",
        "add",
        "pacs",
        "--aet",
        "PACS",
        "--host",
        HOST,
        "--port",
        str(free_port()),
    )
    _configure(node, "rules", "add", "ct", "--when", "Modality == CT", "--to", "pacs")
    path = write_part10(make_dataset("CT"), tmp_path / "ct.dcm")
    result = subprocess.run(
        [require_dcmtk("storescu"), "-aec", "ROUTER", HOST, str(node["port"]), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [name for name, _ in _jobs(node)] == ["pacs"]
