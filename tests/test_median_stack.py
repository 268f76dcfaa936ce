"""The expected flux of a point source on a median co-add (reduction/median_stack.py): the
order-statistic integrals against draws, the limits where nothing changes, and the per-object
tabulation. The photometry's use of it is tested on a synthetic median stack in
test_photometry.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ks4release.reduction.median_stack import (
    expected_median,
    flux_factors,
    median_noise,
    point_source_factors,
)
from ks4release.reduction.moffat import moffat_alpha, moffat_enclosed_fraction, moffat_profile

BETA = 3.0
#: Half-light radii (px) of five exposures of 1.3-2.6" seeing at 0.4"/px (Moffat beta 3) and
#: their sky noise.
R50 = np.array([1.3, 1.6, 1.7, 2.0, 2.6]) / 0.4 * 0.5 * np.sqrt(2 ** 0.5 - 1) \
    / np.sqrt(2 ** (1 / 3) - 1)
SIGMA = np.array([8.0, 10.0, 9.0, 11.0, 14.0])


def test_moffat_alpha_gives_the_half_light_radius():
    alpha = moffat_alpha(np.array([2.0, 3.5]), BETA)
    radius = np.linspace(0.0, 200.0, 400_001)
    ring = 2 * np.pi * radius * moffat_profile(radius, alpha, BETA)
    enclosed = np.cumsum(ring, axis=1) * (radius[1] - radius[0])
    assert enclosed[:, -1] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert np.interp([2.0], radius, enclosed[0])[0] == pytest.approx(0.5, abs=1e-3)
    assert np.interp([3.5], radius, enclosed[1])[0] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="beta"):
        moffat_alpha(np.array([2.0]), 1.0)


def test_enclosed_fraction_integrates_the_profile_for_arrays_of_diameters():
    fwhm = np.array([3.0, 5.0, 8.0])
    diameter = np.array([2.0, 12.5, 40.0])
    alpha = fwhm / (2.0 * np.sqrt(2 ** (1 / BETA) - 1))
    radius = np.linspace(0.0, 20.0, 200_001)
    enclosed = np.cumsum(2 * np.pi * radius * moffat_profile(radius, alpha, BETA), axis=1) \
        * (radius[1] - radius[0])
    expected = [np.interp(d / 2, radius, row) for d, row in zip(diameter, enclosed)]
    assert moffat_enclosed_fraction(fwhm, BETA, diameter) == pytest.approx(expected, abs=1e-3)
    assert moffat_enclosed_fraction(fwhm, BETA, 12.5)[1] == pytest.approx(expected[1], abs=1e-3)
    with pytest.raises(ValueError, match="positive diameters"):
        moffat_enclosed_fraction(fwhm, BETA, np.array([2.0, 0.0, 1.0]))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_expected_median_equals_the_mean_of_many_draws(n, seed):
    """Means spread over several sigma and sigmas up to 3 times apart (exposures' sky noise):
    the quadrature agrees with 2 x 10^5 draws to 4 standard errors plus 10^-3 sigma (odd and
    even counts)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-3.0, 3.0, (n, 4))
    sigma = rng.uniform(0.5, 1.5, n)
    draws = mu[:, :, None] + sigma[:, None, None] * rng.standard_normal((n, 4, 200_000))
    medians = np.median(draws, axis=0)
    error = medians.std(axis=1) / np.sqrt(medians.shape[1])
    assert np.all(np.abs(expected_median(mu, sigma) - medians.mean(axis=1))
                  <= 4 * error + 1e-3 * sigma.max())


def test_expected_median_rejects_bad_noise():
    with pytest.raises(ValueError, match="positive noise"):
        expected_median(np.zeros((3, 2)), np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="positive noise"):
        expected_median(np.zeros((3, 2)), np.array([1.0, 1.0]))


def test_median_noise_of_equal_exposures():
    """The median of 5 unit normals has a standard deviation of 0.536 (1.2533 / sqrt(5) only
    for many)."""
    assert median_noise(np.ones(5)) == pytest.approx(0.5359, abs=0.002)
    assert median_noise(np.full(3, 2.0)) == pytest.approx(2 * 0.6698, abs=0.004)


