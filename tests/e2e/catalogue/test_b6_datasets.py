"""Catalogue B.6, bad data sets, against a live ``dicom-router serve`` (layer I).

Every case runs with the catalogue's ``invariant`` and sends its data set from the
harness's raw peer (``Store`` of test_b5_paths.py) as bytes built here element by
element (PS3.5 7.1), so that each malformation is exactly where the case says; the
corpus case (DS-15) uses DCMTK storescu on pydicom's bundled files. A refused data set
gets a failure status with an Error Comment and one WARNING naming the peer, leaves no
row and no file, and the association goes on (a valid store after it succeeds). The
walker's own unit tests are tests/unit/test_walker*.py; here the bytes come from a
socket and the answer, the spool and the database are checked.

Policies where the catalogue leaves a choice: file meta elements in the data set
(DS-08) are refused (0xC000), not stripped; a data set missing its SOP Class, SOP
Instance or Study Instance UID (DS-09) is stored under the command's UIDs (the file
meta is built from the command anyway, and a study-less instance is still routable).

Scaled down (DESIGN §8): DS-13's 5 GiB data set runs as 64 MiB (``CATALOGUE_DS13_BYTES``
sets the size on demand; at 5 GiB it also shows the 64-bit size column).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from harness import (
    COMMAND_LAST,
    CT_IMAGE,
    DATASET_LAST,
    DATASET_MORE,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    PATIENT_ID,
    PATIENT_NAME,
    VERIFICATION,
    ProcessWatch,
    p_data_tf,
    pdv,
)
from pydicom.uid import generate_uid
from test_b5_paths import SUCCESS, Store, dataset_of, store_command

from tests.e2e.ingest_support import require_dcmtk

BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
REFERENCED_SERIES = 0x00081115  # an SQ to nest (any SQ does)
DS13_BYTES = int(os.environ.get("CATALOGUE_DS13_BYTES", 64 << 20))  # full size: 5 GiB
REFUSED = r"C-STORE answered 0x[AC]"


# --------------------------------------------------------------------------------------
# data sets as bytes
# --------------------------------------------------------------------------------------
def _pad(value: bytes, vr: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    return value


def ex(
    tag: int, vr: bytes, value: bytes = b"", length: int | None = None, endian: str = "<"
) -> bytes:
    """An Explicit VR element (PS3.5 7.1.2); ``length`` overrides the true one."""
    n = len(value) if length is None else length
    group, element = tag >> 16, tag & 0xFFFF
    if vr in LONG_VRS:
        return struct.pack(f"{endian}HH2sHL", group, element, vr, 0, n) + value
    return struct.pack(f"{endian}HH2sH", group, element, vr, n) + value


def im(tag: int, value: bytes = b"", length: int | None = None) -> bytes:
    """An Implicit VR Little Endian element (PS3.5 7.1.3)."""
    n = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, n) + value


def delimiter(tag: int) -> bytes:
    """Item, item delimitation or sequence delimitation item (PS3.5 7.5)."""
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, 0 if tag != ITEM else UNDEFINED)


def base(uid: str, *, implicit: bool = False, omit=(), override=None) -> bytes:  # type: ignore[no-untyped-def]
    """A small CT data set (the catalogue's patient data), element by element;
    ``override`` replaces values by tag, ``omit`` leaves elements out."""
    elements = {
        0x00080005: (b"CS", b"ISO_IR 100"),
        0x00080016: (b"UI", CT_IMAGE.encode()),
        0x00080018: (b"UI", uid.encode()),
        0x00080060: (b"CS", b"CT"),
        0x00100010: (b"PN", PATIENT_NAME.encode()),
        0x00100020: (b"LO", PATIENT_ID.encode()),
        0x0020000D: (b"UI", generate_uid().encode()),
        0x0020000E: (b"UI", generate_uid().encode()),
    }
    out = b""
    for tag, (vr, value) in elements.items():
        if tag in omit:
            continue
        value = _pad((override or {}).get(tag, value), vr)
        out += im(tag, value) if implicit else ex(tag, vr, value)
    return out


def pixels(data: bytes) -> bytes:
    return ex(0x7FE00010, b"OW", data)


def nested(depth: int) -> bytes:
    """``depth`` sequences, each in an item of the one around it (undefined lengths)."""
    head = (ex(REFERENCED_SERIES, b"SQ", length=UNDEFINED) + delimiter(ITEM)) * depth
    tail = (delimiter(ITEM_END) + delimiter(SEQ_END)) * depth
    return head + ex(0x0020000E, b"UI", _pad(generate_uid().encode(), b"UI")) + tail


# --------------------------------------------------------------------------------------
# the cases' common shape
# --------------------------------------------------------------------------------------
CT_EXPLICIT = ((1, CT_IMAGE, (EXPLICIT_LE,)), (3, VERIFICATION, (IMPLICIT_LE,)))


def refused(node, invariant, uid: str, dataset: bytes, *, contexts=CT_EXPLICIT, good_explicit=True):  # type: ignore[no-untyped-def]
    """``dataset`` answered with a failure status and an Error Comment; nothing kept;
    a valid store on the same association succeeds afterwards."""
    with Store(node.port, contexts) as store:
        status, comment = store.store(uid.encode(), dataset)
        assert 0xC000 <= status <= 0xCFFF or 0xA900 <= status <= 0xA9FF, (hex(status), comment)
        assert comment, "a failure without an Error Comment"
        store.good(invariant, explicit=good_explicit)
        store.release()
    assert uid not in node.uids()
    invariant.expect_warning(REFUSED)
    return status, comment


def stored(node, invariant, uid: str, dataset: bytes, *, contexts=CT_EXPLICIT) -> dict:  # type: ignore[no-untyped-def]
    """``dataset`` acknowledged; returns its row (its file holds exactly those bytes)."""
    with Store(node.port, contexts) as store:
        assert store.store(uid.encode(), dataset) == (SUCCESS, "")
        store.release()
    invariant.acknowledged(uid)
    (row,) = [r for r in node.instances() if r["sop_instance_uid"] == uid]
    assert dataset_of(node.store_dir / str(row["spool_name"])) == dataset
    assert row["size"] == len(dataset)
    return row


# --------------------------------------------------------------------------------------
# DS-01: truncated
# --------------------------------------------------------------------------------------
TRUNCATED = {
    "DS-01-in-a-header": lambda uid: base(uid) + ex(0x00200013, b"IS", b"1 ")[:5],
    "DS-01-in-a-value": lambda uid: base(uid) + ex(0x00200013, b"IS", b"12", length=10),
    "DS-01-in-pixel-data": lambda uid: base(uid) + ex(0x7FE00010, b"OW", bytes(100), length=512),
    "DS-01-in-a-sequence": lambda uid: base(uid) + ex(REFERENCED_SERIES, b"SQ", length=UNDEFINED)
    + delimiter(ITEM) + ex(0x0020000E, b"UI", b"1.2.3.4")[:6],
}  # fmt: skip


@pytest.mark.parametrize("build", list(TRUNCATED.values()), ids=list(TRUNCATED))
def test_ds_01_truncated_data_set_fails_and_is_not_routed(catalogue_node, invariant, build):
    """The last fragment ends inside an element header or value, also in bytes no rule
    reads (pixel data): 0xC000-range with an Error Comment, no row, no job."""
    uid = generate_uid()
    status, _ = refused(catalogue_node, invariant, uid, build(uid))
    assert 0xC000 <= status <= 0xCFFF, hex(status)


# --------------------------------------------------------------------------------------
# DS-02: bytes of another transfer syntax
# --------------------------------------------------------------------------------------
MISMATCHED = {
    "DS-02-explicit-on-implicit": (IMPLICIT_LE, False),
    "DS-02-implicit-on-explicit": (EXPLICIT_LE, True),
    "DS-02-little-on-big-endian": (BIG_ENDIAN, False),
}


@pytest.mark.parametrize(
    ("context_ts", "implicit_bytes"), list(MISMATCHED.values()), ids=list(MISMATCHED)
)
def test_ds_02_data_set_in_another_transfer_syntax_than_its_context_fails(
    catalogue_node, invariant, context_ts, implicit_bytes
):
    """Explicit VR bytes on an Implicit VR context, implicit on explicit, little endian
    on big endian: the walker's VR and length checks refuse them (never a crash)."""
    uid = generate_uid()
    contexts = ((1, CT_IMAGE, (context_ts,)), (3, VERIFICATION, (IMPLICIT_LE,)))
    data = base(uid, implicit=implicit_bytes) + (
        im(0x7FE00010, bytes(64)) if implicit_bytes else pixels(bytes(64))
    )
    if context_ts == BIG_ENDIAN:  # a valid good store needs a context of its own
        contexts = (*contexts, (5, CT_IMAGE, (EXPLICIT_LE,)))
    with Store(catalogue_node.port, contexts) as store:
        status, comment = store.store(uid.encode(), data)
        assert 0xC000 <= status <= 0xCFFF, (hex(status), comment)
        assert comment
        if context_ts == BIG_ENDIAN:
            store.good(invariant, context_id=5)
        else:
            store.good(invariant, explicit=context_ts == EXPLICIT_LE)
        store.release()
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(REFUSED)


# --------------------------------------------------------------------------------------
# DS-03 / DS-04: lengths
# --------------------------------------------------------------------------------------
HUGE = 0xFFFFFFF0
OVERLONG = {
    "DS-03-implicit-pn": (
        IMPLICIT_LE,
        lambda uid: base(uid, implicit=True) + im(0x00101001, b"X^Y ", length=HUGE),
    ),
    "DS-03-explicit-ut": (
        EXPLICIT_LE,
        lambda uid: base(uid) + ex(0x00204000, b"UT", b"text", length=HUGE),
    ),
    "DS-03-explicit-ob": (
        EXPLICIT_LE,
        lambda uid: base(uid) + ex(0x7FE00010, b"OB", bytes(16), length=HUGE),
    ),
}


@pytest.mark.parametrize(("ts", "build"), list(OVERLONG.values()), ids=list(OVERLONG))
def test_ds_03_element_length_past_the_end_fails_without_allocating_it(
    catalogue_node, invariant, ts, build
):
    """A length of 0xFFFFFFF0 with a few bytes behind it: refused at the end of the data
    set, and the listener's resident memory does not grow by anything like 4 GiB."""
    uid = generate_uid()
    watch = ProcessWatch(catalogue_node.listener_pids())
    contexts = ((1, CT_IMAGE, (ts,)), (3, VERIFICATION, (IMPLICIT_LE,)))
    refused(
        catalogue_node,
        invariant,
        uid,
        build(uid),
        contexts=contexts,
        good_explicit=ts == EXPLICIT_LE,
    )
    assert watch.rss_growth() < 64 << 20, watch.rss_growth()


UNDEFINED_ON_VALUES = {
    "DS-04-ut": lambda uid: base(uid) + ex(0x00204000, b"UT", b"text", length=UNDEFINED),
    "DS-04-uc": lambda uid: base(uid) + ex(0x00189009, b"UC", b"text", length=UNDEFINED),
    "DS-04-ur": lambda uid: base(uid) + ex(0x00080120, b"UR", b"http://x", length=UNDEFINED),
}


@pytest.mark.parametrize("build", list(UNDEFINED_ON_VALUES.values()), ids=list(UNDEFINED_ON_VALUES))
def test_ds_04_undefined_length_on_a_value_vr_fails(catalogue_node, invariant, build):
    """Undefined length (0xFFFFFFFF) on UT, UC, UR. (Undefined-length OB outside Pixel
    Data is read leniently as encapsulated fragments, router/walker.py, and is refused
    only when what follows is not items.)"""
    uid = generate_uid()
    refused(catalogue_node, invariant, uid, build(uid))


def test_ds_04_undefined_length_on_implicit_vr_text_fails(catalogue_node, invariant):
    """In Implicit VR an undefined length makes a sequence (PS3.5 7.5); on PatientName
    followed by ordinary elements it is a sequence without items: refused."""
    uid = generate_uid()
    data = base(uid, implicit=True) + im(0x00101001, length=UNDEFINED) + im(0x00200013, b"1 ")
    contexts = ((1, CT_IMAGE, (IMPLICIT_LE,)), (3, VERIFICATION, (IMPLICIT_LE,)))
    refused(catalogue_node, invariant, uid, data, contexts=contexts, good_explicit=False)


# --------------------------------------------------------------------------------------
# DS-05: delimiters
# --------------------------------------------------------------------------------------
UNDELIMITED_SQ = ex(REFERENCED_SERIES, b"SQ", length=UNDEFINED)
SERIES_ELEMENT = ex(0x0020000E, b"UI", b"1.2.3.4\0")
DELIMITERS = {
    "DS-05-sequence-without-delimiter": UNDELIMITED_SQ + delimiter(ITEM) + delimiter(ITEM_END),
    "DS-05-item-without-delimiter": UNDELIMITED_SQ + delimiter(ITEM) + SERIES_ELEMENT,
    "DS-05-stray-item-delimiter": delimiter(ITEM_END),
    "DS-05-stray-sequence-delimiter": delimiter(SEQ_END),
    "DS-05-stray-item": delimiter(ITEM) + SERIES_ELEMENT,
}  # fmt: skip


@pytest.mark.parametrize("tail", list(DELIMITERS.values()), ids=list(DELIMITERS))
def test_ds_05_missing_or_stray_delimiters_fail_at_the_end_of_data(catalogue_node, invariant, tail):
    uid = generate_uid()
    refused(catalogue_node, invariant, uid, base(uid) + tail)


# --------------------------------------------------------------------------------------
# DS-06: nesting depth
# --------------------------------------------------------------------------------------
def test_ds_06_nesting_at_the_depth_limit_is_stored(catalogue_node, invariant):
    """64 nested sequences (the walker's limit, DCMTK's default) are fine."""
    uid = generate_uid()
    stored(catalogue_node, invariant, uid, base(uid) + nested(64))
    invariant.expect_no_warning()


@pytest.mark.parametrize("depth", [65, 300, 10_000], ids=["DS-06-65", "DS-06-300", "DS-06-10000"])
def test_ds_06_nesting_past_the_depth_limit_fails_without_recursion_error(
    catalogue_node, invariant, depth
):
    uid = generate_uid()
    refused(catalogue_node, invariant, uid, base(uid) + nested(depth))
    assert "RecursionError" not in catalogue_node.log()


# --------------------------------------------------------------------------------------
# DS-07: delimiter bytes inside a fragment
# --------------------------------------------------------------------------------------
def test_ds_07_delimiter_bytes_inside_an_encapsulated_fragment_are_stored_byte_identically(
    catalogue_node, invariant
):
    """A JPEG fragment holding ``FE FF DD E0 00 00 00 00`` and ``FE FF 0D E0``: stored as
    sent, byte for byte (the walker skips fragment bytes; nothing is re-encoded). That
    the worker forwards the spool file's bytes unchanged is DST's global check in
    test_b8_destinations.py (every scripted destination's data set hashes to the
    instance's digest)."""
    uid = generate_uid()
    fragment = (
        b"\xff\xd8"
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\x0d\xe0"
        + bytes(6)
        + b"\xff\xd9"
    )
    encapsulated = (
        ex(0x7FE00010, b"OB", length=UNDEFINED)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0)  # empty basic offset table
        + struct.pack("<HHL", 0xFFFE, 0xE000, len(fragment)) + fragment
        + delimiter(SEQ_END)
    )  # fmt: skip
    contexts = ((1, CT_IMAGE, (JPEG_BASELINE,)), (3, VERIFICATION, (IMPLICIT_LE,)))
    row = stored(catalogue_node, invariant, uid, base(uid) + encapsulated, contexts=contexts)
    assert row["transfer_syntax"] == JPEG_BASELINE
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# DS-08: file meta elements in the data set
# --------------------------------------------------------------------------------------
def test_ds_08_file_meta_elements_in_the_data_set_are_refused(catalogue_node, invariant):
    """(0002,xxxx) elements (here a Transfer Syntax UID saying big endian) before the
    data set's own: the spool file could not then have exactly one meta header of ours
    (a Part 10 reader takes the peer's group 0002 as part of it). Policy: refused."""
    uid = generate_uid()
    meta = ex(0x00020002, b"UI", _pad(CT_IMAGE.encode(), b"UI")) + ex(
        0x00020010, b"UI", _pad(BIG_ENDIAN.encode(), b"UI")
    )
    refused(catalogue_node, invariant, uid, meta + base(uid))


