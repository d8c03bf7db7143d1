"""Catalogue B.4, resource exhaustion and slow peers, against a live ``dicom-router serve``.

The module runs its own catalogue node (``catalogue_node`` below: the harness's
``CatalogueNode``, started the harness's way) with small limits and timeouts so that
slow-peer cases finish in seconds on real sockets and real timers:

    listener.acse_timeout (ARTIM)  2 s     listener.idle_timeout   3 s
    listener.pdu_timeout           3 s     listener.write_timeout  3 s
    listener.max_associations      4       ..._per_calling_ae      2
    spool on its own 96 MiB tmpfs, spool.min_free_bytes 32 MiB (the high-water mark)

Scaled down (DESIGN §8; full sizes in tests/soak/soak_rx_full_size.py, on demand):
RX-06 10,000 connect/close cycles -> 400; RX-07 10,000 aborted C-STOREs -> 60; RX-09
10 GB never-ending data set -> past a 64 MiB mark (the mark is what is tested); RX-10
100,000 C-STOREs over one association -> 200; RX-02's byte every 5 s -> every 0.5 s
(ARTIM 2 s instead of 30 s); RX-03's 1 byte/s -> 1 byte per 0.25 s (PDU deadline 3 s
instead of 120 s); RX-18's 1 MiB -> 10 GiB bomb -> 2 MiB -> ~2 GiB (past the 1 GiB cap).

Documented minimum throughput (RX-03): a PDU must complete within listener.pdu_timeout
(120 s by default) once it has begun; with the 262,144-byte PDU we announce, a link of
about 2.2 KB/s or faster is served (a peer proposing a smaller Maximum Length cannot
change what it sends us; our announced maximum bounds each PDU).

RX-15: 6,000 CT instances (12,000 job notices, past the listener's 10,000-message
ZeroMQ SNDHWM) -> 100 with nobody reading the notices.

Where the rest lives: RX-13 at the ENOSPC layer is tests/e2e/test_ingest.py; RX-18's
inflation cap (layer U) is tests/unit/test_walker.py. RX-16 is tested here on the
listener's side (a peer that stops reading our responses); its worker side (a
destination that stops reading our C-STORE data, workers.write_timeout) is in
test_b8_destinations.py, which has the workers and scripted destinations. RX-11 and RX-14
(P1/P2, millions of rows) are not covered.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ABORT_1,
    ABORT_U,
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
    associate_rq,
    c_echo_rq,
    c_store_rq,
    catalogue_dataset,
    dataset_bytes,
    p_data_tf,
    parse_command_status,
    pdu,
    pdv,
    presentation_context,
    release_rq,
)
from pydicom.uid import generate_uid

from tests.e2e.catalogue.conftest import CatalogueNode
from tests.e2e.ingest_support import EXPLICIT_LE as EXPL
from tests.e2e.ingest_support import encode_dataset, mount_tmpfs, unmount

ARTIM = 2.0
IDLE = 3.0
PDU_DEADLINE = 3.0
WRITE_DEADLINE = 3.0
MAX_ASSOCIATIONS = 4
MAX_PER_CALLING_AE = 2
SPOOL_TMPFS = "96m"
MIN_FREE = 32 << 20
MARGIN = 10.0  # seconds added to each deadline for a loaded machine (not what is tested)

DEFLATED = "1.2.840.10008.1.2.1.99"
CONTEXTS = ((1, VERIFICATION, (IMPLICIT_LE,)), (3, CT_IMAGE, (EXPLICIT_LE,)))
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
REJECT_LIMIT = bytes.fromhex("03 00 00 00 00 04 00 02 03 02")  # RJ (2, 3, 2)


@pytest.fixture(scope="module")
def catalogue_node(
    tmp_path_factory: pytest.TempPathFactory, configured_data_dir: Path
) -> Iterator[CatalogueNode]:
    """The harness's node with this module's limits, its spool on a small tmpfs."""
    env = {
        "DICOM_ROUTER_LISTENER_ACSE_TIMEOUT": str(ARTIM),
        "DICOM_ROUTER_LISTENER_IDLE_TIMEOUT": str(IDLE),
        "DICOM_ROUTER_LISTENER_PDU_TIMEOUT": str(PDU_DEADLINE),
        "DICOM_ROUTER_LISTENER_WRITE_TIMEOUT": str(WRITE_DEADLINE),
        "DICOM_ROUTER_LISTENER_MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
        "DICOM_ROUTER_LISTENER_MAX_ASSOCIATIONS_PER_CALLING_AE": str(MAX_PER_CALLING_AE),
        "DICOM_ROUTER_SPOOL_MIN_FREE_BYTES": str(MIN_FREE),
    }
    node = CatalogueNode(tmp_path_factory.mktemp("catalogue-rx"), env)
    shutil.copytree(configured_data_dir, node.data_dir, symlinks=True)
    staged = node.root / "spool-staged"
    shutil.move(node.spool_dir, staged)
    mount_tmpfs(node.spool_dir, SPOOL_TMPFS)
    try:
        shutil.copytree(staged, node.spool_dir, symlinks=True, dirs_exist_ok=True)
        node.start()
        node.good_store(2)
        node.good_echo()
        yield node
    finally:
        node.kill()
        unmount(node.spool_dir)


# --------------------------------------------------------------------------------------
# helpers of this module
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def filler(port: int, calling: str) -> Iterator[socket.socket]:
    """An established association that is not one of the case's bad peers (a plain
    socket, so the invariant does not look for a WARNING line naming it)."""
    sock = socket.create_connection((HOST, port), timeout=10)
    try:
        sock.sendall(associate_rq(calling=calling, contexts=CONTEXTS))
        header = _recv_exactly(sock, 6)
        _recv_exactly(sock, int.from_bytes(header[2:], "big"))
        assert header[0] == 0x02, f"{calling}: expected A-ASSOCIATE-AC, got {header.hex(' ')}"
        yield sock
        sock.sendall(release_rq())
        _recv_exactly(sock, 10)
    finally:
        sock.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def _store_status(peer: RawPeer) -> int | None:
    pdu_type, body = peer.recv_pdu(within=30)
    assert pdu_type == 0x04, f"expected a C-STORE-RSP, got PDU type {pdu_type:#04x}"
    return parse_command_status(bytes([4, 0]) + len(body).to_bytes(4, "big") + body)


def _big_dataset_header(uid: str, pixel_bytes: int) -> bytes:
    """A CT data set up to (7FE0,0010) OW with ``pixel_bytes`` announced: the caller
    streams the value (or never finishes it)."""
    ds = catalogue_dataset(uid)
    del ds.PixelData
    return encode_dataset(ds, EXPL) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)


def _spool_used(node: CatalogueNode) -> int:
    return shutil.disk_usage(node.spool_dir).used


def _wait(predicate, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


# --------------------------------------------------------------------------------------
# connections that say nothing, or too little
# --------------------------------------------------------------------------------------
def test_rx_01_twice_max_silent_connections_close_at_artim_and_block_nobody(
    catalogue_node, invariant
):
    """2 x max-associations TCP connections that send nothing: a good peer stores while
    they are open (pre-association connections hold no association slot), each is
    closed at the A-ASSOCIATE-RQ deadline (ARTIM), and the fds come back."""
    peers = [RawPeer(HOST, catalogue_node.port).connect() for _ in range(2 * MAX_ASSOCIATIONS)]
    try:
        with invariant.during():
            for peer in peers:
                peer.expect_close(within=ARTIM + MARGIN)
    finally:
        for peer in peers:
            peer.close()
    invariant.expect_warning(r"no A-ASSOCIATE-RQ within 2 s \(ARTIM\), closing")


def test_rx_02_slow_loris_associate_rq_is_cut_at_an_absolute_deadline(catalogue_node, invariant):
    """One byte of the A-ASSOCIATE-RQ every 0.5 s (each read resets any per-read
    timeout): ARTIM is not restarted by bytes, so the connection closes about ARTIM
    after connect, long before the 191 bytes would have been sent (95 s)."""
    rq = associate_rq(contexts=CONTEXTS)
    with RawPeer(HOST, catalogue_node.port) as peer:
        started = time.monotonic()
        for i in range(len(rq)):
            if not peer.try_send(rq[i : i + 1]):
                break
            time.sleep(0.5)
            if time.monotonic() - started > ARTIM + MARGIN:
                raise AssertionError("slow-loris A-ASSOCIATE-RQ still open past ARTIM")
        else:
            raise AssertionError("the whole A-ASSOCIATE-RQ went through")
        with contextlib.suppress(AssertionError):
            peer.expect_close(within=1)
    assert time.monotonic() - started < ARTIM + MARGIN
    invariant.expect_warning(r"no A-ASSOCIATE-RQ within 2 s \(ARTIM\), closing")


def test_rx_03_data_set_trickled_at_a_byte_a_time_is_aborted_at_the_pdu_deadline(
    catalogue_node, invariant
):
    """An accepted association sends a data-set PDU one byte per 0.25 s: every byte
    keeps the idle timer alive, the absolute PDU deadline (3 s) aborts (ABORT-U), and
    the temporary file goes."""
    uid = generate_uid()
    data = dataset_bytes(uid)
    pdata = p_data_tf(pdv(3, DATASET_LAST, data))
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid))))
        started = time.monotonic()
        for i in range(len(pdata)):
            if not peer.try_send(pdata[i : i + 1]):
                break
            time.sleep(0.25)
            if time.monotonic() - started > PDU_DEADLINE + 1:
                break  # past the deadline: the abort is on its way
        peer.expect(ABORT_U, within=MARGIN)
        peer.expect_close(within=MARGIN)
    assert time.monotonic() - started < PDU_DEADLINE + MARGIN
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"a PDU did not complete within 3 s, aborting")


def test_rx_08_idle_established_association_is_aborted_and_its_slot_freed(
    catalogue_node, invariant
):
    """A PACS that never releases: after listener.idle_timeout with no PDU the listener
    sends A-ABORT (ABORT-U) and closes; all 4 slots are usable again afterwards."""
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        assert peer.echo() == SUCCESS
        started = time.monotonic()
        peer.expect(ABORT_U, within=IDLE + MARGIN)
        waited = time.monotonic() - started
        peer.expect_close(within=MARGIN)
    assert waited >= IDLE * 0.5, f"aborted after {waited:.1f} s, before the idle timeout"
    with contextlib.ExitStack() as stack:
        for n in range(MAX_ASSOCIATIONS):
            stack.enter_context(filler(catalogue_node.port, f"FILL{n}"))
    invariant.expect_warning(r"no data for 3 s, aborting")


# --------------------------------------------------------------------------------------
# association limits
# --------------------------------------------------------------------------------------
def test_rx_04_one_past_max_associations_gets_rj_2_3_2_then_room_again(catalogue_node, invariant):
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(contextlib.ExitStack())
        first.enter_context(filler(catalogue_node.port, "RX04-0"))
        for n in range(1, MAX_ASSOCIATIONS):
            stack.enter_context(filler(catalogue_node.port, f"RX04-{n}"))
        with RawPeer(HOST, catalogue_node.port) as extra:
            extra.send(associate_rq(calling="RX04-EXTRA", contexts=CONTEXTS))
            extra.expect_reject(2, 3, 2, within=MARGIN)
        first.close()  # one releases (A-RELEASE-RQ, RP, close): room for a new one
        released = time.monotonic()
        accepted = None
        while accepted is None and time.monotonic() - released < MARGIN:
            with socket.create_connection((HOST, catalogue_node.port), timeout=10) as sock:
                sock.sendall(associate_rq(calling="RX04-NEXT", contexts=CONTEXTS))
                if _recv_exactly(sock, 6)[0] == 0x02:
                    accepted = time.monotonic() - released
                    sock.sendall(bytes.fromhex("07 00 00 00 00 04 00 00 00 00"))
                else:
                    time.sleep(0.05)
        assert accepted is not None, "no room again after a release"
    print(f"RX-04: accepted {accepted:.3f} s after the release (catalogue: within 1 s)")
    invariant.expect_warning(r"rejected \(result 2, source 3, reason 2\)")


def test_rx_05_a_calling_ae_at_its_cap_does_not_lock_out_others(catalogue_node, invariant):
    """Our per-peer cap is per calling AE title (listener.max_associations_per_calling_ae;
    the catalogue's "per IP" cannot be told apart on one loopback address, and many
    modalities share a NAT address): the AE at its cap gets (2, 3, 2), another AE is
    still served."""
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_PER_CALLING_AE):
            stack.enter_context(filler(catalogue_node.port, "SAMEAE"))
        with RawPeer(HOST, catalogue_node.port) as third:
            third.send(associate_rq(calling="SAMEAE", contexts=CONTEXTS))
            third.expect_reject(2, 3, 2, within=MARGIN)
        with filler(catalogue_node.port, "OTHERAE"):
            pass
    invariant.expect_warning(r"from 'SAMEAE' .*rejected \(result 2, source 3, reason 2\)")


# --------------------------------------------------------------------------------------
# churn: nothing leaks
# --------------------------------------------------------------------------------------
RX_06_CYCLES = 400  # full size 10,000: tests/soak/soak_rx_full_size.py
RX_07_ABORTS = 60  # full size 10,000


def test_rx_06_connect_then_close_cycles_leave_fds_tasks_and_memory_at_baseline(
    catalogue_node, invariant
):
    """Load-balancer health checks: connect, close, 400 times (full size 10,000).
    fds/tasks back (the invariant); RSS within 8 MiB of where it was."""
    watch = ProcessWatch(catalogue_node.listener_pids())
    for _ in range(RX_06_CYCLES):
        with socket.create_connection((HOST, catalogue_node.port), timeout=10):
            pass
    assert _wait(lambda: not watch.leaks(), 15), watch.leaks()
    growth = watch.rss_growth()
    print(f"RX-06: {RX_06_CYCLES} cycles, listener RSS growth {growth} KiB")
    assert growth < 8 * 1024, f"listener RSS grew {growth} KiB over {RX_06_CYCLES} cycles"
    invariant.expect_no_warning()


def test_rx_07_associations_aborted_mid_c_store_leak_nothing(catalogue_node, invariant):
    """60 associations (full size 10,000), each aborted by the peer in the middle of a
    C-STORE data set: no temporary file, fd, task or row left; RSS within 8 MiB."""
    watch = ProcessWatch(catalogue_node.listener_pids())
    uids = []
    for _ in range(RX_07_ABORTS):
        uid = generate_uid()
        uids.append(uid)
        data = dataset_bytes(uid)
        with RawPeer(HOST, catalogue_node.port) as peer:
            peer.associate(contexts=CONTEXTS)
            peer.send(
                p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid)))
                + p_data_tf(pdv(3, DATASET_MORE, data[: len(data) // 2]))
                + bytes.fromhex("07 00 00 00 00 04 00 00 00 00")
            )
            peer.expect_close(within=MARGIN)
    assert _wait(lambda: not catalogue_node.tmp_files(), 15), catalogue_node.tmp_files()
    assert not set(uids) & catalogue_node.uids()
    growth = watch.rss_growth()
    print(f"RX-07: {RX_07_ABORTS} aborted stores, listener RSS growth {growth} KiB")
    assert growth < 8 * 1024
    invariant.expect_no_warning()  # a peer's A-ABORT is INFO


RX_10_STORES = 200  # full size 100,000: tests/soak/soak_rx_full_size.py


def test_rx_10_many_c_stores_over_one_association_keep_memory_flat(catalogue_node, invariant):
    """200 C-STOREs over one association (full size 100,000): every one acknowledged,
    and the listener's RSS after the last is within 8 MiB of where it was after the
    first 50 (per-association state O(1)). Throughput is the benchmarks' business."""
    stored = []
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        watch = None
        for n in range(1, RX_10_STORES + 1):
            uid = generate_uid()
            data = dataset_bytes(uid)
            peer.send(
                p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(n % 65536, CT_IMAGE, uid)))
                + p_data_tf(pdv(3, DATASET_LAST, data))
            )
            assert _store_status(peer) == SUCCESS
            stored.append(uid)
            if n == 50:
                watch = ProcessWatch(catalogue_node.listener_pids())
        peer.release()
    assert watch is not None
    growth = watch.rss_growth()
    print(f"RX-10: {RX_10_STORES} stores on one association, RSS growth after 50: {growth} KiB")
    assert growth < 8 * 1024
    for uid in stored:
        invariant.acknowledged(uid)
    invariant.expect_no_warning()


