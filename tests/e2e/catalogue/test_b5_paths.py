"""Catalogue B.5, path traversal and file naming, against a live ``dicom-router serve``.

Spool names are made by the router (router/spool.py: a random 128-bit id); peer text
lives only in the database. So every case asserts the same thing: the bad text gets a
failure status with an Error Comment where it is not a UID (and the association goes
on), or is stored harmlessly where it is only text (AE titles, patient data); and the
node's tree holds nothing new but the store files of acknowledged rows, with nothing
created outside it (``_Outside``). Every case runs with the catalogue's ``invariant``.

Senders: the raw peer of the harness (bytes no toolkit would send: NUL, overlong UTF-8,
10,000-character UIDs), pynetdicom for the AE titles and patient data. The command's
UID and the data set's are checked separately: the command's is what a file name would
once have been built from (CVE-2022-2119), the data set's Study/Series Instance UIDs
are stored in the database (PT-02).

PT-10 (worker side: text from a destination never becomes a path) is in
test_b8_destinations.py, which has the forwarding node and the scripted destinations.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import uuid
import warnings
from pathlib import Path

import pytest
from harness import (
    COMMAND_LAST,
    CT_IMAGE,
    DATASET_LAST,
    DATASET_MORE,
    EXPLICIT_LE,
    HOST,
    IMPLICIT_LE,
    VERIFICATION,
    RawPeer,
    catalogue_dataset,
    command_set,
    dataset_bytes,
    p_data_tf,
    pdv,
)
from pydicom.uid import generate_uid

from router.settings import SpoolSettings
from router.spool import Spool
from tests.e2e.ingest_support import SPOOL_NAME, encode_dataset, tree

CONTEXTS = ((1, CT_IMAGE, (EXPLICIT_LE,)), (3, VERIFICATION, (IMPLICIT_LE,)))
SUCCESS = 0x0000
FRAGMENT = 65536
#: Places outside the node's tree a traversal could reach from serve's cwd, the spool's
#: directories or the root: none may exist after a case (they do not before).
SENTINELS = tuple(
    Path(p) for p in ("/x", "/b", "/tmp/pwn", "/tmp/x", "/tmp/b", "/secret", "/etc/x")
)
#: Entries of the node's tree that change for reasons of their own (audit, metrics,
#: process state, the database's journal, the good peers' scratch files).
VOLATILE = ("data/run", "data/audit", "data/router.sqlite", "good", "serve.log")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _ui(raw: bytes) -> bytes:
    return raw + b"\x00" * (len(raw) % 2)


def store_command(message_id: int, sop_instance: bytes, sop_class: str = CT_IMAGE) -> bytes:
    """A C-STORE-RQ command set whose Affected SOP Instance UID is ``sop_instance``
    as given (any bytes: the harness's ``c_store_rq`` takes text)."""
    return command_set(
        [
            (0x0002, _ui(sop_class.encode())),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, _ui(sop_instance)),
        ]
    )


def response_fields(body: bytes) -> dict[int, bytes]:
    """The command elements of a P-DATA-TF body carrying one whole command set."""
    data, out, offset = body[6:], {}, 0
    while offset + 8 <= len(data):
        _group, element, length = struct.unpack_from("<HHI", data, offset)
        out[element] = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
    return out


