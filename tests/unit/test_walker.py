"""The streaming dataset walker (router/walker.py): values against pydicom's reading of
the same bytes, chunking, and the bad data sets of catalogue B.6 (DS-xx) and RX-18."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from protocol.part10 import read_part10
from protocol.uids import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
)
from router.walker import DatasetError, DatasetWalker, Key, walk_file

DATA = Path(pydicom.data.__file__).parent
TEST_FILES = DATA / "test_files"
CHARSET_FILES = DATA / "charset_files"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# ~20 bundled files: every syntax family, nested and private sequences, UN sequences,
# encapsulated pixel data (JPEG, JPEG 2000, RLE), ISO 2022 character sets.
BUNDLED = [
    "CT_small.dcm",  # explicit LE, private FL values
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "image_dfl.dcm",  # deflated
    "JPEG2000.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",  # DS-07: FE FF DD E0 inside a fragment
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "rtplan.dcm",  # implicit, nested sequences
    "rtdose_rle.dcm",
    "test-SR.dcm",  # deep SR content tree
    "UN_sequence.dcm",  # undefined-length UN holding implicit VR items
    "priv_SQ.dcm",
    "nested_priv_SQ.dcm",
    "waveform_ecg.dcm",
    "reportsi.dcm",
    "liver_1frame.dcm",
    "693_J2KI.dcm",
]
# pydicom warns about odd values in its own test files; that is not what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

CHARSETS = sorted(p.name for p in CHARSET_FILES.glob("*.dcm"))


# -- helpers ------------------------------------------------------------------------------
def dataset_bytes(path: Path) -> tuple[str, bytes]:
    meta = read_part10(path)
    return meta.transfer_syntax, path.read_bytes()[meta.dataset_offset :]


def walk(
    data: bytes,
    syntax: str = EXPLICIT_VR_LE,
    wanted: frozenset[int] = frozenset(),
    in_sequences: frozenset[tuple[int, int]] = frozenset(),
    chunk: int = 0,
    **limits: int,
) -> dict[Key, tuple[str, ...]]:
    walker = DatasetWalker(syntax, wanted, in_sequences, **limits)
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        walker.feed(data[i : i + step])
    return walker.finish()


def encode(ds: Dataset, syntax: str = EXPLICIT_VR_LE) -> bytes:
    """A data set's bytes in ``syntax`` (no File Meta), as a C-STORE carries it."""
    buffer = io.BytesIO()
    if syntax == DEFLATED_EXPLICIT_VR_LE:
        plain = encode(ds, EXPLICIT_VR_LE)
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        return deflater.compress(plain) + deflater.flush()
    ds.save_as(
        buffer,
        implicit_vr=syntax == IMPLICIT_VR_LE,
        little_endian=syntax != EXPLICIT_VR_BE,
        enforce_file_format=False,
    )
    return buffer.getvalue()


def el(tag: int, vr: bytes, value: bytes, endian: str = "<") -> bytes:
    """One explicit VR element, by hand (PS3.5 7.1.2)."""
    group, element = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"):
        return struct.pack(endian + "HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack(endian + "HH2sH", group, element, vr, len(value)) + value


def imp(tag: int, value: bytes, length: int | None = None) -> bytes:
    """One implicit VR LE element (PS3.5 7.1.3)."""
    return (
        struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value) if length is None else length)
        + value
    )