RX_15_STORES = 100  # full size: 6,000 CT instances, past the 10,000-notice SNDHWM


def test_rx_15_no_dispatcher_reading_never_holds_a_c_store_response(catalogue_node, invariant):
    """The catalogue node runs without workers or a dispatcher: nobody reads the
    listener's ZeroMQ job notices. 100 CT instances (each two jobs) over one
    association are all acknowledged and every job is in the database, pending (the
    database is the record; the sweeper hands them out once workers run). The full
    size that fills the 10,000-message SNDHWM is tests/soak/soak_rx_full_size.py RX-15."""
    stored = []
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        for n in range(1, RX_15_STORES + 1):
            uid = generate_uid()
            peer.send(
                p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(n, CT_IMAGE, uid)))
                + p_data_tf(pdv(3, DATASET_LAST, dataset_bytes(uid)))
            )
            assert _store_status(peer) == SUCCESS
            stored.append(uid)
        peer.release()
    rows = catalogue_node.by_uid()
    for uid in stored:
        (row,) = rows[uid]
        assert row["destinations"] == ["archive", "pacs"], row
        assert set(row["job_states"]) == {"pending"}, row
        invariant.acknowledged(uid)
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# big and endless data sets
# --------------------------------------------------------------------------------------
def test_rx_09_data_set_that_never_ends_stops_growing_at_the_spool_mark(catalogue_node, invariant):
    """Fragments that never set the last bit: the temporary file grows until the spool's
    free space reaches spool.min_free_bytes, then is deleted while the peer still sends
    (growth stops within 1 MiB plus one fragment of the mark); when the data set finally
    ends the answer is 0xA700, and the association goes on."""
    uid = generate_uid()
    chunk = 64 * 1024
    base_used = _spool_used(catalogue_node)
    ceiling = shutil.disk_usage(catalogue_node.spool_dir).total - MIN_FREE
    highest = 0
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        peer.send(p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid))))
        peer.send(p_data_tf(pdv(3, DATASET_MORE, _big_dataset_header(uid, 0xFFFFFFF0))))
        sent = 0
        payload = p_data_tf(pdv(3, DATASET_MORE, b"\x5a" * chunk))
        refused_at = None
        while sent < ceiling + (32 << 20):
            peer.send(payload)
            sent += chunk
            if sent % (1 << 20) == 0:
                highest = max(highest, _spool_used(catalogue_node))
                if (
                    refused_at is None
                    and sent > ceiling - base_used
                    and not (catalogue_node.tmp_files())
                ):
                    refused_at = sent
                if refused_at is not None and sent > refused_at + (16 << 20):
                    break  # dropping for 16 MiB: the file is gone and stays gone
        assert refused_at is not None, f"still writing after {sent} bytes"
        assert not catalogue_node.tmp_files()
        peer.send(p_data_tf(pdv(3, DATASET_LAST, b"\x5a" * 16)))
        assert _store_status(peer) == OUT_OF_RESOURCES
        assert peer.echo(2) == SUCCESS
        peer.release()
    slack = (1 << 20) + chunk + (1 << 20)  # check interval + a fragment + our sampling
    print(f"RX-09: refused after {refused_at >> 20} MiB; spool peak {highest >> 20} MiB")
    assert highest <= ceiling + slack, f"spool reached {highest} bytes, mark {ceiling}"
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"writing the data set failed|C-STORE answered 0xA700", count=2)


