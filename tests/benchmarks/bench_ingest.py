"""Benchmark: the router's durable ingest against DCMTK's storescp, in one run.

    .venv/bin/python tests/benchmarks/bench_ingest.py [--corpora tiny,ct] [--reps 3]
        [--senders 1,4] [--systems router,dcmtk] [--results FILE.jsonl]

The router acknowledges a C-STORE only after fsync + rename + directory fsync + database
commit (DESIGN §3.1); DCMTK's storescp writes the same files without fsync. The sender
is ours for both (in-process, protocol.net): N concurrent
associations, each sending its share of the corpus, timing every C-STORE with
``time.perf_counter``. Throughput = instances / (latest end - earliest start).
Repetitions interleave the systems; a fresh data directory / output directory each time.
Prints one Markdown table with median inst/s (min-max), p50/p99 acknowledgement latency,
and the ratios the ingest issue sets targets for: router/DCMTK with one sender (>= 0.5)
and router 4 senders / router 1 sender (>= 1.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from corpus import ensure_corpus
from peers import free_port

from protocol.net import Association, ContextRequest, Timeouts, associate
from protocol.part10 import read_part10
from protocol.uids import VERIFICATION

VENV_BIN = Path(sys.executable).parent


@dataclass
class Run:
    system: str
    corpus: str
    senders: int
    seconds: float
    latencies_ms: list[float]
    count: int


def _dcmtk(tool: str) -> str:
    for directory in ("/usr/bin", "/usr/local/bin"):
        if (Path(directory) / tool).exists():
            return str(Path(directory) / tool)
    raise SystemExit(f"DCMTK {tool} not found (apt-get install dcmtk)")


async def _wait_ready(port: int, called_ae: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            assoc = await associate(
                "127.0.0.1",
                port,
                [ContextRequest(VERIFICATION, ("1.2.840.10008.1.2",))],
                called_ae=called_ae,
                timeouts=Timeouts(connect=1, acse=2, dimse=2),
            )
            await assoc.send_c_echo()
            await assoc.release()
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing answers C-ECHO on port {port}")


async def _send_share(
    port: int, called_ae: str, files: list[Path]
) -> tuple[float, float, list[float]]:
    metas = [(f, read_part10(f)) for f in files]
    pairs = sorted({(m.sop_class_uid, m.transfer_syntax) for _, m in metas})
    start = time.perf_counter()
    assoc: Association = await associate(
        "127.0.0.1",
        port,
        [ContextRequest(sc, (ts,)) for sc, ts in pairs],
        called_ae=called_ae,
        calling_ae="BENCH",
        timeouts=Timeouts(acse=30, dimse=120),
    )
    latencies = []
    for path, _ in metas:
        t0 = time.perf_counter()
        rsp = await assoc.send_c_store_file(path)
        latencies.append((time.perf_counter() - t0) * 1000)
        if rsp.status != 0:
            raise RuntimeError(f"{path}: status 0x{rsp.status:04X}")
    await assoc.release()
    return start, time.perf_counter(), latencies


async def _send(
    port: int, called_ae: str, files: list[Path], senders: int
) -> tuple[float, list[float]]:
    shares = [files[i::senders] for i in range(senders)]
    results = await asyncio.gather(*(_send_share(port, called_ae, s) for s in shares))
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return end - start, [lat for r in results for lat in r[2]]


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_once(system: str, corpus_dir: Path, senders: int, work: Path) -> Run:
    files = sorted(corpus_dir.glob("*.dcm"))
    port = free_port()
    work.mkdir(parents=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    if system == "router":
        router = str(VENV_BIN / "dicom-router")
        data = work / "data"
        subprocess.run([router, "--data-dir", str(data), "init"], check=True, capture_output=True)
        subprocess.run(
            [
                router,
                "--data-dir",
                str(data),
                "destinations",
                "add",
                "sink",
                "--aet",
                "SINK",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [router, "--data-dir", str(data), "rules", "add", "all", "--to", "sink"],
            check=True,
            capture_output=True,
        )
        proc = _start(
            [router, "--data-dir", str(data), "serve", "--port", str(port), "--bind", "127.0.0.1"],
            env,
            work / "serve.log",
        )
        called = "ROUTER"
    else:
        out = work / "out"
        out.mkdir()
        proc = _start([_dcmtk("storescp"), "-od", str(out), str(port)], env, work / "storescp.log")
        called = "ANY-SCP"
    try:
        asyncio.run(_wait_ready(port, called))
        subprocess.run(["sync"], check=False)
        time.sleep(0.3)
        seconds, latencies = asyncio.run(_send(port, called, files, senders))
    finally:
        _stop(proc)
    if system == "router":
        with sqlite3.connect(work / "data" / "router.sqlite") as db:
            count = db.execute("select count(*) from instances").fetchone()[0]
    else:
        count = sum(1 for p in (work / "out").iterdir() if p.is_file())
    if count != len(files):
        raise RuntimeError(f"{system}: {count} of {len(files)} instances stored")
    return Run(system, corpus_dir.name, senders, seconds, latencies, count)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", default="tiny,ct")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--senders", default="1,4")
    parser.add_argument("--systems", default="router,dcmtk")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    systems = args.systems.split(",")
    sender_counts = [int(s) for s in args.senders.split(",")]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for shape in args.corpora.split(","):
            corpus = ensure_corpus(shape)
            for rep in range(args.reps):
                for senders in sender_counts:
                    for system in systems:
                        work = Path(tmp) / f"{shape}-{rep}-{senders}-{system}"
                        run = run_once(system, corpus.directory, senders, work)
                        shutil.rmtree(work, ignore_errors=True)
                        runs.append(run)
                        rate = run.count / run.seconds
                        print(
                            f"{shape} rep {rep + 1} {system} x{senders}: {run.seconds:.3f} s "
                            f"({rate:.0f}/s)",
                            file=sys.stderr,
                        )
                        if args.results:
                            with args.results.open("a") as f:
                                f.write(
                                    json.dumps(
                                        {
                                            "system": system,
                                            "corpus": shape,
                                            "senders": senders,
                                            "seconds": run.seconds,
                                            "count": run.count,
                                        }
                                    )
                                    + "\n"
                                )
    print("| system | corpus | senders | median inst/s (min-max) | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    medians: dict[tuple[str, str, int], float] = {}
    for shape in args.corpora.split(","):
        for senders in sender_counts:
            for system in systems:
                group = [
                    r for r in runs if (r.system, r.corpus, r.senders) == (system, shape, senders)
                ]
                rates = [r.count / r.seconds for r in group]
                lat = [x for r in group for x in r.latencies_ms]
                medians[(system, shape, senders)] = statistics.median(rates)
                print(
                    f"| {system} | {shape} | {senders} | {statistics.median(rates):,.0f} "
                    f"({min(rates):,.0f}-{max(rates):,.0f}) | {_percentile(lat, 0.5):.2f} | "
                    f"{_percentile(lat, 0.99):.2f} |"
                )
    print()
    for shape in args.corpora.split(","):
        if ("router", shape, 1) in medians and ("dcmtk", shape, 1) in medians:
            ratio = medians[("router", shape, 1)] / medians[("dcmtk", shape, 1)]
            print(f"- {shape}: router/DCMTK with one sender = {ratio:.2f} (target >= 0.5)")
        if ("router", shape, 4) in medians and ("router", shape, 1) in medians:
            ratio = medians[("router", shape, 4)] / medians[("router", shape, 1)]
            print(f"- {shape}: router 4 senders / 1 sender = {ratio:.2f} (target >= 1.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
