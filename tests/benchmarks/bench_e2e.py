"""Benchmark: end to end, DCMTK storescu -> router (durable) -> DCMTK storescp, against
DCMTK storescu -> DCMTK storescp with no router, in one run.

    .venv/bin/python tests/benchmarks/bench_e2e.py [--corpora tiny,ct,big] [--reps 3]
        [--workers M] [--listeners N] [--max-associations N] [--dead-destinations]
        [--cases none,router,router+dead]
        [--timeout S] [--stall S] [--results FILE.jsonl] [--corpus-root DIR]
        [--work-dir DIR] [--keep]

Cases, interleaved in every repetition (rep 1: none, router[, router+dead]; rep 2: ...):

    none         storescu straight into the sink: the floor of this method
    router       storescu -> ``dicom-router serve`` -> sink; the rule ``all`` sends every
                 instance to the destination ``sink``
    router+dead  (--dead-destinations) the same, but the rule also sends every instance to
                 ``dead`` (a port where nothing listens: connection refused) and ``hole``
                 (a socket of this script that listens and never accepts or answers)

One run: a fresh DCMTK ``storescp`` sink (empty directory; ``--fork`` when
--max-associations > 1, since storescp serves one association at a time otherwise), for
the router cases a fresh data directory (``init``, ``destinations add``, ``rules add``,
``serve --port L --bind 127.0.0.1``, ready when C-ECHO to ROUTER answers), the corpus
read once (page cache warm for every case), ``sync`` and 0.3 s of quiet, then ONE
``storescu +sd +r`` association with the whole corpus. Every DCMTK process runs with
TCP_NODELAY=1 (Debian's DCMTK leaves Nagle on otherwise).

Measured from the spawn of storescu (t = 0):
    send     storescu's exit, i.e. the last acknowledgement (+ A-RELEASE, process exit)
    arrival  the last sink file complete: the sink directory is polled every 20 ms until
             every instance is there at full size, then arrival = the newest file's
             mtime (kernel clock, a few ms granularity; for "none" it precedes send, so
             ack->arrival is slightly negative there)
    total    max(send, arrival); instances/s and MB/s (10^6 bytes of corpus files) are
             of the total
A run fails when storescu fails, the router or the sink exits, no new instance reaches
the sink for --stall seconds (default 60: a stalled router), or after --timeout; the
note under the table says how far it got.
Router CPU = user+sys of every process in serve's process group (supervisor, listener,
dispatcher, workers, janitor; from /proc), from just before the send to the last arrival,
per instance; the per-process split is printed under the table.

Prints one Markdown table on stdout (median of the successful repetitions, min-max) with
the ratios the performance issue sets targets for (router / no router, instances/s:
tiny >= 0.5, ct >= 0.45, big >= 0.5) and, with --dead-destinations, router+dead /
router. Progress goes to stderr; ``--results`` appends one JSON line per run. Loopback
only, free ports at run time, every process stopped by its process group. Not part of
the test command; figures on a shared 2-core VM are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import DEFAULT_ROOT, SHAPES, Corpus, ensure_corpus
from peers import (
    AET,
    CLK_TCK,
    LOOPBACK,
    NODELAY_ENV,
    Receiver,
    System,
    _killpg,
    _log_tail,
    _spawn,
    _wait_exited,
    count_instances,
    free_port,
    start_receiver,
    wait_ready,
)

DEFAULT_WORK = Path("/tmp/dicom-router-bench/e2e")
ROUTER_AET = "ROUTER"
ROUTER = str(Path(sys.executable).parent / "dicom-router")
POLL_S = 0.02
TARGETS = {"tiny": 0.5, "ct": 0.45, "big": 0.5}  # router / no router, instances/s
SIZE_SLACK = 1024  # a sink file differs from its source only in the meta header (~+6 B)


@dataclass
class Run:
    case: str
    corpus: str
    rep: int
    ok: bool
    error: str
    instances: int  # complete in the sink at the end
    expected: int
    corpus_bytes: int
    send_s: float
    arrival_s: float  # newest sink file's mtime, relative to the spawn of storescu
    detected_s: float  # when the poll saw the last one complete
    total_s: float
    sender_rc: int
    sender_cpu_s: float
    sink_cpu_s: float
    router_cpu_s: float
    router_cpu_by_process: dict[str, float] = field(default_factory=dict)
    loadavg: float = 0.0
    time: float = 0.0


# ------------------------------------------------------------------ processes


def _cli(data: Path, *args: str) -> None:
    done = subprocess.run(
        [ROUTER, "--data-dir", str(data), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"dicom-router {' '.join(args)}: {done.stderr.strip()}")


def _sink_system(fork: bool) -> System:
    extra = ["--fork"] if fork else []
    return System(
        "sink",
        lambda port, out: ["storescp", *extra, "-aet", AET, "-od", str(out), str(port)],
        lambda port, src: [],
        env=NODELAY_ENV,
    )


def _storescu(port: int, aet: str, source: Path) -> list[str]:
    return ["storescu", "-aec", aet, "+sd", "+r", LOOPBACK, str(port), str(source)]


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] state, [2] pgrp, [11..14] u/s/cu/cs time


def _group_cpu(pgid: int) -> dict[int, float]:
    """user+sys CPU seconds of every live process in group ``pgid``; the leader's count
    includes its reaped children (a restarted child)."""
    out: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(entry.name)
        if fields is None or int(fields[2]) != pgid:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if int(entry.name) == pgid:
            ticks += int(fields[13]) + int(fields[14])
        out[int(entry.name)] = ticks / CLK_TCK
    return out


def _roles(data: Path, leader: int) -> dict[int, str]:
    """pid -> listener/dispatcher/worker/janitor/... from the supervisor's status file."""
    roles = {leader: "supervisor"}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        state = json.loads((data / "run" / "node.json").read_text())
        for name, child in state["children"].items():
            if child.get("pid"):
                roles[int(child["pid"])] = name.rstrip("0123456789").rstrip("-")
    return roles


