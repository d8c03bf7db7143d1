"""The listener end to end (the ingest issue; DESIGN §3 step 1, §6): a real
``dicom-router serve`` configured through the CLI, with DCMTK, pynetdicom and our own
client as senders.

Catalogue ids (research/reliability-catalogue.md): PT-01..PT-05 (path traversal through
the SOP Instance UID), RX-13 (spool disk full, free-space minimum); FI-01 is in
test_ingest_durability.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from ingest_support import (
    CT_IMAGE,
    EXPECTED_DESTINATIONS,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    MR_IMAGE,
    OUT_OF_RESOURCES,
    SECONDARY_CAPTURE,
    SPOOL_NAME,
    SUCCESS,
    assert_same_dataset,
    encode_dataset,
    is_failure,
    make_dataset,
    open_association,
    require_dcmtk,
    tree,
    write_part10,
)
from pydicom.dataset import Dataset, FileMetaDataset

if TYPE_CHECKING:
    from conftest import NodeFactory, NodeUnderTest

# The tests of what ingest writes to the database run on SQLite and PostgreSQL
# (tests/conftest.py db_backend); those of the spool and of paths (PT-*, RX-13), on SQLite.
ON_BOTH_DATABASES = pytest.mark.usefixtures("db_backend")

UNROUTED_WARNING = re.compile(r"WARNING router\.\S+: .*matched no rule", re.IGNORECASE)


def assert_ingested(
    node: NodeUnderTest, sent: Mapping[str, Dataset], calling_aet: str
) -> dict[str, dict[str, object]]:
    """Every instance in ``sent`` (all acknowledged) has exactly one row, the jobs its
    rules match, and its file: a router-generated name, a Part 10 file equal to what was
    sent element by element. Nothing else is in the spool."""
    rows = node.by_uid()
    assert set(rows) == set(sent), f"rows {sorted(rows)} != sent {sorted(sent)}"
    for uid, ds in sent.items():
        assert len(rows[uid]) == 1, rows[uid]
        row = rows[uid][0]
        expected = EXPECTED_DESTINATIONS[ds.Modality]
        assert row["calling_aet"] == calling_aet
        assert row["destinations"] == expected, (uid, row)
        assert row["job_states"] == ["pending"] * len(expected), row
        assert row["state"] == ("routed" if expected else "unrouted"), row
        name = str(row["spool_name"])
        assert SPOOL_NAME.match(name), name
        path = node.store_dir / name
        assert path.stat().st_size > 0
        assert_same_dataset(path, ds, str(row["transfer_syntax"]))
    node.assert_spool_matches_database()
    return {uid: rows[uid][0] for uid in rows}


def _pynetdicom_ae(*contexts: tuple[str, str]) -> object:
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, transfer_syntax in contexts:
        ae.add_requested_context(sop_class, transfer_syntax)
    return ae


def _with_meta(ds: Dataset, transfer_syntax: str) -> Dataset:
    """pynetdicom picks the presentation context from the file meta's transfer syntax."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


