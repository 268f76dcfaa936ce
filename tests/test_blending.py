"""The neighbours' light in a source's aperture (reduction/blending.py): the Moffat share of a
circle against a direct 2-D integral, the neighbour sum against aperture sums on a rendered
image, and the tile-catalog column; the photometry's model of its detections
(reduction/neighbour_model.py), whose use is tested in test_photometry.py."""

from __future__ import annotations

import numpy as np
import pytest
import sep
from astropy.table import Table
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from ks4release.reduction.blending import blend_column, neighbour_light
from ks4release.reduction.moffat import (
    integrated_moffat,
    moffat_alpha_fwhm,
    moffat_enclosed_fraction,
    moffat_share_in_circle,
)
from ks4release.reduction.neighbour_model import model_image, model_widths, own_sums

PIXEL_SCALE = 0.4
SEEING = 1.6  # arcsec
BETA = 2.8


@settings(max_examples=15, deadline=None)
@given(distance=st.floats(0.0, 60.0), radius=st.floats(2.0, 15.0), fwhm=st.floats(2.0, 10.0),
       beta=st.floats(1.8, 5.0))
def test_share_in_circle_is_the_integral_of_the_profile_over_the_circle(distance, radius,
                                                                         fwhm, beta):
    alpha = moffat_alpha_fwhm(fwhm, beta)

    def profile(v: float, u: float) -> float:  # circle at the origin, the profile at (-d, 0)
        return (beta - 1) / (np.pi * alpha**2) * (1 + ((u + distance) ** 2 + v**2)
                                                   / alpha**2) ** -beta

    direct, _ = integrate.dblquad(profile, -radius, radius,
                                  lambda u: -np.sqrt(max(radius**2 - u**2, 0.0)),
                                  lambda u: np.sqrt(max(radius**2 - u**2, 0.0)),
                                  epsabs=1e-13, epsrel=1e-9)
    share = moffat_share_in_circle(distance, radius, alpha, beta)
    assert share == pytest.approx(direct, rel=1e-4, abs=1e-12)


def test_share_in_circle_limits_and_errors():
    alpha = moffat_alpha_fwhm(4.0, 3.0)
    centred = moffat_share_in_circle(np.array([0.0, 1e-9]), 6.0, alpha, 3.0)
    assert centred == pytest.approx(moffat_enclosed_fraction(4.0, 3.0, 12.0), rel=1e-9)
    far = moffat_share_in_circle(np.array([1000.0]), 6.0, alpha, 3.0)
    # far away the circle's area times the surface brightness at its centre (to (R/d)^2)
    brightness = 2.0 / (np.pi * alpha**2) * (1 + 1000.0**2 / alpha**2) ** -3.0
    assert far[0] == pytest.approx(np.pi * 36.0 * brightness, rel=1e-3)
    with pytest.raises(ValueError, match="beta"):
        moffat_share_in_circle(1.0, 6.0, alpha, 1.0)
    with pytest.raises(ValueError, match="distances"):
        moffat_share_in_circle(-1.0, 6.0, alpha, 3.0)


def _render(shape: tuple[int, int], stars: list[tuple[float, float, float]], fwhm_px: float,
            beta: float) -> np.ndarray:
    """Noiseless image of pixel-integrated Moffat stars (x, y, flux)."""
    image = np.zeros(shape)
    half = 100
    for x, y, flux in stars:
        ix, iy = int(round(x)), int(round(y))
        stamp = integrated_moffat(half, fwhm_px, beta, dx=x - ix, dy=y - iy)
        image[iy - half:iy + half + 1, ix - half:ix + half + 1] += flux * stamp
    return image


def test_neighbour_light_is_what_the_aperture_sums_of_the_others_hold():
    """On a noiseless image of a faint star and three brighter ones 5-20" away, each star's
    5" aperture sum less its own light equals the predicted neighbour light."""
    fwhm_px = SEEING / PIXEL_SCALE
    stars = [(200.3, 200.6, 1_000.0), (212.8, 201.1, 20_000.0), (200.0, 235.4, 100_000.0),
             (160.5, 170.2, 5_000.0)]
    image = _render((400, 400), stars, fwhm_px, BETA)
    x, y, flux = (np.array(v) for v in zip(*stars))
    radius = 2.5 / PIXEL_SCALE
    summed, _, _ = sep.sum_circle(image, x, y, radius, subpix=0)
    own = np.array([sep.sum_circle(_render((400, 400), [star], fwhm_px, BETA), [star[0]],
                                   [star[1]], radius, subpix=0)[0][0] for star in stars])
    predicted = neighbour_light(x, y, flux, np.full(4, fwhm_px), BETA, radius, 100.0)
    # pixel integration blurs the profiles (their wings' curvature: 1-1.5% at 12-30 px)
    assert predicted == pytest.approx(summed - own, rel=0.02)
    assert predicted[0] / own[0] > 0.05  # the faint star is heavily blended
    # beyond the reach nothing counts; no flux or no position adds nothing
    assert neighbour_light(x, y, flux, np.full(4, fwhm_px), BETA, radius, 5.0) \
        == pytest.approx(np.zeros(4))
    flux_nan = flux.copy()
    flux_nan[1:] = np.nan
    assert neighbour_light(x, y, flux_nan, np.full(4, fwhm_px), BETA, radius, 100.0)[0] == 0.0
    x_nan = x.copy()
    x_nan[0] = np.nan
    lonely = neighbour_light(x_nan, y, flux, np.full(4, fwhm_px), BETA, radius, 100.0)
    assert lonely[0] == 0.0 and lonely[1:] == pytest.approx(predicted[1:] - [
        flux[0] * moffat_share_in_circle(np.hypot(x[k] - x[0], y[k] - y[0]), radius,
                                         moffat_alpha_fwhm(fwhm_px, BETA), BETA)
        for k in (1, 2, 3)])