def test_rx_13_spool_below_its_mark_refuses_then_recovers_without_restart(
    catalogue_node, invariant
):
    """A ballast file takes the spool's tmpfs below spool.min_free_bytes: a new C-STORE
    is answered 0xA700 and nothing is written (no file, no row); once the ballast is
    gone the next C-STORE succeeds on the same running node. Then "full while writing":
    ballast leaving 2 MiB above the mark and an 8 MiB instance: 0xA700, the partial
    file deleted."""
    ballast = catalogue_node.spool_dir / "ballast"
    free = shutil.disk_usage(catalogue_node.spool_dir).free
    refused, partial, good = generate_uid(), generate_uid(), generate_uid()
    try:
        with open(ballast, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * (free - MIN_FREE + (1 << 20)))
        with RawPeer(HOST, catalogue_node.port) as peer:
            peer.associate(contexts=CONTEXTS)
            peer.send(
                p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, refused)))
                + p_data_tf(pdv(3, DATASET_LAST, dataset_bytes(refused)))
            )
            assert _store_status(peer) == OUT_OF_RESOURCES
            assert not catalogue_node.tmp_files()
            # Room again, the same association and node: stored.
            ballast.unlink()
            peer.send(
                p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(2, CT_IMAGE, good)))
                + p_data_tf(pdv(3, DATASET_LAST, dataset_bytes(good)))
            )
            assert _store_status(peer) == SUCCESS
            # Full while writing: 2 MiB above the mark, an 8 MiB data set.
            free = shutil.disk_usage(catalogue_node.spool_dir).free
            with open(ballast, "wb") as f:
                f.write(b"\0" * (free - MIN_FREE - (2 << 20)))
            pixel = 8 << 20
            peer.send(p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(3, CT_IMAGE, partial))))
            peer.send(p_data_tf(pdv(3, DATASET_MORE, _big_dataset_header(partial, pixel))))
            for offset in range(0, pixel, 1 << 16):
                last = offset + (1 << 16) >= pixel
                peer.send(p_data_tf(pdv(3, DATASET_LAST if last else DATASET_MORE, bytes(1 << 16))))
            assert _store_status(peer) == OUT_OF_RESOURCES
            peer.release()
    finally:
        ballast.unlink(missing_ok=True)
    assert not catalogue_node.tmp_files()
    assert good in catalogue_node.uids() and not {refused, partial} & catalogue_node.uids()
    invariant.acknowledged(good)
    invariant.expect_warning(r"refusing instance|writing the data set failed|answered 0xA700", 4)


