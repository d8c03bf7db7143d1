"""DIMSE status categories (PS3.7 C.1, PS3.4 B.2.3)."""

from __future__ import annotations

import pytest

from protocol import status
from protocol.status import StatusCategory, category


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0x0000, StatusCategory.SUCCESS),
        (0x0001, StatusCategory.WARNING),
        (0x0107, StatusCategory.WARNING),
        (0x0116, StatusCategory.WARNING),
        (0xB000, StatusCategory.WARNING),
        (0xB006, StatusCategory.WARNING),
        (0xB007, StatusCategory.WARNING),
        (0xBFFF, StatusCategory.WARNING),
        (0xA700, StatusCategory.FAILURE),
        (0xA7FF, StatusCategory.FAILURE),
        (0xA900, StatusCategory.FAILURE),
        (0xA9FF, StatusCategory.FAILURE),
        (0xC000, StatusCategory.FAILURE),
        (0xCFFF, StatusCategory.FAILURE),
        (0x0117, StatusCategory.FAILURE),
        (0x0122, StatusCategory.FAILURE),
        (0x0124, StatusCategory.FAILURE),
        (0x0210, StatusCategory.FAILURE),
        (0x0211, StatusCategory.FAILURE),
        (0x0212, StatusCategory.FAILURE),
        (0x0213, StatusCategory.FAILURE),
        (0xFE00, StatusCategory.CANCEL),
        (0xFF00, StatusCategory.PENDING),
        (0xFF01, StatusCategory.PENDING),
        (0x1234, StatusCategory.FAILURE),  # undefined: never mistaken for success
        (0xFFFF, StatusCategory.FAILURE),
    ],
)
def test_category(code: int, expected: StatusCategory) -> None:
    assert category(code) is expected


def test_named_constants() -> None:
    assert status.SUCCESS == 0
    assert status.OUT_OF_RESOURCES == 0xA700
    assert status.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert status.CANNOT_UNDERSTAND == 0xC000
    assert status.UNRECOGNIZED_OPERATION == 0x0211


def test_out_of_resources() -> None:
    assert status.is_out_of_resources(0xA7FE)
    assert status.is_out_of_resources(0x0213)
    assert not status.is_out_of_resources(0xA900)


@pytest.mark.parametrize("code", [0, 0xA701, 0xA901, 0xC123, 0xB123, 0x4242, 0x0122])
def test_describe_never_fails(code: int) -> None:
    assert status.describe(code)
