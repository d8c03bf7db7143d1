"""On-demand crash suite (issue #6 item 7, catalogue FI-22 without the proxy toxics):
random SIGKILLs of EACH process type — listener, dispatcher, worker and the supervisor
(``serve``) — while 10,000 instances are sent and forwarded to two DCMTK storescp
destinations; afterwards every acknowledged instance is at both destinations (lost must
be 0), no job is leased, dead or pending, and the figures are printed: kills per type,
instances acknowledged, lost, delivered more than once.

    .venv-dev/bin/python tests/soak/crash_suite.py [--instances 10000] [--kills-each 200]
        [--seed N] [--work-dir DIR] [--results FILE.json]
    .venv-dev/bin/python -m pytest -s tests/soak/crash_suite.py   (the same, full size)

Full size by default; ``DICOM_ROUTER_CRASH_INSTANCES`` / ``DICOM_ROUTER_CRASH_KILLS_EACH``
/ ``DICOM_ROUTER_CRASH_SEED`` change it under pytest. The short version (20 kills during
1,000 instances) is tests/e2e/test_forwarding_crash.py, in the test command; both use
tests/e2e/crash_support.py. Kills here come faster than there (0.1-0.5 s apart, a child
killed after 0.2-2 s up, up to three quick kills of one child in a row: restart pauses of
0.5, 1, 2 s), so that 800 kills fit in well under an hour on two cores.

The node answers to an AE title of the run's own, and every association is checked to
have been accepted by a process of our serve (a process of another run that shares or
took the port during a restart gap neither acknowledges nor counts). The work directory
keeps ``acknowledged.jsonl`` (each association and each success, wall-clock time and our
local port as serve.log names the peer), ``unrecorded.txt`` (store files without a row
that restarts of serve found), ``kills.txt`` and, if anything is lost,
``lost-trace.json`` (per lost UID: instance and job rows, spool file, audit records,
serve.log lines around its acknowledgement).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from crash_support import DESTINATIONS, TARGETS, CrashRun, StoreSCP, run_crashes

KILLER = {
    "gap": (0.1, 0.5),
    "uptime": (0.2, 2.0),
    "quick_in_a_row": 3,
    "orphan_wait": 2.0,
    "wait_for_all": False,
    "start_timeout": 300.0,  # serve on a loaded machine, its spool growing
}


def crash_suite(
    work_dir: Path,
    instances: int,
    kills_each: int,
    seed: int,
    stop_kills: threading.Event | None = None,
    send_seconds: float | None = None,
) -> CrashRun:
    scps = [StoreSCP(work_dir, name) for name in DESTINATIONS]
    try:
        for scp in scps:
            scp.start()
        return run_crashes(
            work_dir,
            scps,
            instances=instances,
            counts=dict.fromkeys(TARGETS, kills_each),
            seed=seed,
            # Sending spread over send_seconds (then kills may lag behind it), or
            # held back to the kills (12.5 instances per kill at full size).
            pace_per_kill=(send_seconds or 0.2 * 4 * kills_each) / (4 * kills_each),
            hold_to_kills=send_seconds is None,
            send_timeout=3 * 3600.0,
            drain_timeout=600.0,
            killer_options=KILLER,
            progress_every=25,
            stop_kills=stop_kills,
        )
    finally:
        for scp in scps:
            scp.stop()


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds (the machine is shared)."""

    def __init__(self, every: float = 30.0) -> None:
        super().__init__(name="load", daemon=True)
        self.every = every
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self.stop.wait(self.every):
                return

    def figures(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "mean": round(sum(s) / len(s), 1), "max": max(s)}


