"""Benchmark: end to end, DCMTK storescu -> system under test -> DCMTK storescp, for our
router, Orthanc and a hand-written pynetdicom forwarder, against no router, in one run.

    .venv/bin/python tests/benchmarks/bench_e2e.py [--corpora tiny,ct,big] [--reps 5]
        [--cases none,router,orthanc,naive[,router+dead]] [--dead-destinations]
        [--workers M] [--listeners N] [--max-associations N]
        [--timeout S] [--stall S] [--results FILE.jsonl] [--corpus-root DIR]
        [--work-dir DIR] [--keep]

Cases, interleaved in every repetition (rep 1: none, router, orthanc, naive; rep 2: ...),
so that a slow spell of the machine hits every case alike:

    none         storescu straight into the sink: the physical limit of the path
    router       storescu -> ``dicom-router serve`` -> sink; the rule ``all`` sends every
                 instance to the destination ``sink`` (durable: acknowledged after fsync
                 and commit)
    orthanc      storescu -> Orthanc (Debian's package, ``apt-get install -y orthanc``;
                 its service need not run) -> sink, configured here in the run's
                 directory: its own storage and SQLite index, DICOM port chosen at run
                 time, HTTP off, Lua OnStoredInstance: SendToModality('sink'), then
                 Delete (forward-and-delete auto-routing); see suts.py
    naive        storescu -> naive_forwarder.py (pynetdicom SCP, each C-STORE sent on
                 synchronously over one held-open association; nothing on disk) -> sink
    router+dead  (--dead-destinations, or named in --cases) the router with the rule
                 also sending every instance to ``dead`` (a port where nothing listens)
                 and ``hole`` (a socket of this script that never accepts or answers)

One run: a fresh DCMTK ``storescp`` sink (empty directory; ``--fork`` when
--max-associations > 1, since storescp serves one association at a time otherwise), a
fresh system under test (ready when C-ECHO answers), the corpus read once (page cache
warm for every case), ``sync`` and 0.3 s of quiet, then ONE ``storescu +sd +r``
association with the whole corpus (bench_scaling.py runs several at once). Every DCMTK
process (Orthanc included) runs with TCP_NODELAY=1; the naive forwarder sets it itself.

Measured from the spawn of storescu (t = 0):
    send     storescu's exit, i.e. the last acknowledgement (+ A-RELEASE, process exit)
    arrival  the last sink file complete: the sink directory is polled every 20 ms until
             every instance is there at full size, then arrival = the newest file's
             mtime (kernel clock, a few ms granularity; for "none" it precedes send, so
             ack->arrival is slightly negative there)
    total    max(send, arrival); instances/s and MB/s (10^6 bytes of corpus files) are
             of the total
A run fails when storescu fails, the system or the sink exits, no new instance reaches
the sink for --stall seconds (default 60: a stalled router), or after --timeout; the
note under the table says how far it got.
CPU = user+sys of every process in the system's process group (router: supervisor,
listeners, dispatcher, workers, janitor; Orthanc and the naive forwarder: one process,
all threads; from /proc), from just before the send to the last arrival, per instance;
the router's per-process split is printed under the table.

Prints one Markdown table per corpus (median of the successful repetitions, min-max):
instances/s and MB/s, the ratios the performance issue sets targets for (router / no
router; router / Orthanc; router / naive), each the median of the ratios paired within
a repetition, and CPU ms per instance with router / naive and router / Orthanc. Progress
goes to stderr; ``--results`` appends one JSON line per run. Loopback only, free ports
at run time, every process stopped by its process group. Not part of the test command;
figures on a shared 2-core VM are noisy: report medians of >= 5 repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
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
)
from suts import ROUTER, NaiveForwarder, Node, Orthanc, Router, group_cpu, orthanc_missing

# Per process: two runs at once (several sessions share this machine) never share a
# run directory. Emptied as runs succeed; a failed run's directory is kept for its logs.
DEFAULT_WORK = Path(f"/tmp/dicom-router-bench/e2e-{os.getpid()}")
CASES = ("none", "router", "orthanc", "naive", "router+dead")
DEFAULT_CASES = "none,router,orthanc,naive"
POLL_S = 0.02
SIZE_SLACK = 1024  # a sink file differs from its source only in the meta header (~+6 B)
# The performance issue's targets: router / no router and router / Orthanc (throughput,
# per corpus), router CPU / naive forwarder CPU per instance (tiny).
TARGET_NONE = {"tiny": 0.5, "ct": 0.45, "big": 0.5}
TARGET_ORTHANC = {"tiny": 12.0, "ct": 3.5, "big": 2.5}
TARGET_CPU_NAIVE = {"tiny": 0.5}


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
    send_s: float  # the last storescu's exit
    arrival_s: float  # newest sink file's mtime, relative to the spawn of storescu
    detected_s: float  # when the poll saw the last one complete
    total_s: float
    sender_rc: int
    sender_cpu_s: float  # all storescu processes
    sink_cpu_s: float
    cpu_s: float  # the system under test, every process
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    senders: int = 1
    label: str = ""  # a configuration (bench_scaling.py)
    foreign: int = 0  # sink files not from the corpus (another process hit the port)
    loadavg: float = 0.0
    host_cpu: dict[str, float] = field(default_factory=dict)  # /proc/stat shares, window
    time: float = 0.0


# ------------------------------------------------------------------ processes


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


def start_system(case: str, run_dir: Path, sink_port: int, args: argparse.Namespace) -> Node:
    logs = run_dir / "logs"
    if case == "orthanc":
        return Orthanc(run_dir / "orthanc", logs / "orthanc.log", sink_port)
    if case == "naive":
        return NaiveForwarder(logs / "naive.log", sink_port)
    return Router(
        run_dir / "data",
        logs / "serve.log",
        sink_port,
        workers=args.workers,
        listeners=args.listeners,
        max_associations=args.max_associations,
        dead=case == "router+dead",
    )


def _sink_cpu(sink: Receiver) -> float:
    """CPU seconds of the sink's process group: with --fork, storescp's children do the
    work (reaped ones count in the parent's children's time)."""
    return sum(group_cpu(sink.popen.pid).values())


def _host_ticks() -> list[int]:
    """The machine's CPU ticks: user nice system idle iowait irq softirq steal."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def _host_shares(t0: list[int], t1: list[int]) -> dict[str, float]:
    d = [b - a for a, b in zip(t0, t1, strict=True)]
    total = sum(d) or 1
    busy = d[0] + d[1] + d[2] + d[5] + d[6]
    return {
        "busy": round(busy / total, 3),
        "iowait": round(d[4] / total, 3),
        "idle": round(d[3] / total, 3),
        "steal": round(d[7] / total, 3),
    }


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