def explicit_header(tag: int, vr: bytes, length: int, endian: str = "<") -> bytes:
    return struct.pack(endian + "HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, length)


def item(length: int = 0xFFFFFFFF, endian: str = "<") -> bytes:
    return struct.pack(endian + "HHL", 0xFFFE, 0xE000, length)


def item_end(endian: str = "<") -> bytes:
    return struct.pack(endian + "HHL", 0xFFFE, 0xE00D, 0)


def seq_end(endian: str = "<") -> bytes:
    return struct.pack(endian + "HHL", 0xFFFE, 0xE0DD, 0)


def undefined_sq(tag: int, *items: bytes) -> bytes:
    body = b"".join(item() + content + item_end() for content in items)
    return explicit_header(tag, b"SQ", 0xFFFFFFFF) + body + seq_end()


def defined_sq(tag: int, *items: bytes) -> bytes:
    body = b"".join(item(len(content)) + content for content in items)
    return explicit_header(tag, b"SQ", len(body)) + body


def expected_texts(elem: DataElement) -> tuple[str, ...] | None:
    """pydicom's value of ``elem`` as the walker's text, or None (not comparable)."""
    vr, value = elem.VR, elem.value
    if elem.tag.is_private or " or " in vr:
        return None  # pydicom uses private dictionaries / pixel representation; we do not
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"):
        return ()
    if value is None or value == "":
        return ()
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    if vr == "AT":
        return tuple(f"{int(t) >> 16:04X},{int(t) & 0xFFFF:04X}" for t in values)
    if vr in ("US", "SS", "UL", "SL", "SV", "UV"):
        return tuple(str(int(v)) for v in values)
    if vr in ("FL", "FD"):
        return tuple(str(float(v)) for v in values)
    texts = tuple(str(v).strip(" \0") for v in values)
    if vr == "PN":
        texts = tuple(_pn(t) for t in texts)
    return () if texts == ("",) else texts


def _pn(name: str) -> str:
    groups = [g.rstrip("^ ") for g in name.split("=")]
    while len(groups) > 1 and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def same_numbers(vr: str, got: tuple[str, ...], expected: tuple[str, ...]) -> bool:
    if vr == "FL":  # the walker gives the shortest text of the same 32-bit float
        pack = struct.Struct("<f").pack
        return [pack(float(g)) for g in got] == [pack(float(e)) for e in expected]
    return [float(g) for g in got] == [float(e) for e in expected]


def compare_with_pydicom(ds: Dataset, got: dict[Key, tuple[str, ...]]) -> None:
    for elem in ds:
        if elem.tag.group == 0x0002:
            continue
        tag = int(elem.tag)
        assert tag in got, f"{elem.tag} missing"
        expected = expected_texts(elem)
        if expected is None:
            continue
        if elem.VR in ("FL", "FD"):
            assert same_numbers(elem.VR, got[tag], expected), elem.tag
        else:
            assert got[tag] == expected, elem.tag


# -- agreement with pydicom -----------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_every_top_level_value_agrees_with_pydicom(name: str) -> None:
    path = TEST_FILES / name
    ds = dcmread(path)
    wanted = frozenset(int(e.tag) for e in ds if e.tag.group != 0x0002)
    got = walk_file(path, wanted)
    assert set(got) == wanted
    compare_with_pydicom(ds, got)


@pytest.mark.parametrize("name", CHARSETS)
def test_specific_character_sets_agree_with_pydicom(name: str) -> None:
    # Latin, Greek, Cyrillic, Hebrew, Arabic, Japanese (ISO 2022 IR 87/159, IR 13),
    # Korean, Chinese: person names decoded as pydicom decodes them.
    path = CHARSET_FILES / name
    ds = dcmread(path)
    wanted = frozenset(int(e.tag) for e in ds if e.tag.group != 0x0002)
    compare_with_pydicom(ds, walk_file(path, wanted))


@pytest.mark.parametrize("name", BUNDLED)
def test_values_in_items_of_top_level_sequences_agree_with_pydicom(name: str) -> None:
    ds = dcmread(TEST_FILES / name)
    expected: dict[tuple[int, int], list[str]] = {}
    for seq in ds:
        if seq.VR != "SQ":
            continue
        for child in seq.value:
            for elem in child:
                texts = expected_texts(elem)
                if texts is not None and elem.VR not in ("FL", "FD"):
                    expected.setdefault((int(seq.tag), int(elem.tag)), []).extend(texts)
    got = walk_file(TEST_FILES / name, (), expected)
    assert got == {key: tuple(values) for key, values in expected.items()}


def test_items_of_nested_sequences_are_not_collected() -> None:
    # rtplan: BeamSequence > ControlPointSequence > NominalBeamEnergy is two levels down.
    got = walk_file(TEST_FILES / "rtplan.dcm", (), [(0x300A00B0, 0x300A0114)])
    assert got == {}
    beams = walk_file(TEST_FILES / "rtplan.dcm", (), [(0x300A00B0, 0x300A00B2)])
    names = tuple(b.TreatmentMachineName for b in dcmread(TEST_FILES / "rtplan.dcm").BeamSequence)
    assert beams == {(0x300A00B0, 0x300A00B2): names}


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("ExplVR_BigEndNoMeta.dcm", EXPLICIT_VR_BE),
        ("ExplVR_LitEndNoMeta.dcm", EXPLICIT_VR_LE),
        ("rtstruct.dcm", IMPLICIT_VR_LE),
    ],
)
def test_raw_data_sets_without_file_meta(name: str, syntax: str) -> None:
    data = (TEST_FILES / name).read_bytes()
    ds = dcmread(TEST_FILES / name, force=True)
    wanted = frozenset(int(e.tag) for e in ds)
    compare_with_pydicom(ds, walk(data, syntax, wanted))