class Store:
    """One raw peer in Sta6 storing instances (by default CT Image Storage in Explicit
    VR Little Endian on context 1)."""

    def __init__(self, port: int, contexts=CONTEXTS) -> None:  # type: ignore[no-untyped-def]
        self.peer = RawPeer(HOST, port, timeout=30).connect()
        self.peer.associate(contexts=contexts)
        self._message_id = 0

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.peer.close()

    def send(self, sop_instance: bytes, dataset: bytes, context_id: int = 1) -> None:
        self._message_id += 1
        command = store_command(self._message_id, sop_instance)
        self.peer.send(p_data_tf(pdv(context_id, COMMAND_LAST, command)))
        # Fragments of 64 KiB: within the node's maximum PDU length (256 KiB).
        chunks = [dataset[i : i + FRAGMENT] for i in range(0, len(dataset), FRAGMENT)] or [b""]
        for n, chunk in enumerate(chunks):
            last = DATASET_LAST if n == len(chunks) - 1 else DATASET_MORE
            self.peer.send(p_data_tf(pdv(context_id, last, chunk)))

    def answer(self) -> tuple[int, str]:
        """(Status, Error Comment) of the next C-STORE-RSP."""
        pdu_type, body = self.peer.recv_pdu(within=30)
        assert pdu_type == 0x04, f"expected a C-STORE-RSP, got PDU type {pdu_type:#04x}"
        fields = response_fields(body)
        status = struct.unpack("<H", fields[0x0900])[0]
        return status, fields.get(0x0902, b"").decode(errors="replace").strip(" \0")

    def store(self, sop_instance: bytes, dataset: bytes, context_id: int = 1) -> tuple[int, str]:
        self.send(sop_instance, dataset, context_id)
        return self.answer()

    def good(self, invariant, context_id: int = 1, explicit: bool = True) -> str:  # type: ignore[no-untyped-def]
        """A valid instance on the same association: it must succeed (the association
        went on after the bad one)."""
        uid = generate_uid()
        dataset = dataset_bytes(uid, explicit=explicit)
        status, comment = self.store(uid.encode(), dataset, context_id)
        assert status == SUCCESS, (hex(status), comment)
        invariant.acknowledged(uid)
        return uid

    def release(self) -> None:
        self.peer.release()


class _Outside:
    """The node's tree and the places outside it before a case; ``check`` after it."""

    def __init__(self, node) -> None:  # type: ignore[no-untyped-def]
        self.node = node
        self.before = self._tree()
        passwd = Path("/etc/passwd").stat()
        self.passwd = (passwd.st_size, passwd.st_mtime_ns)
        self.rows = {str(name) for (name,) in node.query("select spool_name from instances")}
        assert not [p for p in SENTINELS if os.path.lexists(p)], "a sentinel exists already"

    def _tree(self) -> set[str]:
        return {p for p in tree(self.node.root) if not p.startswith(VOLATILE)}

    def check(self) -> None:
        after = self._tree()
        assert self.before - after == set(), f"paths disappeared: {sorted(self.before - after)}"
        rows = {str(name) for (name,) in self.node.query("select spool_name from instances")}
        store = self.node.store_dir.relative_to(self.node.root)
        expected = {str(store / name) for name in rows - self.rows}
        assert after - self.before == expected, f"unexpected paths: {sorted(after - self.before)}"
        assert all(SPOOL_NAME.match(name) for name in rows), sorted(rows)
        passwd = Path("/etc/passwd").stat()
        assert (passwd.st_size, passwd.st_mtime_ns) == self.passwd
        created = [p for p in SENTINELS if os.path.lexists(p)]
        assert not created, f"created outside the node: {created}"


@pytest.fixture
def outside(catalogue_node):  # type: ignore[no-untyped-def]
    watch = _Outside(catalogue_node)
    yield watch
    watch.check()


def _refused_bad_uid(catalogue_node, invariant, uid: bytes) -> None:  # type: ignore[no-untyped-def]
    """The bad UID in the command (a valid data set): a failure status with an Error
    Comment, no row; a valid store on the same association succeeds."""
    with Store(catalogue_node.port) as store:
        status, comment = store.store(uid, dataset_bytes(generate_uid()))
        assert 0xC000 <= status <= 0xCFFF or 0xA900 <= status <= 0xA9FF, hex(status)
        assert comment, "a failure without an Error Comment"
        store.good(invariant)
        store.release()
    invariant.expect_warning(r"C-STORE answered 0x[AC]")


# --------------------------------------------------------------------------------------
# PT-01..PT-06: the command's Affected SOP Instance UID
# --------------------------------------------------------------------------------------
BAD_COMMAND_UIDS = {
    "PT-01-traversal": b"../../../../tmp/pwn",
    "PT-01-relative": b"../../x",
    "PT-02-dotdot": b"..",
    "PT-02-dot": b".",
    "PT-02-empty": b"",
    "PT-02-four-dots": b"....",
    "PT-03-absolute": b"/etc/passwd",
    "PT-03-windows-drive": b"C:\\Windows\\x",
    "PT-03-unc": b"\\\\server\\share\\x",
    "PT-03-backslash-traversal": b"a\\..\\..\\b",
    "PT-04-embedded-nul": b"1.2.3\x00/../../x",
    "PT-05-300-characters": b"1." + b"2" * 298,
    "PT-05-10000-characters": b"1." + b"3" * 9998,
}


