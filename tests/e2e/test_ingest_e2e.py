"""The listener end to end (issue "router ingest"): real `dicom-router serve` processes,
DCMTK and pynetdicom senders, and the durability contract of DESIGN §3.1."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from router_node import (
    CT_IMAGE_STORAGE,
    RouterNode,
    dataset_bytes,
    make_instance,
    write_file,
)

from protocol.net import ContextRequest, Timeouts, associate
from protocol.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from protocol.uids import EXPLICIT_VR_LE, VERIFICATION

SPOOL_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{32}\.dcm$")
CT_RULE = ("ct", "--when", "Modality == CT", "--to", "sink")


def dcmtk(tool: str) -> str:
    # pynetdicom installs Python scripts with DCMTK's names into the venv: use the binary.
    for directory in ("/usr/bin", "/usr/local/bin"):
        path = Path(directory) / tool
        if path.exists():
            return str(path)
    if os.environ.get("CI"):
        pytest.fail(f"DCMTK {tool} is required (scripts/test.sh installs dcmtk)")
    pytest.skip(f"DCMTK {tool} is not installed")


def _same_dataset(stored: Path, original: Path) -> None:
    a, b = dcmread(stored), dcmread(original)
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    for element in b:
        assert a[element.tag].value == element.value, element.tag


def test_dcmtk_storescu_instances_are_spooled_and_recorded(
    make_node: Callable[..., RouterNode], tmp_path: Path
) -> None:
    node = make_node()
    node.setup(CT_RULE)
    node.start()
    study = tmp_path / "study"
    study.mkdir()
    originals = {}
    for i in range(6):
        ds = make_instance("CT" if i < 4 else "MR")
        originals[ds.SOPInstanceUID] = write_file(ds, study / f"{i}.dcm")
    result = subprocess.run(
        [dcmtk("storescu"), "-aec", "ROUTER", "+sd", "127.0.0.1", str(node.port), str(study)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stderr
    rows = node.query("select sop_instance_uid, state, spool_name, id from instances")
    assert {r[0] for r in rows} == set(originals)
    jobs = dict(node.query("select instance_id, count(*) from jobs group by instance_id"))
    for uid, state, spool_name, instance_id in rows:
        assert SPOOL_NAME.match(str(spool_name))
        modality = dcmread(originals[str(uid)]).Modality
        if modality == "CT":
            assert state == "routed" and jobs[instance_id] == 1
        else:
            assert state == "unrouted" and instance_id not in jobs
        _same_dataset(node.data_dir / "spool" / "store" / str(spool_name), originals[str(uid)])
    assert node.spool_files() == {str(r[2]) for r in rows}
    assert node.temp_files() == []
    assert "matched no rule; kept as unrouted" in node.log()


def test_pynetdicom_store_is_recorded_with_its_job(make_node: Callable[..., RouterNode]) -> None:
    from pynetdicom import AE

    node = make_node()
    node.setup(CT_RULE)
    node.start()
    ae = AE(ae_title="PYND")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ROUTER")
    assert assoc.is_established
    ds = make_instance("CT")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == SUCCESS
    assert node.query(
        "select count(*) from jobs j join instances i on i.id = j.instance_id "
        "where i.sop_instance_uid = ?",
        ds.SOPInstanceUID,
    ) == [(1,)]


def test_unrouted_policy_reject_refuses_and_keeps_nothing(
    make_node: Callable[..., RouterNode],
) -> None:
    from pynetdicom import AE

    node = make_node({"DICOM_ROUTER_LISTENER_UNROUTED_POLICY": "reject"})
    node.setup(CT_RULE)
    node.start()
    ae = AE(ae_title="PYND")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", EXPLICIT_VR_LE)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ROUTER")
    status = assoc.send_c_store(make_instance("MR"))
    assoc.release()
    assert status.Status != SUCCESS
    assert node.query("select count(*) from instances") == [(0,)]
    assert node.spool_files() == set() and node.temp_files() == []


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


async def _store_raw(port: int, sop_instance: str, ds_bytes: bytes) -> list[int]:
    """Store with an arbitrary Affected SOP Instance UID, then a good one, on ONE association."""
    assoc = await associate(
        "127.0.0.1",
        port,
        [ContextRequest(CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,))],
        called_ae="ROUTER",
        timeouts=Timeouts(acse=10, dimse=20),
    )
    statuses = []
    bad = await assoc.send_c_store(ds_bytes, CT_IMAGE_STORAGE, sop_instance, EXPLICIT_VR_LE)
    statuses.append(bad.status)
    good_ds = make_instance("CT")
    good = await assoc.send_c_store(
        dataset_bytes(good_ds), CT_IMAGE_STORAGE, good_ds.SOPInstanceUID, EXPLICIT_VR_LE
    )
    statuses.append(good.status)
    await assoc.release()
    return statuses


@pytest.mark.parametrize(
    "uid",
    ["..", "../../x", "/etc/passwd", "1." + "2" * 198, "1.2.3\x00/../../x", "C:\\Windows\\x"],
    ids=["dotdot", "traversal", "absolute", "200-characters", "embedded-nul", "windows"],
)
def test_pt01_bad_instance_uid_leaves_nothing_outside_the_spool(
    make_node: Callable[..., RouterNode], tmp_path: Path, uid: str
) -> None:
    node = make_node()
    node.setup(CT_RULE)
    node.start()
    before = _snapshot(tmp_path)
    ds = make_instance("CT")
    ds.SOPInstanceUID = uid if "\x00" not in uid else "1.2.3"
    statuses = asyncio.run(_store_raw(node.port, uid, dataset_bytes(ds)))
    assert statuses[0] == CANNOT_UNDERSTAND  # refused, association goes on
    assert statuses[1] == SUCCESS
    new_paths = _snapshot(tmp_path) - before
    spool_prefix = str((node.data_dir / "spool").relative_to(tmp_path))
    for path in new_paths:
        assert path.startswith(spool_prefix) or path.endswith(
            ("serve.log", "router.sqlite-wal", "router.sqlite-shm")
        )
    assert node.spool_files() == {str(r[0]) for r in node.query("select spool_name from instances")}
    assert all(SPOOL_NAME.match(name) for name in node.spool_files())
    assert node.query("select count(*) from instances") == [(1,)]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Path:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_rx13_full_disk_answers_out_of_resources_and_association_goes_on(
    make_node: Callable[..., RouterNode], tmp_path: Path, small_tmpfs: Path
) -> None:
    node = make_node({"DICOM_ROUTER_SPOOL_MIN_FREE_BYTES": "0"})
    node.cli("init")  # the database lives outside the tmpfs; the spool inside it
    spool = node.data_dir / "spool"
    shutil.rmtree(spool)
    spool.symlink_to(small_tmpfs)
    node.setup(CT_RULE)
    node.start()

    async def fill() -> list[int]:
        assoc = await associate(
            "127.0.0.1",
            node.port,
            [
                ContextRequest(CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,)),
                ContextRequest(VERIFICATION, (EXPLICIT_VR_LE,)),
            ],
            called_ae="ROUTER",
            timeouts=Timeouts(acse=10, dimse=30),
        )
        statuses = []
        for _ in range(12):  # 12 x 256 KiB into 2 MiB
            ds = make_instance("CT", rows=362)
            rsp = await assoc.send_c_store(
                dataset_bytes(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID, EXPLICIT_VR_LE
            )
            statuses.append(rsp.status)
        statuses.append(await assoc.send_c_echo())
        await assoc.release()
        return statuses

    statuses = asyncio.run(fill())
    assert SUCCESS in statuses[:-1]
    assert OUT_OF_RESOURCES in statuses[:-1]
    assert statuses[-1] == SUCCESS  # the association went on after the refusals
    assert node.temp_files() == []
    recorded = {str(r[0]) for r in node.query("select spool_name from instances")}
    assert node.spool_files() == recorded
    assert len(recorded) == statuses.count(SUCCESS) - 1


def test_rx13_free_space_minimum_refuses_before_writing(
    make_node: Callable[..., RouterNode],
) -> None:
    node = make_node({"DICOM_ROUTER_SPOOL_MIN_FREE_BYTES": str(1 << 60)})
    node.setup(CT_RULE)
    node.start()
    ds = make_instance("CT")
    statuses = asyncio.run(_store_raw(node.port, ds.SOPInstanceUID, dataset_bytes(ds)))
    assert statuses == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
    assert node.spool_files() == set() and node.temp_files() == []


def test_locked_database_answers_out_of_resources_without_orphan_files(
    make_node: Callable[..., RouterNode],
) -> None:
    node = make_node()
    node.setup(CT_RULE)
    node.start()
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        db = sqlite3.connect(node.data_dir / "router.sqlite", isolation_level=None, timeout=30)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(60)
        db.execute("ROLLBACK")
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        ds = make_instance("CT")

        async def one() -> int:
            assoc = await associate(
                "127.0.0.1",
                node.port,
                [ContextRequest(CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,))],
                called_ae="ROUTER",
                timeouts=Timeouts(acse=10, dimse=60),
            )
            rsp = await assoc.send_c_store(
                dataset_bytes(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID, EXPLICIT_VR_LE
            )
            await assoc.release()
            return rsp.status

        assert asyncio.run(one()) == OUT_OF_RESOURCES  # after the 10 s busy timeout
        assert node.spool_files() == set() and node.temp_files() == []
    finally:
        release.set()
        holder.join(30)
    good = make_instance("CT")
    assert (
        asyncio.run(_store_raw(node.port, good.SOPInstanceUID, dataset_bytes(good)))[0] == SUCCESS
    )


def test_fi01_sigkill_at_random_points_loses_no_acknowledged_instance(
    make_node: Callable[..., RouterNode], tmp_path: Path
) -> None:
    """500 instances (the issue's size), 4 SIGKILLs of `serve` at random points; after
    each restart the sender resends what it saw no success for."""
    import random

    rng = random.Random(20261124)
    node = make_node()
    node.setup(("all", "--to", "sink"))
    corpus = {}
    for _ in range(500):
        ds = make_instance("CT")
        corpus[ds.SOPInstanceUID] = dataset_bytes(ds)
    acknowledged: set[str] = set()
    pending = list(corpus)

    async def send_until_killed(uids: list[str]) -> None:
        try:
            assoc = await associate(
                "127.0.0.1",
                node.port,
                [ContextRequest(CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,))],
                called_ae="ROUTER",
                timeouts=Timeouts(acse=10, dimse=20),
            )
        except (OSError, TimeoutError):
            return
        try:
            for uid in uids:
                rsp = await assoc.send_c_store(corpus[uid], CT_IMAGE_STORAGE, uid, EXPLICIT_VR_LE)
                if rsp.status == SUCCESS:
                    acknowledged.add(uid)
            await assoc.release()
        except Exception:
            return

    kills = 0
    while pending:
        node.start()
        if kills < 4:
            timer = threading.Timer(rng.uniform(0.05, 0.6), node.kill)
            timer.start()
            kills += 1
        asyncio.run(send_until_killed(pending))
        node.kill()
        pending = [uid for uid in corpus if uid not in acknowledged]
    assert kills == 4
    node.start()  # recovery after the last kill
    node.stop()
    rows = node.query("select sop_instance_uid, spool_name from instances")
    recorded = {str(uid) for uid, _ in rows}
    assert acknowledged <= recorded
    assert acknowledged == set(corpus)
    assert node.spool_files() == {str(name) for _, name in rows}  # no file without a row
    assert node.temp_files() == []
    for uid, name in rows:
        path = node.data_dir / "spool" / "store" / str(name)
        assert dcmread(path).SOPInstanceUID == uid
    time.sleep(0)