@pytest.mark.parametrize("name", BUNDLED)
def test_one_byte_chunks_give_the_same_result(name: str) -> None:
    syntax, data = dataset_bytes(TEST_FILES / name)
    ds = dcmread(TEST_FILES / name)
    wanted = frozenset(int(e.tag) for e in ds if e.tag.group != 0x0002)
    whole = walk(data, syntax, wanted)
    assert walk(data, syntax, wanted, chunk=1) == whole
    assert walk(data, syntax, wanted, chunk=7) == whole


def test_memoryview_chunks_are_accepted() -> None:
    syntax, data = dataset_bytes(TEST_FILES / "rtplan.dcm")
    walker = DatasetWalker(syntax, frozenset({0x00100010}))
    view = memoryview(data)
    for i in range(0, len(view), 100):
        walker.feed(view[i : i + 100])
    assert walker.finish() == {0x00100010: ("Last^First^mid^pre",)}
    assert walker.bytes_seen == len(data)


# -- value decoding ---------------------------------------------------------------------
@pytest.mark.parametrize("syntax", [EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE])
def test_binary_values_are_text(syntax: str) -> None:
    ds = Dataset()
    ds.FrameIncrementPointer = [0x00181063, 0x00181065]  # AT
    ds.Rows = 512  # US
    ds.add_new(0x00280120, "SS", -2000)  # Pixel Padding Value (US or SS: explicit only)
    ds.add_new(0x00181164, "DS", ["0.5", "0.25"])
    ds.add_new(0x00720076, "FL", [0.1, -1.5])  # Selector FL Value
    ds.add_new(0x00720074, "FD", [0.1])  # Selector FD Value
    ds.add_new(0x00720078, "UL", [4_000_000_000])
    ds.add_new(0x0072007C, "SL", [-5])
    ds.add_new(0x00720082, "SV", [-(2**40)])
    ds.add_new(0x00720083, "UV", [2**63])
    if syntax == IMPLICIT_VR_LE:
        del ds[0x00280120]
    wanted = frozenset(int(e.tag) for e in ds)
    got = walk(encode(ds, syntax), syntax, wanted)
    assert got[0x00280009] == ("0018,1063", "0018,1065")
    assert got[0x00280010] == ("512",)
    assert got[0x00181164] == ("0.5", "0.25")
    assert got[0x00720076] == ("0.1", "-1.5")
    assert got[0x00720074] == ("0.1",)
    assert got[0x00720078] == ("4000000000",)
    assert got[0x0072007C] == ("-5",)
    assert got[0x00720082] == (str(-(2**40)),)
    assert got[0x00720083] == (str(2**63),)
    if syntax != IMPLICIT_VR_LE:
        assert got[0x00280120] == ("-2000",)


def test_text_values_are_split_stripped_and_empty_is_present() -> None:
    data = (
        el(0x00080008, b"CS", b"ORIGINAL\\PRIMARY\\AXIAL ")
        + el(0x00080018, b"UI", b"1.2.3\0")
        + el(0x00081030, b"LO", b" Head  ")
        + el(0x00100010, b"PN", b"DOE^JOHN^^^=")
        + el(0x00100020, b"LO", b"")
        + el(0x00104000, b"LT", b"  two\\lines  ")
        + el(0x00180015, b"CS", b"\\")
    )
    wanted = frozenset({0x00080008, 0x00080018, 0x00081030, 0x00100010, 0x00100020})
    got = walk(data, wanted=wanted | {0x00104000, 0x00180015, 0x00200010})
    assert got == {
        0x00080008: ("ORIGINAL", "PRIMARY", "AXIAL"),
        0x00080018: ("1.2.3",),
        0x00081030: ("Head",),
        0x00100010: ("DOE^JOHN",),
        0x00100020: (),  # present but empty
        0x00104000: ("  two\\lines",),  # LT: not split, leading spaces kept
        0x00180015: ("", ""),
    }  # (0020,0010) absent: not in the mapping


def test_bulk_vrs_are_present_without_text() -> None:
    ds = dcmread(TEST_FILES / "JPEG2000.dcm")
    got = walk_file(TEST_FILES / "JPEG2000.dcm", [0x7FE00010, 0x00282000])
    assert got[0x7FE00010] == ()
    assert (0x00282000 in got) == (0x00282000 in ds)


