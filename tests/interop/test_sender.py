"""workers/sender.py against real destinations: DCMTK storescp and our storescp.

Association reuse, learning new contexts, and the outcome of each destination
behaviour the catalogue lists (B.8 DST-01/05/06/07), classified by workers/retry.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from interop_support import (
    CT_IMAGE,
    MR_IMAGE,
    ProcessManager,
    Server,
    bundled_file,
    free_port,
    make_dataset,
    received_files,
    require_dcmtk,
    write_part10,
)

from protocol.part10 import read_part10
from protocol.uids import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from workers.retry import Failure, Verdict, classify
from workers.sender import Destination, DestinationPool, Item


def _item(path: Path) -> Item:
    meta = read_part10(path)
    return Item(path, meta.sop_class_uid, meta.transfer_syntax)


def _files(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        sop_class, modality = (CT_IMAGE, "CT") if i % 2 else (MR_IMAGE, "MR")
        syntax = EXPLICIT_VR_LE if i % 3 else IMPLICIT_VR_LE
        out.append(write_part10(make_dataset(sop_class, modality), directory / f"{i}.dcm", syntax))
    return out


async def _send_all(pool: DestinationPool, files: list[Path]) -> list[Verdict]:
    try:
        outcomes = await asyncio.gather(*(pool.send(_item(f)) for f in files))
    finally:
        await pool.close()
    return [classify(o)[0] for o in outcomes]


def test_many_instances_over_reused_associations_to_dcmtk(
    processes: ProcessManager, tmp_path: Path
) -> None:
    tool = require_dcmtk("storescp")["storescp"]
    out = tmp_path / "dcmtk-out"
    out.mkdir()
    server = processes.start(
        "dcmtk-storescp", lambda p: [tool, "-v", "+xa", "-od", str(out), str(p)], output_dir=out
    )
    files = _files(tmp_path / "send", 12)
    # DCMTK's storescp serves one association at a time (no --fork): one slot.
    pool = DestinationPool(Destination("pacs", "ANY-SCP", "127.0.0.1", server.port, 1), "ROUTER")
    verdicts = asyncio.run(_send_all(pool, files))
    assert verdicts == [Verdict.DONE] * 12
    assert len(received_files(out)) == 12
    # An association is reopened only when an instance needs a (class, syntax) pair it
    # did not propose: 4 pairs here, so at most 4 associations for 12 instances.
    associations = server.stdout().count("Association Received") + server.stderr().count(
        "Association Received"
    )
    assert 1 <= associations <= 4


def test_parallel_associations_to_a_concurrent_destination(
    run_app: Callable[..., Server], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    server = run_app("storescp", "-od", str(out), "-v")
    files = _files(tmp_path / "send", 20)
    pool = DestinationPool(Destination("pacs", "STORESCP", "127.0.0.1", server.port, 3), "ROUTER")
    assert asyncio.run(_send_all(pool, files)) == [Verdict.DONE] * 20
    assert len(received_files(out)) == 20
    accepted = server.stderr().count("association accepted")
    assert 1 <= accepted <= 3 * 4


def test_dst01_nothing_listening_is_retried(tmp_path: Path) -> None:
    files = _files(tmp_path / "send", 1)
    pool = DestinationPool(Destination("gone", "GONE", "127.0.0.1", free_port()), "ROUTER")
    outcome = asyncio.run(pool.send(_item(files[0])))
    assert outcome.failure is Failure.CONNECTION_REFUSED
    assert classify(outcome)[0] is Verdict.RETRY


def test_dst05_wrong_called_ae_is_dead_lettered(
    run_app: Callable[..., Server], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    server = run_app("storescp", "-od", str(out), "-aet", "PACS", "--require-called-aet")
    files = _files(tmp_path / "send", 1)
    pool = DestinationPool(Destination("pacs", "NOT-PACS", "127.0.0.1", server.port), "ROUTER")
    outcome = asyncio.run(pool.send(_item(files[0])))
    assert outcome.failure is Failure.REJECTED_PERMANENT
    assert classify(outcome)[0] is Verdict.DEAD
    assert received_files(out) == []


def test_dst07_transfer_syntax_not_accepted_is_dead_lettered_not_transcoded(
    processes: ProcessManager, tmp_path: Path
) -> None:
    tool = require_dcmtk("storescp")["storescp"]
    out = tmp_path / "dcmtk-out"
    out.mkdir()
    # Without +xa DCMTK's storescp accepts uncompressed transfer syntaxes only.
    server = processes.start(
        "dcmtk-storescp", lambda p: [tool, "-od", str(out), str(p)], output_dir=out
    )
    jpeg = bundled_file("jpeg_baseline", tmp_path / "send")
    plain = _files(tmp_path / "plain", 1)[0]
    pool = DestinationPool(Destination("pacs", "ANY-SCP", "127.0.0.1", server.port, 1), "ROUTER")

    async def both() -> list[Verdict]:
        first = await pool.send(_item(jpeg))
        second = await pool.send(_item(plain))  # the pool goes on after a refusal
        await pool.close()
        return [classify(first)[0], classify(second)[0]]

    assert asyncio.run(both()) == [Verdict.DEAD, Verdict.DONE]
    assert len(received_files(out)) == 1


def test_a_pool_grows_and_shrinks_with_its_share_and_counts_its_open_associations(
    run_app: Callable[..., Server], tmp_path: Path
) -> None:
    """The dispatcher's share of a destination's node-wide limit sets how many
    associations a worker's pool may open (router/dispatcher.py): growing adds slots at
    once; shrinking releases associations as their slots come free."""
    out = tmp_path / "out"
    out.mkdir()
    server = run_app("storescp", "-od", str(out), "-v")
    files = _files(tmp_path / "send", 12)
    pool = DestinationPool(Destination("pacs", "STORESCP", "127.0.0.1", server.port, 1), "ROUTER")

    async def scenario() -> tuple[int, int, int, int]:
        assert pool.open_associations == 0
        await pool.send(_item(files[0]))
        one = pool.open_associations  # idle, still open
        pool.resize(3)
        await asyncio.gather(*(pool.send(_item(f)) for f in files[1:]))
        grown = pool.open_associations
        pool.resize(1)
        await asyncio.gather(*(pool.send(_item(f)) for f in files[:3]))
        shrunk = pool.open_associations
        await pool.close()
        return one, grown, shrunk, pool.open_associations

    one, grown, shrunk, closed = asyncio.run(scenario())
    assert (one, grown, shrunk, closed) == (1, 3, 1, 0)
    assert len(received_files(out)) == 12
