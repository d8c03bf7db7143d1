"""Workers on other hosts (router/dispatcher.py, router/curve.py, workers/worker.py's
FetchedFiles): a dispatcher with a tcp:// endpoint on loopback and real ZeroMQ sockets in
one process, over a migrated SQLite file. A spool file's bytes reach only a worker whose
token holds a lease on that instance; with CURVE only workers whose public key is in the
allowed directory get a lease at all."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from sqlalchemy import Engine

from router.curve import (
    CurveKeyError,
    KeyPair,
    check_tcp_endpoint,
    generate,
    is_loopback_endpoint,
    load_pair,
    load_public,
)
from router.db.engine import make_engine
from router.db.jobs import JobQueue
from router.db.repository import NewInstance, Repository
from router.dispatcher import Dispatcher, Endpoint
from router.messages import MAX_CHUNK, Chunk, Fetch, Hello, LeaseMessage, decode
from router.node import worker_bind_problem
from router.settings import Settings, WorkerSettings
from router.spool import Spool
from workers.worker import FetchedFiles, FetchError

SPOOL_NAME = "ab/" + "c" * 32 + ".dcm"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)  # SQLite and PostgreSQL (tests/conftest.py)
    repo = Repository(engine)
    repo.add_destination("pacs", "PACS", "127.0.0.1", 104)
    repo.record_instances(
        [
            NewInstance(
                sop_instance_uid="1.2.3.4",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax="1.2.840.10008.1.2.1",
                study_instance_uid="1.2.3",
                calling_aet="CT1",
                called_aet="ROUTER",
                peer_address="127.0.0.1",
                spool_name=SPOOL_NAME,
                size=0,
                digest="0" * 64,
                destinations=("pacs",),
                unrouted=False,
                priority=0,
            )
        ]
    )
    yield engine
    engine.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> tuple[Spool, bytes]:
    spool = Spool(tmp_path / "spool")
    spool.create_layout()
    data = os.urandom(2 * MAX_CHUNK + 12345)  # three chunks, the last one short
    path = spool.path_for(SPOOL_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return spool, data


@asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[int]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.ensure_future(dispatcher.run(stop, ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield dispatcher.ports[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def dealer(
    context: zmq.asyncio.Context, port: int, curve: tuple[bytes, KeyPair] | None = None
) -> zmq.asyncio.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        socket.curve_serverkey = curve[0]
        socket.curve_publickey = curve[1].public
        socket.curve_secretkey = curve[1].secret
    socket.connect(f"tcp://127.0.0.1:{port}")
    return socket


async def first_message(socket: zmq.asyncio.Socket, timeout: float) -> object | None:
    if not await socket.poll(int(timeout * 1000)):
        return None
    return decode(await socket.recv())


async def hello_and_lease(socket: zmq.asyncio.Socket, timeout: float = 10) -> object | None:
    try:
        # A DEALER whose handshake was refused has no peer left, and a send waits for one.
        await asyncio.wait_for(socket.send(Hello("remote-1", None, 1).encode()), timeout)
    except TimeoutError:
        return None
    return await first_message(socket, timeout)


def test_a_leaseholder_fetches_the_spool_file_exactly_into_a_private_temp_file(
    engine: Engine, spool: tuple[Spool, bytes], tmp_path: Path
) -> None:
    store, data = spool

    async def scenario() -> None:
        dispatcher = Dispatcher(JobQueue(engine), "tcp://127.0.0.1:0", spool=store)
        async with running(dispatcher) as port:
            context = zmq.asyncio.Context()
            socket = dealer(context, port)
            lease = await hello_and_lease(socket)
            assert isinstance(lease, LeaseMessage)
            assert lease.spool_name == SPOOL_NAME and lease.sop_instance == "1.2.3.4"
            assert lease.expires > 0
            files = FetchedFiles(tmp_path)
            files.socket = socket

            async def pump() -> None:
                while True:
                    message = decode(await socket.recv())
                    if isinstance(message, Chunk):
                        files.deliver(message)

            pumping = asyncio.ensure_future(pump())
            try:
                path = await files.fetch(lease.spool_name, lease.token)
                assert path.read_bytes() == data
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                assert path.parent == tmp_path
                with pytest.raises(FetchError, match="not leased"):
                    await files.fetch(lease.spool_name, "not-the-token")
                assert sorted(p.name for p in tmp_path.glob("fetched-*")) == [path.name]
            finally:
                pumping.cancel()
                socket.close()
                context.term()

    asyncio.run(scenario())


def test_fetch_without_a_lease_or_of_a_name_outside_the_spool_is_refused(
    engine: Engine, spool: tuple[Spool, bytes]
) -> None:
    store, _ = spool

    async def scenario() -> None:
        dispatcher = Dispatcher(JobQueue(engine), "tcp://127.0.0.1:0", spool=store)
        async with running(dispatcher) as port:
            context = zmq.asyncio.Context()
            socket = dealer(context, port)
            await socket.send(Hello("remote-1", None, 0).encode())  # no credit: no lease
            for name, token, reason in (
                (SPOOL_NAME, "guessed", "not leased"),
                ("../../etc/passwd", "guessed", "not found"),
            ):
                await socket.send(Fetch(name, token, 0, 1024).encode())
                chunk = await first_message(socket, 10)
                assert isinstance(chunk, Chunk)
                assert (chunk.error, chunk.data) == (reason, b"")
            socket.close()
            context.term()

    asyncio.run(scenario())


def test_with_curve_only_a_worker_whose_key_is_allowed_gets_a_lease(
    engine: Engine, spool: tuple[Spool, bytes], tmp_path: Path
) -> None:
    store, _ = spool
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    node_key, node_pub = generate("node", keys)
    generate("known", keys)
    generate("stranger", keys)
    (allowed / "known.pub").write_bytes((keys / "known.pub").read_bytes())
    server = load_public(node_pub)

    async def scenario() -> None:
        endpoint = Endpoint("tcp://127.0.0.1:0", load_pair(node_key), str(allowed))
        dispatcher = Dispatcher(JobQueue(engine), endpoint, spool=store)
        async with running(dispatcher) as port:
            context = zmq.asyncio.Context()
            plain = dealer(context, port)
            stranger = dealer(context, port, (server, load_pair(keys / "stranger.key")))
            # Neither may take the job: wait for what each would get, then the known one.
            assert await hello_and_lease(plain, timeout=1.5) is None
            assert await hello_and_lease(stranger, timeout=1.5) is None
            known = dealer(context, port, (server, load_pair(keys / "known.key")))
            lease = await hello_and_lease(known)
            assert isinstance(lease, LeaseMessage) and lease.spool_name == SPOOL_NAME
            for socket in (plain, stranger, known):
                socket.close()
            context.term()

    asyncio.run(scenario())


def test_key_files_secret_private_public_readable_never_overwritten(tmp_path: Path) -> None:
    secret, public = generate("w1", tmp_path / "k")
    assert (secret.name, public.name) == ("w1.key", "w1.pub")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = load_pair(secret)
    assert load_public(public) == pair.public and len(pair.secret) == 40
    assert "secret-key" not in public.read_text()
    with pytest.raises(CurveKeyError, match="exists"):
        generate("w1", tmp_path / "k")
    with pytest.raises(CurveKeyError, match="no secret key"):
        load_pair(public)
    with pytest.raises(CurveKeyError, match="cannot read"):
        load_pair(tmp_path / "missing.key")
    for bad in ("", "../w", ".hidden"):
        with pytest.raises(CurveKeyError, match="not a usable key name"):
            generate(bad, tmp_path / "k")


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:7000", True),
        ("tcp://localhost:7000", True),
        ("tcp://[::1]:7000", True),
        ("ipc:///tmp/x.ipc", True),
        ("tcp://0.0.0.0:7000", False),
        ("tcp://*:7000", False),
        ("tcp://10.1.2.3:7000", False),
        ("tcp://node.example:7000", False),
    ],
)
def test_which_worker_endpoints_stay_on_this_host(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


def test_serve_refuses_an_open_worker_endpoint_without_curve_or_insecure(tmp_path: Path) -> None:
    def settings(**workers: object) -> Settings:
        return replace(Settings(), workers=replace(WorkerSettings(), **workers))

    assert worker_bind_problem(settings()) is None
    assert worker_bind_problem(settings(bind="tcp://127.0.0.1:7000")) is None
    problem = worker_bind_problem(settings(bind="tcp://0.0.0.0:7000"))
    assert problem is not None and "--insecure-workers" in problem
    assert worker_bind_problem(settings(bind="tcp://0.0.0.0:7000", insecure=True)) is None
    key, _ = generate("node", tmp_path)
    assert (
        worker_bind_problem(
            settings(bind="tcp://0.0.0.0:7000", key=str(key), allowed_keys=str(tmp_path))
        )
        is None
    )
    problem = worker_bind_problem(
        settings(bind="tcp://0.0.0.0:7000", key=str(key), allowed_keys=str(tmp_path / "no"))
    )
    assert problem is not None and "not a directory" in problem


@pytest.mark.parametrize(
    ("endpoint", "bind", "ok"),
    [
        ("tcp://node.example:7000", False, True),
        ("tcp://10.0.0.1:7000", False, True),
        ("tcp://*:7000", True, True),
        ("tcp://0.0.0.0:0", True, True),
        ("tcp://10.0.0.1:0", False, False),
        ("tcp://127.0.0.1:notaport", False, False),
        ("tcp://nohost", False, False),
        ("tcp://:7000", False, False),
        ("tcp://h:70000", False, False),
        ("tcp://h:7000/x", False, False),
        ("http://h:7000", False, False),
    ],
)
def test_worker_endpoints_are_checked_before_zeromq_sees_them(
    endpoint: str, bind: bool, ok: bool
) -> None:
    if ok:
        check_tcp_endpoint(endpoint, bind=bind)
    else:
        with pytest.raises(ValueError, match=r"tcp://HOST:PORT|out of range"):
            check_tcp_endpoint(endpoint, bind=bind)


def test_a_bad_worker_endpoint_is_one_line_from_the_cli_and_the_settings(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from router.cli import main
    from router.settings import SettingsError, load_settings

    result = CliRunner().invoke(
        main, ["--data-dir", str(tmp_path), "worker", "--connect", "tcp://127.0.0.1:x"]
    )
    assert result.exit_code == 2
    assert "--connect 'tcp://127.0.0.1:x' is not tcp://HOST:PORT" in result.output
    with pytest.raises(SettingsError, match=r"workers\.bind"):
        load_settings(None, environ={"DICOM_ROUTER_WORKERS_BIND": "tcp://h:x"})