def test_un_values_use_the_dictionary_vr_little_endian() -> None:
    # PS3.5 6.2.2: a known attribute sent as UN is read with its dictionary VR, LE.
    data = (
        el(0x00100010, b"UN", b"DOE^JANE")
        + el(0x00280010, b"UN", struct.pack("<H", 256))
        + el(0x00091001, b"UN", b"\x01\x02")
    )
    wanted = frozenset({0x00100010, 0x00280010, 0x00091001})
    assert walk(data, wanted=wanted) == {
        0x00100010: ("DOE^JANE",),
        0x00280010: ("256",),
        0x00091001: (),
    }
    be = el(0x00280010, b"UN", struct.pack("<H", 256), ">")
    assert walk(be, EXPLICIT_VR_BE, frozenset({0x00280010})) == {0x00280010: ("256",)}


def test_implicit_vr_takes_vrs_from_the_dictionary() -> None:
    data = (
        imp(0x00080000, struct.pack("<L", 8))  # group length: UL
        + imp(0x00090010, b"ACME ")  # private creator: LO
        + imp(0x00091001, b"\x01\x02")  # private, unknown: UN
        + imp(0x00280010, struct.pack("<H", 64))
    )
    wanted = frozenset({0x00080000, 0x00090010, 0x00091001, 0x00280010})
    assert walk(data, IMPLICIT_VR_LE, wanted) == {
        0x00080000: ("8",),
        0x00090010: ("ACME",),
        0x00091001: (),
        0x00280010: ("64",),
    }


def test_specific_character_set_is_read_but_reported_only_when_wanted() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    data = encode(ds)
    assert walk(data, wanted=frozenset({0x00100010})) == {0x00100010: ("Müller^Jürgen",)}
    both = walk(data, wanted=frozenset({0x00100010, 0x00080005}))
    assert both[0x00080005] == ("ISO_IR 192",)


def test_ds11_bad_character_sets_never_raise() -> None:
    unknown = el(0x00080005, b"CS", b"ISO_IR 999") + el(0x00100010, b"PN", b"M\xfcller")
    assert walk(unknown, wanted=frozenset({0x00100010})) == {0x00100010: ("Müller",)}
    bad_utf8 = el(0x00080005, b"CS", b"ISO_IR 192") + el(0x00100010, b"PN", b"M\xfc\xffr ")
    assert walk(bad_utf8, wanted=frozenset({0x00100010})) == {0x00100010: ("M\ufffd\ufffdr",)}
    bad_escape = el(0x00080005, b"CS", b"\\ISO 2022 IR 87") + el(
        0x00100010, b"PN", b"\x1b$B\xff\xfe\x1b(B"
    )
    assert 0x00100010 in walk(bad_escape, wanted=frozenset({0x00100010}))


def test_long_wanted_values_are_truncated_and_marked() -> None:
    text = b"x" * 5000
    data = (
        el(0x00081030, b"LO", b"short")
        + el(0x00324000, b"LT", text)
        + el(0x00400254, b"LO", b"after")
    )
    wanted = frozenset({0x00324000, 0x00400254})
    for chunk in (0, 1, 333):
        walker = DatasetWalker(EXPLICIT_VR_LE, wanted, max_value_length=1000)
        step = chunk or len(data)
        for i in range(0, len(data), step):
            walker.feed(data[i : i + step])
        assert walker.finish() == {0x00324000: ("x" * 1000,), 0x00400254: ("after",)}
        assert walker.truncated == {0x00324000}


def test_group_0002_inside_the_data_set_is_an_ordinary_element() -> None:  # DS-08
    data = el(0x00020010, b"UI", b"1.2.840.10008.1.2.1\0") + el(0x00100010, b"PN", b"A")
    assert walk(data, wanted=frozenset({0x00020010})) == {0x00020010: ("1.2.840.10008.1.2.1",)}


def test_ds14_odd_lengths_are_tolerated() -> None:
    data = (
        el(0x00080018, b"UI", b"1.2.3")
        + el(0x00100010, b"PN", b"ABC")
        + el(0x00100020, b"LO", b"7")
    )
    assert walk(data, wanted=frozenset({0x00080018, 0x00100020})) == {
        0x00080018: ("1.2.3",),
        0x00100020: ("7",),
    }


