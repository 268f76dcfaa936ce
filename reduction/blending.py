"""How much of each detection's 5" aperture light its detected neighbours put there.

Aperture photometry sums whatever lies in the aperture. The background mesh (128-256 px)
takes out the mean light of the sources' wings and outskirts but not the light of a particular
brighter source 4-24" away: at 1/4 scale, measured as DR1 did (``[photometry]
neighbour_model = false``), half of the faint stars (B 22-22.5, S/N ~ 24) take more than 0.1%
of their flux from such neighbours by the truth, and their MAG_APER5 reads 0.043 mag too
bright (median), while the others read 0.003-0.005 too faint. The photometry's neighbour model
(:mod:`.neighbour_model`, on by default) takes the detected neighbours' light out.

``blend_aper5_{b}`` (ours, not DR1's; in the tile catalogs) predicts that share from the
catalog itself, for real data as for the demo: every other detection within
:data:`NEIGHBOUR_REACH_ARCSEC` is a circular Moffat of the co-add's PSFBETA holding its
MAG_AUTO flux, of the co-add's SEEING when point-like (CLASS_STAR >= 0.5) and of its
FWHM_IMAGE within 1-2 SEEING otherwise (the photometry's neighbour model,
:func:`.neighbour_model.model_widths`), and its light inside the source's 5" aperture
(:func:`.moffat.moffat_share_in_circle`, exact for the model) is summed and divided by the
source's own MAG_APER5 flux. Null where the source has no aperture flux.

What the column adds is where the photometry's correction rests most on that model. At 1/4
scale (``benchmarks/demo_truth.py``), of the isolated stars of true S/N 20-40 with FLAGS 0,
75-87% per band and mode have ``blend_aper5 <= 0.003``, and their MAG_APER5 reads
-0.002..+0.006 mag (median; without the neighbour model +0.002..+0.008); the others read
+0.002..+0.028. The model moves each of those by its ``blend_aper5`` (1.0857 x, plus the mesh
term every star gets), and its light in their apertures agrees with the truth's to 0.001 of
their flux: the spread of those medians (54-124 stars per group at S/N 20-40) is mostly the
stars' noise. The cut keeps 99.4-100% of the stars that take at most 0.1% of their flux from
the true neighbours and removes 32-47% of the others.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from ks4release.reduction.moffat import moffat_alpha_fwhm, moffat_share_in_circle
from ks4release.reduction.neighbour_model import model_widths
from ks4release.reduction.postprocess import float_column

__all__ = [
    "BLEND_APERTURE_ARCSEC",
    "NEIGHBOUR_REACH_ARCSEC",
    "blend_column",
    "neighbour_light",
]

#: Diameter of the aperture whose neighbour light ``blend_aper5_{b}`` gives, arcsec.
BLEND_APERTURE_ARCSEC = 5.0
#: Farthest neighbour counted, arcsec: beyond it a Moffat (beta 2.5-3, 1.5" seeing) 100 times
#: brighter puts less than 1e-4 of the faint source's flux into its 5" aperture.
NEIGHBOUR_REACH_ARCSEC = 24.0
#: Sources whose neighbours are looked up at once, and pairs whose shares are integrated at
#: once (48 nodes each: about 40 MB per array), so that crowded fields stay within memory.
_CHUNK = 5_000
_PAIR_CHUNK = 100_000


def neighbour_light(x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm_px: np.ndarray,
                    beta: float, radius_px: float, reach_px: float) -> np.ndarray:
    """Light of the other sources inside a circle of ``radius_px`` around each source.

    Sources at ``(x, y)`` (px) are circular Moffat profiles of index ``beta``, total ``flux``
    (0 or NaN: none) and FWHM ``fwhm_px``; the ones farther than ``reach_px`` are left out.
    Returns the summed light per source, in the unit of ``flux``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    flux = np.nan_to_num(np.asarray(flux, float), nan=0.0)
    alpha = moffat_alpha_fwhm(np.asarray(fwhm_px, float), beta)
    points = np.c_[x, y]
    ok = np.isfinite(points).all(axis=1)
    light = np.zeros(len(x))
    if not ok.any():
        return light
    index = np.flatnonzero(ok)
    tree = cKDTree(points[ok])
    for start in range(0, index.size, _CHUNK):
        own = index[start:start + _CHUNK]
        near = tree.query_ball_point(points[own], reach_px)
        counts = np.fromiter((len(n) for n in near), int, len(near))
        owner = np.repeat(own, counts)
        other = index[np.concatenate(near).astype(int)] if counts.sum() else owner
        keep = (other != owner) & (flux[other] > 0)
        owner, other = owner[keep], other[keep]
        for first in range(0, owner.size, _PAIR_CHUNK):
            i, j = owner[first:first + _PAIR_CHUNK], other[first:first + _PAIR_CHUNK]
            share = moffat_share_in_circle(np.hypot(x[i] - x[j], y[i] - y[j]), radius_px,
                                           alpha[j], beta)
            light += np.bincount(i, weights=share * flux[j], minlength=len(x))
    return light


def blend_column(table: Table, band: str, seeing_arcsec: float, beta: float,
                 pixel_scale_arcsec: float) -> Table:
    """``table`` with ``blend_aper5_{band}``: the detected neighbours' predicted light in each
    source's 5" aperture over its own MAG_APER5 flux (module docstring).

    Reads ``x_image``, ``y_image``, ``mag_auto_{b}``, ``mag_aper5_{b}``, ``class_star_{b}``
    and ``fwhm_image_{b}`` (px); the magnitudes in one system (the ratio does not depend on
    which).
    """
    b = band.lower()
    width = model_widths(float_column(table, f"class_star_{b}"),
                         float_column(table, f"fwhm_image_{b}"),
                         seeing_arcsec / pixel_scale_arcsec)
    light = neighbour_light(float_column(table, "x_image"), float_column(table, "y_image"),
                            10 ** (-0.4 * float_column(table, f"mag_auto_{b}")), width, beta,
                            0.5 * BLEND_APERTURE_ARCSEC / pixel_scale_arcsec,
                            NEIGHBOUR_REACH_ARCSEC / pixel_scale_arcsec)
    own = 10 ** (-0.4 * float_column(table, f"mag_aper5_{b}"))
    out = table.copy(copy_data=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[f"blend_aper5_{b}"] = np.where(own > 0, light / own, np.nan).astype(np.float32)
    return out
