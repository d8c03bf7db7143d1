"""Catalogue B.4 at full size, on demand (not part of the test command; DESIGN §8).

    .venv-dev/bin/python tests/soak/soak_rx_full_size.py [--only RX-06,RX-07,RX-10,RX-15,RX-14]

The test command runs these scaled down (tests/e2e/catalogue/test_b4_resources.py);
here each runs at the catalogue's size against one ``dicom-router serve`` started for
the run (tests/e2e/conftest.py's NodeUnderTest, no workers), and prints figures:

* RX-06: 10,000 connect-then-close cycles: the listener's fds, RSS and threads before
  and after;
* RX-07: 10,000 associations aborted by the peer mid-C-STORE: the same, plus files left
  in spool/tmp and rows (both must be 0);
* RX-10: 100,000 C-STOREs over one association: RSS every 10,000, acknowledgements per
  second (a figure, not a pass mark);
* RX-14: 1,000,000 pending jobs put straight into the database: the seconds
  ``queue status --json`` takes (the rows are not spool files: run it last);
* RX-15: 6,000 CT instances (12,000 job notices: past the listener's ZeroMQ SNDHWM of
  10,000) with no dispatcher reading: every store acknowledged, the seconds per 500 at
  the start and at the end (the push never blocks the response), the jobs in the
  database.

Exit status 1 if a leak check fails (fds above baseline, temp files or unacknowledged
rows left); the figures are for reading.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests" / "e2e" / "catalogue"))

from harness import (  # noqa: E402
    COMMAND_LAST,
    CT_IMAGE,
    DATASET_LAST,
    DATASET_MORE,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    VERIFICATION,
    ProcessWatch,
    RawPeer,
    abort,
    c_store_rq,
    dataset_bytes,
    p_data_tf,
    parse_command_status,
    pdv,
    snapshot,
)
from pydicom.uid import generate_uid  # noqa: E402

from tests.e2e.conftest import NodeUnderTest  # noqa: E402

#: --scale (1.0 = the catalogue's sizes; e.g. 0.01 for a quick check of the script).
SCALE = [1.0]


def sized(n: int) -> int:
    return max(1, int(n * SCALE[0]))


CONTEXTS = ((1, VERIFICATION, (IMPLICIT_LE,)), (3, CT_IMAGE, (EXPLICIT_LE,)))


def listener_pids(node: NodeUnderTest) -> list[int]:
    import json

    state = json.loads((node.data_dir / "run" / "node.json").read_text())
    return [
        int(child["pid"])
        for name, child in state.get("children", {}).items()
        if name.startswith("listener")
    ]


def report(name: str, watch: ProcessWatch) -> bool:
    time.sleep(1.0)
    leaks = watch.leaks()
    for pid in watch.pids:
        now = snapshot(pid)
        before = watch.baseline[pid]
        print(
            f"{name}: listener {pid}: fds {sum(before.kinds.values())} -> "
            f"{sum(now.kinds.values())}, RSS {before.rss_kib} -> {now.rss_kib} KiB, "
            f"threads {before.threads} -> {now.threads}"
        )
    if leaks:
        print(f"{name}: FAIL fds above baseline: {leaks}")
    return not leaks


def store(peer: RawPeer, message_id: int, uid: str) -> int | None:
    peer.send(
        p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(message_id % 65536, CT_IMAGE, uid)))
        + p_data_tf(pdv(3, DATASET_LAST, dataset_bytes(uid)))
    )
    pdu_type, body = peer.recv_pdu(within=60)
    return parse_command_status(bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body)


def rx_06(node: NodeUnderTest) -> bool:
    import socket

    watch = ProcessWatch(listener_pids(node))
    started = time.monotonic()
    for _ in range(sized(10_000)):
        with socket.create_connection((HOST, node.port), timeout=30):
            pass
    print(f"RX-06: {sized(10_000)} connect/close cycles in {time.monotonic() - started:.1f} s")
    return report("RX-06", watch)


def rx_07(node: NodeUnderTest) -> bool:
    watch = ProcessWatch(listener_pids(node))
    rows = len(node.instances())
    started = time.monotonic()
    for _ in range(sized(10_000)):
        uid = generate_uid()
        data = dataset_bytes(uid)
        with RawPeer(HOST, node.port, timeout=30) as peer:
            peer.associate(contexts=CONTEXTS)
            peer.send(
                p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid)))
                + p_data_tf(pdv(3, DATASET_MORE, data[: len(data) // 2]))
                + abort(0, 0)
            )
            peer.expect_close(within=30)
    print(f"RX-07: {sized(10_000)} aborted C-STOREs in {time.monotonic() - started:.1f} s")
    ok = report("RX-07", watch)
    left, new_rows = node.tmp_files(), len(node.instances()) - rows
    print(f"RX-07: spool/tmp files left {len(left)}, new rows {new_rows}")
    return ok and not left and new_rows == 0


def rx_10(node: NodeUnderTest) -> bool:
    pids = listener_pids(node)
    watch = ProcessWatch(pids)
    started = time.monotonic()
    with RawPeer(HOST, node.port, timeout=60) as peer:
        peer.associate(contexts=CONTEXTS)
        for n in range(1, sized(100_000) + 1):
            status = store(peer, n, generate_uid())
            if status != 0:
                print(f"RX-10: FAIL store {n} answered {status}")
                return False
            if n % sized(10_000) == 0:
                rss = [snapshot(pid).rss_kib for pid in pids]
                rate = n / (time.monotonic() - started)
                print(f"RX-10: {n} stores, listener RSS {rss} KiB, {rate:.0f} acks/s")
        peer.release()
    return report("RX-10", watch)


def rx_15(node: NodeUnderTest) -> bool:
    """``serve --workers 0``: no dispatcher reads the listener's job notices."""
    uids = []
    times = []
    with RawPeer(HOST, node.port, timeout=60) as peer:
        peer.associate(contexts=CONTEXTS)
        block = time.monotonic()
        for n in range(1, sized(6_000) + 1):
            uid = generate_uid()
            if store(peer, n, uid) != 0:
                print(f"RX-15: FAIL store {n} not acknowledged")
                return False
            uids.append(uid)
            if n % sized(500) == 0:
                times.append(time.monotonic() - block)
                block = time.monotonic()
        peer.release()
    print(f"RX-15: seconds per {sized(500)} acknowledgements: {[round(t, 2) for t in times]}")
    jobs = node.query("select count(*) from jobs")[0][0]
    print(f"RX-15: {len(uids)} acknowledged ({2 * len(uids)} notices, SNDHWM 10,000); jobs {jobs}")
    return True