def test_wanted_sequence_is_present_and_item_values_are_collected() -> None:
    seq = 0x00081115
    data = undefined_sq(
        seq,
        el(0x00081150, b"UI", b"1.2"),
        el(0x00081150, b"UI", b"1.3") + el(0x00081155, b"UI", b"9"),
    ) + defined_sq(0x00081140, el(0x00081150, b"UI", b"2.1"))
    got = walk(
        data,
        wanted=frozenset({seq}),
        in_sequences=frozenset({(seq, 0x00081150), (0x00081140, 0x00081150)}),
    )
    assert got == {seq: (), (seq, 0x00081150): ("1.2", "1.3"), (0x00081140, 0x00081150): ("2.1",)}


def test_unknown_transfer_syntax_is_explicit_little_endian() -> None:
    data = el(0x00100010, b"PN", b"A^B")
    assert walk(data, "1.2.3.4.5.6", frozenset({0x00100010})) == {0x00100010: ("A^B",)}


def test_encapsulated_pixel_data_by_hand() -> None:
    # PS3.5 A.4: offset table item, fragments (one holding delimiter-like bytes, DS-07),
    # sequence delimiter; then an element after the pixel data.
    fragments = item(0) + item(8) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" + item(4) + b"abcd"
    data = (
        el(0x00100010, b"PN", b"A")
        + explicit_header(0x7FE00010, b"OB", 0xFFFFFFFF)
        + fragments
        + seq_end()
        + el(0xFFFAFFFA, b"SQ", b"")  # Digital Signatures Sequence, empty
    )
    assert walk(data, JPEG_BASELINE, frozenset({0x7FE00010})) == {0x7FE00010: ()}
    # Implicit VR: undefined-length Pixel Data is read as fragments too (lenient).
    implicit = imp(0x7FE00010, b"", 0xFFFFFFFF) + fragments + seq_end()
    assert walk(implicit, IMPLICIT_VR_LE, frozenset({0x7FE00010})) == {0x7FE00010: ()}


def test_undefined_length_un_holds_implicit_little_endian_items() -> None:
    # PS3.5 6.2.2: even in a big endian data set.
    inner = imp(0x00100010, b"IN^UN") + imp(0x00081150, b"1.2\0")
    data = (
        explicit_header(0x00081115, b"UN", 0xFFFFFFFF, ">")
        + item()
        + inner
        + item_end()
        + seq_end()
        + el(0x00100020, b"LO", b"ID", ">")
    )
    got = walk(data, EXPLICIT_VR_BE, frozenset({0x00100020}), frozenset({(0x00081115, 0x00081150)}))
    assert got == {(0x00081115, 0x00081150): ("1.2",), 0x00100020: ("ID",)}


# -- bad data sets (catalogue B.6) ---------------------------------------------------
def split_elements(ds: Dataset, syntax: str) -> list[bytes]:
    """Each top-level element of ``ds`` encoded alone; their concatenation is ``ds``."""
    parts = []
    for elem in ds:
        single = Dataset()
        single.add(elem)
        parts.append(encode(single, syntax))
    assert b"".join(parts) == encode(ds, syntax)
    return parts


def nested_dataset() -> Dataset:
    """Nested defined- and undefined-length sequences, a private tag, text and numbers."""
    leaf = Dataset()
    leaf.CodeValue = "T-A0100"
    leaf.CodingSchemeDesignator = "SRT"
    middle = Dataset()
    middle.ReferencedSOPInstanceUID = "1.2.3.4"
    middle.ConceptNameCodeSequence = Sequence([leaf, leaf])
    middle.ConceptNameCodeSequence.is_undefined_length = True
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1"
    ds.ReferencedImageSequence = Sequence([middle, Dataset(), middle])
    ds.PatientName = "Müller^Hans"
    ds.add_new(0x00091010, "LO", "private")
    ds.Rows = 4
    ds.add_new(0x7FE00010, "OB", bytes(32))
    return ds


NESTED_WANTED = frozenset({0x00080008, 0x00080018, 0x00100010, 0x00280010})


def assert_fails(
    data: bytes,
    syntax: str = EXPLICIT_VR_LE,
    wanted: frozenset[int] = frozenset(),
    *,
    match: str | None = None,
    chunk: int = 0,
    **limits: int,
) -> None:
    """Walking ``data`` raises DatasetError (in ``feed`` or in ``finish``)."""
    with pytest.raises(DatasetError, match=match):
        walk(data, syntax, wanted, frozenset(), chunk, **limits)