def test_rx_18_deflate_bomb_is_refused_with_memory_flat(catalogue_node, invariant):
    """A Deflated Explicit VR LE data set of 2 MiB that inflates to ~2 GiB (scaled from
    1 MiB -> 10 GiB): the walker inflates in 1 MiB steps and stops at its 1 GiB cap, the
    answer is a failure (0xC000 cannot understand), the listener's peak RSS grows by
    less than 64 MiB, and nothing is kept. Inflating that 1 GiB runs on the listener's
    event loop (seconds of CPU): on a loaded machine this module's 3 s PDU deadline may
    fire first, and an ABORT-U is an equally valid refusal here."""
    uid = generate_uid()
    header = _big_dataset_header(uid, 0xFFFFFFF0)
    # After a full flush the compressor starts afresh, so one 16 MiB block of zeros
    # compresses to the same bytes every time: compress it once, repeat it 128 times.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    prefix = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(16 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    deflated = [prefix, block * 128, compressor.flush()]  # 2 GiB of zeros
    data = b"".join(deflated)
    watch = ProcessWatch(catalogue_node.listener_pids())
    contexts = ((1, VERIFICATION, (IMPLICIT_LE,)), (3, CT_IMAGE, (DEFLATED,)))
    with RawPeer(HOST, catalogue_node.port, timeout=60) as peer:
        peer.associate(contexts=contexts)
        peer.send(p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid))))
        for offset in range(0, len(data), 1 << 16):
            last = offset + (1 << 16) >= len(data)
            chunk = data[offset : offset + (1 << 16)]
            peer.send(p_data_tf(pdv(3, DATASET_LAST if last else DATASET_MORE, chunk)))
        pdu_type, body = peer.recv_pdu(within=60)
        status = parse_command_status(bytes([4, 0]) + len(body).to_bytes(4, "big") + body)
        if pdu_type == 0x04:
            assert status is not None
            assert 0xC000 <= status <= 0xCFFF or status == OUT_OF_RESOURCES, hex(status)
            peer.release()
        else:  # the listener's loop inflated past this module's 3 s PDU deadline
            assert pdu(pdu_type, body) == ABORT_U, body.hex()
    growth = watch.hwm_growth()
    print(f"RX-18: {len(data)} deflated bytes, PDU {pdu_type}, status {status}, RSS +{growth} KiB")
    assert growth < 64 * 1024
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"C-STORE answered 0x(C|A7)|a PDU did not complete")


