"""The astrometric floor of a co-add catalog's position errors, measured against Gaia.

The co-add positions' errors (ERRX2WIN, :func:`~ks4release.reduction.sep_objects.
windowed_errors`) count the pixel noise only. A bright star's centroid is good to a few mas,
but its position is no better than the WCS of the exposures behind the co-add and the
centroid's pixel-phase bias: on the demo survey, S/N > 100 stars scatter about their true
positions by 2-3 times their errors. The floor is the per-axis error ``sigma`` that, added in
quadrature, makes the residuals of bright Gaia stars consistent with their errors: the robust
standard deviation (1.4826 MAD) of ``d / sqrt(err^2 + err_gaia^2 + sigma^2)``, both axes pooled,
is 1 (0 when it is at most 1 already). Gaia DR3 is moved to the catalog's epoch first. The tile
catalog adds the floor of each tile and band to RAERR/DECERR and records it in its summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from ks4release.projection import chord, unit_vectors
from ks4release.refcat.propagate import column_values, propagate_positions

__all__ = ["AstrometricFloor", "astrometric_floor"]

#: Gaia stars within this radius of a catalog source measure the floor, arcsec.
MATCH_RADIUS_ARCSEC = 0.5
#: Largest floor searched, arcsec (a worse co-add has a problem the floor would hide).
MAX_FLOOR_ARCSEC = 1.0


@dataclass(frozen=True)
class AstrometricFloor:
    """The floor (arcsec per axis), the stars that measured it and, when none, why."""

    floor_arcsec: float
    n_stars: int
    reason: str = ""


def _robust_sigma(values: np.ndarray) -> float:
    """1.4826 times the median absolute deviation from the median (a Gaussian's sigma)."""
    values = np.asarray(values, float)
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def astrometric_floor(ra: np.ndarray, dec: np.ndarray, raerr: np.ndarray, decerr: np.ndarray,
                      usable: np.ndarray, gaia: Table, *, epoch: float, min_stars: int
                      ) -> AstrometricFloor:
    """The floor of the module docstring from catalog positions (deg) and errors (arcsec).

    ``usable`` selects the bright, clean sources that may measure it; ``gaia`` holds Gaia DR3
    (``ra``, ``dec``, optional ``ra_error``/``dec_error`` in mas and proper motions) and is
    propagated to ``epoch`` (Julian year).
    """
    moved = propagate_positions(gaia, epoch)
    g_ra, g_dec = np.asarray(moved["ra"], float), np.asarray(moved["dec"], float)
    ok = np.flatnonzero(np.asarray(usable, bool) & np.isfinite(ra) & np.isfinite(dec)
                        & np.isfinite(raerr) & np.isfinite(decerr))
    if ok.size == 0 or g_ra.size == 0:
        return AstrometricFloor(0.0, 0, "no bright clean source or no Gaia star")
    dist, idx = cKDTree(unit_vectors(g_ra, g_dec)).query(
        unit_vectors(np.asarray(ra)[ok], np.asarray(dec)[ok]),
        distance_upper_bound=chord(MATCH_RADIUS_ARCSEC))
    hit = np.isfinite(dist)
    src, ref = ok[hit], idx[hit]
    if src.size < min_stars:
        return AstrometricFloor(0.0, int(src.size),
                                f"{src.size} Gaia-matched bright stars (need {min_stars})")
    cos_dec = np.cos(np.radians(g_dec[ref]))
    d = np.concatenate([((np.asarray(ra)[src] - g_ra[ref] + 180.0) % 360.0 - 180.0) * cos_dec,
                        np.asarray(dec)[src] - g_dec[ref]]) * 3600.0
    gaia_err = [np.nan_to_num(column_values(moved, name, 0.0)[ref], nan=0.0) / 1000.0
                for name in ("ra_error", "dec_error")]
    var = np.concatenate([np.asarray(raerr)[src] ** 2 + gaia_err[0] ** 2,
                          np.asarray(decerr)[src] ** 2 + gaia_err[1] ** 2])
    return AstrometricFloor(_solve_floor(d, var), int(src.size))


def _solve_floor(d: np.ndarray, var: np.ndarray) -> float:
    """The floor whose addition makes the robust sigma of the normalised residuals 1."""
    def excess(floor: float) -> float:
        return _robust_sigma(d / np.sqrt(var + floor**2)) - 1.0

    if excess(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, MAX_FLOOR_ARCSEC
    if excess(hi) > 0.0:
        return hi
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0.0 else (lo, mid)
    return 0.5 * (lo + hi)
