"""SExtractor's BACKPHOTO_TYPE LOCAL (``reduction/local_background.py``): the estimator, the
annulus and the levels. The photometry's use of them is tested in ``test_photometry.py`` (a
star on a plateau the mesh does not see) and against SExtractor's own LOCAL levels in
``test_sextractor_parity.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sep
from hypothesis import given, settings
from hypothesis import strategies as st

from ks4release.reduction.local_background import (
    MIN_ANNULUS_PIXELS,
    annulus_values,
    clipped_mode,
    local_levels,
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sky=st.floats(-50.0, 50.0), noise=st.floats(1.0, 30.0),
       n_sources=st.integers(0, 200), gradient=st.floats(0.0, 0.2))
def test_clipped_mode_is_the_meshs_estimator(seed, sky, noise, n_sources, gradient):
    """On one mesh's worth of pixels (noise, a gradient, up to 5% of the pixels lit by
    sources) the estimate equals sep's (SExtractor's) background of a single mesh within 2%
    of the noise: sep bins the values into a histogram, this sorts them."""
    rng = np.random.default_rng(seed)
    image = rng.normal(sky, noise, (64, 64)) + gradient * noise * np.arange(64)[None, :] / 8
    rows, cols = rng.integers(0, 64, (2, n_sources))
    image[rows, cols] += rng.exponential(10 * noise, n_sources)
    image = image.astype(np.float32)
    expected = sep.Background(image, bw=64, bh=64, fw=1, fh=1).globalback
    assert abs(clipped_mode(image) - expected) < 0.02 * noise


def test_clipped_mode_of_no_values_and_of_a_constant():
    assert math.isnan(clipped_mode(np.array([])))
    assert clipped_mode(np.full(50, 3.25)) == 3.25


def test_clipped_mode_resists_a_bright_neighbour():
    """A neighbour filling 10% of the annulus moves the median; the clipped mode stays near
    the sky (within a tenth of the noise, where the median is 0.15 noise off)."""
    rng = np.random.default_rng(4)
    values = rng.normal(0.0, 10.0, 3000)
    values[:300] += rng.uniform(20.0, 2000.0, 300)
    assert abs(clipped_mode(values)) < 1.0 < np.median(values)


def _index_image(shape: tuple[int, int]) -> np.ndarray:
    """Every pixel's value is its flat index, so a set of values names the pixels."""
    return np.arange(shape[0] * shape[1], dtype=np.float64).reshape(shape)


def test_annulus_is_the_grown_box_ringed_by_thick_pixels():
    """An object box 9 px wide and 5 high, x 40..48, y 50..54: grown by 9 // 4 = 2 and 5 // 4 =
    1 pixels, then a ring of 6 pixels; bad pixels left out."""
    image = _index_image((120, 100))
    bad = np.zeros(image.shape, bool)
    bad[45, 60] = True
    inner = np.zeros(image.shape, bool)
    inner[49:56, 38:51] = True
    outer = np.zeros(image.shape, bool)
    outer[43:62, 32:57] = True
    expected = np.sort(image[outer & ~inner & ~bad])
    assert np.array_equal(np.sort(annulus_values(image, bad, (40, 48, 50, 54), 6)), expected)
    bad[45, 40] = True
    assert annulus_values(image, bad, (40, 48, 50, 54), 6).size == expected.size - 1


@pytest.mark.parametrize("box", [(0, 4, 0, 4), (95, 99, 50, 54), (-3, 2, 117, 119)])
def test_annulus_at_the_border_is_clipped_to_the_image(box):
    """At the image's border the annulus keeps the pixels inside (SExtractor would fall back
    to the mesh) and never wraps around to the other side."""
    image = _index_image((120, 100))
    values = annulus_values(image, np.zeros(image.shape, bool), box, 6)
    rows, cols = np.divmod(values.astype(int), 100)
    xmin, xmax, ymin, ymax = box
    assert values.size and np.unique(values).size == values.size
    assert np.all(np.abs(cols - (xmin + xmax) / 2) <= (xmax - xmin) / 2 + 8)
    assert np.all(np.abs(rows - (ymin + ymax) / 2) <= (ymax - ymin) / 2 + 8)


def test_levels_find_each_objects_pedestal_and_fall_back_to_the_mesh():
    """Two objects on pedestals of 5 and -3 ADU get those levels within the noise of their
    annulus; an object whose annulus holds fewer than MIN_ANNULUS_PIXELS good pixels gets 0."""
    rng = np.random.default_rng(2)
    image = rng.normal(0.0, 2.0, (200, 200))
    image[:, :100] += 5.0
    image[:, 100:] -= 3.0
    bad = np.zeros(image.shape, bool)
    bad[150:, :] = True
    boxes = np.array([[30, 40, 40, 50], [150, 160, 40, 50], [20, 30, 180, 190]])
    levels = local_levels(image, bad, boxes, 24)
    assert abs(levels[0] - 5.0) < 0.2 and abs(levels[1] + 3.0) < 0.2
    assert levels[2] == 0.0
    assert annulus_values(image, bad, (20, 30, 180, 190), 24).size < MIN_ANNULUS_PIXELS