Sampler = Callable[[float, Node | None, int], None]  # (t, system, instances at the sink)


def one_run(
    case: str,
    corpus: Corpus,
    rep: int,
    work: Path,
    args: argparse.Namespace,
    *,
    sources: list[Path] | None = None,
    label: str = "",
    sampler: Sampler | None = None,
) -> Run:
    """One timed run of ``case``: storescu (one per directory of ``sources``, all at
    once; default: the corpus in one association) -> system -> sink. ``sampler(t, node,
    arrived)`` is called at every poll (every ~20 ms) while the run lasts."""
    sources = sources or [corpus.directory]
    name = f"{corpus.shape}-{rep}-{case}" + (f"-{label}" if label else "")
    run_dir = work / name.replace("/", "_").replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    sink_dir, logs = run_dir / "sink", run_dir / "logs"
    nan = float("nan")
    run = Run(case, corpus.shape, rep, False, "", 0, corpus.count, corpus.bytes,
              nan, nan, nan, nan, -1, nan, nan, nan, senders=len(sources),
              label=label)  # fmt: skip
    sink_port = free_port()
    sink: Receiver | None = None
    node: Node | None = None
    senders: list[subprocess.Popen[bytes]] = []
    try:
        fork = args.max_associations > 1 or getattr(args, "sink_fork", False)
        sink = start_receiver(_sink_system(fork), sink_port, sink_dir, logs)
        if case == "none":
            feed_port, feed_aet = sink_port, AET
        else:
            node = start_system(case, run_dir, sink_port, args)
            feed_port, feed_aet = node.port, node.aet
        for source in sources:
            _warm(source)
        os.sync()
        time.sleep(0.3)
        run.loadavg = float(Path("/proc/loadavg").read_text().split()[0])
        watch = SinkWatch(sink_dir, corpus.count, corpus.min_size)
        sink_cpu0 = _sink_cpu(sink)
        cpu0 = node.cpu() if node else {}
        host0 = _host_ticks()
        t0_wall = time.time()
        t0 = time.perf_counter()
        for i, source in enumerate(sources):
            log = logs / ("storescu.log" if len(sources) == 1 else f"storescu-{i:02d}.log")
            senders.append(_spawn(_storescu(feed_port, feed_aet, source), NODELAY_ENV, log))
        pending = list(senders)
        run.sender_rc, run.sender_cpu_s = 0, 0.0
        detected = None
        progress, progress_at = 0, 0.0
        while True:
            now = time.perf_counter() - t0
            for sender in list(pending):
                if not _wait_exited(sender.pid, 0):
                    continue
                _killpg(sender.pid, signal.SIGKILL)  # anything it left in its group
                _, status, usage = os.wait4(sender.pid, 0)
                sender.returncode = rc = os.waitstatus_to_exitcode(status)
                run.sender_cpu_s += usage.ru_utime + usage.ru_stime
                pending.remove(sender)
                if rc != 0 and not run.error:
                    run.sender_rc = rc
                    run.error = f"storescu exit code {rc}"
                if not pending:
                    run.send_s = now
            if run.error:
                break
            if detected is None and watch.poll():
                detected = now
            if sampler is not None:
                sampler(now, node, len(watch.complete))
            if len(watch.complete) > progress:
                progress, progress_at = len(watch.complete), now
            elif now - progress_at > args.stall:
                run.error = f"stalled: no new instance at the sink for {args.stall:.0f} s"
                break
            if detected is not None and not pending:
                break
            if node is not None and not node.alive():
                run.error = f"the {node.name} exited"
                break
            if not sink.alive():
                run.error = "the sink exited"
                break
            if now > args.timeout:
                run.error = f"timed out after {args.timeout:.0f} s"
                break
            time.sleep(POLL_S)
        run.host_cpu = _host_shares(host0, _host_ticks())
        if node is not None:
            cpu1 = node.cpu()
            roles = node.roles()
            by_role: dict[str, float] = {}
            for pid, seconds in cpu1.items():
                role = roles.get(pid, "other")
                by_role[role] = by_role.get(role, 0.0) + seconds - cpu0.get(pid, 0.0)
            run.cpu_by_process = {
                k: round(v, 3) for k, v in sorted(by_role.items()) if k != "other" or v >= 0.001
            }
            run.cpu_s = sum(by_role.values())
        run.sink_cpu_s = _sink_cpu(sink) - sink_cpu0
        run.instances = len(watch.complete)
        if watch.complete:
            run.arrival_s = watch.last_mtime() - t0_wall
        if detected is not None and not run.error:
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
        for sender in senders:
            if sender.returncode is None:
                _killpg(sender.pid, signal.SIGKILL)
                sender.wait()
        if node is not None:
            node.stop()
        if sink is not None:
            sink.stop()
    if not run.error:
        stored, _ = count_instances(sink_dir)
        complete = _complete_files(sink_dir, corpus.min_size)
        # Files smaller than any corpus file are not ours: on a shared machine another
        # process can connect to a port this run chose a moment after it was free.
        run.foreign = stored - complete
        if complete != corpus.count:
            run.error = f"{complete} of {corpus.count} instances in the sink"
    run.ok = not run.error
    run.time = time.time()
    if run.error:
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            run.error += f"\n  {log}:\n" + _indent(_log_tail(log, 15))
    elif not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


