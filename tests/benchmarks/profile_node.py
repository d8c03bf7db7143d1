"""Profile: where the router's listener, dispatcher and worker spend their CPU on a
corpus (tiny by default), sampled with py-spy while DCMTK's storescu sends the corpus
``--copies`` times through one node into a DCMTK storescp sink.

    .venv/bin/pip install -e '.[bench]'    # py-spy
    .venv/bin/python tests/benchmarks/profile_node.py [--corpus tiny] [--copies 4]
        [--rate 200] [--top 15] [--keep]

Only samples of a thread holding the GIL count (``py-spy --gil``): a thread blocked in
a system call (fsync, epoll) or waiting for work is not charged, so the figures are the
Python work per instance, not wall time (on a busy machine a GIL holder waiting for a
core is sampled too: compare with the process CPU figure). For every process it prints the GIL-held
milliseconds per instance sent, the process's whole CPU (user+sys from /proc, threads
and C code included), a split by layer (the frame nearest the leaf that falls in one:
database = SQLAlchemy or sqlite3, zeromq = pyzmq, dicom = protocol/, logging, asyncio's
loop, our own router/ and workers/ code, other), and the functions of our code with
the largest inclusive share. The raw py-spy files stay in the work directory with
--keep (flame graphs: ``inferno-flamegraph`` or speedscope read them).

Resending a corpus re-routes it (DESIGN §3.1: a resend means "send again") unless
identical jobs are still pending, so a later copy may make fewer jobs than it has
instances; the figures are per instance received.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import _sink_system, _storescu
from corpus import DEFAULT_ROOT, SHAPES, ensure_corpus
from peers import NODELAY_ENV, _spawn, free_port, start_receiver
from suts import Router

PROFILED = ("listener", "dispatcher", "worker")
# Leaf-most first: a sample is charged to the first layer found walking from its leaf.
LAYERS = (
    ("database", ("sqlalchemy/", "sqlite3/", "router/db/")),
    ("zeromq", ("zmq/",)),
    ("dicom", ("protocol/",)),
    ("logging", ("logging/",)),
    ("ours", ("router/", "workers/")),
    ("asyncio", ("asyncio/", "selectors.py")),
)


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    return stack.split(";"), int(count)


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, marks in LAYERS:
            if any(mark in frame for mark in marks):
                return name
    return "other"


def _own(frame: str) -> str | None:
    """``function (router/x.py)`` for a frame of our code, else None."""
    name, _, where = frame.partition(" (")
    where = "/" + where.lstrip("/")  # py-spy gives paths under the cwd relative
    for root in ("/router/", "/workers/", "/protocol/"):
        if root in where:
            path = root.strip("/") + "/" + where.split(root, 1)[1].split(":", 1)[0]
            return f"{name} ({path})"
    return None


def summarise(raw: Path, rate: float, instances: int, cpu_s: float, top: int) -> str:
    total = 0
    layers: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        frames, count = _frames(line)
        total += count
        layers[_layer(frames)] += count
        for own in {o for o in map(_own, frames) if o is not None}:
            inclusive[own] += count
    if not total:
        return f"  no samples in {raw.name}"
    per = 1000.0 / rate / instances
    out = [
        f"  GIL held {total * per:.2f} ms/instance ({total} samples); "
        f"process CPU {cpu_s * 1000 / instances:.2f} ms/instance",
        "  by layer: " + ", ".join(f"{k} {v * 100 / total:.0f}%" for k, v in layers.most_common()),
        "  our functions, inclusive:",
    ]
    skip = ("_process", "run_worker", "main", "run")  # the process's entry, ~100 %
    shown = [(k, v) for k, v in inclusive.most_common() if k.split(" ")[0].split(".")[-1]
             not in skip][:top]  # fmt: skip
    out += [f"    {v * 100 / total:5.1f}%  {k}" for k, v in shown]
    return "\n".join(out)


def _live_jobs(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
        return int(
            db.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('pending','leased','retry_wait')"
            ).fetchone()[0]
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=SHAPES, default="tiny")
    parser.add_argument("--copies", type=int, default=4, help="times the corpus is sent")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--corpus-root", type=Path, default=DEFAULT_ROOT)
    default_work = Path(f"/tmp/dicom-router-profile-{os.getpid()}")
    parser.add_argument("--work-dir", type=Path, default=default_work)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    spy = py_spy()
    if spy is None:
        parser.error("py-spy not found: pip install -e '.[bench]' (or pip install py-spy)")
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install -y dcmtk")
    if args.copies < 1 or args.rate < 1:
        parser.error("--copies and --rate must be at least 1")
    corpus = ensure_corpus(args.corpus, args.corpus_root)
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    sink_port = free_port()
    sink = start_receiver(_sink_system(False), sink_port, work / "sink", work / "logs")
    node: Router | None = None
    spies: dict[str, tuple[subprocess.Popen[bytes], Path, int]] = {}
    failed = False  # keep the work directory (logs, raw profiles) of a failed run
    try:
        node = Router(work / "data", work / "logs" / "serve.log", sink_port)
        cpu0 = node.cpu()  # suts.group_cpu: user+sys seconds per pid of the node
        for pid, role in node.roles().items():
            if role.startswith(PROFILED):
                raw = work / f"{role}.raw"
                cmd = [spy, "record", "--gil", "--nonblocking", "-r", str(args.rate),
                       "-f", "raw", "-o", str(raw), "-p", str(pid)]  # fmt: skip
                spies[role] = (_spawn(cmd, {}, work / "logs" / f"py-spy-{role}.log"), raw, pid)
        time.sleep(1.0)  # py-spy attached
        t0 = time.perf_counter()
        for copy in range(args.copies):
            sender = subprocess.run(
                _storescu(node.port, node.aet, corpus.directory),
                env={**os.environ, **NODELAY_ENV}, capture_output=True, check=False,
            )  # fmt: skip
            if sender.returncode != 0:
                raise RuntimeError(f"storescu copy {copy + 1} failed: {sender.stderr[-500:]!r}")
        deadline = time.monotonic() + 300
        while live := _live_jobs(work / "data" / "router.sqlite"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{live} jobs still not forwarded after 300 s; see {work}")
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        cpu1 = node.cpu()
        cpu = {role: cpu1.get(pid, 0.0) - cpu0.get(pid, 0.0) for role, (_, _, pid) in spies.items()}
        for popen, _, _ in spies.values():
            popen.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for popen, _, _ in spies.values():
            popen.wait(timeout=60)
        instances = args.copies * corpus.count
        print(f"# profile: {instances} {corpus.shape} instances through one node in "
              f"{wall:.1f} s ({instances / wall:.0f} inst/s, py-spy attached)")  # fmt: skip
        for role, (_, raw, _) in sorted(spies.items()):
            print(f"\n## {role}")
            print(summarise(raw, args.rate, instances, cpu[role], args.top))
    except BaseException:
        failed = True
        raise
    finally:
        for popen, _, _ in spies.values():
            if popen.poll() is None:
                popen.kill()
        if node is not None:
            node.stop()
        sink.stop()
        if not args.keep and not failed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"\nkept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