def test_neighbour_light_in_chunks_equals_all_at_once(monkeypatch):
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 500, (2, 400))
    flux = rng.lognormal(8, 2, 400)
    fwhm = rng.uniform(3, 8, 400)
    whole = neighbour_light(x, y, flux, fwhm, 2.5, 6.25, 60.0)
    monkeypatch.setattr("ks4release.reduction.blending._CHUNK", 37)
    monkeypatch.setattr("ks4release.reduction.blending._PAIR_CHUNK", 101)
    assert neighbour_light(x, y, flux, fwhm, 2.5, 6.25, 60.0) == pytest.approx(whole, rel=1e-12)


def test_blend_column_draws_point_sources_with_the_seeing_and_others_with_their_width():
    """A star beside a bright neighbour: the column is the neighbour's light in the star's 5"
    aperture over the star's aperture flux; an extended neighbour (CLASS_STAR < 0.5) spreads
    more of its light there; no aperture flux gives null."""
    fwhm_px = SEEING / PIXEL_SCALE
    table = Table({"x_image": [100.0, 112.0, 400.0], "y_image": [100.0, 100.0, 400.0],
                   "mag_auto_v": [20.0, 16.0, 18.0], "mag_aper5_v": [20.05, 16.05, np.nan],
                   "class_star_v": [0.98, 0.97, 0.9], "fwhm_image_v": [4.1, 12.0, 4.0]})
    out = blend_column(table, "V", SEEING, BETA, PIXEL_SCALE)
    share = moffat_share_in_circle(12.0, 6.25, moffat_alpha_fwhm(fwhm_px, BETA), BETA)
    assert out["blend_aper5_v"][0] == pytest.approx(
        share * 10 ** (-0.4 * 16.0) / 10 ** (-0.4 * 20.05), rel=1e-5)
    assert np.isnan(out["blend_aper5_v"][2])
    assert "blend_aper5_v" not in table.colnames
    table["class_star_v"][1] = 0.1
    extended = blend_column(table, "V", SEEING, BETA, PIXEL_SCALE)
    wide = moffat_share_in_circle(12.0, 6.25, moffat_alpha_fwhm(8.0, BETA), BETA)  # 2 seeings
    assert extended["blend_aper5_v"][0] == pytest.approx(
        wide * 10 ** (-0.4 * 16.0) / 10 ** (-0.4 * 20.05), rel=1e-5)
    assert wide > share


def test_own_sums_are_the_model_images_sums_of_a_lone_source():
    """What the photometry takes as a source's own model light in its apertures is what the
    model image holds there; sources without a flux or a position stay out of both."""
    x, y = np.array([100.3, 40.0, np.nan]), np.array([90.6, 40.0, 50.0])
    flux = np.array([5e4, np.nan, 1e3])
    fwhm = model_widths(np.array([0.9, 0.9, 0.1]), np.array([3.0, 3.0, 7.0]), 4.0)
    assert fwhm.tolist() == [4.0, 4.0, 7.0]
    assert model_widths(np.array([0.1, 0.1, 0.9]), np.array([3.0, 19.0, np.nan]),
                        4.0).tolist() == [4.0, 8.0, 4.0]
    image = model_image((200, 200), x, y, flux, fwhm, BETA)
    a, b, theta, kron = (np.array([v] * 3) for v in (2.0, 1.5, 0.3, 3.5))
    radii = [3.75, 6.25, 12.5]
    own = own_sums(x, y, flux, fwhm, BETA, a, b, theta, kron, radii)
    expected = [sep.sum_ellipse(image.astype(np.float64), x[:1], y[:1], a[:1], b[:1], theta[:1],
                                kron[:1], subpix=5)[0][0]]
    expected += [sep.sum_circle(image.astype(np.float64), x[:1], y[:1], r, subpix=5)[0][0]
                 for r in radii]
    assert [o[0] for o in own] == pytest.approx(expected, rel=1e-5)
    assert [o[1] for o in own] == [0.0] * 4 and [o[2] for o in own] == [0.0] * 4
    # the stamp holds the flux out to MODEL_HALF_PX: the Moffat's share of that square
    assert image.sum() == pytest.approx(5e4 * moffat_enclosed_fraction(4.0, BETA, 120.0),
                                        rel=2e-3)
