"""Part 10 File Meta Information (PS3.10 7.1), checked against pydicom; catalogue PT-01..PT-06."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset

from protocol.part10 import (
    NotPart10Error,
    Part10Info,
    build_file_meta,
    read_part10,
    safe_uid_filename,
)
from protocol.uids import EXPLICIT_VR_LE, IMPLEMENTATION_CLASS_UID, IMPLICIT_VR_LE

CT = "1.2.840.10008.5.1.4.1.1.2"

# Files bundled in the pydicom wheel (DESIGN §8: only bundled ones), across transfer
# syntaxes: explicit/implicit LE, big endian, deflated, JPEG, JPEG-LS, JPEG 2000, RLE,
# a meta group without group length.
BUNDLED = [
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "JPEG-lossy.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_RLE.dcm",
    "no_meta_group_length.dcm",
    "rtplan.dcm",
    "SC_rgb_small_odd.dcm",
    "waveform_ecg.dcm",
]


def bundled(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path


def pydicom_view(path: str) -> tuple[str, str, str, int]:
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)  # leaves fp at the first data set byte
        offset = fp.tell()
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        offset,
    )


@pytest.mark.parametrize("name", BUNDLED)
def test_read_part10_agrees_with_pydicom(name: str) -> None:
    path = bundled(name)
    info = read_part10(path)
    ref = pydicom_view(path)
    assert (info.sop_class_uid, info.sop_instance_uid, info.transfer_syntax) == ref[:3]
    assert info.dataset_offset == ref[3]
    assert info.file_size == Path(path).stat().st_size


def test_read_part10_from_open_file() -> None:
    path = bundled("CT_small.dcm")
    with open(path, "rb") as f:
        info = read_part10(f)
    assert info == read_part10(Path(path))


@pytest.mark.parametrize(
    "name", ["no_meta.dcm", "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm", "rtplan.dump"]
)
def test_files_without_meta_are_not_part10(name: str) -> None:
    with pytest.raises(NotPart10Error):
        read_part10(bundled(name))


def test_meta_missing_transfer_syntax() -> None:
    with pytest.raises(NotPart10Error, match=r"\(0002,0010\)"):
        read_part10(bundled("meta_missing_tsyntax.dcm"))


def encode_dataset(sop_instance: str = "1.2.3.4.5") -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop_instance
    ds.PatientName = "Test^Patient"
    ds.Rows = 2
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def test_pydicom_written_file(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.44"
    ds.PatientName = "Written^ByPydicom"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LE
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    info = read_part10(path)
    assert (info.sop_class_uid, info.sop_instance_uid) == (CT, "1.2.3.44")
    assert (info.transfer_syntax, info.dataset_offset) == pydicom_view(str(path))[2:]
    assert pydicom.dcmread(path).PatientName == "Written^ByPydicom"


def test_build_file_meta_read_back_by_pydicom_and_us() -> None:
    dataset = encode_dataset()
    meta = build_file_meta(
        CT, "1.2.3.4.5", IMPLICIT_VR_LE, IMPLEMENTATION_CLASS_UID, "DICOMROUTER_01", "MODALITY"
    )
    assert meta[:128] == bytes(128) and meta[128:132] == b"DICM"  # catalogue PT-11
    ds = pydicom.dcmread(io.BytesIO(meta + dataset))
    fm = ds.file_meta
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.MediaStorageSOPClassUID == CT
    assert fm.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert fm.TransferSyntaxUID == IMPLICIT_VR_LE
    assert fm.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert fm.ImplementationVersionName == "DICOMROUTER_01"
    assert fm.SourceApplicationEntityTitle == "MODALITY"
    assert ds.PatientName == "Test^Patient"
    # PS3.10 7.1: the group length counts the bytes after it up to the end of group 2
    (group_length,) = struct.unpack_from("<I", meta, 132 + 8)
    assert group_length == len(meta) - 132 - 12
    assert fm.FileMetaInformationGroupLength == group_length
    info = read_part10(io.BytesIO(meta + dataset))
    assert info == Part10Info(CT, "1.2.3.4.5", IMPLICIT_VR_LE, len(meta), len(meta) + len(dataset))


def test_build_file_meta_pads_odd_values() -> None:
    meta = build_file_meta("1.2.3", "1.2.34", IMPLICIT_VR_LE, "1.2", "ODD")
    assert b"1.2.3\0" in meta and b"ODD " in meta
    assert (len(meta) - 132) % 2 == 0
    ds = pydicom.dcmread(io.BytesIO(meta + encode_dataset()), stop_before_pixels=True)
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.3"
    assert "ImplementationVersionName" in ds.file_meta


@pytest.mark.parametrize(
    ("source_ae", "written"),
    [
        ("STORESCU", "STORESCU"),
        ("  PADDED  ", "PADDED"),
        (None, None),
        ("", None),
        ("BACK\\SLASH", None),
        ("../secret/VICTIM", "../secret/VICTIM"),  # harmless in a file, never a path
        ("NEW\nLINE", None),
        ("\xe9CHO", None),
        ("X" * 17, None),
    ],
)
def test_source_ae_written_only_when_clean(source_ae: str | None, written: str | None) -> None:
    meta = build_file_meta(CT, "1.2.3", IMPLICIT_VR_LE, "1.2", "V", source_ae)
    fm = pydicom.dcmread(io.BytesIO(meta + encode_dataset())).file_meta
    assert fm.get("SourceApplicationEntityTitle") == written


def test_build_file_meta_without_version_name() -> None:
    meta = build_file_meta(CT, "1.2.3", IMPLICIT_VR_LE, "1.2", None)
    assert "ImplementationVersionName" not in pydicom.dcmread(io.BytesIO(meta)).file_meta


# -- tolerated and refused layouts -------------------------------------------------------------
META = build_file_meta(CT, "1.2.3.4", IMPLICIT_VR_LE, "1.2", "V")
DATA = encode_dataset()


def test_without_preamble_dicm_first() -> None:
    info = read_part10(io.BytesIO(META[128:] + DATA))
    assert info.dataset_offset == len(META) - 128
    assert info.sop_instance_uid == "1.2.3.4"


def test_without_preamble_or_dicm() -> None:
    info = read_part10(io.BytesIO(META[132:] + DATA))
    assert info.dataset_offset == len(META) - 132


def test_implicit_vr_meta_group() -> None:
    elements = b"".join(
        struct.pack("<HHI", 2, elem, len(value)) + value
        for elem, value in ((2, b"1.2.3\0"), (3, b"1.2.34"), (0x10, IMPLICIT_VR_LE.encode()))
    )
    raw = bytes(128) + b"DICM" + elements + DATA
    info = read_part10(io.BytesIO(raw))
    assert (info.sop_class_uid, info.sop_instance_uid, info.transfer_syntax) == (
        "1.2.3",
        "1.2.34",
        IMPLICIT_VR_LE,
    )
    assert info.dataset_offset == 132 + len(elements)


def test_meta_only_file() -> None:
    info = read_part10(io.BytesIO(META))
    assert info.dataset_offset == info.file_size == len(META)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"DIC",
        bytes(132),
        bytes(128) + b"DICN" + META[132:],
        bytes(128) + b"DICM",  # no elements
        bytes(128) + b"DICM" + b"\x08\x00\x16\x00UI\x02\x001\x00",  # group 0008 first
        bytes(150),
    ],
    ids=["empty", "short", "zeros", "bad-magic", "no-elements", "no-group-2", "zeros-150"],
)
def test_not_part10(raw: bytes) -> None:
    with pytest.raises(NotPart10Error):
        read_part10(io.BytesIO(raw))


@pytest.mark.parametrize("cut", [133, 136, 140, 150, 160, 200])
def test_truncated_meta(cut: int) -> None:
    with pytest.raises(NotPart10Error):
        read_part10(io.BytesIO(META[:cut]))


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x7FFFFFFF, 0x10000000])
def test_huge_element_length_is_refused_without_allocation(length: int) -> None:
    element = struct.pack("<HH2s2xI", 2, 1, b"OB", length) + b"\0\1"
    with pytest.raises(NotPart10Error):
        read_part10(io.BytesIO(bytes(128) + b"DICM" + element))


def test_element_past_end_of_file() -> None:
    element = struct.pack("<HH2sH", 2, 2, b"UI", 0x100) + b"1.2"
    with pytest.raises(NotPart10Error, match="past the end"):
        read_part10(io.BytesIO(bytes(128) + b"DICM" + element))


def test_nonexistent_path_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_part10(tmp_path / "missing.dcm")


# -- file names (catalogue B.5) --------------------------------------------------------------
@pytest.mark.parametrize(
    "uid",
    [
        "../../../../tmp/pwn",  # PT-01
        "..",  # PT-02
        ".",
        "",
        "....",
        "/etc/passwd",  # PT-03
        "C:\\Windows\\x",
        "\\\\server\\share\\x",
        "a\\..\\..\\b",
        "1.2.3\x00/../../x",  # PT-04
        "1." + "2" * 298,  # PT-05
        "1." + "2" * 9998,
        "\uff052e\uff052e",  # PT-06: fullwidth percent
        "\uff0e\uff0e",  # fullwidth full stops
        "\xc0\xae\xc0\xae",  # overlong UTF-8 "..", read as latin-1
        "1.2.\u0663",  # Arabic-Indic digit three: not ASCII
        "1.2.3 ",
        "1.02.3",
    ],
)
def test_safe_uid_filename_refuses(uid: str) -> None:
    assert safe_uid_filename(uid) is None


@pytest.mark.parametrize("uid", ["1.2.3", CT, "2.25.1234567890123456789", "1.0.2", "1." + "2" * 62])
def test_safe_uid_filename_accepts(uid: str) -> None:
    assert safe_uid_filename(uid) == uid