def test_rx_18_element_bomb_does_not_block_the_listener(catalogue_node, invariant):
    """A deflated data set of many empty 8-byte elements (scaled: 24 MiB inflated from
    ~40 KB, ~674:1, walked in ~1.3 s: under this module's 3 s deadlines, which also run
    while a store's answer is pending) makes the walker slow, unlike
    the zeros bomb: it is walked off the event loop, so C-ECHOes on a second association
    keep being answered while the bomb's C-STORE is still unanswered, and the store then
    gets its answer (success: under the cap) with no temporary file left behind."""
    uid = generate_uid()
    ds = catalogue_dataset(uid)
    del ds.PixelData
    element = struct.pack("<HH2sH", 0x7FE1, 0x0001, b"LO", 0)  # 8 bytes, no value
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    prefix = compressor.compress(encode_dataset(ds, EXPL)) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(element * (1 << 17)) + compressor.flush(zlib.Z_FULL_FLUSH)
    data = prefix + block * 24 + compressor.flush()  # 24 blocks of 1 MiB
    contexts = ((1, VERIFICATION, (IMPLICIT_LE,)), (3, CT_IMAGE, (DEFLATED,)))
    with (
        RawPeer(HOST, catalogue_node.port, timeout=60) as bomb,
        RawPeer(HOST, catalogue_node.port) as echo,
    ):
        echo.associate()
        bomb.associate(contexts=contexts)
        bomb.send(p_data_tf(pdv(3, COMMAND_LAST, c_store_rq(1, CT_IMAGE, uid))))
        for offset in range(0, len(data), 1 << 16):
            last = offset + (1 << 16) >= len(data)
            chunk = data[offset : offset + (1 << 16)]
            bomb.send(p_data_tf(pdv(3, DATASET_LAST if last else DATASET_MORE, chunk)))
        answered_meanwhile = 0
        started = time.monotonic()
        while True:
            ready, _, _ = select.select([bomb.sock], [], [], 0)
            if ready:
                break
            echo.send(p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(answered_meanwhile + 1))))
            pdu_type, body = echo.recv_pdu(within=10)
            assert pdu_type == 0x04
            echo_status = parse_command_status(bytes([4, 0]) + len(body).to_bytes(4, "big") + body)
            assert echo_status == 0x0000
            answered_meanwhile += 1
        walk = time.monotonic() - started
        pdu_type, body = bomb.recv_pdu(within=60)
        status = parse_command_status(bytes([4, 0]) + len(body).to_bytes(4, "big") + body)
        bomb.release()
        echo.release()
    print(
        f"RX-18 element bomb: {len(data)} deflated bytes, {answered_meanwhile} echoes"
        f" answered during {walk:.2f} s before status {status}"
    )
    assert pdu_type == 0x04 and status == 0x0000, status
    assert answered_meanwhile >= 2  # answered while the bomb's store was still unanswered
    assert not catalogue_node.tmp_files()
    assert uid in catalogue_node.uids()
    invariant.acknowledged(uid)
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# bounded negotiation, the write deadline, inherited sockets
# --------------------------------------------------------------------------------------
def test_rx_12_associate_rq_with_10000_transfer_syntaxes_is_refused_by_the_size_cap(
    catalogue_node, invariant
):
    """10,000 transfer-syntax sub-items cannot fit one context item (2-byte length), so
    they are spread over 127 contexts: the RQ (~300 KB) is past the 64 KiB A-ASSOCIATE
    cap, refused with ABORT-1 before its body is read."""
    syntaxes = [f"1.2.840.10008.1.2.4.{n}" for n in range(10_000)]
    per_context = len(syntaxes) // 127 + 1
    contexts = [
        (2 * i + 1, CT_IMAGE, syntaxes[i * per_context : (i + 1) * per_context]) for i in range(127)
    ]
    with RawPeer(HOST, catalogue_node.port) as peer:
        rq = associate_rq(contexts=contexts)
        assert len(rq) > 65536
        peer.try_send(rq)
        peer.expect(ABORT_1, within=MARGIN)
    invariant.expect_warning(r"aborted \(source 0, reason 0\)")


