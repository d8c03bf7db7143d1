"""Fixtures for the interop suite: our apps as subprocesses, DCMTK and pynetdicom peers.

Rules (DESIGN §8): real sockets on 127.0.0.1, ports chosen at run time, every wait
bounded; with ``CI=true`` a missing DCMTK tool is a failure, not a skip. Our apps run as
``sys.executable -m protocol APP`` with ``cwd=tmp_path`` so that the installed package,
not the source tree, is what runs. Plain helpers live in ``interop_support.py``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from interop_support import (
    HOST,
    KINDS,
    TRANSFER_SYNTAXES,
    ProcessManager,
    PynetdicomSCP,
    Server,
    free_port,
    make_dataset,
    protocol_argv,
    require_dcmtk,
    run_bounded,
    write_part10,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessManager]:
    manager = ProcessManager(tmp_path)
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture
def run_app(processes: ProcessManager, tmp_path: Path) -> Callable[..., Server]:
    """Start one of our SCP apps: ``run_app("storescp", "-od", str(dir), "-ta", "1")``.

    The port is chosen at run time and appended as the positional PORT; the call returns
    once the process listens (seen in /proc/net/tcp, without connecting to it).
    """

    def start(app: str, *args: str, port: int | None = None, **kwargs: object) -> Server:
        output_dir = None
        if "-od" in args:
            output_dir = Path(args[args.index("-od") + 1])
        return processes.start(
            f"our-{app}",
            lambda p: protocol_argv(app, *args, str(p)),
            port=port,
            output_dir=output_dir,
            **kwargs,  # type: ignore[arg-type]
        )

    return start


@pytest.fixture
def call_app(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run one of our SCU apps to completion (bounded) and return the completed process."""

    def call(app: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_bounded(protocol_argv(app, *args), cwd=tmp_path, timeout=timeout)

    return call


@pytest.fixture
def dcmtk_storescp(processes: ProcessManager, tmp_path: Path) -> Callable[..., Server]:
    """Start DCMTK's storescp (accepting every transfer syntax it knows, ``+xa``),
    writing to a fresh directory; C-ECHO is answered too."""

    def start(*extra: str, aet: str = "DCMTKSCP") -> Server:
        tool = require_dcmtk("storescp")["storescp"]
        output = tmp_path / f"dcmtk-received-{len(processes.servers)}"
        output.mkdir()
        return processes.start(
            "dcmtk-storescp",
            lambda p: [tool, "-aet", aet, "+xa", "-od", str(output), *extra, str(p)],
            output_dir=output,
        )

    return start


@pytest.fixture
def pynetdicom_scp(tmp_path: Path) -> Iterator[Callable[..., PynetdicomSCP]]:
    """Start a pynetdicom SCP (Verification + all storage classes, every transfer syntax)
    in a background thread; received instances are written as Part 10 files."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    started: list[object] = []

    def start(
        *,
        ae_title: str = "PYNETDICOM",
        require_called_aet: bool = False,
        echo_status: int = 0x0000,
        store_status: int = 0x0000,
        **ae_options: object,
    ) -> PynetdicomSCP:
        output = tmp_path / f"pynetdicom-received-{len(started)}"
        output.mkdir()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        for name, value in ae_options.items():
            setattr(ae, name, value)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        scp = PynetdicomSCP(0, ae_title, output)
        lock = threading.Lock()

        def on_store(event: object) -> int:
            data = event.encoded_dataset(include_meta=True)  # type: ignore[attr-defined]
            uid = event.request.AffectedSOPInstanceUID  # type: ignore[attr-defined]
            path = output / f"{uid}.dcm"
            path.write_bytes(data)
            with lock:
                scp.received.append(path)
            return store_status

        def on_echo(event: object) -> int:
            with lock:
                scp.echoes += 1
            return echo_status

        def on_released(event: object) -> None:
            with lock:
                scp.released += 1

        def on_aborted(event: object) -> None:
            with lock:
                scp.aborted += 1

        server = ae.start_server(
            (HOST, 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, on_store),
                (evt.EVT_C_ECHO, on_echo),
                (evt.EVT_RELEASED, on_released),
                (evt.EVT_ABORTED, on_aborted),
            ],
        )
        assert server is not None
        scp.server = server
        scp.port = int(server.server_address[1])
        started.append(server)
        return scp

    yield start
    for server in started:
        server.shutdown()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _quiet_pynetdicom() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


@pytest.fixture
def make_instance(tmp_path: Path) -> Callable[[str, str], Path]:
    """``make_instance("ct", "explicit_be")`` -> a fresh Part 10 file under tmp_path/source."""
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)

    def make(kind: str, ts_name: str) -> Path:
        sop_class, modality = KINDS[kind]
        ds = make_dataset(sop_class, modality)
        path = source / f"{kind}_{ts_name}_{ds.SOPInstanceUID}.dcm"
        return write_part10(ds, path, TRANSFER_SYNTAXES[ts_name])

    return make
