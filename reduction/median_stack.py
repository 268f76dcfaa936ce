"""How much of a faint point source's flux an aperture holds on a median co-add.

A median co-add of exposures taken in different seeing has no single PSF. For a bright star the
median at each pixel is the middle exposure's profile value there (a profile of "median seeing");
for a star near the noise the median of (signal + noise) is close to a noise-weighted mean of the
exposures' values, and the mean of Moffat profiles of different widths puts a different share of
the flux inside a given radius. The fraction of a point source's flux inside a fixed aperture
thus depends on its signal-to-noise. The zero-point maps are calibrated on bright stars, so
faint point sources come out fainter or brighter than the truth by up to a few 0.01 mag, with a
sign and size set by the co-add's seeings and noise levels. The effect belongs to the median
(DR1's co-adds and SWarp's MEDIAN share it), not to the resampling. Measured on the 16 co-adds of
the demo survey with 5 times the stars (``simulate --star-density 5``): aperture sums at the
true positions of isolated stars, in 6 bins of S/N from 20 to 8000, offsets from the S/N
600-8000 bin: RMS over the 94 bins 0.019 mag in a 3" aperture, 0.008 after subtracting this
module's prediction (chi-square 117 -> 49); 5": 0.012 -> 0.011 (46 -> 30); 10": 0.022 -> 0.023
(23 -> 16; noise and the neighbours' light dominate there); tile 0089 V, 5", S/N 20-40: -0.039
observed, -0.041 predicted.

This module predicts it exactly for a model of the co-add: exposure ``i`` holds a Moffat profile
of index ``beta`` and half-light radius ``r50[i]`` (the zero-point photometry's measurement on
that exposure) plus independent normal noise of standard deviation ``sigma[i]`` per pixel (its
sky noise after scaling); the co-add pixel is their median (the mean of the middle two for an
even count, as numpy and SWarp). The expected median of independent normal values of different
means and widths is an order-statistic integral, computed by Gauss-Hermite quadrature for every
radius of a fine grid; the aperture flux is the integral of that expected profile. Resampling
correlates the noise of neighbouring pixels but leaves each pixel's distribution normal, and the
expectation of a sum of medians is the sum of the pixels' expected medians, so correlation does
not enter.

``flux_factors`` gives, for flux-to-noise ``x`` (total flux over the co-add's per-pixel noise,
both in the co-add's units) and aperture radius ``R``, the ratio of the expected aperture flux
to that of a noiseless point source of the same flux: the photometry divides a point-like
detection's aperture and Kron fluxes by it (``[photometry] stack_flux_correction``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from ks4release.reduction.moffat import moffat_alpha, moffat_profile

__all__ = [
    "expected_median",
    "flux_factors",
    "median_noise",
    "point_source_factors",
]

#: Gauss-Hermite nodes of the order-statistic integrals (within 10^-3 of the noise of draws for
#: noise levels within a factor 3 of each other, tests; 4e-5 mag on the factors against 48).
_HERMITE_NODES = 32
#: Draws of pure noise behind :func:`median_noise` (standard error 0.22% of the result, 2e-5
#: mag on the factors against 400,000 draws).
_NOISE_DRAWS = 100_000
#: Radius step of the profile integration, px.
_RADIUS_STEP_PX = 0.25
#: Flux-to-noise values on which :func:`point_source_factors` tabulates the factors (log-spaced;
#: at 10^6 every radius is within 10^-4 mag of the noiseless limit on the demo's exposures).
_X_GRID = np.geomspace(1.0, 1e6, 31)
#: Step of the aperture radii, px, on which :func:`point_source_factors` tabulates them
#: (interpolated between).
_R_GRID_STEP_PX = 0.5
#: Largest tabulated radius, px (the tables' cost grows with it): larger apertures (the Kron
#: ellipses of bright stars) take its factor, within 10^-4 mag of the factor at 100 px for the
#: demo's exposures and 0.001 for seeing twice as poor.
_R_GRID_MAX_PX = 40.0


def _count_below(p: np.ndarray) -> np.ndarray:
    """Distribution of how many of independent events of probabilities ``p`` (n, ...) happen:
    (n + 1, ...), by the Poisson-binomial recursion."""
    dist = np.zeros((p.shape[0] + 1, *p.shape[1:]))
    dist[0] = 1.0
    for k, pk in enumerate(p, start=1):
        dist[1:k + 1] = dist[1:k + 1] * (1.0 - pk) + dist[:k] * pk
        dist[0] *= 1.0 - pk
    return dist


def expected_median(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Expected median of ``n`` independent normal values N(mu[i], sigma[i]) at each of ``m``
    positions: ``mu`` is (n, m), ``sigma`` (n,) > 0; returns (m,). An even ``n`` takes the mean
    of the middle two order statistics.

    E[X_(k)] = sum_i int t f_i(t) P(exactly k - 1 of the others are below t) dt, each integral
    by Gauss-Hermite quadrature around X_i's own mean and width.
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    n = mu.shape[0]
    if sigma.shape != (n,) or not np.all(sigma > 0):
        raise ValueError(f"need {n} positive noise values, got {sigma}")
    if n == 1:
        return mu[0].copy()
    ranks = [(n - 1) // 2] if n % 2 else [n // 2 - 1, n // 2]  # 0-based k - 1
    nodes, weights = np.polynomial.hermite.hermgauss(_HERMITE_NODES)
    weights = weights / math.sqrt(math.pi)
    total = np.zeros(mu.shape[1])
    for i in range(n):
        t = mu[i][None, :] + math.sqrt(2.0) * sigma[i] * nodes[:, None]  # (g, m)
        others = np.delete(np.arange(n), i)
        p = ndtr((t[None] - mu[others][:, None, :]) / sigma[others][:, None, None])
        dist = _count_below(p)  # (n, g, m)
        below = sum(dist[k] for k in ranks) / len(ranks)
        total += np.einsum("g,gm->m", weights, t * below)
    return total


def median_noise(sigma: np.ndarray, seed: int = 0) -> float:
    """Standard deviation of the median of independent zero-mean normal values of standard
    deviations ``sigma`` (the co-add's per-pixel noise for these exposures), from draws."""
    sigma = np.asarray(sigma, dtype=np.float64)
    draws = np.random.default_rng(seed).standard_normal((_NOISE_DRAWS, sigma.size)) * sigma
    return float(np.median(draws, axis=1).std())


def flux_factors(r50_px: np.ndarray, sigma: np.ndarray, beta: float, x: np.ndarray,
                 radii_px: np.ndarray) -> np.ndarray:
    """Expected aperture flux of a point source on the median of the given exposures over that
    of a noiseless one, (len(x), len(radii_px)).

    ``r50_px``, ``sigma``: each exposure's PSF half-light radius (px) and per-pixel noise (any
    common unit); ``beta``: the Moffat index of every exposure's PSF; ``x``: total flux over the
    co-add's per-pixel noise (:func:`median_noise` of ``sigma``), > 0; ``radii_px``: aperture
    radii. One or two exposures give 1 everywhere (a median of two is their mean).
    """
    r50_px = np.asarray(r50_px, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    radii_px = np.asarray(radii_px, dtype=np.float64)
    if r50_px.shape != sigma.shape or r50_px.ndim != 1 or not np.all(r50_px > 0):
        raise ValueError(f"need one positive r50 per noise value, got {r50_px} and {sigma}")
    if r50_px.size <= 2:
        return np.ones((x.size, radii_px.size))
    radius = np.arange(0.0, radii_px.max() + 2 * _RADIUS_STEP_PX, _RADIUS_STEP_PX)
    profiles = moffat_profile(radius, moffat_alpha(r50_px, beta), beta)  # unit flux
    unit = sigma / median_noise(sigma)  # per-pixel noise when the co-add's is 1
    mu = (profiles[:, None, :] * x[None, :, None]).reshape(r50_px.size, -1)
    noisy = expected_median(mu, unit).reshape(x.size, radius.size) / x[:, None]
    bright = np.median(profiles, axis=0)
    return _enclosed(noisy, radius, radii_px) / _enclosed(bright[None], radius, radii_px)


def _enclosed(profile: np.ndarray, radius: np.ndarray, radii_px: np.ndarray) -> np.ndarray:
    """Flux inside each of ``radii_px`` of circular profiles sampled at ``radius``: (rows,
    len(radii_px)), by the trapezoid rule on 2 pi r I(r)."""
    ring = 2.0 * np.pi * radius * profile
    cumulative = np.concatenate([np.zeros((profile.shape[0], 1)),
                                 np.cumsum(0.5 * (ring[:, 1:] + ring[:, :-1]) * np.diff(radius),
                                           axis=1)], axis=1)
    return np.stack([np.interp(radii_px, radius, row) for row in cumulative])


def point_source_factors(covered: np.ndarray, r50_px: np.ndarray, sigma: np.ndarray,
                         beta: float, x: np.ndarray, radii_px: np.ndarray) -> np.ndarray:
    """:func:`flux_factors` of every object: (n_objects, n_apertures).

    ``covered`` (n_objects, n_exposures) says which exposures entered the median at each object
    (``photometry.coverage``); ``r50_px``, ``sigma``: per exposure; ``x``: each object's flux
    over the co-add's per-pixel noise there; ``radii_px`` (n_objects, n_apertures): its
    aperture radii (a Kron ellipse as the circle of the same area). The factors are tabulated
    once per distinct set of exposures on a grid of ``x`` and radius and interpolated (linearly
    in log x and in radius). Objects covered by at most two exposures, or with ``x`` <= 0 or a
    radius that is not positive and finite, get 1.
    """
    covered = np.asarray(covered, dtype=bool)
    radii_px = np.asarray(radii_px, dtype=np.float64)
    x = np.where(np.isfinite(x), np.asarray(x, dtype=np.float64), 0.0)
    out = np.ones(radii_px.shape)
    usable = (x > 0) & np.all(np.isfinite(radii_px) & (radii_px > 0), axis=1)
    if covered.size == 0 or not usable.any():
        return out
    largest = min(float(radii_px[usable].max()), _R_GRID_MAX_PX)
    radius_grid = _R_GRID_STEP_PX * np.arange(1, max(math.ceil(largest / _R_GRID_STEP_PX), 2)
                                              + 1)
    log_x = np.log(np.clip(x, _X_GRID[0], _X_GRID[-1]))
    patterns, which = np.unique(covered, axis=0, return_inverse=True)
    for k, pattern in enumerate(patterns):
        rows = np.flatnonzero((which.ravel() == k) & usable)
        if pattern.sum() <= 2 or rows.size == 0:
            continue
        table = flux_factors(r50_px[pattern], sigma[pattern], beta, _X_GRID, radius_grid)
        along_x = np.stack([np.interp(log_x[rows], np.log(_X_GRID), column)
                            for column in table.T], axis=1)  # (rows, n_radius_grid)
        for j in range(radii_px.shape[1]):
            r = np.clip(radii_px[rows, j], radius_grid[0], radius_grid[-1])
            position = (r - radius_grid[0]) / _R_GRID_STEP_PX
            lo = np.minimum(np.floor(position).astype(int), radius_grid.size - 2)
            frac = position - lo
            picked = along_x[np.arange(rows.size), lo] * (1 - frac) \
                + along_x[np.arange(rows.size), lo + 1] * frac
            out[rows, j] = picked
    return out
