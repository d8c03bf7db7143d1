"""Properties of the dataset walker (router/walker.py): any chunking gives the same
answer, generated data sets read back as written, and no input makes it raise anything
but DatasetError."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pydicom.data
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from protocol.part10 import read_part10
from protocol.uids import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
)
from router.walker import DatasetError, DatasetWalker, Key

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
SAMPLES = [
    "rtplan.dcm",  # implicit, nested
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "JPEG2000-embedded-sequence-delimiter.dcm",  # encapsulated
    "UN_sequence.dcm",
    "test-SR.dcm",
]
WANTED = frozenset({0x00080005, 0x00080016, 0x00080018, 0x00100010, 0x00280010, 0x0040A730})
SYNTAXES = [EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE]

PATIENT_NAME, STUDY_DESCRIPTION, REF_SEQ, REF_UID = 0x00100010, 0x00081030, 0x00081140, 0x00081155


def _dataset_bytes(name: str) -> tuple[str, bytes]:
    meta = read_part10(TEST_FILES / name)
    return meta.transfer_syntax, (TEST_FILES / name).read_bytes()[meta.dataset_offset :]


def _walk(
    data: bytes,
    syntax: str,
    sizes: list[int] | None = None,
    wanted: frozenset[int] = WANTED,
    in_sequences: frozenset[tuple[int, int]] = frozenset(),
) -> dict[Key, tuple[str, ...]] | str:
    """The walker's answer, or the text of its DatasetError."""
    walker = DatasetWalker(syntax, wanted, in_sequences)
    sizes = sizes or [max(len(data), 1)]
    offset = i = 0
    try:
        while offset < len(data):
            size = sizes[i % len(sizes)]
            walker.feed(data[offset : offset + size])
            offset += size
            i += 1
        return walker.finish()
    except DatasetError as exc:
        return f"error: {exc}"


def _encode(ds: Dataset, syntax: str) -> bytes:
    if syntax == DEFLATED_EXPLICIT_VR_LE:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        return deflater.compress(_encode(ds, EXPLICIT_VR_LE)) + deflater.flush()
    buffer = io.BytesIO()
    ds.save_as(
        buffer,
        implicit_vr=syntax == IMPLICIT_VR_LE,
        little_endian=syntax != EXPLICIT_VR_BE,
        enforce_file_format=False,
    )
    return buffer.getvalue()


chunkings = st.lists(st.integers(1, 300), min_size=1, max_size=30)


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")
@given(name=st.sampled_from(SAMPLES), sizes=chunkings)
def test_any_chunking_gives_the_same_answer(name: str, sizes: list[int]) -> None:
    syntax, data = _dataset_bytes(name)
    whole = _walk(data, syntax)
    assert isinstance(whole, dict)
    assert _walk(data, syntax, sizes) == whole


# Text without backslash (the value separator) and without the padding characters the
# walker strips; person names without the insignificant trailing ^ and =.
words = st.text(st.characters(codec="latin-1", categories=("L", "N")), min_size=1, max_size=20)
names = st.builds(lambda a, b: f"{a}^{b}", words, words)
uids = st.lists(st.integers(1, 99999), min_size=2, max_size=8).map(
    lambda parts: ".".join(map(str, parts))
)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[Dataset, dict[Key, tuple[str, ...]]]:
    """A data set with nested sequences (random length encodings) and what it holds."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    expected: dict[Key, tuple[str, ...]] = {}
    if draw(st.booleans()):
        ds.StudyDescription = draw(words)
        expected[STUDY_DESCRIPTION] = (ds.StudyDescription,)
    items = []
    ref_uids: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        child = Dataset()
        if draw(st.booleans()):
            child.ReferencedSOPInstanceUID = draw(uids)
            ref_uids.append(child.ReferencedSOPInstanceUID)
        depth = draw(st.integers(0, 5))
        inner = child
        for _ in range(depth):  # deeper items: walked, never collected
            nested = Dataset()
            nested.ReferencedSOPInstanceUID = draw(uids)
            inner.ReferencedImageSequence = Sequence([nested])
            inner.ReferencedImageSequence.is_undefined_length = draw(st.booleans())
            nested.is_undefined_length_sequence_item = draw(st.booleans())
            inner = nested
        child.is_undefined_length_sequence_item = draw(st.booleans())
        items.append(child)
    keep_empty: bool = draw(st.booleans())
    if items or keep_empty:
        ds.ReferencedImageSequence = Sequence(items)
        ds.ReferencedImageSequence.is_undefined_length = draw(st.booleans())
        expected[REF_SEQ] = ()
    if ref_uids:
        expected[(REF_SEQ, REF_UID)] = tuple(ref_uids)
    ds.PatientName = draw(names)
    expected[PATIENT_NAME] = (str(ds.PatientName),)
    if draw(st.booleans()):
        ds.add_new(0x7FE00010, "OB", draw(st.binary(max_size=64)) * 2)
    return ds, expected


@given(generated=datasets(), syntax=st.sampled_from(SYNTAXES), sizes=chunkings)
def test_generated_data_sets_read_back_as_written(
    generated: tuple[Dataset, dict[Key, tuple[str, ...]]], syntax: str, sizes: list[int]
) -> None:
    ds, expected = generated
    data = _encode(ds, syntax)
    wanted = frozenset({PATIENT_NAME, STUDY_DESCRIPTION, REF_SEQ})
    in_sequences = frozenset({(REF_SEQ, REF_UID)})
    assert _walk(data, syntax, sizes, wanted, in_sequences) == expected


@given(generated=datasets(), syntax=st.sampled_from(SYNTAXES[:3]), data=st.data())
def test_every_proper_prefix_of_a_single_sequence_fails(
    generated: tuple[Dataset, dict[Key, tuple[str, ...]]], syntax: str, data: st.DataObject
) -> None:
    ds, _ = generated
    single = Dataset()
    single.ReferencedImageSequence = ds.get("ReferencedImageSequence", Sequence([Dataset()]))
    encoded = _encode(single, syntax)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    sizes = data.draw(chunkings)
    assert str(_walk(encoded[:cut], syntax, sizes)).startswith("error:")


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")
@given(
    name=st.sampled_from(SAMPLES),
    syntax=st.sampled_from([*SYNTAXES, None]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 1 << 20),
    sizes=chunkings,
)
def test_mutated_data_sets_raise_only_dataset_error(
    name: str, syntax: str | None, edits: list[tuple[int, int]], cut: int, sizes: list[int]
) -> None:
    own_syntax, original = _dataset_bytes(name)
    data = bytearray(original[: max(cut, len(original) // 2)])
    for offset, value in edits:
        data[offset % len(data)] = value
    # Any answer or a DatasetError is fine; any other exception fails the test.
    _walk(bytes(data), syntax or own_syntax, sizes, WANTED, frozenset({(0x0040A730, 0x0040A040)}))


@given(data=st.binary(max_size=600), syntax=st.sampled_from(SYNTAXES), sizes=chunkings)
def test_random_bytes_raise_only_dataset_error(data: bytes, syntax: str, sizes: list[int]) -> None:
    _walk(data, syntax, sizes)