@pytest.mark.parametrize("uid", list(BAD_COMMAND_UIDS.values()), ids=list(BAD_COMMAND_UIDS))
def test_pt_01_to_06_bad_command_uid_fails_and_writes_nothing_outside_the_spool(
    catalogue_node, invariant, outside, uid
):
    _refused_bad_uid(catalogue_node, invariant, uid)


NON_ASCII_UIDS = {
    "PT-06-fullwidth-percent": "\uff052e\uff052e".encode(),  # fullwidth percent, "2e" x2
    "PT-06-fullwidth-dots": "\uff0e\uff0e".encode(),  # fullwidth full stops
    "PT-06-overlong-utf8": b"\xc0\xae\xc0\xae/x",  # overlong UTF-8 for "../x"
}


@pytest.mark.parametrize("uid", list(NON_ASCII_UIDS.values()), ids=list(NON_ASCII_UIDS))
def test_pt_06_non_ascii_look_alike_uid_is_never_normalised_the_association_is_aborted(
    catalogue_node, invariant, outside, uid
):
    """Look-alikes of ``..`` in the command's UID are not ASCII, so not a UID (PS3.5
    9.1) and not even a command set that can be answered (the response would have to
    echo it): ABORT-U (protocol/dimse.py refuses the bytes, never decodes them into
    dots); nothing is stored. The catalogue's "treated as invalid UID" holds with an
    abort instead of a status; the next association is served (the invariant)."""
    from harness import ABORT_U

    with Store(catalogue_node.port) as store:
        store.send(uid, dataset_bytes(generate_uid()))
        store.peer.expect_abort_and_close(ABORT_U, within=30)
    invariant.expect_warning(r"not a UID \(non-ASCII bytes\)")


BAD_DATASET_UIDS = {
    "PT-02-study-dotdot": ("StudyInstanceUID", ".."),
    "PT-02-study-dot": ("StudyInstanceUID", "."),
    "PT-02-study-empty": ("StudyInstanceUID", ""),
    "PT-02-study-four-dots": ("StudyInstanceUID", "...."),
    "PT-02-series-dotdot": ("SeriesInstanceUID", ".."),
    "PT-02-series-traversal": ("SeriesInstanceUID", "../../x"),
    "PT-03-study-absolute": ("StudyInstanceUID", "/etc/passwd"),
}


@pytest.mark.parametrize(
    ("keyword", "value"), list(BAD_DATASET_UIDS.values()), ids=list(BAD_DATASET_UIDS)
)
def test_pt_02_bad_study_or_series_uid_in_the_data_set_fails_and_writes_nothing(
    catalogue_node, invariant, outside, keyword, value
):
    """The data set's Study/Series Instance UID is ``..``, ``.``, empty, ``....`` or a
    path (the command's UID valid): a failure status with an Error Comment, not stored
    under it (the row would carry it into the database and audit records)."""
    uid = generate_uid()
    ds = catalogue_dataset(uid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value
        setattr(ds, keyword, value)
    with Store(catalogue_node.port) as store:
        status, comment = store.store(uid.encode(), encode_dataset(ds))
        assert 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF, hex(status)
        assert comment, "a failure without an Error Comment"
        store.good(invariant)
        store.release()
    assert uid not in catalogue_node.uids()
    invariant.expect_warning(r"C-STORE answered 0x[AC]")


# --------------------------------------------------------------------------------------
# PT-07: AE titles and patient data that look like paths
# --------------------------------------------------------------------------------------
def _pynetdicom_store(port: int, ds, calling: str, called: str = "ROUTER"):  # type: ignore[no-untyped-def]
    from pydicom.dataset import FileMetaDataset
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE, EXPLICIT_LE)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    try:
        assoc = ae.associate(HOST, port, ae_title=called)
        if not assoc.is_established:
            return assoc, None
        status = assoc.send_c_store(ds)
        assoc.release()
        return assoc, status
    finally:
        ae.shutdown()