def _summary(run: CrashRun, seconds: float, load: dict[str, float]) -> dict[str, object]:
    return {
        "seed": run.seed,
        "instances": run.instances,
        "kills_planned": run.planned,
        "seconds": round(seconds, 1),
        "kills_by_type": dict(run.by_type),
        "worker_kills_holding_leases": sum(1 for k in run.kills if k.leases),
        "supervisor_kills_children_outlived": sum(bool(s) for s in run.orphans),
        "acknowledged": len(run.acknowledged),
        "lost": {name: len(uids) for name, uids in run.lost.items()},
        "duplicate_copies": run.duplicates,
        "instances_delivered_more_than_once": run.duplicated_instances,
        "jobs": run.states,
        "redelivered_jobs": run.redelivered,
        "refusals": run.refusals,
        "failed_rounds": run.failed_rounds,
        "sent_at": round(run.sent_at, 1),
        "settled_at": round(run.drained_at, 1),
        "spool_leftovers_before_restart": list(run.leftovers),
        "aet": run.aet,
        "associations_accepted_by_another_process": len(run.foreign),
        "associations_rejected": len(run.rejections),
        "unrecorded_files_before_serve_restarts": len(run.unrecorded),
        "unrecorded_files_of_instances_acknowledged_before": len(run.unrecorded_acknowledged),
        "lost_traced": [
            {
                "uid": t["uid"],
                "instance_rows": len(t["instance_rows"]),  # type: ignore[arg-type]
                "job_rows": len(t["job_rows"]),  # type: ignore[arg-type]
                "spool_files_exist": t["spool_files_exist"],
                "audit_instance_received": t["audit_instance_received"],
            }
            for t in run.traces[:50]
        ],
        "load_average_1min": load,
    }


def _run(
    work_dir: Path,
    instances: int,
    kills_each: int,
    seed: int,
    stop_kills: threading.Event | None = None,
    send_seconds: float | None = None,
) -> tuple[CrashRun, dict[str, object]]:
    print(f"seed {seed}: {instances} instances, {kills_each} kills of each of {TARGETS}")
    began = time.monotonic()
    sampler = LoadSampler()
    sampler.start()
    try:
        run = crash_suite(work_dir, instances, kills_each, seed, stop_kills, send_seconds)
    finally:
        sampler.stop.set()
    summary = _summary(run, time.monotonic() - began, sampler.figures())
    (work_dir / "unrecorded.txt").write_text(
        "".join(
            f"{at:.3f} {name} {uid} acknowledged at {run.acked_at.get(uid, (0.0,))[0]:.3f}\n"
            for at, name, uid in run.unrecorded
        )
    )
    print(run.report(each_kill=False))
    print(json.dumps(summary, indent=2))
    return run, summary


def test_crash_suite(tmp_path: Path) -> None:
    instances = int(os.environ.get("DICOM_ROUTER_CRASH_INSTANCES") or 10_000)
    kills_each = int(os.environ.get("DICOM_ROUTER_CRASH_KILLS_EACH") or 200)
    seed = int(
        os.environ.get("DICOM_ROUTER_CRASH_SEED") or random.SystemRandom().randrange(1 << 32)
    )
    run, _ = _run(tmp_path, instances, kills_each, seed)
    run.check(set(TARGETS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--kills-each", type=int, default=200)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 32))
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--results", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--kill-deadline",
        type=float,
        help="stop killing after this many seconds (then send the rest and check);"
        " SIGUSR1 does the same at any time",
    )
    parser.add_argument(
        "--send-seconds",
        type=float,
        help="spread the sending over this many seconds instead of holding it back to the"
        " kills (with --kill-deadline on a slow machine)",
    )
    args = parser.parse_args()
    logging.getLogger("protocol").setLevel(logging.ERROR)  # the killed associations
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="crash-suite-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    stop_kills = threading.Event()
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: stop_kills.set())
    if args.kill_deadline:
        timer = threading.Timer(args.kill_deadline, stop_kills.set)
        timer.daemon = True
        timer.start()
    run, summary = _run(
        work_dir, args.instances, args.kills_each, args.seed, stop_kills, args.send_seconds
    )
    kill_lines = [
        f"{k.at:8.1f} s {k.target:<11} pid {k.pid:<7} up {k.uptime:5.1f} s {k.detail}"
        for k in run.kills
    ]
    (work_dir / "kills.txt").write_text("\n".join(kill_lines) + "\n")
    if args.results:
        args.results.write_text(json.dumps(summary, indent=2) + "\n")
    try:
        run.check(set(TARGETS))
    except AssertionError as exc:
        print(f"FAILED: {str(exc)[:2000]}")
        return 1
    if len(run.kills) < run.planned:
        print(f"kills stopped early: {len(run.kills)} of {run.planned}")
        return 2
    print("passed: no acknowledged instance lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