def test_same_seeing_or_at_most_two_exposures_keep_every_flux():
    """Identical profiles: each pixel's values are symmetric about one mean whatever their
    noise, so the median is unbiased; one or two exposures: the median is the mean."""
    x, radii = np.array([3.0, 30.0, 300.0]), np.array([2.0, 6.25, 12.5])
    same = flux_factors(np.full(5, 3.0), SIGMA, BETA, x, radii)
    assert same == pytest.approx(np.ones((3, 3)), abs=1e-4)
    two = flux_factors(R50[:2], SIGMA[:2], BETA, x, radii)
    assert np.array_equal(two, np.ones((3, 3)))


def test_different_seeing_loses_flux_at_low_snr_and_none_when_bright():
    """The five exposures: a star of 5" aperture S/N ~40 keeps 2.3% less in the 5" aperture
    than a bright one (the stack test of test_photometry.py measures it); far above the noise
    the factors return to 1."""
    x = np.array([40.0 * np.sqrt(np.pi) * 6.25 / 0.85, 1e7])
    factors = flux_factors(R50, SIGMA, BETA, x, np.array([3.75, 6.25, 12.5]))
    assert -2.5 * np.log10(factors[0]) == pytest.approx([0.029, 0.025, 0.008], abs=0.002)
    assert factors[1] == pytest.approx(np.ones(3), abs=2e-4)


def test_flux_factors_match_a_simulated_median_stack():
    """Moffat stars sampled at pixel centres in five exposures, noise drawn, pixel-wise median,
    circular aperture sums: their mean over 2000 stacks (less the median of the noise alone,
    whose mean is 0, to cut the scatter) against the noiseless median's, 3", 5" and 10"."""
    rng = np.random.default_rng(3)
    size = 61
    yy, xx = np.mgrid[:size, :size] - size // 2
    radius = np.hypot(xx, yy)
    profiles = moffat_profile(radius.ravel(), moffat_alpha(R50, BETA), BETA)
    unit = SIGMA / median_noise(SIGMA)
    x, radii = 150.0, np.array([3.75, 6.25, 12.5])
    inside = radius.ravel()[None, :] <= radii[:, None]
    bright = inside @ np.median(profiles, axis=0)
    sums = np.zeros(3)
    for _ in range(10):
        noise = rng.standard_normal((200, R50.size, size * size)) * unit[None, :, None]
        stacked = np.median(x * profiles[None] + noise, axis=1) - np.median(noise, axis=1)
        sums += (stacked @ inside.T).mean(axis=0) / 10
    measured = sums / x / bright
    predicted = flux_factors(R50, SIGMA, BETA, np.array([x]), radii)[0]
    assert measured == pytest.approx(predicted, abs=0.002)
    assert abs(-2.5 * np.log10(predicted[1])) > 0.01  # an effect worth correcting


def test_point_source_factors_per_object():
    """Objects of one exposure set get flux_factors at their x and radii (exactly on the grid,
    closely between); two exposures, x <= 0 or a bad radius give 1."""
    covered = np.array([[True] * 5, [True] * 5, [True, True, False, False, False],
                        [True] * 5, [True] * 5, [True] * 5])
    x = np.array([10.0, 63.0957, 50.0, 0.0, 50.0, 50.0])
    radii = np.array([[6.25, 3.0], [6.5, 12.0], [6.25, 3.0], [6.25, 3.0], [np.nan, 3.0],
                      [7.25, 3.0]])
    factors = point_source_factors(covered, R50, SIGMA, BETA, x, radii)
    direct = flux_factors(R50, SIGMA, BETA, np.array([10.0, 63.0957, 50.0]),
                          np.array([3.0, 6.25, 6.5, 7.25, 12.0]))
    assert factors[0] == pytest.approx(direct[0, [1, 0]], abs=2e-4)
    assert factors[1] == pytest.approx(direct[1, [2, 4]], abs=2e-4)
    assert factors[5, 0] == pytest.approx(direct[2, 3], abs=2e-4)
    assert np.array_equal(factors[2:5], np.ones((3, 2)))
    assert np.all(factors[[0, 1, 5]] != 1.0)


def test_apertures_beyond_the_largest_tabulated_radius_take_its_factor():
    """A Kron ellipse of 80 px (a bright star's) gets the 40 px factor, which for these
    exposures lies within 10^-4 mag of the 100 px one."""
    x = np.array([30.0, 30.0])
    factors = point_source_factors(np.ones((2, 5), bool), R50, SIGMA, BETA, x,
                                   np.array([[80.0], [40.0]]))
    assert factors[0, 0] == factors[1, 0]
    direct = flux_factors(R50, SIGMA, BETA, x[:1], np.array([40.0, 100.0]))[0]
    assert abs(2.5 * np.log10(direct[0] / direct[1])) < 1e-4