@pytest.mark.parametrize("syntax", [EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE])
def test_ds01_every_cut_inside_an_element_fails(syntax: str) -> None:
    parts = split_elements(nested_dataset(), syntax)
    data = b"".join(parts)
    boundaries = {sum(len(p) for p in parts[:i]) for i in range(1, len(parts) + 1)}
    for cut in range(len(data)):
        if cut in boundaries:
            walk(data[:cut], syntax, NESTED_WANTED)  # whole elements: a valid data set
        else:
            assert_fails(data[:cut], syntax, NESTED_WANTED)
            assert_fails(data[:cut], syntax, NESTED_WANTED, chunk=3)


def test_ds01_every_prefix_of_a_single_nested_element_fails() -> None:
    # One top-level element (a sequence of nested items): no proper prefix is a data set.
    for syntax in (EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE):
        ds = Dataset()
        ds.ReferencedImageSequence = nested_dataset().ReferencedImageSequence
        data = encode(ds, syntax)
        walk(data, syntax)
        for cut in range(len(data)):
            assert_fails(data[:cut], syntax)


def test_ds01_truncated_bundled_files_fail() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(DatasetError, match="ends inside"):
            walk_file(TEST_FILES / name, ())


def test_ds01_every_prefix_of_a_deflated_data_set_fails() -> None:
    syntax, data = dataset_bytes(TEST_FILES / "image_dfl.dcm")
    assert syntax == DEFLATED_EXPLICIT_VR_LE
    inflater = zlib.decompressobj(-15)
    inflater.decompress(data)
    stream_end = len(data) - len(inflater.unused_data)  # this file has 8 bytes after it
    assert walk(data, syntax) == walk(data[:stream_end], syntax) == {}
    for cut in range(stream_end):
        assert_fails(data[:cut], syntax)


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("MR_small.dcm", IMPLICIT_VR_LE),
        ("MR_small.dcm", EXPLICIT_VR_BE),
        ("MR_small_implicit.dcm", EXPLICIT_VR_LE),
        ("MR_small_implicit.dcm", EXPLICIT_VR_BE),
        ("MR_small_bigendian.dcm", EXPLICIT_VR_LE),
        ("MR_small_bigendian.dcm", IMPLICIT_VR_LE),
        ("rtplan.dcm", EXPLICIT_VR_LE),
        ("CT_small.dcm", IMPLICIT_VR_LE),
        ("JPEG2000.dcm", IMPLICIT_VR_LE),
    ],
)
def test_ds02_data_in_the_wrong_vr_or_byte_order_fails(name: str, wrong: str) -> None:
    _, data = dataset_bytes(TEST_FILES / name)
    assert_fails(data, wrong)


def test_ds02_a_file_that_is_not_what_its_meta_says_fails() -> None:
    # SC_rgb_jpeg.dcm claims JPEG Baseline but its data set is implicit VR.
    with pytest.raises(DatasetError, match="no valid VR"):
        walk_file(TEST_FILES / "SC_rgb_jpeg.dcm", ())


@pytest.mark.parametrize("vr", [b"\x00\x00", b"ZZ", b"pn", b"\n\x00"])
def test_ds02_invalid_vr_bytes_fail_at_once(vr: bytes) -> None:
    walker = DatasetWalker(EXPLICIT_VR_LE, frozenset())
    with pytest.raises(DatasetError, match="no valid VR"):
        walker.feed(struct.pack("<HH2sH", 0x0010, 0x0010, vr, 2) + b"AB")


def test_ds03_length_past_the_end_allocates_nothing_and_fails() -> None:
    wanted = frozenset({0x00100010})
    tracemalloc.start()
    try:
        assert_fails(
            imp(0x00100010, b"AB", 0xFFFFFFF0), IMPLICIT_VR_LE, wanted, match="ends inside"
        )
        assert_fails(el(0x00100010, b"PN", b"")[:6] + b"\xf0\xff" + b"AB", wanted=wanted)
        assert_fails(explicit_header(0x00324000, b"UT", 0xFFFFFFF0) + b"AB", wanted=wanted)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_ds03_length_past_its_item_or_sequence_fails_at_once() -> None:
    too_long = el(0x00100010, b"PN", b"ABCD")[:6] + struct.pack("<H", 100) + b"ABCD"
    cases = {
        "element past its item": defined_sq(0x00081115, too_long),
        "item past its sequence": explicit_header(0x00081115, b"SQ", 8) + item(100) + b"x" * 8,
        "sequence past its item": explicit_header(0x00081115, b"SQ", 20)
        + item(12)
        + explicit_header(0x00081140, b"SQ", 40),
        "undefined item past its sequence": explicit_header(0x00081115, b"SQ", 16)
        + item()
        + el(0x00100010, b"PN", b"ABCDEFGH"),
        "fragment past its item": explicit_header(0x00081115, b"SQ", 40)
        + item(32)
        + explicit_header(0x00091010, b"OB", 0xFFFFFFFF)
        + item(100),
    }
    for what, data in cases.items():
        walker = DatasetWalker(EXPLICIT_VR_LE, frozenset())
        with pytest.raises(DatasetError, match="runs past"):
            walker.feed(data + bytes(200))
            pytest.fail(what)