def test_rx_12_one_context_near_the_item_limit_is_negotiated_in_bounded_time(
    catalogue_node, invariant
):
    """One presentation context item close to its 65,535-byte limit (2,200 unknown
    transfer syntaxes, then Explicit VR LE) inside the 64 KiB cap: accepted, quickly
    enough that the case's deadline (ARTIM + margin) holds, and the node answers."""
    syntaxes = [f"1.2.840.10008.1.2.4.{n}" for n in range(2_200)] + [EXPLICIT_LE]
    context = presentation_context(3, CT_IMAGE, syntaxes)
    assert 50_000 < len(context) < 65_535
    with RawPeer(HOST, catalogue_node.port) as peer:
        ac = peer.associate(contexts=[(1, VERIFICATION, (IMPLICIT_LE,)), (3, CT_IMAGE, syntaxes)])
        assert bytes([0x21, 0x00]) in ac
        assert peer.echo() == SUCCESS
        peer.release()
    invariant.expect_no_warning()


def test_rx_16_listener_side_peer_that_stops_reading_is_aborted_at_the_write_deadline(
    catalogue_node, invariant
):
    """The listener's half of RX-16: a peer that sends C-ECHO-RQs without reading the
    responses fills its receive window; once the listener's writes stall for
    listener.write_timeout the association is aborted (reset) and its slot freed.

    The peer keeps its socket's default receive buffer: shrinking it on an established
    connection (SO_RCVBUF 4096, as this case once did) leaves the window already
    advertised larger than the buffer, so the peer's own kernel drops the listener's
    segments, the ACKs of the peer's data with them; its sends then stall in
    retransmission backoff, the listener hears nothing and aborts at its idle timeout,
    and the peer, receiving nothing, never sees the reset (1 failure in 2 CI runs).
    A send that times out part-way is resumed where it stopped, so the stream stays
    whole PDUs."""
    offset = catalogue_node.log_size()
    with RawPeer(HOST, catalogue_node.port) as peer:
        sock = peer.sock
        assert sock is not None
        peer.associate(contexts=CONTEXTS)
        batch = p_data_tf(pdv(1, COMMAND_LAST, c_echo_rq(1))) * 64
        pending = memoryview(b"")
        started = time.monotonic()
        sock.settimeout(1)
        # The listener's socket buffer (megabytes on loopback) fills before its own
        # write buffer does and the deadline starts: a generous bound, not a speed.
        while time.monotonic() - started < WRITE_DEADLINE + 6 * MARGIN:
            pending = pending or memoryview(batch)
            try:
                pending = pending[sock.send(pending) :]
            except TimeoutError:
                continue  # our own send buffer is full too: the listener stopped reading
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            raise AssertionError(
                "the listener kept the stalled association open:\n"
                + catalogue_node.log_since(offset)
                + _tcp_state(catalogue_node.port)
            )
    invariant.expect_warning(r"peer stopped reading for 3 s, aborting")


