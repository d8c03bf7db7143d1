"""Deterministic benchmark corpora: Part 10 files, Explicit VR Little Endian.

    .venv/bin/python tests/benchmarks/corpus.py [--root DIR] [--force] [ct tiny big]

Shapes (every instance has its own SOP Instance UID):

    ct    200 x CT Image Storage, 512x512x16 (12 stored), ~0.5 MB; 1 patient/study/series
    tiny  1000 x MR Image Storage, 64x64x16 (12 stored), ~10 KB; 10 patients/studies x 2 series
    big   10 x Digital X-Ray Image Storage - For Presentation, 4000x4000x16 (14 stored),
          ~32 MB; 5 patients/studies x 2 views (PA, lateral)

Files go to ``ROOT/<shape>/`` (default ROOT ``/tmp/dicom-router-bench/corpus``) and nothing
else goes there, so a directory-scanning storescu can send the directory as it is. The
manifest ``ROOT/<shape>.manifest.json`` (count, bytes, sizes, generator version) is
written last: a corpus is regenerated only when its manifest is missing, of another
version, or no longer matches the files on disk.

Determinism: UIDs are ``2.25.<uuid5 of a fixed name>`` and pixels come from
``random.Random(<fixed seed>).randbytes``, so two runs with the same pydicom write
byte-identical files. numpy is not needed. Generating all three takes ~10-20 s.

From code: ``ensure_corpus("ct")`` returns a ``Corpus`` (directory, count, bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

DEFAULT_ROOT = Path("/tmp/dicom-router-bench/corpus")
GENERATOR_VERSION = 1

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

STUDY_DATE = "20240315"
_UID_NAMESPACE = "dicom-router/tests/benchmarks/corpus"


def bench_uid(*parts: object) -> str:
    """``2.25.<uuid5>`` (PS3.5 B.2) of a fixed name built from ``parts``."""
    name = "/".join([_UID_NAMESPACE, *(str(p) for p in parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


IMPLEMENTATION_CLASS_UID = bench_uid("implementation")


@dataclass(frozen=True)
class Corpus:
    shape: str
    directory: Path
    count: int
    bytes: int
    min_size: int
    max_size: int


# ------------------------------------------------------------------ pixels


def _pixels(
    seed: str,
    rows: int,
    cols: int,
    region_of: Callable[[int], list[tuple[int, int]]],
    levels: tuple[int, ...],
) -> bytes:
    """16-bit little-endian pixels: a random low byte, a high byte set per region.

    ``region_of(y)`` gives, for row y, (x_end, level index) spans covering the row;
    ``levels`` are high-byte values (the pixel is ``level * 256 + noise``).
    """
    out = bytearray(random.Random(seed).randbytes(rows * cols * 2))
    fills = [bytes([level]) for level in levels]
    high = bytearray()
    for y in range(rows):
        x = 0
        for x_end, level in region_of(y):
            high += fills[level] * (x_end - x)
            x = x_end
    out[1::2] = high
    return bytes(out)


def _ellipse_spans(
    y: int, cx: float, cy: float, rx: float, ry: float, cols: int, inside: int, outside: int
) -> list[tuple[int, int]]:
    dy = (y - cy) / ry
    if abs(dy) >= 1.0:
        return [(cols, outside)]
    half = rx * math.sqrt(1.0 - dy * dy)
    x0, x1 = max(0, int(cx - half)), min(cols, int(cx + half))
    return [(x0, outside), (x1, inside), (cols, outside)]


# ------------------------------------------------------------------ headers


def _base(sop_class: str, sop_instance: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = f"DRBENCH_{GENERATOR_VERSION}"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


def _patient_study(ds: Dataset, patient: int, study_uid: str, accession: str, desc: str) -> None:
    ds.PatientName = f"BENCH^PATIENT{patient:03d}"
    ds.PatientID = f"DRB{patient:06d}"
    ds.PatientBirthDate = f"19{50 + patient % 40:02d}{1 + patient % 12:02d}{1 + patient % 28:02d}"
    ds.PatientSex = "MF"[patient % 2]
    ds.PatientAge = f"{74 - patient % 40:03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = f"{8 + patient % 10:02d}1500"
    ds.StudyID = str(1000 + patient)
    ds.AccessionNumber = accession
    ds.StudyDescription = desc
    ds.ReferringPhysicianName = "REFERRER^ALICE"
    ds.InstitutionName = "Router Bench General Hospital"
    ds.StationName = "DRBENCH01"


def _image(ds: Dataset, rows: int, cols: int, bits_stored: int, pixels: bytes) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels


# ------------------------------------------------------------------ shapes


def _gen_ct() -> Iterator[tuple[str, Dataset]]:
    study, series = bench_uid("ct", "study"), bench_uid("ct", "series")
    frame = bench_uid("ct", "for")
    for i in range(200):
        ds = _base(CT_IMAGE_STORAGE, bench_uid("ct", "instance", i))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        _patient_study(ds, 1, study, "ACC-CT-0001", "CT CHEST ABDOMEN PELVIS W CONTRAST")
        ds.Modality = "CT"
        ds.Manufacturer = "BenchScan"
        ds.ManufacturerModelName = "Synthetic 64"
        ds.SeriesDate, ds.SeriesTime = STUDY_DATE, "091530"
        ds.AcquisitionDate, ds.AcquisitionTime = STUDY_DATE, f"0916{i // 10:02d}.{i % 10}"
        ds.ContentDate, ds.ContentTime = ds.AcquisitionDate, ds.AcquisitionTime
        ds.SeriesDescription = "AXIAL 2.5mm SOFT TISSUE"
        ds.BodyPartExamined = "CHEST"
        ds.ProtocolName = "CT CAP"
        ds.SliceThickness = "2.5"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 250
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "FFS"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 3
        ds.InstanceNumber = i + 1
        z = -100.0 - 2.5 * i
        ds.ImagePositionPatient = [-190.0, -190.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame
        ds.SliceLocation = f"{z:.1f}"
        ds.PixelSpacing = [0.742188, 0.742188]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        # Air (~-1000 HU) around a body ellipse (~0..255 HU) whose height varies by slice.
        ry = 150 + (i % 40)
        pixels = _pixels(
            f"ct/{i}",
            512,
            512,
            lambda y, ry=ry: _ellipse_spans(y, 256, 256, 230, ry, 512, 1, 0),
            (0, 4),
        )
        _image(ds, 512, 512, 12, pixels)
        yield f"CT_{i + 1:04d}.dcm", ds


def _gen_tiny() -> Iterator[tuple[str, Dataset]]:
    for s in range(10):
        study, frame = bench_uid("tiny", "study", s), bench_uid("tiny", "for", s)
        for se in range(2):
            series = bench_uid("tiny", "series", s, se)
            for i in range(50):
                n = s * 100 + se * 50 + i
                ds = _base(MR_IMAGE_STORAGE, bench_uid("tiny", "instance", n))
                ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
                _patient_study(ds, 100 + s, study, f"ACC-MR-{s:04d}", "MR BRAIN WO CONTRAST")
                ds.Modality = "MR"
                ds.Manufacturer = "BenchMag"
                ds.ManufacturerModelName = "Synthetic 1.5T"
                ds.SeriesDate, ds.SeriesTime = STUDY_DATE, f"1{s}{20 + se:02d}00"
                ds.ContentDate, ds.ContentTime = STUDY_DATE, f"1{s}{20 + se:02d}{i:02d}"
                ds.SeriesDescription = ["AX T1 SE", "AX T2 FSE"][se]
                ds.ProtocolName = "BRAIN ROUTINE"
                ds.BodyPartExamined = "BRAIN"
                ds.ScanningSequence = "SE"
                ds.SequenceVariant = "SK"
                ds.MRAcquisitionType = "2D"
                ds.SliceThickness = "5"
                ds.RepetitionTime = ["500", "4000"][se]
                ds.EchoTime = ["15", "100"][se]
                ds.MagneticFieldStrength = "1.5"
                ds.PatientPosition = "HFS"
                ds.SeriesInstanceUID = series
                ds.SeriesNumber = se + 2
                ds.InstanceNumber = i + 1
                ds.ImagePositionPatient = [-120.0, -120.0, -60.0 + 5.0 * i]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.FrameOfReferenceUID = frame
                ds.SliceLocation = f"{-60.0 + 5.0 * i:.1f}"
                ds.PixelSpacing = [3.75, 3.75]
                ds.WindowCenter, ds.WindowWidth = "600", "1200"
                pixels = _pixels(
                    f"tiny/{n}",
                    64,
                    64,
                    lambda y: _ellipse_spans(y, 32, 32, 28, 30, 64, 1, 0),
                    (0, 3 + se),
                )
                _image(ds, 64, 64, 12, pixels)
                yield f"MR_{n + 1:05d}.dcm", ds


def _gen_big() -> Iterator[tuple[str, Dataset]]:
    for s in range(5):
        study = bench_uid("big", "study", s)
        for v, view in enumerate(["PA", "LATERAL"]):
            n = s * 2 + v
            ds = _base(DX_FOR_PRESENTATION, bench_uid("big", "instance", n))
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            _patient_study(ds, 200 + s, study, f"ACC-DX-{s:04d}", "XR CHEST 2 VIEWS")
            ds.Modality = "DX"
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.Manufacturer = "BenchRay"
            ds.ManufacturerModelName = "Synthetic FPD 43x43"
            ds.SeriesDate, ds.SeriesTime = STUDY_DATE, f"14{s:02d}{v:02d}"
            ds.ContentDate, ds.ContentTime = STUDY_DATE, f"14{s:02d}{v:02d}.5"
            ds.SeriesDescription = f"CHEST {view}"
            ds.BodyPartExamined = "CHEST"
            ds.ViewPosition = "PA" if view == "PA" else "LL"
            ds.PatientOrientation = ["P", "F"] if view == "PA" else ["A", "F"]
            ds.KVP = "125"
            ds.ImagerPixelSpacing = [0.1, 0.1]
            ds.BurnedInAnnotation = "NO"
            ds.LossyImageCompression = "00"
            ds.PixelIntensityRelationship = "LOG"
            ds.PixelIntensityRelationshipSign = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
            ds.WindowCenter, ds.WindowWidth = "8192", "16384"
            ds.SeriesInstanceUID = bench_uid("big", "series", s, v)
            ds.SeriesNumber = v + 1
            ds.InstanceNumber = 1
            # Bright background, a darker chest ellipse (14-bit values).
            rx = 1300 if view == "PA" else 1000
            pixels = _pixels(
                f"big/{n}",
                4000,
                4000,
                lambda y, rx=rx: _ellipse_spans(y, 2000, 2100, rx, 1700, 4000, 1, 0),
                (0x30, 0x18),
            )
            _image(ds, 4000, 4000, 14, pixels)
            yield f"DX_{n + 1:03d}.dcm", ds


SHAPES: dict[str, Callable[[], Iterator[tuple[str, Dataset]]]] = {
    "ct": _gen_ct,
    "tiny": _gen_tiny,
    "big": _gen_big,
}


# ------------------------------------------------------------------ cache


def _manifest_path(root: Path, shape: str) -> Path:
    return root / f"{shape}.manifest.json"


def _load(root: Path, shape: str) -> Corpus | None:
    """The cached corpus if its manifest is current and matches the files on disk."""
    try:
        manifest = json.loads(_manifest_path(root, shape).read_text())
    except (OSError, ValueError):
        return None
    directory = root / shape
    if manifest.get("version") != GENERATOR_VERSION or not directory.is_dir():
        return None
    sizes = [p.stat().st_size for p in directory.iterdir() if p.is_file()]
    if len(sizes) != manifest.get("count") or sum(sizes) != manifest.get("bytes"):
        return None
    return Corpus(shape, directory, len(sizes), sum(sizes), min(sizes), max(sizes))


def generate(root: Path, shape: str) -> Corpus:
    """(Re)generate one shape: written to a temporary directory, then renamed."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = _manifest_path(root, shape)
    manifest.unlink(missing_ok=True)
    final = root / shape
    temp = root / f".{shape}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    sizes: list[int] = []
    for name, ds in SHAPES[shape]():
        path = temp / name
        ds.save_as(path, enforce_file_format=True)
        sizes.append(path.stat().st_size)
    shutil.rmtree(final, ignore_errors=True)
    temp.rename(final)
    corpus = Corpus(shape, final, len(sizes), sum(sizes), min(sizes), max(sizes))
    record = {
        "shape": shape,
        "version": GENERATOR_VERSION,
        "dir": str(final),
        "count": corpus.count,
        "bytes": corpus.bytes,
        "min_size": corpus.min_size,
        "max_size": corpus.max_size,
    }
    manifest.write_text(json.dumps(record, indent=2) + "\n")
    return corpus


def ensure_corpus(shape: str, root: Path = DEFAULT_ROOT, *, force: bool = False) -> Corpus:
    """The corpus for ``shape`` under ``root``, generated only if missing or stale."""
    if shape not in SHAPES:
        raise ValueError(f"unknown corpus shape {shape!r} (known: {', '.join(SHAPES)})")
    corpus = None if force else _load(root, shape)
    if corpus is None:
        print(f"corpus: generating {shape} in {root / shape} ...", file=sys.stderr, flush=True)
        corpus = generate(root, shape)
    return corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "shapes", nargs="*", metavar="SHAPE", help=f"any of {', '.join(SHAPES)} (default: all)"
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape(s): {', '.join(unknown)}")
    for shape in args.shapes or list(SHAPES):
        c = ensure_corpus(shape, args.root, force=args.force)
        sizes = f"{c.min_size}-{c.max_size} B"
        print(f"{shape}: {c.count} files, {c.bytes / 1e6:.2f} MB ({sizes}) in {c.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