@pytest.mark.parametrize("vr", [b"UT", b"UC", b"UR", b"OW", b"OF", b"OD"])
def test_ds04_undefined_length_on_other_vrs_fails(vr: bytes) -> None:
    walker = DatasetWalker(EXPLICIT_VR_LE, frozenset())
    with pytest.raises(DatasetError, match="undefined length"):
        walker.feed(explicit_header(0x00324000, vr, 0xFFFFFFFF) + b"ABCD")


def test_ds04_undefined_length_on_pn_in_implicit_vr_is_a_sequence_and_fails() -> None:
    # PS3.5 7.5: implicit VR undefined length means a sequence; "DOE^" is not an item.
    data = imp(0x00100010, b"", 0xFFFFFFFF) + b"DOE^JOHN"
    assert_fails(data, IMPLICIT_VR_LE, frozenset({0x00100010}), match="item")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (seq_end(), "top level"),
        (item_end(), "top level"),
        (item(4) + b"abcd", "top level"),
        (el(0x00100010, b"PN", b"A") + seq_end(), "top level"),
        (undefined_sq(0x00081115, b"")[:-8] + seq_end() + seq_end(), "top level"),
        (
            explicit_header(0x00081115, b"SQ", 0xFFFFFFFF) + el(0x00100010, b"PN", b"AB"),
            "where an item",
        ),
        (explicit_header(0x00081115, b"SQ", 0xFFFFFFFF) + item_end(), "where an item"),
        (explicit_header(0x00081115, b"SQ", 0xFFFFFFFF) + item() + seq_end(), "inside an item"),
        (explicit_header(0x00081115, b"SQ", 0xFFFFFFFF) + item() + item(), "inside an item"),
        (defined_sq(0x00081115, item_end()), "inside an item"),
        (explicit_header(0x00081115, b"SQ", 8) + seq_end(), "defined-length"),
        (explicit_header(0x7FE00010, b"OB", 0xFFFFFFFF) + item(), "undefined-length fragment"),
        (explicit_header(0x7FE00010, b"OB", 0xFFFFFFFF) + item_end(), "where an item"),
    ],
)
def test_ds05_stray_delimiters_and_items_fail_at_once(data: bytes, match: str) -> None:
    walker = DatasetWalker(EXPLICIT_VR_LE, frozenset())
    with pytest.raises(DatasetError, match=match):
        walker.feed(data)


@pytest.mark.parametrize(
    "data",
    [
        explicit_header(0x00081115, b"SQ", 0xFFFFFFFF),
        explicit_header(0x00081115, b"SQ", 0xFFFFFFFF) + item(),
        explicit_header(0x00081115, b"SQ", 0xFFFFFFFF) + item() + item_end(),
        explicit_header(0x00081115, b"SQ", 16) + item(8),
        explicit_header(0x7FE00010, b"OB", 0xFFFFFFFF) + item(0),
        imp(0x00081115, b"", 0xFFFFFFFF) + item() + imp(0x00100010, b"AB"),
    ],
)
def test_ds05_missing_delimiters_fail_at_finish(data: bytes) -> None:
    syntax = IMPLICIT_VR_LE if data[4:6] != b"SQ" and data[4:6] != b"OB" else EXPLICIT_VR_LE
    walker = DatasetWalker(syntax, frozenset())
    walker.feed(data)
    with pytest.raises(DatasetError, match="ends inside"):
        walker.finish()


def nesting(depth: int, defined: bool = False) -> bytes:
    """``depth`` sequences each inside an item of the one before, built as bytes."""
    if not defined:
        opening = (explicit_header(0x00081115, b"SQ", 0xFFFFFFFF) + item()) * depth
        return opening + (item_end() + seq_end()) * depth
    body = el(0x00100010, b"PN", b"AB")
    for _ in range(depth):
        body = explicit_header(0x00081115, b"SQ", len(body) + 8) + item(len(body)) + body
    return body