# --------------------------------------------------------------------------------------
# DS-09: required UIDs missing
# --------------------------------------------------------------------------------------
MISSING = {
    "DS-09-sop-class": (0x00080016,),
    "DS-09-sop-instance": (0x00080018,),
    "DS-09-study": (0x0020000D,),
    "DS-09-all-three": (0x00080016, 0x00080018, 0x0020000D),
}


@pytest.mark.parametrize("omit", list(MISSING.values()), ids=list(MISSING))
def test_ds_09_missing_uids_are_taken_from_the_command(catalogue_node, invariant, omit):
    """Policy: stored under the command's SOP Class and Instance UIDs (the file meta is
    built from them); a missing Study Instance UID is stored as none."""
    uid = generate_uid()
    row = stored(catalogue_node, invariant, uid, base(uid, omit=omit))
    meta = pydicom.dcmread(
        catalogue_node.store_dir / str(row["spool_name"]), stop_before_pixels=True
    )
    assert meta.file_meta.MediaStorageSOPInstanceUID == uid
    assert meta.file_meta.MediaStorageSOPClassUID == CT_IMAGE
    (study,) = catalogue_node.query(
        "select study_instance_uid from instances where sop_instance_uid = ?", uid
    )[0]
    assert (study is None) == (0x0020000D in omit)
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# DS-10: UIDs longer than 64 characters
# --------------------------------------------------------------------------------------
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 50  # 76 characters


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
    ids=["DS-10-study", "DS-10-series", "DS-10-sop-instance"],
)  # fmt: skip
def test_ds_10_uid_longer_than_64_characters_is_a_failure_status_not_an_abort(
    catalogue_node, invariant, keyword
):
    """pynetdicom#769: a 76-character UID in the data set (the command's is valid): a
    failure status with an Error Comment, and the association goes on."""
    uid = generate_uid()
    tag = {
        "StudyInstanceUID": 0x0020000D,
        "SeriesInstanceUID": 0x0020000E,
        "SOPInstanceUID": 0x00080018,
    }[keyword]
    data = base(uid, override={tag: LONG_UID.encode()})
    refused(catalogue_node, invariant, uid, data)