def test_pt_07_path_like_calling_ae_and_patient_data_are_stored_harmlessly(
    catalogue_node, invariant, outside
):
    """Calling AE ``../secret/VICTIM``, PatientName ``../../x``, PatientID ``/etc``: the
    node accepts any calling AE by default, so the instance is stored under a name of
    the router's; the texts are in the database only."""
    ds = catalogue_dataset()
    ds.PatientName, ds.PatientID = "../../x", "/etc"
    _, status = _pynetdicom_store(catalogue_node.port, ds, calling="../secret/VICTIM")
    assert status is not None and status.Status == SUCCESS, status
    uid = str(ds.SOPInstanceUID)
    invariant.acknowledged(uid)
    (row,) = [r for r in catalogue_node.instances() if r["sop_instance_uid"] == uid]
    assert row["calling_aet"] == "../secret/VICTIM"
    assert SPOOL_NAME.match(str(row["spool_name"])), row
    invariant.expect_no_warning()


def test_pt_07_path_like_called_ae_is_rejected_and_writes_nothing(
    catalogue_node, invariant, outside
):
    """Called AE ``../secret/VICTIM`` is not ours: A-ASSOCIATE-RJ (1, 1, 7)."""
    with RawPeer(HOST, catalogue_node.port) as peer:
        from harness import associate_rq

        peer.send(associate_rq(called="../secret/VICTIM", contexts=CONTEXTS))
        peer.expect_reject(1, 1, 7, within=30)


# --------------------------------------------------------------------------------------
# PT-08: the same SOP Instance UID from two peers at once
# --------------------------------------------------------------------------------------
def _split(data: bytes) -> tuple[bytes, bytes]:
    half = len(data) // 2
    return data[:half], data[half:]


@pytest.mark.parametrize("same_bytes", [True, False], ids=["PT-08-same-bytes", "PT-08-other-bytes"])
def test_pt_08_same_uid_from_two_peers_at_once_gets_distinct_files_and_the_duplicate_policy(
    catalogue_node, invariant, outside, same_bytes
):
    """Two associations send one SOP Instance UID at once, interleaved so that both
    temporary files exist together: distinct names, no torn file. The same bytes make
    one instance (DESIGN §3.1: its jobs are still pending, so no new ones); other bytes
    make two, each file holding exactly what its peer sent."""
    uid = generate_uid()
    datasets = [dataset_bytes(uid)]
    ds = catalogue_dataset(uid)
    ds.AccessionNumber = "PT08-OTHER"
    datasets.append(datasets[0] if same_bytes else encode_dataset(ds))
    node = catalogue_node
    with Store(node.port) as a, Store(node.port) as b:
        for store, dataset in ((a, datasets[0]), (b, datasets[1])):
            store._message_id += 1
            store.peer.send(
                p_data_tf(pdv(1, COMMAND_LAST, store_command(store._message_id, uid.encode())))
            )
            store.peer.send(p_data_tf(pdv(1, DATASET_MORE, _split(dataset)[0])))
        temps = _wait_for(lambda: node.tmp_files() if len(node.tmp_files()) >= 2 else None)
        assert temps is not None and len(set(temps)) == 2, node.tmp_files()
        for store, dataset in ((a, datasets[0]), (b, datasets[1])):
            store.peer.send(p_data_tf(pdv(1, DATASET_LAST, _split(dataset)[1])))
        answers = [a.answer(), b.answer()]
        a.release()
        b.release()
    assert answers == [(SUCCESS, "")] * 2, answers
    invariant.acknowledged(uid)
    rows = [r for r in node.instances() if r["sop_instance_uid"] == uid]
    assert len(rows) == (1 if same_bytes else 2), rows
    digests = {hashlib.sha256(d).hexdigest() for d in datasets}
    stored = {
        hashlib.sha256(dataset_of(node.store_dir / str(r["spool_name"]))).hexdigest() for r in rows
    }
    assert stored == digests, "a spool file is not what its peer sent"
    for row in rows:
        assert row["job_states"] == ["pending"] * len(row["destinations"]), row
    invariant.expect_no_warning()


