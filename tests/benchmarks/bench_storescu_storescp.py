"""Benchmark: storescu -> storescp over loopback, ours against DCMTK and pynetdicom.

    .venv/bin/python tests/benchmarks/bench_storescu_storescp.py \\
        [--corpora tiny,ct,big] [--reps 3] [--warmup 0] [--systems ours,dcmtk,pynetdicom] \\
        [--results FILE.jsonl] [--corpus-root DIR] [--work-dir DIR] [--keep]

For each corpus (see corpus.py; generated once and cached under
/tmp/dicom-router-bench/corpus), each repetition runs every system in turn (rep 1: ours,
dcmtk, pynetdicom; rep 2: ...), so that drifting machine load hits all of them alike.
One run = a fresh receiver (see peers.py) writing into an empty directory, ``sync`` and
0.3 s of quiet, then the system's own sender sends the whole corpus in one association.
Time = wall time of the sending process from spawn to exit (interpreter start-up
included; every receiver writes the file before it answers, so exit means all stored).
A run counts only if the sender exits 0 and every instance is in the output directory
(files counted recursively). The receiver's CPU time over the run comes from /proc.

Prints a Markdown table on stdout (median of the successful repetitions, min-max,
instances/s and MB/s from the median, MB = 10^6 bytes of the corpus files, and for each
other system how many times longer it took than ours: > 1 means ours is faster), and
progress on stderr. ``--results`` appends one JSON line per run. Not part of the test
command; figures on a shared 2-core VM are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import DEFAULT_ROOT, SHAPES, Corpus, ensure_corpus
from peers import SYSTEMS, count_instances, free_port, run_sender, start_receiver

DEFAULT_WORK = Path("/tmp/dicom-router-bench/runs")


@dataclass
class Run:
    system: str
    corpus: str
    rep: int  # 0 = warm-up
    ok: bool
    wall_s: float
    sender_cpu_s: float
    receiver_cpu_s: float
    instances: int
    expected: int
    corpus_bytes: int
    received_bytes: int
    sender_rc: int
    error: str
    sender_argv: list[str]
    time: float


def one_run(system: str, corpus: Corpus, rep: int, work: Path, keep: bool) -> Run:
    sys_ = SYSTEMS[system]
    run_dir = work / f"{corpus.shape}-{system}-{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    out, logs = run_dir / "out", run_dir / "logs"
    port = free_port()
    error = ""
    receiver = start_receiver(sys_, port, out, logs)
    try:
        os.sync()
        time.sleep(0.3)
        cpu0 = receiver.cpu_seconds()
        result = run_sender(sys_, port, corpus.directory, logs)
        cpu1 = receiver.cpu_seconds()
        instances, received = count_instances(out)
        # Every receiver stores before it answers; allow a moment for a lagging rename.
        deadline = time.monotonic() + 2.0
        while instances < corpus.count and time.monotonic() < deadline:
            time.sleep(0.05)
            instances, received = count_instances(out)
        alive = receiver.alive()
    finally:
        receiver.stop()
    if result.timed_out:
        error = "sender timed out"
    elif result.rc != 0:
        error = f"sender exit code {result.rc}"
    elif instances != corpus.count:
        error = f"{instances} of {corpus.count} instances stored"
    elif not alive:
        error = "receiver died"
    if error:
        error += (
            f"\n  sender: {' '.join(result.argv)}\n  sender log ({result.log}):\n"
            + _indent(result.log_tail())
            + f"\n  receiver log ({receiver.log}):\n"
            + _indent(receiver.log_tail())
        )
    if not error and not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return Run(
        system=system,
        corpus=corpus.shape,
        rep=rep,
        ok=not error,
        wall_s=round(result.wall_s, 4),
        sender_cpu_s=round(result.cpu_s, 3),
        receiver_cpu_s=round(cpu1 - cpu0, 3),
        instances=instances,
        expected=corpus.count,
        corpus_bytes=corpus.bytes,
        received_bytes=received,
        sender_rc=result.rc,
        error=error,
        sender_argv=result.argv,
        time=time.time(),
    )


def failed_start(system: str, corpus: Corpus, rep: int, error: str) -> Run:
    return Run(
        system=system,
        corpus=corpus.shape,
        rep=rep,
        ok=False,
        wall_s=float("nan"),
        sender_cpu_s=0.0,
        receiver_cpu_s=0.0,
        instances=0,
        expected=corpus.count,
        corpus_bytes=corpus.bytes,
        received_bytes=0,
        sender_rc=-1,
        error=error,
        sender_argv=[],
        time=time.time(),
    )


def _json_safe(value: object) -> object:
    return None if isinstance(value, float) and value != value else value  # NaN -> null


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _fmt_s(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(runs: list[Run], corpora: list[Corpus], systems: list[str]) -> str:
    others = [s for s in systems if s != "ours"]
    head = [
        "system",
        "corpus",
        "median s (min-max)",
        "instances/s",
        "MB/s",
        "sender CPU s",
        "receiver CPU s",
        "ok",
    ]
    if "ours" in systems:
        head += [f"{s} / ours" for s in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for corpus in corpora:
        medians: dict[str, float] = {}
        rows = []
        for system in systems:
            mine = [r for r in runs if r.system == system and r.corpus == corpus.shape and r.rep]
            good = [r for r in mine if r.ok]
            walls = [r.wall_s for r in good]
            if walls:
                medians[system] = statistics.median(walls)
            rows.append((system, mine, good, walls))
        for system, mine, good, walls in rows:
            med = medians.get(system)
            cells = [
                system,
                f"{corpus.shape} ({corpus.count} x {corpus.bytes / corpus.count / 1e3:,.0f} KB)",
                _fmt_s(walls),
                _rate(corpus.count / med) if med else "-",
                _rate(corpus.bytes / 1e6 / med) if med else "-",
                f"{statistics.median(r.sender_cpu_s for r in good):.2f}" if good else "-",
                f"{statistics.median(r.receiver_cpu_s for r in good):.2f}" if good else "-",
                f"{len(good)}/{len(mine)}",
            ]
            if "ours" in systems:
                ours = medians.get("ours")
                for other in others:
                    theirs = medians.get(other)
                    cells.append(
                        f"{theirs / ours:.2f}x" if system == "ours" and ours and theirs else ""
                    )
            lines.append("| " + " | ".join(cells) + " |")
    if "ours" in systems and others:
        lines.append("")
        lines.append(
            "X / ours = X's median time divided by ours (> 1: ours is faster). Time = wall time"
            " of the sender from spawn to exit; MB = 10^6 bytes of corpus files."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", default="tiny,ct,big", help="comma-separated: tiny,ct,big")
    parser.add_argument("--systems", default="ours,dcmtk,pynetdicom", help="comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per system")
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds before them")
    parser.add_argument("--results", type=Path, help="append one JSON line per run here")
    parser.add_argument("--corpus-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--keep", action="store_true", help="keep output dirs of good runs")
    args = parser.parse_args(argv)

    corpora_names = [c for c in args.corpora.split(",") if c]
    systems = [s for s in args.systems.split(",") if s]
    for name in corpora_names:
        if name not in SHAPES:
            parser.error(f"unknown corpus {name!r}; known: {', '.join(SHAPES)}")
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"DCMTK's {tool} is not on PATH")

    corpora = [ensure_corpus(name, args.corpus_root) for name in corpora_names]
    work = args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    runs: list[Run] = []
    failures = 0
    for corpus in corpora:
        for rep in [0] * args.warmup + list(range(1, args.reps + 1)):
            for system in systems:
                try:
                    run = one_run(system, corpus, rep, work, args.keep)
                except RuntimeError as exc:  # receiver never became ready
                    run = failed_start(system, corpus, rep, str(exc))
                runs.append(run)
                label = f"rep {rep}" if rep else "warm-up"
                status = "ok" if run.ok else "FAILED"
                print(
                    f"{corpus.shape:5} {label:7} {system:11} {run.wall_s:8.3f} s "
                    f"{run.instances}/{corpus.count} {status}",
                    file=sys.stderr,
                    flush=True,
                )
                if not run.ok:
                    failures += 1
                    print(run.error, file=sys.stderr, flush=True)
                if args.results:
                    args.results.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.results, "a") as f:
                        record = {k: _json_safe(v) for k, v in asdict(run).items()}
                        f.write(json.dumps(record) + "\n")
    if not args.keep and not failures:
        shutil.rmtree(work, ignore_errors=True)
    print(table(runs, corpora, systems))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
