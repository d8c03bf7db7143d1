"""router.listener.BackgroundWalk (catalogue RX-18): a deflated data set walked off the
event loop from its spool file, with the same answers as the walker fed directly."""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from pathlib import Path

from protocol.uids import DEFLATED_EXPLICIT_VR_LE
from router.listener import BackgroundWalk
from router.walker import DatasetWalker

SOP_INSTANCE_UID = 0x00080018


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _deflated(dataset: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(dataset) + compressor.flush()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _walk(path: Path, chunks: list[bytes], cap: int = 1 << 30) -> BackgroundWalk:
    walker = DatasetWalker(
        DEFLATED_EXPLICIT_VR_LE, frozenset({SOP_INSTANCE_UID}), max_inflated_bytes=cap
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b"META")
        walk = BackgroundWalk(walker, path, 4)
        end = 4
        for chunk in chunks:
            os.write(fd, chunk)
            end += len(chunk)
            walk.written(end)
            await asyncio.sleep(0)
        await walk.wait()
    finally:
        os.close(fd)
    return walk


def test_background_walk_reads_the_spool_file_as_it_grows(tmp_path: Path) -> None:
    dataset = (
        _element(0x0008, 0x0018, b"UI", b"1.2.3.4\0") + _element(0x0009, 0x0001, b"LO", b"") * 5000
    )
    data = _deflated(dataset)
    before = _open_fds()
    walk = asyncio.run(_walk(tmp_path / "t", [data[i : i + 100] for i in range(0, len(data), 100)]))
    assert walk.error is None
    assert walk.values[SOP_INSTANCE_UID] == ("1.2.3.4",)
    assert _open_fds() == before  # the thread closed its descriptor


def test_background_walk_past_the_inflation_cap_is_an_error(tmp_path: Path) -> None:
    data = _deflated(_element(0x0009, 0x0001, b"LO", b"") * 100_000)  # 800,000 bytes
    before = _open_fds()
    walk = asyncio.run(_walk(tmp_path / "t", [data], cap=100_000))
    assert walk.error is not None and "limit of 100000" in str(walk.error)
    assert _open_fds() == before


def test_background_walk_stopped_closes_its_descriptor(tmp_path: Path) -> None:
    async def run() -> BackgroundWalk:
        path = tmp_path / "t"
        path.write_bytes(b"META")
        walk = BackgroundWalk(DatasetWalker(DEFLATED_EXPLICIT_VR_LE, frozenset()), path, 4)
        walk.stop()
        walk._thread.join(10)
        await asyncio.sleep(0)
        return walk

    before = _open_fds()
    walk = asyncio.run(run())
    assert not walk._thread.is_alive()
    assert walk.error is not None  # stopped: never counts as walked
    assert _open_fds() == before
