"""A 1 GiB instance through our storescp with bounded memory (DESIGN §2: datasets stream
to disk, never held whole).

Scaled size here: 1 GiB, peak RSS (VmHWM) of the storescp process under 150 MB. The
catalogue's full size (a 5 GiB dataset) runs the same code with LARGE_INSTANCE_BYTES set
in the environment, on demand.

The file is built without holding it in memory: pydicom writes the Part 10 header and a
small dataset, then a (7FE0,0010) OB element header and the value are appended by hand
in chunks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from interop_support import (
    CT_IMAGE,
    HOST,
    describe,
    make_dataset,
    received_files,
    require_dcmtk,
    run_bounded,
    write_part10,
)
from pydicom.uid import ExplicitVRLittleEndian

SIZE = int(os.environ.get("LARGE_INSTANCE_BYTES", str(1 << 30)))  # even: OB value length
RSS_LIMIT_KIB = 150 * 1000  # 150 MB
CHUNK = 8 * 1024 * 1024 + 6  # not a multiple of any PDU size: misordering changes the hash


def _write_large_instance(path: Path, size: int) -> tuple[str, int, str]:
    """Returns (SOP Instance UID, dataset offset, BLAKE2b of the dataset bytes)."""
    ds = make_dataset(CT_IMAGE, "CT", rows=1, columns=1)
    del ds.PixelData  # appended by hand below
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    # Frames of 16384 x 16384 x 1 byte (256 MiB) make 1 GiB a whole number of frames.
    ds.Rows = 16384
    ds.Columns = 16384
    ds.NumberOfFrames = max(1, size // (16384 * 16384))
    write_part10(ds, path, ExplicitVRLittleEndian)
    dataset_offset = _dataset_offset(path)
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        f.seek(dataset_offset)
        digest.update(f.read())
    header = bytes.fromhex("E0 7F 10 00") + b"OB\x00\x00" + size.to_bytes(4, "little")
    block = os.urandom(CHUNK)
    with open(path, "ab") as f:
        f.write(header)
        digest.update(header)
        remaining = size
        while remaining:
            piece = block[: min(CHUNK, remaining)]
            f.write(piece)
            digest.update(piece)
            remaining -= len(piece)
    return str(ds.SOPInstanceUID), dataset_offset, digest.hexdigest()


def _dataset_offset(path: Path) -> int:
    """Offset of the dataset: preamble + 'DICM' + the (0002,0000) element + group 2."""
    with open(path, "rb") as f:
        head = f.read(144)
    assert head[128:132] == b"DICM", path
    assert head[132:138] == bytes.fromhex("02 00 00 00") + b"UL", "no (0002,0000) group length"
    return 144 + int.from_bytes(head[140:144], "little")


def _digest_from(path: Path, offset: int) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.fixture(scope="module")
def large_instance(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, str, int, str]]:
    """Built once for the module (writing 1 GiB takes a few seconds), removed after."""
    directory = tmp_path_factory.mktemp("large")
    path = directory / "large.dcm"
    uid, offset, digest = _write_large_instance(path, SIZE)
    assert path.stat().st_size > SIZE
    # pydicom reads it back (header only) as the instance we meant.
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    yield path, uid, offset, digest
    path.unlink()


def _check_received(out: Path, original: Path, uid: str, offset: int, digest: str) -> None:
    files = received_files(out)
    assert [p.name for p in files] == [f"{uid}.dcm"], files
    received = files[0]
    dataset_length = original.stat().st_size - offset
    received_offset = _dataset_offset(received)
    assert received.stat().st_size - received_offset == dataset_length, (
        f"received {received.stat().st_size - received_offset} dataset bytes, sent {dataset_length}"
    )
    assert _digest_from(received, received_offset) == digest, "dataset bytes differ"
    meta = pydicom.dcmread(received, stop_before_pixels=True)
    assert meta.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SOPInstanceUID == uid
    received.unlink()  # 1 GiB less on the disk for the next test


@pytest.mark.slow
def test_1gib_instance_from_dcmtk_storescu_stored_with_rss_under_150mb(
    run_app, large_instance, tmp_path
):
    storescu = require_dcmtk("storescu")["storescu"]
    path, uid, offset, digest = large_instance
    out = tmp_path / "out"
    out.mkdir()
    scp = run_app("storescp", "-od", str(out))
    result = run_bounded(
        [storescu, "-R", "-xe", "-aec", "STORESCP", HOST, str(scp.port), str(path)],
        timeout=240,
        env={"TCP_NODELAY": "1"},
    )
    hwm = _vm_hwm_kib(scp.pid)
    assert result.returncode == 0, describe(result) + "\nserver:\n" + scp.stderr()
    assert hwm < RSS_LIMIT_KIB, f"storescp peak RSS {hwm} KiB"
    _check_received(out, path, uid, offset, digest)


@pytest.mark.slow
def test_1gib_instance_from_our_storescu_stored_with_rss_under_150mb(
    run_app, call_app, large_instance, tmp_path
):
    path, uid, offset, digest = large_instance
    out = tmp_path / "out"
    out.mkdir()
    scp = run_app("storescp", "-od", str(out))
    result = call_app("storescu", "-aec", "STORESCP", HOST, str(scp.port), str(path), timeout=240)
    hwm = _vm_hwm_kib(scp.pid)
    assert result.returncode == 0, describe(result) + "\nserver:\n" + scp.stderr()
    assert hwm < RSS_LIMIT_KIB, f"storescp peak RSS {hwm} KiB"
    _check_received(out, path, uid, offset, digest)
