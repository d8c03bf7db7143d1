"""router/admission.py: node-wide association counts shared by listener processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.admission import SharedAdmission


def _open(path: Path, index: int) -> SharedAdmission:
    return SharedAdmission(path, rows=2, index=index, max_total=3, max_per_ae=2)


def test_limits_at_and_past_them_across_rows(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    SharedAdmission.create(path, rows=2, max_total=3)
    one, two = _open(path, 0), _open(path, 1)
    assert one.try_acquire("A") and two.try_acquire("A")
    assert not one.try_acquire("A") and not two.try_acquire("A")  # per AE, both rows
    assert two.try_acquire("B")
    assert not one.try_acquire("C") and not two.try_acquire("C")  # total
    assert one.counts() == (3, {"A": 2, "B": 1})
    two.release("A")
    assert one.try_acquire("C")
    assert two.counts() == (3, {"A": 1, "B": 1, "C": 1})
    one.close()
    two.close()


def test_a_slot_is_reused_once_its_ae_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    SharedAdmission.create(path, rows=2, max_total=3)
    one = _open(path, 0)
    for ae in ("A", "B", "C"):
        assert one.try_acquire(ae)
        one.release(ae)
    for ae in ("D", "E", "F"):  # three slots, six names over time
        assert one.try_acquire(ae)
    assert one.counts() == (3, {"D": 1, "E": 1, "F": 1})
    one.release("not-held")  # a release without an acquire changes nothing
    assert one.counts()[0] == 3
    one.close()


def test_clear_row_forgets_a_dead_listener_only(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    SharedAdmission.create(path, rows=2, max_total=3)
    one, two = _open(path, 0), _open(path, 1)
    assert one.try_acquire("A") and two.try_acquire("A") and two.try_acquire("B")
    SharedAdmission.clear_row(path, rows=2, max_total=3, index=1)
    assert one.counts() == (1, {"A": 1})
    one.close()
    two.close()


def test_a_file_of_another_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    SharedAdmission.create(path, rows=2, max_total=3)
    with pytest.raises(ValueError, match="does not match"):
        SharedAdmission(path, rows=3, index=0, max_total=3, max_per_ae=1)
    with pytest.raises(ValueError, match="outside"):
        SharedAdmission(path, rows=2, index=2, max_total=3, max_per_ae=1)
