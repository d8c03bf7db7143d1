"""Worker liveness (router/liveness.py): the dispatcher's view file, written from real
ZeroMQ hellos over tcp:// and ipc://, the metrics read from it, and the dispatcher's
worker timeout as a setting (workers.timeout)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from sqlalchemy import Engine

from router.db.engine import make_engine, sqlite_url_for
from router.db.jobs import JobQueue
from router.db.migrate import upgrade
from router.dispatcher import Dispatcher, Endpoint
from router.liveness import STALE_AFTER, WorkerSeen, read_view, view_path, write_view
from router.messages import Heartbeat, Hello
from router.metrics import WorkerCollector
from router.settings import SettingsError, load_settings


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = sqlite_url_for(tmp_path)
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_a_view_reads_back_and_a_stale_or_broken_one_means_no_worker(tmp_path: Path) -> None:
    path = view_path(tmp_path)
    assert path == tmp_path / "run" / "workers.json"
    assert read_view(path) == ()  # no file
    seen = [
        WorkerSeen("w2", "10.0.0.2", ("pacs", "ai"), 3, 1000.0),
        WorkerSeen("w1", "local", None, 0, 990.0),
    ]
    write_view(path, seen, now=1001.0)
    assert read_view(path, now=1002.0) == (seen[1], seen[0])  # by name
    assert read_view(path, now=1001.0 + STALE_AFTER + 1) == ()  # the dispatcher is gone
    assert [p.name for p in path.parent.iterdir()] == ["workers.json"]  # no temp file left
    path.write_text("{not json")
    assert read_view(path) == ()
    path.write_text(json.dumps({"version": 99, "written_at": time.time(), "workers": []}))
    assert read_view(path) == ()


def test_the_worker_collector_gives_connected_last_heard_and_credit(tmp_path: Path) -> None:
    path = view_path(tmp_path)
    now = time.time()
    write_view(path, [WorkerSeen("w1", "10.0.0.2", None, 4, now - 2.5)], now=now)
    families = {f.name: f for f in WorkerCollector(path).collect()}
    assert [s.value for s in families["dicom_router_workers_connected"].samples] == [1]
    (heard,) = families["dicom_router_worker_last_heard_seconds"].samples
    assert heard.labels == {"worker": "w1", "host": "10.0.0.2"}
    assert 2.5 <= heard.value < 2.5 + 5  # read a moment later (generous under load)
    (credit,) = families["dicom_router_worker_credit"].samples
    assert credit.value == 4
    path.unlink()
    families = {f.name: f for f in WorkerCollector(path).collect()}
    assert [s.value for s in families["dicom_router_workers_connected"].samples] == [0]
    assert families["dicom_router_worker_last_heard_seconds"].samples == []


def test_the_dispatcher_publishes_each_worker_with_its_peer_and_forgets_a_silent_one(
    engine: Engine, tmp_path: Path
) -> None:
    path = view_path(tmp_path)
    ipc = f"ipc://{tmp_path / 'workers.sock'}"

    def view() -> dict[str, WorkerSeen]:
        return {w.name: w for w in read_view(path)}

    async def until(predicate: object, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return True
            await asyncio.sleep(0.1)
        return False

    async def scenario() -> None:
        dispatcher = Dispatcher(
            JobQueue(engine),
            [Endpoint("tcp://127.0.0.1:0"), Endpoint(ipc)],
            worker_timeout=3.0,
            liveness=path,
        )
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(dispatcher.run(stop, ready))
        await asyncio.wait_for(ready.wait(), 10)
        context = zmq.asyncio.Context()
        remote, local = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
        try:
            for socket, url in ((remote, f"tcp://127.0.0.1:{dispatcher.ports[0]}"), (local, ipc)):
                socket.setsockopt(zmq.LINGER, 0)
                socket.connect(url)
            # Credit 0: nothing is leased, only heard.
            await remote.send(Hello("remote-1", ("pacs",), 0).encode())
            await local.send(Hello("local-1", None, 0).encode())
            assert await until(lambda: set(view()) == {"remote-1", "local-1"}), view()
            seen = view()
            assert seen["remote-1"].host == "127.0.0.1"
            assert seen["remote-1"].destinations == ("pacs",)
            assert seen["local-1"].host == "local" and seen["local-1"].destinations is None
            assert all(w.silent_for(time.time()) < 3.0 + 2 for w in seen.values())

            # remote-1 keeps beating, local-1 falls silent: past the worker timeout the
            # dispatcher forgets it, and so does the view.
            async def beat() -> None:
                while True:
                    await remote.send(Heartbeat().encode())
                    await asyncio.sleep(0.5)

            beating = asyncio.ensure_future(beat())
            try:
                assert await until(lambda: set(view()) == {"remote-1"}), view()
                assert view()["remote-1"].silent_for(time.time()) < 3.0
            finally:
                beating.cancel()
        finally:
            remote.close()
            local.close()
            context.term()
            stop.set()
            await asyncio.wait_for(task, 10)
        assert not path.exists()  # a stopped dispatcher knows of no worker

    asyncio.run(scenario())


def test_workers_timeout_is_a_setting_of_at_least_two_heartbeats(tmp_path: Path) -> None:
    environ = {"DICOM_ROUTER_DATA_DIR": str(tmp_path)}
    assert load_settings(environ=environ).workers.timeout == 15.0
    configured = load_settings(environ={**environ, "DICOM_ROUTER_WORKERS_TIMEOUT": "45"})
    assert configured.workers.timeout == 45.0
    config = tmp_path / "config.toml"
    config.write_text("[workers]\ntimeout = 6.5\n")
    assert load_settings(config, environ=environ).workers.timeout == 6.5
    for bad in ("3", "0", "-1", "soon"):
        with pytest.raises(SettingsError, match=r"workers\.timeout"):
            load_settings(environ={**environ, "DICOM_ROUTER_WORKERS_TIMEOUT": bad})
