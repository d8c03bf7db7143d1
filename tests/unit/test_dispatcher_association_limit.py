"""A destination's ``max_associations`` holds for the whole node (router/dispatcher.py):
a dispatcher over a migrated SQLite file and real ZeroMQ DEALER sockets on its ipc://
endpoint, each playing one of the node's own 1.4 workers. Without the node-wide count,
four workers each pooling their own association queued behind one another at a
one-association storescp and waited out the 30 s ACSE timeout (the B.7 walk's "the
node did not drain")."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from sqlalchemy import Engine

from router.db.engine import make_engine, sqlite_url_for
from router.db.jobs import JobQueue
from router.db.migrate import upgrade
from router.db.repository import Repository
from router.dispatcher import Dispatcher
from router.messages import Credit, Hello, LeaseMessage, decode
from router.processes import has_exited, pid_namespace
from tests.db_support import new_instance

QUIET = 1.5  # seconds a worker without a share must hear nothing (sweeps are 0.2 s)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = sqlite_url_for(tmp_path)
    upgrade(url)
    engine = make_engine(url)
    repo = Repository(engine)
    repo.add_destination("pacs", "PACS", "127.0.0.1", 104, max_associations=1)
    repo.record_instances([new_instance(n, "pacs") for n in range(1, 13)])
    yield engine
    engine.dispose()


@dataclass
class Node:
    context: zmq.asyncio.Context
    endpoint: str


@asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Node]:
    directory = tempfile.TemporaryDirectory(prefix="dr-")  # short: ipc paths are < 108
    endpoint = f"ipc://{directory.name}/dispatcher.ipc"
    dispatcher = Dispatcher(JobQueue(engine), endpoint, sweep=0.2, pipeline=4)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.ensure_future(dispatcher.run(stop, ready))
    await asyncio.wait_for(ready.wait(), 10)
    context = zmq.asyncio.Context()
    try:
        yield Node(context, endpoint)
    finally:
        context.destroy(linger=0)
        stop.set()
        await asyncio.wait_for(task, 10)
        directory.cleanup()


async def worker(node: Node, name: str, credit: int, **hello: object) -> zmq.asyncio.Socket:
    socket = node.context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(node.endpoint)
    await socket.send(Hello(name, None, credit, **hello).encode())  # type: ignore[arg-type]
    return socket


async def leases(
    socket: zmq.asyncio.Socket, within: float, want: int = 1 << 30
) -> list[LeaseMessage]:
    """The leases that reach ``socket`` within ``within`` seconds (at most ``want``)."""
    got: list[LeaseMessage] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while len(got) < want and (left := deadline - loop.time()) > 0:
        if await socket.poll(int(left * 1000)):
            message = decode(await socket.recv())
            if isinstance(message, LeaseMessage):
                got.append(message)
    return got


def test_a_one_association_destination_leases_to_one_worker_at_a_time(engine: Engine) -> None:
    async def scenario() -> None:
        async with running(engine) as node:
            first = await worker(node, "w-1", 12)
            got = await leases(first, 10, want=4)
            # One association, ``pipeline`` leases on it: the worker may open just one.
            assert len(got) == 4 and {lease.max_associations for lease in got} == {1}
            second = await worker(node, "w-2", 12)
            assert await leases(second, QUIET) == []
            # Giving jobs back while its association stays open keeps the share: the
            # rest go to the same worker, none to the other.
            await first.send(Credit(0, done=("pacs",) * 4).encode())
            assert len(await leases(first, 10, want=4)) == 4
            assert await leases(second, QUIET) == []

    asyncio.run(scenario())


def test_a_worker_that_closed_its_association_hands_the_share_on(engine: Engine) -> None:
    async def scenario() -> None:
        async with running(engine) as node:
            first = await worker(node, "w-1", 4)
            assert len(await leases(first, 10, want=4)) == 4
            second = await worker(node, "w-2", 4)
            # "closed" while leases are still held there does not count: one of them
            # would open an association again.
            await first.send(Credit(0, done=("pacs",) * 3, closed=("pacs",)).encode())
            assert await leases(second, QUIET) == []
            await first.send(Credit(0, done=("pacs",), closed=("pacs",)).encode())
            got = await leases(second, 10, want=4)
            assert len(got) == 4 and {lease.max_associations for lease in got} == {1}

    asyncio.run(scenario())


def test_a_restarted_dispatcher_counts_the_associations_a_hello_says_are_open(
    engine: Engine,
) -> None:
    async def scenario() -> None:
        async with running(engine) as node:
            idle = await worker(node, "w-1", 0, open=("pacs",))  # one association open
            await asyncio.sleep(0.5)  # its hello in before the other's (two connections)
            second = await worker(node, "w-2", 4)
            assert await leases(second, QUIET) == []
            idle.close()

    asyncio.run(scenario())


def test_a_killed_workers_share_is_free_before_its_heartbeats_time_out(engine: Engine) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    async def scenario() -> None:
        async with running(engine) as node:
            doomed = await worker(node, "w-1", 4, pid=child.pid, pid_ns=pid_namespace())
            assert len(await leases(doomed, 10, want=4)) == 4
            second = await worker(node, "w-2", 4)
            assert await leases(second, QUIET) == []
            child.kill()
            child.wait()
            # Its leases still have to expire (they are the database's); the share
            # does not wait for the 15 s worker timeout: new jobs flow at once.
            Repository(engine).record_instances([new_instance(n, "pacs") for n in range(20, 24)])
            got = await leases(second, 5, want=4)
            assert len(got) == 4

    try:
        asyncio.run(scenario())
    finally:
        child.kill()
        child.wait()


def test_has_exited_is_true_only_for_a_gone_process_of_our_namespace() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    namespace = pid_namespace()
    assert not has_exited(child.pid, "pid:[1]")  # another namespace: cannot tell
    child.wait()
    assert has_exited(child.pid, namespace)
    assert not has_exited(os.getpid(), namespace)
    assert not has_exited(0, namespace)


def test_a_suspect_goes_alone_to_the_worker_holding_the_share_once_it_ran_empty(
    engine: Engine,
) -> None:
    """FI-08 with node-wide shares: a job some worker died holding goes alone, and only
    to a worker that holds nothing else. The idle worker without the one-association
    destination's share cannot take it; the busy one holding the share is left to run
    empty (it gets nothing new meanwhile) and then gets the suspect by itself."""

    async def scenario() -> None:
        async with running(engine) as node:
            holder = await worker(node, "w-1", 8)
            assert len(await leases(holder, 10, want=4)) == 4  # one share: 4 on it
            # A worker that died holding a lease: its job comes due again as a suspect.
            JobQueue(engine).lease("ghost", None, 1, 0.3)
            await asyncio.sleep(0.5)
            idle = await worker(node, "w-2", 8)
            assert await leases(idle, QUIET) == []  # no share of pacs for it
            # The lease call that passes the suspect over still leases the others...
            await holder.send(Credit(2, done=("pacs",) * 2).encode())
            assert [lease.deliveries for lease in await leases(holder, 10, want=2)] == [1, 1]
            # ...and from then on the holder runs empty: nothing new until it is.
            await holder.send(Credit(2, done=("pacs",) * 2).encode())
            assert await leases(holder, QUIET) == []
            await holder.send(Credit(2, done=("pacs",) * 2).encode())
            got = await leases(holder, 10)
            assert [lease.deliveries for lease in got] == [2]  # the suspect, alone
            assert await leases(idle, QUIET) == []
            await holder.send(Credit(1, done=("pacs",)).encode())
            assert len(await leases(holder, 10, want=4)) == 4  # and then the rest

    asyncio.run(scenario())
