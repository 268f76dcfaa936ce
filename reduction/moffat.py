"""The Moffat point-spread function the reduction assumes for a point source.

``I(r) = (beta - 1) / (pi alpha^2) (1 + r^2 / alpha^2)^(-beta)`` per unit flux: ``alpha`` is the
core width, ``beta`` (> 1) the wing index. The photometry's stack and Kron corrections, the
wing fits of the astrometry, the post-processing's PSF fractions and the site-colour and
artificial-star models all describe a point source by it, with the width of a co-add or an
exposure given as a FWHM (``SEEING``, ``PSFBETA`` in the headers) or as a half-light radius
(the zero-point photometry's ``FLUX_RADIUS``). The simulator draws its stars from its own copy of
the formula on purpose: the truth does not share code with the measurement.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "integrated_moffat",
    "moffat_alpha",
    "moffat_alpha_fwhm",
    "moffat_enclosed_fraction",
    "moffat_fwhm",
    "moffat_profile",
    "moffat_share_in_circle",
]


def moffat_alpha_fwhm(fwhm: float | np.ndarray, beta: float) -> float | np.ndarray:
    """Core width ``alpha`` of a Moffat profile of full width at half maximum ``fwhm`` (same
    unit) and index ``beta``: ``fwhm / (2 sqrt(2**(1/beta) - 1))``."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_fwhm(alpha: float | np.ndarray, beta: float) -> float | np.ndarray:
    """Full width at half maximum of a Moffat profile of core width ``alpha`` and index ``beta``
    (the inverse of :func:`moffat_alpha_fwhm`)."""
    return 2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0)


def moffat_alpha(r50: np.ndarray, beta: float) -> np.ndarray:
    """Moffat core width ``alpha`` of a profile of half-light radius ``r50`` and index ``beta``
    (> 1): the enclosed fraction 1 - (1 + r^2/alpha^2)^(1 - beta) is 1/2 at ``r50``."""
    if not beta > 1.0:
        raise ValueError(f"Moffat beta must be > 1, got {beta}")
    return np.asarray(r50, dtype=np.float64) / math.sqrt(2.0 ** (1.0 / (beta - 1.0)) - 1.0)


def moffat_profile(radius: np.ndarray, alpha: np.ndarray, beta: float) -> np.ndarray:
    """Surface brightness of unit-flux Moffat profiles, (n_alpha, n_radius), per px^2."""
    a2 = np.asarray(alpha, dtype=np.float64)[:, None] ** 2
    r2 = np.asarray(radius, dtype=np.float64)[None, :] ** 2
    return (beta - 1.0) / (np.pi * a2) * (1.0 + r2 / a2) ** -beta


def integrated_moffat(half: int, fwhm_px: float, beta: float, dx: float = 0.0,
                      dy: float = 0.0, sub: int = 5) -> np.ndarray:
    """A unit-flux Moffat PSF (FWHM ``fwhm_px``, index ``beta``) centred ``(dx, dy)`` px off the
    central pixel of a (2 half + 1)^2 stamp, each pixel integrated on a ``sub`` x ``sub`` grid
    (as a detector integrates a PSF, not sampled at the pixel centre)."""
    alpha = moffat_alpha_fwhm(fwhm_px, beta)
    n = 2 * half + 1
    fine = (np.arange(n * sub) + 0.5) / sub - half - 0.5
    r2 = (fine[:, None] - dy) ** 2 + (fine[None, :] - dx) ** 2
    profile = moffat_profile(np.sqrt(r2.ravel()), np.array([alpha]), beta).reshape(r2.shape)
    return profile.reshape(n, sub, n, sub).mean(axis=(1, 3))


def moffat_enclosed_fraction(fwhm: np.ndarray, beta: float, diameter: float | np.ndarray
                             ) -> np.ndarray:
    """Share of a point source's light inside a centred circle of ``diameter`` under a Moffat
    PSF of FWHM ``fwhm`` (the same unit, arcsec or px; arrays broadcast together) and index
    ``beta``: ``1 - (1 + r**2 / alpha**2) ** (1 - beta)`` with ``r = diameter / 2`` and
    ``alpha`` from :func:`moffat_alpha_fwhm`."""
    diameter = np.asarray(diameter, dtype=np.float64)
    if not (beta > 1 and np.all(diameter > 0)):
        raise ValueError(f"need beta > 1 and positive diameters, got {beta} and {diameter}")
    alpha = moffat_alpha_fwhm(np.asarray(fwhm, dtype=np.float64), beta)
    return 1.0 - (1.0 + (0.5 * diameter / alpha) ** 2) ** (1.0 - beta)


def moffat_share_in_circle(distance: np.ndarray, radius: float, alpha: np.ndarray,
                           beta: float, nodes: int = 48) -> np.ndarray:
    """Share of the light of unit-flux Moffat profiles (core widths ``alpha``, index ``beta``)
    centred ``distance`` from the centre of a circle of ``radius`` (same unit) that falls
    inside the circle.

    In polar coordinates about the profile's centre the circle holds, at radius ``r``, the arc
    ``2 theta(r)`` with ``cos theta = (r^2 + d^2 - R^2) / (2 r d)`` for ``|d - R| < r < d + R``
    and the whole ring for ``r < R - d``; the share is the enclosed fraction out to ``R - d``
    plus the integral of the ring density times ``theta / pi`` over ``|d - R| .. d + R``,
    by Gauss-Legendre quadrature in ``phi`` with ``r = c - h cos(phi)``, which takes the square
    roots at both ends (a relative error below 1e-4 with the default nodes, tests).
    """
    d = np.atleast_1d(np.asarray(distance, dtype=np.float64))
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), d.shape)
    if not (beta > 1.0 and radius > 0 and np.all(d >= 0) and np.all(a > 0)):
        raise ValueError("need beta > 1, a positive radius and alpha, distances >= 0")
    inside = np.clip(radius - d, 0.0, None)
    share = np.where(radius > d, 1.0 - (1.0 + (inside / a) ** 2) ** (1.0 - beta), 0.0)
    x, w = np.polynomial.legendre.leggauss(nodes)
    phi, w_phi = 0.5 * math.pi * (x + 1.0), 0.5 * math.pi * w
    centre = 0.5 * (np.abs(d - radius) + d + radius)[:, None]
    half = 0.5 * (d + radius - np.abs(d - radius))[:, None]
    r = centre - half * np.cos(phi)[None, :]
    a2 = a[:, None] ** 2
    ring = 2.0 * (beta - 1.0) * r / a2 * (1.0 + r**2 / a2) ** -beta  # d(enclosed)/dr
    with np.errstate(invalid="ignore", divide="ignore"):
        cos_theta = (r**2 + d[:, None] ** 2 - radius**2) / (2.0 * r * d[:, None])
    theta = np.arccos(np.clip(np.nan_to_num(cos_theta, nan=1.0), -1.0, 1.0)) / math.pi
    arc = ring * theta * half * np.sin(phi)[None, :] * w_phi[None, :]
    return (share + arc.sum(axis=1)).reshape(np.shape(distance))
