#!/usr/bin/env python3
"""On-demand soak: storms of bad peers against a live node while a good peer is served
(issue #6 item 4; DESIGN §8: prints figures, asserts nothing).

    python tests/soak/soak_storms.py --minutes 10 [--baseline 60] [--idle-timeout 20]
        [--storm-rate 40] [--idlers 8] [--slowloris 4] [--ref HEAD] [--out FILE]

Starts a real ``dicom-router serve`` (temporary data dir, one listener, no workers,
``listener.idle_timeout`` short so idle peers are cut within the run) and a well-behaved
peer in its own process: our SCU (protocol.net.client) in a loop of associate, C-STORE,
C-ECHO, release. First ``--baseline`` seconds with only that peer (the quiet baseline),
then ``--minutes`` with, from another process:

* connect/abort storms at ``--storm-rate`` connections a second: a TCP connect reset at
  once; a valid A-ASSOCIATE-RQ then an A-ABORT; half an A-ASSOCIATE-RQ then a reset;
* ``--idlers`` never-releasing peers: associate, then sit idle until the node's idle
  timeout aborts them (the time it took is a figure), then again;
* ``--slowloris`` peers of two kinds: an A-ASSOCIATE-RQ one byte every 3 s (cut by
  ARTIM), and after a valid association a P-DATA-TF one byte every 3 s (cut by the
  per-PDU deadline); again when cut.

Reported: the good peer's C-STORE and C-ECHO latency, p50/p99 per minute against the
baseline, and its failures; RSS, fds and threads of every router process over time
(start/end/max, and a line a minute); how long the node took to cut each kind of bad
peer; the node's log (warnings by kind, errors). Everything also goes to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import re
import socket
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fuzz"))
sys.path.insert(0, str(HERE.parents[1]))

import livenode  # noqa: E402
from livenode import HOST, LiveNode, percentile, sample  # noqa: E402

ARTIM_S = 30.0  # listener.acse_timeout, which the listener also uses as ARTIM
PDU_DEADLINE_S = 120.0  # protocol.net Timeouts.pdu


# --- the good peer ----------------------------------------------------------------------------
def good_peer_main(port: int, queue: Any, stop: Any) -> None:
    asyncio.run(_good_peer(port, queue, stop))


async def _good_peer(port: int, queue: Any, stop: Any) -> None:
    from seeds import _dataset, _encode

    from protocol.net.client import ContextRequest, associate
    from protocol.uids import EXPLICIT_VR_LE, VERIFICATION

    ds = _dataset(livenode.CT_IMAGE, 16, True)
    contexts = [
        ContextRequest(VERIFICATION, ("1.2.840.10008.1.2",)),
        ContextRequest(livenode.CT_IMAGE, (EXPLICIT_VR_LE,)),
    ]
    n = 0
    while not stop.is_set():
        t0 = time.monotonic()
        record: dict[str, Any] = {"t": time.time()}
        try:
            assoc = await associate(HOST, port, contexts, called_ae="ROUTER", calling_ae="GOOD")
            record["associate"] = time.monotonic() - t0
            n += 1
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.9999.77.{n}"
            data = _encode(ds, False)
            t1 = time.monotonic()
            rsp = await assoc.send_c_store(
                data, livenode.CT_IMAGE, ds.SOPInstanceUID, EXPLICIT_VR_LE
            )
            record["store"] = time.monotonic() - t1
            record["store_status"] = rsp.status
            t2 = time.monotonic()
            status = await assoc.send_c_echo()
            record["echo"] = time.monotonic() - t2
            record["echo_status"] = status
            await assoc.release()
        except Exception as exc:  # every failure of the good peer is a figure
            record["error"] = f"{type(exc).__name__}: {exc}"
        queue.put(record)
        await asyncio.sleep(0.2)


# --- the bad peers ----------------------------------------------------------------------------
class Storms:
    def __init__(self, port: int, args: argparse.Namespace, queue: Any) -> None:
        self.port = port
        self.args = args
        self.queue = queue
        self.counts: Counter[str] = Counter()
        self.cut_after: dict[str, list[float]] = defaultdict(list)
        self.rq = livenode.associate_rq("STORM")

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(HOST, self.port)

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _read_pdu(self, reader: asyncio.StreamReader) -> int | None:
        try:
            header = await reader.readexactly(6)
            await reader.readexactly(struct.unpack(">I", header[2:])[0])
            return header[0]
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def storm_one(self, kind: int) -> None:
        reader, writer = await self._open()
        try:
            if kind == 0:
                self.counts["storm-reset"] += 1
            elif kind == 1:
                writer.write(self.rq)
                await writer.drain()
                if await asyncio.wait_for(self._read_pdu(reader), 30) == 2:
                    writer.write(bytes.fromhex("07000000000400000000"))
                    await writer.drain()
                self.counts["storm-associate-abort"] += 1
            else:
                writer.write(self.rq[: len(self.rq) // 2])
                await writer.drain()
                self.counts["storm-half-rq-reset"] += 1
        finally:
            self._reset(writer)

    async def storms(self) -> None:
        interval = 1.0 / self.args.storm_rate
        kind = 0
        pending: set[asyncio.Task[None]] = set()
        while True:
            kind = (kind + 1) % 3
            task = asyncio.create_task(self.storm_one(kind))
            pending.add(task)
            task.add_done_callback(pending.discard)
            task.add_done_callback(self._note_failure)
            await asyncio.sleep(interval)

    def _note_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.counts[f"storm-error-{type(task.exception()).__name__}"] += 1

    async def idler(self) -> None:
        while True:
            try:
                reader, writer = await self._open()
                writer.write(livenode.associate_rq("IDLER"))
                await writer.drain()
                if await self._read_pdu(reader) != 2:
                    self.counts["idler-refused"] += 1
                    writer.close()
                    await asyncio.sleep(1)
                    continue
                start = time.monotonic()
                while (kind := await self._read_pdu(reader)) is not None:
                    self.counts[f"idler-got-{kind}"] += 1
                self.cut_after["idler (idle timeout)"].append(time.monotonic() - start)
                writer.close()
            except OSError as exc:
                self.counts[f"idler-error-{type(exc).__name__}"] += 1
                await asyncio.sleep(1)

    async def slowloris(self, after_association: bool) -> None:
        name = "slowloris P-DATA (PDU deadline)" if after_association else "slowloris RQ (ARTIM)"
        while True:
            try:
                reader, writer = await self._open()
                if after_association:
                    writer.write(livenode.associate_rq("SLOW"))
                    await writer.drain()
                    if await self._read_pdu(reader) != 2:
                        self.counts["slowloris-refused"] += 1
                        writer.close()
                        await asyncio.sleep(1)
                        continue
                    payload = livenode.echo_pdata(5)
                else:
                    payload = self.rq
                start = time.monotonic()
                closed = asyncio.create_task(self._drain_until_closed(reader))
                for byte in payload:
                    if closed.done():
                        break
                    writer.write(bytes((byte,)))
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    await asyncio.wait({closed}, timeout=3.0)
                await closed
                self.cut_after[name].append(time.monotonic() - start)
                writer.close()
            except OSError as exc:
                self.counts[f"slowloris-error-{type(exc).__name__}"] += 1
                await asyncio.sleep(1)

    @staticmethod
    async def _drain_until_closed(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    async def report(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.queue.put({"counts": dict(self.counts), "cut_after": dict(self.cut_after)})

    async def run(self) -> None:
        tasks = [self.storms(), self.report()]
        tasks += [self.idler() for _ in range(self.args.idlers)]
        for i in range(self.args.slowloris):
            tasks.append(self.slowloris(after_association=bool(i % 2)))
        await asyncio.gather(*tasks)


def storms_main(port: int, args: argparse.Namespace, queue: Any) -> None:
    asyncio.run(Storms(port, args, queue).run())


# --- report -------------------------------------------------------------------------------
def _ms(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values)} p50={percentile(values, 0.5) * 1e3:.1f} "
        f"p99={percentile(values, 0.99) * 1e3:.1f} max={max(values) * 1e3:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--baseline", type=float, default=60.0, help="quiet seconds first")
    parser.add_argument("--idle-timeout", type=float, default=20.0)
    parser.add_argument("--storm-rate", type=float, default=40.0, help="connections/s")
    parser.add_argument("--idlers", type=int, default=8)
    parser.add_argument("--slowloris", type=int, default=4)
    parser.add_argument("--ref", default="HEAD", help="git ref the node runs ('worktree')")
    parser.add_argument("--out", default=f"soak-storms-{time.strftime('%Y%m%d-%H%M%S')}.json")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="soak-storms-node-"))
    source = None if args.ref == "worktree" else livenode.snapshot(args.ref, root / "src")
    env = {"DICOM_ROUTER_LISTENER_IDLE_TIMEOUT": str(args.idle_timeout)}
    node = LiveNode.start(root, env=env, source=source)
    rev = (source / "REVISION").read_text().strip() if source else "worktree"
    print(
        f"soak: node {rev} on port {node.port}, baseline {args.baseline:.0f} s, then "
        f"{args.minutes:g} min of storms",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    good_q, storm_q = ctx.Queue(), ctx.Queue()
    good = ctx.Process(target=good_peer_main, args=(node.port, good_q, stop))
    storms = ctx.Process(target=storms_main, args=(node.port, args, storm_q))
    records: list[dict[str, Any]] = []
    samples: dict[str, list[tuple[float, livenode.ProcSample]]] = defaultdict(list)
    storm_state: dict[str, Any] = {}
    try:
        good.start()
        t_start = time.time()
        storm_at = t_start + args.baseline
        end_at = storm_at + args.minutes * 60
        last_minute = -1
        while time.time() < end_at:
            time.sleep(1.0)
            now = time.time()
            if not storms.is_alive() and storms.exitcode is None and now >= storm_at:
                storms.start()
                print("  storms started", flush=True)
            while not good_q.empty():
                records.append(good_q.get())
            while not storm_q.empty():
                storm_state = storm_q.get()
            for name, pid in node.pids().items():
                s = sample(pid)
                if s is not None:
                    samples[name].append((now, s))
            minute = int((now - storm_at) // 60) if now >= storm_at else -1
            if minute != last_minute and minute >= 0:
                last_minute = minute
                _print_minute(minute - 1, storm_at, records, samples)
        stop.set()
        storms.terminate()
        good.join(timeout=60)
        while not good_q.empty():
            records.append(good_q.get())
        # the bad peers are gone: the node's fds must come back (idle ones are cut by now)
        time.sleep(5)
        settled = {n: sample(p) for n, p in node.pids().items()}
        return _report(args, node, rev, t_start, storm_at, records, samples, settled, storm_state)
    finally:
        stop.set()
        for p in (good, storms):
            if p.is_alive():
                p.terminate()
            with contextlib.suppress(AssertionError):
                p.join(timeout=10)
        node.stop()
        node.remove()


def _phase(records: list[dict[str, Any]], lo: float, hi: float, key: str) -> list[float]:
    return [r[key] for r in records if lo <= r["t"] < hi and key in r]


def _print_minute(
    minute: int,
    storm_at: float,
    records: list[dict[str, Any]],
    samples: dict[str, list[tuple[float, livenode.ProcSample]]],
) -> None:
    lo = storm_at + 60 * minute if minute >= 0 else 0.0
    hi = storm_at + 60 * (minute + 1) if minute >= 0 else storm_at
    listener = samples.get("listener-0", [])
    last = listener[-1][1] if listener else None
    label = f"minute {minute + 1}" if minute >= 0 else "baseline"
    print(
        f"  {label:9} store {_ms(_phase(records, lo, hi, 'store'))}; echo "
        f"{_ms(_phase(records, lo, hi, 'echo'))}; listener "
        f"{last.rss_kib if last else '?'} KiB, {last.fds if last else '?'} fds",
        flush=True,
    )


def _report(
    args: argparse.Namespace,
    node: LiveNode,
    rev: str,
    t_start: float,
    storm_at: float,
    records: list[dict[str, Any]],
    samples: dict[str, list[tuple[float, livenode.ProcSample]]],
    settled: dict[str, livenode.ProcSample | None],
    storm_state: dict[str, Any],
) -> int:
    base = {k: _phase(records, t_start, storm_at, k) for k in ("store", "echo", "associate")}
    per_minute = []
    minute = 0
    end_at = storm_at + args.minutes * 60
    while storm_at + 60 * (minute + 1) <= end_at + 1:
        lo, hi = storm_at + 60 * minute, storm_at + 60 * (minute + 1)
        row = {"minute": minute + 1}
        for key in ("store", "echo", "associate"):
            vals = _phase(records, lo, hi, key)
            row[key] = {
                "n": len(vals),
                "p50_ms": round(percentile(vals, 0.5) * 1e3, 1),
                "p99_ms": round(percentile(vals, 0.99) * 1e3, 1),
            }
        per_minute.append(row)
        minute += 1
    failures = [r for r in records if "error" in r or r.get("store_status") or r.get("echo_status")]
    processes = {}
    for name, rows in samples.items():
        first, last = rows[0][1], rows[-1][1]
        after = settled.get(name)
        processes[name] = {
            "rss_kib_start_end_max": [first.rss_kib, last.rss_kib, max(s.rss_kib for _, s in rows)],
            "fds_start_end_max": [first.fds, last.fds, max(s.fds for _, s in rows)],
            "threads_start_end_max": [first.threads, last.threads, max(s.threads for _, s in rows)],
            "fds_after_peers_gone": after.fds if after else None,
            "cpu_s": round(last.cpu_s - first.cpu_s, 1),
        }
    log = node.log_text()
    warnings = Counter(
        re.sub(r"\d+", "N", line.split("WARNING", 1)[1])[:100]
        for line in log.splitlines()
        if "WARNING" in line
    )
    errors = [line for line in log.splitlines() if re.search(r"\bERROR\b|Traceback", line)]
    cut = {k: _stats(v) for k, v in storm_state.get("cut_after", {}).items()}
    storm_p99 = [row["store"]["p99_ms"] for row in per_minute if row["store"]["n"]]
    figures = {
        "node": rev,
        "minutes": args.minutes,
        "baseline": {k: _ms(v) for k, v in base.items()},
        "per_minute": per_minute,
        "good_peer_exchanges": len(records),
        "good_peer_failures": len(failures),
        "good_peer_failure_sample": failures[:5],
        "worst_minute_store_p99_ms": max(storm_p99) if storm_p99 else None,
        "bad_peers": storm_state.get("counts", {}),
        "cut_after_s": cut,
        "processes": processes,
        "restarts": node.restarts(),
        "log_warnings_by_kind": dict(warnings.most_common(15)),
        "log_errors": errors[:10],
    }
    Path(args.out).write_text(json.dumps(figures, indent=1))
    print("\n== soak figures ==")
    for key, value in figures.items():
        if key == "per_minute":
            for row in value:
                print(
                    f"  minute {row['minute']:2}: "
                    + "; ".join(
                        f"{k} p50 {row[k]['p50_ms']} p99 {row[k]['p99_ms']} ms (n={row[k]['n']})"
                        for k in ("store", "echo", "associate")
                    )
                )
        else:
            print(f"{key:26} {value}")
    print(f"figures written to {Path(args.out).resolve()}", flush=True)
    return 1 if failures or errors else 0


def _stats(values: list[float]) -> str:
    if not values:
        return "n=0"
    p50 = percentile(values, 0.5)
    return f"n={len(values)} min={min(values):.1f} p50={p50:.1f} max={max(values):.1f}"


if __name__ == "__main__":
    sys.exit(main())