@pytest.mark.parametrize("depth", [65, 300, 10_000])
@pytest.mark.parametrize("defined", [False, True])
def test_ds06_nesting_past_the_limit_fails_without_recursion(depth: int, defined: bool) -> None:
    with pytest.raises(DatasetError, match="nested deeper than 64"):
        DatasetWalker(EXPLICIT_VR_LE, frozenset()).feed(nesting(depth, defined))


def test_ds06_nesting_up_to_the_limit_is_fine_and_the_limit_is_configurable() -> None:
    assert walk(nesting(64)) == {}
    assert walk(nesting(64, defined=True)) == {}
    assert walk(nesting(200), max_depth=200) == {}
    assert_fails(nesting(5), match="nested deeper", max_depth=4)
    implicit = (imp(0x00081115, b"", 0xFFFFFFFF) + item()) * 65
    assert_fails(implicit, IMPLICIT_VR_LE, match="nested deeper")


def test_ds12_empty_data_set_fails() -> None:
    with pytest.raises(DatasetError, match="empty"):
        DatasetWalker(EXPLICIT_VR_LE, frozenset()).finish()
    assert_fails(b"", match="empty")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    assert_fails(deflater.compress(b"") + deflater.flush(), DEFLATED_EXPLICIT_VR_LE, match="empty")


def test_an_error_is_sticky() -> None:
    walker = DatasetWalker(EXPLICIT_VR_LE, frozenset())
    with pytest.raises(DatasetError):
        walker.feed(seq_end())
    with pytest.raises(DatasetError):
        walker.feed(el(0x00100010, b"PN", b"AB"))
    with pytest.raises(DatasetError):
        walker.finish()


# -- deflate (RX-18) ----------------------------------------------------------------------
def deflate_stream(total: int, block: bytes = bytes(1 << 20)) -> Iterator[bytes]:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    yield deflater.compress(explicit_header(0x7FE00010, b"OB", total))
    for _ in range(total // len(block)):
        yield deflater.compress(block)
    yield deflater.flush()


def test_rx18_deflate_bomb_is_bounded() -> None:
    bomb = b"".join(deflate_stream(1 << 20))
    assert len(bomb) < 4096
    walker = DatasetWalker(DEFLATED_EXPLICIT_VR_LE, frozenset(), max_inflated_bytes=64 * 1024)
    with pytest.raises(DatasetError, match="inflates past"):
        walker.feed(bomb)


def test_rx18_inflation_keeps_memory_flat() -> None:
    bomb = b"".join(deflate_stream(256 << 20))  # 256 MiB of zeros in ~250 KiB
    tracemalloc.start()
    try:
        walker = DatasetWalker(DEFLATED_EXPLICIT_VR_LE, frozenset(), max_inflated_bytes=128 << 20)
        with pytest.raises(DatasetError, match="inflates past"):
            walker.feed(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    under_cap = DatasetWalker(DEFLATED_EXPLICIT_VR_LE, frozenset(), max_inflated_bytes=1 << 30)
    under_cap.feed(bomb)
    assert under_cap.finish() == {}
    assert under_cap.bytes_seen == len(bomb)


def test_deflate_corrupt_or_padded() -> None:
    syntax, data = dataset_bytes(TEST_FILES / "image_dfl.dcm")
    assert_fails(b"\xff" * 64, syntax, match="corrupt")
    wanted = frozenset({0x00100010})
    assert walk(data + b"\0", syntax, wanted) == walk(data, syntax, wanted)


# -- big values: cost per element, not per byte ---------------------------------------
def test_huge_unwanted_value_is_counted_down_not_buffered() -> None:
    walker = DatasetWalker(EXPLICIT_VR_LE, frozenset({0x00100010}))
    walker.feed(el(0x00100010, b"PN", b"DOE^JOHN") + explicit_header(0x7FE00010, b"OW", 1 << 30))
    chunk = memoryview(bytes(1 << 20))
    tracemalloc.start()
    try:
        for _ in range(1024):
            walker.feed(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    walker.feed(el(0x00100020, b"LO", b"ID"))
    assert walker.finish() == {0x00100010: ("DOE^JOHN",)}
    assert walker.bytes_seen == 16 + 12 + (1 << 30) + 10


def test_walk_file_options(tmp_path: Path) -> None:
    path = TEST_FILES / "MR_small.dcm"
    small_chunks = walk_file(path, [0x00100010], chunk_size=5)
    assert small_chunks == walk_file(path, [0x00100010]) == {0x00100010: ("CompressedSamples^MR1",)}
    with pytest.raises(DatasetError):
        walk_file(path, [0x00100010], transfer_syntax=IMPLICIT_VR_LE)