def _complete_files(directory: Path, min_size: int) -> int:
    threshold = max(0, min_size - SIZE_SLACK)
    with os.scandir(directory) as it:
        return sum(
            1
            for e in it
            if not e.name.startswith(".") and e.is_file() and e.stat().st_size >= threshold
        )


def progress_line(run: Run, corpus: Corpus) -> str:
    where = f"{corpus.shape} rep {run.rep} {run.case}" + (f" [{run.label}]" if run.label else "")
    if not run.ok:
        return f"{where}: FAILED {run.error}"
    cpu = f", CPU {run.cpu_s / corpus.count * 1000:.2f} ms/inst" if run.case != "none" else ""
    foreign = f", {run.foreign} foreign files at the sink" if run.foreign else ""
    return (
        f"{where}: send {run.send_s:.2f} s, last arrival {run.arrival_s:.2f} s, "
        f"{_rate(corpus.count / run.total_s)} inst/s, "
        f"{_rate(corpus.bytes / run.total_s / 1e6)} MB/s{cpu} (load {run.loadavg:.1f}{foreign})"
    )


def save(run: Run, results: Path | None) -> None:
    if results is None:
        return
    record = {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(run).items()}
    with results.open("a") as f:
        f.write(json.dumps(record) + "\n")


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


def _paired(
    runs: list[Run], corpus: Corpus, a: str, b: str, key: Callable[[Run], float]
) -> list[float]:
    """key(a) / key(b) for every repetition where both succeeded."""
    by_rep: dict[int, dict[str, Run]] = {}
    for r in runs:
        if r.corpus == corpus.shape and r.ok:
            by_rep.setdefault(r.rep, {})[r.case] = r
    return [key(c[a]) / key(c[b]) for c in by_rep.values() if a in c and b in c and key(c[b])]