# --------------------------------------------------------------------------------------
# DS-11: character sets a rule cannot read cleanly
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def name_rule(catalogue_node):  # type: ignore[no-untyped-def]
    """A rule ``PatientName like Caf*`` -> pacs for the rest of the module (no other
    case's patient is called so; the listener reloads rules within a second, waited
    for in its log)."""
    node = catalogue_node
    offset = node.log_size()
    node.cli(
        "rules",
        "add",
        "ds11-name",
        "--when",
        "PatientName like Caf*",
        "--to",
        "pacs",
        "--priority",
        "1",
    )
    _wait_log(node, offset, "rules loaded")
    yield
    offset = node.log_size()
    node.cli("rules", "remove", "ds11-name")
    _wait_log(node, offset, "rules loaded")


def _wait_log(node, offset: int, text: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while text not in node.log_since(offset):
        assert time.monotonic() < deadline, f"no {text!r} in the node's log"
        time.sleep(0.05)


CHARSETS = {
    "DS-11-unknown-charset": (b"ISO_IR 999", b"Caf\xe9\xff\xfe"),
    "DS-11-invalid-utf8": (b"ISO_IR 192", b"Caf\xc3\x28\xa0\xa1"),
    "DS-11-bad-iso2022-escape": (b"ISO 2022 IR 87", b"Caf\x1b$Z\xff"),
}


@pytest.mark.parametrize(("charset", "name"), list(CHARSETS.values()), ids=list(CHARSETS))
def test_ds_11_undecodable_patient_name_a_rule_reads_does_not_crash_the_rules(
    catalogue_node, invariant, name_rule, charset, name
):
    """An unknown or wrongly used Specific Character Set and undecodable bytes in the
    PatientName a rule matches: the walker decodes with replacement (an unknown term
    falls back to Latin-1), the rule sees "Caf..." and routes it; no error in the log.
    Policy for "cannot evaluate": there is none to apply, decoding never fails."""
    uid = generate_uid()
    data = base(uid, override={0x00080005: charset, 0x00100010: name})
    row = stored(catalogue_node, invariant, uid, data)
    assert "pacs" in row["destinations"], row
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# DS-12: empty
# --------------------------------------------------------------------------------------
def test_ds_12_zero_byte_data_set_fails(catalogue_node, invariant):
    uid = generate_uid()
    status, _ = refused(catalogue_node, invariant, uid, b"")
    assert 0xC000 <= status <= 0xCFFF, hex(status)


# --------------------------------------------------------------------------------------
# DS-13: large
# --------------------------------------------------------------------------------------
def test_ds_13_large_data_set_is_streamed_to_disk_with_flat_memory(catalogue_node, invariant):
    """64 MiB of pixel data here (5 GiB at full size, ``CATALOGUE_DS13_BYTES``) in PDVs
    of 256 KiB: acknowledged, stored byte for byte (size and SHA-256 of the data set),
    and the listener's resident memory grows by far less than the data set."""
    node = catalogue_node
    uid = generate_uid()
    head = base(uid) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, DS13_BYTES)
    chunk = os.urandom(256 * 1024 - 6)
    watch = ProcessWatch(node.listener_pids())
    digest = hashlib.sha256(head)
    with Store(node.port) as store:
        store._message_id += 1
        store.peer.send(p_data_tf(pdv(1, COMMAND_LAST, store_command(1, uid.encode()))))
        store.peer.send(p_data_tf(pdv(1, DATASET_MORE, head)))
        left = DS13_BYTES
        while left:
            piece = chunk[: min(left, len(chunk))]
            left -= len(piece)
            digest.update(piece)
            store.peer.send(p_data_tf(pdv(1, DATASET_LAST if not left else DATASET_MORE, piece)))
        assert store.answer() == (SUCCESS, "")
        store.release()
    invariant.acknowledged(uid)
    (row,) = [r for r in node.instances() if r["sop_instance_uid"] == uid]
    assert row["size"] == len(head) + DS13_BYTES
    (recorded,) = node.query("select digest from instances where sop_instance_uid = ?", uid)[0]
    assert recorded == digest.hexdigest()
    path = node.store_dir / str(row["spool_name"])
    with open(path, "rb") as f:
        f.seek(path.stat().st_size - row["size"])
        on_disk = hashlib.sha256()
        while block := f.read(1 << 20):
            on_disk.update(block)
    assert on_disk.hexdigest() == digest.hexdigest()
    assert watch.rss_growth() < min(32 << 20, DS13_BYTES // 2), watch.rss_growth()
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# DS-14 (P2): odd lengths
# --------------------------------------------------------------------------------------
def test_ds_14_odd_length_values_are_tolerated_and_kept_unchanged(catalogue_node, invariant):
    """An odd-length UID without its NUL pad and an odd-length LO: stored as sent."""
    uid = generate_uid()
    odd_uid = generate_uid()
    odd_uid = odd_uid if len(odd_uid) % 2 else odd_uid[:-1]
    data = base(uid) + ex(0x00200052, b"UI", odd_uid.encode()) + ex(0x00204000, b"LT", b"odd")
    stored(catalogue_node, invariant, uid, data)
    invariant.expect_no_warning()


# --------------------------------------------------------------------------------------
# DS-15: a corpus
# --------------------------------------------------------------------------------------
def _pydicom_files() -> list[Path]:
    """pydicom's bundled test files (never the downloadable ones)."""
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))


