"""Plain helpers for the end-to-end ingest tests (datasets, peers, comparisons).

Kept out of conftest.py because pytest runs with ``--import-mode=importlib``, under which
a conftest cannot be imported by test modules; conftest.py puts this directory on
``sys.path`` so ``from ingest_support import ...`` works (as in tests/interop/).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from protocol.net import Association, ContextRequest, Timeouts, associate
from protocol.uids import VERIFICATION

HOST = "127.0.0.1"
IS_CI = os.environ.get("CI", "").lower() == "true"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = str(ExplicitVRLittleEndian)
IMPLICIT_LE = str(ImplicitVRLittleEndian)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700

#: What the router may name a committed spool file (DESIGN §3.1: never peer text).
SPOOL_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{32}\.dcm$")

#: The destinations and rules every test node is configured with through the CLI:
#: CT goes to pacs and archive, MR to archive only, anything else matches no rule.
DESTINATIONS = ("pacs", "archive")
RULES: tuple[tuple[str, ...], ...] = (
    ("ct-to-pacs", "--when", "Modality == CT", "--to", "pacs"),
    ("ct-mr-to-archive", "--when", "Modality in CT,MR", "--to", "archive"),
)
EXPECTED_DESTINATIONS = {"CT": ["archive", "pacs"], "MR": ["archive"], "OT": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------
# DCMTK
# --------------------------------------------------------------------------------------
def _is_native_executable(path: Path) -> bool:
    # pynetdicom installs Python scripts named storescu/echoscu into the venv: not DCMTK.
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def require_dcmtk(name: str) -> str:
    """DCMTK's ``name``; missing, it fails the test with CI=true and skips it otherwise."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for directory in dirs:
        candidate = Path(directory or ".") / name
        executable = candidate.is_file() and os.access(candidate, os.X_OK)
        if executable and _is_native_executable(candidate):
            return str(candidate)
    message = f"DCMTK {name} is not installed (apt-get install dcmtk)"
    if IS_CI:
        pytest.fail(message)
    pytest.skip(message)


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
def make_dataset(modality: str = "CT", *, rows: int = 16, columns: int = 16) -> Dataset:
    """A small image instance with a sequence, a multi-valued element and pixel data."""
    sop_class = {"CT": CT_IMAGE, "MR": MR_IMAGE}.get(modality, SECONDARY_CAPTURE)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "E2E^Ingest^Ünïcode"
    ds.PatientID = "E2E-1"
    ds.StudyDate = "20240102"
    ds.StudyTime = "112233.456"
    ds.AccessionNumber = "ACC-E2E"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.ImagePositionPatient = [-10.0, 20.5, 30.25]
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    item = Dataset()
    item.CodeValue = "T-D0050"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Tissue"
    ds.AnatomicRegionSequence = [item]
    ds.PixelData = b"".join(((i * 37) % 4096).to_bytes(2, "little") for i in range(rows * columns))
    ds["PixelData"].VR = "OW"
    return ds


def encode_dataset(ds: Dataset, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """The dataset as a C-STORE carries it (no preamble, no file meta)."""
    buffer = BytesIO()
    ds.save_as(
        buffer,
        implicit_vr=transfer_syntax == IMPLICIT_LE,
        little_endian=True,
        enforce_file_format=False,
    )
    return buffer.getvalue()


def write_part10(ds: Dataset, path: Path, transfer_syntax: str = EXPLICIT_LE) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_same_dataset(stored: Path, original: Dataset, transfer_syntax: str) -> None:
    """``stored`` is a valid Part 10 file whose dataset equals ``original`` element by
    element (group lengths and trailing padding a sender may drop are not compared)."""
    got = pydicom.dcmread(stored)  # raises unless it is a Part 10 file with a preamble
    assert got.preamble is not None, stored
    meta = got.file_meta
    assert meta.TransferSyntaxUID == transfer_syntax, stored
    assert meta.MediaStorageSOPClassUID == original.SOPClassUID, stored
    assert meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID, stored
    sent_tags = [e.tag for e in original if e.tag.element != 0 and e.tag != 0xFFFCFFFC]
    got_tags = [e.tag for e in got if e.tag.element != 0 and e.tag != 0xFFFCFFFC]
    assert got_tags == sent_tags, f"{stored}: element tags differ"
    for tag in sent_tags:
        sent, received = original[tag], got[tag]
        assert received.VR == sent.VR or {received.VR, sent.VR} <= {"OB", "OW", "OB or OW"}, tag
        assert received.value == sent.value, f"{stored}: {sent.tag} {sent.name} differs"


def is_failure(status: int) -> bool:
    """A C-STORE failure status (PS3.7 C.4.2.1.4 / Annex C): not success, not a warning
    (0x0001, 0xB000-0xBFFF), not pending."""
    return status not in (0x0000, 0x0001, 0x0107, 0x0116, 0xFF00, 0xFF01) and not (
        0xB000 <= status <= 0xBFFF
    )


# --------------------------------------------------------------------------------------
# file trees
# --------------------------------------------------------------------------------------
def tree(root: Path) -> set[str]:
    """Every path under ``root`` (files, directories, links), relative, not followed."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


# --------------------------------------------------------------------------------------
# our client
# --------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def open_association(
    port: int,
    abstract_syntaxes: Sequence[str] = (CT_IMAGE,),
    transfer_syntax: str = EXPLICIT_LE,
    *,
    dimse_timeout: float = 30.0,
    called_ae: str = "ROUTER",
) -> AsyncIterator[Association]:
    """An association to the router (Verification is always proposed too); released
    on the way out if it is still alive, aborted if the body failed. ``called_ae`` is
    the node's AE title (``serve --aet``; a node checks it, listener.check_called_ae)."""
    contexts = [ContextRequest(a, (transfer_syntax,)) for a in abstract_syntaxes]
    contexts.append(ContextRequest(VERIFICATION, (EXPLICIT_LE,)))
    assoc = await associate(
        HOST,
        port,
        contexts,
        called_ae=called_ae,
        calling_ae="E2E-SCU",
        timeouts=Timeouts(connect=10, acse=10, dimse=dimse_timeout),
    )
    try:
        yield assoc
    except BaseException:
        if assoc.is_alive:
            assoc.abort()
        raise
    if assoc.is_alive:
        await assoc.release()


# --------------------------------------------------------------------------------------
# tmpfs
# --------------------------------------------------------------------------------------
def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        message = f"cannot mount a tmpfs on {path}: {result.stderr.strip()}"
        if IS_CI:
            pytest.fail(message)  # CI runs as root: this must work there
        pytest.skip(message)


def unmount(path: Path) -> None:
    """Unmount, lazily if something still holds it (never leaves a mount behind)."""
    result = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True, timeout=30)
