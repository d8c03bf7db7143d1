"""A worker on "another host" (DESIGN §3, §7): `dicom-router worker --connect tcp://…`
with a data directory of its own (no access to the node's spool: every file comes over
ZeroMQ in chunks), CURVE keys from `dicom-router keys generate`, the node's database by
URL (SQLite, and PostgreSQL as a deployment across hosts would use). Real serve, worker
and DCMTK storescp processes on loopback; the multi-host version with network namespaces
is tests/e2e/test_multihost.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingest_support import HOST, assert_same_dataset, free_port, make_dataset, require_dcmtk
from ingest_support import write_part10 as write
from test_forwarding import (  # the node fixture too
    EXPLICIT_LE,
    ON_BOTH_DATABASES,
    Destination,
    _cli,
    _configure,
    _jobs,
    _serve,
    _wait_for,
    node,
)

__all__ = ["node"]


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[dict[str, object]]:
    """Keys for the node and two workers, one of them allowed; the node's settings for a
    CURVE worker endpoint on loopback."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("node", "remote", "stranger"):
        subprocess.run(
            _cli("keys", "generate", name, "--dir", str(keys)), check=True, capture_output=True
        )
    shutil.copy(keys / "remote.pub", allowed / "remote.pub")
    state: dict[str, object] = {"keys": keys, "allowed": allowed, "port": free_port()}
    state["procs"] = []
    yield state
    for proc in state["procs"]:  # type: ignore[attr-defined]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _serve_with_worker_endpoint(
    node: dict[str, object], remote: dict[str, object], log: Path
) -> None:
    keys = Path(str(remote["keys"]))
    node["env"] = {
        **node["env"],  # type: ignore[dict-item]
        "DICOM_ROUTER_WORKERS_COUNT": "0",  # only the remote worker forwards
        "DICOM_ROUTER_WORKERS_BIND": f"tcp://{HOST}:{remote['port']}",
        "DICOM_ROUTER_WORKERS_KEY": str(keys / "node.key"),
        "DICOM_ROUTER_WORKERS_ALLOWED_KEYS": str(remote["allowed"]),
    }
    _serve(node, log)


def _start_worker(
    node: dict[str, object], remote: dict[str, object], tmp_path: Path, key: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A worker with its own (empty) data directory, so no spool of the node's."""
    keys = Path(str(remote["keys"]))
    home = tmp_path / f"worker-{key}"
    home.mkdir()
    log = tmp_path / f"worker-{key}.log"
    database = str(node["db"])  # the node's SQLite file, or its PostgreSQL database
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ROUTER_")}
    env["TMPDIR"] = str(home)  # its fetched files, to check that none is left behind
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            _cli(
                "-v",
                "--data-dir",
                str(home),
                "worker",
                "--connect",
                f"tcp://{HOST}:{remote['port']}",
                "--db",
                database,
                "--server-key",
                str(keys / "node.pub"),
                "--key",
                str(keys / f"{key}.key"),
            ),
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    remote["procs"].append(proc)  # type: ignore[attr-defined]
    return proc, home, log


def _send(node: dict[str, object], study: Path) -> None:
    result = subprocess.run(
        [require_dcmtk("storescu"), "-aec", "ROUTER", "+sd", HOST, str(node["port"]), str(study)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def _study(root: Path, count: int, *, big: int = 0) -> dict[str, object]:
    root.mkdir()
    sent = {}
    for i in range(count):
        # A big one spans several 1 MiB chunks (2 MiB of 16-bit pixels and a remainder).
        ds = make_dataset("CT", rows=1030, columns=1024) if i < big else make_dataset("CT")
        write(ds, root / f"{i}.dcm")
        sent[str(ds.SOPInstanceUID)] = ds
    return sent


@ON_BOTH_DATABASES
def test_a_worker_without_the_spool_fetches_over_curve_and_forwards_every_instance(
    node: dict[str, object], remote: dict[str, object], tmp_path: Path
) -> None:
    pacs = Destination(tmp_path, "pacs")
    pacs.start()
    try:
        _configure(
            node, "destinations", "add", "pacs", "--aet", "PACS", "--host", HOST,
            "--port", str(pacs.port),
        )  # fmt: skip
        _configure(node, "rules", "add", "all", "--to", "pacs")
        _serve_with_worker_endpoint(node, remote, tmp_path / "serve.log")
        worker, home, log = _start_worker(node, remote, tmp_path, "remote")
        sent = _study(tmp_path / "study", 12, big=2)
        _send(node, tmp_path / "study")
        assert _wait_for(lambda: len(pacs.received()) == len(sent), 90), log.read_text()[-3000:]
        for uid, path in pacs.received().items():
            assert_same_dataset(path, sent[uid], EXPLICIT_LE)
        assert _wait_for(lambda: {s for _, s in _jobs(node)} == {"done"}, 30)
        assert not (home / "spool").exists()  # it never had the node's files
        assert not list(home.rglob("fetched-*"))  # every fetched copy was deleted
        # The node's janitor removes the spool files of done instances.
        store = Path(str(node["data"])) / "spool" / "store"
        assert _wait_for(lambda: not any(p.is_file() for p in store.rglob("*")), 30)
        assert worker.poll() is None
        # queue status lists it as the dispatcher heard it: over tcp://, from loopback.
        status = subprocess.run(
            _cli("queue", "status", "--json"),
            env=node["env"],  # type: ignore[arg-type]
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        workers = json.loads(status.stdout)["workers"]
        assert [w["host"] for w in workers] == [HOST], workers
    finally:
        pacs.stop()


def test_an_unknown_key_gets_no_job_and_an_allowed_worker_survives_a_node_restart(
    node: dict[str, object], remote: dict[str, object], tmp_path: Path
) -> None:
    pacs = Destination(tmp_path, "pacs")
    pacs.start()
    try:
        _configure(
            node, "destinations", "add", "pacs", "--aet", "PACS", "--host", HOST,
            "--port", str(pacs.port),
        )  # fmt: skip
        _configure(node, "rules", "add", "all", "--to", "pacs")
        _serve_with_worker_endpoint(node, remote, tmp_path / "serve.log")
        stranger, _, stranger_log = _start_worker(node, remote, tmp_path, "stranger")
        first = _study(tmp_path / "first", 5)
        _send(node, tmp_path / "first")
        # The dispatcher sweeps every second and would lease to any worker it knew: a
        # few sweeps later the jobs are still pending, none was ever leased.
        time.sleep(4)
        assert {s for _, s in _jobs(node)} == {"pending"}
        assert "refused a worker" in (tmp_path / "serve.log").read_text()
        # The refused worker says why, and still stops on SIGTERM (its sends to a node
        # that refused it do not wait forever).
        assert _wait_for(lambda: "refused this worker's CURVE key" in stranger_log.read_text(), 30)
        stranger.send_signal(signal.SIGTERM)
        assert stranger.wait(30) == 0, stranger_log.read_text()[-2000:]
        _start_worker(node, remote, tmp_path, "remote")
        assert _wait_for(lambda: set(pacs.received()) == set(first), 60)

        serve = node["proc"]
        assert isinstance(serve, subprocess.Popen)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
        _serve_with_worker_endpoint(node, remote, tmp_path / "serve.log")
        second = _study(tmp_path / "second", 5)
        _send(node, tmp_path / "second")
        # The same worker process reconnects and is introduced to the new dispatcher.
        assert _wait_for(lambda: set(pacs.received()) == set(first) | set(second), 60), (
            tmp_path / "worker-remote.log"
        ).read_text()[-3000:]
    finally:
        pacs.stop()
