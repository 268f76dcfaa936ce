"""Camera geometry: chips, amplifiers and gaps at full size and scaled."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ks4release.camera import CCD_NAMES, FULL_CCD_SHAPE, Camera


def test_full_size_camera_matches_kmtnet():
    cam = Camera.kmtnet()
    assert [c.name for c in cam.ccds] == list(CCD_NAMES)
    for ccd in cam.ccds:
        assert ccd.shape == FULL_CCD_SHAPE
        assert len(ccd.amplifiers) == 8
        assert 44000 <= ccd.saturation_adu <= 55000
    width, height = cam.field_size_deg
    assert width == pytest.approx(2.08, abs=0.02)
    assert height == pytest.approx(2.13, abs=0.02)


@given(st.floats(min_value=0.01, max_value=1.0))
def test_amplifiers_tile_every_chip_at_any_scale(scale):
    cam = Camera.kmtnet(scale)
    for ccd in cam.ccds:
        columns = [x for amp in ccd.amplifiers for x in range(amp.x_start, amp.x_stop)]
        assert columns == list(range(ccd.nx))
        assert ccd.amplifier_of_column(ccd.nx - 1).index == 7


@given(st.floats(min_value=0.01, max_value=1.0))
def test_chips_never_overlap(scale):
    cam = Camera.kmtnet(scale)
    boxes = [(c.x0_px, c.x0_px + c.nx, c.y0_px, c.y0_px + c.ny) for c in cam.ccds]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]


def test_bad_scale_and_names_are_rejected():
    with pytest.raises(ValueError, match="scale"):
        Camera.kmtnet(0.0)
    with pytest.raises(KeyError, match="ZZ"):
        Camera.kmtnet().ccd("ZZ")