class Router:
    """``dicom-router serve`` on a fresh data directory, its own process group."""

    def __init__(
        self,
        data: Path,
        log: Path,
        sink_port: int,
        args: argparse.Namespace,
        dead: bool,
    ) -> None:
        self.data, self.log = data, log
        self.hole: socket.socket | None = None
        _cli(data, "init")
        per_destination = ["--max-associations", str(args.max_associations)]
        _cli(data, "destinations", "add", "sink", "--aet", AET, "--host", LOOPBACK,
             "--port", str(sink_port), *per_destination)  # fmt: skip
        targets = ["sink"]
        if dead:
            # Nothing listens on a port that was free a moment ago: connection refused.
            _cli(data, "destinations", "add", "dead", "--aet", "DEAD", "--host", LOOPBACK,
                 "--port", str(free_port()), *per_destination)  # fmt: skip
            # A black hole: connections complete in the kernel's backlog, nothing answers.
            self.hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.hole.bind((LOOPBACK, 0))
            self.hole.listen(1024)
            _cli(data, "destinations", "add", "hole", "--aet", "HOLE", "--host", LOOPBACK,
                 "--port", str(self.hole.getsockname()[1]), *per_destination)  # fmt: skip
            targets += ["dead", "hole"]
        _cli(data, "rules", "add", "all", "--to", ",".join(targets))
        self.port = free_port()
        argv = [ROUTER, "--data-dir", str(data), "serve", "--port", str(self.port),
                "--bind", LOOPBACK]  # fmt: skip
        if args.workers is not None:
            argv += ["--workers", str(args.workers)]
        if args.listeners is not None:
            argv += ["--listeners", str(args.listeners)]
        self.popen = _spawn(argv, NODELAY_ENV, log)
        self._stopper = Receiver("router", self.port, data, log, self.popen)
        try:
            wait_ready(self.port, self.popen, log, timeout=60.0, aet=ROUTER_AET)
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self._stopper.alive()

    def cpu(self) -> dict[int, float]:
        return _group_cpu(self.popen.pid)

    def stop(self) -> None:
        self._stopper.stop(grace=30.0)
        if self.hole is not None:
            self.hole.close()
            self.hole = None