def rx_14(node: NodeUnderTest) -> bool:
    """1,000,000 pending jobs (a destination down for days), inserted straight into the
    node's SQLite; ``queue status --json`` must still answer (its time is printed)."""
    import sqlite3

    count = sized(1_000_000)
    with sqlite3.connect(node.db_path, timeout=60) as db:
        (dest,) = db.execute("select id from destinations order by id limit 1").fetchone()
        (base,) = db.execute("select coalesce(max(id), 0) from instances").fetchone()
        db.execute(
            "with recursive n(i) as (select 1 union all select i + 1 from n where i < ?)"
            " insert into instances (id, sop_instance_uid, sop_class_uid, transfer_syntax,"
            " calling_aet, called_aet, peer_address, spool_name, size, digest, state)"
            " select ? + i, '1.2.3.' || i, ?, ?, 'SOAK', 'ROUTER', '127.0.0.1',"
            " printf('%02x/%032x.dcm', i % 256, ? + i), 1, '', 'routed' from n",
            (count, base, CT_IMAGE, EXPLICIT_LE, base),
        )
        db.execute(
            "insert into jobs (instance_id, destination_id, state)"
            " select id, ?, 'pending' from instances where id > ?",
            (dest, base),
        )
    started = time.monotonic()
    result = node.cli("queue", "status", "--json", timeout=600)
    print(f"RX-14: queue status with {count} pending jobs: {time.monotonic() - started:.1f} s")
    print(f"RX-14: {result.stdout.strip()[:300]}")
    return True


CASES = {"RX-06": rx_06, "RX-07": rx_07, "RX-10": rx_10, "RX-15": rx_15, "RX-14": rx_14}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated case ids")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of full size")
    args = parser.parse_args()
    SCALE[0] = args.scale
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    ok = True
    with tempfile.TemporaryDirectory(prefix="soak-rx-") as tmp:
        node = NodeUnderTest(Path(tmp))
        node.configure()
        node.start()
        try:
            for case in chosen:
                ok = CASES[case](node) and ok
        finally:
            node.kill()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
