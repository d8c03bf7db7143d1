#!/usr/bin/env python3
"""On-demand fuzz run against a LIVE listener (issue #6 item 3; DESIGN §8: prints figures).

    python tests/fuzz/fuzz_live_listener.py --inputs 1000000 [--connections 8]
        [--clients 2] [--listeners 1] [--deadline 15] [--seed N] [--out DIR]

Starts a real ``dicom-router serve`` (``init`` in a temporary data dir, one listener, no
workers) and feeds it mutated VALID byte streams (see seeds.py) from several
connections at once, in client processes of their own:

* ``rq``      a mutated A-ASSOCIATE-RQ on a fresh connection (one input, one connection);
* ``stream``  a mutated whole association (RQ, C-ECHO, C-STORE, release) sent at once,
              then the write side shut (one input, one connection);
* inside an association already established with a valid RQ, many inputs in a row:
  ``cmd`` a mutated command set in valid P-DATA; ``ds`` a valid C-STORE-RQ with a
  mutated data set; ``pdu`` a mutated P-DATA-TF stream (PDV and PDU lengths, control
  headers, context ids); ``other`` a mutated RQ/AC/RJ/RELEASE/ABORT in Sta6; ``splice``
  two streams cut and joined; ``repeat`` one valid PDU sent 2-40 times.

Each in-association input is followed by a valid C-ECHO-RQ (the sync): the input is
done when the echo's response, an A-ABORT or a close arrives. A stream that does not end
on a PDU boundary is followed by shutdown(SHUT_WR), so the node is owed no bytes and
must answer or close. An input with none of these within ``--deadline`` s is a HANG.

Meanwhile a separate process runs a well-behaved C-ECHO association every second
(associate, echo, release), after a quiet baseline of the same probe. Reported: inputs,
inputs/s, outcomes, CRASHES (a supervisor child that exited: the supervisor's log line
and the restart count in run/node.json; the listener's pid), error lines in the node's
log (tracebacks, ERROR), HANGS, the probe's latency (baseline vs during), and RSS, fds
and threads of the supervisor and every child at start, end and maximum. Inputs in
flight around a crash or an error line, and every hang, are saved under ``--out``
(default ./fuzz-live-<time>/), one .bin per input with a .json describing it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import socket
import struct
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import livenode  # noqa: E402
import seeds as S  # noqa: E402
from livenode import HOST, LiveNode, echo_once, percentile, sample  # noqa: E402

from protocol.dimse import CEchoRSP, CStoreRQ, CStoreRSP, decode_command, decode_command_ex  # noqa: E402
from protocol.errors import DIMSEError  # noqa: E402

SYNC_ID = 0xFFF1
SYNC = livenode.echo_pdata(SYNC_ID)
RING = 256  # recent inputs kept per client for a crash dump
ERROR_LINE = re.compile(r"Traceback|\bERROR\b|CRITICAL|exited \(status|Fatal error|Exception in")


class Outcome:
    ANSWERED = "answered"  # the sync echo (and anything before it) was answered
    ABORTED = "aborted"  # A-ABORT from the node
    REJECTED = "rejected"  # A-ASSOCIATE-RJ
    RELEASED = "released"  # A-RELEASE-RP (a valid release among the input)
    CLOSED = "closed"  # the node closed with no A-ABORT
    RESET = "reset"  # the connection was reset (a write or half-close after the node's close)
    HANG = "hang"
    ODD = "odd"  # a PDU the node should never send there


# --- one client process ---------------------------------------------------------------------
class Client:
    def __init__(self, index: int, port: int, args: argparse.Namespace, shared: Any) -> None:
        self.index = index
        self.port = port
        self.deadline = args.deadline
        self.per_connection = args.per_association
        self.out = Path(args.out)
        self.rng = random.Random(args.seed * 1000 + index)
        self.budget = shared["budget"]
        self.dump_gen = shared["dump_gen"]
        self.report_q = shared["queue"]
        self.stats: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.aborts: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.ring: deque[dict[str, Any]] = deque(maxlen=RING)
        self.seen_gen = 0
        self.saved = 0
        self.started = time.monotonic()
        calling = f"FUZZ{index}"
        self.rqs = S.rq_seeds(calling)
        self.valid_rq = self.rqs[0].data
        self.others = S.other_pdu_seeds()
        self.commands = S.command_seeds()
        # Affected SOP Class UID (0000,0002) and Message ID (0000,0110) of the C-ECHO-RQ
        self.echo_values = S.command_values(self.commands[0].data, (0x0002, 0x0110))
        self.stores = S.store_seeds()
        self.inputs = 0

    # -- budget ------------------------------------------------------------------------
    def take(self) -> bool:
        with self.budget.get_lock():
            if self.budget.value <= 0:
                return False
            self.budget.value -= 1
            return True

    # -- inputs ------------------------------------------------------------------------
    def store_stream(self, mutate_ds: bool) -> bytes:
        rng = self.rng
        seed = rng.choice(self.stores)
        data = seed.dataset.data
        if mutate_ds:
            data = S.mutate(rng, data, seed.dataset.lengths)
        return S.fragments(rng, seed.context_id, seed.command.data, True) + S.fragments(
            rng, seed.context_id, data, False
        )

    def session_input(self) -> tuple[str, bytes, str]:
        """(kind, bytes, mode): mode "sync" appends the sync C-ECHO; "store" waits for
        the C-STORE-RSP (a request sent before it would be SM-14, an ABORT-U); "shut"
        half-closes after the bytes (the node may be owed more than they hold).

        The mix is weighted by what an input costs the node, so that a million fit in
        the time a shared 2-core machine gives: an input that ends the association costs
        a new one (~3 ms of listener CPU), a stored instance ~2 ms, a C-ECHO ~0.1 ms.
        So most inputs are C-ECHO-RQs with mutated values that keep the association;
        every other kind is there in the thousands (the figures count them). The
        structural mutations of every PDU type are fuzzed at length, without a socket,
        by tests/unit/test_fuzz_connection.py and test_pdu_properties.py."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.89:  # the C-ECHO-RQ's UID and message ID mutated, any fragmentation
            echo = self.commands[0]
            cmd = S.mutate_values(rng, echo.data, self.echo_values, ascii_only=True)
            return "cmd-value", S.fragments(rng, 1, cmd, True), "sync"
        if roll < 0.92:
            unit = rng.choice((SYNC, S.fragments(rng, 1, self.commands[0].data, True)))
            return "repeat", unit * rng.randint(2, 4), "sync"
        if roll < 0.96:
            return "ds", self.store_stream(True), "store"
        if roll < 0.975:
            return self.command_input()
        if roll < 0.99:
            if rng.random() < 0.5:
                return "pdu", S.mutate(rng, SYNC, S.pdu_lengths(SYNC)), "sync"
            base = self.store_stream(False)
            return "pdu", S.mutate(rng, base, S.pdu_lengths(base)), "shut"
        if roll < 0.996:
            seed = rng.choice(self.others + self.rqs)
            data = seed.data if rng.random() < 0.2 else S.mutate(rng, seed.data, seed.lengths)
            return "other", data, "sync"
        a = self.store_stream(rng.random() < 0.5)
        b = rng.choice((SYNC, self.store_stream(False), rng.choice(self.others).data))
        return "splice", S.splice(rng, a, b), "shut"

    def command_input(self) -> tuple[str, bytes, str]:
        """Any command set, values or structure (lengths, tags) mutated."""
        rng = self.rng
        seed = rng.choice(self.commands + [s.command for s in self.stores])
        ctx = rng.choice((1, 1, 3, 5)) if seed.name != "cmd-CEchoRQ" else 1
        if rng.random() < 0.5:
            cmd = S.mutate_values(rng, seed.data, seed.values)
        else:
            cmd = S.mutate(rng, seed.data, seed.lengths)
        data = S.fragments(rng, ctx, cmd, True)
        try:
            msg, has_dataset = decode_command_ex(cmd)
        except DIMSEError:
            return "cmd", data, "sync"
        if isinstance(msg, CStoreRQ) and has_dataset:
            store = rng.choice(self.stores)
            return "cmd", data + S.fragments(rng, ctx, store.dataset.data, False), "store"
        return "cmd", data, "sync"

    def whole_stream(self) -> bytes:
        rng = self.rng
        parts = [self.valid_rq, SYNC, self.store_stream(rng.random() < 0.3), livenode.RELEASE_RQ]
        stream = b"".join(parts)
        if rng.random() < 0.3:
            return S.splice(rng, stream, b"".join(parts))
        return S.mutate(rng, stream, S.pdu_lengths(stream), rng.randint(1, 6))

    # -- the wire ------------------------------------------------------------------------
    async def read_pdu(self, reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
        try:
            header = await reader.readexactly(6)
            (length,) = struct.unpack(">I", header[2:])
            if length > 1 << 22:
                return 0xFF, b""
            return header[0], await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def outcome(self, reader: asyncio.StreamReader, until: str) -> str:
        """Read the node's PDUs until ``until`` ("ac": an A-ASSOCIATE-AC; "sync": the sync
        echo's answer; "store": a C-STORE-RSP; "close": EOF), an A-ABORT or EOF."""
        try:
            async with asyncio.timeout(self.deadline):
                while True:
                    pdu = await self.read_pdu(reader)
                    if pdu is None:
                        return Outcome.CLOSED
                    kind, body = pdu
                    if kind == 7:
                        src, reason = (body[2], body[3]) if len(body) >= 4 else (-1, -1)
                        self.aborts[f"{src}/{reason}"] += 1
                        return Outcome.ABORTED
                    if kind == 3:
                        return Outcome.REJECTED
                    if kind == 6:
                        return Outcome.RELEASED
                    if kind == 2:
                        if until == "ac":
                            return Outcome.ANSWERED
                        continue  # an AC to an RQ inside a whole stream
                    if kind == 4 and until in ("sync", "store") and self._answers(body, until):
                        return Outcome.ANSWERED
                    if kind not in (2, 4):
                        return Outcome.ODD
        except TimeoutError:
            return Outcome.HANG

    @staticmethod
    def _answers(body: bytes, until: str) -> bool:
        # one PDV: length(4), context, control, command set
        if len(body) < 6 or not body[5] & 1:
            return False
        try:
            msg = decode_command(body[6 : 4 + struct.unpack_from(">I", body)[0]])
        except DIMSEError:
            return False
        if until == "store":
            return isinstance(msg, CStoreRSP)
        return isinstance(msg, CEchoRSP) and msg.message_id_being_responded_to == SYNC_ID

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    @staticmethod
    async def close(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()  # RST: no TIME_WAIT pile-up on the client side
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def send(self, writer: asyncio.StreamWriter, data: bytes, shut: bool) -> None:
        writer.write(data)
        if shut and writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def record(self, kind: str, data: bytes, outcome: str, extra: str = "") -> None:
        self.inputs += 1
        self.kinds[kind] += 1
        self.stats[outcome] += 1
        self.by_kind[f"{kind}:{outcome}"] += 1
        entry = {"kind": kind, "outcome": outcome, "t": time.time(), "data": data, "extra": extra}
        self.ring.append(entry)
        if outcome in (Outcome.HANG, Outcome.ODD):
            self.save(f"{outcome}-{self.index}-{self.inputs}", entry)

    def save(self, name: str, entry: dict[str, Any]) -> None:
        self.saved += 1
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.bin").write_bytes(entry["data"])
        meta = {k: v for k, v in entry.items() if k != "data"}
        meta["prefix"] = (
            "after a valid A-ASSOCIATE-RQ/AC"
            if entry["kind"] not in ("rq", "stream")
            else "on a fresh connection"
        )
        (self.out / f"{name}.json").write_text(json.dumps(meta, indent=1))

    def maybe_dump(self) -> None:
        gen = self.dump_gen.value
        if gen == self.seen_gen:
            return
        self.seen_gen = gen
        now = time.time()
        for i, entry in enumerate(self.ring):
            if now - entry["t"] < 10:
                self.save(f"suspect{gen}-{self.index}-{i}", entry)

    # -- connection loops ----------------------------------------------------------------
    async def one_shot(self, kind: str) -> None:
        data = S.mutate(self.rng, *self._rq_seed()) if kind == "rq" else self.whole_stream()
        try:
            reader, writer = await self.connect()
        except OSError:
            with self.budget.get_lock():  # nothing was sent: not an input
                self.budget.value += 1
            raise
        try:
            shut = kind == "stream" or not S.framing_complete(data)
            try:
                await self.send(writer, data, shut)
                result = await self.outcome(reader, "close" if kind == "stream" else "ac")
            except OSError:
                result = Outcome.RESET
            self.record(kind, data, result)
        finally:
            await self.close(writer)

    def _rq_seed(self) -> tuple[bytes, list[S.Field]]:
        seed = self.rng.choice(self.rqs)
        return seed.data, seed.lengths

    async def association(self) -> None:
        reader, writer = await self.connect()
        try:
            await self.send(writer, self.valid_rq, False)
            result = await self.outcome(reader, "ac")
            if result != Outcome.ANSWERED:
                self.stats[f"setup-{result}"] += 1
                if result == Outcome.HANG:
                    self.record("setup", self.valid_rq, Outcome.HANG)
                return
            for _ in range(self.per_connection):
                if not self.take():
                    break
                kind, data, mode = self.session_input()
                if mode != "shut" and not S.framing_complete(data):
                    mode = "shut"
                try:
                    await self.send(writer, data + SYNC if mode == "sync" else data, mode == "shut")
                    result = await self.outcome(reader, "close" if mode == "shut" else mode)
                except OSError:  # reset by the node (after its abort): ECONNRESET, ENOTCONN
                    result = Outcome.RESET
                self.record(kind, data, result)
                if result != Outcome.ANSWERED or mode == "shut":
                    return
            await self.send(writer, livenode.RELEASE_RQ, False)
            await self.outcome(reader, "close")
        finally:
            await self.close(writer)

    async def worker(self) -> None:
        while True:
            self.maybe_dump()
            roll = self.rng.random()
            try:
                if roll < 0.004:
                    if not self.take():
                        return
                    await self.one_shot("rq" if roll < 0.0025 else "stream")
                else:
                    with self.budget.get_lock():
                        if self.budget.value <= 0:
                            return
                    await self.association()
            except OSError as exc:  # connect refused while a listener restarts
                self.stats[f"connect-{type(exc).__name__}"] += 1
                await asyncio.sleep(0.2)

    async def reporter(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.report()

    def report(self, final: bool = False) -> None:
        self.report_q.put(
            {
                "client": self.index,
                "inputs": self.inputs,
                "kinds": dict(self.kinds),
                "outcomes": dict(self.stats),
                "aborts": dict(self.aborts),
                "by_kind": dict(self.by_kind),
                "saved": self.saved,
                "cpu_s": round(time.process_time(), 1),
                "final": final,
            }
        )

    async def run(self, connections: int) -> None:
        rep = asyncio.create_task(self.reporter())
        await asyncio.gather(*(self.worker() for _ in range(connections)))
        rep.cancel()
        self.report(final=True)


def client_main(index: int, port: int, args: argparse.Namespace, shared: Any) -> None:
    asyncio.run(Client(index, port, args, shared).run(args.connections))


# --- the probe ------------------------------------------------------------------------------
def probe_main(port: int, interval: float, queue: Any, stop: Any) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        t = time.time()
        try:
            echo, total = echo_once(port, timeout=30, message_id=n & 0xFFFF)
            queue.put({"t": t, "echo": echo, "total": total})
        except (OSError, livenode.ProbeError) as exc:
            queue.put({"t": t, "error": f"{type(exc).__name__}: {exc}"})
        stop.wait(max(0.0, interval - (time.time() - t)))


def baseline(port: int, count: int) -> list[float]:
    out = []
    for i in range(count):
        out.append(echo_once(port, timeout=30, message_id=i + 1)[1])
        time.sleep(0.2)
    return out


# --- the monitor ----------------------------------------------------------------------------
class Monitor:
    def __init__(self, node: LiveNode) -> None:
        self.node = node
        self.log_offset = len(node.log_text())
        self.error_lines: list[str] = []
        self.crash_lines: list[str] = []
        self.samples: dict[str, list[tuple[float, Any]]] = {}
        self.pid_history: dict[str, list[int]] = {}
        self.first_restarts = node.restarts()

    def poll_log(self) -> list[str]:
        text = self.node.log_text()
        new, self.log_offset = text[self.log_offset :], len(text)
        hits = [line for line in new.splitlines() if ERROR_LINE.search(line)]
        for line in hits:
            (self.crash_lines if "exited (status" in line else self.error_lines).append(line)
        return hits

    def poll_procs(self) -> None:
        now = time.time()
        for name, pid in self.node.pids().items():
            history = self.pid_history.setdefault(name, [])
            if not history or history[-1] != pid:
                history.append(pid)
            s = sample(pid)
            if s is not None:
                self.samples.setdefault(name, []).append((now, s))

    def restarts(self) -> dict[str, int]:
        now = self.node.restarts()
        return {k: v - self.first_restarts.get(k, 0) for k, v in now.items() if v}


def summarise(samples: list[tuple[float, Any]]) -> dict[str, Any]:
    first, last = samples[0][1], samples[-1][1]
    return {
        "rss_kib": [first.rss_kib, last.rss_kib, max(s.rss_kib for _, s in samples)],
        "fds": [first.fds, last.fds, max(s.fds for _, s in samples)],
        "threads": [first.threads, last.threads, max(s.threads for _, s in samples)],
        "cpu_s": round(last.cpu_s - first.cpu_s, 1),
    }


def merge(reports: dict[int, dict[str, Any]], key: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in reports.values():
        total.update(r[key])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=8, help="per client process")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--listeners", type=int, default=1)
    parser.add_argument("--per-association", type=int, default=500)
    parser.add_argument("--deadline", type=float, default=15.0, help="seconds per input")
    parser.add_argument("--probe-interval", type=float, default=1.0)
    parser.add_argument(
        "--slow-probe",
        type=float,
        default=1.0,
        help="a probe slower than this many seconds is counted as slow",
    )
    parser.add_argument("--seed", type=int, default=int(time.time()) & 0xFFFF)
    parser.add_argument("--out", default=f"fuzz-live-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--keep", action="store_true", help="keep the node's data dir")
    parser.add_argument(
        "--ref",
        default="HEAD",
        help="git ref whose code the node runs (a git archive of it; 'worktree': the "
        "work tree as it is)",
    )
    parser.add_argument(
        "--data-root",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the node's temporary data dir goes (default /dev/shm: "
        "fsync is not what this run tests, and it is cheap there)",
    )
    args = parser.parse_args(argv)
    args.out = str(Path(args.out).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(
        f"fuzz-live: seed {args.seed}, {args.inputs} inputs, {args.clients}x"
        f"{args.connections} connections; saved inputs go to {args.out}",
        flush=True,
    )

    root = Path(tempfile.mkdtemp(prefix="fuzz-live-node-", dir=args.data_root))
    source = None
    if args.ref != "worktree":
        source = livenode.snapshot(args.ref, root / "src")
        print(f"node runs {args.ref} = {(source / 'REVISION').read_text().strip()}", flush=True)
    node = LiveNode.start(root, listeners=args.listeners, source=source)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    probe_q = ctx.Queue()
    shared = {
        "budget": ctx.Value("q", args.inputs),
        "dump_gen": ctx.Value("i", 0),
        "queue": ctx.Queue(),
    }
    procs: list[Any] = []
    try:
        quiet = baseline(node.port, 20)
        mon = Monitor(node)
        mon.poll_procs()
        probe = ctx.Process(target=probe_main, args=(node.port, args.probe_interval, probe_q, stop))
        probe.start()
        procs.append(probe)
        started = time.monotonic()
        clients = [
            ctx.Process(target=client_main, args=(i, node.port, args, shared))
            for i in range(args.clients)
        ]
        for c in clients:
            c.start()
        procs += clients
        reports: dict[int, dict[str, Any]] = {}
        probes: list[dict[str, Any]] = []
        last_print = 0.0
        last_sample = 0.0
        while any(c.is_alive() for c in clients):
            try:
                time.sleep(0.5)
            except KeyboardInterrupt:  # stop early: clients finish their inputs, then report
                print("interrupted: stopping the clients", flush=True)
                with shared["budget"].get_lock():
                    shared["budget"].value = 0
            while not shared["queue"].empty():
                r = shared["queue"].get()
                reports[r["client"]] = r
            while not probe_q.empty():
                probes.append(probe_q.get())
            hits = mon.poll_log()
            if hits:
                with shared["dump_gen"].get_lock():
                    shared["dump_gen"].value += 1
                for line in hits[:5]:
                    print(f"  node log: {line[:300]}", flush=True)
            now = time.monotonic()
            if now - last_sample >= 5:
                mon.poll_procs()
                last_sample = now
            if now - last_print >= 30:
                last_print = now
                done = sum(r["inputs"] for r in reports.values())
                rate = done / max(now - started, 1e-9)
                lat = [p["total"] for p in probes[-30:] if "total" in p]
                lp = {n: s[-1][1].rss_kib for n, s in mon.samples.items() if n.startswith("l")}
                print(
                    f"  {now - started:6.0f} s  {done:>9} inputs  {rate:7.0f}/s  hangs "
                    f"{merge(reports, 'outcomes')[Outcome.HANG]}  probe p50 "
                    f"{percentile(lat, 0.5) * 1e3:.1f} ms  listener RSS KiB {lp}",
                    flush=True,
                )
        for c in clients:
            c.join()
        elapsed = time.monotonic() - started
        while not shared["queue"].empty():
            r = shared["queue"].get()
            reports[r["client"]] = r
        time.sleep(3)  # let the node settle, then read it once more
        mon.poll_procs()
        stop.set()
        probe.join(timeout=60)
        while not probe_q.empty():
            probes.append(probe_q.get())
        mon.poll_log()
        mon.poll_procs()
        return report(args, node, mon, reports, probes, quiet, elapsed)
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
        node.stop()
        if not args.keep:
            node.remove()
        else:
            print(f"node data kept in {root}")


def report(
    args: argparse.Namespace,
    node: LiveNode,
    mon: Monitor,
    reports: dict[int, dict[str, Any]],
    probes: list[dict[str, Any]],
    quiet: list[float],
    elapsed: float,
) -> int:
    inputs = sum(r["inputs"] for r in reports.values())
    outcomes = merge(reports, "outcomes")
    during = [p["total"] for p in probes if "total" in p]
    failed = [p for p in probes if "error" in p]
    slow = [x for x in during if x > args.slow_probe]
    restarts = mon.restarts()
    figures = {
        "seed": args.seed,
        "ref": args.ref,
        "inputs": inputs,
        "seconds": round(elapsed, 1),
        "inputs_per_s": round(inputs / elapsed),
        "kinds": dict(merge(reports, "kinds")),
        "outcomes": dict(outcomes),
        "aborts_source_reason": dict(merge(reports, "aborts")),
        "outcomes_by_kind": dict(sorted(merge(reports, "by_kind").items())),
        "hangs": outcomes[Outcome.HANG],
        "odd": outcomes[Outcome.ODD],
        "crashes": {
            "restarts": restarts,
            "log_lines": mon.crash_lines[:20],
            "pids": mon.pid_history,
        },
        "error_log_lines": len(mon.error_lines),
        "error_log_sample": mon.error_lines[:20],
        "probe_baseline_ms": _ms(quiet),
        "probe_during_ms": _ms(during),
        "probe_failures": len(failed),
        "probe_failure_sample": failed[:5],
        "probe_slow": len(slow),
        "processes": {name: summarise(s) for name, s in mon.samples.items() if s},
        "client_cpu_s": [r["cpu_s"] for r in reports.values()],
        "saved_inputs": sum(r["saved"] for r in reports.values()),
        "out": args.out,
    }
    Path(args.out, "figures.json").write_text(json.dumps(figures, indent=1))
    print("\n== fuzz-live figures ==")
    for key, value in figures.items():
        print(f"{key:22} {value}")
    bad = figures["hangs"] or restarts or mon.error_lines or failed
    print("RESULT:", "PROBLEMS FOUND" if bad else "clean", flush=True)
    return 1 if bad else 0


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.5) * 1e3, 2),
        "p99": round(percentile(values, 0.99) * 1e3, 2),
        "max": round(max(values) * 1e3, 2),
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
