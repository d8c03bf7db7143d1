"""The node's Prometheus endpoint against a real serve: the listeners' counters summed
across processes, and job figures and worker liveness that agree with `dicom-router
queue status` (on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import test_forwarding
from ingest_support import HOST, free_port, make_dataset, require_dcmtk, write_part10
from prometheus_client.parser import text_string_to_metric_families
from test_forwarding import (
    ON_BOTH_DATABASES,
    Destination,
    _cli,
    _configure,
    _jobs,
    _serve,
    _wait_for,
)

node = test_forwarding.node  # the forwarding suite's node fixture
CONNECTED = ("dicom_router_workers_connected", ())


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


WORKER_TIMEOUT = 15.0  # the dispatcher forgets a worker silent this long
CREDIT = 64  # workers.credit's default


@ON_BOTH_DATABASES
def test_metrics_count_what_the_listeners_did_and_agree_with_queue_status(
    node: dict[str, object], tmp_path: Path
) -> None:
    metrics_port = free_port()
    node["env"] = {
        **node["env"],  # type: ignore[dict-item]
        "DICOM_ROUTER_METRICS_ENABLED": "1",
        "DICOM_ROUTER_METRICS_PORT": str(metrics_port),
        "DICOM_ROUTER_WORKERS_RETRY_BASE": "600",  # the dead destination waits: stable
        "DICOM_ROUTER_WORKERS_RETRY_CAP": "600",
    }
    pacs = Destination(tmp_path, "pacs")
    pacs.start()
    try:
        for name, port in (("pacs", pacs.port), ("nowhere", free_port())):
            _configure(
                node,
                *("destinations", "add", name, "--aet", name.upper(), "--host", HOST),
                *("--port", str(port), "--max-associations", "1"),
            )
        _configure(node, "rules", "add", "all", "--to", "pacs,nowhere")
        _serve(node, tmp_path / "serve.log")
        study = tmp_path / "study"
        study.mkdir()
        for i in range(10):
            write_part10(make_dataset("CT"), study / f"{i}.dcm")
        result = subprocess.run(
            [
                require_dcmtk("storescu"),
                "-aec",
                "ROUTER",
                "+sd",
                HOST,
                str(node["port"]),
                str(study),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

        def settled() -> bool:
            # nowhere's first jobs failed and wait (600 s); the dispatcher backs the whole
            # destination off meanwhile, so the rest stay pending: no state moves.
            jobs = _jobs(node)
            waiting = jobs.count(("nowhere", "retry_wait"))
            return (
                jobs.count(("pacs", "done")) == 10
                and waiting >= 1
                and waiting + jobs.count(("nowhere", "pending")) == 10
            )

        assert _wait_for(settled, 120), (tmp_path / "serve.log").read_text()[-2000:]
        # The dispatcher's view of its worker is written about once a second.
        assert _wait_for(lambda: _scrape(metrics_port)[CONNECTED] == 1, 30)
        scraped = time.monotonic()
        samples = _scrape(metrics_port)
        status = json.loads(
            subprocess.run(
                _cli("queue", "status", "--json"),
                env=node["env"],  # type: ignore[arg-type]
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )
        between = time.monotonic() - scraped  # the CLI's start-up, slow under load
    finally:
        pacs.stop()

    for row in status["destinations"]:
        for state in ("pending", "leased", "retry_wait", "done", "dead"):
            key = ("dicom_router_jobs", (("destination", row["destination"]), ("state", state)))
            assert samples[key] == row[state], (key, samples[key], row)
    for row in status["destinations"]:
        oldest = samples[
            ("dicom_router_oldest_pending_age_seconds", (("destination", row["destination"]),))
        ]
        if row["oldest_pending_s"] is None:
            assert oldest == 0
        else:
            # scraped a moment before queue status read it
            assert oldest >= row["oldest_pending_s"] - between - 1
    assert (
        samples[("dicom_router_attempts_total", (("destination", "pacs"), ("outcome", "done")))]
        == 10
    )
    assert samples[("dicom_router_received_instances_total", (("result", "success"),))] == 10
    assert samples[("dicom_router_received_bytes_total", ())] > 10 * 1000
    assert samples[("dicom_router_ack_latency_seconds_count", ())] == 10
    # Worker liveness: the same workers, by name and host, heard from recently.
    heard = {
        dict(labels)["worker"]: (dict(labels)["host"], value)
        for (name, labels), value in samples.items()
        if name == "dicom_router_worker_last_heard_seconds"
    }
    assert samples[CONNECTED] == len(status["workers"]) == 1, (heard, status["workers"])
    assert heard.keys() == {w["worker"] for w in status["workers"]}
    for row in status["workers"]:
        host, seconds = heard[row["worker"]]
        assert host == row["host"] == "local"  # serve's own worker, over ipc://
        assert 0 <= seconds < WORKER_TIMEOUT + 1 and 0 <= row["last_heard_s"] < WORKER_TIMEOUT + 1
        # Read from one view at most `between` (+ its one-second refresh) apart.
        assert row["last_heard_s"] <= seconds + between + 1.5, (row, seconds, between)
        # Credit moves as the backed-off destination's probe is leased and given back.
        labels = (("host", host), ("worker", row["worker"]))
        assert 0 <= samples[("dicom_router_worker_credit", labels)] <= CREDIT
        assert 0 <= row["credit"] <= CREDIT
    assoc = [k for k in samples if "assoc" in k[0]]
    assert samples[("dicom_router_associations_total", (("result", "accepted"),))] >= 1, assoc
