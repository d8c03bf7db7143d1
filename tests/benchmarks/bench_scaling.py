"""Benchmark: how the router's end-to-end throughput scales with worker processes,
listener processes and concurrent senders; and (--rss) whether every router process
keeps a flat resident memory over a 10,000-instance run.

    .venv/bin/python tests/benchmarks/bench_scaling.py [--corpora tiny[,ct]] [--reps 3]
        [--workers 1,2,4] [--listeners 1,2] [--senders 1,4,16] [--max-associations 4]
        [--no-baseline] [--timeout S] [--stall S] [--results FILE.jsonl] [--keep]
    .venv/bin/python tests/benchmarks/bench_scaling.py --rss [--rss-copies 10]
        [--rss-senders 1] [--workers W] [--listeners L]

Scaling: every combination of ``serve --workers W --listeners L`` and S concurrent
senders, interleaved per repetition (rep 1: every combination, rep 2: ...), each a run
of bench_e2e.py's machinery (fresh sink, fresh data directory, TCP_NODELAY=1, ready on
C-ECHO, the sink polled until every instance is there). With S senders, S DCMTK
``storescu +sd +r`` processes start at once, each with its own association and its own
share of the corpus: the files dealt round robin into S directories (hard links), so
the total (1,000 tiny instances) is the same for every S. The sink is a ``storescp
--fork`` in every run (one process per association) and the destination allows
--max-associations (default 4) associations. Unless --no-baseline, "none" runs (the S
senders straight into the sink) give the path's own limit for each S.

Prints one Markdown table (median of >= 3 repetitions, min-max): instances/s, the
ratio to the same W/L with one sender, the router's CPU ms per instance split by
process kind (listeners, dispatcher, workers, the rest), the CPU cores the router used
(its CPU seconds / wall seconds), the sink's and the senders' CPU ms per instance, and
the whole machine's busy and iowait shares over the run (/proc/stat). Reading it:
host busy near 100 % means the 2 cores are the limit (CPU); iowait with idle cores
means fsync; a sink (storescp) near one core, or the "none" row near the router's
figure, means the destination.

--rss: one run of the tiny corpus copied --rss-copies times (default 10: 10,000
instances; each copy under its own study, series and SOP Instance UIDs, generated
once next to the corpus), sent by --rss-senders storescu processes (default 1), with
the resident set size of every process of the router's group sampled every second.
Prints, per process: RSS at the start of the send, after 10 % of the instances
arrived, the maximum, at the end, and end minus the 10 % figure (what a leak would
show; the first 10 % are warm-up: caches, pools, imports).

Not part of the test command; figures on a shared 2-core VM are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import (
    Run,
    _med,
    _rate,
    add_common_options,
    check_tools,
    one_run,
    progress_line,
    save,
)
from corpus import Corpus, bench_uid, ensure_corpus
from peers import NODELAY_ENV
from suts import Node, proc_name

# Per process: two runs at once (several sessions share this machine) never share a
# run directory. Emptied as runs succeed; a failed run's directory is kept for its logs.
DEFAULT_WORK = Path(f"/tmp/dicom-router-bench/scaling-{os.getpid()}")


# ------------------------------------------------------------------ corpora


def shares(corpus: Corpus, count: int, root: Path) -> list[Path]:
    """``count`` directories that together hold every file of ``corpus`` once (hard
    links, dealt round robin in name order); made again when they do not match."""
    if count == 1:
        return [corpus.directory]
    base = root / "shares" / f"{corpus.shape}-{count}"
    dirs = [base / f"{i:02d}" for i in range(count)]
    files = sorted(p for p in corpus.directory.iterdir() if p.is_file())
    if all(d.is_dir() for d in dirs) and sum(len(os.listdir(d)) for d in dirs) == len(files):
        return dirs
    shutil.rmtree(base, ignore_errors=True)
    for d in dirs:
        d.mkdir(parents=True)
    for i, path in enumerate(files):
        target = dirs[i % count] / path.name
        try:
            os.link(path, target)
        except OSError:  # another file system
            shutil.copyfile(path, target)
    return dirs


def copies(corpus: Corpus, times: int, root: Path) -> Corpus:
    """``corpus`` ``times`` over, copy k under its own Study, Series and SOP Instance
    UIDs (``2.25.<uuid5>`` of the copy number and the original UID), generated once."""
    import pydicom  # only here: the scaling runs need no decoding

    shape = f"{corpus.shape}-x{times}"
    directory = root / shape
    manifest = root / f"{shape}.manifest.json"
    with_sizes = None
    try:
        record = json.loads(manifest.read_text())
        sizes = [p.stat().st_size for p in directory.iterdir()]
        if record.get("count") == len(sizes) == corpus.count * times:
            with_sizes = sizes
    except (OSError, ValueError):
        pass
    if with_sizes is None:
        print(f"corpus: writing {shape} in {directory} ...", file=sys.stderr, flush=True)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        with_sizes = []
        keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        for path in sorted(corpus.directory.iterdir()):
            ds = pydicom.dcmread(path)
            original = {keyword: str(getattr(ds, keyword)) for keyword in keywords}
            for k in range(times):
                for keyword in keywords:
                    setattr(ds, keyword, bench_uid("copy", k, original[keyword]))
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                out = directory / f"{k:02d}-{path.name}"
                ds.save_as(out, enforce_file_format=True)
                with_sizes.append(out.stat().st_size)
        manifest.write_text(json.dumps({"count": len(with_sizes), "bytes": sum(with_sizes)}))
    return Corpus(shape, directory, len(with_sizes), sum(with_sizes), min(with_sizes),
                  max(with_sizes))  # fmt: skip


# ------------------------------------------------------------------ scaling


@dataclass(frozen=True)
class Config:
    workers: int
    listeners: int
    senders: int
    baseline: bool = False  # "none": the senders straight into the sink

    @property
    def label(self) -> str:
        if self.baseline:
            return f"none s{self.senders}"
        return f"w{self.workers} l{self.listeners} s{self.senders}"


def _kind(role: str) -> str:
    base = role.rsplit("-", 1)[0] if role[-1:].isdigit() else role
    return base if base in ("listener", "dispatcher", "worker") else "rest"


def _per_inst(values: list[float], corpus: Corpus) -> str:
    return _med([v / corpus.count * 1000 for v in values], "{:.2f}".format)


def _kind_cpu(good: list[Run], kind: str, corpus: Corpus) -> str:
    return _per_inst(
        [sum(s for role, s in r.cpu_by_process.items() if _kind(role) == kind) for r in good],
        corpus,
    )


def scaling_table(runs: list[Run], corpus: Corpus, configs: list[Config]) -> str:
    head = ["W", "L", "senders", "ok", "inst/s", "/ 1 sender", "router CPU ms/inst",
            "listeners", "dispatcher", "workers", "rest", "router cores", "sink ms/inst",
            "senders ms/inst", "host busy", "host iowait"]  # fmt: skip
    size = corpus.bytes / corpus.count / 1e3
    lines = [
        f"### {corpus.shape} ({corpus.count} x {size:,.0f} KB)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    notes: list[str] = []
    rates: dict[Config, float] = {}
    for config in configs:
        good = [r for r in runs if r.label == config.label and r.corpus == corpus.shape and r.ok]
        if good:
            rates[config] = statistics.median(corpus.count / r.total_s for r in good)
    for config in configs:
        mine = [r for r in runs if r.label == config.label and r.corpus == corpus.shape]
        good = [r for r in mine if r.ok]
        one = Config(config.workers, config.listeners, 1, config.baseline)
        ratio = "-"
        if config.senders != 1 and config in rates and rates.get(one):
            ratio = f"{rates[config] / rates[one]:.2f}"

        router = not config.baseline
        cells = [
            "-" if config.baseline else str(config.workers),
            "-" if config.baseline else str(config.listeners),
            str(config.senders),
            f"{len(good)}/{len(mine)}",
            _med([corpus.count / r.total_s for r in good], _rate),
            ratio,
            _per_inst([r.cpu_s for r in good], corpus) if router else "-",
            _kind_cpu(good, "listener", corpus) if router else "-",
            _kind_cpu(good, "dispatcher", corpus) if router else "-",
            _kind_cpu(good, "worker", corpus) if router else "-",
            _kind_cpu(good, "rest", corpus) if router else "-",
            _med([r.cpu_s / r.total_s for r in good]) if router else "-",
            _per_inst([r.sink_cpu_s for r in good], corpus),
            _per_inst([r.sender_cpu_s for r in good], corpus),
            _med([r.host_cpu.get("busy", 0) * 100 for r in good], "{:.0f}%".format),
            _med([r.host_cpu.get("iowait", 0) * 100 for r in good], "{:.0f}%".format),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for r in mine:
            if not r.ok:
                notes.append(f"- {config.label} rep {r.rep} failed: {r.error.splitlines()[0]}")
    return "\n".join([*lines, "", *notes])


def run_scaling(args: argparse.Namespace) -> int:
    workers = [int(x) for x in args.workers.split(",")]
    listeners = [int(x) for x in args.listeners.split(",")]
    senders = [int(x) for x in args.senders.split(",")]
    configs = [Config(w, n, s) for w, n, s in itertools.product(workers, listeners, senders)]
    if args.baseline:
        configs = [Config(0, 0, s, baseline=True) for s in senders] + configs
    corpora = [ensure_corpus(shape, args.corpus_root) for shape in args.corpora.split(",")]
    runs: list[Run] = []
    load0 = Path("/proc/loadavg").read_text().split()[0]
    t_start = time.monotonic()
    for corpus in corpora:
        for rep in range(1, args.reps + 1):
            for config in configs:
                sources = shares(corpus, config.senders, args.corpus_root)
                ns = argparse.Namespace(**vars(args))
                ns.workers, ns.listeners = config.workers, config.listeners
                ns.sink_fork = True
                case = "none" if config.baseline else "router"
                run = one_run(case, corpus, rep, args.work_dir, ns, sources=sources,
                              label=config.label)  # fmt: skip
                runs.append(run)
                print(progress_line(run, corpus), file=sys.stderr, flush=True)
                save(run, args.results)
    minutes = (time.monotonic() - t_start) / 60
    print(
        f"## Router scaling, end to end (serve --workers W --listeners L, S concurrent "
        f"storescu each with a 1/S share of the corpus; destination max-associations "
        f"{args.max_associations}, sink storescp --fork; reps {args.reps}; load average at "
        f"start {load0}; {minutes:.0f} min)\n"
    )
    print("\n\n".join(scaling_table(runs, corpus, configs) for corpus in corpora))
    return 0 if all(r.ok for r in runs) else 1


# ------------------------------------------------------------------ resident memory


@dataclass
class RssSampler:
    """Every second: the RSS of each process of the router's group, by pid."""

    expected: int
    interval: float = 1.0
    last: float = -1e9
    series: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)  # t, n, kB
    names: dict[int, str] = field(default_factory=dict)

    def __call__(self, now: float, node: Node | None, arrived: int) -> None:
        if node is None or now - self.last < self.interval:
            return
        self.last = now
        roles = node.roles()
        for pid, kb in node.rss_kb().items():
            self.series.setdefault(pid, []).append((now, arrived, kb))
            if pid in roles:  # the supervisor's status file may name it only later
                self.names[pid] = roles[pid]
            elif pid not in self.names:
                self.names[pid] = proc_name(pid)

    def table(self) -> str:
        head = ["process", "pid", "samples", "start MiB", "at 10 % MiB", "max MiB", "end MiB",
                "end - at 10 % MiB"]  # fmt: skip
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for pid, samples in sorted(self.series.items(), key=lambda kv: self.names[kv[0]]):
            start, end = samples[0][2], samples[-1][2]
            warm = next((kb for _, n, kb in samples if n >= self.expected / 10), end)
            peak = max(kb for _, _, kb in samples)
            cells = [self.names[pid], str(pid), str(len(samples))] + [
                f"{kb / 1024:.1f}" for kb in (start, warm, peak, end)
            ]
            cells.append(f"{(end - warm) / 1024:+.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def run_rss(args: argparse.Namespace) -> int:
    base = ensure_corpus("tiny", args.corpus_root)
    corpus = copies(base, args.rss_copies, args.corpus_root)
    ns = argparse.Namespace(**vars(args))
    ns.workers = int(args.workers.split(",")[0]) if args.workers_given else None
    ns.listeners = int(args.listeners.split(",")[0]) if args.listeners_given else None
    ns.sink_fork = args.rss_senders > 1 or args.max_associations > 1
    sampler = RssSampler(corpus.count)
    sources = shares(corpus, args.rss_senders, args.corpus_root)
    run = one_run("router", corpus, 1, args.work_dir, ns, sources=sources, label="rss",
                  sampler=sampler)  # fmt: skip
    print(progress_line(run, corpus), file=sys.stderr, flush=True)
    save(run, args.results)
    settings = (
        f"workers {ns.workers or 'default'}, listeners {ns.listeners or 'default'}, "
        f"{args.rss_senders} sender(s), max-associations {args.max_associations}"
    )
    print(f"## Router resident memory over {corpus.count:,} instances ({settings})\n")
    if run.ok:
        print(
            f"{corpus.count:,} instances end to end in {run.total_s:.1f} s "
            f"({corpus.count / run.total_s:,.0f} inst/s), router CPU "
            f"{run.cpu_s / corpus.count * 1000:.2f} ms/inst\n"
        )
    else:
        print(f"FAILED: {run.error}\n")
    print(sampler.table())
    return 0 if run.ok else 1


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", default="tiny", help="tiny and/or ct")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", help="serve --workers values (default 1,2,4)")
    parser.add_argument("--listeners", help="serve --listeners values (default 1,2)")
    parser.add_argument("--senders", default="1,4,16", help="concurrent storescu processes")
    parser.add_argument("--max-associations", type=int, default=4, help="for the destination")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--rss", action="store_true", help="the resident-memory run instead")
    parser.add_argument("--rss-copies", type=int, default=10, help="tiny x N (default 10)")
    parser.add_argument("--rss-senders", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    add_common_options(parser)
    args = parser.parse_args(argv)
    args.workers_given, args.listeners_given = args.workers is not None, args.listeners is not None
    args.workers = args.workers or "1,2,4"
    args.listeners = args.listeners or "1,2"
    check_tools(parser)
    os.environ.update(NODELAY_ENV)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rc = run_rss(args) if args.rss else run_scaling(args)
    with contextlib.suppress(OSError):
        args.work_dir.rmdir()  # only if empty: no failed run kept there
    return rc


if __name__ == "__main__":
    sys.exit(main())