# ------------------------------------------------------------------ one run


def _warm(directory: Path) -> None:
    """Read every corpus file, so that no case pays for a cold page cache (the first
    case of a repetition would otherwise, after the previous runs' writes)."""
    for path in sorted(directory.iterdir()):
        with path.open("rb") as f:
            while f.read(1 << 20):
                pass


class SinkWatch:
    """Counts sink files that have reached their full size; stats only the others."""

    def __init__(self, directory: Path, expected: int, min_size: int) -> None:
        self.directory, self.expected = directory, expected
        self.threshold = max(0, min_size - SIZE_SLACK)
        self.complete: dict[str, int] = {}  # name -> mtime_ns

    def poll(self) -> bool:
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name in self.complete or entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_size >= self.threshold:
                    self.complete[entry.name] = st.st_mtime_ns
        return len(self.complete) >= self.expected

    def last_mtime(self) -> float:
        """The newest mtime among the complete files, re-read (seconds, epoch)."""
        newest = 0
        for name, mtime in self.complete.items():
            with contextlib.suppress(OSError):
                mtime = os.stat(self.directory / name).st_mtime_ns
            newest = max(newest, mtime)
        return newest / 1e9


def one_run(case: str, corpus: Corpus, rep: int, work: Path, args: argparse.Namespace) -> Run:
    run_dir = work / f"{corpus.shape}-{rep}-{case}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sink_dir, logs = run_dir / "sink", run_dir / "logs"
    nan = float("nan")
    run = Run(case, corpus.shape, rep, False, "", 0, corpus.count, corpus.bytes,
              nan, nan, nan, nan, -1, nan, nan, nan)  # fmt: skip
    sink_port = free_port()
    sink: Receiver | None = None
    router: Router | None = None
    sender = None
    try:
        sink = start_receiver(_sink_system(args.max_associations > 1), sink_port, sink_dir, logs)
        if case == "none":
            feed_port, feed_aet = sink_port, AET
        else:
            router = Router(
                run_dir / "data", logs / "serve.log", sink_port, args, case == "router+dead"
            )
            feed_port, feed_aet = router.port, ROUTER_AET
        _warm(corpus.directory)
        os.sync()
        time.sleep(0.3)
        run.loadavg = float(Path("/proc/loadavg").read_text().split()[0])
        watch = SinkWatch(sink_dir, corpus.count, corpus.min_size)
        sink_cpu0 = sink.cpu_seconds()
        router_cpu0 = router.cpu() if router else {}
        argv = _storescu(feed_port, feed_aet, corpus.directory)
        t0_wall = time.time()
        t0 = time.perf_counter()
        sender = _spawn(argv, NODELAY_ENV, logs / "storescu.log")
        detected = None
        progress, progress_at = 0, 0.0
        while True:
            now = time.perf_counter() - t0
            if sender.returncode is None and _wait_exited(sender.pid, 0):
                run.send_s = now
                _killpg(sender.pid, signal.SIGKILL)  # anything it left in its group
                _, status, usage = os.wait4(sender.pid, 0)
                sender.returncode = run.sender_rc = os.waitstatus_to_exitcode(status)
                run.sender_cpu_s = usage.ru_utime + usage.ru_stime
                if run.sender_rc != 0:
                    run.error = f"storescu exit code {run.sender_rc}"
                    break
            if detected is None and watch.poll():
                detected = now
            if len(watch.complete) > progress:
                progress, progress_at = len(watch.complete), now
            elif now - progress_at > args.stall:
                run.error = f"stalled: no new instance at the sink for {args.stall:.0f} s"
                break
            if detected is not None and sender.returncode is not None:
                break
            if router is not None and not router.alive():
                run.error = "the router exited"
                break
            if not sink.alive():
                run.error = "the sink exited"
                break
            if now > args.timeout:
                run.error = f"timed out after {args.timeout:.0f} s"
                break
            time.sleep(POLL_S)
        if router is not None:
            router_cpu1 = router.cpu()
            roles = _roles(router.data, router.popen.pid)
            by_role: dict[str, float] = {}
            for pid, seconds in router_cpu1.items():
                role = roles.get(pid, "other")
                by_role[role] = by_role.get(role, 0.0) + seconds - router_cpu0.get(pid, 0.0)
            run.router_cpu_by_process = {k: round(v, 3) for k, v in sorted(by_role.items())}
            run.router_cpu_s = sum(by_role.values())
        run.sink_cpu_s = sink.cpu_seconds() - sink_cpu0
        run.instances = len(watch.complete)
        if watch.complete:
            run.arrival_s = watch.last_mtime() - t0_wall
        if detected is not None:
            run.detected_s = detected
            run.total_s = max(run.send_s, run.arrival_s)
        elif run.error:
            run.error += (
                f" ({run.instances} of {corpus.count} at the sink, the last at "
                f"{run.arrival_s:.1f} s; storescu "
                + ("still sending)" if math.isnan(run.send_s) else f"exited at {run.send_s:.1f} s)")
            )
    except Exception as exc:  # a start-up failure: recorded, the next run goes on
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        if sender is not None and sender.returncode is None:
            _killpg(sender.pid, signal.SIGKILL)
            sender.wait()
        if router is not None:
            router.stop()
        if sink is not None:
            sink.stop()
    if not run.error:
        stored, _ = count_instances(sink_dir)
        if stored != corpus.count:
            run.error = f"{stored} of {corpus.count} instances in the sink"
    run.ok = not run.error
    run.time = time.time()
    if run.error:
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            run.error += f"\n  {log}:\n" + _indent(_log_tail(log, 15))
    elif not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


