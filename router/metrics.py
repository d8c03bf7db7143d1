"""Prometheus metrics of the node (served by the supervisor's ``metrics`` process).

Two sources, one endpoint:

- Counters and histograms that processes keep as they work (the listeners: instances
  and bytes received, acknowledgement latency, associations). The node's processes are
  separate, so prometheus-client's multiprocess mode is used: the supervisor points
  ``PROMETHEUS_MULTIPROC_DIR`` at ``<data dir>/run/metrics`` (emptied at each start)
  before it spawns anyone, each process writes its own files there, and the exporter
  sums them.
- Gauges read from the database at each scrape (``DatabaseCollector``): jobs by state and
  destination, the oldest job still to do, attempts by outcome. They come from the same
  ``JobQueue.status_summary`` as ``dicom-router queue status``, so both always agree.
- Worker liveness as the dispatcher sees it (``WorkerCollector``, from the view file of
  router/liveness.py that ``queue status`` reads too): workers connected, and per worker
  and host the seconds since the dispatcher last heard from it and its free credit.

Metric names start with ``dicom_router_``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds from the last byte of a C-STORE's dataset to its response: the durability
#: cost (file fsync, rename, directory fsync, database commit) plus rule evaluation.
ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """Called by the supervisor before it starts any child: a fresh, private directory
    for the processes' metric files, named in the environment the children inherit."""
    directory = data_dir / "run" / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


class ListenerMetrics:
    """What one listener process counts. Without the multiprocess directory (a listener
    run on its own, in tests) the values live in this process only."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.instances = Counter(
            "dicom_router_received_instances",
            "C-STORE requests answered by the listeners, by result",
            ["result"],
        )
        self.bytes = Counter(
            "dicom_router_received_bytes", "Dataset bytes of instances stored and acknowledged"
        )
        self.ack_latency = Histogram(
            "dicom_router_ack_latency_seconds",
            "From the last byte of a C-STORE dataset to its response (success only)",
            buckets=ACK_BUCKETS,
        )
        self.associations = Counter(
            "dicom_router_associations",
            "Associations requested of the listeners, by result",
            ["result"],
        )
        self.active = Gauge(
            "dicom_router_associations_active",
            "Associations open now",
            multiprocess_mode="livesum",
        )
        # Sampled at each association event: a leaked task (a case of the catalogue's
        # global invariant) shows as a count that does not come back after the peer left.
        self.tasks = Gauge(
            "dicom_router_listener_asyncio_tasks",
            "asyncio tasks of this listener process at its latest association event",
            multiprocess_mode="liveall",
        )

    def stored(self, size: int, seconds: float) -> None:
        self.instances.labels("success").inc()
        self.bytes.inc(size)
        self.ack_latency.observe(seconds)

    def refused(self) -> None:
        self.instances.labels("failure").inc()

    def watch(self, server: Any) -> None:
        """Count the associations of this process's SCP server (protocol.net)."""

        def on_association(event: str) -> None:
            if event != "closed":
                self.associations.labels(event).inc()
            self.active.set(len(server.associations))
            self.tasks.set(len(asyncio.all_tasks()))

        server.on_association = on_association


_LISTENER: ListenerMetrics | None = None


def listener_metrics() -> ListenerMetrics:
    """This process's listener metrics (one set per process: the registry is global)."""
    global _LISTENER
    if _LISTENER is None:
        _LISTENER = ListenerMetrics()
    return _LISTENER


class DatabaseCollector:
    """Job figures read at scrape time through ``JobQueue`` (router/db/jobs.py)."""

    def __init__(self, queue: Any, window: dt.timedelta = dt.timedelta(minutes=5)) -> None:
        self._queue = queue
        self._window = window

    def describe(self) -> list[Any]:
        return []  # figures are read at collect time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        summary = self._queue.status_summary(window=self._window)
        jobs = GaugeMetricFamily(
            "dicom_router_jobs", "Jobs by destination and state", labels=["destination", "state"]
        )
        oldest = GaugeMetricFamily(
            "dicom_router_oldest_pending_age_seconds",
            "Age of the oldest job still to do (pending, leased or waiting to retry)",
            labels=["destination"],
        )
        for d in summary.destinations:
            for state in ("pending", "leased", "retry_wait", "done", "dead"):
                jobs.add_metric([d.destination, state], getattr(d, state))
            age = d.oldest_pending_age
            oldest.add_metric([d.destination], age.total_seconds() if age else 0.0)
        yield jobs
        yield oldest
        attempts = CounterMetricFamily(
            "dicom_router_attempts",
            "Forwarding attempts by destination and outcome",
            labels=["destination", "outcome"],
        )
        for destination, outcome, count in self._queue.attempt_counts():
            attempts.add_metric([destination, outcome], count)
        yield attempts


class WorkerCollector:
    """Worker liveness read at scrape time from the dispatcher's view file."""

    def __init__(self, view: Path) -> None:
        self._view = view

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        import time

        from prometheus_client.core import GaugeMetricFamily

        from router.liveness import read_view

        now = time.time()
        workers = read_view(self._view, now)
        yield GaugeMetricFamily(
            "dicom_router_workers_connected",
            "Workers the dispatcher heard from within its worker timeout",
            value=len(workers),
        )
        silent = GaugeMetricFamily(
            "dicom_router_worker_last_heard_seconds",
            "Seconds since the dispatcher last heard from the worker (heartbeats included)",
            labels=["worker", "host"],
        )
        credit = GaugeMetricFamily(
            "dicom_router_worker_credit",
            "Leases the worker can take now (its free credit)",
            labels=["worker", "host"],
        )
        for worker in workers:
            silent.add_metric([worker.name, worker.host], worker.silent_for(now))
            credit.add_metric([worker.name, worker.host], worker.credit)
        yield silent
        yield credit


def serve_metrics(queue: Any, bind: str, port: int, liveness: Path | None = None) -> Any:
    """Start the HTTP endpoint in this process (the supervisor's ``metrics`` child):
    the listeners' multiprocess files plus the database figures (and, with ``liveness``,
    the dispatcher's view of the workers)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(DatabaseCollector(queue))
    if liveness is not None:
        registry.register(WorkerCollector(liveness))
    return start_http_server(port, addr=bind, registry=registry)


def mark_process_dead(pid: int) -> None:
    """The supervisor tells the multiprocess collector that a child is gone, so its
    live gauges stop counting (its counters stay: they were real)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
