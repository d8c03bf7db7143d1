"""The streaming dataset walker (router/walker.py), against pydicom's reading of the same
bytes and the bad-dataset cases of catalogue B.6."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pydicom.data
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset

from protocol.part10 import read_part10
from protocol.uids import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_LE, IMPLICIT_VR_LE
from router.walker import DatasetError, DatasetWalker, walk_file

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
WANTED = frozenset(
    {0x00080060, 0x00100010, 0x00080018, 0x00080016, 0x0020000D, 0x00280010, 0x00080008}
)
BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "rtplan.dcm",
    "rtdose_rle.dcm",
    "MR_small_implicit.dcm",
]


def _dataset_bytes(path: Path) -> tuple[str, bytes]:
    meta = read_part10(path)
    return meta.transfer_syntax, path.read_bytes()[meta.dataset_offset :]


def _expected(path: Path, tags: frozenset[int]) -> dict[int, tuple[str, ...]]:
    ds = dcmread(path)
    out: dict[int, tuple[str, ...]] = {}
    for tag in tags:
        if tag in ds:
            value = ds[tag].value
            values = list(value) if type(value).__name__ in ("MultiValue", "list") else [value]
            texts = tuple(str(v).strip() for v in values if v not in (None, ""))
            out[tag] = texts
    return out


@pytest.mark.parametrize("name", BUNDLED)
def test_values_agree_with_pydicom(name: str) -> None:
    path = TEST_FILES / name
    if not path.exists():
        pytest.skip(f"{name} is not bundled with this pydicom")
    got = walk_file(path, WANTED)
    assert {k: v for k, v in got.items() if v} == {
        k: v for k, v in _expected(path, WANTED).items() if v
    }


def test_values_inside_a_sequence_are_collected() -> None:
    # rtplan: BeamSequence (300A,00B0) items hold TreatmentMachineName (300A,00B2).
    got = walk_file(TEST_FILES / "rtplan.dcm", (), [(0x300A00B0, 0x300A00B2)])
    expected = tuple(
        beam.TreatmentMachineName for beam in dcmread(TEST_FILES / "rtplan.dcm").BeamSequence
    )
    assert got[(0x300A00B0, 0x300A00B2)] == expected


@given(st.lists(st.integers(1, 400), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_result(sizes: list[int]) -> None:
    syntax, data = _dataset_bytes(TEST_FILES / "rtplan.dcm")
    walker = DatasetWalker(syntax, WANTED)
    offset, i = 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        walker.feed(data[offset : offset + size])
        offset += size
        i += 1
    assert walker.finish() == walk_file(TEST_FILES / "rtplan.dcm", WANTED)


def test_ds01_truncation_inside_an_element_is_caught_at_every_offset() -> None:
    syntax, data = _dataset_bytes(TEST_FILES / "rtplan.dcm")
    assert syntax == IMPLICIT_VR_LE
    boundaries = _top_level_element_boundaries(data)
    for cut in range(1, len(data)):
        walker = DatasetWalker(syntax, WANTED)
        if cut in boundaries:
            continue  # a dataset cut between two top-level elements is well-formed
        with pytest.raises(DatasetError):
            walker.feed(data[:cut])
            walker.finish()


def _top_level_element_boundaries(data: bytes) -> set[int]:
    """Offsets where a top-level element ends (rtplan.dcm is Implicit VR LE)."""
    offsets = set()
    offset = 0
    while offset < len(data):
        length = struct.unpack_from("<L", data, offset + 4)[0]
        if length == 0xFFFFFFFF:
            return offsets  # stop at the first undefined length
        offset += 8 + length
        offsets.add(offset)
    return offsets


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _walk(data: bytes, syntax: str = EXPLICIT_VR_LE, **kw: int) -> dict[object, tuple[str, ...]]:
    walker = DatasetWalker(syntax, WANTED, **kw)  # type: ignore[arg-type]
    walker.feed(data)
    return walker.finish()  # type: ignore[return-value]


def test_ds03_length_past_the_end_allocates_nothing_and_fails() -> None:
    data = struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 0xFFF0) + b"AB"
    with pytest.raises(DatasetError):
        _walk(data)
    implicit = struct.pack("<HHL", 0x0010, 0x0010, 0xFFFFFFF0) + b"AB"
    with pytest.raises(DatasetError):
        _walk(implicit, IMPLICIT_VR_LE)


def test_ds04_undefined_length_on_a_text_vr_fails() -> None:
    data = struct.pack("<HH2sHL", 0x0010, 0x0010, b"UT", 0, 0xFFFFFFFF) + b"ABCD"
    with pytest.raises(DatasetError):
        _walk(data)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<HHL", 0xFFFE, 0xE0DD, 0),  # stray sequence delimiter at top level
        struct.pack("<HHL", 0xFFFE, 0xE00D, 0),  # stray item delimiter
        struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"abcd",  # an item where an element belongs
        struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF),  # no delimiters at all
    ],
)
def test_ds05_stray_or_missing_delimiters_fail(data: bytes) -> None:
    with pytest.raises(DatasetError):
        _walk(data)


@pytest.mark.parametrize("depth", [65, 300, 10_000])
def test_ds06_nesting_past_the_limit_fails_without_recursion_error(depth: int) -> None:
    opening = (
        struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * depth
    with pytest.raises(DatasetError, match="nested deeper"):
        _walk(opening)


def test_nesting_within_the_limit_is_fine() -> None:
    depth = 10
    opening = (
        struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * depth
    closing = (
        struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    ) * depth
    assert _walk(opening + closing) == {}


def test_ds12_empty_dataset_fails() -> None:
    with pytest.raises(DatasetError, match="empty"):
        DatasetWalker(EXPLICIT_VR_LE, WANTED).finish()


def test_rx18_deflate_bomb_is_bounded() -> None:
    bomb_source = _element(0x00100010, b"PN", b"AB") + _element(0x7FE00010, b"OB", bytes(1 << 20))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(bomb_source) + compressor.flush()
    walker = DatasetWalker(DEFLATED_EXPLICIT_VR_LE, WANTED, max_inflated_bytes=64 * 1024)
    with pytest.raises(DatasetError, match="inflates past"):
        walker.feed(bomb)
        walker.finish()


def test_huge_unwanted_value_is_skipped_not_buffered() -> None:
    walker = DatasetWalker(EXPLICIT_VR_LE, WANTED)
    walker.feed(_element(0x00100010, b"PN", b"DOE^JOHN"))
    walker.feed(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 1 << 30))
    chunk = bytes(1 << 20)
    for _ in range(1024):
        walker.feed(chunk)
        assert len(walker._pending) == 0
    assert walker.finish() == {0x00100010: ("DOE^JOHN",)}


def test_specific_character_set_decodes_person_names() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    assert _walk(buffer.getvalue())[0x00100010] == ("Müller^Jürgen",)