def _wait_for(probe, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    return None


def dataset_of(path: Path) -> bytes:
    """The data set bytes of a Part 10 file the router wrote: after the preamble,
    'DICM' and the meta group (its length from (0002,0000), PS3.10 7.1)."""
    data = path.read_bytes()
    assert data[:128] == bytes(128) and data[128:132] == b"DICM", path
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00", path
    (meta_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + meta_length :]


# --------------------------------------------------------------------------------------
# PT-09: a symlink planted in the spool's temporary directory
# --------------------------------------------------------------------------------------
def test_pt_09_planted_symlinks_in_spool_tmp_are_left_alone(catalogue_node, invariant, outside):
    """Symlinks named like temporary files (``<hex>.part``) pointing at a file outside
    the spool: a store goes on beside them, the target is untouched, the links stay
    links. (The names are random, so the next test plants one at the very name.)"""
    node = catalogue_node
    victim = node.root / "victim.txt"
    victim.write_bytes(b"untouched")
    links = [node.tmp_dir / f"{uuid.uuid4().hex}.part" for _ in range(16)]
    try:
        for link in links:
            link.symlink_to(victim)
        with Store(node.port) as store:
            store.good(invariant)
            store.release()
        assert victim.read_bytes() == b"untouched"
        assert all(link.is_symlink() and link.resolve() == victim for link in links)
    finally:
        for link in links:
            link.unlink(missing_ok=True)
        victim.unlink()
    invariant.expect_no_warning()


def test_pt_09_temp_file_is_opened_exclusively_without_following_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer F: a symlink at exactly the name ``Spool.create_temp`` will use (its random
    id forced): O_CREAT|O_EXCL|O_NOFOLLOW refuses it; the target is not created or
    truncated."""
    spool = Spool(tmp_path / "spool", SpoolSettings())
    spool.create_layout()
    forced = uuid.UUID(int=0x1234)
    monkeypatch.setattr("router.spool.uuid.uuid4", lambda: forced)
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (spool.tmp_dir / f"{forced.hex}.part").symlink_to(victim)
    with pytest.raises(FileExistsError):
        spool.create_temp()
    assert victim.read_bytes() == b"untouched"
    dangling = tmp_path / "absent"
    (spool.tmp_dir / f"{forced.hex}.part").unlink()
    (spool.tmp_dir / f"{forced.hex}.part").symlink_to(dangling)
    with pytest.raises(FileExistsError):
        spool.create_temp()
    assert not dangling.exists()


# --------------------------------------------------------------------------------------
# PT-11: permissions and preamble
# --------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_pt_11_spool_files_and_directories_are_private_and_files_start_with_our_preamble(
    catalogue_node, invariant, outside
):
    """While an instance is being received its temporary file is 0600; committed files
    are 0600/0640 with 128 zero bytes and 'DICM' written by us (whatever the peer's data
    set starts with, CVE-2019-11687); the spool's directories are 0700/0750."""
    node = catalogue_node
    uid = generate_uid()
    dataset = dataset_bytes(uid)
    with Store(node.port) as store:
        store._message_id += 1
        store.peer.send(
            p_data_tf(pdv(1, COMMAND_LAST, store_command(store._message_id, uid.encode())))
        )
        store.peer.send(p_data_tf(pdv(1, DATASET_MORE, dataset[:200])))
        temps = _wait_for(lambda: node.tmp_files())
        assert temps, "no temporary file while the data set is arriving"
        assert {_mode(node.tmp_dir / name) for name in temps} == {0o600}
        store.peer.send(p_data_tf(pdv(1, DATASET_LAST, dataset[200:])))
        assert store.answer() == (SUCCESS, "")
        store.release()
    invariant.acknowledged(uid)
    (row,) = [r for r in node.instances() if r["sop_instance_uid"] == uid]
    path = node.store_dir / str(row["spool_name"])
    assert _mode(path) in (0o600, 0o640), oct(_mode(path))
    head = path.read_bytes()[:132]
    assert head == bytes(128) + b"DICM"
    assert dataset_of(path) == dataset
    directories = [node.spool_dir, node.tmp_dir, node.store_dir, path.parent]
    modes = {str(d): oct(_mode(d)) for d in directories}
    assert all(_mode(d) in (0o700, 0o750) for d in directories), modes
    invariant.expect_no_warning()