# ------------------------------------------------------------------ report


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _med(values: list[float], fmt: Callable[[float], str] = "{:.2f}".format, sep: str = "-") -> str:
    if not values:
        return "-"
    med = fmt(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt(min(values))}{sep}{fmt(max(values))})"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(runs: list[Run], corpora: list[Corpus], cases: list[str]) -> str:
    head = ["corpus", "case", "ok", "send s", "last arrival s", "ack->arrival s", "inst/s",
            "MB/s", "/ no router (target)", "router CPU ms/inst"]  # fmt: skip
    if "router+dead" in cases:
        head.append("/ router")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for corpus in corpora:
        rates: dict[str, float] = {}
        for case in cases:
            good = [r for r in runs if (r.case, r.corpus, r.ok) == (case, corpus.shape, True)]
            if good:
                rates[case] = statistics.median(corpus.count / r.total_s for r in good)
        for case in cases:
            mine = [r for r in runs if (r.case, r.corpus) == (case, corpus.shape)]
            good = [r for r in mine if r.ok]
            rate = rates.get(case)
            ratio = "-"
            if case != "none" and rate and rates.get("none"):
                ratio = f"{rate / rates['none']:.2f}"
                if case == "router" and corpus.shape in TARGETS:
                    ratio += f" (>= {TARGETS[corpus.shape]})"
            cpu = [r.router_cpu_s / corpus.count * 1000 for r in good if case != "none"]
            cells = [
                f"{corpus.shape} ({corpus.count} x {corpus.bytes / corpus.count / 1e3:,.0f} KB)",
                case,
                f"{len(good)}/{len(mine)}",
                _med([r.send_s for r in good]),
                _med([r.arrival_s for r in good]),
                _med([r.arrival_s - r.send_s for r in good], "{:+.2f}".format, " .. "),
                _med([corpus.count / r.total_s for r in good], _rate),
                _rate(rate * corpus.bytes / corpus.count / 1e6) if rate else "-",
                ratio,
                _med(cpu, "{:.3g}".format),
            ]
            if "router+dead" in cases:
                live = rates.get("router")
                cells.append(
                    f"{rate / live:.2f}" if case == "router+dead" and rate and live else ""
                )
            lines.append("| " + " | ".join(cells) + " |")
            for r in mine:
                if not r.ok:
                    notes.append(
                        f"- {corpus.shape} {case} rep {r.rep} failed: {r.error.splitlines()[0]}"
                    )
            if good and case != "none":
                split: dict[str, list[float]] = {}
                for r in good:
                    for role, seconds in r.router_cpu_by_process.items():
                        split.setdefault(role, []).append(seconds / corpus.count * 1000)
                parts = ", ".join(
                    f"{role} {statistics.median(v):.2f}" for role, v in sorted(split.items())
                )
                sink_cpu = statistics.median(r.sink_cpu_s for r in good) / corpus.count * 1000
                notes.append(
                    f"- {corpus.shape} {case}: router CPU ms/inst by process: {parts}; "
                    f"sink {sink_cpu:.2f}"
                )
    return "\n".join([*lines, "", *notes])


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", default="tiny,ct,big")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, help="serve --workers (default: the node's)")
    parser.add_argument("--listeners", type=int, help="serve --listeners (default: the node's)")
    parser.add_argument(
        "--max-associations",
        type=int,
        default=1,
        help="per destination (default 1; > 1 runs the sink storescp with --fork)",
    )
    parser.add_argument("--dead-destinations", action="store_true")
    parser.add_argument("--cases", help="a subset of none,router,router+dead (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument(
        "--stall",
        type=float,
        default=60.0,
        help="give a run up when no new instance reaches the sink for this long (seconds)",
    )
    parser.add_argument("--results", type=Path, help="append one JSON line per run")
    parser.add_argument("--corpus-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--keep", action="store_true", help="keep run directories and logs")
    args = parser.parse_args(argv)
    shapes = args.corpora.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown corpus shape(s): {', '.join(unknown)}")
    if not Path(ROUTER).exists():
        parser.error(f"{ROUTER} not found: run with the project's virtual environment")
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"DCMTK {tool} not found (apt-get install dcmtk)")
    os.environ.update(NODELAY_ENV)  # every DCMTK process, echoscu's readiness checks too
    cases = ["none", "router"] + (["router+dead"] if args.dead_destinations else [])
    if args.cases:
        cases = [c for c in cases if c in args.cases.split(",")]
        if not cases:
            parser.error("--cases: none of none,router,router+dead (the last with its flag)")
    corpora = [ensure_corpus(shape, args.corpus_root) for shape in shapes]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    load0 = Path("/proc/loadavg").read_text().split()[0]
    runs: list[Run] = []
    for corpus in corpora:
        for rep in range(1, args.reps + 1):
            for case in cases:
                run = one_run(case, corpus, rep, args.work_dir, args)
                runs.append(run)
                if run.ok:
                    cpu = (
                        f", router CPU {run.router_cpu_s / corpus.count * 1000:.2f} ms/inst"
                        if case != "none"
                        else ""
                    )
                    print(
                        f"{corpus.shape} rep {rep} {case}: send {run.send_s:.2f} s, "
                        f"last arrival {run.arrival_s:.2f} s, "
                        f"{corpus.count / run.total_s:,.0f} inst/s{cpu} "
                        f"(load {run.loadavg:.1f})",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    print(f"{corpus.shape} rep {rep} {case}: FAILED {run.error}", file=sys.stderr)
                if args.results:
                    record = {
                        k: (None if isinstance(v, float) and v != v else v)
                        for k, v in asdict(run).items()
                    }
                    with args.results.open("a") as f:
                        f.write(json.dumps(record) + "\n")
    settings = [
        f"workers {args.workers if args.workers is not None else 'default'}",
        f"listeners {args.listeners if args.listeners is not None else 'default'}",
        f"max-associations {args.max_associations}",
        f"reps {args.reps}",
        f"load average at start {load0}",
    ]
    print(f"End to end, DCMTK storescu -> router -> DCMTK storescp ({', '.join(settings)}):\n")
    print(table(runs, corpora, cases))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