def _verdict(value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    return f"{value:.2f} {'>=' if at_least else '<='} {target:g}: {'met' if met else 'MISSED'}"


def corpus_table(runs: list[Run], corpus: Corpus, cases: list[str]) -> str:
    shape = corpus.shape
    size = corpus.bytes / corpus.count / 1e3
    head = ["case", "ok", "send s", "last arrival s", "ack->arrival s", "inst/s", "MB/s",
            "router / this (target)", "CPU ms/inst", "router CPU / this (target)"]  # fmt: skip
    lines = [
        f"### {shape} ({corpus.count} x {size:,.0f} KB, {corpus.bytes / 1e6:,.1f} MB)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    notes: list[str] = []
    verdicts: list[str] = []
    rate_targets = {"none": TARGET_NONE, "orthanc": TARGET_ORTHANC}
    names = {"none": "no router", "orthanc": "Orthanc", "naive": "naive"}
    for case in cases:
        mine = [r for r in runs if (r.case, r.corpus) == (case, shape)]
        good = [r for r in mine if r.ok]
        ratio, cpu_ratio = "-", "-"
        if case != "router" and "router" in cases:
            paired = _paired(runs, corpus, "router", case, lambda r: 1 / r.total_s)
            target = rate_targets.get(case, {}).get(shape)
            if paired:
                ratio = _med(paired) + (f" (>= {target:g})" if target else "")
                if target and case in names:
                    med = statistics.median(paired)
                    verdicts.append(f"router / {names[case]} {_verdict(med, target, True)}")
            if case != "none":
                paired_cpu = _paired(runs, corpus, "router", case, lambda r: r.cpu_s)
                target = TARGET_CPU_NAIVE.get(shape) if case == "naive" else None
                if paired_cpu:
                    cpu_ratio = _med(paired_cpu) + (f" (<= {target:g})" if target else "")
                    if target:
                        med = statistics.median(paired_cpu)
                        verdicts.append(f"router CPU / naive CPU {_verdict(med, target, False)}")
        cpu = [r.cpu_s / corpus.count * 1000 for r in good if case != "none"]
        cells = [
            case,
            f"{len(good)}/{len(mine)}",
            _med([r.send_s for r in good]),
            _med([r.arrival_s for r in good]),
            _med([r.arrival_s - r.send_s for r in good], "{:+.2f}".format, " .. "),
            _med([corpus.count / r.total_s for r in good], _rate),
            _med([corpus.bytes / r.total_s / 1e6 for r in good], _rate),
            ratio,
            _med(cpu, "{:.3g}".format),
            cpu_ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for r in mine:
            if not r.ok:
                notes.append(f"- {case} rep {r.rep} failed: {r.error.splitlines()[0]}")
            if r.foreign:
                notes.append(f"- {case} rep {r.rep}: {r.foreign} foreign files at the sink")
        if good and case != "none":
            split: dict[str, list[float]] = {}
            for r in good:
                for role, seconds in r.cpu_by_process.items():
                    split.setdefault(role, []).append(seconds / corpus.count * 1000)
            parts = ", ".join(
                f"{role} {statistics.median(v):.2f}" for role, v in sorted(split.items())
            )
            sink_cpu = statistics.median(r.sink_cpu_s for r in good) / corpus.count * 1000
            notes.append(f"- {case}: CPU ms/inst by process: {parts}; sink {sink_cpu:.2f}")
    if "router+dead" in cases and "router" in cases:
        paired = _paired(runs, corpus, "router+dead", "router", lambda r: 1 / r.total_s)
        if paired:
            notes.append(f"- router+dead / router, instances/s: {_med(paired)}")
    if verdicts:
        notes.insert(0, "- targets: " + "; ".join(verdicts))
    return "\n".join([*lines, "", *notes])


def table(runs: list[Run], corpora: list[Corpus], cases: list[str]) -> str:
    return "\n\n".join(corpus_table(runs, corpus, cases) for corpus in corpora)


# ------------------------------------------------------------------ main


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options bench_scaling.py shares."""
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument(
        "--stall",
        type=float,
        default=60.0,
        help="give a run up when no new instance reaches the sink for this long (seconds)",
    )
    parser.add_argument("--results", type=Path, help="append one JSON line per run")
    parser.add_argument("--corpus-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--keep", action="store_true", help="keep run directories and logs")


def check_tools(parser: argparse.ArgumentParser) -> None:
    if not Path(ROUTER).exists():
        parser.error(f"{ROUTER} not found: run with the project's virtual environment")
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"DCMTK {tool} not found (apt-get install dcmtk)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", default="tiny,ct,big")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"a subset of {','.join(CASES)} (in that order)"
    )
    parser.add_argument("--dead-destinations", action="store_true", help="add router+dead")
    parser.add_argument("--workers", type=int, help="serve --workers (default: the node's)")
    parser.add_argument("--listeners", type=int, help="serve --listeners (default: the node's)")
    parser.add_argument(
        "--max-associations",
        type=int,
        default=1,
        help="per destination (default 1; > 1 runs the sink storescp with --fork)",
    )
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    add_common_options(parser)
    args = parser.parse_args(argv)
    shapes = args.corpora.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown corpus shape(s): {', '.join(unknown)}")
    wanted = set(args.cases.split(",")) | ({"router+dead"} if args.dead_destinations else set())
    if wanted - set(CASES):
        parser.error(f"--cases: unknown {', '.join(sorted(wanted - set(CASES)))}")
    cases = [c for c in CASES if c in wanted]
    check_tools(parser)
    if "orthanc" in cases and (missing := orthanc_missing()):
        sys.exit(f"bench_e2e: {missing}")
    os.environ.update(NODELAY_ENV)  # every DCMTK process, echoscu's readiness checks too
    corpora = [ensure_corpus(shape, args.corpus_root) for shape in shapes]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    load0 = Path("/proc/loadavg").read_text().split()[0]
    runs: list[Run] = []
    for corpus in corpora:
        for rep in range(1, args.reps + 1):
            for case in cases:
                run = one_run(case, corpus, rep, args.work_dir, args)
                runs.append(run)
                print(progress_line(run, corpus), file=sys.stderr, flush=True)
                save(run, args.results)
    settings = [
        f"router workers {args.workers if args.workers is not None else 'default'}",
        f"listeners {args.listeners if args.listeners is not None else 'default'}",
        f"max-associations {args.max_associations}",
        f"reps {args.reps}",
        f"load average at start {load0}",
    ]
    print(f"## End to end, DCMTK storescu -> system -> DCMTK storescp ({', '.join(settings)})\n")
    print(table(runs, corpora, cases))
    with contextlib.suppress(OSError):
        args.work_dir.rmdir()  # only if empty: no failed run kept there
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