def test_ds_15_pydicom_corpus_each_file_is_stored_or_refused_and_nothing_crashes(
    catalogue_node, invariant
):
    """Every bundled pydicom test file sent by DCMTK storescu (one association, not
    halting on failures): each instance storescu sent is either stored (a row) or
    refused with a status; the listeners are the same processes afterwards."""
    node = catalogue_node
    files = _pydicom_files()
    pids = node.listener_pids()
    before = node.uids()
    argv = [require_dcmtk("storescu"), "-aec", "ROUTER", "-nh", "+sd", HOST, str(node.port)]
    result = subprocess.run([*argv, *map(str, files)], capture_output=True, text=True, timeout=300)
    assert node.listener_pids() == pids, "a listener died during the corpus"
    new = node.uids() - before
    # storescu's exit status covers the whole run; the rows are what was acknowledged
    # (the invariant's other checks: no torn file, no row without its file).
    for uid in new:
        invariant.acknowledged(uid)
    assert len(new) >= len(files) // 2, (len(new), len(files), result.stderr[-2000:])


def test_ds_15_mutated_data_sets_are_each_answered_and_nothing_crashes(catalogue_node, invariant):
    """200 copies of a valid data set with random bytes changed (seeded), on one
    association: each is answered with a status (the framing is intact, so never an
    abort), nothing is kept that was not acknowledged, the listener is the same."""
    import random

    node = catalogue_node
    rng = random.Random(20261202)
    pids = node.listener_pids()
    answered, warned = 0, 0
    with Store(node.port) as store:
        for _ in range(200):
            uid = generate_uid()
            data = bytearray(base(uid) + pixels(bytes(256)))
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            status, _comment = store.store(uid.encode(), bytes(data))
            answered += 1
            if status == SUCCESS:
                invariant.acknowledged(uid)
                # One warning still when a mutation made it match no rule (kept).
                states = [r["state"] for r in node.instances() if r["sop_instance_uid"] == uid]
                warned += states == ["unrouted"]
            else:
                warned += 1
        store.release()
    assert answered == 200
    assert node.listener_pids() == pids
    invariant.expect_warning(r"C-STORE answered 0x|matched no rule", count=warned)