def _tcp_state(port: int) -> str:
    """The kernel's view of the connections on ``port`` (ss), for a failure message."""
    ss = shutil.which("ss")
    if ss is None:
        return ""
    argv = [ss, "-tnoim", "state", "all", f"( sport = :{port} or dport = :{port} )"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(entry)
            if target.startswith("socket:["):
                out.add(target[8:-1])
    return out


def _tcp_inodes(port: int) -> dict[str, str]:
    """inode -> TCP state (hex) of every socket bound to local ``port``."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    out[fields[9]] = fields[3]
    return out


def test_rx_17_only_listeners_hold_the_dicom_port_or_its_associations(catalogue_node, invariant):
    """No child but a listener has the listening socket or an association's socket
    (an fd inherited across fork would keep the port or a peer's connection alive)."""
    invariant.expect_no_warning()
    children = catalogue_node.children()
    listeners = set(catalogue_node.listener_pids())
    assert catalogue_node.proc is not None
    others = {name: pid for name, pid in children.items() if pid not in listeners}
    others["supervisor"] = catalogue_node.proc.pid
    with RawPeer(HOST, catalogue_node.port) as peer:
        peer.associate(contexts=CONTEXTS)
        port_sockets = _tcp_inodes(catalogue_node.port)
        assert "0A" in port_sockets.values() and "01" in port_sockets.values(), port_sockets
        held = {inode for pid in listeners for inode in _socket_inodes(pid)}
        assert {i for i, state in port_sockets.items() if state in ("0A", "01")} & held
        for name, pid in others.items():
            leaked = _socket_inodes(pid) & set(port_sockets)
            assert not leaked, f"{name} (pid {pid}) holds DICOM-port sockets {leaked}"
        peer.release()