# --------------------------------------------------------------------------------------
# every acknowledged instance has its file and its rows
# --------------------------------------------------------------------------------------
@ON_BOTH_DATABASES
def test_dcmtk_storescu_every_acknowledged_instance_has_its_file_and_rows(
    router_node: NodeFactory, tmp_path: Path
) -> None:
    storescu = require_dcmtk("storescu")
    node = router_node()
    node.start()
    study = tmp_path / "study"
    study.mkdir()
    sent: dict[str, Dataset] = {}
    plan = [("CT", EXPLICIT_LE)] * 3 + [("CT", IMPLICIT_LE), ("MR", EXPLICIT_LE)]
    plan += [("MR", IMPLICIT_LE), ("OT", EXPLICIT_LE)]
    for i, (modality, transfer_syntax) in enumerate(plan):
        ds = make_dataset(modality)
        write_part10(ds, study / f"{i:03d}.dcm", transfer_syntax)
        sent[ds.SOPInstanceUID] = ds
    argv = [storescu, "-v", "-aet", "STORESCU", "-aec", "ROUTER", "+sd", HOST, str(node.port)]
    result = subprocess.run(
        [*argv, str(study)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("Received Store Response (Success)") == len(plan), output
    assert_ingested(node, sent, "STORESCU")
    assert UNROUTED_WARNING.search(node.log()), node.log()


@ON_BOTH_DATABASES
def test_pynetdicom_every_acknowledged_instance_has_its_file_and_rows(
    router_node: NodeFactory,
) -> None:
    node = router_node()
    node.start()
    ae = _pynetdicom_ae((CT_IMAGE, EXPLICIT_LE), (CT_IMAGE, IMPLICIT_LE), (MR_IMAGE, IMPLICIT_LE))
    assoc = ae.associate(HOST, node.port, ae_title="ROUTER")  # type: ignore[attr-defined]
    assert assoc.is_established
    sent: dict[str, Dataset] = {}
    try:
        for modality, transfer_syntax in [
            ("CT", EXPLICIT_LE),
            ("CT", IMPLICIT_LE),
            ("MR", IMPLICIT_LE),
            ("CT", EXPLICIT_LE),
        ]:
            ds = _with_meta(make_dataset(modality), transfer_syntax)
            status = assoc.send_c_store(ds)
            assert status.Status == SUCCESS, status
            sent[ds.SOPInstanceUID] = ds
    finally:
        assoc.release()
    assert_ingested(node, sent, "PYNETDICOM")


# --------------------------------------------------------------------------------------
# the unrouted policy
# --------------------------------------------------------------------------------------
@ON_BOTH_DATABASES
def test_unrouted_policy_default_keeps_instance_as_unrouted_without_jobs_and_warns(
    router_node: NodeFactory,
) -> None:
    node = router_node()
    node.start()
    ds = _with_meta(make_dataset("OT"), EXPLICIT_LE)  # no rule reads OT
    ae = _pynetdicom_ae((SECONDARY_CAPTURE, EXPLICIT_LE))
    assoc = ae.associate(HOST, node.port, ae_title="ROUTER")  # type: ignore[attr-defined]
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == SUCCESS
    row = assert_ingested(node, {ds.SOPInstanceUID: ds}, "PYNETDICOM")[ds.SOPInstanceUID]
    assert row["state"] == "unrouted" and row["destinations"] == []
    assert node.query("select count(*) from jobs") == [(0,)]
    assert UNROUTED_WARNING.search(node.log()), node.log()


@ON_BOTH_DATABASES
def test_unrouted_policy_reject_answers_failure_and_keeps_no_file_and_no_row(
    router_node: NodeFactory,
) -> None:
    node = router_node({"DICOM_ROUTER_LISTENER_UNROUTED_POLICY": "reject"})
    node.start()
    unrouted = make_dataset("OT")
    routed = make_dataset("CT")

    async def send() -> list[int]:
        async with open_association(node.port, (SECONDARY_CAPTURE, CT_IMAGE)) as assoc:
            statuses = []
            for ds in (unrouted, routed):
                rsp = await assoc.send_c_store(
                    encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE
                )
                statuses.append(rsp.status)
            return statuses

    refused, accepted = asyncio.run(send())
    assert is_failure(refused), hex(refused)
    assert accepted == SUCCESS  # the policy refuses the instance, not the association
    assert node.query(
        "select count(*) from instances where sop_instance_uid = ?", unrouted.SOPInstanceUID
    ) == [(0,)]
    assert_ingested(node, {routed.SOPInstanceUID: _with_meta(routed, EXPLICIT_LE)}, "E2E-SCU")


# --------------------------------------------------------------------------------------
# PT-01..PT-05: peer text never becomes a path
# --------------------------------------------------------------------------------------
BAD_UIDS = {
    "PT-01-traversal": "../../x",
    "PT-01-deep-traversal": "../../../../tmp/pwn",
    "PT-02-dotdot": "..",
    "PT-03-absolute": "/etc/passwd",
    "PT-03-windows": "C:\\Windows\\x",
    "PT-04-embedded-nul": "1.2.3\x00/../../x",
    "PT-05-200-characters": "1." + "2" * 198,
    "PT-05-10000-characters": "1." + "3" * 9998,
}
# Absolute places a traversal could reach from serve's cwd or the spool directories.
SENTINELS = (Path("/x"), Path("/tmp/pwn"), Path("/tmp/x"))


def _outside_state() -> dict[str, object]:
    passwd = Path("/etc/passwd").stat()
    return {
        "passwd": (passwd.st_size, passwd.st_mtime_ns),
        **{str(p): p.exists() for p in SENTINELS},
    }


def _assert_nothing_outside_the_spool(
    node: NodeUnderTest, tmp_path: Path, before: set[str], outside: dict[str, object]
) -> None:
    after = tree(tmp_path)
    assert before - after == set(), f"paths disappeared: {sorted(before - after)}"
    spool_names = {str(n) for (n,) in node.query("select spool_name from instances")}
    store = node.store_dir.relative_to(tmp_path)
    expected_new = {str(store / name) for name in spool_names}
    assert after - before == expected_new, f"unexpected new paths: {sorted(after - before)}"
    assert _outside_state() == outside
    node.assert_spool_matches_database()


@pytest.mark.parametrize("uid", list(BAD_UIDS.values()), ids=list(BAD_UIDS))
def test_pt01_to_pt05_bad_command_uid_fails_writes_nothing_outside_spool_association_goes_on(
    router_node: NodeFactory, tmp_path: Path, uid: str
) -> None:
    node = router_node()
    node.start()
    bad_ds = make_dataset("CT")  # a valid dataset; only the command carries the text
    good_ds = make_dataset("CT")
    before, outside = tree(tmp_path), _outside_state()

    async def send() -> tuple[int, int, bool]:
        async with open_association(node.port) as assoc:
            bad = await assoc.send_c_store(encode_dataset(bad_ds), CT_IMAGE, uid, EXPLICIT_LE)
            alive = assoc.is_alive
            good = await assoc.send_c_store(
                encode_dataset(good_ds), CT_IMAGE, good_ds.SOPInstanceUID, EXPLICIT_LE
            )
            return bad.status, good.status, alive

    bad_status, good_status, alive = asyncio.run(send())
    assert is_failure(bad_status), hex(bad_status)
    assert alive and good_status == SUCCESS  # the association went on
    assert [r["sop_instance_uid"] for r in node.instances()] == [good_ds.SOPInstanceUID]
    _assert_nothing_outside_the_spool(node, tmp_path, before, outside)


@pytest.mark.parametrize(
    "uid",
    ["../../x", "..", "/etc/passwd"],
    ids=["PT-01-traversal", "PT-02-dotdot", "PT-03-absolute"],
)
def test_pt01_to_pt03_bad_uid_from_pynetdicom_fails_writes_nothing_outside_spool(
    router_node: NodeFactory, tmp_path: Path, uid: str
) -> None:
    """pynetdicom takes the command's UID from the dataset (it refuses, locally, to send
    one longer than 64 characters, so PT-05 is covered by our client above)."""
    node = router_node()
    node.start()
    bad_ds = make_dataset("CT")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value
        bad_ds.SOPInstanceUID = uid
    good_ds = make_dataset("CT")
    before, outside = tree(tmp_path), _outside_state()
    ae = _pynetdicom_ae((CT_IMAGE, EXPLICIT_LE))
    assoc = ae.associate(HOST, node.port, ae_title="ROUTER")  # type: ignore[attr-defined]
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bad = assoc.send_c_store(_with_meta(bad_ds, EXPLICIT_LE))
        assert assoc.is_established
        good = assoc.send_c_store(_with_meta(good_ds, EXPLICIT_LE))
    finally:
        assoc.release()
    assert "Status" in bad and is_failure(bad.Status), bad
    assert good.Status == SUCCESS  # the association went on
    assert [r["sop_instance_uid"] for r in node.instances()] == [good_ds.SOPInstanceUID]
    _assert_nothing_outside_the_spool(node, tmp_path, before, outside)


# --------------------------------------------------------------------------------------
# RX-13: the spool's disk
# --------------------------------------------------------------------------------------
def _big_ct() -> Dataset:
    return make_dataset("CT", rows=362, columns=362)  # about 256 KiB


def _remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=30)


def test_rx13_full_spool_disk_answers_a700_mid_write_and_association_goes_on(
    router_node: NodeFactory, tmpfs: Callable[[Path, str], Path]
) -> None:
    # min_free_bytes = 0: the free-space check never refuses, ENOSPC while writing does.
    node = router_node({"DICOM_ROUTER_SPOOL_MIN_FREE_BYTES": "0"})
    tmpfs(node.spool_dir, "2m")
    node.start()  # serve lays the spool out on the tmpfs
    assert os.stat(node.spool_dir).st_dev != os.stat(node.data_dir).st_dev
    acknowledged: dict[str, Dataset] = {}
    refused: list[str] = []

    async def store(assoc: object, ds: Dataset) -> int:
        rsp = await assoc.send_c_store(  # type: ignore[attr-defined]
            encode_dataset(ds), CT_IMAGE, ds.SOPInstanceUID, EXPLICIT_LE
        )
        if rsp.status == SUCCESS:
            acknowledged[ds.SOPInstanceUID] = _with_meta(ds, EXPLICIT_LE)
        else:
            refused.append(ds.SOPInstanceUID)
        return int(rsp.status)

    async def scenario() -> tuple[list[int], int, int, int]:
        async with open_association(node.port) as assoc:
            statuses = []
            for _ in range(20):  # 20 x 256 KiB into 2 MiB
                statuses.append(await store(assoc, _big_ct()))
                if statuses[-1] != SUCCESS:
                    break
            echo = await assoc.send_c_echo()
            small = await store(assoc, make_dataset("CT"))
            _remount(node.spool_dir, "16m")  # space comes back: no restart needed
            after = await store(assoc, _big_ct())
            return statuses, echo, small, after

    statuses, echo, small, after = asyncio.run(scenario())
    assert statuses[-1] == OUT_OF_RESOURCES, [hex(s) for s in statuses]
    assert statuses.count(SUCCESS) >= 3, [hex(s) for s in statuses]
    assert echo == SUCCESS  # answered after the refusal, on the same association
    assert small in (SUCCESS, OUT_OF_RESOURCES), hex(small)
    assert after == SUCCESS, hex(after)
    assert "No space left on device" in node.log()  # ENOSPC, not the free-space check
    assert not set(refused) & set(node.by_uid())
    assert_ingested(node, acknowledged, "E2E-SCU")  # nothing half-written in tmp/ or store/


def test_rx13_free_space_below_minimum_answers_a700_without_writing(
    router_node: NodeFactory, tmpfs: Callable[[Path, str], Path]
) -> None:
    node = router_node({"DICOM_ROUTER_SPOOL_MIN_FREE_BYTES": str(4 << 20)})
    tmpfs(node.spool_dir, "2m")  # always less free than the 4 MiB minimum
    node.start()
    before_tree = tree(node.spool_dir)
    before_used = shutil.disk_usage(node.spool_dir).used
    refused_ds, later_ds = make_dataset("CT"), make_dataset("CT")

    async def scenario() -> tuple[int, int, int]:
        async with open_association(node.port) as assoc:
            refused = await assoc.send_c_store(
                encode_dataset(refused_ds), CT_IMAGE, refused_ds.SOPInstanceUID, EXPLICIT_LE
            )
            echo = await assoc.send_c_echo()
            assert tree(node.spool_dir) == before_tree  # not even a temporary file
            assert shutil.disk_usage(node.spool_dir).used == before_used
            _remount(node.spool_dir, "16m")  # now above the minimum
            later = await assoc.send_c_store(
                encode_dataset(later_ds), CT_IMAGE, later_ds.SOPInstanceUID, EXPLICIT_LE
            )
            return refused.status, echo, later.status

    refused, echo, later = asyncio.run(scenario())
    assert refused == OUT_OF_RESOURCES, hex(refused)
    assert echo == SUCCESS
    assert later == SUCCESS, hex(later)
    assert "No space left on device" not in node.log()  # refused before writing
    assert_ingested(node, {later_ds.SOPInstanceUID: _with_meta(later_ds, EXPLICIT_LE)}, "E2E-SCU")


# --------------------------------------------------------------------------------------
# the database fails
# --------------------------------------------------------------------------------------
BUSY_TIMEOUT = 10.0  # router/db/engine.py BUSY_TIMEOUT_MS; not a setting (yet)


def test_locked_database_answers_a700_leaves_no_orphan_file_and_next_store_succeeds(
    router_node: NodeFactory,
) -> None:
    node = router_node()
    node.start()
    locked_ds, later_ds = make_dataset("CT"), make_dataset("CT")
    lock = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)

    async def scenario() -> tuple[int, float, int]:
        async with open_association(node.port, dimse_timeout=BUSY_TIMEOUT + 30) as assoc:
            lock.execute("BEGIN EXCLUSIVE")  # held until the answer comes: past the timeout
            try:
                started = time.monotonic()
                refused = await assoc.send_c_store(
                    encode_dataset(locked_ds), CT_IMAGE, locked_ds.SOPInstanceUID, EXPLICIT_LE
                )
                waited = time.monotonic() - started
                assert node.store_files() == set(), "orphan file while the lock is held"
                assert node.tmp_files() == []
            finally:
                lock.execute("ROLLBACK")
            later = await assoc.send_c_store(
                encode_dataset(later_ds), CT_IMAGE, later_ds.SOPInstanceUID, EXPLICIT_LE
            )
            return refused.status, waited, later.status

    try:
        refused, waited, later = asyncio.run(scenario())
    finally:
        lock.close()
    assert refused == OUT_OF_RESOURCES, hex(refused)
    assert waited >= BUSY_TIMEOUT - 1, waited  # it did wait for the lock first
    assert later == SUCCESS, hex(later)
    assert_ingested(node, {later_ds.SOPInstanceUID: _with_meta(later_ds, EXPLICIT_LE)}, "E2E-SCU")


# --------------------------------------------------------------------------------------
# C-STORE priority (PS3.7 C.4.1.1)
# --------------------------------------------------------------------------------------
@ON_BOTH_DATABASES
def test_c_store_priority_is_kept_on_the_jobs_and_an_unknown_value_is_medium(
    router_node: NodeFactory,
) -> None:
    node = router_node()
    node.start()
    sent: dict[int, str] = {}

    async def send() -> None:
        async with open_association(node.port) as assoc:
            for priority in (0, 1, 2, 7):
                ds = make_dataset("CT")
                rsp = await assoc.send_c_store(
                    encode_dataset(ds),
                    CT_IMAGE,
                    str(ds.SOPInstanceUID),
                    EXPLICIT_LE,
                    priority=priority,
                )
                assert rsp.status == SUCCESS
                sent[priority] = str(ds.SOPInstanceUID)

    asyncio.run(send())
    stored = dict(
        node.query(
            "select i.sop_instance_uid, j.priority from jobs j"
            " join instances i on i.id = j.instance_id"
        )
    )
    assert {p: stored[uid] for p, uid in sent.items()} == {0: 0, 1: 1, 2: 2, 7: 0}
