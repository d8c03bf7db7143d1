"""C-STORE (PS3.4 B.2) in both directions, several SOP classes and transfer syntaxes.

Each received instance is compared element by element with what was sent (group 2 only
for the transfer syntax and the SOP class/instance UIDs). Peers: DCMTK's storescu,
storescp and dcmsend; pynetdicom as SCU and SCP; our storescu and storescp.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_support import (
    HOST,
    STORE_CASES,
    assert_same_instance,
    bundled_file,
    describe,
    find_received,
    make_case,
    received_files,
    require_dcmtk,
    run_bounded,
    sop_class_of,
    sop_instance_uid,
    transfer_syntax_of,
)

#: DCMTK storescu option that proposes exactly the file's transfer syntax in the first
#: context (with -R), so the file goes over the wire as it is, without conversion.
DCMTK_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.70": "-xs",
}


#: For the many-files-at-once tests: every case except the bundled deflated file, whose
#: odd-length dataset DCMTK refuses when our storescu sends it as is (that defect is
#: shown by its own parametrized case, not by every batch test).
BATCH_CASES = [case for case in STORE_CASES if case != "deflated_bundled"]


@pytest.fixture
def storescp_dir(tmp_path: Path) -> Path:
    out = tmp_path / "our-received"
    out.mkdir()
    return out


def _assert_stored_by_us(original: Path, out: Path) -> None:
    received = find_received(out, sop_instance_uid(original))
    assert received.name == f"{sop_instance_uid(original)}.dcm"
    assert_same_instance(original, received)


# --------------------------------------------------------------------------------------
# peers -> our storescp
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", STORE_CASES)
def test_dcmtk_storescu_to_our_storescp_stores_identical_dataset(
    case, run_app, storescp_dir, tmp_path
):
    storescu = require_dcmtk("storescu")["storescu"]
    original = make_case(case, tmp_path / "src")
    scp = run_app("storescp", "-od", str(storescp_dir))
    option = DCMTK_PROPOSE[transfer_syntax_of(original)]
    result = run_bounded(
        [storescu, "-v", "-R", option, "-aec", "STORESCP", HOST, str(scp.port), str(original)],
        timeout=60,
    )
    assert result.returncode == 0, describe(result) + "\nserver:\n" + scp.stderr()
    assert "Received Store Response (Success)" in result.stdout + result.stderr, describe(result)
    _assert_stored_by_us(original, storescp_dir)
    assert len(received_files(storescp_dir)) == 1


@pytest.mark.parametrize("case", STORE_CASES)
def test_pynetdicom_scu_to_our_storescp_stores_identical_dataset(
    case, run_app, storescp_dir, tmp_path
):
    from pynetdicom import AE

    original = make_case(case, tmp_path / "src")
    scp = run_app("storescp", "-od", str(storescp_dir))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(sop_class_of(original), [transfer_syntax_of(original)])
    assoc = ae.associate(HOST, scp.port, ae_title="STORESCP")
    assert assoc.is_established, scp.stderr()
    try:
        status = assoc.send_c_store(original)
        assert status and status.Status == 0x0000, (status, scp.stderr())
    finally:
        assoc.release()
    _assert_stored_by_us(original, storescp_dir)


def test_pynetdicom_scu_sends_every_case_on_one_association_to_our_storescp(
    run_app, storescp_dir, tmp_path
):
    from pynetdicom import AE

    originals = [make_case(case, tmp_path / "src") for case in STORE_CASES]
    scp = run_app("storescp", "-od", str(storescp_dir))
    ae = AE(ae_title="PYSCU")
    pairs = {(sop_class_of(p), transfer_syntax_of(p)) for p in originals}
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate(HOST, scp.port, ae_title="STORESCP")
    assert assoc.is_established
    try:
        for original in originals:
            status = assoc.send_c_store(original)
            assert status and status.Status == 0x0000, (original.name, status, scp.stderr())
    finally:
        assoc.release()
    for original in originals:
        _assert_stored_by_us(original, storescp_dir)
    assert len(received_files(storescp_dir)) == len(originals)


def test_dcmsend_to_our_storescp_stores_every_file(run_app, storescp_dir, tmp_path):
    dcmsend = require_dcmtk("dcmsend")["dcmsend"]
    # dcmsend proposes uncompressed syntaxes besides the file's own and converts to the
    # accepted one, so the little-endian files (value-identical after conversion) and a
    # compressed one (proposed alone, sent as is) are used here.
    cases = ["ct_implicit_le", "mr_explicit_le", "ct_small", "jpeg_baseline", "rtplan_implicit"]
    originals = [make_case(case, tmp_path / "src") for case in cases]
    scp = run_app("storescp", "-od", str(storescp_dir))
    result = run_bounded(
        [dcmsend, "-v", "-aec", "STORESCP", HOST, str(scp.port), *map(str, originals)],
        timeout=60,
    )
    assert result.returncode == 0, describe(result) + "\nserver:\n" + scp.stderr()
    for original in originals:
        received = find_received(storescp_dir, sop_instance_uid(original))
        compressed = transfer_syntax_of(original).startswith("1.2.840.10008.1.2.4.")
        assert_same_instance(original, received, same_transfer_syntax=compressed)
    assert len(received_files(storescp_dir)) == len(originals)


def test_dcmsend_scanning_a_directory_to_our_storescp_stores_every_file(
    run_app, storescp_dir, tmp_path
):
    dcmsend = require_dcmtk("dcmsend")["dcmsend"]
    src = tmp_path / "src"
    originals = [make_case(case, src / f"d{i}") for i, case in enumerate(STORE_CASES[:3])]
    scp = run_app("storescp", "-od", str(storescp_dir))
    result = run_bounded(
        [dcmsend, "+sd", "+r", "-aec", "STORESCP", HOST, str(scp.port), str(src)], timeout=60
    )
    assert result.returncode == 0, describe(result)
    for original in originals:
        find_received(storescp_dir, sop_instance_uid(original))
    assert len(received_files(storescp_dir)) == len(originals)


# --------------------------------------------------------------------------------------
# our storescu -> peers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", STORE_CASES)
def test_our_storescu_to_dcmtk_storescp_stores_identical_dataset(
    case, call_app, dcmtk_storescp, tmp_path
):
    original = make_case(case, tmp_path / "src")
    scp = dcmtk_storescp()
    result = call_app("storescu", "-aec", "DCMTKSCP", HOST, str(scp.port), str(original))
    assert result.returncode == 0, describe(result) + "\nDCMTK storescp:\n" + scp.stderr()
    assert scp.output_dir is not None
    received = find_received(scp.output_dir, sop_instance_uid(original))
    assert_same_instance(original, received)


@pytest.mark.parametrize("case", STORE_CASES)
def test_our_storescu_to_pynetdicom_scp_stores_identical_dataset(
    case, call_app, pynetdicom_scp, tmp_path
):
    original = make_case(case, tmp_path / "src")
    scp = pynetdicom_scp()
    result = call_app("storescu", HOST, str(scp.port), str(original))
    assert result.returncode == 0, describe(result)
    assert len(scp.received) == 1
    assert_same_instance(original, scp.received[0])
    assert scp.wait_for(lambda s: s.released == 1)


def test_our_storescu_sends_every_case_in_one_run_to_dcmtk_storescp(
    call_app, dcmtk_storescp, tmp_path
):
    src = tmp_path / "src"
    originals = [make_case(case, src) for case in BATCH_CASES]
    scp = dcmtk_storescp()
    result = call_app("storescu", "-v", HOST, str(scp.port), *map(str, originals))
    assert result.returncode == 0, describe(result) + "\nDCMTK storescp:\n" + scp.stderr()
    assert scp.output_dir is not None
    for original in originals:
        assert_same_instance(original, find_received(scp.output_dir, sop_instance_uid(original)))
    assert len(received_files(scp.output_dir)) == len(originals)


def test_our_storescu_sends_every_case_on_one_association_to_pynetdicom(
    call_app, pynetdicom_scp, tmp_path
):
    src = tmp_path / "src"
    originals = [make_case(case, src) for case in STORE_CASES]
    scp = pynetdicom_scp()
    result = call_app("storescu", HOST, str(scp.port), str(src))
    assert result.returncode == 0, describe(result)
    assert scp.wait_for(lambda s: s.released == 1)
    assert scp.released == 1, "all files should go over one association"
    by_uid = {sop_instance_uid(p): p for p in scp.received}
    for original in originals:
        assert_same_instance(original, by_uid[sop_instance_uid(original)])
    assert len(scp.received) == len(originals)


def test_our_storescu_recurse_sends_nested_directory_to_dcmtk_storescp(
    call_app, dcmtk_storescp, tmp_path
):
    src = tmp_path / "tree"
    originals = [
        make_case("ct_implicit_le", src),
        make_case("mr_explicit_le", src / "a"),
        make_case("sc_explicit_be", src / "a" / "b"),
        make_case("jpeg_baseline", src / "c"),
    ]
    (src / "a" / "README.txt").write_text("not a DICOM file")
    scp = dcmtk_storescp()
    result = call_app("storescu", "-r", HOST, str(scp.port), str(src))
    assert result.returncode == 0, describe(result)
    assert scp.output_dir is not None
    for original in originals:
        assert_same_instance(original, find_received(scp.output_dir, sop_instance_uid(original)))
    assert len(received_files(scp.output_dir)) == len(originals)


def test_our_storescu_without_recurse_sends_only_top_level_files(
    call_app, run_app, storescp_dir, tmp_path
):
    src = tmp_path / "tree"
    top = make_case("ct_implicit_le", src)
    make_case("mr_explicit_le", src / "nested")
    scp = run_app("storescp", "-od", str(storescp_dir))
    result = call_app("storescu", HOST, str(scp.port), str(src))
    assert result.returncode == 0, describe(result)
    assert [p.name for p in received_files(storescp_dir)] == [f"{sop_instance_uid(top)}.dcm"]


def test_our_storescu_recurse_to_our_storescp_stores_every_file(
    call_app, run_app, storescp_dir, tmp_path
):
    src = tmp_path / "tree"
    originals = [make_case(case, src / case[:2]) for case in BATCH_CASES]
    scp = run_app("storescp", "-od", str(storescp_dir))
    result = call_app("storescu", "-r", "-aec", "STORESCP", HOST, str(scp.port), str(src))
    assert result.returncode == 0, describe(result) + "\nserver:\n" + scp.stderr()
    for original in originals:
        _assert_stored_by_us(original, storescp_dir)
    assert len(received_files(storescp_dir)) == len(originals)


def test_our_storescu_exits_nonzero_when_the_peer_answers_a_failure(
    call_app, pynetdicom_scp, tmp_path
):
    original = make_case("ct_implicit_le", tmp_path / "src")
    scp = pynetdicom_scp(store_status=0xA700)
    result = call_app("storescu", HOST, str(scp.port), str(original))
    assert result.returncode == 1, describe(result)
    assert "1 of 1" in result.stderr, describe(result)


def test_our_storescu_exits_1_when_no_path_holds_dicom(call_app, tmp_path):
    (tmp_path / "x.txt").write_text("no")
    result = call_app("storescu", HOST, "104", str(tmp_path / "x.txt"))
    assert result.returncode == 1, describe(result)
    result = call_app("storescu", HOST, "104", str(tmp_path / "missing"))
    assert result.returncode == 1, describe(result)


def test_our_storescp_ignore_receives_without_writing(run_app, tmp_path, call_app):
    original = make_case("mr_explicit_le", tmp_path / "src")
    scp = run_app("storescp", "--ignore")
    result = call_app("storescu", HOST, str(scp.port), str(original))
    assert result.returncode == 0, describe(result)
    leftovers = [p for p in tmp_path.rglob("*.dcm") if p.parent != original.parent]
    assert leftovers == []


def test_our_storescp_restricted_to_implicit_gets_converted_data_from_dcmtk(
    run_app, storescp_dir, tmp_path
):
    storescu = require_dcmtk("storescu")["storescu"]
    original = make_case("mr_explicit_le", tmp_path / "src")
    scp = run_app("storescp", "-xi", "-od", str(storescp_dir))
    result = run_bounded([storescu, HOST, str(scp.port), str(original)], timeout=60)
    assert result.returncode == 0, describe(result)
    received = find_received(storescp_dir, sop_instance_uid(original))
    assert transfer_syntax_of(received) == "1.2.840.10008.1.2"
    assert_same_instance(original, received, same_transfer_syntax=False)


def test_dm09_meta_uid_differing_from_dataset_is_refused_by_dcmtk_and_storescu_exits_1(
    call_app, dcmtk_storescp, tmp_path
):
    """pydicom's rtplan.dcm as bundled: its meta header names another SOP Instance UID
    than the dataset. Our storescu sends files without decoding them, so the C-STORE-RQ
    carries the meta header's UID; DCMTK answers 0xA900 and storescu reports failure."""
    original = bundled_file("rtplan_implicit", tmp_path / "src", as_is=True)
    scp = dcmtk_storescp()
    result = call_app("storescu", HOST, str(scp.port), str(original))
    assert result.returncode == 1, describe(result)
    assert "0xA900" in result.stderr, describe(result)
